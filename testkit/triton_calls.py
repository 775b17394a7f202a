"""Calls made with NVIDIA's tritonclient, run in its own venv (.venv-clients: its protobuf pin
clashes with the service's):

    .venv-clients/bin/python testkit/triton_calls.py < calls.json > results.json

The input is ``{"http": "http://127.0.0.1:port", "grpc": "127.0.0.1:port", "calls": [...]}``; each
call has ``transport`` ("http" or "grpc"), ``op`` (live, ready, server_metadata, model_metadata,
model_ready, infer), ``model``, and for ``infer``: ``image_file`` or ``url``, ``binary`` (send the
input as binary data; JSON otherwise, the image then in base64), ``outputs`` (names, or null for
all), ``binary_outputs``, ``parameters``, and optionally ``datatype`` ("FP32": a float input, which the
model refuses). Each result is ``{"value": ...}`` or ``{"error": ...,
"status": ...}``; an infer's value maps each output to its list (BYTES decoded) and shape.
Only tritonclient, numpy and the standard library: this venv has nothing else.
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def _input_array(call: dict, transport: str) -> tuple[str, np.ndarray]:
    if call.get("datatype") == "FP32":  # a tensor of the wrong datatype for the model's input
        return "image", np.zeros([1], dtype=np.float32)
    if "url" in call:
        return "url", np.array([call["url"].encode()], dtype=np.object_)
    with open(call["image_file"], "rb") as handle:
        data = handle.read()
    if transport == "http" and not call.get("binary", True):
        data = base64.b64encode(data)  # BYTES in JSON are text: the image goes in base64
    return "image", np.array([data], dtype=np.object_)


def _infer(client, module, call: dict, transport: str) -> dict:
    name, array = _input_array(call, transport)
    tensor = module.InferInput(name, list(array.shape), call.get("datatype", "BYTES"))
    if transport == "http":
        tensor.set_data_from_numpy(array, binary_data=call.get("binary", True))
    else:
        tensor.set_data_from_numpy(array)
    outputs = None
    if call.get("outputs") is not None:
        if transport == "http":
            binary = call.get("binary_outputs", False)
            outputs = [module.InferRequestedOutput(output, binary_data=binary) for output in call["outputs"]]
        else:
            outputs = [module.InferRequestedOutput(output) for output in call["outputs"]]
    kwargs = {"outputs": outputs, "parameters": call.get("parameters") or None}
    result = client.infer(call.get("model", "maskrcnn"), [tensor], **kwargs)
    response = result.get_response()
    names = [item["name"] for item in response["outputs"]] if transport == "http" else [
        item.name for item in response.outputs
    ]
    answer = {}
    for output in names:
        values = result.as_numpy(output)
        flat = [_element(item) for item in values.reshape(-1)]
        answer[output] = {"shape": list(values.shape), "data": flat}
    return {"outputs": answer, "order": names}


def _element(item) -> str | float:
    if isinstance(item, bytes):
        return item.decode()
    return item if isinstance(item, str) else float(item)


def run(call: dict, clients: dict) -> dict:
    transport = call["transport"]
    client, module = clients[transport]
    model = call.get("model", "maskrcnn")
    op = call["op"]
    if op == "live":
        return {"value": client.is_server_live()}
    if op == "ready":
        return {"value": client.is_server_ready()}
    if op == "model_ready":
        return {"value": client.is_model_ready(model)}
    if op == "server_metadata":
        metadata = client.get_server_metadata()
        return {"value": metadata if transport == "http" else _message(metadata)}
    if op == "model_metadata":
        metadata = client.get_model_metadata(model)
        return {"value": metadata if transport == "http" else _message(metadata)}
    return {"value": _infer(client, module, call, transport)}


def _message(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def main() -> int:
    spec = json.load(sys.stdin)
    clients = {
        "http": (httpclient.InferenceServerClient(spec["http"].removeprefix("http://"), network_timeout=120),
                 httpclient),
        "grpc": (grpcclient.InferenceServerClient(spec["grpc"]), grpcclient),
    }
    results = []
    for call in spec["calls"]:
        try:
            results.append(run(call, clients))
        except InferenceServerException as exc:
            results.append({"error": exc.message(), "status": exc.status()})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
