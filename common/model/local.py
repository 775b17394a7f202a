"""The model loaded in this process, on a background thread so that the process answers health
checks (and reports 'loading') meanwhile."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from PIL import Image

from common.config import Settings
from common.errors import ModelLoadError, NotReady

if TYPE_CHECKING:
    from common.model.detector import Detector

log = logging.getLogger(__name__)


class LocalModel:
    """Until the model is loaded, ``detect`` waits for it (up to ``MODEL_WAIT_TIMEOUT``); if
    loading failed, ``check_usable`` and ``detect`` raise ``NotReady`` with the loader's message."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._detector: Detector | None = None
        self._load_error: str | None = None
        self._done = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Begin loading the model on a daemon thread (idempotent)."""
        with self._start_lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        # imported here: torch is imported only by the process that loads the model
        from common.model.detector import Detector

        source = self.settings.weights_file or "torchvision COCO_V1 (torch hub cache)"
        log.info("loading maskrcnn_resnet50_fpn weights from %s", source)
        try:
            self._detector = Detector.from_settings(self.settings)
            log.info("model ready (score threshold %.2f)", self.settings.score_threshold)
        except ModelLoadError as exc:
            self._load_error = str(exc)
            log.error("MODEL NOT LOADED, service is not ready: %s", exc)
        except Exception as exc:
            self._load_error = f"unexpected error while loading the model: {exc!r}"
            log.exception("MODEL NOT LOADED, service is not ready")
        finally:
            self._done.set()

    def status(self) -> tuple[str, str]:
        if self._detector is not None:
            return "ready", "model loaded"
        if self._load_error is not None:
            return "failed", self._load_error
        return "loading", "the model is still loading"

    def check_usable(self) -> None:
        if self._load_error is not None:
            raise NotReady(f"model not loaded: {self._load_error}")

    def detect(self, image: Image.Image) -> list[str]:
        self.start()
        self._done.wait(self.settings.model_wait_timeout)
        if self._detector is None:
            raise NotReady(f"model not loaded: {self.status()[1]}")
        return self._detector.detect(image)
