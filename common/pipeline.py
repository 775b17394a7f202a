"""The data plane both servers call: ``DetectionService.predict(url) -> [category names]``.

The model behind it is either loaded in this process (``LocalModel``) or, under supervisord,
the stack's one model process reached over a Unix socket (``common.model_server.RemoteModel``,
chosen by ``MODEL_SERVER``). Both offer the same small interface: ``start``, ``status``,
``check_usable`` and ``detect``.
"""

from __future__ import annotations

import logging
import threading

from common.config import Settings
from common.decode import decode_image
from common.errors import NotReady
from common.fetch import ImageFetcher, validate_url

log = logging.getLogger(__name__)


class LocalModel:
    """This process's own model, loaded on a background thread.

    Until it is loaded, ``detect`` waits for it (up to ``MODEL_WAIT_TIMEOUT``); if loading
    failed, ``detect`` raises ``NotReady`` with the loader's message at once.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._detector = None  # common.detector.Detector once loaded
        self._load_error: str | None = None
        self._done = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> "LocalModel":
        """Begin loading the model on a daemon thread (idempotent)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        # imported here: a process whose model lives elsewhere never loads torch
        from common.detector import Detector, ModelLoadError

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
        return self._detector is not None

    def check_usable(self):
        """The loaded detector, waiting while it loads; NotReady if it cannot be had."""
        self.start()
        if not self.wait_until_loaded(self.settings.model_wait_timeout):
            raise NotReady(f"model not loaded: {self.status()[1]}")
        return self._detector

    def detect(self, image) -> list[str]:
        return self.check_usable().detect(image)


class DetectionService:
    """URL -> validate -> SSRF-guarded fetch -> decode -> detect -> COCO names."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.fetcher = ImageFetcher(settings)
        if settings.model_server:
            from common.model_server import RemoteModel

            self.model = RemoteModel(settings)
        else:
            self.model = LocalModel(settings)

    def start_loading(self) -> "DetectionService":
        self.model.start()
        return self

    def status(self) -> tuple[str, str]:
        """(state, message): state is 'ready', 'loading' or 'failed'."""
        return self.model.status()

    def predict(self, url) -> list[str]:
        url = validate_url(url, self.settings.max_url_length)
        self.model.check_usable()  # a model that cannot answer fails the request before any fetch
        image = decode_image(self.fetcher.fetch(url), self.settings.max_image_pixels)
        return self.model.detect(image)
