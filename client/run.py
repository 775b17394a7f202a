"""The run: each planned batch read, sent through a transport, and every input reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import requests

from client.annotate import annotated_name, draw_detections
from client.inputs import Input
from client.output import Outcome, Report
from client.transport import CONNECT_TIMEOUT, Failure, Options, ServiceError, Transport


@dataclass
class Batch:
    """A planned batch with its files read: what is sent, in the service's numbering, and the
    inputs that failed before sending."""

    urls: list[Input] = field(default_factory=list)
    uploads: list[tuple[Input, bytes]] = field(default_factory=list)
    unreadable: list[Outcome] = field(default_factory=list)

    @classmethod
    def read(cls, inputs: list[Input]) -> Batch:
        batch = cls()
        for item in inputs:
            if item.path is None:
                batch.urls.append(item)
                continue
            try:
                batch.uploads.append((item, item.path.read_bytes()))
            except OSError as exc:
                reason = exc.strerror or str(exc)
                batch.unreadable.append(
                    Outcome(item, error=Failure("unreadable_file", f"{reason} (and not an http(s) URL)"))
                )
        return batch

    @property
    def sent(self) -> list[Input]:
        return self.urls + [item for item, _ in self.uploads]

    def upload_bytes(self, item: Input) -> bytes | None:
        return next((data for upload, data in self.uploads if upload is item), None)


class Runner:
    def __init__(
        self,
        transport: Transport,
        options: Options,
        report: Report,
        annotate: Path | None,
        total: int,
        timeout: float,
    ):
        self.transport = transport
        self.options = options
        self.report = report
        self.annotate = annotate
        self.total = total
        self.timeout = timeout

    def run_batch(self, inputs: list[Input]) -> None:
        """Send one batch and report every input; ServiceError when the batch as a whole fails."""
        batch = Batch.read(inputs)
        for outcome in batch.unreadable:
            self.report.outcome(outcome)
        sent = batch.sent
        if not sent:
            return
        pending = set(range(len(sent)))
        results = self.transport.detect_batch(
            [item.text for item in batch.urls],
            [(item.path.name if item.path else "image", data) for item, data in batch.uploads],
            self.options,
        )
        for index, result in results:
            if index not in pending:
                raise ServiceError(f"the service answered image {index} of {len(sent)} twice or out of range")
            pending.discard(index)
            item = sent[index]
            if isinstance(result, Failure):
                self.report.outcome(Outcome(item, error=result))
            else:
                self.report.outcome(self._with_annotation(Outcome(item, detection=result), batch))
        if pending:
            raise ServiceError(f"the answer ended without {len(pending)} of the batch's {len(sent)} results")

    def _with_annotation(self, outcome: Outcome, batch: Batch) -> Outcome:
        if self.annotate is None:
            return outcome
        assert outcome.detection is not None
        from PIL import Image

        item = outcome.input
        target = self.annotate / annotated_name(item, self.total)
        try:
            data = batch.upload_bytes(item)
            if data is None:  # a URL: the service fetched it, so fetch it again to draw on it
                response = requests.get(item.text, timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout))
                response.raise_for_status()
                data = response.content
            draw_detections(data, outcome.detection["instances"]).save(target)
        # Pillow raises OSError (UnidentifiedImageError), ValueError or DecompressionBombError for bad images
        except (OSError, ValueError, Image.DecompressionBombError, requests.RequestException) as exc:
            self.report.warning(f"{item.text}: cannot write the annotated copy: {exc}")
            return outcome
        outcome.annotated = target
        return outcome
