"""The Open Inference Protocol's types for the served model, declared once like ``common.api``'s:
the REST adapter checks JSON with them, the gRPC adapter checks a message's parameters with
``InferParameters``, and the OpenAPI schema of the ``/v2`` routes comes from them.

They are the protocol's JSON objects narrowed to what this model takes (one input, ``image`` or
``url``, of shape [1]; the outputs it has; the parameters it reads), so that the schema says
exactly what the service accepts.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from common import api

# Exactly what base64.b64decode(validate=True) accepts.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
OutputName = Literal["labels", "scores", "boxes", "masks"]


def _whole(value: float) -> int:
    if not value.is_integer():
        raise ValueError("must be a whole number")
    return int(value)


# An integer as JSON Schema has it: 5 and 5.0 alike (pydantic's strict int refuses 5.0).
WholeNumber = Annotated[
    float, Field(ge=0), AfterValidator(_whole), WithJsonSchema({"type": "integer", "minimum": 0})
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InferParameters(_Strict):
    """The request's parameters: the model's options, and the protocol's and Triton's clients'
    own (accepted and ignored: one stateless model has no sequences or priorities)."""

    threshold: float | None = Field(
        None,
        description="As `threshold` of `/v1/detect`: from `MIN_SCORE_THRESHOLD` to 1.",
        json_schema_extra={"x-setting-minimum": "lowest_threshold", "maximum": 1},
    )
    classes: str | None = Field(
        None,
        description="Category names, comma-separated without spaces (`cat,dog`); empty: all.",
        json_schema_extra={"x-setting-classes-pattern": True},
    )
    masks: api.MaskFormat | None = Field(None, description="As `masks` of `/v1/detect`.")
    binary_data_output: bool | None = Field(
        None, description="Every output in binary form (the binary tensor data extension)."
    )
    priority: WholeNumber | None = None
    timeout: WholeNumber | None = None
    sequence_id: WholeNumber | str | None = None
    sequence_start: bool | None = None
    sequence_end: bool | None = None

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None:
            low = api.lowest_threshold(api.settings_of(info))
            if not math.isfinite(value) or not low <= value <= 1:
                raise ValueError(f"must be from {low:g} (MIN_SCORE_THRESHOLD) to 1")
        return value

    def options(self) -> api.Options:
        classes = self.classes.split(",") if self.classes else None
        # checked already (the threshold against the settings this was validated with)
        return api.Options.model_construct(threshold=self.threshold, classes=classes, masks=self.masks)


class _Input(_Strict):
    datatype: Literal["BYTES"]
    shape: list[Literal[1]] = Field(min_length=1, max_length=1, description="`[1]`: one image.")


class ImageInput(_Input):
    name: Literal["image"]
    data: list[Annotated[str, Field(pattern=BASE64_PATTERN)]] = Field(
        min_length=1, max_length=1, description="The encoded image (JPEG, PNG, ...), in base64."
    )


class UrlInput(_Input):
    name: Literal["url"]
    data: list[api.Url] = Field(min_length=1, max_length=1)


class BinarySize(_Strict):
    binary_data_size: Annotated[int, Field(ge=0)]


class InputDescription(_Input):
    """An input without its data (a gRPC message's, whose data is apart)."""

    name: Literal["image", "url"]


class BinaryInput(InputDescription):
    """An input whose data follows the JSON (the binary tensor data extension)."""

    parameters: BinarySize


class OutputParameters(_Strict):
    binary_data: bool | None = None


class RequestedOutput(_Strict):
    name: OutputName
    parameters: OutputParameters | None = None


class _Request(_Strict):
    id: str | None = Field(None, max_length=256, description="Returned in the answer.")
    parameters: InferParameters | None = None
    outputs: list[RequestedOutput] | None = Field(
        None, max_length=16, description="The outputs to answer, in this order; absent: all."
    )


class InferRequest(_Request):
    """An inference request in JSON."""

    inputs: list[Annotated[ImageInput | UrlInput, Field(discriminator="name")]] = Field(
        min_length=1, max_length=1
    )


class BinaryInferRequest(_Request):
    """The JSON part of a request with binary data (``Inference-Header-Content-Length``)."""

    inputs: list[BinaryInput] = Field(min_length=1, max_length=1)


class InferOutput(_Strict):
    name: OutputName
    datatype: Literal["BYTES", "FP32"]
    shape: list[Annotated[int, Field(ge=0)]]
    data: list[str | float] | None = Field(None, description="Absent when the output is in binary form.")
    parameters: BinarySize | None = None


class InferResponse(_Strict):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]

    def json_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class TensorMetadata(_Strict):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(_Strict):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(_Strict):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Live(_Strict):
    live: bool


class Ready(_Strict):
    ready: bool


class Error(_Strict):
    """Every error of the `/v2` routes, as the protocol writes it."""

    error: str
