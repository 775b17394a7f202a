"""Faster ways to run torchvision's ``maskrcnn_resnet50_fpn`` with the same answers.

``DETECT_MODE`` chooses one (``common.config.DETECT_MODES``):

- ``eager``: torchvision's model as is (``model([tensor])``), fp32; the reference.
- ``exact`` (default): the same computation, split in two:
    * backbone + FPN + RPN head (about 80 % of the time) run as one OpenVINO graph, fp32
      (``INFERENCE_PRECISION_HINT=f32`` set explicitly: OpenVINO's CPU default is bf16 where the
      CPU has it), dynamic input height/width; in it, the 3x3 convolutions of the FPN and the RPN
      head on the two largest levels (P2, P3: a third of the graph's arithmetic) and of ResNet's
      layer3 are computed with Winograd's F(4x4, 3x3), 2.25x fewer multiplications
      (``common/winograd.py``, ``WINOGRAD``);
    * everything else stays torchvision's own code, called piece by piece exactly as
      ``GeneralizedRCNN.forward`` calls it (transform, anchors, proposal decoding and NMS, box
      head, post-processing), except that the box RoIAlign over the 1000 proposals, which
      torchvision runs single-threaded over all channels at once, is run in blocks of
      ``ROI_ALIGN_CHANNEL_BLOCK`` channels spread over ``ROI_ALIGN_THREADS`` threads (each value
      is one box's one channel, computed by torchvision's kernel: the result is bit-identical);
    * the mask branch is skipped: the service answers category names only, and masks never change
      labels, scores or boxes.
  Labels are equal to eager's and scores/boxes agree to float rounding (tests/test_detect_modes.py,
  at a low threshold: up to 100 boxes per image compared).
- ``fast``: as ``exact`` but the OpenVINO graph (with direct convolutions) runs in bf16 where the
  CPU supports it (AVX-512 BF16 or AMX); answers deviate (the benchmark measures how much). On a
  CPU without bf16 it logs that and runs ``exact``.

The converted graph is cached on disk (``ACCEL_CACHE_DIR``), keyed by the sha256 of the weights,
the versions of torch, torchvision and OpenVINO and where Winograd is used, so it is converted
once, not at every start.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops.poolers import _multiscale_roi_align, _setup_scales

from common.winograd import WinogradConv3x3, is_winograd_compatible

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # bump when what the converted graph computes, or its inputs/outputs, change
CACHE_KEEP = 4  # conversions kept in the cache directory (each about the size of the weights)
FEATURE_NAMES = ("0", "1", "2", "3", "pool")
# Conversion example: a typical resized 640x480 photo (800x1067 padded to 32); the graph keeps
# height and width dynamic.
EXAMPLE_SHAPE = (1, 3, 800, 1088)
# Where the exact path computes 3x3 convolutions with Winograd F(4x4, 3x3): the FPN's output
# convolution and the RPN head's on levels P2 and P3, and the bottlenecks of ResNet stage layer3
# (batch norm folded in), where the saved multiplications outweigh the transforms. Measured, graph
# at 800x1088: 1.52 s direct; P2+P3 1.20 s; + layer3 1.18 s; P4, layer1, layer2 or layer4 gained
# nothing or lost. P2 and P3 hold whole 4x4 tiles because torchvision pads images to a multiple
# of 32 (checked).
WINOGRAD = ("P2", "P3", "layer3")
FPN_LEVELS = ("P2", "P3", "P4", "P5")  # the FPN's layer_blocks, in order (P6 is a max-pool)
# Row strips per FPN level, each transformed and multiplied on its own: with a dynamic input shape
# OpenVINO keeps each large intermediate tensor allocated between passes, and two strips on P2
# halve the largest ones (model process after a pass: 2.38 GB in one piece, 1.86 GB in two, 1.67 GB
# with direct convolutions; the same speed; four strips, or P3 in two, saved nothing more).
WINOGRAD_STRIPS = {"P2": 2}
# In bf16 the transforms' large coefficients cost accuracy and the graph was no faster (measured 1.08
# vs 1.09 s at 640x480): the fast path keeps direct convolutions.
FAST_WINOGRAD = ()
SIZE_DIVISIBLE = 32
ROI_ALIGN_CHANNEL_BLOCK = 32  # channels per RoIAlign call (see AcceleratedMaskRCNN._box_roi_align)


class AccelUnavailable(RuntimeError):
    """The accelerated path cannot be built here (e.g. OpenVINO missing)."""


def state_dict_sha256(state_dict: dict) -> str:
    """A digest of the tensors themselves (names, dtypes, shapes, bytes), whatever the file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "instance-detector")


