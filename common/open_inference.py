"""The Open Inference Protocol (KServe "v2") for the served model, shared by its REST adapter
(``http_app/v2.py``) and its gRPC one (``grpc_app/v2.py``), which only move tensors in and out of
their wire formats (docs/api.md, "Open Inference Protocol").

One model, named by ``V2_MODEL_NAME``, version "1". Inputs: ``image`` (the encoded image, BYTES
[1]) or ``url`` (BYTES [1]), and the request parameters ``threshold``, ``classes`` (one string,
comma-separated) and ``masks`` (``common.api_v2``'s types, then ``common.api.Options``).
Outputs: ``labels`` (BYTES [N]), ``scores`` (FP32 [N]), ``boxes`` (FP32 [N, 4], x1 y1 x2 y2 in
image pixels) and ``masks`` (BYTES [N], each the instance's mask as ``/v1/detect`` writes it, in
JSON), best first. A call is one ``DetectionService.detect``: the same checks, SSRF guard,
admission and limits as ``/v1/detect``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import ValidationError

from common import api, api_v2, errors
from common.config import Settings
from common.model import Detection, DetectOptions
from common.pipeline import ImageSource

SERVER_NAME = "instance-detector"
EXTENSIONS = ["binary_tensor_data"]
MODEL_VERSION = "1"
PLATFORM = "pytorch_torchvision"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


INPUTS = (TensorSpec("image", "BYTES", (1,)), TensorSpec("url", "BYTES", (1,)))
OUTPUTS = (
    TensorSpec("labels", "BYTES", (-1,)),
    TensorSpec("scores", "FP32", (-1,)),
    TensorSpec("boxes", "FP32", (-1, 4)),
    TensorSpec("masks", "BYTES", (-1,)),
)
OUTPUT_NAMES = [spec.name for spec in OUTPUTS]
# What masks are computed as when the ``masks`` output is asked for without the parameter.
MASKS_WHEN_REQUESTED = "rle"


@dataclass
class Tensor:
    """A tensor as the protocol carries it: ``data`` flat, row-major (bytes for BYTES, floats for
    FP32)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


@dataclass(frozen=True)
class InferCall:
    """What an inference request asks: the image, the options, the outputs in the order to answer."""

    source: ImageSource
    options: DetectOptions
    outputs: list[str]


def server_metadata() -> dict[str, Any]:
    try:
        version = metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # run from a checkout that was not installed
        version = "1.0.0"
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def check_model(settings: Settings, name: str, version: str = "") -> None:
    """``NotFound`` unless ``name`` (and ``version``, when given) is the served model."""
    if name != settings.v2_model_name:
        raise errors.NotFound(f"unknown model {name[:100]!r}; this server serves {settings.v2_model_name!r}")
    if version not in ("", MODEL_VERSION):
        raise errors.NotFound(f"unknown version {version[:40]!r} of model {name!r}; it has version 1")


def model_metadata(settings: Settings) -> dict[str, Any]:
    def described(specs: Iterable[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)} for spec in specs]

    return {
        "name": settings.v2_model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": described(INPUTS),
        "outputs": described(OUTPUTS),
    }


# -- BYTES elements in binary form ------------------------------------------------------------


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as the protocol sends them in binary: each a little-endian uint32 length,
    then its bytes."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise errors.InvalidRequest(f"input {name!r}: its binary data is cut inside an element's length")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise errors.InvalidRequest(f"input {name!r}: an element is longer than its binary data")
        elements.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    return elements


def raw_data(tensor: Tensor) -> bytes:
    """An output tensor's data in binary form (BYTES as above, FP32 little-endian)."""
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return struct.pack(f"<{len(tensor.data)}f", *tensor.data)


# -- requests ----------------------------------------------------------------------------------


def check_input(fields: dict[str, Any]) -> api_v2.InputDescription:
    """An input described by a gRPC message (name, datatype, shape; its data apart), checked as
    the REST adapter's JSON is checked."""
    try:
        return api_v2.InputDescription.model_validate(fields, strict=True)
    except ValidationError as exc:
        raise api.validation_problem(exc, "input fields") from None


def check_outputs(names: list[str]) -> list[str]:
    """Requested output names, checked as the REST adapter's JSON is checked."""
    for name in names:
        try:
            api_v2.RequestedOutput.model_validate({"name": name}, strict=True)
        except ValidationError as exc:
            raise api.validation_problem(exc, "outputs") from None
    return names


def parameters_of(values: Mapping[str, object], settings: Settings) -> api_v2.InferParameters:
    try:
        return api_v2.InferParameters.model_validate(values, strict=True, context={"settings": settings})
    except ValidationError as exc:
        raise api.validation_problem(exc, "parameters") from None


def infer_call(
    tensor: Tensor,
    parameters: api_v2.InferParameters | None,
    requested: list[str] | None,
    settings: Settings,
) -> InferCall:
    """The call of a request with the checked input ``tensor`` (its one element: bytes) and
    ``parameters``; ``requested`` names the outputs to answer (None: all)."""
    if len(tensor.data) != 1:
        raise errors.InvalidRequest(f"input {tensor.name!r} must hold one element, not {len(tensor.data)}")
    element = tensor.data[0]
    if tensor.name == "image":
        source = ImageSource(data=element)
    else:
        try:
            source = ImageSource(url=element.decode("utf-8"))
        except UnicodeDecodeError:
            raise errors.InvalidRequest("input 'url' is not UTF-8 text") from None
    options = (parameters or api_v2.InferParameters.model_validate({})).options()
    if requested is not None and "masks" in requested and options.masks in (None, "none"):
        options = options.model_copy(update={"masks": MASKS_WHEN_REQUESTED})
    detect_options = options.detect_options(settings)
    if requested is None:
        requested = [name for name in OUTPUT_NAMES if name != "masks" or detect_options.wants_masks]
    return InferCall(source, detect_options, list(dict.fromkeys(requested)))


# -- answers -----------------------------------------------------------------------------------


def output_tensors(detection: Detection, call: InferCall) -> list[Tensor]:
    """The requested outputs of a detection, in the requested order."""
    instances = detection.instances or []
    count = len(instances)

    def make(name: str) -> Tensor:
        if name == "labels":
            return Tensor(name, "BYTES", [count], [item.label.encode() for item in instances])
        if name == "scores":
            return Tensor(name, "FP32", [count], [float(item.score) for item in instances])
        if name == "boxes":
            corners = [float(value) for item in instances for value in item.box]
            return Tensor(name, "FP32", [count, 4], corners)
        masks = [api.InstanceOut.of(item).mask for item in instances]
        encoded = [json.dumps(mask.json_dict() if mask else {}, separators=(",", ":")) for mask in masks]
        return Tensor(name, "BYTES", [count], [text.encode() for text in encoded])

    return [make(name) for name in call.outputs]
