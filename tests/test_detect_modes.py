"""The detect modes (common/accel.py): the default path answers exactly what torchvision's eager
model answers, the fast mode runs only when asked for, conversions are cached.

Real models throughout: a seeded checkpoint with realistic score spread (bench/checkpoint.py),
compared at a low threshold so that many boxes (up to torchvision's 100) are compared.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torchvision.models.detection import MaskRCNN

from bench.checkpoint import make_realistic_checkpoint
from bench.compare import as_lists, compare
from bench.images import photo_like
from common import accel
from common.config import ConfigError, Settings
from common.cpugate import CpuGate
from common.detector import Detector

LOW_THRESHOLD = 0.05


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    path = tmp_path_factory.mktemp("realistic") / "realistic.pt"
    make_realistic_checkpoint(path, seed=3, target_boxes=5, images=[photo_like(640, 480, seed=21)])
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("accel-cache")


def settings(path, cache_dir, mode=None, threshold=LOW_THRESHOLD, **extra):
    env = {"WEIGHTS_FILE": str(path), "SCORE_THRESHOLD": str(threshold),
           "ACCEL_CACHE_DIR": str(cache_dir), "RUN_DIR": str(cache_dir / "run"), **extra}
    if mode is not None:
        env["DETECT_MODE"] = mode
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def eager(realistic, cache_dir):
    return Detector.from_settings(settings(realistic, cache_dir, "eager"))


@pytest.fixture(scope="module")
def default(realistic, cache_dir):
    return Detector.from_settings(settings(realistic, cache_dir))  # DETECT_MODE unset


def test_modes_config():
    assert Settings().detect_mode == "exact"
    assert Settings.from_env({}).detect_mode == "exact"
    assert Settings.from_env({"DETECT_MODE": " Fast "}).detect_mode == "fast"
    assert Settings.from_env({"DETECT_MODE": "eager"}).detect_mode == "eager"
    with pytest.raises(ConfigError, match="DETECT_MODE"):
        Settings.from_env({"DETECT_MODE": "bf16"})
    with pytest.raises(ConfigError, match="ROI_ALIGN_THREADS"):
        Settings.from_env({"ROI_ALIGN_THREADS": "0"})
    assert Settings.from_env({}).winograd == 1
    assert Settings.from_env({"WINOGRAD": "0"}).winograd == 0
    with pytest.raises(ConfigError, match="WINOGRAD"):
        Settings.from_env({"WINOGRAD": "2"})


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


def test_exact_path_without_winograd_answers_like_eager_too(eager, default, realistic, cache_dir):
    assert default.model.winograd == accel.WINOGRAD
    direct = Detector.from_settings(settings(realistic, cache_dir, "exact", WINOGRAD="0"))
    assert direct.mode == "exact" and direct.model.winograd == ()
    image = photo_like(640, 480, seed=5)
    want, got = as_lists(eager.detect_raw(image)), as_lists(direct.detect_raw(image))
    assert len(want[0]) >= 50
    assert compare(want, got, threshold=LOW_THRESHOLD)["same_answers"]


def test_default_path_at_the_service_threshold(realistic, cache_dir):
    eager = Detector.from_settings(settings(realistic, cache_dir, "eager", threshold=0.75))
    exact = Detector.from_settings(settings(realistic, cache_dir, "exact", threshold=0.75))
    image = photo_like(640, 480, seed=21)  # the calibration image: about five kept boxes
    names = eager.detect(image)
    assert 1 <= len(names) <= 20
    assert exact.detect(image) == names


def test_conversion_is_cached(default, realistic, cache_dir, caplog):
    graphs = sorted(p.name for p in cache_dir.glob("*.xml"))
    key = accel.graph_cache_key(accel.state_dict_sha256(torch.load(realistic, weights_only=True)),
                                accel.WINOGRAD)
    assert f"maskrcnn-backbone-rpn-{key}.xml" in graphs  # made once, by the `default` fixture
    bin_file = cache_dir / f"maskrcnn-backbone-rpn-{key}.bin"
    before = bin_file.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="common.accel"):
        again = Detector.from_settings(settings(realistic, cache_dir))
    assert again.mode == "exact"
    assert "converting" not in caplog.text
    assert sorted(p.name for p in cache_dir.glob("*.xml")) == graphs
    assert bin_file.stat().st_mtime_ns == before


def test_fast_mode_only_when_asked(realistic, cache_dir, default, caplog):
    assert default.mode != "fast"
    with caplog.at_level(logging.WARNING, logger="common.accel"):
        fast = Detector.from_settings(settings(realistic, cache_dir, "fast", threshold=0.75))
    import openvino

    if accel.bf16_supported(openvino.Core()):
        assert fast.mode == "fast"
    else:
        assert fast.mode == "exact"
        assert "no bf16 support" in caplog.text
    assert isinstance(fast.detect(photo_like(320, 240, seed=2)), list)


def test_gate_is_exclusive_across_open_files(tmp_path):
    first, second = CpuGate(str(tmp_path / "gate.lock")), CpuGate(str(tmp_path / "gate.lock"))
    entered = threading.Event()

    def enter_second():
        with second:
            entered.set()

    with first:
        thread = threading.Thread(target=enter_second)
        thread.start()
        assert not entered.wait(0.5)
    assert entered.wait(10)
    thread.join(10)


def test_state_dict_digest_depends_on_values():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.zeros(3), "b": torch.tensor([1.0, 2.0])}
    assert accel.state_dict_sha256(a) == accel.state_dict_sha256(dict(reversed(list(a.items()))))
    assert accel.state_dict_sha256(a) != accel.state_dict_sha256(b)


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


def test_comparison_pairs_near_tied_detections_and_catches_real_differences():
    # two detections of one class whose scores differ by float rounding may trade places
    reference = ([44, 44, 1], [0.946547, 0.946541, 0.5], [[112.2, 262.8, 112.2, 333.0],
                                                          [125.3, 267.0, 125.3, 333.0],
                                                          [0.0, 0.0, 10.0, 10.0]])
    swapped = ([44, 44, 1], [0.946545, 0.946549, 0.5], [[125.3, 267.0, 125.3, 333.0],
                                                        [112.2, 262.8, 112.2, 333.0],
                                                        [0.0, 0.0, 10.0, 10.0]])
    assert compare(reference, swapped)["same_answers"]
    moved = (swapped[0], swapped[1], [swapped[2][0], swapped[2][1], [0.0, 0.0, 10.0, 10.7]])
    assert compare(reference, moved)["max_box_dev_px"] > 0.5
    assert not compare(reference, moved)["same_answers"]
    rescored = (swapped[0], [0.946545, 0.946549, 0.502], swapped[2])
    assert not compare(reference, rescored)["same_answers"]
    elsewhere = (swapped[0], swapped[1], [swapped[2][0], swapped[2][1], [300.0, 300.0, 310.0, 310.0]])
    result = compare(reference, elsewhere)  # a different object is not paired, whatever its label
    assert result["unpaired"] == 2 and result["max_box_dev_px"] < 0.5 and not result["same_answers"]
    relabelled = ([44, 44, 2], swapped[1], swapped[2])
    result = compare(reference, relabelled)
    assert not result["labels_equal"] and not result["same_answers"]
    assert result["dice"] == pytest.approx(2 * 2 / 6)


def test_comparison_tolerates_a_score_on_the_threshold_and_nothing_else():
    reference = ([18, 44], [0.97, 0.80], [[0.0, 0.0, 50.0, 50.0], [10.0, 10.0, 90.0, 60.0]])
    # the candidate scores a third detection 0.750003 where the reference had 0.749998 (not kept)
    candidate = ([18, 44, 18], [0.97, 0.80, 0.750003], reference[2] + [[5.0, 5.0, 20.0, 20.0]])
    result = compare(reference, candidate, threshold=0.75)
    assert result["same_answers"] and result["borderline"] == 1 and result["unpaired"] == 1
    assert not result["labels_equal"] and result["dice"] == pytest.approx(0.8)
    assert not compare(reference, candidate)["same_answers"]  # no threshold given: a difference
    far = ([18, 44, 18], [0.97, 0.80, 0.7520], candidate[2])
    assert not compare(reference, far, threshold=0.75)["same_answers"]
