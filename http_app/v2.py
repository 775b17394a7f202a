"""The Open Inference Protocol's REST routes (``/v2``): each turns a request into one call on the
``DetectionService`` through ``common.open_inference`` and its answer into the protocol's JSON,
or JSON followed by binary data (the binary tensor data extension). Errors are the service's
(``http_app.errors``), written as the protocol writes them: ``{"error": "..."}``."""

from __future__ import annotations

import base64
import json
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from common import api_v2, errors, open_inference
from common.open_inference import Tensor
from http_app import inputs
from http_app.routes import Api, client_alive

blueprint = Blueprint("v2", __name__, url_prefix="/v2")

HEADER_LENGTH = "Inference-Header-Content-Length"
Body = api_v2.InferRequest | api_v2.BinaryInferRequest


def _api() -> Api:
    return current_app.extensions["api"]


def _ready() -> bool:
    return _api().service.is_ready()


@blueprint.get("")
def server_metadata():
    return jsonify(api_v2.ServerMetadata(**open_inference.server_metadata()).model_dump())


@blueprint.get("/health/live")
def server_live():
    return jsonify(api_v2.Live(live=True).model_dump())


# The protocol says 4xx for "not ready"; like KServe, the service answers 503, as /readyz does.
@blueprint.get("/health/ready")
def server_ready():
    ready = _ready()
    return jsonify(api_v2.Ready(ready=ready).model_dump()), 200 if ready else 503


@blueprint.get("/models/<name>", defaults={"version": ""})
@blueprint.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str):
    settings = _api().settings
    open_inference.check_model(settings, name, version)
    return jsonify(api_v2.ModelMetadata(**open_inference.model_metadata(settings)).model_dump())


@blueprint.get("/models/<name>/ready", defaults={"version": ""})
@blueprint.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str):
    open_inference.check_model(_api().settings, name, version)
    ready = _ready()
    return jsonify(api_v2.Ready(ready=ready).model_dump()), 200 if ready else 503


@blueprint.post("/models/<name>/infer", defaults={"version": ""})
@blueprint.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str):
    context = _api()
    settings = context.settings
    with context.observer.request(request.headers.get("X-Request-ID"), "v2_infer") as record:
        g.request_id = record.request_id
        open_inference.check_model(settings, name, version)
        body, tensor = _request(settings)
        requested = [str(output.name) for output in body.outputs] if body.outputs is not None else None
        call = open_inference.infer_call(tensor, body.parameters, requested, settings)
        detection = context.service.detect(call.source, call.options, record, client_alive())
    return _answer(body, open_inference.output_tensors(detection, call), settings.v2_model_name)


def _request(settings) -> tuple[Body, Tensor]:
    """The request's JSON and its input, from a JSON body or one with binary data after it."""
    raw = inputs.body(settings.max_upload_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is None:
        body = _checked(api_v2.InferRequest, raw, settings)
        given = body.inputs[0]
        if isinstance(given, api_v2.ImageInput):
            return body, Tensor("image", "BYTES", [1], [base64.b64decode(given.data[0], validate=True)])
        return body, Tensor("url", "BYTES", [1], [given.data[0].encode()])
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise errors.InvalidRequest(f"{HEADER_LENGTH} must be the length of the JSON part of the body")
    split = int(header_length)
    binary_body = _checked(api_v2.BinaryInferRequest, raw[:split], settings)
    described = binary_body.inputs[0]
    data = raw[split:]
    if len(data) != described.parameters.binary_data_size:
        raise errors.InvalidRequest(
            f"input {described.name!r}: binary_data_size is {described.parameters.binary_data_size}, "
            f"but {len(data)} bytes follow the JSON"
        )
    elements = open_inference.deserialize_bytes(data, described.name)
    return binary_body, Tensor(described.name, "BYTES", [1], elements)


def _checked(model, raw: bytes, settings):
    values = inputs.parse_json_object(raw, "the request must be a JSON object (an inference request)")
    return inputs.checked(model, values, "fields", settings, True)


def _answer(body: Body, tensors: list[Tensor], model: str) -> Response:
    """JSON, or JSON then the binary outputs: those asked with ``binary_data``, or all with the
    request's ``binary_data_output``."""
    every = bool(body.parameters and body.parameters.binary_data_output)
    asked: dict[str, bool] = {
        output.name: output.parameters.binary_data
        for output in body.outputs or ()
        if output.parameters is not None and output.parameters.binary_data is not None
    }
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if asked.get(tensor.name, every):
            blob = open_inference.raw_data(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [element.decode() for element in tensor.data]
        else:
            entry["data"] = tensor.data
        outputs.append(entry)
    version = open_inference.MODEL_VERSION
    answer = api_v2.InferResponse.model_validate(
        {"model_name": model, "model_version": version, "id": body.id, "outputs": outputs}
    ).json_dict()
    if not blobs:
        return jsonify(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    response = Response(header + b"".join(blobs), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response
