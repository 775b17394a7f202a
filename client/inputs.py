"""The client's inputs: URLs and local files, as given on the command line, in ``--file`` lists
and ``--csv`` columns, and their planning into batches."""

from __future__ import annotations

import contextlib
import csv
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# The service takes at most MAX_UPLOAD_BYTES (default 32 MiB) per request body: a batch whose
# files add up to more is cut here, so that a folder of large photos is not refused whole.
UPLOAD_BYTES_PER_BATCH = 16 * 1024 * 1024

_URL = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True)
class Input:
    """One image to detect in, as the user named it."""

    position: int  # across the whole run: the ``index`` of its output line
    text: str  # the URL or path as given
    path: Path | None  # the local file to upload; None for a URL


def classify(position: int, text: str) -> Input:
    """An http(s) URL is fetched by the service; anything else names a local file to upload (a
    missing one fails on its own when its batch is read, so the other inputs still run)."""
    return Input(position, text, None if _URL.match(text) else Path(text))


def lines_of(path: str) -> list[str]:
    """The inputs of a ``--file``: one a line; blank lines and lines starting with ``#`` skipped
    (only whole lines: a URL may contain ``#``)."""
    with _open_text(path) as handle:
        stripped = (line.strip() for line in handle)
        return [line for line in stripped if line and not line.startswith("#")]


def column_of(path: str, column: str) -> list[str]:
    """The non-empty cells of ``column`` (by its header) in a CSV file."""
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            found = ", ".join(reader.fieldnames or []) or "none"
            raise ValueError(f"{path} has no column {column!r} (columns: {found})")
        cells = ((row.get(column) or "").strip() for row in reader)
        return [cell for cell in cells if cell]


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdin
    else:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark, which would join the header
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield handle


def plan_batches(
    inputs: Sequence[Input], size: int, upload_budget: int = UPLOAD_BYTES_PER_BATCH
) -> Iterator[list[Input]]:
    """Consecutive runs of at most ``size`` inputs whose files add up to at most ``upload_budget``
    bytes (a larger file goes alone; the service judges it)."""
    batch: list[Input] = []
    uploaded = 0
    for item in inputs:
        nbytes = _file_size(item.path) if item.path is not None else 0
        if batch and (len(batch) == size or uploaded + nbytes > upload_budget):
            yield batch
            batch, uploaded = [], 0
        batch.append(item)
        uploaded += nbytes
    if batch:
        yield batch


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # unreadable: fails when read, without taking room in the batch
