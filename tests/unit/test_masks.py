"""Masks as the service encodes them (common.model.masks): pasted as torchvision pastes them,
and given as polygons and COCO RLE."""

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torchvision.models.detection.roi_heads import paste_masks_in_image

from common.model.detection import DetectOptions
from common.model.masks import encode, paste


def test_pasting_one_instance_at_a_time_is_torchvisions_paste():
    torch.manual_seed(0)
    probabilities = torch.rand(4, 1, 28, 28)
    boxes = torch.tensor([[10.0, 20, 200, 150], [0, 0, 640, 480], [300.5, 100.2, 310.7, 400.9], [5, 5, 6, 6]])
    pasted = paste_masks_in_image(probabilities, boxes, (480, 640), padding=1)
    for index in range(4):
        mine = paste(probabilities[index], boxes[index], 480, 640)
        assert np.array_equal(mine, (pasted[index, 0] > 0.5).numpy())


def test_polygons_and_rle_describe_the_mask():
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:30, 20:50] = True  # a 30 x 20 rectangle
    polygons, rle = encode(mask, DetectOptions(0.5, (), "both"))
    assert len(polygons) == 1
    xs, ys = polygons[0][0::2], polygons[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (20, 49, 10, 29)
    assert rle["size"] == [60, 80] and isinstance(rle["counts"], str)
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)
    assert encode(mask, DetectOptions(0.5, (), "polygons"))[1] is None
    assert encode(mask, DetectOptions(0.5, (), "rle"))[0] is None
