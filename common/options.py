"""A full detection's options as clients send them (JSON values, form fields, query parameters or
protobuf fields), checked in one place for both servers (docs/api.md, "Options")."""

from __future__ import annotations

import math
from collections.abc import Iterable

from common.config import Settings
from common.errors import InvalidRequest
from common.model.detection import MASK_FORMATS, DetectOptions

OPTION_NAMES = ("threshold", "classes", "masks")
MAX_CLASSES = 1000
MAX_CLASS_NAME = 200


def reject_unknown(names: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """InvalidRequest naming the fields or parameters a route does not take (a typo such as
    ``treshold`` must not be ignored silently)."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise InvalidRequest(
            f"unknown {where} {', '.join(map(repr, unknown[:10]))}; expected: {', '.join(sorted(allowed))}"
        )


def parse_options(
    settings: Settings, threshold: object = None, classes: object = None, masks: object = None
) -> DetectOptions:
    """``DetectOptions`` from what a client sent (None: not sent); strings are accepted where a form
    or query string can only send strings."""
    return DetectOptions(_threshold(settings, threshold), _classes(classes), _masks(masks))


def _threshold(settings: Settings, value: object) -> float:
    if value is None or value == "":
        return settings.score_threshold
    if isinstance(value, str):
        text = value
        try:
            value = float(text)
        except ValueError:
            raise InvalidRequest(f"'threshold' must be a number, not {text[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest("'threshold' must be a number")
    low = min(settings.min_score_threshold, settings.score_threshold)
    if not low <= value <= 1:
        raise InvalidRequest(f"'threshold' must be from {low:g} (MIN_SCORE_THRESHOLD) to 1")
    return float(value)


def _classes(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(name, str) for name in value):
        raise InvalidRequest("'classes' must be a list of category names")
    names = tuple(dict.fromkeys(name.strip() for name in value if name.strip()))
    if len(names) > MAX_CLASSES or any(len(name) > MAX_CLASS_NAME for name in names):
        raise InvalidRequest(
            f"'classes' may name at most {MAX_CLASSES} classes of at most {MAX_CLASS_NAME} characters"
        )
    return names


def _masks(value: object) -> str:
    if value is None or value == "":
        return "none"
    if not isinstance(value, str) or value.strip().lower() not in MASK_FORMATS:
        raise InvalidRequest(f"'masks' must be one of {', '.join(MASK_FORMATS)}")
    return value.strip().lower()
