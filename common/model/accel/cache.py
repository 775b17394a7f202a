"""The converted graphs on disk: one per (weights, tool versions, Winograd places), made once.

The stack's processes may start together: one converts under a file lock while the others wait
and reuse its result; a graph is written under a temporary name and renamed, so nobody reads a
half-written file. The ``CACHE_KEEP`` most recently used conversions are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
import torchvision

from common.model.accel.backend import openvino_module
from common.model.accel.graph import WINOGRAD_STRIPS, convert

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # bump when what the converted graph computes, or its inputs/outputs, change
CACHE_KEEP = 4  # conversions kept in the cache directory (each about the size of the weights)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "instance-detector")


def graph_cache_key(weights_sha256: str, winograd=()) -> str:
    """Names a converted graph: what it computes and with which versions of the tools."""
    return hashlib.sha256(
        "|".join(
            (
                CACHE_FORMAT,
                weights_sha256,
                torch.__version__,
                torchvision.__version__,
                openvino_module().__version__,
                "winograd=" + ",".join(winograd),
                f"strips={sorted((place, n) for place, n in WINOGRAD_STRIPS.items() if place in winograd)}",
            )
        ).encode()
    ).hexdigest()[:24]


def converted_graph_path(model, weights_sha256: str, cache_dir: str, winograd=()) -> Path:
    """The OpenVINO IR (.xml + .bin) of backbone+FPN+RPN head, converted once and cached."""
    key = graph_cache_key(weights_sha256, winograd)
    directory = Path(cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"instance-detector-cache-{os.getuid()}"
        log.warning(
            "ACCEL_CACHE_DIR %s unusable (%s); caching the conversion in %s instead", directory, exc, fallback
        )
        directory = fallback
        directory.mkdir(parents=True, exist_ok=True)
    xml = directory / f"maskrcnn-backbone-rpn-{key}.xml"
    if xml.exists() and xml.with_suffix(".bin").exists():
        os.utime(xml)  # most recently used: kept by _prune
        return xml
    # One converter at a time (the stack's processes start together); the others wait and reuse.
    with open(directory / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (xml.exists() and xml.with_suffix(".bin").exists()):
            convert(model, xml, winograd)
            _prune(directory, keep=CACHE_KEEP, current=xml)
    return xml


def _prune(directory: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` most recently used conversions (each is the size of the weights)."""
    graphs = sorted(
        directory.glob("maskrcnn-backbone-rpn-*.xml"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in graphs[keep:]:
        if old != current:
            for path in (old, old.with_suffix(".bin")):
                path.unlink(missing_ok=True)
