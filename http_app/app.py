"""Flask app factory: ``/predict``, ``/metrics``, ``/healthz``, ``/readyz``.

The handlers only translate: JSON in, one ``DetectionService.predict`` call, JSON out; every
error leaves through ``_error_response`` with the status from ``HTTP_STATUS``. ``X-Request-ID``
is honoured (or made) and returned on every answer to ``/predict``.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common import errors, metrics
from common.config import Settings
from common.logs import configure_logging
from common.model import open_model
from common.observe import Observer
from common.pipeline import DetectionService

log = logging.getLogger(__name__)

# The one place where data-plane errors become HTTP statuses.
HTTP_STATUS = {
    errors.InvalidRequest: 400,
    errors.ForbiddenTarget: 403,
    errors.TooLarge: 413,
    errors.NotAnImage: 422,
    errors.UpstreamFailed: 502,
    errors.NotReady: 503,
    errors.Overloaded: 503,
    errors.UpstreamTimeout: 504,
    errors.Cancelled: 499,  # nginx's "client closed request": only the log and metrics see it
}


def http_status(exc: errors.DetectionError | None) -> int:
    return 200 if exc is None else HTTP_STATUS.get(type(exc), 500)


def _error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def _json_body(limit: int):
    """The request body parsed as JSON whatever its Content-Type (curl -d sends form encoding);
    None when it is not JSON. Bodies over ``limit`` bytes are refused, chunked ones included."""
    too_large = errors.TooLarge(f"the request body is larger than {limit} bytes")
    try:
        raw = request.get_data(cache=False)  # werkzeug reads at most MAX_CONTENT_LENGTH = limit + 1
    except RequestEntityTooLarge:
        raise too_large from None
    if len(raw) > limit:
        raise too_large
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        return None


def _client_alive():
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


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app and start loading this process's model in the background."""
    settings = settings or Settings.from_env()
    configure_logging("http", settings.log_level, settings.log_format)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != settings.metrics_dir or not os.path.isdir(
        settings.metrics_dir
    ):
        metrics.init_multiprocess(settings)  # run outside gunicorn.conf.py's on_starting hook
    metrics.record_process_start("http")
    inference_count = metrics.inference_counter("http")
    observer = Observer("http", lambda exc: str(http_status(exc)))
    service = DetectionService(settings, open_model(settings)).start_loading()

    app = Flask(__name__)
    # one byte more than allowed: a chunked body werkzeug cuts at its limit still shows as too long
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # answers keep their fields in the documented order
    app.extensions["detection_service"] = service

    @app.post("/predict")
    def predict():
        inference_count.inc()
        with observer.request(request.headers.get("X-Request-ID")) as record:
            g.request_id = record.request_id
            body = _json_body(settings.max_request_bytes)
            if not isinstance(body, dict):
                raise errors.InvalidRequest('the body must be a JSON object like {"url": "https://..."}')
            if "url" not in body:
                raise errors.InvalidRequest("the JSON body has no 'url' field")
            objects = service.predict(body["url"], record, _client_alive())
        return jsonify({"objects": objects})

    @app.get("/metrics")
    def prometheus_metrics():
        payload, content_type = metrics.render_latest(settings)
        return Response(payload, content_type=content_type)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        state, message = service.status()
        return jsonify({"status": state, "message": message}), (200 if state == "ready" else 503)

    @app.after_request
    def return_request_id(response: Response) -> Response:
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response

    @app.errorhandler(errors.DetectionError)
    def detection_error(exc: errors.DetectionError):
        response, status = _error_response(http_status(exc), exc.code, exc.message)
        if isinstance(exc, errors.Overloaded):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = "too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
        return _error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal", "internal error; see the service log")

    return app
