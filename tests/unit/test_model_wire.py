"""The model process's wire format (common/model/wire.py): decoded images to and from bytes."""

import pytest
from PIL import Image

from common.model.wire import HEADER, MAGIC, pack_image, unpack_image


def test_image_payload_round_trip():
    image = Image.frombytes("RGB", (3, 2), bytes(range(18)))
    assert unpack_image(pack_image(image)).tobytes() == image.tobytes()
    grey = Image.new("L", (4, 4), 7)
    assert unpack_image(pack_image(grey)).getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("payload", [
    b"",
    b"RGB8",
    HEADER.pack(b"JPEG", 1, 1) + b"abc",
    HEADER.pack(MAGIC, 2, 2) + b"abc",  # 4 pixels declared, 1 sent
    HEADER.pack(MAGIC, 0, 5),
    HEADER.pack(MAGIC, 1, 1) + b"abcd",  # one byte too many
], ids=["empty", "header-cut", "wrong-magic", "short", "zero-width", "long"])
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(ValueError):
        unpack_image(payload)
