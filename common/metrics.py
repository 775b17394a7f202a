"""Prometheus metrics in multiprocess mode, shared by the gunicorn workers and the gRPC server.

All processes write their samples into one directory (``$RUN_DIR/metrics``); the HTTP
``/metrics`` endpoint sums them, so one scrape of port 8080 shows both protocols' counters.

prometheus_client picks multiprocess mode when it is first imported, so every function here
imports it only after ``init_multiprocess`` has set the directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from common.config import Settings

_MARKER = ".owner"
_LOCK = ".lock"


def _process_identity(pid: int) -> str:
    """pid plus its start time, so that a recycled pid is not mistaken for the same process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            start_ticks = handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start_ticks = "?"
    return f"{pid}:{start_ticks}"


def init_multiprocess(settings: Settings) -> str:
    """Point prometheus_client at the metrics directory and empty it once per stack start.

    Under supervisord (which sets SUPERVISOR_ENABLED) the directory belongs to one supervisord
    run: the first of its programs to start empties it, and programs restarted later by the
    same supervisord keep it, so counters never go down while the stack runs. A process run
    on its own empties the directory at its own start.
    """
    path = settings.metrics_dir
    os.makedirs(path, exist_ok=True)
    owner_pid = os.getppid() if os.environ.get("SUPERVISOR_ENABLED") else os.getpid()
    owner = _process_identity(owner_pid)
    with open(os.path.join(path, _LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(path, _MARKER)
        try:
            with open(marker, encoding="ascii") as handle:
                current = handle.read().strip()
        except OSError:
            current = ""
        if current != owner:
            for name in os.listdir(path):
                if name == _LOCK:
                    continue
                full = os.path.join(path, name)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full)
                else:
                    os.remove(full)
            with open(marker, "w", encoding="ascii") as handle:
                handle.write(owner + "\n")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def inference_counter(protocol: str):
    """The ``app_<protocol>_inference_count`` Counter (exposed with a ``_total`` suffix)."""
    from prometheus_client import Counter, values

    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before init_multiprocess() ran")
    return Counter(
        f"app_{protocol}_inference_count",
        f"{protocol.upper()} inference requests received (every call, answered or failed)",
        registry=None,  # exposed through the multiprocess collector, not a process registry
    )


def render_latest(settings: Settings) -> tuple[bytes, str]:
    """All processes' metrics in Prometheus text format, with its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=settings.metrics_dir)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int, settings: Settings) -> None:
    """Gunicorn ``child_exit`` bookkeeping: drop a dead worker's live-gauge files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path=settings.metrics_dir)
