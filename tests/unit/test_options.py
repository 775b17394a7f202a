"""A full detection's options as clients send them (common/options.py), and the masks it encodes
(common/model/masks.py)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from torchvision.models.detection.roi_heads import paste_masks_in_image

from common.errors import InvalidRequest
from common.model.detection import DetectOptions
from common.model.masks import encode, paste
from common.model.detection import check_classes
from common.options import parse_options, reject_unknown
from testkit.settings import settings_for

SETTINGS = settings_for()


def test_defaults_are_the_services():
    assert parse_options(SETTINGS) == DetectOptions(0.75, (), "none")


@pytest.mark.parametrize(
    ("threshold", "classes", "masks", "expected"),
    [
        (0.5, ["cat", "dog"], "polygons", DetectOptions(0.5, ("cat", "dog"), "polygons")),
        ("0.3", "cat, dog,,cat", "RLE", DetectOptions(0.3, ("cat", "dog"), "rle")),  # form and query strings
        (1, [], "both", DetectOptions(1.0, (), "both")),
        (0.25, None, "none", DetectOptions(0.25, (), "none")),
    ],
)
def test_good_options(threshold, classes, masks, expected):
    assert parse_options(SETTINGS, threshold, classes, masks) == expected


@pytest.mark.parametrize(
    ("threshold", "classes", "masks"),
    [
        (0.1, None, None),  # under MIN_SCORE_THRESHOLD
        (1.5, None, None),
        ("nan", None, None),
        ("high", None, None),
        (True, None, None),
        ([0.5], None, None),
        (None, "x" * 300, None),
        (None, [1, 2], None),
        (None, {"cat": 1}, None),
        (None, ["c"] * 0 + [f"c{i}" for i in range(1001)], None),
        (None, None, "outline"),
        (None, None, True),
    ],
)
def test_bad_options_are_invalid_requests(threshold, classes, masks):
    with pytest.raises(InvalidRequest):
        parse_options(SETTINGS, threshold, classes, masks)


def test_min_score_threshold_sets_the_floor():
    assert parse_options(settings_for(MIN_SCORE_THRESHOLD=0.05), 0.05).threshold == 0.05
    with pytest.raises(InvalidRequest, match="from 0.5"):
        parse_options(settings_for(MIN_SCORE_THRESHOLD=0.5), 0.4)


def test_unknown_fields_and_classes_are_named():
    with pytest.raises(InvalidRequest, match="'treshold'"):
        reject_unknown(["url", "treshold"], ("url", "threshold"), "fields")
    reject_unknown(["url"], ("url", "threshold"), "fields")
    with pytest.raises(InvalidRequest, match="'unicorn'"):
        check_classes(["cat", "unicorn"], ["cat", "dog"])
    check_classes(["cat"], ["cat", "dog"])


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
