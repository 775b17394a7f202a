"""One model forward pass at a time across all of a stack's processes.

Both gunicorn workers and the gRPC server hold a model and share the same cores. Each forward
pass already uses every core (``TORCH_THREADS`` / OpenVINO threads), so two passes at once only
oversubscribe the CPU: both get slower, together no faster, and the latency of every request
grows. The gate is an exclusive ``flock`` on one file in ``RUN_DIR`` that every process of the
stack shares; fetching and decoding stay outside it, so they overlap with the running pass. The
kernel drops the lock of a process that dies.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading

log = logging.getLogger(__name__)


class CpuGate:
    """Context manager: holds the stack-wide lock file (if any) while the block runs."""

    def __init__(self, path: str | None):
        self.path = path
        self._fd: int | None = None
        self._local = threading.Lock()  # flock is per open file: serialise this process's threads
        if path:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.warning("no shared inference lock (%s: %s); passes are serialised per process only",
                            path, exc)

    def __enter__(self):
        self._local.acquire()
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._local.release()
                raise
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._local.release()
        return False
