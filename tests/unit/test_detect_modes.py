"""The detect modes (common/model/accel): the default path answers exactly what torchvision's eager
model answers, the fast mode runs only when asked for, conversions are cached.

Real models throughout: a seeded checkpoint with realistic score spread (testkit.checkpoints),
compared at a low threshold so that many boxes (up to torchvision's 100) are compared.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
from pycocotools import mask as coco_mask
from torchvision.models.detection import MaskRCNN
from torchvision.transforms.functional import pil_to_tensor

from client.evaluate import dice_score
from common.model import accel
from common.model.accel.cache import graph_cache_key
from common.model.accel.graph import WINOGRAD
from common.model.detection import DetectOptions
from common.model.detector import Detector
from common.model.weights import build_model, state_dict_sha256
from testkit.checkpoints import ACTIVE_CLASSES, make_realistic_checkpoint
from testkit.compare import as_lists, compare
from testkit.images import photo_like
from testkit.settings import settings_for

LOW_THRESHOLD = 0.05
SERVICE_THRESHOLD = 0.75
CALIBRATION_IMAGE = (640, 480, 21)  # the realistic checkpoint's: about five boxes kept at 0.75


@contextmanager
def logged(logger: str = "common.model", level: int = logging.INFO):
    """The messages ``logger`` and its children log at ``level`` or above, in a list."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    target, handler = logging.getLogger(logger), Collect(level)
    previous = target.level
    target.addHandler(handler)
    target.setLevel(level)
    try:
        yield messages
    finally:
        target.removeHandler(handler)
        target.setLevel(previous)


pytestmark = pytest.mark.model  # every test here builds and converts the real architecture


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    path = tmp_path_factory.mktemp("realistic") / "realistic.pt"
    width, height, seed = CALIBRATION_IMAGE
    make_realistic_checkpoint(path, seed=3, target_boxes=5, images=[photo_like(width, height, seed=seed)])
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("accel-cache")


@pytest.fixture(scope="module")
def env(cache_dir):
    """The variables every detector here gets besides its weights, mode and threshold."""
    return {"ACCEL_CACHE_DIR": cache_dir, "RUN_DIR": cache_dir / "run"}


@pytest.fixture(scope="module")
def eager(realistic, env):
    return Detector.from_settings(settings_for(realistic, DETECT_MODE="eager", SCORE_THRESHOLD=LOW_THRESHOLD,
                                               **env))


@pytest.fixture(scope="module")
def default_build(realistic, env):
    """(detector, its log) with DETECT_MODE unset: the first exact detector of the module, so it
    converts the graph into the empty cache (tests building other exact detectors ask for it)."""
    with logged() as messages:
        detector = Detector.from_settings(settings_for(realistic, SCORE_THRESHOLD=LOW_THRESHOLD, **env))
    return detector, messages


@pytest.fixture(scope="module")
def default(default_build):
    return default_build[0]


def test_eager_mode_is_torchvision_itself(eager):
    assert eager.mode == "eager"
    assert isinstance(eager.model, MaskRCNN)


@pytest.mark.parametrize("size", [(640, 480), (1280, 720), (517, 333)])
def test_default_path_answers_like_eager(eager, default, size):
    assert default.mode == "exact"
    image = photo_like(*size, seed=sum(size))
    want, got = as_lists(eager.detect_raw(image)), as_lists(default.detect_raw(image))
    assert len(want[0]) >= 50, "too few boxes to compare"
    result = compare(want, got, threshold=LOW_THRESHOLD)
    assert result["labels_equal"] and result["kept"] == result["kept_ref"]
    assert result["max_score_dev"] <= 1e-3
    assert result["max_box_dev_px"] <= 0.5
    assert result["same_answers"]


def test_exact_path_without_winograd_answers_like_eager_too(eager, default, realistic, env):
    assert default.model.winograd == WINOGRAD
    direct = Detector.from_settings(settings_for(realistic, DETECT_MODE="exact",
                                                 SCORE_THRESHOLD=LOW_THRESHOLD, WINOGRAD=0, **env))
    assert direct.mode == "exact" and direct.model.winograd == ()
    image = photo_like(640, 480, seed=5)
    want, got = as_lists(eager.detect_raw(image)), as_lists(direct.detect_raw(image))
    assert len(want[0]) >= 50
    assert compare(want, got, threshold=LOW_THRESHOLD)["same_answers"]


def test_default_path_at_the_service_threshold(realistic, env, default):
    eager = Detector.from_settings(settings_for(realistic, DETECT_MODE="eager",
                                                SCORE_THRESHOLD=SERVICE_THRESHOLD, **env))
    exact = Detector.from_settings(settings_for(realistic, DETECT_MODE="exact",
                                                SCORE_THRESHOLD=SERVICE_THRESHOLD, **env))
    image = photo_like(*CALIBRATION_IMAGE)  # about five kept boxes
    names = eager.detect(image)
    assert 1 <= len(names) <= 20
    assert exact.detect(image) == names


