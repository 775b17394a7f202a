"""Comparing two detectors' answers for the same image, as the same-answers criterion reads:
labels equal, scores within 1e-3, boxes within 0.5 px.

Detections are paired, not compared index by index: torchvision orders them by score, so two
detections whose scores differ by less than float rounding (it happens: same class, scores 6e-6
apart) may trade places between two correct implementations. Each reference detection is paired
with the candidate of the same label whose box is closest.
"""

from __future__ import annotations

from collections import Counter

from common.evaluate import dice_score

SCORE_TOLERANCE = 1e-3
BOX_TOLERANCE_PX = 0.5


def compare(reference, candidate) -> dict:
    """``reference`` and ``candidate``: (labels, scores, boxes) lists (scores/boxes may be None).

    Returns Dice, counts, whether the label multisets are equal and, where scores are known and
    every reference detection found a partner, the largest score and box deviations over pairs;
    ``same_answers`` applies the tolerances."""
    ref_labels, ref_scores, ref_boxes = reference
    labels, scores, boxes = candidate
    result = {"dice": dice_score(ref_labels, labels), "labels_equal": Counter(ref_labels) == Counter(labels),
              "kept_ref": len(ref_labels), "kept": len(labels)}
    if scores is None or ref_scores is None or not result["labels_equal"]:
        result["same_answers"] = False if scores is not None else None
        return result
    unpaired = set(range(len(labels)))
    score_dev = box_dev = 0.0
    for label, score, box in zip(ref_labels, ref_scores, ref_boxes):
        partner = min((j for j in unpaired if labels[j] == label),
                      key=lambda j: max(abs(x - y) for x, y in zip(box, boxes[j])))
        unpaired.discard(partner)
        score_dev = max(score_dev, abs(score - scores[partner]))
        box_dev = max(box_dev, max(abs(x - y) for x, y in zip(box, boxes[partner])))
    result["max_score_dev"], result["max_box_dev_px"] = score_dev, box_dev
    result["same_answers"] = score_dev <= SCORE_TOLERANCE and box_dev <= BOX_TOLERANCE_PX
    return result
