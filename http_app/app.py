"""Flask app factory: ``/predict``, ``/metrics``, ``/healthz``, ``/readyz``.

The handlers only translate: JSON in, one ``DetectionService.predict`` call, JSON out; every
error leaves through ``_error_response`` with the status from ``HTTP_STATUS``.
"""

from __future__ import annotations

import json
import logging
import os

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common import errors, metrics
from common.config import Settings
from common.logs import configure_logging
from common.model import open_model
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
    errors.UpstreamTimeout: 504,
}


def _error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def _json_body(limit: int):
    """The request body parsed as JSON whatever its Content-Type (curl -d sends form encoding);
    None when it is not JSON. Bodies over ``limit`` bytes are refused, chunked ones included."""
    raw = request.get_data(cache=False)  # werkzeug reads at most MAX_CONTENT_LENGTH = limit + 1
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        return None


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app and start loading this process's model in the background."""
    settings = settings or Settings.from_env()
    configure_logging("http", settings.log_level)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != settings.metrics_dir or not os.path.isdir(
        settings.metrics_dir
    ):
        metrics.init_multiprocess(settings)  # run outside gunicorn.conf.py's on_starting hook
    inference_count = metrics.inference_counter("http")
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
        body = _json_body(settings.max_request_bytes)
        if not isinstance(body, dict):
            raise errors.InvalidRequest('the body must be a JSON object like {"url": "https://..."}')
        if "url" not in body:
            raise errors.InvalidRequest("the JSON body has no 'url' field")
        return jsonify({"objects": service.predict(body["url"])})

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

    @app.errorhandler(errors.DetectionError)
    def detection_error(exc: errors.DetectionError):
        return _error_response(HTTP_STATUS.get(type(exc), 500), exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = "too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
        return _error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal", "internal error; see the service log")

    return app
