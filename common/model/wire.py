"""The internal protocol between the servers and the model process (not a public API).

gRPC over a Unix socket with raw-bytes methods, no .proto:
- ``Detect``: 16-byte header ``b"RGB8"``, width, height, options length (little-endian uint32),
  the options as JSON (``DetectOptions``; none for the names-only path), then width*height*3
  bytes of 8-bit RGB; answers JSON ``{"objects": [...], "queue_seconds": ..., "pass_seconds":
  ...}``, plus ``"instances"``, ``"width"`` and ``"height"`` when options were given;
- ``Status``: empty request; answers JSON ``{"state": ..., "message": ..., "categories": [...]}``
  (``categories`` only once the model is loaded).
A model that is not loaded answers ``FAILED_PRECONDITION`` with the reason, a request the model
refuses (an unknown class) ``INVALID_ARGUMENT``; ``UNAVAILABLE`` only ever means the process
itself cannot be reached.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from PIL import Image

from common.config import Settings
from common.model.detection import Detection, DetectOptions, Instance

SERVICE = "instance_detector.internal.Model"
DETECT = f"/{SERVICE}/Detect"
STATUS = f"/{SERVICE}/Status"
HEADER = struct.Struct("<4sIII")
MAGIC = b"RGB8"
MAX_OPTIONS_BYTES = 1 << 16
# Room for a reply with many instances' masks (polygons of a large image can take megabytes).
MAX_REPLY_BYTES = 256 << 20


def pack_image(image: Image.Image, options: DetectOptions | None = None) -> bytes:
    image = image.convert("RGB") if image.mode != "RGB" else image
    encoded = b"" if options is None else json.dumps(options.as_dict()).encode()
    return HEADER.pack(MAGIC, *image.size, len(encoded)) + encoded + image.tobytes()


def unpack_image(payload: bytes) -> tuple[Image.Image, DetectOptions | None]:
    if len(payload) < HEADER.size:
        raise ValueError("payload shorter than its header")
    magic, width, height, options_length = HEADER.unpack_from(payload)
    start = HEADER.size + options_length
    if (
        magic != MAGIC
        or width == 0
        or height == 0
        or options_length > MAX_OPTIONS_BYTES
        or len(payload) != start + width * height * 3
    ):
        raise ValueError("malformed image payload")
    options = None
    if options_length:
        try:
            options = DetectOptions.from_dict(json.loads(payload[HEADER.size : start]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"malformed options: {exc}") from None
    # a view, not a copy: the pixels are read straight from the received message
    pixels = memoryview(payload)[start:]
    image = Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)  # type: ignore[arg-type]
    return image, options


def pack_detection(detection: Detection) -> bytes:
    answer: dict[str, Any] = {
        "objects": detection.objects,
        "queue_seconds": detection.queue_seconds,
        "pass_seconds": detection.pass_seconds,
    }
    if detection.instances is not None:
        answer["instances"] = [instance.as_dict() for instance in detection.instances]
        answer["width"], answer["height"] = detection.width, detection.height
    return json.dumps(answer).encode()


def unpack_detection(payload: bytes) -> Detection:
    answer = json.loads(payload)
    instances = answer.get("instances")
    return Detection(
        answer["objects"],
        answer["queue_seconds"],
        answer["pass_seconds"],
        None if instances is None else [Instance.from_dict(values) for values in instances],
        answer.get("width", 0),
        answer.get("height", 0),
    )


def pack_status(state: str, message: str, categories: list[str] | None = None) -> bytes:
    answer: dict[str, Any] = {"state": state, "message": message}
    if categories is not None:
        answer["categories"] = categories
    return json.dumps(answer).encode()


def unpack_status(payload: bytes) -> tuple[str, str, list[str] | None]:
    answer = json.loads(payload)
    return answer["state"], answer["message"], answer.get("categories")


def max_message_bytes(settings: Settings) -> int:
    """Room for the largest image MAX_IMAGE_PIXELS lets through (gRPC's limit is an int32)."""
    return min(HEADER.size + MAX_OPTIONS_BYTES + 3 * settings.max_image_pixels + 1024, 2**31 - 1)
