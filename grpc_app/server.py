"""The standalone gRPC server: ``inference.InstanceDetector`` plus reflection and health."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import errors, metrics
from common.config import STOP_GRACE_SECONDS, Settings
from common.logs import configure_logging
from common.model import open_model
from common.observe import Observer
from common.pipeline import DetectionService
from common.process import exit_now, wait_for_stop_signal
from grpc_app.stubs import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InstanceDetector"].full_name
READINESS_POLL_SECONDS = 1.0

# The one place where data-plane errors become gRPC status codes.
GRPC_STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ForbiddenTarget: grpc.StatusCode.PERMISSION_DENIED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotAnImage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UpstreamFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}
REQUEST_ID_KEY = "x-request-id"


def grpc_status(exc: errors.DetectionError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if exc is None else GRPC_STATUS.get(type(exc), grpc.StatusCode.INTERNAL)


# What _parse_input gives for bytes that are not a message (gRPC itself treats None as a failure).
UNPARSABLE = object()


def _parse_input(data: bytes):
    """The request message, or UNPARSABLE when the bytes are not one (e.g. a url that is not UTF-8)."""
    try:
        return inference_pb2.InstanceDetectorInput.FromString(data)
    except DecodeError:
        return UNPARSABLE


class InstanceDetectorServicer(inference_pb2_grpc.InstanceDetectorServicer):
    def __init__(self, service: DetectionService, inference_count):
        self.service = service
        self.inference_count = inference_count
        self.observer = Observer("grpc", lambda exc: grpc_status(exc).name)

    def Predict(self, request, context):
        self.inference_count.inc()
        offered_id = dict(context.invocation_metadata()).get(REQUEST_ID_KEY)
        try:
            with self.observer.request(offered_id) as record:
                context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
                if request is UNPARSABLE:
                    raise errors.InvalidRequest("the message is not a valid inference.InstanceDetectorInput")
                objects = self.service.predict(request.url, record, context.is_active)
        except errors.DetectionError as exc:
            if isinstance(exc, errors.Overloaded):  # gRPC's own retry policy reads the pushback
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(exc.retry_after * 1000)),))
            context.abort(grpc_status(exc), f"{exc.code}: {exc.message}")
        except Exception:
            log.exception("unhandled error in Predict")
            context.abort(grpc.StatusCode.INTERNAL, "internal: internal error; see the service log")
        return inference_pb2.InstanceDetectorOutput(objects=objects)


def build_server(settings: Settings, service: DetectionService):
    """A started server with the detector, health and reflection services; returns (server, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            # without this a second server could bind the same port and silently share its traffic
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = InstanceDetectorServicer(service, metrics.inference_counter("grpc"))
    # Registered by hand rather than with the generated add_..._to_server, so that a message that
    # does not parse reaches Predict (INVALID_ARGUMENT) instead of failing inside gRPC (INTERNAL).
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Predict": grpc.unary_unary_rpc_method_handler(
                        servicer.Predict,
                        request_deserializer=_parse_input,
                        response_serializer=inference_pb2.InstanceDetectorOutput.SerializeToString,
                    ),
                },
            ),
        )
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
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
        now_serving = service.status()[0] == "ready"
        if now_serving != serving:
            serving = now_serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE_NAME):
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
