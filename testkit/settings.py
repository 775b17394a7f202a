"""``settings_for``: the service's ``Settings`` as a process would read them from its environment."""

from __future__ import annotations

import os
from collections.abc import Iterable

from common.config import SETTINGS, Settings


def settings_for(weights=None, *, inherit: Iterable[str] = (), **env) -> Settings:
    """``Settings.from_env`` on an environment holding only ``WEIGHTS_FILE=weights`` (if given),
    the variables of ``inherit`` that are set in this process's environment, and ``env``: keywords
    named like the variables (``DETECT_MODE="eager"``, ``SCORE_THRESHOLD=0.05``), any value
    (``str()`` is applied; ``None`` leaves the variable unset). Everything else is at its default,
    whatever this process's environment holds, and values are checked as at a process start."""
    known = {setting.env for setting in SETTINGS}
    unknown = (set(env) | set(inherit)) - known
    if unknown:
        raise ValueError(f"not variables of common.config: {sorted(unknown)}")
    values = {name: os.environ[name] for name in inherit if name in os.environ}
    if weights is not None:
        values["WEIGHTS_FILE"] = str(weights)
    values.update({name: str(value) for name, value in env.items() if value is not None})
    return Settings.from_env(values)
