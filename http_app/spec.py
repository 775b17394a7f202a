"""The OpenAPI 3.1 document of every HTTP route, generated from the API's types (``common.api``).

Each operation is declared here once, by the types it takes and answers; the JSON Schemas come
from pydantic. Limits that are settings are filled in from the running ``Settings`` and the
category names from the served model (an unknown class is refused, so the schema names the
known ones), which is why ``document`` is built per deployment rather than kept as a file.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common import api
from common.config import Settings

_REF = "#/components/schemas/{model}"
_TEXT = {"type": "string"}
_BINARY = {"type": "string", "format": "binary"}

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
GUNICORN_ERRORS = {414: "The request line is longer than 4094 bytes (gunicorn's `limit_request_line`)."}
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
    path_parameters: Sequence[str] = ()
    errors: Sequence[int] = ()
    request_id: bool = False  # takes and answers X-Request-ID


_ASSET = {"text/javascript": _TEXT, "text/css": _TEXT, "image/png": _BINARY, "application/json": _TEXT}

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
            "image/*": _BINARY,
            "application/octet-stream": _BINARY,
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
                    {"$ref": _REF.format(model=name)} for name in ("BatchDetectionLine", "BatchErrorLine")
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
        {"text/plain": _TEXT},
    ),
    Operation("/", "get", "page", "documentation", "A page to try the service", {"text/html": _TEXT}),
    Operation(
        "/static/{filename}",
        "get",
        "pageFile",
        "documentation",
        "The files of the page at `/`",
        {"text/html": _TEXT, "text/javascript": _TEXT, "text/css": _TEXT, "image/svg+xml": _TEXT},
        path_parameters=("filename",),
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
        "/docs", "get", "docs", "documentation", "This schema as a Swagger UI page", {"text/html": _TEXT}
    ),
    Operation(
        "/docs/init.js",
        "get",
        "docsInit",
        "documentation",
        "The script that starts the docs page",
        {"text/javascript": _TEXT},
    ),
    Operation(
        "/docs/assets/{name}",
        "get",
        "docsAsset",
        "documentation",
        "Swagger UI's files",
        _ASSET,
        path_parameters=("name",),
        errors=(404,),
    ),
)

DESCRIPTION = """Mask R-CNN instance detection: send an image (a URL, an upload or the body itself) \
and get back the objects in it. The same service is offered over gRPC (`protos/inference.proto`).

Every error answer is `{"error": {"code": "...", "message": "..."}}`; the limits are the \
deployment's settings (docs/configuration.md), written into this schema as configured."""

_HEADERS = {
    "RequestId": {
        "description": "The call's request id: the client's `X-Request-ID` when it is 1 to 128 of "
        "`A-Za-z0-9._:@/+=-`, otherwise a new one.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@/+=-]{1,128}$"},
    },
    "RetryAfter": {
        "description": "With `overloaded`: seconds to wait.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "Allow": {"description": "The methods the path takes.", "required": True, "schema": {"type": "string"}},
}


def _content(entries: dict[str, Any]) -> dict[str, Any]:
    content = {}
    for media, schema in entries.items():
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            schema = {"$ref": _REF.format(model=schema.__name__)}
        content[media] = {"schema": schema}
    return content


def _error_response(status: int, request_id: bool) -> dict[str, Any]:
    if status in GUNICORN_ERRORS:
        return {"description": GUNICORN_ERRORS[status], "content": {"text/html": {"schema": _TEXT}}}
    headers: dict[str, Any] = {}
    if request_id and status not in (404, 405):
        headers["X-Request-ID"] = {"$ref": "#/components/headers/RequestId"}
    if status == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    if status == 405:
        headers["Allow"] = {"$ref": "#/components/headers/Allow"}
    answer: dict[str, Any] = {
        "description": ERRORS[status],
        "content": _content({"application/json": api.ErrorResponse}),
    }
    if headers:
        answer["headers"] = headers
    return answer


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    properties = schemas[model.__name__]["properties"]
    parameters = []
    for name, schema in properties.items():
        schema = copy.deepcopy(schema)
        description = schema.pop("description", "")
        schema.pop("default", None)
        schema.pop("title", None)
        # a query string carries no null: leaving the parameter out is the default
        if "anyOf" in schema:
            options = schema.pop("anyOf")
            schema = next(option for option in options if option.get("type") != "null") | schema
        parameter = {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": schema,
        }
        if schema.get("type") == "array":
            parameter |= {"style": "form", "explode": True}
        parameters.append(parameter)
    return parameters


