"""What the client prints: each input's outcome as a plain line or a JSON line, and the progress bar."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from client.inputs import Input
from client.transport import Failure

# Below this many inputs a bar only flickers.
PROGRESS_MIN_INPUTS = 11


@dataclass
class Outcome:
    """What became of one input: its detection (the API's JSON) or its failure."""

    input: Input
    detection: dict[str, Any] | None = None
    error: Failure | None = None
    annotated: Path | None = None

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"input": self.input.text, "index": self.input.position}
        if self.error is not None:
            answer["error"] = {"code": self.error.code, "message": self.error.message}
            return answer
        assert self.detection is not None
        answer.update(self.detection)
        if self.annotated is not None:
            answer["annotated"] = str(self.annotated)
        return answer


class Report:
    """Prints each outcome as it comes: plain lines (errors on stderr) or JSON lines. With a
    progress bar, lines go through tqdm so that they do not tear it."""

    def __init__(self, json_lines: bool, boxes: bool, progress: Any = None):
        self.json_lines = json_lines
        self.boxes = boxes
        self.progress = progress
        self.failed = False

    def outcome(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.failed = True
        if self.json_lines:
            self._write(json.dumps(outcome.as_json()), sys.stdout)
        elif outcome.error is not None:
            self._write(
                f"{outcome.input.text}\terror: {outcome.error.code}: {outcome.error.message}", sys.stderr
            )
        else:
            self._write(self._plain(outcome), sys.stdout)
        if self.progress is not None:
            self.progress.update(1)

    def warning(self, text: str) -> None:
        """A problem besides the detections (an annotation that could not be made): stderr, exit 1."""
        self.failed = True
        self._write(f"instance-detector: {text}", sys.stderr)

    def _plain(self, outcome: Outcome) -> str:
        assert outcome.detection is not None
        instances = outcome.detection["instances"]
        lines = [f"{outcome.input.text}\t{', '.join(item['label'] for item in instances) or '(none)'}"]
        if self.boxes:
            for item in instances:
                box = ", ".join(f"{value:.1f}" for value in item["box"])
                lines.append(f"    {item['label']} {item['score']:.2f} [{box}]{self._mask_note(item)}")
        return "\n".join(lines)

    @staticmethod
    def _mask_note(item: dict[str, Any]) -> str:
        mask = item.get("mask")
        if mask is None:
            return ""
        parts = []
        if "polygons" in mask:
            count = len(mask["polygons"])
            parts.append(f"{count} polygon{'s' if count != 1 else ''}")
        if "rle" in mask:
            parts.append("rle")
        return f" mask: {', '.join(parts)}"

    def _write(self, text: str, stream: TextIO) -> None:
        if self.progress is not None:
            self.progress.write(text, file=stream)
            stream.flush()
        else:
            print(text, file=stream, flush=True)  # flushed: a pipe sees each result as it arrives


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Any]:
    """A tqdm bar on stderr when someone watches it (a terminal) and the run is long enough."""
    if total < PROGRESS_MIN_INPUTS or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

    with tqdm(total=total, file=sys.stderr, unit="image") as bar:
        yield bar
