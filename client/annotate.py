"""``--annotate``: the copies of the images with their detections drawn, and their names."""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from client.inputs import Input

if TYPE_CHECKING:
    from PIL import Image


# Box colours, one per label (RGB hex triplets): distinct at a glance.
_PALETTE_RGB = bytes.fromhex(
    "FF3838 FF9D97 FF701F FFB21D CFD231 48F90A 92CC17 3DDB86 1A9334 00D4BB "
    "2C99A8 00C2FF 344593 6473FF 0018EC 8438FF 520085 CB38FF FF95C8 FF37C7"
)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (_PALETTE_RGB[i], _PALETTE_RGB[i + 1], _PALETTE_RGB[i + 2]) for i in range(0, len(_PALETTE_RGB), 3)
)


def label_colour(label: str) -> tuple[int, int, int]:
    """The colour ``--annotate`` draws ``label`` in: the same in every run (crc32, not hash())."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def annotated_name(item: Input, total: int) -> str:
    """``0007-cats.png``: the input's position first, so that names never collide (the same file
    name in two folders, one URL twice) and sort in input order."""
    stem = item.path.stem if item.path is not None else Path(unquote(urlsplit(item.text).path)).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return f"{item.position + 1:0{len(str(total))}d}-{stem[:80]}.png"


def draw_detections(data: bytes, instances: list[dict[str, Any]]) -> Image.Image:
    """The image with each instance's mask polygons filled translucently, its box outlined and
    its label and score written, in the label's colour."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        # boxes are in the pixels of the upright image, as the service detects on it
        upright = ImageOps.exif_transpose(opened)
        if upright.mode.startswith("I"):  # 16/32-bit greyscale: scale to 8 bits instead of clipping
            upright = upright.point(lambda value: value / 256).convert("L")
        image = upright.convert("RGBA")
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    fills = ImageDraw.Draw(overlay)
    for instance in instances:
        for polygon in (instance.get("mask") or {}).get("polygons") or []:
            if len(polygon) >= 6:
                fills.polygon(polygon, fill=(*label_colour(instance["label"]), 96))
    canvas = Image.alpha_composite(image, overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    line = max(2, round(short_side / 200))
    font = ImageFont.load_default(size=max(11, round(short_side / 32)))
    for instance in instances:
        colour = label_colour(instance["label"])
        x1, y1, x2, y2 = instance["box"]
        # box corners are pixel edges: the last pixel inside is x2 - 1
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = f"{instance['label']} {instance['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        height = bottom - top + 4
        # above the box when there is room, otherwise just inside its top edge
        tx, ty = (x1, y1 - height) if y1 - height >= 0 else (x1 + line, y1 + line)
        draw.rectangle((tx, ty, tx + right - left + 4, ty + height), fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_ink_on(colour), font=font)
    return canvas


def _ink_on(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light label colours, white on dark ones (ITU-R BT.601 luma)."""
    red, green, blue = colour
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)
