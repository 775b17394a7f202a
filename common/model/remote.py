"""The stack's model process seen from a server (``common.model.server`` is the other side)."""

from __future__ import annotations

import logging

import grpc
from PIL import Image

from common.config import DETECT_ALLOWANCE_SECONDS, Settings
from common.errors import Cancelled, DetectionError, InvalidRequest, NotReady, TooLarge
from common.model.detection import ClientAlive, Detection, DetectOptions
from common.model.wire import (
    DETECT,
    MAX_REPLY_BYTES,
    STATUS,
    max_message_bytes,
    pack_image,
    unpack_detection,
    unpack_status,
)

log = logging.getLogger(__name__)

# Readiness answers within a second whatever happens: a Status call waits this long for a
# (re)connecting model process, no longer.
STATUS_TIMEOUT = 0.8
# How often a server waiting for the model checks that its client is still there; a client gone
# cancels the call, and the model process skips the pass if it has not started.
CLIENT_CHECK_SECONDS = 0.25


class RemoteModel:
    """The ``Model`` interface over the model process's Unix socket.

    The model's state is asked with a ``Status`` call only while it is not known to be ready
    (readiness probes keep asking; a ``Detect`` that finds the model gone forgets it), so a
    request to a ready model costs one call, ``Detect``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._channel = grpc.insecure_channel(
            f"unix:{settings.model_socket}",
            options=[
                ("grpc.max_send_message_length", max_message_bytes(settings)),
                ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                # a local socket: reconnect within a second of the model process coming back
                # (gRPC's defaults back off up to two minutes, meant for remote servers)
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._detect = self._channel.unary_unary(DETECT)
        self._status = self._channel.unary_unary(STATUS)
        self._known_ready = False
        self._categories: list[str] | None = None  # the loaded model's, from its Status answer

    def start(self) -> None:
        """Nothing to do: the model process loads on its own."""

    def status(self) -> tuple[str, str]:
        """(state, message) as the model process reports it; 'loading' while it cannot be reached."""
        try:
            state, message, categories = unpack_status(
                self._status(b"", timeout=STATUS_TIMEOUT, wait_for_ready=True)
            )
        except grpc.RpcError:
            state, message = "loading", "the model process is not answering yet (starting or restarting)"
            categories = None
        self._known_ready = state == "ready"
        if categories is not None:
            self._categories = categories
        return state, message

    def categories(self) -> list[str] | None:
        """The names the model can report; None while it is not loaded. The model process may be
        restarted with other weights only by restarting the stack, so once known they are kept."""
        if self._categories is None:
            self.status()
        return self._categories

    def check_usable(self) -> None:
        """NotReady at once if the model failed to load (still loading: ``detect`` waits)."""
        if self._known_ready:
            return
        state, message = self.status()
        if state == "failed":
            raise NotReady(f"model not loaded: {message}")

    def detect(
        self,
        image: Image.Image,
        client_alive: ClientAlive | None = None,
        options: DetectOptions | None = None,
    ) -> Detection:
        try:
            return self._call_detect(image, client_alive, options)
        except NotReady:
            self._known_ready = False
            raise

    def _call_detect(
        self, image: Image.Image, client_alive: ClientAlive | None, options: DetectOptions | None
    ) -> Detection:
        try:  # a process being (re)started by supervisord gets MODEL_WAIT_TIMEOUT to come up
            grpc.channel_ready_future(self._channel).result(timeout=self.settings.model_wait_timeout)
        except grpc.FutureTimeoutError:
            raise NotReady(
                "the model process is not reachable (starting, restarting or stopped); try again shortly"
            ) from None
        call = self._detect.future(
            pack_image(image, options),
            wait_for_ready=True,
            timeout=self.settings.model_wait_timeout + DETECT_ALLOWANCE_SECONDS,
        )
        try:
            while True:
                try:
                    reply = call.result(timeout=CLIENT_CHECK_SECONDS)
                    break
                except grpc.FutureTimeoutError:
                    if client_alive is not None and not client_alive():
                        call.cancel()
                        raise Cancelled("the client went away while waiting for the model") from None
        except grpc.FutureCancelledError:
            raise Cancelled("the call to the model was cancelled") from None
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.CANCELLED:
                raise Cancelled("the client went away before its forward pass") from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise NotReady(exc.details()) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # e.g. a class this model does not have
                raise InvalidRequest(exc.details()) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # only with MAX_IMAGE_PIXELS above ~700 M
                raise TooLarge("the decoded image is too large to pass to the model") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise NotReady(
                    "the model process did not answer in time (starting, restarting or "
                    "overloaded); try again shortly"
                ) from None
            log.error("model process call failed: %s %s", code, exc.details())
            raise DetectionError("internal error in the model process; see the service log") from None
        return unpack_detection(reply)
