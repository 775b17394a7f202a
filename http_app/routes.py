"""The detection API's routes: each turns a request into one call on the ``DetectionService``
and its answer into JSON (or NDJSON) of ``common.api``'s types; errors leave through
``http_app.errors``. ``X-Request-ID`` is honoured (or made) and returned on every answer to a
detection route."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args

from flask import Blueprint, Response, current_app, g, jsonify, request

from common import api, errors, metrics
from common.config import Settings
from common.model import ClientAlive
from common.observe import Observer, request_id
from common.pipeline import BatchRun, DetectionService
from http_app import inputs

blueprint = Blueprint("api", __name__)


@dataclass(frozen=True)
class Api:
    """What the routes share: kept in ``app.extensions["api"]`` by ``create_app``."""

    settings: Settings
    service: DetectionService
    observer: Observer
    inference_count: Any  # a prometheus_client Counter (imported only after init_multiprocess)


def _api() -> Api:
    return current_app.extensions["api"]


def client_alive() -> ClientAlive | None:
    """Under gunicorn: a check that the client has not closed its connection (a peek that reads
    nothing), asked while the request waits for the model. Elsewhere: None (not checked)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return None

    def alive() -> bool:
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True  # open, nothing more sent: still waiting for its answer
        except OSError:
            return False

    return alive


@blueprint.post("/predict")
def predict():
    context = _api()
    context.inference_count.inc()
    with context.observer.request(request.headers.get("X-Request-ID")) as record:
        g.request_id = record.request_id
        url = inputs.predict_url(context.settings)
        objects = context.service.predict(url, record, client_alive())
    return jsonify(api.PredictResponse(objects=objects).json_dict())


@blueprint.post("/v1/detect")
def detect():
    context = _api()
    with context.observer.request(request.headers.get("X-Request-ID"), "detect") as record:
        g.request_id = record.request_id
        source, options = inputs.one_image(context.settings, context.service.model.categories)
        detection = context.service.detect(source, options, record, client_alive())
    return jsonify(api.DetectResponse.of(detection).json_dict())


@blueprint.post("/v1/detect/batch")
def detect_batch():
    context = _api()
    batch_id = g.request_id = request_id(request.headers.get("X-Request-ID"))
    try:
        sources, options = inputs.many_images(context.settings, context.service.model.categories)
        run = context.service.start_batch(
            sources,
            options,
            lambda index: context.observer.request(f"{batch_id}.{index}", "detect_batch"),
            client_alive(),
        )
    except errors.DetectionError:
        with context.observer.request(batch_id, "detect_batch"):  # refused whole: recorded as one request
            raise
    return Response(NdjsonLines(run), mimetype="application/x-ndjson")


@blueprint.get("/v1/model")
def model_description():
    context = _api()
    settings = context.settings
    description = api.ModelDescription(
        categories=context.service.categories(),
        score_threshold=settings.score_threshold,
        min_score_threshold=api.lowest_threshold(settings),
        max_batch_images=settings.max_batch_images,
        mask_formats=list(get_args(api.MaskFormat)),
    )
    return jsonify(description.json_dict())


@blueprint.get("/metrics")
def prometheus_metrics():
    payload, content_type = metrics.render_latest(_api().settings)
    return Response(payload, content_type=content_type)


@blueprint.get("/healthz")
def healthz():
    return jsonify(api.Liveness(status="alive").json_dict())


@blueprint.get("/readyz")
def readyz():
    state, message = _api().service.status()
    readiness = api.Readiness.model_validate({"status": state, "message": message})
    return jsonify(readiness.json_dict()), (200 if state == "ready" else 503)


@blueprint.after_app_request
def return_request_id(response: Response) -> Response:
    if "request_id" in g:
        response.headers["X-Request-ID"] = g.request_id
    return response


class NdjsonLines:
    """A batch's answer: one JSON line per image as it is done. An iterable with ``close`` (not a
    generator), so that a response closed before it was iterated still gives back the batch's
    admission slot."""

    def __init__(self, run: BatchRun):
        self.run = run

    def __iter__(self) -> Iterator[bytes]:
        for index, result in self.run:
            line: api.Answer
            if isinstance(result, errors.DetectionError):
                line = api.BatchErrorLine(
                    index=index, error=api.ErrorDetail(code=result.code, message=result.message)
                )
            else:
                line = api.BatchDetectionLine(index=index, **dict(api.DetectResponse.of(result)))
            yield json.dumps(line.json_dict()).encode() + b"\n"

    def close(self) -> None:
        self.run.close()
