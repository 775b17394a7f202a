"""The model loaded in this process, on a background thread so that the process answers health
checks (and reports 'loading') meanwhile.

Every pass runs on one dedicated thread, whatever thread asked for it: the allocator then reuses
one arena for the pass's large intermediate tensors instead of growing one per calling thread
(with many callers queued, per-thread arenas held gigabytes after the load had passed). After
each pass that thread gives glibc's freed memory back to the system (``malloc_trim``), so that
what the passes of a crowd left behind does not stay with the process (docs/performance.md,
"Memory under a crowd").
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from PIL import Image

from common.config import Settings
from common.errors import ModelLoadError, NotReady
from common.model.detection import ClientAlive, Detection, DetectOptions
from common.model.pacing import publish_pass_seconds

if TYPE_CHECKING:
    from common.model.detector import Detector, Pass

log = logging.getLogger(__name__)


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library: freed memory then stays with it)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class LocalModel:
    """Until the model is loaded, ``detect`` waits for it (up to ``MODEL_WAIT_TIMEOUT``); if
    loading failed, ``check_usable`` and ``detect`` raise ``NotReady`` with the loader's message."""

    def __init__(self, settings: Settings, on_queue_change: Callable[[int], None] | None = None):
        self.settings = settings
        self._detector: Detector | None = None
        self._load_error: str | None = None
        self._done = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._passes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-pass")
        self._on_queue_change = on_queue_change or (lambda delta: None)
        self._pass_seconds: float | None = None  # moving average, published for admission control
        self._trim = find_malloc_trim()
        if self._trim is None:
            log.info("no malloc_trim in this C library: memory freed after passes stays with the allocator")

    @property
    def detector(self) -> Detector | None:
        """The loaded detector, or None while loading or after a failed load."""
        return self._detector

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until loading has finished either way; True if the model is ready."""
        self._done.wait(timeout)
        return self._detector is not None

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

    def categories(self) -> list[str] | None:
        """The names the loaded model can report; None while it is not loaded."""
        return None if self._detector is None else self._detector.reportable()

    def detect(
        self,
        image: Image.Image,
        client_alive: ClientAlive | None = None,
        options: DetectOptions | None = None,
    ) -> Detection:
        self.start()
        if not self.wait_loaded(self.settings.model_wait_timeout):
            raise NotReady(f"model not loaded: {self.status()[1]}")
        detector = self._detector
        assert detector is not None
        arrived = time.perf_counter()
        self._on_queue_change(1)
        queued = True

        def proceed() -> bool:
            nonlocal queued
            queued = False
            self._on_queue_change(-1)
            return client_alive is None or client_alive()

        try:
            done = self._passes.submit(self._run, detector, image, proceed, arrived, options).result()
        finally:
            if queued:  # the pass never started (an error before it)
                self._on_queue_change(-1)
        # masks are pasted and encoded on the caller's thread, while the next pass runs
        return detector.describe(done, options)

    def _run(
        self,
        detector: Detector,
        image: Image.Image,
        proceed: ClientAlive,
        arrived: float,
        options: DetectOptions | None,
    ) -> Pass:
        waited = time.perf_counter() - arrived
        done = detector.run(image, proceed, options)
        if self._trim is not None:
            # a pass frees some 100 MB of intermediate tensors; without this, glibc kept what the
            # largest passes of a crowd left (+150 MB on the model process 60 s after the load);
            # a trim takes 5-8 ms after a pass of about 1 s
            self._trim(0)
        self._publish_pass_seconds(done.pass_seconds)
        return dataclasses.replace(done, queue_seconds=waited + done.queue_seconds)

    def _publish_pass_seconds(self, seconds: float) -> None:
        try:
            os.makedirs(self.settings.run_dir, exist_ok=True)
            self._pass_seconds = publish_pass_seconds(self.settings.run_dir, seconds, self._pass_seconds)
        except OSError as exc:  # admission control then keeps its last known pass time
            log.warning("cannot publish the pass time in %s: %s", self.settings.run_dir, exc)
