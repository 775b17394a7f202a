"""Admission control: a request is let in only if its forward pass can start within a bounded wait.

The stack runs one forward pass at a time, so every request past admission waits for all those
admitted before it. Letting in more than ``MAX_QUEUE_WAIT`` seconds' worth of passes only makes
everyone wait longer (and hold memory meanwhile): beyond that, a request is shed at once, before
its image is fetched, with a hint of when to retry.

The bound is stack-wide, across the gunicorn workers and the gRPC server: the stack has ``capacity``
admission slots, each a lock file in ``$RUN_DIR/admission``; a request holds one slot (an exclusive
``flock``) from admission to its answer. The kernel releases the locks of a process that dies, so
a killed worker never leaks a slot. The capacity follows the measured pass time, which the model
publishes in ``$RUN_DIR/pass-seconds`` after each pass: one pass running plus as many waiting as
fit in ``MAX_QUEUE_WAIT``.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common.config import Settings
from common.errors import Overloaded
from common.model.pacing import PASS_SECONDS_FILE

# Before the first pass has been timed: a pessimistic CPU pass, so that a cold stack admits few.
DEFAULT_PASS_SECONDS = 2.0
_REREAD_SECONDS = 1.0


class Admission:
    """This process's view of the stack's admission slots; thread-safe."""

    def __init__(self, settings: Settings):
        self.max_queue_wait = settings.max_queue_wait
        self.run_dir = settings.run_dir
        self.directory = os.path.join(settings.run_dir, "admission")
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[int, int] = {}  # slot -> this process's open file descriptor
        self._held: set[int] = set()  # slots this process holds (flock is per open file, not per thread)
        self._pass_seconds = DEFAULT_PASS_SECONDS
        self._pass_seconds_read_at = -math.inf

    def pass_seconds(self) -> float:
        """The model's published moving average pass time (re-read at most once a second)."""
        now = time.monotonic()
        if now - self._pass_seconds_read_at >= _REREAD_SECONDS:
            self._pass_seconds_read_at = now
            try:
                with open(os.path.join(self.run_dir, PASS_SECONDS_FILE), encoding="ascii") as handle:
                    value = float(handle.read())
                if value > 0 and math.isfinite(value):
                    self._pass_seconds = value
            except (OSError, ValueError):
                pass  # not measured yet: keep the last known (or default) value
        return self._pass_seconds

    def capacity(self) -> int:
        """Slots in the stack: the pass running plus those that can start within MAX_QUEUE_WAIT."""
        return 1 + max(1, int(self.max_queue_wait / self.pass_seconds()))

    def retry_after(self) -> int:
        """Seconds after which a shed client may find room: about one pass."""
        return max(1, math.ceil(self.pass_seconds()))

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold a slot while the block runs; ``Overloaded`` at once if none is free."""
        slot = self._take_slot()
        if slot is None:
            raise Overloaded(
                f"the service is at capacity ({self.capacity()} requests admitted); "
                f"retry in {self.retry_after()} s",
                retry_after=self.retry_after(),
            )
        try:
            yield
        finally:
            self._release(slot)

    def _take_slot(self) -> int | None:
        with self._lock:
            for slot in range(self.capacity()):
                if slot in self._held:
                    continue
                descriptor = self._files.get(slot)
                if descriptor is None:
                    path = os.path.join(self.directory, f"slot-{slot}")
                    descriptor = self._files[slot] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # held by another process
                self._held.add(slot)
                return slot
        return None

    def _release(self, slot: int) -> None:
        with self._lock:
            fcntl.flock(self._files[slot], fcntl.LOCK_UN)
            self._held.discard(slot)
