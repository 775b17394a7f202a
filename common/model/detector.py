"""One loaded Mask R-CNN, on the detect path ``DETECT_MODE`` chose: category names, or full
detections (label, score, box and, on request, mask)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from common.config import Settings
from common.errors import Cancelled
from common.model import accel
from common.model.detection import (
    PIXEL_DECIMALS,
    SCORE_DECIMALS,
    ClientAlive,
    Detection,
    DetectOptions,
    Instance,
    check_classes,
)
from common.model.masks import encode, paste
from common.model.weights import (
    build_model,
    categories_for,
    head_classes,
    load_state_dict,
    reportable,
    state_dict_sha256,
)

log = logging.getLogger(__name__)

# torchvision's detection models in eval mode, and the accelerated path, take a list of image
# tensors and give one dict of tensors per image.
DetectFunction = Callable[..., list[dict[str, torch.Tensor]]]
# Which of a pass's candidates (scores, labels) a request keeps.
Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pass:
    """One forward pass's kept instances (``boxes``, ``scores``, ``labels`` and, when masks were
    asked for, ``masks`` or ``mask_probs``), with its timings and the image's size."""

    output: dict[str, torch.Tensor]
    queue_seconds: float
    pass_seconds: float
    width: int
    height: int


class Detector:
    """One loaded model; ``run`` is thread-safe and runs one forward pass at a time (two at
    once would only fight over the same cores, and the accelerated path reuses its buffers).

    The model keeps candidates down to ``MIN_SCORE_THRESHOLD``; each request then keeps those above
    its own threshold (``SCORE_THRESHOLD`` unless it asks otherwise). NMS only lets a box suppress
    lower-scoring ones, so the instances above ``SCORE_THRESHOLD`` are the same as a model built
    with that threshold would give."""

    def __init__(
        self,
        model: DetectFunction,
        categories: list[str],
        mode: str = "eager",
        weights_sha256: str = "",
        score_threshold: float = 0.75,
    ):
        self.model = model
        self.categories = categories  # the name of each class index (0: background)
        self.mode = mode  # the detect path actually used (see common/model/accel)
        self.weights_sha256 = weights_sha256  # of the tensors (common.model.weights.state_dict_sha256)
        self.score_threshold = score_threshold
        self._lock = threading.Lock()
        # torchvision's model always computes masks; the accelerated path only when given a selector
        self._masks_on_request = not isinstance(model, torch.nn.Module)

    @classmethod
    def from_settings(cls, settings: Settings) -> Detector:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state_dict = load_state_dict(settings)
        num_classes = head_classes(state_dict)
        categories = categories_for(settings, num_classes)
        digest = state_dict_sha256(state_dict)
        floor = min(settings.min_score_threshold, settings.score_threshold)

        def detector(model: DetectFunction, mode: str) -> Detector:
            return cls(model, categories, mode, digest, settings.score_threshold)

        model = build_model(state_dict, floor, num_classes)
        if settings.detect_mode == "eager":
            return detector(model, "eager")
        try:
            accelerated, mode = accel.build(
                model,
                digest,
                settings.detect_mode,
                cache_dir=settings.accel_cache_dir,
                threads=settings.torch_threads,
                roi_align_threads=settings.roi_align_threads,
                winograd=settings.winograd,
            )
        except Exception:
            log.exception(
                "DETECT_MODE=%s could not be set up; running torchvision eager instead", settings.detect_mode
            )
            return detector(build_model(state_dict, floor, num_classes), "eager")
        log.info("detect path: %s", mode)
        return detector(accelerated, mode)

    # -- what a request may ask ----------------------------------------------------------

    def reportable(self) -> list[str]:
        return reportable(self.categories)

    def selector(self, options: DetectOptions | None) -> Selector:
        threshold = self.score_threshold if options is None else options.threshold
        wanted = None
        if options is not None and options.classes:
            check_classes(options.classes, self.reportable())
            names = set(options.classes)
            wanted = torch.tensor([index for index, name in enumerate(self.categories) if name in names])

        def select(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            keep = scores > threshold  # torchvision's own comparison with box_score_thresh
            if wanted is not None:
                keep &= torch.isin(labels, wanted)
            return keep

        return select

    # -- passes --------------------------------------------------------------------------

    def run(
        self, image: Image.Image, proceed: ClientAlive | None = None, options: DetectOptions | None = None
    ) -> Pass:
        """One pass, under the lock, keeping what ``options`` asks for (default: the instances above
        ``SCORE_THRESHOLD``); ``proceed`` is asked once the pass could start (``False``:
        ``Cancelled``, no pass)."""
        select = self.selector(options)
        masks_for = select if options is not None and options.wants_masks and self._masks_on_request else None
        tensor = pil_to_tensor(image).float().div_(255.0)
        arrived = time.perf_counter()
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            if proceed is not None and not proceed():
                raise Cancelled("the client went away before its forward pass")
            if masks_for is not None:
                output = self.model([tensor], masks_for=masks_for)[0]
            else:
                output = self.model([tensor])[0]
        finished = time.perf_counter()
        if masks_for is None:  # the accelerated path with a selector kept only those already
            keep = select(output["scores"], output["labels"])
            output = {name: value[keep] for name, value in output.items()}
        if options is None or not options.wants_masks:
            output.pop("masks", None)
        return Pass(output, started - arrived, finished - started, image.width, image.height)

    def describe(self, done: Pass, options: DetectOptions | None = None) -> Detection:
        """The pass as the service answers it: names, and the instances when ``options`` are given
        (masks pasted and encoded here, outside the lock, one instance at a time)."""
        output = done.output
        labels = output["labels"].tolist()
        objects = [self.categories[index] for index in labels]
        if options is None:
            return Detection(objects, done.queue_seconds, done.pass_seconds)
        instances = []
        scores = output["scores"].tolist()
        for index, (name, score, box) in enumerate(zip(objects, scores, output["boxes"], strict=True)):
            polygons = rle = None
            if options.wants_masks:
                if "masks" in output:  # torchvision pasted it already
                    mask = (output["masks"][index, 0] > 0.5).numpy()
                else:
                    mask = paste(output["mask_probs"][index], box, done.height, done.width)
                polygons, rle = encode(mask, options)
            corners = tuple(round(float(value), PIXEL_DECIMALS) for value in box.tolist())
            instances.append(Instance(name, round(float(score), SCORE_DECIMALS), corners, polygons, rle))  # type: ignore[arg-type]
        return Detection(objects, done.queue_seconds, done.pass_seconds, instances, done.width, done.height)

    def detect_raw(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The model's output for ``image``: ``boxes`` (x1, y1, x2, y2 in pixels), ``scores``,
        ``labels`` (indices into ``categories``) above ``SCORE_THRESHOLD``, best first."""
        return self.run(image).output

    def detect(self, image: Image.Image, options: DetectOptions | None = None) -> list[str]:
        """Category names of the instances scoring above the threshold, best first."""
        return self.describe(self.run(image, options=options), options).objects
