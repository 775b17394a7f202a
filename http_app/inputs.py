"""What an HTTP request carries, read within its limits and checked against the API's types.

A detection request sends its image as JSON (``{"url": ...}``; parsed whatever the Content-Type
says, since ``curl -d`` sends form encoding), as multipart/form-data (an ``image`` file; a batch
may add ``url`` fields) or as the body itself (``image/*`` or ``application/octet-stream``). Its
options may be in the body (JSON or form fields) and in the query string; one given in both is
the body's. JSON is checked strictly (a number is a number); forms and query strings carry only
text, so their values are converted, and ``classes`` may be repeated or comma-separated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from common import api, errors
from common.config import Settings
from common.model import DetectOptions
from common.pipeline import ImageSource

Model = TypeVar("Model", bound=BaseModel)

# The served model's category names (None while it loads), asked when needed.
Categories = Callable[[], list[str] | None]

# Form fields and query parameters that may be given more than once.
_LISTS = ("classes", "url")


def _too_large(limit: int) -> errors.TooLarge:
    return errors.TooLarge(f"the request body is larger than {limit} bytes")


def body(limit: int) -> bytes:
    """The raw request body; over ``limit`` bytes (chunked ones included) is ``TooLarge``."""
    request.max_content_length = limit + 1  # werkzeug reads at most this: a cut body still shows as too long
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise _too_large(limit) from None
    if len(raw) > limit:
        raise _too_large(limit)
    return raw


def parse_json_object(raw: bytes, problem: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; otherwise InvalidRequest(``problem``)."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deeply
        parsed = None
    if not isinstance(parsed, dict):
        raise errors.InvalidRequest(problem)
    return parsed


def json_object(limit: int, example: str) -> dict[str, Any]:
    return parse_json_object(body(limit), f"the body must be a JSON object like {example}")


def body_kind() -> str:
    """How the client sent its image: 'multipart', 'raw' (the image is the body) or 'json'."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return "multipart"
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        return "raw"
    return "json"


def checked(
    model: type[Model], values: dict[str, Any], where: str, settings: Settings, strict: bool
) -> Model:
    try:
        return model.model_validate(values, strict=strict, context={"settings": settings})
    except ValidationError as exc:
        raise api.validation_problem(exc, where) from None


def text_values(fields: MultiDict, where: str) -> dict[str, Any]:
    """Form fields or query parameters as a dict for the types: single values once, lists split."""
    values: dict[str, Any] = {}
    for name in fields:
        given = fields.getlist(name)
        if name == "classes":
            values[name] = api.listed_names(given, ",")
        elif name in _LISTS:
            values[name] = given
        elif len(given) > 1:
            raise errors.InvalidRequest(f"{name!r} is given more than once in the {where}")
        else:
            values[name] = given[0]
    return values


def query_options(settings: Settings, categories: Categories) -> api.Options:
    """The query string's options; ``categories`` (the model's names, None while it loads; asked
    only when the query names classes) bound how many classes it may name."""
    values = text_values(request.args, "query string")
    if "classes" in values:
        limit = api.query_classes_limit(categories())
        if len(values["classes"]) > limit:
            raise errors.InvalidRequest(
                f"the query string may name at most {limit} classes; name more in the body"
            )
    return checked(api.Options, values, "query parameters", settings, False)


def with_query(options: api.Options, settings: Settings, categories: Categories) -> DetectOptions:
    """The body's options, completed by those of the query string."""
    query = query_options(settings, categories)
    given = {
        name: getattr(options, name) for name in options.model_fields_set & set(api.Options.model_fields)
    }
    return query.model_copy(update=given).detect_options(settings)


def _form(settings: Settings) -> tuple[MultiDict, MultiDict]:
    """(form fields, files) of a multipart body of at most ``MAX_UPLOAD_BYTES``."""
    limit = settings.max_upload_bytes
    request.max_content_length = limit + 1
    try:
        return request.form, request.files
    except RequestEntityTooLarge:
        raise _too_large(limit) from None


def _upload(storage: FileStorage, limit: int) -> ImageSource:
    """An uploaded file as an image source; a file over ``limit`` is not read past it."""
    return ImageSource(data=storage.stream.read(limit + 1), name=storage.filename or "")


def _files(files: MultiDict, settings: Settings) -> list[ImageSource]:
    unknown = sorted(set(files) - {"image"})
    if unknown:
        raise errors.InvalidRequest(f"unknown file fields {', '.join(map(repr, unknown))}; expected: image")
    return [_upload(storage, settings.fetch_max_bytes) for storage in files.getlist("image")]


def one_image(settings: Settings, categories: Categories) -> tuple[ImageSource, DetectOptions]:
    """The image and options of a ``/v1/detect`` request, however it was sent."""
    kind = body_kind()
    if kind == "raw":
        options = query_options(settings, categories).detect_options(settings)
        return ImageSource(data=body(settings.max_upload_bytes)), options
    if kind == "multipart":
        form, files = _form(settings)
        if "url" in form:
            raise errors.InvalidRequest('a URL is sent as JSON ({"url": "https://..."}), not in a form')
        uploads = _files(files, settings)
        if len(uploads) != 1:
            raise errors.InvalidRequest("send one image, in the 'image' file field")
        fields = checked(api.Options, text_values(form, "form"), "form fields", settings, False)
        return uploads[0], with_query(fields, settings, categories)
    values = json_object(settings.max_request_bytes, '{"url": "https://..."}')
    request_body = checked(api.DetectRequest, values, "fields", settings, True)
    return ImageSource(url=request_body.url), with_query(request_body, settings, categories)


def many_images(settings: Settings, categories: Categories) -> tuple[list[ImageSource], DetectOptions]:
    """The images and options of a ``/v1/detect/batch`` request (JSON or multipart)."""
    kind = body_kind()
    if kind == "multipart":
        form, files = _form(settings)
        if "image" in form:  # a part without a file name: text, not an image
            raise errors.InvalidRequest("'image' is sent as a file (a part with a filename), not as text")
        fields = checked(api.BatchForm, text_values(form, "form"), "form fields", settings, False)
        sources = [ImageSource(url=url) for url in fields.url or ()]
        return sources + _files(files, settings), with_query(fields, settings, categories)
    if kind == "raw":
        raise errors.InvalidRequest("a batch is sent as JSON or multipart/form-data, not as a raw image")
    # a JSON batch lists up to MAX_BATCH_IMAGES URLs: each may take what one JSON request may
    limit = settings.max_request_bytes * settings.max_batch_images
    values = json_object(limit, '{"urls": ["https://...", ...]}')
    batch = checked(api.BatchRequest, values, "fields", settings, True)
    return [ImageSource(url=url) for url in batch.urls], with_query(batch, settings, categories)


def predict_url(settings: Settings) -> str:
    values = json_object(settings.max_request_bytes, '{"url": "https://..."}')
    return checked(api.PredictRequest, values, "fields", settings, True).url
