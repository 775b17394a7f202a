"""The API's types, declared once: what a request may send and what it is answered.

pydantic models; from them come the checks of JSON bodies, form fields and query parameters (the
HTTP adapter), the options of gRPC calls (``grpc_app.convert`` fills the same ``Options``), the
JSON the routes answer and the OpenAPI schema (``http_app.openapi``). Limits that are settings
(the lowest threshold, the longest URL, the most images in a batch) are checked against the
``Settings`` passed as the validation context, and written into the schema as ``x-setting``
markers that the schema builder replaces by the configured values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from common.config import Settings
from common.errors import InvalidRequest
from common.fetch import URL_PATTERN
from common.model.detection import MASK_FORMATS, Detection, DetectOptions, Instance

MAX_CLASSES = 1000
MAX_CLASS_NAME = 200

MaskFormat = Literal["none", "polygons", "rle", "both"]
assert get_args(MaskFormat) == MASK_FORMATS  # the model's list, spelled as a type

# What a client calls an image: the schema says what validate_url accepts (common.fetch).
Url = Annotated[
    str,
    Field(
        description="An http(s) URL of an image on a public host (the SSRF guard refuses private, "
        "loopback and link-local addresses, also after redirects, unless `ALLOWED_PRIVATE_TARGETS` "
        "allows them), at most `MAX_URL_LENGTH` characters.",
        json_schema_extra={"pattern": URL_PATTERN, "x-setting-maxLength": "max_url_length"},
        examples=["http://images.cocodataset.org/val2017/000000039769.jpg"],
    ),
]
ClassName = Annotated[str, StringConstraints(max_length=MAX_CLASS_NAME)]

# gunicorn answers 414 itself, before the app sees the request, when its request line is over
# this (its ``limit_request_line``, which http_app/gunicorn.conf.py sets from here). So a query
# string may name only as many classes as surely fit beside the method, path and other options.
REQUEST_LINE_BYTES = 4094
_REQUEST_LINE_OTHERS = 512


def query_classes_limit(categories: list[str] | None) -> int:
    """The most ``classes`` a query string may name: as many of the longest name (percent-encoded)
    as fit in the request line; while the model's names are not known, of the longest allowed."""
    longest = max((len(quote(name, safe="")) for name in categories), default=1) if categories else 0
    longest = longest or 3 * MAX_CLASS_NAME
    fitting = (REQUEST_LINE_BYTES - _REQUEST_LINE_OTHERS) // (len("&classes=") + longest)
    return max(1, min(MAX_CLASSES, fitting))


def listed_names(values: Iterable[str], separator: str | None = None) -> list[str]:
    """Class names as a form, a query string (comma-separated, ``separator``) or a gRPC list
    sends them: each stripped, blanks left out."""
    parts = (part for value in values for part in (value.split(separator) if separator else [value]))
    return [name for name in (part.strip() for part in parts) if name]


def settings_of(info: ValidationInfo) -> Settings:
    """The Settings a validation runs with (its context), or the defaults."""
    context = info.context or {}
    return context.get("settings") or Settings()


def lowest_threshold(settings: Settings) -> float:
    return min(settings.min_score_threshold, settings.score_threshold)


class Options(BaseModel):
    """A full detection's options, in a JSON body, a form or the query string."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(
        None,
        description="The lowest score of a reported instance, from `MIN_SCORE_THRESHOLD` to 1. "
        "Default (also when null): `SCORE_THRESHOLD`.",
        json_schema_extra={"x-setting-minimum": "lowest_threshold", "maximum": 1},
        examples=[0.5],
    )
    classes: list[ClassName] | None = Field(
        None,
        max_length=MAX_CLASSES,
        description="Report only instances of these categories (`GET /v1/model` lists them; an "
        f"unknown name is 400). At most {MAX_CLASSES} names of at most {MAX_CLASS_NAME} characters. "
        "In a form or a query string: repeated, or one comma-separated value. Empty or null: all.",
        json_schema_extra={"x-setting-categories": True},
        examples=[["cat"]],
    )
    masks: MaskFormat | None = Field(
        None,
        description="The mask encodings to add to each instance: `polygons` (outlines), `rle` "
        "(COCO compressed RLE) or `both`. Default (also when null): `none`.",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        low = lowest_threshold(settings_of(info))
        if not math.isfinite(value) or not low <= value <= 1:
            raise ValueError(f"must be from {low:g} (MIN_SCORE_THRESHOLD) to 1")
        return value

    def detect_options(self, settings: Settings) -> DetectOptions:
        names = tuple(dict.fromkeys(self.classes or ()))
        threshold = settings.score_threshold if self.threshold is None else float(self.threshold)
        return DetectOptions(threshold, names, self.masks or "none")


class PredictRequest(BaseModel):
    """The course contract's body; other fields are ignored."""

    model_config = ConfigDict(extra="allow")
    url: Url


