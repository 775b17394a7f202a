"""What one forward pass answers, with where its time went, and what a request asks of it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequest

# Asked before a queued pass starts: False when the client has gone away (the pass is skipped).
ClientAlive = Callable[[], bool]

# How masks are reported: not at all (the default: they cost time), as polygon outlines, as COCO's
# compressed RLE, or both.
MASK_FORMATS = ("none", "polygons", "rle", "both")

# Answers carry scores and box corners rounded to these decimals (float32 on the gRPC wire blurs
# them; its readers round again to print what HTTP prints).
SCORE_DECIMALS = 4
PIXEL_DECIMALS = 2


@dataclass(frozen=True)
class DetectOptions:
    """A full detection's request: instances scoring above ``threshold``, of ``classes`` only
    (empty: all), with masks in the ``masks`` format. The names-only path (``/predict``) has none."""

    threshold: float
    classes: tuple[str, ...] = ()
    masks: str = "none"

    @property
    def wants_masks(self) -> bool:
        return self.masks != "none"

    @property
    def polygons(self) -> bool:
        return self.masks in ("polygons", "both")

    @property
    def rle(self) -> bool:
        return self.masks in ("rle", "both")

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "classes": list(self.classes), "masks": self.masks}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectOptions:
        return cls(float(values["threshold"]), tuple(values["classes"]), str(values["masks"]))


def check_classes(classes: Iterable[str], known: Iterable[str]) -> None:
    """InvalidRequest naming the classes the served model does not have. The data plane asks it
    before fetching (when the names are known); the detector asks it again for requests admitted
    while the model was loading."""
    names = set(known)
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise InvalidRequest(
            f"unknown classes {', '.join(map(repr, unknown[:10]))}: GET /v1/model lists this model's classes"
        )


@dataclass(frozen=True)
class Instance:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    polygons: list[list[float]] | None = None  # outlines, each [x0, y0, x1, y1, ...]
    rle: dict[str, Any] | None = None  # COCO compressed RLE: {"size": [h, w], "counts": str}

    def as_dict(self) -> dict[str, Any]:
        """The instance as the HTTP API writes it (docs/api.md)."""
        answer: dict[str, Any] = {"label": self.label, "score": self.score, "box": list(self.box)}
        if self.polygons is not None or self.rle is not None:
            mask: dict[str, Any] = {}
            if self.polygons is not None:
                mask["polygons"] = self.polygons
            if self.rle is not None:
                mask["rle"] = self.rle
            answer["mask"] = mask
        return answer

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Instance:
        mask = values.get("mask") or {}
        return cls(
            values["label"], values["score"], tuple(values["box"]), mask.get("polygons"), mask.get("rle")
        )


@dataclass(frozen=True)
class Detection:
    objects: list[str]  # category names, best first
    queue_seconds: float  # waiting for the model (passes run one at a time)
    pass_seconds: float  # the forward pass itself
    # Full detections (only when the request gave DetectOptions), of an image width x height.
    instances: list[Instance] | None = None
    width: int = 0
    height: int = 0
