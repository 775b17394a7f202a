"""The model process's wire format (common/model/wire.py): decoded images (with a request's
options) to and from bytes, and detections back."""

import pytest
from PIL import Image

from common.model.detection import Detection, DetectOptions, Instance
from common.model.wire import HEADER, MAGIC, pack_detection, pack_image, unpack_detection, unpack_image


def test_image_payload_round_trip():
    image = Image.frombytes("RGB", (3, 2), bytes(range(18)))
    received, options = unpack_image(pack_image(image))
    assert received.tobytes() == image.tobytes()
    assert options is None
    grey = Image.new("L", (4, 4), 7)
    assert unpack_image(pack_image(grey))[0].getpixel((0, 0)) == (7, 7, 7)


def test_options_travel_with_the_image():
    image = Image.new("RGB", (5, 3), (1, 2, 3))
    sent = DetectOptions(0.5, ("cat", "dog"), "both")
    received, options = unpack_image(pack_image(image, sent))
    assert options == sent
    assert received.tobytes() == image.tobytes()


def test_detections_round_trip_with_and_without_instances():
    names_only = Detection(["cat"], 0.1, 0.2)
    assert unpack_detection(pack_detection(names_only)) == names_only
    full = Detection(["cat"], 0.1, 0.2, [Instance("cat", 0.9, (1.0, 2.0, 3.0, 4.0), [[1.0, 2.0, 3.0, 2.0, 3.0, 4.0]],
                                                  {"size": [5, 6], "counts": "abc"})], 6, 5)
    assert unpack_detection(pack_detection(full)) == full


@pytest.mark.parametrize("payload", [
    b"",
    b"RGB8",
    HEADER.pack(b"JPEG", 1, 1, 0) + b"abc",
    HEADER.pack(MAGIC, 2, 2, 0) + b"abc",  # 4 pixels declared, 1 sent
    HEADER.pack(MAGIC, 0, 5, 0),
    HEADER.pack(MAGIC, 1, 1, 0) + b"abcd",  # one byte too many
    HEADER.pack(MAGIC, 1, 1, 2) + b"{]abc",  # options that are not JSON
    HEADER.pack(MAGIC, 1, 1, 2) + b"{}abc",  # options without their fields
], ids=["empty", "header-cut", "wrong-magic", "short", "zero-width", "long", "bad-options", "empty-options"])
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(ValueError):
        unpack_image(payload)
