"""The standalone gRPC server: ``inference.InstanceDetector`` plus reflection and health.

The servicer only translates: a message in, one call on the ``DetectionService``, a message out;
every error leaves through ``_abort`` with the status from ``GRPC_STATUS``."""

from __future__ import annotations

import contextlib
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
from common.model import Detection, DetectOptions, open_model
from common.model.detection import MASK_FORMATS
from common.observe import Observer, request_id
from common.options import parse_options
from common.pipeline import DetectionService, ImageSource
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


# What a request parser gives for bytes that are not a message (gRPC itself treats None as a
# failure), and for a message over its method's size limit.
UNPARSABLE = object()
OVERSIZED = object()


def _parser(message_class, limit: int):
    """A deserializer giving the message, UNPARSABLE (e.g. a url that is not UTF-8) or OVERSIZED."""

    def parse(data: bytes):
        if len(data) > limit:
            return OVERSIZED
        try:
            return message_class.FromString(data)
        except DecodeError:
            return UNPARSABLE

    return parse


def _check_parsed(request, message_name: str, limit: int) -> None:
    if request is UNPARSABLE:
        raise errors.InvalidRequest(f"the message is not a valid inference.{message_name}")
    if request is OVERSIZED:
        raise errors.TooLarge(f"the message is larger than {limit} bytes")


def _abort(context, exc: errors.DetectionError) -> None:
    if isinstance(exc, errors.Overloaded):  # gRPC's own retry policy reads the pushback
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(exc.retry_after * 1000)),))
    context.abort(grpc_status(exc), f"{exc.code}: {exc.message}")


def _source(image) -> ImageSource:
    which = image.WhichOneof("source")
    if which is None:  # refused when its turn comes: in a batch, the other images carry on
        return ImageSource(problem="the image has neither 'url' nor 'data'")
    return ImageSource(url=image.url) if which == "url" else ImageSource(data=image.data)


def _detection_message(detection: Detection):
    message = inference_pb2.DetectResponse(width=detection.width, height=detection.height)
    for instance in detection.instances or []:
        item = message.instances.add(label=instance.label, score=instance.score)
        item.box.x1, item.box.y1, item.box.x2, item.box.y2 = instance.box
        if instance.polygons is not None:
            for polygon in instance.polygons:
                item.mask.polygons.add(xy=polygon)
        if instance.rle is not None:
            item.mask.rle.size[:] = instance.rle["size"]
            item.mask.rle.counts = instance.rle["counts"]
    return message


class InstanceDetectorServicer(inference_pb2_grpc.InstanceDetectorServicer):
    def __init__(self, service: DetectionService, inference_count):
        self.service = service
        self.settings = service.settings
        self.inference_count = inference_count
        self.observer = Observer("grpc", lambda exc: grpc_status(exc).name)

    def _options(self, options) -> DetectOptions:
        if options.masks not in range(len(MASK_FORMATS)):  # proto3 keeps unknown enum numbers
            raise errors.InvalidRequest(f"unknown mask format {options.masks}")
        threshold = options.threshold if options.HasField("threshold") else None
        return parse_options(self.settings, threshold, list(options.classes), MASK_FORMATS[options.masks])

    def Predict(self, request, context):
        self.inference_count.inc()
        offered_id = dict(context.invocation_metadata()).get(REQUEST_ID_KEY)
        try:
            with self.observer.request(offered_id) as record:
                context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
                _check_parsed(request, "InstanceDetectorInput", self.settings.max_request_bytes)
                objects = self.service.predict(request.url, record, context.is_active)
        except errors.DetectionError as exc:
            _abort(context, exc)
        except Exception:
            log.exception("unhandled error in Predict")
            context.abort(grpc.StatusCode.INTERNAL, "internal: internal error; see the service log")
        return inference_pb2.InstanceDetectorOutput(objects=objects)

    def Detect(self, request, context):
        offered_id = dict(context.invocation_metadata()).get(REQUEST_ID_KEY)
        try:
            with self.observer.request(offered_id, "detect") as record:
                context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
                _check_parsed(request, "DetectRequest", self.settings.max_upload_bytes)
                options = self._options(request.options)
                detection = self.service.detect(_source(request.image), options, record, context.is_active)
        except errors.DetectionError as exc:
            _abort(context, exc)
        except Exception:
            log.exception("unhandled error in Detect")
            context.abort(grpc.StatusCode.INTERNAL, "internal: internal error; see the service log")
        return _detection_message(detection)

    def DetectBatch(self, request, context):
        batch_id = request_id(dict(context.invocation_metadata()).get(REQUEST_ID_KEY))
        context.send_initial_metadata(((REQUEST_ID_KEY, batch_id),))
        try:
            _check_parsed(request, "DetectBatchRequest", self.settings.max_upload_bytes)
            run = self.service.start_batch(
                [_source(image) for image in request.images],
                self._options(request.options),
                lambda index: self.observer.request(f"{batch_id}.{index}", "detect_batch"),
                context.is_active,
            )
        except errors.DetectionError as exc:
            with contextlib.suppress(errors.DetectionError), self.observer.request(batch_id, "detect_batch"):
                raise exc  # refused whole: recorded as one request
            _abort(context, exc)
        except Exception:
            log.exception("unhandled error in DetectBatch")
            context.abort(grpc.StatusCode.INTERNAL, "internal: internal error; see the service log")
        with contextlib.closing(run):
            for index, result in run:
                if isinstance(result, errors.DetectionError):
                    error = inference_pb2.ErrorStatus(code=result.code, message=result.message)
                    yield inference_pb2.DetectBatchResult(index=index, error=error)
                else:
                    yield inference_pb2.DetectBatchResult(index=index, detection=_detection_message(result))


def build_server(settings: Settings, service: DetectionService):
    """A started server with the detector, health and reflection services; returns (server, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_threads, thread_name_prefix="grpc"),
        options=[
            # Predict keeps MAX_REQUEST_BYTES (its parser checks); Detect may carry an upload
            ("grpc.max_receive_message_length", max(settings.max_request_bytes, settings.max_upload_bytes)),
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
                        request_deserializer=_parser(
                            inference_pb2.InstanceDetectorInput, settings.max_request_bytes
                        ),
                        response_serializer=inference_pb2.InstanceDetectorOutput.SerializeToString,
                    ),
                    "Detect": grpc.unary_unary_rpc_method_handler(
                        servicer.Detect,
                        request_deserializer=_parser(inference_pb2.DetectRequest, settings.max_upload_bytes),
                        response_serializer=inference_pb2.DetectResponse.SerializeToString,
                    ),
                    "DetectBatch": grpc.unary_stream_rpc_method_handler(
                        servicer.DetectBatch,
                        request_deserializer=_parser(
                            inference_pb2.DetectBatchRequest, settings.max_upload_bytes
                        ),
                        response_serializer=inference_pb2.DetectBatchResult.SerializeToString,
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
