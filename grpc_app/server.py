"""The standalone gRPC server: ``inference.InstanceDetector`` (``grpc_app.servicer``) and the Open
Inference Protocol's ``inference.GRPCInferenceService`` (``grpc_app.v2``), plus reflection and
health, and the readiness that health reports."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import metrics
from common.config import STOP_GRACE_SECONDS, Settings
from common.logs import configure_logging
from common.model import open_model
from common.pipeline import DetectionService
from common.process import exit_now, wait_for_stop_signal
from grpc_app import v2
from grpc_app.servicer import SERVICE_NAME, InstanceDetectorServicer, TolerantParsing, message_limits
from grpc_app.stubs import inference_pb2_grpc, open_inference_grpc_pb2_grpc

log = logging.getLogger(__name__)

READINESS_POLL_SECONDS = 1.0
SERVED = (SERVICE_NAME, v2.SERVICE_NAME)  # listed by reflection, each with its health status


def build_server(settings: Settings, service: DetectionService):
    """A started server with the detector, health and reflection services; returns (server, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        interceptors=[TolerantParsing(message_limits(settings) | v2.message_limits(settings))],
        options=[
            # Predict keeps MAX_REQUEST_BYTES (TolerantParsing checks); Detect may carry an upload
            ("grpc.max_receive_message_length", max(settings.max_request_bytes, settings.max_upload_bytes)),
            # without this a second server could bind the same port and silently share its traffic
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = InstanceDetectorServicer(service, metrics.inference_counter("grpc"))
    inference_pb2_grpc.add_InstanceDetectorServicer_to_server(servicer, server)
    open_inference_grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        v2.InferenceServicer(service), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVED, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", *SERVED):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.bind_host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot listen on {address}")
    server.start()
    log.info("gRPC server listening on %s", address)
    return server, health_servicer


def _report_readiness(service: DetectionService, health_servicer) -> None:
    """Keep the health status in step with the model (which may live in another process that
    restarts); after ``enter_graceful_shutdown`` the servicer ignores further updates."""
    serving = None
    while True:
        now_serving = service.is_ready()
        if now_serving != serving:
            serving = now_serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", *SERVED):
                health_servicer.set(name, status)
        time.sleep(READINESS_POLL_SECONDS)


def serve(settings: Settings | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully: in-flight calls get STOP_GRACE_SECONDS."""
    settings = settings or Settings.from_env()
    configure_logging("grpc", settings.log_level, settings.log_format)
    metrics.init_multiprocess(settings)
    metrics.record_process_start("grpc")
    service = DetectionService(settings, open_model(settings)).start_loading()
    server, health_servicer = build_server(settings, service)
    threading.Thread(
        target=_report_readiness, args=(service, health_servicer), name="readiness", daemon=True
    ).start()
    wait_for_stop_signal()
    log.info("stopping: refusing new calls, finishing in-flight ones")
    health_servicer.enter_graceful_shutdown()
    server.stop(STOP_GRACE_SECONDS).wait()
    log.info("gRPC server stopped")
    exit_now()


def main() -> None:
    serve()
