"""The Flask app factory: ``create_app(settings, model=...)``.

The routes live in blueprints: the detection API (``http_app.routes``), the Open Inference
Protocol (``http_app.v2``), the page at ``/`` (``http_app.page``) and the OpenAPI schema and its
docs page (``http_app.openapi``); errors
become JSON in ``http_app.errors``. Given a model (tests give a fake), building the app loads
nothing; otherwise the configured model (``common.model.open_model``) starts loading in the
background.
"""

from __future__ import annotations

import os

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from common import metrics
from common.config import Settings
from common.logs import configure_logging
from common.model import Model, open_model
from common.observe import Observer
from common.pipeline import DetectionService
from http_app import errors, openapi, page, routes, v2


def create_app(settings: Settings | None = None, model: Model | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging("http", settings.log_level, settings.log_format)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != settings.metrics_dir or not os.path.isdir(
        settings.metrics_dir
    ):
        metrics.init_multiprocess(settings)  # run outside gunicorn.conf.py's on_starting hook
    metrics.record_process_start("http")
    service = DetectionService(settings, model or open_model(settings)).start_loading()

    app = Flask(__name__, static_folder=None)  # the page blueprint serves http_app/static
    # one byte more than allowed: a chunked body werkzeug cuts at its limit still shows as too long
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # answers keep their fields in the documented order
    app.extensions["api"] = routes.Api(
        settings,
        service,
        Observer("http", lambda exc: str(errors.http_status(exc))),
        metrics.inference_counter("http"),
    )
    app.register_blueprint(routes.blueprint)
    app.register_blueprint(v2.blueprint)
    app.register_blueprint(page.blueprint)
    app.register_blueprint(openapi.blueprint)
    errors.register(app)
    return app
