"""The data plane both servers call: ``DetectionService.predict(url) -> [category names]``."""

from __future__ import annotations

import logging
import threading

from common.config import Settings
from common.decode import decode_image
from common.detector import Detector, ModelLoadError
from common.errors import NotReady
from common.fetch import ImageFetcher, validate_url

log = logging.getLogger(__name__)


class DetectionService:
    """Owns one process's fetcher and model; loads the model in the background.

    Until the model is loaded, ``predict`` waits for it (up to ``MODEL_WAIT_TIMEOUT``);
    if loading failed, ``predict`` raises ``NotReady`` with the loader's message at once.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = ImageFetcher(settings)
        self._detector: Detector | None = None
        self._load_error: str | None = None
        self._done = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()

    def start_loading(self) -> "DetectionService":
        """Begin loading the model on a daemon thread (idempotent)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        source = self.settings.weights_file or "torchvision COCO_V1 (torch hub cache)"
        log.info("loading maskrcnn_resnet50_fpn weights from %s", source)
        try:
            self._detector = Detector.from_settings(self.settings)
            log.info("model ready (score threshold %.2f)", self.settings.score_threshold)
        except ModelLoadError as exc:
            self._load_error = str(exc)
            log.error("MODEL NOT LOADED, service is not ready: %s", exc)
        except Exception as exc:  # noqa: BLE001 - any failure must leave a clear not-ready state
            self._load_error = f"unexpected error while loading the model: {exc!r}"
            log.exception("MODEL NOT LOADED, service is not ready")
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return self._detector is not None

    def status(self) -> tuple[str, str]:
        """(state, message): state is 'ready', 'loading' or 'failed'."""
        if self._detector is not None:
            return "ready", "model loaded"
        if self._load_error is not None:
            return "failed", self._load_error
        return "loading", "the model is still loading"

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (either way); True if the model is ready."""
        self._done.wait(timeout)
        return self.ready

    def detector(self) -> Detector:
        """The loaded detector, waiting while it loads; NotReady if it cannot be had."""
        self.start_loading()
        if not self.wait_until_loaded(self.settings.model_wait_timeout):
            raise NotReady(f"model not loaded: {self.status()[1]}")
        return self._detector

    def predict(self, url) -> list[str]:
        url = validate_url(url, self.settings.max_url_length)
        detector = self.detector()
        image = decode_image(self.fetcher.fetch(url), self.settings.max_image_pixels)
        return detector.detect(image)
