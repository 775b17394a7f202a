"""The same-answers comparison (testkit/compare.py) that the detect-mode tests and the benchmark
apply: pairs detections, tolerates float rounding and threshold hairs, catches real differences."""

import pytest

from testkit.compare import compare


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
