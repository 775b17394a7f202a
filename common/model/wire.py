"""The internal protocol between the servers and the model process (not a public API).

gRPC over a Unix socket with raw-bytes methods, no .proto:
- ``Detect``: 12-byte header ``b"RGB8"``, width, height (little-endian uint32), then
  width*height*3 bytes of 8-bit RGB; answers JSON
  ``{"objects": [...], "queue_seconds": ..., "pass_seconds": ...}``;
- ``Status``: empty request; answers JSON ``{"state": ..., "message": ...}``.
A model that is not loaded answers ``FAILED_PRECONDITION`` with the reason; ``UNAVAILABLE``
only ever means the process itself cannot be reached.
"""

from __future__ import annotations

import json
import struct

from PIL import Image

from common.config import Settings
from common.model.detection import Detection

SERVICE = "instance_detector.internal.Model"
DETECT = f"/{SERVICE}/Detect"
STATUS = f"/{SERVICE}/Status"
HEADER = struct.Struct("<4sII")
MAGIC = b"RGB8"


def pack_image(image: Image.Image) -> bytes:
    image = image.convert("RGB") if image.mode != "RGB" else image
    return HEADER.pack(MAGIC, *image.size) + image.tobytes()


def unpack_image(payload: bytes) -> Image.Image:
    if len(payload) < HEADER.size:
        raise ValueError("payload shorter than its header")
    magic, width, height = HEADER.unpack_from(payload)
    if magic != MAGIC or width == 0 or height == 0 or len(payload) != HEADER.size + width * height * 3:
        raise ValueError("malformed image payload")
    # a view, not a copy: the pixels are read straight from the received message
    pixels = memoryview(payload)[HEADER.size :]
    return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)  # type: ignore[arg-type]


def pack_detection(detection: Detection) -> bytes:
    return json.dumps(
        {
            "objects": detection.objects,
            "queue_seconds": detection.queue_seconds,
            "pass_seconds": detection.pass_seconds,
        }
    ).encode()


def unpack_detection(payload: bytes) -> Detection:
    answer = json.loads(payload)
    return Detection(answer["objects"], answer["queue_seconds"], answer["pass_seconds"])


def pack_status(state: str, message: str) -> bytes:
    return json.dumps({"state": state, "message": message}).encode()


def unpack_status(payload: bytes) -> tuple[str, str]:
    answer = json.loads(payload)
    return answer["state"], answer["message"]


def max_message_bytes(settings: Settings) -> int:
    """Room for the largest image MAX_IMAGE_PIXELS lets through (gRPC's limit is an int32)."""
    return min(HEADER.size + 3 * settings.max_image_pixels + 1024, 2**31 - 1)
