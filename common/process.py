"""What every long-running process of the stack does the same way: wait for its stop signal, and
leave without waiting for threads that may still be inside the model."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import NoReturn


def wait_for_stop_signal() -> None:
    """Block until SIGTERM (supervisord's stop, docker stop) or SIGINT arrives."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    stop_requested.wait()


def exit_now() -> NoReturn:
    """Flush the logs and exit 0 at once. A call cancelled at the end of a grace period may still
    be inside the model; a normal exit would join its executor thread and make supervisord wait,
    then SIGKILL."""
    logging.shutdown()
    os._exit(0)
