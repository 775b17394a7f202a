"""Where the weights come from, and the torchvision architecture they are loaded into.

Weights come from exactly one source, chosen by configuration:
- ``WEIGHTS_FILE`` unset: torchvision's ``MaskRCNN_ResNet50_FPN_Weights.COCO_V1`` through its
  weights API and the torch hub cache (downloaded on first use where there is internet);
- ``WEIGHTS_FILE=/path``: a local state-dict file, checked against ``WEIGHTS_SHA256`` if set.
Anything else (missing, corrupt, wrong checksum, wrong architecture) raises ``ModelLoadError``;
the model is never served with untrained weights.

The class names are COCO's, or those of ``LABELS_FILE`` for a fine-tuned model; either way their
number must match the checkpoint's box head (``categories_for``), or the model is not loaded.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

from common.config import Settings
from common.errors import ModelLoadError

StateDict = dict[str, torch.Tensor]

COCO_WEIGHTS = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
COCO_CATEGORIES: list[str] = list(COCO_WEIGHTS.meta["categories"])
BACKGROUND = "__background__"  # index 0 of every torchvision detection head
PLACEHOLDERS = (BACKGROUND, "N/A")  # COCO's unused indices are named "N/A"
CLASSIFIER_WEIGHT = "roi_heads.box_predictor.cls_score.weight"


def reportable(categories: list[str]) -> list[str]:
    """The names the model can report, once each, without placeholders."""
    return list(dict.fromkeys(name for name in categories if name not in PLACEHOLDERS))


def head_classes(state_dict: StateDict) -> int:
    """How many classes (background included) the checkpoint's box head scores."""
    weight = state_dict.get(CLASSIFIER_WEIGHT)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ModelLoadError(
            f"the weights are not a maskrcnn_resnet50_fpn state dict (no {CLASSIFIER_WEIGHT})"
        )
    return int(weight.shape[0])


def read_labels(path: str) -> list[str]:
    """The names in a labels file: a JSON list of strings (``.json``), or one name per line."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"LABELS_FILE={path} cannot be read: {exc}") from None
    if path.endswith(".json"):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise ModelLoadError(f"LABELS_FILE={path} is not valid JSON: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ModelLoadError(f"LABELS_FILE={path} must hold a JSON list of strings")
        names = [name.strip() for name in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(names):
        raise ModelLoadError(f"LABELS_FILE={path} holds no names (or an empty one)")
    real = [name for name in names if name not in PLACEHOLDERS]
    if len(set(real)) != len(real):
        raise ModelLoadError(f"LABELS_FILE={path} names a class twice: names must be unique")
    return names


def categories_for(settings: Settings, num_classes: int) -> list[str]:
    """The name of each class index of a head with ``num_classes`` classes (index 0: background)."""
    if not settings.labels_file:
        if num_classes != len(COCO_CATEGORIES):
            raise ModelLoadError(
                f"the checkpoint's box head has {num_classes} classes, not COCO's {len(COCO_CATEGORIES)}: "
                f"set LABELS_FILE to a file naming its {num_classes - 1} classes, one per line"
            )
        return COCO_CATEGORIES
    names = read_labels(settings.labels_file)
    if len(names) == num_classes - 1 and names[0] != BACKGROUND:
        names = [BACKGROUND, *names]  # the usual labels file leaves the background out
    if len(names) != num_classes:
        raise ModelLoadError(
            f"LABELS_FILE={settings.labels_file} has {len(names)} names, but the checkpoint's box head "
            f"has {num_classes} classes (background included): list its {num_classes - 1} classes, "
            "one per line, in the order of the head"
        )
    return names


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: StateDict) -> str:
    """A digest of the tensors themselves (names, dtypes, shapes, bytes), whatever the file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hub_checkpoint_path() -> str:
    """Where torchvision's weights API keeps the COCO_V1 file in the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(COCO_WEIGHTS.url))


def load_state_dict(settings: Settings) -> StateDict:
    """The configured weights as a state dict (tensors memory-mapped where they come from a file)."""
    if settings.weights_file:
        return _state_dict_from_file(settings.weights_file, settings.weights_sha256)
    return _state_dict_from_torchvision()


def _state_dict_from_file(path: str, expected_sha256: str) -> StateDict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"WEIGHTS_FILE={path} does not exist or is not a file")
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ModelLoadError(
                f"WEIGHTS_FILE={path} has sha256 {actual}, but WEIGHTS_SHA256 expects "
                f"{expected_sha256}: replace the file or fix WEIGHTS_SHA256"
            )
    try:
        # mmap: the tensors stay in the page cache, shared by every process that loads the file
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ModelLoadError(
            f"WEIGHTS_FILE={path} is not a readable PyTorch state dict (truncated or corrupt?): {exc}"
        ) from None
    for wrapper_key in ("model", "state_dict"):  # common training-checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper_key), dict):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"WEIGHTS_FILE={path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _state_dict_from_torchvision() -> StateDict:
    cached = hub_checkpoint_path()
    if os.path.isfile(cached):
        # What get_state_dict would load (its hash is checked when it is downloaded), but mapped
        # into memory so that every process of the stack shares its pages.
        try:
            return torch.load(cached, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - let torchvision's own loader report the problem
            pass
    try:
        return COCO_WEIGHTS.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - network, hash and file errors alike
        raise ModelLoadError(
            "torchvision's COCO_V1 weights are not in the torch hub cache "
            f"({hub_checkpoint_path()}) and could not be downloaded ({exc}). Set WEIGHTS_FILE to a "
            "local maskrcnn_resnet50_fpn state-dict file, or place the file at that path. Offline, "
            "to try the service: python -m testkit.make_checkpoint /tmp/try.pt person writes a "
            "checkpoint of the real architecture that answers 'person' (README, 'Weights')"
        ) from None


def build_model(state_dict: StateDict, score_threshold: float, num_classes: int | None = None) -> MaskRCNN:
    """The torchvision architecture with ``state_dict`` loaded strictly, in eval mode; its head has
    ``num_classes`` classes (default: as many as the checkpoint's)."""
    num_classes = num_classes or head_classes(state_dict)
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        box_score_thresh=score_threshold,
    )
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the weights do not fit maskrcnn_resnet50_fpn with {num_classes} classes: {str(exc)[:300]}"
        ) from None
    return model.eval()
