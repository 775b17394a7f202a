"""What one forward pass answers, with where its time went."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Asked before a queued pass starts: False when the client has gone away (the pass is skipped).
ClientAlive = Callable[[], bool]


@dataclass(frozen=True)
class Detection:
    objects: list[str]  # category names, best first
    queue_seconds: float  # waiting for the model (passes run one at a time)
    pass_seconds: float  # the forward pass itself