def _operation(operation: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": operation.ok_description, "content": _content(operation.ok)}
    if operation.request_id:
        answer["headers"] = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    document: dict[str, Any] = {
        "tags": [operation.tag],
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in operation.path_parameters
        ],
        "responses": {"200": answer},
    }
    if operation.request_id:
        document["parameters"].append(
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "Used as the call's id when it is a sane token (see the answer's header).",
            }
        )
    if operation.query is not None:
        document["parameters"] += _query_parameters(operation.query, schemas)
    if operation.bodies:
        document["requestBody"] = {"required": True, "content": _content(operation.bodies)}
        form = document["requestBody"]["content"].get("multipart/form-data")
        if form is not None:
            form["encoding"] = {"classes": {"style": "form", "explode": True}}
    for status in sorted({*operation.errors, 405}):
        document["responses"][str(status)] = _error_response(status, operation.request_id)
    return document


def _fill_settings(node: Any, settings: Settings, categories: list[str] | None) -> None:
    """Replace the types' ``x-setting-<keyword>: <setting>`` markers by the configured values."""
    if isinstance(node, list):
        for item in node:
            _fill_settings(item, settings, categories)
        return
    if not isinstance(node, dict):
        return
    for key in [key for key in node if key.startswith("x-setting-")]:
        setting = node.pop(key)
        keyword = key.removeprefix("x-setting-")
        if keyword == "categories":
            if categories is not None:  # not known while the model loads
                target = next(option for option in node.get("anyOf", [node]) if option.get("type") == "array")
                target["items"] = {"type": "string", "enum": categories}
        elif setting == "lowest_threshold":
            node[keyword] = api.lowest_threshold(settings)
        else:
            node[keyword] = getattr(settings, setting)
    for value in node.values():
        _fill_settings(value, settings, categories)


# the forms' alternatives, which pydantic cannot say of a model's fields
_FORM_RULES = {
    "DetectForm": {"oneOf": [{"required": ["image"]}, {"required": ["url"]}]},
    "BatchForm": {
        "anyOf": [
            {"required": ["url"], "properties": {"url": {"minItems": 1}}},
            {"required": ["image"], "properties": {"image": {"minItems": 1}}},
        ]
    },
}

MODELS = (
    api.PredictRequest,
    api.PredictResponse,
    api.DetectRequest,
    api.DetectForm,
    api.DetectResponse,
    api.BatchRequest,
    api.BatchForm,
    api.BatchDetectionLine,
    api.BatchErrorLine,
    api.ModelDescription,
    api.Liveness,
    api.Readiness,
    api.ErrorResponse,
    api.Options,
)


def document(settings: Settings, categories: list[str] | None) -> dict[str, Any]:
    _keys, generated = models_json_schema([(model, "validation") for model in MODELS], ref_template=_REF)
    schemas = generated["$defs"]
    _fill_settings(schemas, settings, categories)
    for name, rules in _FORM_RULES.items():
        schemas[name] |= rules
    paths: dict[str, Any] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method] = _operation(operation, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "instance-detector", "version": "1.0.0", "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "detection", "description": "Objects in images"},
            {"name": "operations", "description": "Health, readiness and metrics"},
            {"name": "documentation", "description": "This schema, its docs page and the results page"},
        ],
        "paths": paths,
        "components": {"schemas": schemas, "headers": _HEADERS},
    }
