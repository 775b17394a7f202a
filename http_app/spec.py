"""The OpenAPI 3.1 document of every HTTP route, generated from the API's types (``common.api``).

The operations are declared in ``http_app.operations`` by the types they take and answer; the
JSON Schemas come from pydantic. Limits that are settings are filled in from the running ``Settings`` and the
category names from the served model (an unknown class is refused, so the schema names the
known ones), which is why ``document`` is built per deployment rather than kept as a file.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common import api, api_v2
from common.config import Settings
from http_app.operations import (
    DESCRIPTION,
    ERRORS,
    GUNICORN_ERRORS,
    OPERATIONS,
    REF,
    TEXT,
    V2_OPERATIONS,
    Operation,
)

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
            schema = {"$ref": REF.format(model=schema.__name__)}
        content[media] = {"schema": schema}
    return content


def _error_response(status: int, operation: Operation) -> dict[str, Any]:
    request_id = operation.request_id
    if status in GUNICORN_ERRORS:
        return {"description": GUNICORN_ERRORS[status], "content": {"text/html": {"schema": TEXT}}}
    headers: dict[str, Any] = {}
    if request_id and status not in (404, 405):
        headers["X-Request-ID"] = {"$ref": "#/components/headers/RequestId"}
    if status == 503:
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    if status == 405:
        headers["Allow"] = {"$ref": "#/components/headers/Allow"}
    answer: dict[str, Any] = {
        "description": ERRORS[status],
        "content": _content({"application/json": operation.error_model}),
    }
    if headers:
        answer["headers"] = headers
    return answer


def _text_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema as a form field or query parameter carries it: text has no null (leaving
    the field out is the default)."""
    schema = copy.deepcopy(schema)
    for key in ("default", "title", "description"):
        schema.pop(key, None)
    if "anyOf" in schema:
        options = schema.pop("anyOf")
        schema = next(option for option in options if option.get("type") != "null") | schema
    return schema


def _query_parameters(
    model: type[BaseModel], schemas: dict[str, Any], categories: list[str] | None
) -> list[dict[str, Any]]:
    parameters = []
    for name, field_schema in schemas[model.__name__]["properties"].items():
        schema = _text_schema(field_schema)
        if name == "classes":  # what fits in the request line (common.api.query_classes_limit)
            schema["maxItems"] = api.query_classes_limit(categories)
        description = field_schema.get("description", "")
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


def _operation(operation: Operation, schemas: dict[str, Any], categories: list[str] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": operation.ok_description, "content": _content(operation.ok)}
    if operation.request_id:
        answer["headers"] = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    document: dict[str, Any] = {
        "tags": [operation.tag],
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "example": example}
            for name, example in operation.path_parameters.items()
        ]
        + [
            {"name": name, "in": "path", "required": True, "schema": copy.deepcopy(schema)}
            for name, schema in operation.path_schemas.items()
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
        document["parameters"] += _query_parameters(operation.query, schemas, categories)
    if operation.bodies:
        document["requestBody"] = {"required": True, "content": _content(operation.bodies)}
        form = document["requestBody"]["content"].get("multipart/form-data")
        if form is not None:
            form["encoding"] = {"classes": {"style": "form", "explode": True}}
    for status in sorted({*operation.errors, 405} - set(operation.answers)):
        document["responses"][str(status)] = _error_response(status, operation)
    for status, (description, model) in operation.answers.items():
        document["responses"][str(status)] = {
            "description": description,
            "content": _content({"application/json": model}),
        }
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
        elif keyword == "classes-pattern":  # a comma-separated list of the model's names
            if categories is not None:
                name = "(?:" + "|".join(re.escape(category) for category in categories) + ")"
                node["pattern"] = f"^(?:{name}(?:,{name})*)?$"
        elif keyword == "enum":
            node["enum"] = [getattr(settings, setting)]
        elif setting == "lowest_threshold":
            node[keyword] = api.lowest_threshold(settings)
        else:
            node[keyword] = getattr(settings, setting)
    for value in node.values():
        _fill_settings(value, settings, categories)


# What pydantic cannot say of a form's fields. A form carries only text, so a lone ``url`` field is
# the same as a list of one and its values are whatever text was sent (each is checked in its
# turn, as in a JSON batch): ``url`` has no type. One ``url`` or ``image`` at least.
_FORM_RULES: dict[str, dict[str, Any]] = {
    "BatchForm": {
        "anyOf": [
            {"required": ["url"], "properties": {"url": {"minItems": 1}}},
            {"required": ["image"], "properties": {"image": {"minItems": 1}}},
        ],
    },
}
_UNTYPED_FORM_FIELDS = {"BatchForm": ("url",)}


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
    api_v2.InferRequest,
    api_v2.InferResponse,
    api_v2.ServerMetadata,
    api_v2.ModelMetadata,
    api_v2.Live,
    api_v2.Ready,
    api_v2.Error,
)


def document(settings: Settings, categories: list[str] | None) -> dict[str, Any]:
    _keys, generated = models_json_schema([(model, "validation") for model in MODELS], ref_template=REF)
    schemas = generated["$defs"]
    _fill_settings(schemas, settings, categories)
    for name in ("DetectForm", "BatchForm"):  # a form carries text: no nulls
        rules = _FORM_RULES.get(name, {})
        properties = schemas[name]["properties"]
        for field_name, field_schema in properties.items():
            properties[field_name] = _text_schema(field_schema)
            properties[field_name]["description"] = field_schema.get("description", "")
            if field_name in _UNTYPED_FORM_FIELDS.get(name, ()):
                properties[field_name].pop("type")
        schemas[name] |= rules
    paths: dict[str, Any] = {}
    for operation in (*OPERATIONS, *V2_OPERATIONS):
        document_of = _operation(operation, schemas, categories)
        _fill_settings(document_of["parameters"], settings, categories)
        paths.setdefault(operation.path, {})[operation.method] = document_of
    return {
        "openapi": "3.1.0",
        "info": {"title": "instance-detector", "version": "1.0.0", "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "detection", "description": "Objects in images"},
            {"name": "operations", "description": "Health, readiness and metrics"},
            {"name": "documentation", "description": "This schema, its docs page and the results page"},
            {"name": "open inference protocol", "description": "KServe's v2 protocol, as Triton speaks it"},
        ],
        "paths": paths,
        "components": {"schemas": schemas, "headers": _HEADERS},
    }
