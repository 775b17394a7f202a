"""A detected instance's mask, pasted into the image and encoded as the client asked.

Masks are pasted one instance at a time (torchvision's own ``paste_mask_in_image``, the function
its ``paste_masks_in_image`` loops over): all at once would hold instances x height x width floats,
gigabytes for a large photo with many instances.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as coco_mask
from torchvision.models.detection.roi_heads import paste_mask_in_image

from common.model.detection import DetectOptions

# torchvision's Mask R-CNN reports a pixel as part of the instance when its probability is over 0.5.
MASK_PROBABILITY = 0.5


def paste(mask_probs: torch.Tensor, box: torch.Tensor, height: int, width: int) -> np.ndarray:
    """One instance's 28x28 mask probabilities (1x28x28) as a boolean height x width array,
    exactly as torchvision pastes it (``paste_masks_in_image`` with padding 1)."""
    padded = torch.nn.functional.pad(mask_probs, (1, 1, 1, 1))
    scale = (mask_probs.shape[-1] + 2) / mask_probs.shape[-1]
    center_x, center_y = (box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5
    half_w, half_h = (box[2] - box[0]) * 0.5 * scale, (box[3] - box[1]) * 0.5 * scale
    expanded = torch.stack([center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h])
    pasted = paste_mask_in_image(padded[0], expanded.to(torch.int64), height, width)
    return (pasted > MASK_PROBABILITY).numpy()


def encode(
    mask: np.ndarray, options: DetectOptions
) -> tuple[list[list[float]] | None, dict[str, Any] | None]:
    """(polygons, rle) of a boolean mask, each None unless ``options`` asks for it."""
    polygons = rle = None
    if options.polygons:
        # outer outlines only: COCO's polygon format has no holes
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        polygons = [
            [float(value) for value in contour.reshape(-1)] for contour in contours if len(contour) >= 3
        ]
    if options.rle:
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle = {"size": [int(size) for size in encoded["size"]], "counts": encoded["counts"].decode("ascii")}
    return polygons, rle
