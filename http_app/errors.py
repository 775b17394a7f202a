"""Data-plane errors and HTTP errors as the service's JSON error answers, in one place.

Every error leaves as ``{"error": {"code": ..., "message": ...}}`` (``common.api.ErrorResponse``;
under ``/v2``, the Open Inference Protocol's ``{"error": "..."}``) with the status of
``HTTP_STATUS``; werkzeug's own errors (404, 405 with its ``Allow``, 413) keep
their status and headers but get the same body. A traceback only goes to the log.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from common import errors
from common.api import ErrorDetail, ErrorResponse
from common.api_v2 import Error as V2Error

log = logging.getLogger(__name__)

HTTP_STATUS = {
    errors.InvalidRequest: 400,
    errors.ForbiddenTarget: 403,
    errors.NotFound: 404,
    errors.TooLarge: 413,
    errors.NotAnImage: 422,
    errors.UpstreamFailed: 502,
    errors.NotReady: 503,
    errors.Overloaded: 503,
    errors.UpstreamTimeout: 504,
    errors.Cancelled: 499,  # nginx's "client closed request": only the log and metrics see it
}

# werkzeug's error names as codes, where they differ from its name in snake case
_HTTP_CODES = {413: "too_large"}


def http_status(exc: errors.DetectionError | None) -> int:
    return 200 if exc is None else HTTP_STATUS.get(type(exc), 500)


# The Open Inference Protocol's routes write an error as the protocol does: {"error": "..."}.
V2_PREFIX = "/v2"


def error_response(status: int, code: str, message: str) -> Response:
    if request.path == V2_PREFIX or request.path.startswith(V2_PREFIX + "/"):
        response = jsonify(V2Error(error=message).model_dump())
    else:
        response = jsonify(ErrorResponse(error=ErrorDetail(code=code, message=message)).json_dict())
    response.status_code = status
    return response


def detection_error(exc: errors.DetectionError) -> Response:
    response = error_response(http_status(exc), exc.code, exc.message)
    if isinstance(exc, errors.Overloaded):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status) or (exc.name or "error").lower().replace(" ", "_")
    response = error_response(status, code, exc.description or exc.name)
    for name, value in exc.get_headers():  # e.g. Allow on a 405 (RFC 9110 requires it)
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def unexpected_error(exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(500, "internal", "internal error; see the service log")


def register(app: Flask) -> None:
    app.register_error_handler(errors.DetectionError, detection_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