def test_service_threshold_names_are_those_of_a_model_built_at_it(realistic, env, default):
    """The model keeps candidates down to MIN_SCORE_THRESHOLD and each request filters: the names at
    SCORE_THRESHOLD must be those of torchvision's model built with box_score_thresh at it."""
    reference = build_model(torch.load(realistic, weights_only=True), SERVICE_THRESHOLD)
    exact = Detector.from_settings(settings_for(realistic, SCORE_THRESHOLD=SERVICE_THRESHOLD, **env))
    assert exact.model.model.roi_heads.score_thresh == 0.25  # MIN_SCORE_THRESHOLD's default
    for seed in (21, 4):
        image = photo_like(640, 480, seed=seed)
        with torch.inference_mode():
            labels = reference([pil_to_tensor(image).float().div_(255.0)])[0]["labels"].tolist()
        assert labels, "nothing above the threshold to compare"
        assert exact.detect(image) == [exact.categories[index] for index in labels]


def test_masks_on_the_default_path_are_eagers(eager, default):
    """The exact path runs the mask branch only when asked, on the kept instances, and pastes one
    instance at a time: the masks must still be torchvision's own."""
    image = photo_like(640, 480, seed=11)
    options = DetectOptions(0.3, (), "rle")
    want = eager.describe(eager.run(image, options=options), options).instances
    got = default.describe(default.run(image, options=options), options).instances
    assert want and sorted(i.label for i in got) == sorted(i.label for i in want)
    # instances whose scores agree to float rounding may come in another order: match by mask
    for expected in want:
        same_class = [actual.rle for actual in got if actual.label == expected.label]
        overlap = max(coco_mask.iou(same_class, [expected.rle], [False])[:, 0])
        assert overlap >= 0.98, (expected.label, overlap)
    boxes_only = DetectOptions(0.3, (), "none")
    plain = default.describe(default.run(image, options=boxes_only), boxes_only).instances
    assert sorted(i.label for i in plain) == sorted(i.label for i in got)
    assert all(i.polygons is None and i.rle is None for i in plain)


def test_conversion_is_cached(default_build, realistic, env, cache_dir):
    _, first_log = default_build
    assert any("converting" in message for message in first_log), first_log  # the fixture converted
    graphs = sorted(p.name for p in cache_dir.glob("*.xml"))
    key = graph_cache_key(state_dict_sha256(torch.load(realistic, weights_only=True)), WINOGRAD)
    assert f"maskrcnn-backbone-rpn-{key}.xml" in graphs  # made once, by the `default` fixture
    bin_file = cache_dir / f"maskrcnn-backbone-rpn-{key}.bin"
    before = bin_file.stat().st_mtime_ns
    with logged() as messages:
        again = Detector.from_settings(settings_for(realistic, SCORE_THRESHOLD=LOW_THRESHOLD, **env))
    assert again.mode == "exact"
    assert messages, "nothing logged: the log is not captured"
    assert not any("converting" in message for message in messages), messages
    assert sorted(p.name for p in cache_dir.glob("*.xml")) == graphs
    assert bin_file.stat().st_mtime_ns == before


def test_fast_mode_only_when_asked(realistic, env, default):
    import openvino

    assert default.mode != "fast"
    with logged(level=logging.WARNING) as warnings:
        fast = Detector.from_settings(settings_for(realistic, DETECT_MODE="fast",
                                                   SCORE_THRESHOLD=SERVICE_THRESHOLD, **env))
    eager = Detector.from_settings(settings_for(realistic, DETECT_MODE="eager",
                                                SCORE_THRESHOLD=SERVICE_THRESHOLD, **env))
    image = photo_like(*CALIBRATION_IMAGE)
    want, got = eager.detect(image), fast.detect(image)
    assert want
    if accel.bf16_supported(openvino.Core()):
        assert fast.mode == "fast"
        # bf16 answers deviate from eager's, but they are answers of the same model
        assert set(got) <= set(ACTIVE_CLASSES)
        assert dice_score(want, got) >= 0.6, (want, got)
    else:
        assert fast.mode == "exact"
        assert any("no bf16 support" in message for message in warnings), warnings
        assert got == want  # the exact path: eager's answers


def test_box_roi_align_in_channel_blocks_is_torchvision_bit_for_bit(default):
    """The exact path pools in channel blocks over threads; every value must be torchvision's."""
    accelerated = default.model
    pool = accelerated.model.roi_heads.box_roi_pool
    torch.manual_seed(11)
    height, width = 800, 1088
    features = {name: torch.randn(1, 256, height // stride, width // stride)
                for name, stride in (("0", 4), ("1", 8), ("2", 16), ("3", 32))}
    corners = torch.rand(1000, 2) * torch.tensor([width - 20.0, height - 20.0])
    sizes = torch.rand(1000, 2) * 400 + 4  # from a few pixels (P2) to hundreds (P5)
    boxes = torch.cat([corners, (corners + sizes).minimum(torch.tensor([width, height]))], dim=1)
    image_shapes = [(height, width)]
    pool.scales = pool.map_levels = None  # set up afresh for these feature shapes
    with torch.inference_mode():
        got = accelerated._box_roi_align(features, [boxes], image_shapes)
        want = pool(features, [boxes], image_shapes)
    assert got.shape == want.shape == (1000, 256, 7, 7)
    assert torch.equal(got, want)
