"""Seeded maskrcnn_resnet50_fpn checkpoints whose kept boxes per image are realistic.

The forced-class checkpoints of ``tests.helpers`` answer one box of one class whatever the
image; a benchmark needs something closer to the real weights: a few classes whose scores vary
from proposal to proposal, so that at the service's threshold (0.75) a handful of boxes per
photo survive, and at a low threshold many do (the same-answers tests compare those).

How: seeded random initialisation (torchvision's own initialisers), then for a few classes the
box classifier's weight rows are scaled up (so their logits spread across proposals) and their
bias is tuned on the benchmark's images so that on average about ``target_boxes`` detections per
image pass 0.75. The
tuning replays only the box predictor and torchvision's own ``postprocess_detections`` on the
features of one forward pass per image, so it takes about ten seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# COCO names of the classes that get a spread-out score (the others, background included, get a
# constant logit of 0).
ACTIVE_CLASSES = ("person", "car", "dog", "chair", "bottle", "kite")
LOGIT_SPREAD = 2.0  # std of an active class's logit across proposals, after scaling


def calibration_images():
    from bench.images import image_set

    return [image for _, image in image_set()]


def make_realistic_checkpoint(path, seed: int = 0, target_boxes: int = 5, images=None) -> str:
    """Write the state dict to ``path``; returns its sha256. ``images``: PIL images to calibrate
    on (default: the benchmark's own set)."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.transforms.functional import pil_to_tensor

    from common.detector import COCO_CATEGORIES

    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                  num_classes=len(COCO_CATEGORIES), box_score_thresh=0.75).eval()
    active = [COCO_CATEGORIES.index(name) for name in ACTIVE_CLASSES]
    predictor = model.roi_heads.box_predictor
    captured = {"x": [], "proposals": [], "image_shapes": []}

    def grab(module, inputs, output):
        captured["x"].append(inputs[0].detach().clone())

    handle = predictor.register_forward_hook(grab)
    roi_heads = model.roi_heads
    original_post = roi_heads.postprocess_detections

    def grab_post(class_logits, box_regression, proposals, image_shapes):
        captured["proposals"].append([p.clone() for p in proposals])
        captured["image_shapes"].append(list(image_shapes))
        return original_post(class_logits, box_regression, proposals, image_shapes)

    roi_heads.postprocess_detections = grab_post
    images = list(images) if images is not None else calibration_images()
    with torch.inference_mode():
        for image in images:
            model([pil_to_tensor(image).float().div_(255.0)])
    handle.remove()
    del roi_heads.postprocess_detections

    with torch.no_grad():  # scale each active row so its logit spreads by LOGIT_SPREAD
        x = torch.cat(captured["x"])
        inactive = [i for i in range(len(COCO_CATEGORIES)) if i not in active]
        predictor.cls_score.weight[inactive] = 0.0  # constant logit 0: background and the rest
        predictor.cls_score.bias[inactive] = 0.0
        for index in active:
            row = predictor.cls_score.weight[index]
            spread = float((x @ row).std())
            row *= LOGIT_SPREAD / max(spread, 1e-12)
        # centre each active logit (mean 0 across proposals); the common offset is tuned below
        centre = -(x @ predictor.cls_score.weight[active].T).mean(0)

    def kept(bias: float) -> int:
        with torch.no_grad():
            predictor.cls_score.bias[active] = centre + bias
            total = 0
            for x, proposals, shapes in zip(captured["x"], captured["proposals"],
                                            captured["image_shapes"]):
                _, scores, _ = roi_heads.postprocess_detections(
                    predictor.cls_score(x), predictor.bbox_pred(x), proposals, shapes)
                total += int(scores[0].numel())
        return total

    low, high = -20.0, 40.0  # kept(low) small, kept(high) large
    for _ in range(40):
        middle = (low + high) / 2
        if kept(middle) > target_boxes * len(images):
            high = middle
        else:
            low = middle
    kept(low)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_checkpoint(directory, seed: int = 0, target_boxes: int = 5) -> Path:
    """The checkpoint for (seed, target_boxes) under ``directory``, made once."""
    path = Path(directory) / f"realistic-seed{seed}-boxes{target_boxes}.pt"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        make_realistic_checkpoint(tmp, seed, target_boxes)
        tmp.replace(path)
    return path
