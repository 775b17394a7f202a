"""Real-architecture ``maskrcnn_resnet50_fpn`` state dicts with seeded weights, saved with
``torch.save``, for where the true COCO_V1 weights cannot be had.

- forced-class checkpoints (``make_forced_checkpoint``): one box of one chosen class whatever the
  image; they prove which file was loaded and that label indices map to the right names (the
  tests, ``python -m testkit.make_checkpoint``);
- realistic checkpoints (``make_realistic_checkpoint``, ``cached_checkpoint``): a few classes
  whose scores vary from proposal to proposal, so that at the service's threshold (0.75) a handful
  of boxes per photo survive and at a low threshold many do (the benchmark, the same-answers tests).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The two classes of the test suite's forced checkpoints (any two COCO names would do).
CLASS_A = "kite"
CLASS_B = "giraffe"

# COCO names of the classes that get a spread-out score in a realistic checkpoint (the others,
# background included, get a constant logit of 0, so they never pass a threshold of 0.75).
ACTIVE_CLASSES = ("person", "car", "dog", "chair", "bottle", "kite")
LOGIT_SPREAD = 2.0  # std of an active class's logit across proposals, after scaling


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_forced_checkpoint(path, category: str, seed: int = 0, categories: list[str] | None = None) -> str:
    """Save a seeded maskrcnn_resnet50_fpn state dict that answers exactly ``[category]``, with a
    head of ``len(categories)`` classes (default: COCO's 91; index 0 is the background).

    The box classifier's weights are zeroed and its bias strongly favours one class, so every
    box gets that label: the answer proves which file was loaded and that label indices map to
    the right names. The RPN's box regression grows every anchor past the image, so all
    proposals clip to the whole image, and the box head's regression is zeroed, so NMS leaves
    one box: one detection, whatever the image, and fast tests. The mask predictor answers
    "inside" everywhere, so the mask fills the box. Everything else keeps its seeded random
    values. Returns the file's sha256.
    """
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from common.model.weights import COCO_CATEGORIES

    categories = categories or COCO_CATEGORIES
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(categories))
    classifier = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(-10.0)
        classifier.bias[categories.index(category)] = 10.0
        mask_logits = model.roi_heads.mask_predictor.mask_fcn_logits
        mask_logits.weight.zero_()
        mask_logits.bias.fill_(10.0)
        rpn_deltas = model.rpn.head.bbox_pred
        rpn_deltas.weight.zero_()
        rpn_deltas.bias.zero_()
        rpn_deltas.bias.view(-1, 4)[:, 2:] = 10.0  # (dx, dy, dw, dh): widen and heighten a lot
        box_deltas = model.roi_heads.box_predictor.bbox_pred
        box_deltas.weight.zero_()  # and again in the box head: every final box is the whole image
        box_deltas.bias.zero_()
        box_deltas.bias.view(-1, 4)[:, 2:] = 10.0
    torch.save(model.state_dict(), path)
    return _sha256(path)


def calibration_images():
    from testkit.images import image_set

    return [image for _, image in image_set()]


def make_realistic_checkpoint(path, seed: int = 0, target_boxes: int = 5, images=None) -> str:
    """Write a realistic checkpoint to ``path``; returns its sha256. ``images``: PIL images to
    calibrate on (default: the benchmark's own set).

    How: seeded random initialisation (torchvision's own initialisers), then for the
    ``ACTIVE_CLASSES`` the box classifier's weight rows are scaled up (so their logits spread across
    proposals) and their bias is tuned on ``images`` so that on average about ``target_boxes``
    detections per image pass 0.75. The tuning replays only the box predictor and torchvision's own
    ``postprocess_detections`` on the features of one forward pass per image, so it takes about
    ten seconds."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.transforms.functional import pil_to_tensor

    from common.model.weights import COCO_CATEGORIES

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
                                            captured["image_shapes"], strict=True):
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
    return _sha256(path)


def cached_checkpoint(directory, seed: int = 0, target_boxes: int = 5) -> Path:
    """The realistic checkpoint for (seed, target_boxes) under ``directory``, made once."""
    path = Path(directory) / f"realistic-seed{seed}-boxes{target_boxes}.pt"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        make_realistic_checkpoint(tmp, seed, target_boxes)
        tmp.replace(path)
    return path
