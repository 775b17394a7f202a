"""Flask app factory: ``/predict``, ``/v1/detect``, ``/v1/detect/batch``, ``/v1/model``,
``/metrics``, ``/healthz``, ``/readyz``, and the blueprints of the page (``/``) and the OpenAPI
schema (``/openapi.json``, ``/docs``).

The handlers only translate: a body in (JSON, multipart or a raw image), one call on the
``DetectionService``, JSON (or NDJSON) out; every error leaves through ``_error_response`` with
the status from ``HTTP_STATUS``. ``X-Request-ID`` is honoured (or made) and returned on every
answer to a detection route.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common import errors, metrics
from common.config import Settings
from common.logs import configure_logging
from common.model import Detection, DetectOptions, open_model
from common.model.detection import MASK_FORMATS
from common.observe import Observer, request_id
from common.options import OPTION_NAMES, parse_options, reject_unknown
from common.pipeline import BatchRun, DetectionService, ImageSource
from http_app import openapi, page

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


def _body(limit: int) -> bytes:
    """The raw request body; over ``limit`` bytes (chunked ones included) is ``TooLarge``."""
    too_large = errors.TooLarge(f"the request body is larger than {limit} bytes")
    request.max_content_length = limit + 1  # werkzeug reads at most this: a cut body still shows as too long
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise too_large from None
    if len(raw) > limit:
        raise too_large
    return raw


def _json_body(limit: int):
    """The request body parsed as JSON whatever its Content-Type (curl -d sends form encoding);
    None when it is not JSON. Bodies over ``limit`` bytes are refused, chunked ones included."""
    raw = _body(limit)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        return None


def _json_object(limit: int, example: str) -> dict:
    body = _json_body(limit)
    if not isinstance(body, dict):
        raise errors.InvalidRequest(f"the body must be a JSON object like {example}")
    return body


def _form(limit: int):
    """(form fields, files) of a multipart body of at most ``limit`` bytes."""
    request.max_content_length = limit + 1
    try:
        form, files = request.form, request.files
    except RequestEntityTooLarge:
        raise errors.TooLarge(f"the request body is larger than {limit} bytes") from None
    return form, files


def _upload(storage, limit: int) -> ImageSource:
    """An uploaded file as an image source; a file over ``limit`` is not read past it."""
    data = storage.stream.read(limit + 1)
    return ImageSource(data=data, name=storage.filename or "")


def _body_kind() -> str:
    """How the client sent its image: 'multipart', 'raw' (the image is the body) or 'json'."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return "multipart"
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        return "raw"
    return "json"


