"""One loaded Mask R-CNN answering COCO category names, on the detect path ``DETECT_MODE`` chose."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from common.config import Settings
from common.errors import Cancelled
from common.model import accel
from common.model.detection import ClientAlive, Detection
from common.model.weights import COCO_CATEGORIES, build_model, load_state_dict, state_dict_sha256

log = logging.getLogger(__name__)

# torchvision's detection models in eval mode, and the accelerated path, take a list of image
# tensors and give one dict of tensors per image.
DetectFunction = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


class Detector:
    """One loaded model; ``detect`` is thread-safe and runs one forward pass at a time (two at
    once would only fight over the same cores, and the accelerated path reuses its buffers)."""

    def __init__(
        self, model: DetectFunction, categories: list[str], mode: str = "eager", weights_sha256: str = ""
    ):
        self.model = model
        self.categories = categories
        self.mode = mode  # the detect path actually used (see common/model/accel)
        self.weights_sha256 = weights_sha256  # of the tensors (common.model.weights.state_dict_sha256)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Detector:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state_dict = load_state_dict(settings)
        digest = state_dict_sha256(state_dict)
        model = build_model(state_dict, settings.score_threshold)
        if settings.detect_mode == "eager":
            return cls(model, COCO_CATEGORIES, "eager", digest)
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
            return cls(build_model(state_dict, settings.score_threshold), COCO_CATEGORIES, "eager", digest)
        log.info("detect path: %s", mode)
        return cls(accelerated, COCO_CATEGORIES, mode, digest)

    def detect_raw(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The model's output for ``image``: ``boxes`` (x1, y1, x2, y2 in pixels), ``scores``,
        ``labels`` (indices into ``categories``), best first."""
        return self._forward(image)[0]

    def detect(self, image: Image.Image) -> list[str]:
        """COCO category names of the instances scoring above the threshold, best first."""
        return self.run(image).objects

    def run(self, image: Image.Image, proceed: ClientAlive | None = None) -> Detection:
        """``detect`` with its timings; ``proceed`` is asked once the pass could start (``False``:
        ``Cancelled``, no pass)."""
        output, queue_seconds, pass_seconds = self._forward(image, proceed)
        objects = [self.categories[index] for index in output["labels"].tolist()]
        return Detection(objects, queue_seconds, pass_seconds)

    def _forward(
        self, image: Image.Image, proceed: ClientAlive | None = None
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """One pass, under the lock: (output, seconds waiting for the lock, seconds of the pass)."""
        tensor = pil_to_tensor(image).float().div_(255.0)
        arrived = time.perf_counter()
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            if proceed is not None and not proceed():
                raise Cancelled("the client went away before its forward pass")
            output = self.model([tensor])[0]
        return output, started - arrived, time.perf_counter() - started
