"""The stack's one model process, and the client both servers use to reach it.

Under supervisord the gunicorn workers and the gRPC server do not load the model themselves:
each would hold its own copy of the network (about 1.4 GB with the exact path's compiled graph)
and all of them would take turns on the same two cores anyway. Instead ``python -m
common.model_server`` loads it once and answers ``Detect`` calls on a Unix socket
(``MODEL_SERVER``, a file in ``RUN_DIR``, mode 0600). The servers keep doing everything else
themselves (URL checks, the SSRF-guarded fetch, decoding, limits) and send only decoded pixels,
so nothing that reaches this process comes from a client unchecked, and fetching for one request
overlaps with the forward pass of another.

The internal protocol is gRPC with raw-bytes methods (no .proto: it is not a public API):
- ``Detect``: 12-byte header ``b"RGB8"``, width, height (little-endian uint32), then
  width*height*3 bytes of 8-bit RGB; answers JSON ``{"objects": [...]}``;
- ``Status``: empty request; answers JSON ``{"state": ..., "message": ...}``.
A model that is not loaded answers ``FAILED_PRECONDITION`` with the reason; ``UNAVAILABLE``
only ever means the process itself cannot be reached.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import threading
from concurrent import futures

import grpc
from PIL import Image

from common.config import Settings
from common.errors import DetectionError, NotReady, TooLarge
from common.logs import configure_logging
from common.pipeline import LocalModel

log = logging.getLogger("common.model_server")  # also when run as __main__

SERVICE = "instance_detector.internal.Model"
DETECT = f"/{SERVICE}/Detect"
STATUS = f"/{SERVICE}/Status"
HEADER = struct.Struct("<4sII")
MAGIC = b"RGB8"
# Threads beyond the servers' own concurrency, so that Status calls (readiness) never queue
# behind Detect calls waiting for the model.
STATUS_THREADS = 8
STOP_GRACE_SECONDS = 25.0
STATUS_TIMEOUT = 2.0
# Beyond MODEL_WAIT_TIMEOUT, how long a call may wait in line and run; the HTTP worker timeout
# (http_app/gunicorn.conf.py) is longer than this plus the fetch deadline.
DETECT_ALLOWANCE = 60.0


def pack_image(image: Image.Image) -> bytes:
    image = image.convert("RGB") if image.mode != "RGB" else image
    return HEADER.pack(MAGIC, *image.size) + image.tobytes()


def unpack_image(payload: bytes) -> Image.Image:
    if len(payload) < HEADER.size:
        raise ValueError("payload shorter than its header")
    magic, width, height = HEADER.unpack_from(payload)
    if magic != MAGIC or width == 0 or height == 0 or len(payload) != HEADER.size + width * height * 3:
        raise ValueError("malformed image payload")
    return Image.frombuffer("RGB", (width, height), memoryview(payload)[HEADER.size:], "raw", "RGB", 0, 1)


def _max_message_bytes(settings: Settings) -> int:
    """Room for the largest image MAX_IMAGE_PIXELS lets through (gRPC's limit is an int32)."""
    return min(HEADER.size + 3 * settings.max_image_pixels + 1024, 2**31 - 1)


# --------------------------------------------------------------------------- client side

class RemoteModel:
    """The model process seen from a server: the same interface as ``common.pipeline.LocalModel``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._channel = grpc.insecure_channel(
            f"unix:{settings.model_server}",
            options=[("grpc.max_send_message_length", _max_message_bytes(settings)),
                     ("grpc.max_receive_message_length", 1 << 20)])
        self._detect = self._channel.unary_unary(DETECT)
        self._status = self._channel.unary_unary(STATUS)

    def start(self) -> "RemoteModel":
        return self  # the model process loads on its own

    def status(self) -> tuple[str, str]:
        """(state, message) as the model process reports it; 'loading' while it cannot be reached."""
        try:
            reply = json.loads(self._status(b"", timeout=STATUS_TIMEOUT))
            return reply["state"], reply["message"]
        except grpc.RpcError:
            return "loading", "the model process is not answering yet (starting or restarting)"

    def check_usable(self) -> None:
        """NotReady at once if the model failed to load (still loading: ``detect`` waits)."""
        state, message = self.status()
        if state == "failed":
            raise NotReady(f"model not loaded: {message}")

    def detect(self, image: Image.Image) -> list[str]:
        try:  # a process being (re)started by supervisord gets MODEL_WAIT_TIMEOUT to come up
            grpc.channel_ready_future(self._channel).result(timeout=self.settings.model_wait_timeout)
        except grpc.FutureTimeoutError:
            raise NotReady("the model process is not reachable (starting, restarting or stopped); "
                           "try again shortly") from None
        try:
            reply = self._detect(pack_image(image), wait_for_ready=True,
                                 timeout=self.settings.model_wait_timeout + DETECT_ALLOWANCE)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise NotReady(exc.details()) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # only with MAX_IMAGE_PIXELS above ~700 M
                raise TooLarge("the decoded image is too large to pass to the model") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise NotReady("the model process did not answer in time (starting, restarting or "
                               "overloaded); try again shortly") from None
            log.error("model process call failed: %s %s", code, exc.details())
            raise DetectionError("internal error in the model process; see the service log") from None
        return json.loads(reply)["objects"]


# --------------------------------------------------------------------------- server side

class ModelServicer:
    def __init__(self, model: LocalModel):
        self.model = model

    def detect(self, payload: bytes, context) -> bytes:
        try:
            image = unpack_image(payload)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            objects = self.model.detect(image)
        except NotReady as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.message)
        except Exception:  # noqa: BLE001 - the caller gets INTERNAL, the log gets the traceback
            log.exception("detect failed")
            context.abort(grpc.StatusCode.INTERNAL, "detect failed; see the model process log")
        return json.dumps({"objects": objects}).encode()

    def status(self, _payload: bytes, _context) -> bytes:
        state, message = self.model.status()
        return json.dumps({"state": state, "message": message}).encode()


def _server_threads(settings: Settings) -> int:
    """One thread per request the servers can have in flight at once (each waits for the model
    here), plus STATUS_THREADS."""
    return settings.http_workers * settings.http_threads + settings.grpc_threads + STATUS_THREADS


def build_server(settings: Settings, model: LocalModel) -> grpc.Server:
    """A started server on the ``MODEL_SERVER`` socket."""
    path = settings.model_server
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # left by a process that was killed; supervisord's pid file keeps RUN_DIR ours
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_server_threads(settings), thread_name_prefix="model"),
        options=[("grpc.max_receive_message_length", _max_message_bytes(settings))])
    servicer = ModelServicer(model)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Detect": grpc.unary_unary_rpc_method_handler(servicer.detect),
        "Status": grpc.unary_unary_rpc_method_handler(servicer.status),
    }),))
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
    configure_logging("model")
    if not settings.model_server:
        raise SystemExit("MODEL_SERVER must name the Unix socket to listen on")
    model = LocalModel(settings)
    server = build_server(settings, model)  # binds under a umask: before any other thread writes files
    model.start()
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    stop_requested.wait()
    log.info("stopping: finishing in-flight calls")
    server.stop(STOP_GRACE_SECONDS).wait()
    logging.shutdown()
    os._exit(0)  # see grpc_app.server.serve: a cancelled call may still be inside the model


if __name__ == "__main__":
    serve()
