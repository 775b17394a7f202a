"""Turn downloaded bytes into an upright 8-bit RGB image, refusing anything unsafe or broken."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import NotAnImage, TooLarge

# Formats Pillow decodes natively and safely; others (EPS via Ghostscript, etc.) are refused.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode_image(data: bytes, max_pixels: int, origin: str = "the URL's body") -> Image.Image:
    """Decode ``data`` to an RGB PIL image (first frame, EXIF orientation applied); ``origin``
    names where the bytes came from, in error messages."""
    if not data:
        raise NotAnImage(f"{origin} is empty")
    with warnings.catch_warnings():
        # Pillow's own bomb check only warns below twice its limit; ours is the one that counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        except Image.DecompressionBombError:
            raise TooLarge(f"the image has more than {max_pixels} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise NotAnImage(
                f"{origin} is not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})"
            ) from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise NotAnImage("the image has no pixels")
        if width * height > max_pixels:
            raise TooLarge(f"the image is {width}x{height}, more than {max_pixels} pixels")
        check_proportions(width, height)
        try:
            image.seek(0)  # first frame of an animation
            image.load()
        except Image.DecompressionBombError:
            raise TooLarge(f"the image has more than {max_pixels} pixels") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise NotAnImage(f"the image data is truncated or corrupt: {exc}") from None
    return to_rgb(_upright(image))


# The detector rescales every image so that its short side is MODEL_SHORT_SIDE pixels, unless that
# would make the long side exceed MODEL_LONG_SIDE (torchvision's GeneralizedRCNNTransform for
# maskrcnn_resnet50_fpn: min_size 800, max_size 1333; tests/unit/test_decode.py checks they match).
MODEL_SHORT_SIDE = 800
MODEL_LONG_SIDE = 1333


def check_proportions(width: int, height: int) -> None:
    """NotAnImage for an image so elongated that, once rescaled for the detector, its short side
    would be under one pixel (e.g. 20000x10): the model cannot take it."""
    short, long = min(width, height), max(width, height)
    scale = min(MODEL_SHORT_SIDE / short, MODEL_LONG_SIDE / long)
    if math.floor(short * scale) < 1:
        raise NotAnImage(
            f"the image is {width}x{height}: too elongated to detect in (scaled to at most "
            f"{MODEL_LONG_SIDE} pixels on its long side, its short side would vanish)"
        )


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF is common and never fatal
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited over white."""
    if image.mode in _WIDE_MODES:
        # Scale 16-bit and 32-bit samples into 0..255 instead of clipping them.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode in ("I", "F") and values.max() <= 255 and values.min() >= 0:
            top = 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
