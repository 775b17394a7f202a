"""A stand-in for the served model that implements ``common.model.Model`` without torch: the
in-process tests of the HTTP app and the gRPC servicer run over it.

It answers fixed instances (with boxes, and masks in the formats asked for), honours the
threshold and classes of ``DetectOptions`` as the real model does, and can be told to be still
loading, to have failed, to raise, or to block each pass until released (a slow model).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from PIL import Image

from common.errors import NotReady
from common.model import ClientAlive, Detection, DetectOptions
from common.model.detection import Instance, check_classes

CATEGORIES = ["person", "bicycle", "car", "cat", "dog"]


@dataclass
class FakeInstance:
    label: str
    score: float
    box: tuple[float, float, float, float]


DEFAULT_INSTANCES = [
    FakeInstance("cat", 0.98, (1.0, 2.0, 30.0, 40.0)),
    FakeInstance("dog", 0.9, (5.0, 5.0, 20.0, 25.0)),
    FakeInstance("person", 0.5, (0.0, 0.0, 10.0, 10.0)),
]


@dataclass
class FakeModel:
    instances: list[FakeInstance] = field(default_factory=lambda: list(DEFAULT_INSTANCES))
    categories_: list[str] = field(default_factory=lambda: list(CATEGORIES))
    score_threshold: float = 0.75
    state: str = "ready"  # 'ready', 'loading' or 'failed'
    message: str = "model loaded"
    error: BaseException | None = None  # raised by every detect
    gate: threading.Event | None = None  # when set up, each pass waits for it
    passes: int = 0
    seen_sizes: list[tuple[int, int]] = field(default_factory=list)
    started: bool = False
    in_pass: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    # -- the Model protocol ---------------------------------------------------------------

    def start(self) -> None:
        self.started = True

    def status(self) -> tuple[str, str]:
        return self.state, self.message

    def check_usable(self) -> None:
        if self.state == "failed":
            raise NotReady(f"model not loaded: {self.message}")

    def categories(self) -> list[str] | None:
        return list(self.categories_) if self.state == "ready" else None

    def detect(
        self,
        image: Image.Image,
        client_alive: ClientAlive | None = None,
        options: DetectOptions | None = None,
    ) -> Detection:
        if self.state != "ready":
            raise NotReady(f"model not loaded: {self.message}")
        self.in_pass.release()
        if self.gate is not None:
            self.gate.wait(30)
        if self.error is not None:
            raise self.error
        self.passes += 1
        self.seen_sizes.append(image.size)
        threshold = self.score_threshold if options is None else options.threshold
        if options is not None and options.classes:
            check_classes(options.classes, self.categories_)
        kept = [
            item
            for item in self.instances
            if item.score > threshold
            and (options is None or not options.classes or item.label in options.classes)
        ]
        objects = [item.label for item in kept]
        if options is None:
            return Detection(objects, 0.001, 0.01)
        width, height = image.size
        instances = [
            Instance(
                item.label,
                item.score,
                item.box,
                [[item.box[0], item.box[1], item.box[2], item.box[1], item.box[2], item.box[3]]]
                if options.polygons
                else None,
                {"size": [height, width], "counts": "PPYo1"} if options.rle else None,
            )
            for item in kept
        ]
        return Detection(objects, 0.001, 0.01, instances, width, height)