class DetectRequest(Options):
    url: Url


class DetectForm(Options):
    """An uploaded image and its options (a URL is sent as JSON)."""

    image: bytes = Field(
        description="The image file (at most `FETCH_MAX_BYTES`); its type is read from its bytes.",
        json_schema_extra={"format": "binary", "type": "string"},
    )


class BatchRequest(Options):
    urls: list[Any] = Field(
        description="The images' URLs, 1 to `MAX_BATCH_IMAGES` (more is 413). Each is checked when "
        "its turn comes, as `url` of `/v1/detect`: one that is not acceptable (not a string, a bad "
        "URL) gets its error line, the others carry on.",
        json_schema_extra={"minItems": 1, "x-setting-maxItems": "max_batch_images"},
    )


class BatchForm(Options):
    """At least one `url` or `image`, at most `MAX_BATCH_IMAGES` in all."""

    url: list[Any] | None = Field(
        None,
        description="Image URLs, one per `url` field; each is checked in its turn, as in a JSON batch.",
        json_schema_extra={"x-setting-maxItems": "max_batch_images"},
    )
    image: list[bytes] | None = Field(
        None,
        description="Image files, one per `image` file part.",
        json_schema_extra={
            "x-setting-maxItems": "max_batch_images",
            "items": {"type": "string", "format": "binary"},
        },
    )


# -- answers ---------------------------------------------------------------------------------


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class PredictResponse(Answer):
    objects: list[str] = Field(description="One category name per instance above the threshold, best first.")


class Rle(Answer):
    size: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=2, max_length=2, description="`[height, width]`."
    )
    counts: str


class Mask(Answer):
    """Present only when `masks` is not `none`, with only the encodings asked for."""

    polygons: list[list[float]] | None = Field(None, description="Outlines, each `[x0, y0, x1, y1, ...]`.")
    rle: Rle | None = Field(None, description="COCO's compressed RLE; `pycocotools.mask.decode` reads it.")


class InstanceOut(Answer):
    label: str
    score: float = Field(ge=0, le=1)
    box: list[float] = Field(min_length=4, max_length=4, description="`[x1, y1, x2, y2]` in image pixels.")
    mask: Mask | None = None

    @classmethod
    def of(cls, instance: Instance) -> InstanceOut:
        mask = None
        if instance.polygons is not None or instance.rle is not None:
            rle = Rle(**instance.rle) if instance.rle is not None else None
            mask = Mask(polygons=instance.polygons, rle=rle)
        return cls(label=instance.label, score=instance.score, box=list(instance.box), mask=mask)


class DetectResponse(Answer):
    width: int = Field(ge=1, description="Of the image as detected (after its EXIF orientation).")
    height: int = Field(ge=1)
    instances: list[InstanceOut] = Field(description="Best first.")

    @classmethod
    def of(cls, detection: Detection) -> DetectResponse:
        instances = [InstanceOut.of(instance) for instance in detection.instances or []]
        return cls(width=detection.width, height=detection.height, instances=instances)


class ErrorDetail(Answer):
    code: str = Field(examples=["invalid_request"])
    message: str


class ErrorResponse(Answer):
    error: ErrorDetail


class BatchDetectionLine(Answer):
    index: int = Field(ge=0, description="The image's place in the request.")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    instances: list[InstanceOut]


class BatchErrorLine(Answer):
    index: int = Field(ge=0)
    error: ErrorDetail


class ModelDescription(Answer):
    categories: list[str] = Field(description="The names the model can report, without placeholders.")
    score_threshold: float = Field(ge=0, le=1, description="The default `threshold`.")
    min_score_threshold: float = Field(
        ge=0, le=1, description="The lowest `threshold` a request may ask for."
    )
    max_batch_images: int = Field(ge=1, description="The most images in one batch.")
    mask_formats: list[MaskFormat]


class Readiness(Answer):
    status: Literal["ready", "loading", "failed"]
    message: str


class Liveness(Answer):
    status: Literal["alive"]


def validation_problem(exc: ValidationError, where: str) -> InvalidRequest:
    """The first problem of a pydantic ``ValidationError`` as a client-facing InvalidRequest;
    ``where`` names what was checked ('fields', 'form fields', 'query parameters')."""
    problem = exc.errors(include_url=False)[0]
    location = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown {where} {location!r}")
    if problem["type"] == "missing":
        return InvalidRequest(f"{location!r} is missing")
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] in ("literal_error", "enum", "union_tag_invalid"):  # say what was sent
        message += f", not {str(problem.get('input'))[:60]!r}"
    return InvalidRequest(f"{location!r}: {message}")
