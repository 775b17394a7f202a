"""What one forward pass answers, with where its time went."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Detection:
    objects: list[str]  # category names, best first
    queue_seconds: float  # waiting for the model (passes run one at a time)
    pass_seconds: float  # the forward pass itself
