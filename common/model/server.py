"""The stack's one model process: ``python -m common.model.server``.

Under supervisord the gunicorn workers and the gRPC server do not load the model themselves:
each would hold its own copy of the network and all of them would take turns on the same cores
anyway. This process loads it once and answers ``Detect`` calls on a Unix socket
(``$RUN_DIR/model.sock``, mode 0600; protocol in ``common.model.wire``). The servers keep doing
everything else themselves (URL checks, the SSRF-guarded fetch, decoding, limits) and send only
decoded pixels, so nothing that reaches this process comes from a client unchecked, and fetching
for one request overlaps with the forward pass of another.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from typing import Any

import grpc

from common import metrics
from common.config import STOP_GRACE_SECONDS, Settings
from common.errors import Cancelled, InvalidRequest, NotReady
from common.logs import configure_logging
from common.model.accel.backend import cpu_features
from common.model.local import LocalModel
from common.model.wire import (
    MAX_REPLY_BYTES,
    SERVICE,
    max_message_bytes,
    pack_detection,
    pack_status,
    unpack_image,
)
from common.process import exit_now, wait_for_stop_signal

log = logging.getLogger("common.model.server")  # also when run as __main__

# Threads beyond the servers' own concurrency, so that Status calls (readiness) never queue
# behind Detect calls waiting for the model.
STATUS_THREADS = 8


class ModelServicer:
    def __init__(self, model: LocalModel, passes: Any = None):
        self.model = model
        self.passes = passes  # app_model_passes{result}, where metrics are on

    def detect(self, payload: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            image, options = unpack_image(payload)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            detection = self.model.detect(image, context.is_active, options)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except Cancelled as exc:
            self._count("skipped")
            context.abort(grpc.StatusCode.CANCELLED, exc.message)
        except NotReady as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        except Exception:
            log.exception("detect failed")
            context.abort(grpc.StatusCode.INTERNAL, "detect failed; see the model process log")
        self._count("run")
        return pack_detection(detection)

    def _count(self, result: str) -> None:
        if self.passes is not None:
            self.passes.labels(result=result).inc()

    def status(self, _payload: bytes, _context: grpc.ServicerContext) -> bytes:
        return pack_status(*self.model.status(), self.model.categories())


def _server_threads(settings: Settings) -> int:
    """One thread per request the servers can have in flight at once (each waits for the model
    here), plus STATUS_THREADS."""
    return settings.http_workers * settings.http_threads + settings.grpc_threads + STATUS_THREADS


def build_server(settings: Settings, model: LocalModel, passes: Any = None) -> grpc.Server:
    """A started server on the model socket."""
    path = settings.model_socket
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a process that was killed; supervisord's pid file keeps RUN_DIR ours
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_server_threads(settings), thread_name_prefix="model"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes(settings)),
            ("grpc.max_send_message_length", MAX_REPLY_BYTES),
        ],
    )
    servicer = ModelServicer(model, passes)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Detect": grpc.unary_unary_rpc_method_handler(servicer.detect),
                    "Status": grpc.unary_unary_rpc_method_handler(servicer.status),
                },
            ),
        )
    )
    old_umask = os.umask(0o177)  # the socket file is created 0600: only this user may call
    try:
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise RuntimeError(f"cannot listen on unix:{path}")
    finally:
        os.umask(old_umask)
    server.start()
    log.info("model process listening on unix:%s", path)
    return server


def serve(settings: Settings | None = None) -> None:
    """Load the model and answer until SIGTERM/SIGINT (supervisord stops this process last)."""
    settings = settings or Settings.from_env()
    configure_logging("model", settings.log_level, settings.log_format)
    metrics.init_multiprocess(settings)
    metrics.record_process_start("model")
    model_metrics = metrics.model_metrics()
    model_metrics.ready.set(0)
    model = LocalModel(settings, on_queue_change=model_metrics.queue_length.inc)
    # binds under a umask: before any other thread writes files
    server = build_server(settings, model, model_metrics.passes)
    model.start()
    threading.Thread(
        target=_report_model, args=(model, settings, model_metrics), name="model-info", daemon=True
    ).start()
    wait_for_stop_signal()
    log.info("stopping: finishing in-flight calls")
    server.stop(STOP_GRACE_SECONDS).wait()
    exit_now()


def _report_model(model: LocalModel, settings: Settings, model_metrics: metrics.ModelMetrics) -> None:
    """Once the model is loaded: ``app_model_ready`` 1 and ``app_model_info`` with what is served."""
    if not model.wait_loaded() or model.detector is None:
        return  # failed: app_model_ready stays 0, and the log says why
    model_metrics.info.labels(
        mode=model.detector.mode,
        weights_sha256=model.detector.weights_sha256,
        score_threshold=f"{settings.score_threshold:g}",
        cpu_features=",".join(cpu_features()),
    ).set(1)
    model_metrics.ready.set(1)


if __name__ == "__main__":
    serve()