def bf16_supported(core) -> bool:
    """True where OpenVINO's CPU plugin can run bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an old plugin without the property: assume not
        return False


def _single_conv(block: torch.nn.Module) -> torch.nn.Conv2d:
    """The one convolution of a torchvision conv block (a Conv2d, or Conv2dNormActivation without
    a norm, possibly inside a Sequential, possibly followed by a ReLU)."""
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    others = [m for m in block.modules() if not isinstance(m, (torch.nn.Conv2d, torch.nn.Sequential,
                                                               torch.nn.ReLU))]
    if len(convs) != 1 or others:
        raise AccelUnavailable(f"unexpected block layout in torchvision's model: {block}")
    return convs[0]


class _RPNHeadPerLevel(torch.nn.Module):
    """torchvision's ``RPNHead`` with its 3x3 convolution run by Winograd on some levels."""

    def __init__(self, head, winograd_levels, strips):
        super().__init__()
        self.head = head
        conv = _single_conv(head.conv)
        self.has_relu = any(isinstance(m, torch.nn.ReLU) for m in head.conv.modules())
        self.winograd_levels = frozenset(winograd_levels)
        self.winograd = torch.nn.ModuleList(
            WinogradConv3x3.from_conv(conv, whole_tiles=True, strips=strips[level])
            if level in self.winograd_levels else torch.nn.Identity() for level in range(len(strips)))

    def forward(self, features):
        logits, deltas = [], []
        for level, feature in enumerate(features):
            if level in self.winograd_levels:
                hidden = self.winograd[level](feature)
                hidden = torch.relu(hidden) if self.has_relu else hidden
            else:
                hidden = self.head.conv(feature)
            logits.append(self.head.cls_logits(hidden))
            deltas.append(self.head.bbox_pred(hidden))
        return logits, deltas


class _BackboneRPNHead(torch.nn.Module):
    """backbone + FPN + RPN head as one traceable module: image batch -> 5 features, 5 + 5 maps.

    ``winograd``: where 3x3 convolutions are computed by Winograd F(4x4, 3x3) instead of directly:
    FPN levels (``"P2"``: the FPN's output convolution and the RPN head's on that level) and ResNet
    stages (``"layer3"``: each bottleneck's stride-1 3x3 convolution with its batch norm). Works on
    copies: the model given is not changed."""

    def __init__(self, model, winograd=()):
        super().__init__()
        unknown = set(winograd) - set(FPN_LEVELS) - {f"layer{i}" for i in range(1, 5)}
        if unknown:
            raise ValueError(f"unknown Winograd places: {sorted(unknown)}")
        self.backbone = copy.deepcopy(model.backbone) if winograd else model.backbone
        self.head = model.rpn.head
        levels = [FPN_LEVELS.index(place) for place in winograd if place in FPN_LEVELS]
        strips = [WINOGRAD_STRIPS.get(FPN_LEVELS[level], 1) for level in range(len(FPN_LEVELS))]
        for level in levels:
            conv = _single_conv(self.backbone.fpn.layer_blocks[level])
            self.backbone.fpn.layer_blocks[level] = WinogradConv3x3.from_conv(
                conv, whole_tiles=True, strips=strips[level])
        if levels:
            self.head = _RPNHeadPerLevel(copy.deepcopy(model.rpn.head), levels, strips)
        for stage in (place for place in winograd if place.startswith("layer")):
            for block in getattr(self.backbone.body, stage):
                if is_winograd_compatible(block.conv2):
                    block.conv2 = WinogradConv3x3.from_conv(block.conv2, block.bn2)
                    block.bn2 = torch.nn.Identity()

    def forward(self, images):
        features = list(self.backbone(images).values())
        objectness, deltas = self.head(features)
        return (*features, *objectness, *deltas)


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise AccelUnavailable(f"OpenVINO is not installed ({exc}); pip install -r requirements.txt "
                               "or set DETECT_MODE=eager") from None
    return openvino


