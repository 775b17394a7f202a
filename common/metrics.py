"""Prometheus metrics in multiprocess mode, shared by every process of the stack.

All processes (gunicorn workers, the gRPC server, the model process) write their samples into one
directory (``$RUN_DIR/metrics``); the HTTP ``/metrics`` endpoint sums them, so one scrape of port
8080 shows the whole stack. Names and labels are listed in docs/operations.md.

prometheus_client picks multiprocess mode when it is first imported, so every function here
imports it only after ``init_multiprocess`` has set the directory.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

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
    _forget_dead_processes(path)
    return path


def _forget_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that are gone (a worker or server killed with SIGKILL gets
    no exit hook), so that in-flight and queue gauges never count requests of a dead process."""
    from prometheus_client import multiprocess

    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            multiprocess.mark_process_dead(int(match.group(1)), path=path)


def _require_multiprocess() -> None:
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before init_multiprocess() ran")


def inference_counter(protocol: str):
    """The ``app_<protocol>_inference_count`` Counter (exposed with a ``_total`` suffix)."""
    from prometheus_client import Counter

    _require_multiprocess()
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


# Seconds-long CPU inference: fine steps between 0.5 s and 20 s, where passes and queues live.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    1.5,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
)
OBJECT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class RequestMetrics:
    """What the servers record about requests (``common.observe`` feeds them)."""

    duration: Any  # Histogram: protocol, outcome
    stage_duration: Any  # Histogram: stage
    requests: Any  # Counter: protocol, endpoint
    errors: Any  # Counter: protocol, code
    shed: Any  # Counter: protocol
    in_flight: Any  # Gauge (live processes summed): protocol
    objects: Any  # Histogram


@functools.cache
def request_metrics() -> RequestMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    _require_multiprocess()
    return RequestMetrics(
        duration=Histogram(
            "app_request_duration_seconds",
            "Time from request to answer, by protocol and outcome",
            ["protocol", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        ),
        stage_duration=Histogram(
            "app_stage_duration_seconds",
            "Time spent per stage: fetch, decode, queue_wait, inference",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        ),
        requests=Counter(
            "app_requests",
            "Requests by protocol and endpoint (predict, detect, detect_batch: one per image)",
            ["protocol", "endpoint"],
            registry=None,
        ),
        errors=Counter(
            "app_request_errors",
            "Requests answered with an error, by protocol and error code",
            ["protocol", "code"],
            registry=None,
        ),
        shed=Counter(
            "app_requests_shed",
            "Requests refused by admission control (overloaded)",
            ["protocol"],
            registry=None,
        ),
        in_flight=Gauge(
            "app_requests_in_flight",
            "Admitted requests being worked on",
            ["protocol"],
            multiprocess_mode="livesum",
            registry=None,
        ),
        objects=Histogram(
            "app_objects_per_image",
            "Instances reported per answered image",
            buckets=OBJECT_BUCKETS,
            registry=None,
        ),
    )


@dataclass(frozen=True)
class ModelMetrics:
    """What the model process records about the model."""

    queue_length: Any  # Gauge: calls waiting for their forward pass
    passes: Any  # Counter: result ("run" or "skipped": the caller had gone away)
    ready: Any  # Gauge: 1 loaded, 0 loading or failed
    info: Any  # Gauge = 1: mode, weights_sha256, score_threshold, cpu_features


@functools.cache
def model_metrics() -> ModelMetrics:
    from prometheus_client import Counter, Gauge

    _require_multiprocess()
    return ModelMetrics(
        queue_length=Gauge(
            "app_model_queue_length",
            "Calls waiting for their forward pass in the model process",
            multiprocess_mode="livesum",
            registry=None,
        ),
        passes=Counter(
            "app_model_passes",
            "Forward passes run, and skipped because the caller had gone away",
            ["result"],
            registry=None,
        ),
        ready=Gauge(
            "app_model_ready",
            "1 when the model is loaded and answering, 0 while loading or failed",
            multiprocess_mode="livemax",
            registry=None,
        ),
        info=Gauge(
            "app_model_info",
            "The model being served (value 1)",
            ["mode", "weights_sha256", "score_threshold", "cpu_features"],
            multiprocess_mode="livemax",
            registry=None,
        ),
    )


def record_process_start(process: str) -> None:
    """``app_process_start_time_seconds{process}``: a restart shows as a jump."""
    from prometheus_client import Gauge

    _require_multiprocess()
    gauge = Gauge(
        "app_process_start_time_seconds",
        "Start time of the stack's processes (unix seconds)",
        ["process"],
        multiprocess_mode="livemax",
        registry=None,
    )
    gauge.labels(process=process).set(time.time())
