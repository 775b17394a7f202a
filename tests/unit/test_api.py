"""The API's options (common.api.Options): what JSON bodies, forms, query strings and gRPC
messages may ask, and how class names are listed."""

import pytest
from pydantic import ValidationError

from common import api
from common.errors import InvalidRequest
from common.model.detection import DetectOptions, check_classes
from testkit.settings import settings_for

SETTINGS = settings_for()


def options(values: dict, strict: bool = True, settings=SETTINGS) -> DetectOptions:
    try:
        checked = api.Options.model_validate(values, strict=strict, context={"settings": settings})
    except ValidationError as exc:
        raise api.validation_problem(exc, "fields") from None
    return checked.detect_options(settings)


def test_defaults_are_the_services():
    assert options({}) == DetectOptions(0.75, (), "none")
    assert options({"threshold": None, "classes": None, "masks": None}) == DetectOptions(0.75, (), "none")


@pytest.mark.parametrize(
    ("values", "strict", "expected"),
    [
        ({"threshold": 0.5, "classes": ["cat", "dog"], "masks": "polygons"},
         True, DetectOptions(0.5, ("cat", "dog"), "polygons")),
        ({"threshold": "0.3", "classes": api.listed_names(["cat, dog,,cat"], ","), "masks": "rle"},
         False, DetectOptions(0.3, ("cat", "dog"), "rle")),  # form and query strings
        ({"threshold": 1, "classes": [], "masks": "both"}, True, DetectOptions(1.0, (), "both")),
        ({"threshold": 0.25}, True, DetectOptions(0.25, (), "none")),
    ],
)
def test_good_options(values, strict, expected):
    assert options(values, strict) == expected


@pytest.mark.parametrize(
    "values",
    [
        {"threshold": 0.1},  # under MIN_SCORE_THRESHOLD
        {"threshold": 1.5},
        {"threshold": "nan"},
        {"threshold": "high"},
        {"threshold": True},
        {"threshold": [0.5]},
        {"classes": "cat"},
        {"classes": ["x" * 300]},
        {"classes": [1, 2]},
        {"classes": {"cat": 1}},
        {"classes": [f"c{i}" for i in range(1001)]},
        {"masks": "outline"},
        {"masks": True},
        {"treshold": 0.5},
    ],
)
def test_bad_json_options_are_invalid_requests(values):
    with pytest.raises(InvalidRequest):
        options(values)


def test_min_score_threshold_sets_the_floor():
    assert options({"threshold": 0.05}, settings=settings_for(MIN_SCORE_THRESHOLD=0.05)).threshold == 0.05
    with pytest.raises(InvalidRequest, match="from 0.5"):
        options({"threshold": 0.4}, settings=settings_for(MIN_SCORE_THRESHOLD=0.5))


def test_unknown_fields_and_classes_are_named():
    with pytest.raises(InvalidRequest, match="unknown fields 'treshold'"):
        options({"treshold": 0.5})
    with pytest.raises(InvalidRequest, match="'unicorn'"):
        check_classes(["cat", "unicorn"], ["cat", "dog"])
    check_classes(["cat"], ["cat", "dog"])


def test_a_query_string_names_only_the_classes_that_fit_its_request_line():
    coco_like = ["person", "tennis racket", "hair drier"] * 27
    limit = api.query_classes_limit(coco_like)
    longest_query = "&".join(["classes=tennis%20racket"] * limit)
    assert len(f"POST /v1/detect/batch?threshold=0.12345678901234567&masks=polygons&{longest_query} HTTP/1.1") \
        <= api.REQUEST_LINE_BYTES
    assert limit > len(coco_like) // 2  # not needlessly tight
    unknown = api.query_classes_limit(None)  # while the model loads: names of any allowed length
    assert unknown >= 1 and unknown * (9 + 3 * api.MAX_CLASS_NAME) <= api.REQUEST_LINE_BYTES


