"""grpc_app.convert: a detection sent as a gRPC message and read back is what HTTP answers for it,
and a message's options are checked as a JSON body's are."""

from __future__ import annotations

import pytest

from common import api, errors
from common.config import Settings
from common.model import Detection, DetectOptions
from common.model.detection import Instance
from grpc_app import convert
from grpc_app.stubs import inference_pb2

SETTINGS = Settings.from_env({"SCORE_THRESHOLD": "0.75", "MIN_SCORE_THRESHOLD": "0.25"})


def detection(masks: str) -> Detection:
    asked = DetectOptions(0.5, (), masks)
    instances = [
        Instance(
            "cat",
            0.9731,  # not a float32: the reader rounds it back as the service rounds it
            (1.25, 2.1, 30.33, 40.0),
            [[1.0, 2.0, 30.0, 2.0, 30.0, 40.0], []] if asked.polygons else None,
            {"size": [48, 64], "counts": "PPYo1"} if asked.rle else None,
        ),
        Instance(
            "dog",
            0.8,
            (5.0, 5.0, 20.0, 25.0),
            [] if asked.polygons else None,  # a mask with no outline: an empty list, not none
            {"size": [48, 64], "counts": "0"} if asked.rle else None,
        ),
    ]
    return Detection(["cat", "dog"], 0.0, 0.01, instances, 64, 48)


@pytest.mark.parametrize("masks", ["none", "polygons", "rle", "both"])
def test_a_detection_reads_back_as_http_answers_it(masks):
    sent = detection(masks)
    wire = inference_pb2.DetectResponse.FromString(convert.detection_message(sent).SerializeToString())
    assert convert.detection_answer(wire, masks) == api.DetectResponse.of(sent)


def test_batch_results_carry_the_detection_or_the_error():
    done = convert.batch_result(2, detection("none"))
    assert done.index == 2 and done.WhichOneof("result") == "detection"
    failed = convert.batch_result(3, errors.NotAnImage("corrupt"))
    assert (failed.index, failed.error.code, failed.error.message) == (3, "not_an_image", "corrupt")


@pytest.mark.parametrize(
    ("message", "json_body"),
    [
        (inference_pb2.DetectOptions(), {}),
        (inference_pb2.DetectOptions(threshold=0.5), {"threshold": 0.5}),
        (inference_pb2.DetectOptions(classes=["cat", " dog ", "", "cat"]), {"classes": ["cat", "dog"]}),
        (inference_pb2.DetectOptions(masks=inference_pb2.MASK_FORMAT_BOTH), {"masks": "both"}),
    ],
)
def test_options_are_those_of_the_same_json(message, json_body):
    expected = api.Options.model_validate(json_body, context={"settings": SETTINGS}).detect_options(SETTINGS)
    assert convert.options(message, SETTINGS) == expected


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (inference_pb2.DetectOptions(threshold=0.1), "from 0.25 (MIN_SCORE_THRESHOLD) to 1"),
        (inference_pb2.DetectOptions(threshold=float("nan")), "MIN_SCORE_THRESHOLD"),
        (inference_pb2.DetectOptions(classes=["x" * 201]), "200 characters"),
        (inference_pb2.DetectOptions(masks=9), "unknown mask format 9"),
    ],
)
def test_options_are_refused_as_json_ones_are(message, problem):
    with pytest.raises(errors.InvalidRequest, match=problem.replace("(", r"\(").replace(")", r"\)")):
        convert.options(message, SETTINGS)


def test_mask_format_numbers_are_the_protos():
    assert [convert.mask_format(name) for name in ("none", "polygons", "rle", "both")] == [
        inference_pb2.MASK_FORMAT_NONE,
        inference_pb2.MASK_FORMAT_POLYGONS,
        inference_pb2.MASK_FORMAT_RLE,
        inference_pb2.MASK_FORMAT_BOTH,
    ]


def test_an_image_is_its_url_or_its_bytes():
    assert convert.source(inference_pb2.ImageInput(url="http://example.com/a.jpg")).url == "http://example.com/a.jpg"
    assert convert.source(inference_pb2.ImageInput(data=b"abc")).data == b"abc"
    assert "neither" in convert.source(inference_pb2.ImageInput()).problem
