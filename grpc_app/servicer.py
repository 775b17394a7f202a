"""``inference.InstanceDetector``: each method turns its message into one call on the
``DetectionService`` (``grpc_app.convert`` translates) and leaves through ``answering``, the one
place where errors become gRPC statuses (``GRPC_STATUS``; the Open Inference Protocol's servicer,
``grpc_app.v2``, uses it too).

Messages reach the methods through ``TolerantParsing``: bytes that do not parse, or that are over
the method's limit, arrive as the ``DetectionError`` to answer (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED) instead of failing inside gRPC with INTERNAL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from common import errors
from common.config import Settings
from common.observe import Observer, request_id
from common.pipeline import DetectionService
from grpc_app import convert
from grpc_app.stubs import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InstanceDetector"].full_name
REQUEST_ID_KEY = "x-request-id"

GRPC_STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ForbiddenTarget: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotAnImage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UpstreamFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def grpc_status(exc: errors.DetectionError | None) -> grpc.StatusCode:
    return grpc.StatusCode.OK if exc is None else GRPC_STATUS.get(type(exc), grpc.StatusCode.INTERNAL)


def message_limits(settings: Settings) -> dict[str, int]:
    """The largest request message of each method, in bytes: Predict carries a URL, Detect and
    DetectBatch may carry uploads."""
    return {
        f"/{SERVICE_NAME}/Predict": settings.max_request_bytes,
        f"/{SERVICE_NAME}/Detect": settings.max_upload_bytes,
        f"/{SERVICE_NAME}/DetectBatch": settings.max_upload_bytes,
    }


class TolerantParsing(grpc.ServerInterceptor):
    """Gives the generated handlers of the limited methods a parser that cannot fail."""

    def __init__(self, limits: dict[str, int]):
        self.limits = limits
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        limit = self.limits.get(method)
        if limit is None:
            return continuation(handler_call_details)
        if method not in self._handlers:  # the generated handler is the same for every call
            handler = continuation(handler_call_details)
            parse = handler.request_deserializer
            name = method.rsplit("/", 1)[-1]
            self._handlers[method] = handler._replace(request_deserializer=_tolerant(parse, name, limit))
        return self._handlers[method]


def _tolerant(parse: Callable[[bytes], object], method: str, limit: int) -> Callable[[bytes], object]:
    def tolerant(data: bytes) -> object:
        if len(data) > limit:
            return errors.TooLarge(f"the message is larger than {limit} bytes")
        try:
            return parse(data)
        except DecodeError:  # e.g. a url that is not UTF-8
            return errors.InvalidRequest(f"the message is not a valid request of {method}")

    return tolerant


@contextlib.contextmanager
def answering(context, method: str) -> Iterator[None]:
    """Every error of a call leaves here, as the status of GRPC_STATUS (unexpected ones as
    INTERNAL, their traceback to the log only)."""
    try:
        yield
    except errors.DetectionError as exc:
        if isinstance(exc, errors.Overloaded):  # gRPC's own retry policy reads the pushback
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(exc.retry_after * 1000)),))
        context.abort(grpc_status(exc), f"{exc.code}: {exc.message}")
    except Exception:
        log.exception("unhandled error in %s", method)
        context.abort(grpc.StatusCode.INTERNAL, "internal: internal error; see the service log")


def parsed(request):
    """The message, or the error TolerantParsing made of its bytes raised."""
    if isinstance(request, errors.DetectionError):
        raise request
    return request


def offered_id(context) -> str | None:
    """The client's request id (metadata ``x-request-id``), if it sent one."""
    return dict(context.invocation_metadata()).get(REQUEST_ID_KEY)


class InstanceDetectorServicer(inference_pb2_grpc.InstanceDetectorServicer):
    def __init__(self, service: DetectionService, inference_count):
        self.service = service
        self.settings = service.settings
        self.inference_count = inference_count  # the course counter: every Predict call
        self.observer = Observer("grpc", lambda exc: grpc_status(exc).name)

    def Predict(self, request, context):
        self.inference_count.inc()
        with answering(context, "Predict"), self.observer.request(offered_id(context)) as record:
            context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
            objects = self.service.predict(parsed(request).url, record, context.is_active)
        return inference_pb2.InstanceDetectorOutput(objects=objects)

    def Detect(self, request, context):
        with (
            answering(context, "Detect"),
            self.observer.request(offered_id(context), "detect") as record,
        ):
            context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
            request = parsed(request)
            options = convert.options(request.options, self.settings)
            detection = self.service.detect(convert.source(request.image), options, record, context.is_active)
        return convert.detection_message(detection)

    def DetectBatch(self, request, context):
        batch_id = request_id(offered_id(context))
        context.send_initial_metadata(((REQUEST_ID_KEY, batch_id),))
        with answering(context, "DetectBatch"):
            try:
                request = parsed(request)
                run = self.service.start_batch(
                    [convert.source(image) for image in request.images],
                    convert.options(request.options, self.settings),
                    lambda index: self.observer.request(f"{batch_id}.{index}", "detect_batch"),
                    context.is_active,
                )
            except errors.DetectionError:
                with self.observer.request(batch_id, "detect_batch"):  # refused whole: one request
                    raise
        with contextlib.closing(run):
            for index, result in run:
                yield convert.batch_result(index, result)
