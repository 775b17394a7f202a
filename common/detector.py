"""Mask R-CNN (torchvision ``maskrcnn_resnet50_fpn``) with verified weights, answering COCO names.

Weights come from exactly one source, chosen by configuration:
- ``WEIGHTS_FILE`` unset: torchvision's ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` through its
  weights API and the torch hub cache (downloaded on first use where there is internet);
- ``WEIGHTS_FILE=/path``: a local state-dict file, checked against ``WEIGHTS_SHA256`` if set.
Anything else (missing, corrupt, wrong checksum, wrong architecture) raises ``ModelLoadError``;
the model is never served with untrained weights.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from PIL import Image
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn
from torchvision.transforms.functional import pil_to_tensor

from common.config import Settings
from common.cpugate import CpuGate

log = logging.getLogger(__name__)

COCO_WEIGHTS = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
COCO_CATEGORIES: list[str] = list(COCO_WEIGHTS.meta["categories"])


class ModelLoadError(Exception):
    """The configured weights could not be loaded; the message says which setting to fix."""


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_checkpoint_path() -> str:
    """Where torchvision's weights API keeps the COCO_V1 file in the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(COCO_WEIGHTS.url))


def _state_dict_from_file(path: str, expected_sha256: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"WEIGHTS_FILE={path} does not exist or is not a file")
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ModelLoadError(
                f"WEIGHTS_FILE={path} has sha256 {actual}, but WEIGHTS_SHA256 expects "
                f"{expected_sha256}: replace the file or fix WEIGHTS_SHA256"
            )
    try:
        # mmap: the tensors stay in the page cache, shared by every process that loads the file
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelLoadError(
            f"WEIGHTS_FILE={path} is not a readable PyTorch state dict (truncated or corrupt?): {exc}"
        ) from None
    for wrapper_key in ("model", "state_dict"):  # common training-checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper_key), dict):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"WEIGHTS_FILE={path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _state_dict_from_torchvision() -> dict:
    cached = hub_checkpoint_path()
    if os.path.isfile(cached):
        # What get_state_dict would load (its hash is checked when it is downloaded), but mapped
        # into memory so that every process of the stack shares its pages.
        try:
            return torch.load(cached, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - let torchvision's own loader report the problem
            pass
    try:
        return COCO_WEIGHTS.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - network, hash and file errors alike
        raise ModelLoadError(
            "torchvision's COCO_V1 weights are not in the torch hub cache "
            f"({hub_checkpoint_path()}) and could not be downloaded ({exc}). Set WEIGHTS_FILE to a "
            "local maskrcnn_resnet50_fpn state-dict file, or place the file at that path"
        ) from None


def build_model(state_dict: dict, score_threshold: float) -> torch.nn.Module:
    """The torchvision architecture with ``state_dict`` loaded strictly, in eval mode."""
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=len(COCO_CATEGORIES),
        box_score_thresh=score_threshold,
    )
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the weights do not fit maskrcnn_resnet50_fpn with {len(COCO_CATEGORIES)} classes: "
            f"{str(exc)[:300]}"
        ) from None
    return model.eval()


class Detector:
    """One loaded model; ``detect`` is thread-safe and runs one forward pass at a time."""

    def __init__(self, model, categories: list[str], mode: str = "eager", gate_path: str | None = None):
        self.model = model  # callable like torchvision's model in eval mode: [tensor] -> [dict]
        self.categories = categories
        self.mode = mode  # the detect path actually used (see common/accel.py)
        # Two passes at once would only fight over the same cores: one at a time in this process,
        # and with gate_path (a file in RUN_DIR) one at a time across all processes of the stack.
        self._lock = CpuGate(gate_path)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Detector":
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        if settings.weights_file:
            state_dict = _state_dict_from_file(settings.weights_file, settings.weights_sha256)
        else:
            state_dict = _state_dict_from_torchvision()
        model = build_model(state_dict, settings.score_threshold)
        gate = os.path.join(settings.run_dir, "inference.lock") if settings.shared_inference_lock else None
        if settings.detect_mode == "eager":
            return cls(model, COCO_CATEGORIES, "eager", gate)
        from common import accel

        try:
            accelerated, mode = accel.build(
                model, accel.state_dict_sha256(state_dict), settings.detect_mode,
                cache_dir=settings.accel_cache_dir, threads=settings.torch_threads,
                roi_align_threads=settings.roi_align_threads, winograd=bool(settings.winograd))
        except Exception:  # noqa: BLE001 - the eager model gives the same answers, only slower
            log.exception("DETECT_MODE=%s could not be set up; running torchvision eager instead",
                          settings.detect_mode)
            return cls(build_model(state_dict, settings.score_threshold), COCO_CATEGORIES, "eager", gate)
        log.info("detect path: %s", mode)
        return cls(accelerated, COCO_CATEGORIES, mode, gate)

    def detect_raw(self, image: Image.Image) -> dict:
        """The model's output for ``image``: ``boxes`` (x1, y1, x2, y2 in pixels), ``scores``,
        ``labels`` (indices into ``categories``), best first."""
        tensor = pil_to_tensor(image).float().div_(255.0)
        with self._lock, torch.inference_mode():
            return self.model([tensor])[0]

    def detect(self, image: Image.Image) -> list[str]:
        """COCO category names of the instances scoring above the threshold, best first."""
        output = self.detect_raw(image)
        return [self.categories[index] for index in output["labels"].tolist()]
