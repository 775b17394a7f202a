"""The one exception hierarchy of the service.

``DetectionError`` and its subclasses are what a request can fail with; each server maps them to
its own protocol in exactly one place (``http_app.errors.HTTP_STATUS`` and
``grpc_app.servicer.GRPC_STATUS``). Their messages are safe to show to clients. ``ConfigError`` and
``ModelLoadError`` are start-up failures: the process (or its model) cannot run as configured.
"""


class ServiceError(Exception):
    """Base class of every error this service raises on purpose."""


class ConfigError(ServiceError, ValueError):
    """An environment variable holds a value that cannot be used."""


class ModelLoadError(ServiceError):
    """The configured weights could not be loaded; the message says which setting to fix."""


class DetectionError(ServiceError):
    """A request that could not be answered, with a client-safe message."""

    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(DetectionError):
    """The request itself is malformed: bad JSON, missing or non-string url, bad scheme."""

    code = "invalid_request"


class NotFound(DetectionError):
    """The request names something the service does not have (an Open Inference Protocol model
    or version other than the served one)."""

    code = "not_found"


class ForbiddenTarget(DetectionError):
    """The URL points at an address the service must not fetch from (SSRF guard)."""

    code = "forbidden_target"


class TooLarge(DetectionError):
    """The download or the decoded image exceeds a configured cap."""

    code = "too_large"


class NotAnImage(DetectionError):
    """The fetched bytes are not a decodable image of a supported format."""

    code = "not_an_image"


class UpstreamFailed(DetectionError):
    """The image host could not be reached or answered with an error status."""

    code = "upstream_failed"


class UpstreamTimeout(DetectionError):
    """The image host was too slow (connect, read or overall deadline)."""

    code = "upstream_timeout"


class NotReady(DetectionError):
    """The model is not loaded (still loading, or its weights are missing or bad)."""

    code = "not_ready"


class Overloaded(DetectionError):
    """Admission control refused the request: the stack already has as much work as it can start
    within MAX_QUEUE_WAIT. Retryable after ``retry_after`` seconds."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(DetectionError):
    """The client went away (connection closed, call cancelled or past its deadline) before the
    request's forward pass: the pass is skipped."""

    code = "cancelled"
