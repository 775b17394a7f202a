"""Comparing two detectors' answers for the same image, as the same-answers criterion reads:
labels equal, scores within 1e-3, boxes within 0.5 px.

Detections are paired, not compared index by index: torchvision orders them by score, so two
detections whose scores differ by less than float rounding (it happens: same class, scores 6e-6
apart) may trade places between two correct implementations; and a detection scored 0.750003 by
one and 0.749998 by the other is kept by only one of them at threshold 0.75, which is a deviation
of 5e-6, not a different answer.
"""

from __future__ import annotations

from collections import Counter

from client.evaluate import dice_score

SCORE_TOLERANCE = 1e-3
BOX_TOLERANCE_PX = 0.5
SAME_OBJECT_IOU = 0.5  # two detections of one label overlapping this much are paired


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 for two empty boxes)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def as_lists(raw: dict) -> tuple[list, list, list]:
    """(labels, scores, boxes) lists from a detector's raw answer (``Detector.detect_raw``)."""
    return raw["labels"].tolist(), raw["scores"].tolist(), raw["boxes"].tolist()


def compare(reference, candidate, threshold: float | None = None) -> dict:
    """``reference`` and ``candidate``: (labels, scores, boxes) lists (scores/boxes may be None);
    ``threshold``: the score threshold both ran with, if any.

    Returns the course's Dice, the counts, whether the label multisets are equal and, where scores
    are known, the largest score and box deviations over paired detections. Pairs are made closest
    boxes first, between detections of the same label that are the same object (boxes within the
    box tolerance, or IoU >= 0.5). A detection left without a partner whose score is within the
    score tolerance of ``threshold`` is "borderline": the other side scored it a hair below the
    threshold, which is a deviation within tolerance, not a different answer. ``same_answers``
    applies the tolerances."""
    ref_labels, ref_scores, ref_boxes = reference
    labels, scores, boxes = candidate
    result = {"dice": dice_score(ref_labels, labels), "labels_equal": Counter(ref_labels) == Counter(labels),
              "kept_ref": len(ref_labels), "kept": len(labels)}
    if scores is None or ref_scores is None:
        result["same_answers"] = None
        return result

    candidates = []  # (box distance, i, j) for same-label detections of the same object
    for i, label in enumerate(ref_labels):
        for j, other in enumerate(labels):
            if other == label:
                distance = max(abs(x - y) for x, y in zip(ref_boxes[i], boxes[j], strict=True))
                if distance <= BOX_TOLERANCE_PX or iou(ref_boxes[i], boxes[j]) >= SAME_OBJECT_IOU:
                    candidates.append((distance, i, j))
    candidates.sort()
    ref_free, cand_free = set(range(len(ref_labels))), set(range(len(labels)))
    score_dev = box_dev = 0.0
    for distance, i, j in candidates:
        if i in ref_free and j in cand_free:
            ref_free.discard(i)
            cand_free.discard(j)
            score_dev = max(score_dev, abs(ref_scores[i] - scores[j]))
            box_dev = max(box_dev, distance)
    unpaired = [ref_scores[i] for i in ref_free] + [scores[j] for j in cand_free]
    borderline = [score for score in unpaired
                  if threshold is not None and abs(score - threshold) <= SCORE_TOLERANCE]
    result.update(max_score_dev=score_dev, max_box_dev_px=box_dev, unpaired=len(unpaired),
                  borderline=len(borderline))
    result["same_answers"] = (len(borderline) == len(unpaired) and score_dev <= SCORE_TOLERANCE
                              and box_dev <= BOX_TOLERANCE_PX)
    return result