def _detection_json(detection: Detection) -> dict:
    return {
        "width": detection.width,
        "height": detection.height,
        "instances": [instance.as_dict() for instance in detection.instances or []],
    }


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
    # a JSON batch lists up to MAX_BATCH_IMAGES URLs: each may take what one JSON request may
    batch_json_limit = settings.max_request_bytes * settings.max_batch_images

    app = Flask(__name__, static_folder=None)  # the page blueprint serves http_app/static
    # one byte more than allowed: a chunked body werkzeug cuts at its limit still shows as too long
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False  # answers keep their fields in the documented order
    app.extensions["detection_service"] = service
    app.register_blueprint(page.blueprint)
    app.register_blueprint(openapi.blueprint)

    def no_query(kind: str) -> None:
        if request.args:
            reject_unknown(request.args, (), f"query parameters with a {kind} body (options go in the body):")

    def one_image() -> tuple[ImageSource, DetectOptions]:
        """The image and the raw options of a /v1/detect request, however it was sent."""
        kind = _body_kind()
        if kind == "raw":
            reject_unknown(request.args, OPTION_NAMES, "query parameters")
            data = _body(settings.max_upload_bytes)
            return ImageSource(data=data), _form_options(request.args)
        no_query(kind)
        if kind == "multipart":
            form, files = _form(settings.max_upload_bytes)
            reject_unknown(form, ("url", *OPTION_NAMES), "form fields")
            reject_unknown(files, ("image",), "file fields")
            images, urls = files.getlist("image"), form.getlist("url")
            if len(images) + len(urls) != 1:
                raise errors.InvalidRequest("send one image: an 'image' file field or a 'url' field")
            source = _upload(images[0], settings.fetch_max_bytes) if images else ImageSource(url=urls[0])
            return source, _form_options(form)
        body = _json_object(settings.max_request_bytes, '{"url": "https://..."}')
        reject_unknown(body, ("url", *OPTION_NAMES), "fields")
        if "url" not in body:
            raise errors.InvalidRequest("the JSON body has no 'url' field")
        return ImageSource(url=body["url"]), _json_options(body)

    def many_images() -> tuple[list[ImageSource], DetectOptions]:
        kind = _body_kind()
        no_query(kind)
        if kind == "multipart":
            form, files = _form(settings.max_upload_bytes)
            reject_unknown(form, ("url", *OPTION_NAMES), "form fields")
            reject_unknown(files, ("image",), "file fields")
            if len(form.getlist("url")) + len(files.getlist("image")) > settings.max_batch_images:
                raise errors.TooLarge(f"a batch may have at most {settings.max_batch_images} images")
            sources = [ImageSource(url=url) for url in form.getlist("url")]
            sources += [_upload(storage, settings.fetch_max_bytes) for storage in files.getlist("image")]
            return sources, _form_options(form)
        if kind == "raw":
            raise errors.InvalidRequest("a batch is sent as JSON or multipart/form-data, not as a raw image")
        body = _json_object(batch_json_limit, '{"urls": ["https://...", ...]}')
        reject_unknown(body, ("urls", *OPTION_NAMES), "fields")
        urls = body.get("urls")
        if not isinstance(urls, list):
            raise errors.InvalidRequest("'urls' must be a list of image URLs")
        return [ImageSource(url=url) for url in urls], _json_options(body)

    def _json_options(body: dict) -> DetectOptions:
        return parse_options(settings, *(body.get(name) for name in OPTION_NAMES))

    def _form_options(fields) -> DetectOptions:
        """Options from form fields or query parameters (a MultiDict): ``classes`` may be repeated
        or comma-separated, the others given at most once."""
        for name in ("threshold", "masks"):
            if len(fields.getlist(name)) > 1:
                raise errors.InvalidRequest(f"{name!r} is given more than once")
        classes = ",".join(fields.getlist("classes")) if "classes" in fields else None
        return parse_options(settings, fields.get("threshold"), classes, fields.get("masks"))

    @app.post("/v1/detect")
    def detect():
        with observer.request(request.headers.get("X-Request-ID"), "detect") as record:
            g.request_id = record.request_id
            source, options = one_image()
            detection = service.detect(source, options, record, _client_alive())
        return jsonify(_detection_json(detection))

    @app.post("/v1/detect/batch")
    def detect_batch():
        batch_id = request_id(request.headers.get("X-Request-ID"))
        g.request_id = batch_id
        try:
            sources, options = many_images()
            run = service.start_batch(
                sources,
                options,
                lambda index: observer.request(f"{batch_id}.{index}", "detect_batch"),
                _client_alive(),
            )
        except errors.DetectionError:
            with observer.request(batch_id, "detect_batch"):  # refused whole: recorded as one request
                raise
        return Response(_NdjsonLines(run), mimetype="application/x-ndjson")

    @app.get("/v1/model")
    def model_description():
        return jsonify(
            {
                "categories": service.categories(),
                "score_threshold": settings.score_threshold,
                "min_score_threshold": min(settings.min_score_threshold, settings.score_threshold),
                "max_batch_images": settings.max_batch_images,
                "mask_formats": list(MASK_FORMATS),
            }
        )

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


class _NdjsonLines:
    """A batch's answer: one JSON line per image as it is done. An iterable with ``close`` (not a
    generator), so that a response closed before it was iterated still gives back the batch's
    admission slot."""

    def __init__(self, run: BatchRun):
        self.run = run

    def __iter__(self) -> Iterator[bytes]:
        for index, result in self.run:
            if isinstance(result, errors.DetectionError):
                line = {"index": index, "error": {"code": result.code, "message": result.message}}
            else:
                line = {"index": index, **_detection_json(result)}
            yield json.dumps(line).encode() + b"\n"

    def close(self) -> None:
        self.run.close()
