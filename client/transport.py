"""What the client's two transports (HTTP in client.transport_http, gRPC in client.transport_grpc)
share: the detection options they send, the failures and results they yield, and their protocol."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

MASK_FORMATS = ("polygons", "rle", "both")

# A service that has not accepted the connection by then is down, however long images may take.
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Failure:
    code: str
    message: str


@dataclass(frozen=True)
class Options:
    threshold: float | None
    classes: tuple[str, ...]
    masks: str  # "none" or one of MASK_FORMATS


class ServiceError(Exception):
    """The service cannot be reached, refused a whole batch, or broke off its answer."""


# Each batch result: the index of the image in the order sent, and its detection or failure.
BatchResult = tuple[int, dict[str, Any] | Failure]


class Transport(Protocol):
    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        """Results as they arrive; the images are numbered URLs first, then uploads (as the
        HTTP API numbers multipart fields)."""
        ...
