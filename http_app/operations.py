"""Every HTTP operation, declared once: its path and method, the types of ``common.api`` it takes
(per content type, and in the query string) and answers, and the error statuses it may give.
``http_app.spec`` turns this table into the OpenAPI document; a unit test checks that it names
exactly the app's routes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from common import api, api_v2

REF = "#/components/schemas/{model}"
TEXT = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}

# status -> (description, headers): every error answer is an ErrorResponse
ERRORS = {
    400: "`invalid_request`: the body or a parameter is malformed, an unknown field, parameter or class.",
    403: "`forbidden_target`: the image host is a non-public address that `ALLOWED_PRIVATE_TARGETS` "
    "does not allow.",
    404: "`not_found`: no such path or file.",
    405: "`method_not_allowed`: the path does not take this method; `Allow` lists those it takes.",
    413: "`too_large`: the body, the download, the upload, the pixels or the batch is over its limit.",
    422: "`not_an_image`: the bytes are empty, not a JPEG/PNG/WebP/GIF/BMP/TIFF image, or corrupt.",
    500: "`internal`: an unexpected failure; the traceback goes to the service log only.",
    502: "`upstream_failed`: the image host cannot be resolved or reached, or answers an error.",
    503: "`overloaded` (retry after `Retry-After` seconds) or `not_ready` (the model is not loaded).",
    504: "`upstream_timeout`: the image host was too slow.",
}
# Answered by gunicorn itself, before the app sees the request: an HTML page, not JSON.
GUNICORN_ERRORS = {
    414: f"The request line is longer than {api.REQUEST_LINE_BYTES} bytes (gunicorn's `limit_request_line`)."
}
DETECTION_ERRORS = (400, 403, 413, 422, 500, 502, 503, 504)


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    operation_id: str
    tag: str
    summary: str
    ok: dict[str, Any]  # media type -> a type of common.api or a JSON Schema
    ok_description: str = "OK."
    bodies: dict[str, Any] = field(default_factory=dict)  # media type -> a type or a JSON Schema
    query: type[BaseModel] | None = None
    path_parameters: dict[str, str] = field(default_factory=dict)  # name -> an example
    errors: Sequence[int] = ()
    request_id: bool = False  # takes and answers X-Request-ID
    error_model: type[BaseModel] = api.ErrorResponse
    # statuses answered with a body other than the error model: status -> (description, type)
    answers: dict[int, tuple[str, Any]] = field(default_factory=dict)
    # path parameters whose values are known: name -> JSON Schema (x-setting markers allowed)
    path_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)


_ASSET = {"text/javascript": TEXT, "text/css": TEXT, "image/png": BINARY, "application/json": TEXT}

OPERATIONS = (
    Operation(
        "/predict",
        "post",
        "predict",
        "detection",
        "Category names of the objects in the image at a URL",
        {"application/json": api.PredictResponse},
        bodies={"application/json": api.PredictRequest},
        errors=DETECTION_ERRORS,
        request_id=True,
    ),
    Operation(
        "/v1/detect",
        "post",
        "detect",
        "detection",
        "Full detections in one image (a URL, an upload or the body itself): label, score, box, mask",
        {"application/json": api.DetectResponse},
        bodies={
            "application/json": api.DetectRequest,
            "multipart/form-data": api.DetectForm,
            "image/*": BINARY,
            "application/octet-stream": BINARY,
        },
        query=api.Options,
        errors=(*DETECTION_ERRORS, 414),
        request_id=True,
    ),
    Operation(
        "/v1/detect/batch",
        "post",
        "detectBatch",
        "detection",
        "Full detections in many images, one NDJSON line per image as each is done",
        {
            "application/x-ndjson": {
                "oneOf": [
                    {"$ref": REF.format(model=name)} for name in ("BatchDetectionLine", "BatchErrorLine")
                ]
            }
        },
        "One JSON line per image (`index` is its place in the request), in the order they are done.",
        bodies={"application/json": api.BatchRequest, "multipart/form-data": api.BatchForm},
        query=api.Options,
        errors=(400, 413, 500, 503, 414),
        request_id=True,
    ),
    Operation(
        "/v1/model",
        "get",
        "model",
        "detection",
        "The served model: categories, thresholds, limits",
        {"application/json": api.ModelDescription},
        errors=(503,),
    ),
    Operation(
        "/healthz",
        "get",
        "healthz",
        "operations",
        "Liveness: 200 while the HTTP server runs",
        {"application/json": api.Liveness},
    ),
    Operation(
        "/readyz",
        "get",
        "readyz",
        "operations",
        "Readiness: 200 once the model is loaded (503 before)",
        {"application/json": api.Readiness},
    ),
    Operation(
        "/metrics",
        "get",
        "metrics",
        "operations",
        "Prometheus metrics of all server processes",
        {"text/plain": TEXT},
    ),
    Operation("/", "get", "page", "documentation", "A page to try the service", {"text/html": TEXT}),
    Operation(
        "/static/{filename}",
        "get",
        "pageFile",
        "documentation",
        "The files of the page at `/`",
        {"text/html": TEXT, "text/javascript": TEXT, "text/css": TEXT, "image/svg+xml": TEXT},
        path_parameters={"filename": "app.js"},
        errors=(404,),
    ),
    Operation(
        "/openapi.json",
        "get",
        "openapi",
        "documentation",
        "This schema (OpenAPI 3.1)",
        {"application/json": {"type": "object"}},
    ),
    Operation(
        "/docs", "get", "docs", "documentation", "This schema as a Swagger UI page", {"text/html": TEXT}
    ),
    Operation(
        "/docs/init.js",
        "get",
        "docsInit",
        "documentation",
        "The script that starts the docs page",
        {"text/javascript": TEXT},
    ),
    Operation(
        "/docs/assets/{name}",
        "get",
        "docsAsset",
        "documentation",
        "Swagger UI's files",
        _ASSET,
        path_parameters={"name": "swagger-ui.css"},
        errors=(404,),
    ),
)

DESCRIPTION = """Mask R-CNN instance detection: send an image (a URL, an upload or the body itself) \
and get back the objects in it. The same service is offered over gRPC (`protos/inference.proto`).