def graph_cache_key(weights_sha256: str, winograd=()) -> str:
    """Names a converted graph: what it computes and with which versions of the tools."""
    import torchvision

    return hashlib.sha256("|".join((
        CACHE_FORMAT, weights_sha256, torch.__version__, torchvision.__version__, _ov().__version__,
        "winograd=" + ",".join(winograd),
        f"strips={sorted((place, n) for place, n in WINOGRAD_STRIPS.items() if place in winograd)}",
    )).encode()).hexdigest()[:24]


def converted_graph_path(model, weights_sha256: str, cache_dir: str, winograd=()) -> Path:
    """The OpenVINO IR (.xml + .bin) of backbone+FPN+RPN head, converted once and cached."""
    key = graph_cache_key(weights_sha256, winograd)
    directory = Path(cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"instance-detector-cache-{os.getuid()}"
        log.warning("ACCEL_CACHE_DIR %s unusable (%s); caching the conversion in %s instead",
                    directory, exc, fallback)
        directory = fallback
        directory.mkdir(parents=True, exist_ok=True)
    xml = directory / f"maskrcnn-backbone-rpn-{key}.xml"
    if xml.exists() and xml.with_suffix(".bin").exists():
        os.utime(xml)  # most recently used: kept by _prune
        return xml
    # One converter at a time (the stack's processes start together); the others wait and reuse.
    with open(directory / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (xml.exists() and xml.with_suffix(".bin").exists()):
            _convert(model, xml, winograd)
            _prune(directory, keep=CACHE_KEEP, current=xml)
    return xml


def _prune(directory: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` most recently used conversions (each is the size of the weights)."""
    graphs = sorted(directory.glob("maskrcnn-backbone-rpn-*.xml"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for old in graphs[keep:]:
        if old != current:
            for path in (old, old.with_suffix(".bin")):
                path.unlink(missing_ok=True)


def _convert(model, xml: Path, winograd=()) -> None:
    ov = _ov()
    directory = xml.parent
    log.info("converting backbone+FPN+RPN head to OpenVINO (once per weights; cached in %s)", directory)
    wrapper = _BackboneRPNHead(model, winograd).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        converted = ov.convert_model(wrapper, example_input=torch.zeros(EXAMPLE_SHAPE),
                                     input=[ov.PartialShape([1, 3, -1, -1])])
    # Written under a temporary name and renamed, so that processes converting at the same time
    # never read a half-written file; weights stay fp32 (no compression to fp16).
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(converted, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)


class AcceleratedMaskRCNN:
    """Callable like the torchvision model in eval mode (``model([tensor]) -> [dict]``), no masks."""

    def __init__(self, model, weights_sha256: str, *, precision: str = "f32", cache_dir: str = "",
                 threads: int = 0, roi_align_threads: int = 2, winograd=()):
        ov = _ov()
        self.model = model
        self.precision = precision
        self.winograd = tuple(winograd)
        if set(winograd) & set(FPN_LEVELS) and model.transform.size_divisible % SIZE_DIVISIBLE:
            raise AccelUnavailable(f"Winograd on FPN levels needs images padded to a multiple of "
                                   f"{SIZE_DIVISIBLE}, the model pads to {model.transform.size_divisible}")
        core = ov.Core()
        threads = threads or torch.get_num_threads()
        xml = converted_graph_path(model, weights_sha256, cache_dir or default_cache_dir(),
                                   winograd)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # The torch copies of what the graph now does are no longer needed.
        model.backbone = None
        model.rpn.head = None
        self.roi_align_threads = max(1, roi_align_threads)
        self._pool = (ThreadPoolExecutor(self.roi_align_threads - 1, thread_name_prefix="roi-align")
                      if self.roi_align_threads > 1 else None)
        self._lock = threading.Lock()

    # -- pieces ------------------------------------------------------------------------

    def _graph(self, batch: torch.Tensor):
        self.request.infer({0: batch.numpy()}, share_inputs=True)
        # views of the request's buffers: valid until the next infer, which waits for our lock
        outputs = [torch.from_numpy(self.request.get_output_tensor(i).data) for i in range(15)]
        features = OrderedDict(zip(FEATURE_NAMES, outputs[:5]))
        return features, outputs[5:10], outputs[10:15]

    def _box_roi_align(self, features, proposals, image_shapes):
        """torchvision's ``MultiScaleRoIAlign`` for the box head, in channel blocks spread over
        threads. Every output value is computed exactly as torchvision does (each is one channel of
        one box): only the order of the work changes. Blocks of ``ROI_ALIGN_CHANNEL_BLOCK``
        channels keep the feature planes the 1000 boxes read from in cache (measured 1.6-2x faster
        than all channels at once); torchvision's CPU kernel is single-threaded and releases the
        GIL, so blocks pooled on two threads use both cores."""
        pool = self.model.roi_heads.box_roi_pool
        x = [features[name] for name in pool.featmap_names]
        if pool.scales is None or pool.map_levels is None:
            pool.scales, pool.map_levels = _setup_scales(x, image_shapes, pool.canonical_scale,
                                                         pool.canonical_level)

        def run(blocks):
            with torch.inference_mode():
                return [_multiscale_roi_align([level[:, start:stop] for level in x], proposals,
                                              pool.output_size, pool.sampling_ratio, pool.scales,
                                              pool.map_levels)
                        for start, stop in blocks]

        channels = x[0].shape[1]
        blocks = [(start, min(start + ROI_ALIGN_CHANNEL_BLOCK, channels))
                  for start in range(0, channels, ROI_ALIGN_CHANNEL_BLOCK)]
        count = min(self.roi_align_threads if self._pool else 1, len(blocks))
        groups = [blocks[i * len(blocks) // count:(i + 1) * len(blocks) // count] for i in range(count)]
        futures = [self._pool.submit(run, group) for group in groups[1:]]
        outputs = run(groups[0])
        for future in futures:
            outputs += future.result()
        return torch.cat(outputs, dim=1)

    # -- forward -----------------------------------------------------------------------

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        if len(images) != 1:
            raise ValueError("one image at a time")
        model = self.model
        with self._lock, torch.inference_mode():
            original_sizes = [tuple(image.shape[-2:]) for image in images]
            image_list, _ = model.transform(images)
            features, objectness, deltas = self._graph(image_list.tensors)

            # RegionProposalNetwork.forward, from its head's outputs on
            rpn = model.rpn
            anchors = rpn.anchor_generator(image_list, list(features.values()))
            num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
            proposals, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes,
                                                num_anchors_per_level)

            # RoIHeads.forward (inference, boxes only)
            heads = model.roi_heads
            box_features = self._box_roi_align(features, proposals, image_list.image_sizes)
            box_features = heads.box_head(box_features)
            class_logits, box_regression = heads.box_predictor(box_features)
            boxes, scores, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, image_list.image_sizes)
            detections = [{"boxes": b, "labels": l, "scores": s}
                          for b, s, l in zip(boxes, scores, labels)]
            return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def build(model, weights_sha256: str, mode: str, *, cache_dir: str = "", threads: int = 0,
          roi_align_threads: int = 2, winograd: bool = True):
    """(callable model, effective mode) for ``mode`` in exact/fast; fast falls back to exact.
    ``winograd=False``: the exact path computes every convolution directly (slower, and about
    0.2 GB less memory: OpenVINO keeps the Winograd layers' large intermediate tensors allocated)."""
    precision = "f32"
    effective = "exact"
    places = WINOGRAD if winograd else ()
    if mode == "fast":
        core = _ov().Core()
        if bf16_supported(core):
            precision, effective, places = "bf16", "fast", FAST_WINOGRAD
        else:
            log.warning("DETECT_MODE=fast: this CPU has no bf16 support (AVX-512 BF16 or AMX); "
                        "running the exact fp32 path instead")
    accelerated = AcceleratedMaskRCNN(model, weights_sha256, precision=precision, cache_dir=cache_dir,
                                      threads=threads, roi_align_threads=roi_align_threads,
                                      winograd=places)
    return accelerated, effective


def main() -> int:
    """``python -m common.accel``: convert and cache the graph for the configured weights now
    (e.g. at image build), so that the servers' first start does not pay for it."""
    from common.config import Settings
    from common.detector import Detector
    from common.logs import configure_logging

    configure_logging("accel")
    settings = Settings.from_env()
    if settings.detect_mode == "eager":
        settings = Settings.from_env({**os.environ, "DETECT_MODE": "exact"})
    detector = Detector.from_settings(settings)
    print(f"detect path {detector.mode}; cache {settings.accel_cache_dir or default_cache_dir()}")
    return 0 if detector.mode != "eager" else 1


if __name__ == "__main__":
    raise SystemExit(main())
