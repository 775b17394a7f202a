"""Faster ways to run torchvision's ``maskrcnn_resnet50_fpn`` with the same answers.

``DETECT_MODE`` chooses one (``common.config.DETECT_MODES``):

- ``eager``: torchvision's model as is (``model([tensor])``), fp32; the reference.
- ``exact`` (default): backbone + FPN + RPN head as one cached OpenVINO fp32 graph with Winograd
  convolutions where they pay (``graph``, ``cache``, ``winograd``), the box head as a second fp32
  graph (``boxhead``), the rest torchvision's own code with a threaded box RoIAlign and no mask
  branch (``runtime``). Labels equal eager's; scores and boxes agree to float rounding.
- ``fast``: as ``exact`` but the graph (direct convolutions) runs in bf16 where the CPU supports it
  (AVX-512 BF16 or AMX); answers deviate. On a CPU without bf16 it logs that and runs ``exact``.
"""

from __future__ import annotations

import logging

from torchvision.models.detection import MaskRCNN

from common.model.accel.backend import bf16_supported, openvino_module
from common.model.accel.graph import FAST_WINOGRAD, WINOGRAD
from common.model.accel.runtime import AcceleratedMaskRCNN

log = logging.getLogger(__name__)


def build(
    model: MaskRCNN,
    weights_sha256: str,
    mode: str,
    *,
    cache_dir: str = "",
    threads: int = 0,
    roi_align_threads: int = 2,
    winograd: bool = True,
) -> tuple[AcceleratedMaskRCNN, str]:
    """(callable model, effective mode) for ``mode`` in exact/fast; fast falls back to exact.
    ``winograd=False``: the exact path computes every convolution directly (slower, but smaller:
    OpenVINO keeps the Winograd layers' large intermediate tensors allocated between passes)."""
    precision = "f32"
    effective = "exact"
    places: tuple[str, ...] = WINOGRAD if winograd else ()
    if mode == "fast":
        core = openvino_module().Core()
        if bf16_supported(core):
            precision, effective, places = "bf16", "fast", FAST_WINOGRAD
        else:
            log.warning(
                "DETECT_MODE=fast: this CPU has no bf16 support (AVX-512 BF16 or AMX); "
                "running the exact fp32 path instead"
            )
    accelerated = AcceleratedMaskRCNN(
        model,
        weights_sha256,
        precision=precision,
        cache_dir=cache_dir,
        threads=threads,
        roi_align_threads=roi_align_threads,
        winograd=places,
    )
    return accelerated, effective
