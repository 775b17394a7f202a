"""Decoding: every accepted format and mode becomes upright 8-bit RGB; bad data is refused."""

import io

import numpy as np
import pytest
from PIL import Image

from common.decode import decode_image
from common.errors import NotAnImage, TooLarge
from testkit.images import encode, sample_images, scene

LIMIT = 50_000_000


@pytest.mark.parametrize("name", sorted(sample_images()))
def test_every_sample_decodes_to_rgb(name):
    body, _ = sample_images()[name]
    image = decode_image(body, LIMIT)
    assert image.mode == "RGB"
    assert image.size == {"gif-animated": (160, 120), "jpeg-exif-rotated": (120, 200)}.get(name, (320, 240))


def test_exif_orientation_is_applied():
    body, _ = sample_images()["jpeg-exif-rotated"]
    assert Image.open(io.BytesIO(body)).size == (200, 120)
    assert decode_image(body, LIMIT).size == (120, 200)


def test_sixteen_bit_is_scaled_not_clipped():
    gray = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    pixel = decode_image(encode(gray, "PNG"), LIMIT).getpixel((0, 0))
    assert pixel == (128, 128, 128)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert decode_image(encode(rgba, "PNG"), LIMIT).getpixel((1, 1)) == (255, 255, 255)


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue(), LIMIT).getpixel((8, 8))[0] > 200


def test_cmyk_is_converted():
    body, _ = sample_images()["cmyk-jpeg"]
    assert decode_image(body, LIMIT).mode == "RGB"


@pytest.mark.parametrize("body", [
    b"", b"<html><body>hello</body></html>", b"GIF89a", b"\x00" * 1000,
    b"%!PS-Adobe-3.0 EPSF-3.0\n",
])
def test_non_images_are_refused(body):
    with pytest.raises(NotAnImage):
        decode_image(body, LIMIT)


def test_truncated_jpeg_is_refused():
    body = encode(scene(320, 240), "JPEG")
    with pytest.raises(NotAnImage, match="truncated"):
        decode_image(body[: len(body) // 2], LIMIT)


def test_pixel_cap_applies_before_decoding():
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # ~50 KB on the wire, 400 Mpx
    assert len(bomb) < 200_000
    with pytest.raises(TooLarge, match="pixels"):
        decode_image(bomb, LIMIT)


def test_pixel_cap_is_configurable():
    with pytest.raises(TooLarge):
        decode_image(encode(scene(320, 240), "PNG"), 320 * 240 - 1)
    assert decode_image(encode(scene(320, 240), "PNG"), 320 * 240).size == (320, 240)


@pytest.mark.parametrize("size", [(20000, 10), (10, 20000), (2000, 1), (1, 3000), (5000, 2)])
def test_images_too_elongated_for_the_detector_are_refused(size):
    with pytest.raises(NotAnImage, match="too elongated"):
        decode_image(encode(Image.new("RGB", size, (90, 120, 30)), "PNG"), LIMIT)


@pytest.mark.parametrize("size", [(1333, 1), (2666, 2), (1, 1), (800, 1)])
def test_thin_images_the_detector_can_take_are_accepted(size):
    assert decode_image(encode(Image.new("RGB", size, (90, 120, 30)), "PNG"), LIMIT).size == size


def test_the_proportion_limit_is_the_detectors_own():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from common.decode import MODEL_LONG_SIDE, MODEL_SHORT_SIDE

    transform = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).transform
    assert tuple(transform.min_size) == (MODEL_SHORT_SIDE,) and transform.max_size == MODEL_LONG_SIDE