Every error answer is `{"error": {"code": "...", "message": "..."}}`; the limits are the \
deployment's settings (docs/configuration.md), written into this schema as configured."""


# -- the Open Inference Protocol (http_app.v2) ---------------------------------------------------

_MODEL: dict[str, dict[str, Any]] = {"name": {"type": "string", "x-setting-enum": "v2_model_name"}}
_VERSIONED: dict[str, dict[str, Any]] = _MODEL | {"version": {"type": "string", "enum": ["1"]}}
_NOT_READY = {503: ("Not ready: the model is not loaded.", api_v2.Ready)}
_V2_BINARY = (
    "With the binary tensor data extension: the answer's JSON (its length in the "
    "`Inference-Header-Content-Length` header), then the binary outputs' data."
)


def _v2(path: str, operation_id: str, summary: str, ok: dict[str, Any], **more: Any) -> list[Operation]:
    """An operation of the protocol; one of the model also has its ``/versions/{version}`` form."""
    forms: list[tuple[str, str, dict[str, dict[str, Any]]]] = [
        (path, operation_id, _MODEL if "{name}" in path else {})
    ]
    if "{name}" in path:
        forms.append(
            (path.replace("{name}", "{name}/versions/{version}"), operation_id + "Version", _VERSIONED)
        )
    return [
        Operation(
            form_path,
            more.get("method", "get"),
            form_id,
            "open inference protocol",
            summary,
            ok,
            error_model=api_v2.Error,
            path_schemas=schemas,
            **{key: value for key, value in more.items() if key != "method"},
        )
        for form_path, form_id, schemas in forms
    ]


V2_OPERATIONS = (
    *_v2(
        "/v2",
        "v2ServerMetadata",
        "The server's name, version and protocol extensions",
        {"application/json": api_v2.ServerMetadata},
    ),
    *_v2(
        "/v2/health/live",
        "v2ServerLive",
        "Liveness: 200 while the server runs",
        {"application/json": api_v2.Live},
    ),
    *_v2(
        "/v2/health/ready",
        "v2ServerReady",
        "Readiness: 200 once the model is loaded",
        {"application/json": api_v2.Ready},
        answers=_NOT_READY,
    ),
    *_v2(
        "/v2/models/{name}",
        "v2ModelMetadata",
        "The model's inputs and outputs",
        {"application/json": api_v2.ModelMetadata},
        errors=(404,),
    ),
    *_v2(
        "/v2/models/{name}/ready",
        "v2ModelReady",
        "Whether the model is loaded",
        {"application/json": api_v2.Ready},
        errors=(404,),
        answers=_NOT_READY,
    ),
    *_v2(
        "/v2/models/{name}/infer",
        "v2ModelInfer",
        "Detections in one image as tensors: labels, scores, boxes and, on request, masks",
        {"application/json": api_v2.InferResponse, "application/octet-stream": BINARY},
        method="post",
        ok_description="The outputs in JSON; or, when any is asked in binary form: " + _V2_BINARY,
        bodies={"application/json": api_v2.InferRequest},
        errors=(*DETECTION_ERRORS, 404),
        request_id=True,
    ),
)
