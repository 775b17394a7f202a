"""Deterministic generated pictures (no downloads) and their encoded bytes."""

from __future__ import annotations

import io

# The benchmark's image sizes, one picture each (``image_set``).
SIZES = ((640, 480), (1280, 720), (1920, 1080))


def encode(image, fmt: str, **options) -> bytes:
    """``image`` saved in ``fmt`` (a Pillow format name) with Pillow's ``options``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def scene(width: int = 320, height: int = 240, seed: int = 1):
    """A small RGB picture with some structure (blocks and a gradient): quick to detect on."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    for _ in range(6):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        pixels[y:y + 40, x:x + 40] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def photo_like(width: int, height: int, seed: int = 1):
    """A photo-like RGB picture: smooth gradients, filled shapes, slight blur and noise (the
    realistic checkpoints give their spread of scores on these)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        120 + 80 * np.sin(x / (37 + 5 * c) + c) * np.cos(y / (53 - 7 * c)) for c in range(3)
    ], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(14):
        w, h = int(rng.integers(width // 12, width // 3)), int(rng.integers(height // 12, height // 3))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 8, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def image_set():
    """[(name, PIL image)] for the benchmark: one ``photo_like`` per size of ``SIZES``, distinct seeds."""
    return [(f"{w}x{h}", photo_like(w, h, seed=i + 1)) for i, (w, h) in enumerate(SIZES)]


def _jpeg_with_exif_orientation() -> bytes:
    from PIL import Image

    image = scene(200, 120, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    return encode(image, "JPEG", exif=exif)


def sample_images() -> dict[str, tuple[bytes, str]]:
    """Images in every format and mode the service must accept: name -> (bytes, content type).
    Their decoded sizes are 320x240, 160x120 (the animation) and 120x200 (the EXIF-rotated one)."""
    import numpy as np
    from PIL import Image

    base = scene(320, 240, seed=3)
    animated = [scene(160, 120, seed=s) for s in (4, 5, 6)]
    gif = io.BytesIO()
    animated[0].save(gif, "GIF", save_all=True, append_images=animated[1:], duration=100, loop=0)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "jpeg": (encode(base, "JPEG", quality=90), "image/jpeg"),
        "png": (encode(base, "PNG"), "image/png"),
        "webp": (encode(base, "WEBP"), "image/webp"),
        "gif-animated": (gif.getvalue(), "image/gif"),
        "rgba-png": (encode(base.convert("RGBA"), "PNG"), "image/png"),
        "palette-png": (encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
        "png-16bit": (encode(sixteen, "PNG"), "image/png"),
        "jpeg-exif-rotated": (_jpeg_with_exif_orientation(), "image/jpeg"),
        "cmyk-jpeg": (encode(base.convert("CMYK"), "JPEG"), "image/jpeg"),
    }
