"""One record per request, kept by the data plane and turned into metrics and one log line.

Both servers open a record with ``Observer.request``; the pipeline fills in the image host, the
stage timings and the object count; when the block ends (answered or failed), the record is
observed once: the request histograms and counters, and one log line (JSON by default) with the
request id, protocol, image host, status, error code and reason, stage timings and object count.
Only the image's host is logged, never its URL: query strings may carry credentials.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from common import metrics
from common.errors import DetectionError

log = logging.getLogger("common.requests")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_QUERY = re.compile(r"\?[^\s'\"]*")


def request_id(offered: str | None) -> str:
    """The client's request id when it is a sane token (honoured), else a new one."""
    if offered and _REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    protocol: str
    request_id: str
    endpoint: str = "predict"  # predict, detect or detect_batch (one record per image)
    started: float = field(default_factory=time.perf_counter)
    image_host: str = ""
    stages: dict[str, float] = field(default_factory=dict)
    objects: int | None = None
    outcome: str = "ok"  # "ok" or the error code
    reason: str = ""
    in_flight_gauge: Any = None  # app_requests_in_flight{protocol}

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counted in ``app_requests_in_flight`` while the block runs (from admission to answer)."""
        if self.in_flight_gauge is None:
            yield
            return
        self.in_flight_gauge.inc()
        try:
            yield
        finally:
            self.in_flight_gauge.dec()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = time.perf_counter() - began


class Observer:
    """Records requests of one protocol; ``status_of`` names the protocol's status for an outcome
    (e.g. ``"503"`` or ``"UNAVAILABLE"``), as the adapter will answer it."""

    def __init__(self, protocol: str, status_of: Callable[[DetectionError | None], str]):
        self.protocol = protocol
        self.status_of = status_of
        self.metrics = metrics.request_metrics()
        self._in_flight = self.metrics.in_flight.labels(protocol=protocol)
        # exported at 0 from the start, so that rates and alerts on shedding have a series to read
        self.metrics.shed.labels(protocol=protocol)

    @contextmanager
    def request(self, offered_id: str | None = None, endpoint: str = "predict") -> Iterator[RequestRecord]:
        record = RequestRecord(
            self.protocol,
            request_id(offered_id),
            endpoint,
            in_flight_gauge=self._in_flight,
        )
        error: DetectionError | None = None
        try:
            yield record
        except DetectionError as exc:
            error = exc
            record.outcome, record.reason = exc.code, exc.message
            raise
        except Exception as exc:
            error = DetectionError("internal error")
            record.outcome, record.reason = "internal", repr(exc)
            raise
        finally:
            self._observe(record, self.status_of(error))

    def _observe(self, record: RequestRecord, status: str) -> None:
        duration = time.perf_counter() - record.started
        m = self.metrics
        m.duration.labels(protocol=record.protocol, outcome=record.outcome).observe(duration)
        m.requests.labels(protocol=record.protocol, endpoint=record.endpoint).inc()
        for stage, seconds in record.stages.items():
            m.stage_duration.labels(stage=stage).observe(seconds)
        if record.outcome != "ok":
            m.errors.labels(protocol=record.protocol, code=record.outcome).inc()
        if record.outcome == "overloaded":
            m.shed.labels(protocol=record.protocol).inc()
        if record.objects is not None:
            m.objects.observe(record.objects)
        fields = {
            "request_id": record.request_id,
            "protocol": record.protocol,
            "endpoint": record.endpoint,
            "image_host": record.image_host,
            "status": status,
            "code": record.outcome,
            "duration_seconds": round(duration, 4),
            "stages": {stage: round(seconds, 4) for stage, seconds in record.stages.items()},
            "objects": record.objects,
        }
        if record.reason:
            fields["reason"] = _QUERY.sub("?…", record.reason)
        level = logging.ERROR if record.outcome == "internal" else logging.INFO
        log.log(level, "%s %s %s", record.protocol, status, record.outcome, extra={"request": fields})
