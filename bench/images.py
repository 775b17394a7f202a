"""Deterministic photo-like test images (no downloads): gradients, shapes, texture, noise."""

from __future__ import annotations

import io

SIZES = ((640, 480), (1280, 720), (1920, 1080))


def photo_like(width: int, height: int, seed: int = 1):
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


def jpeg(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def image_set():
    """[(name, PIL image)] for the benchmark: one per size, distinct seeds."""
    return [(f"{w}x{h}", photo_like(w, h, seed=i + 1)) for i, (w, h) in enumerate(SIZES)]
