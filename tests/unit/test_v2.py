"""The Open Inference Protocol's adapters in process, over a fake model: every REST route through
Flask's test client and every gRPC method through an in-process server (the stack test calls them
with tritonclient): answers, binary data both ways, errors as the protocol writes them, statuses,
not-ready and overload, request ids and the endpoint's metrics."""

from __future__ import annotations

import base64
import json
import struct
import threading

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import metrics, open_inference
from common.config import Settings
from common.pipeline import DetectionService
from grpc_app.server import build_server
from grpc_app.stubs import open_inference_grpc_pb2 as pb2
from grpc_app.stubs import open_inference_grpc_pb2_grpc as pb2_grpc
from http_app.app import create_app
from testkit.fake_model import FakeModel
from testkit.images import encode, scene
from testkit.stack import free_port

PNG = encode(scene(64, 48), "PNG")
INFER = "/v2/models/maskrcnn/infer"


def image_input(data: bytes = PNG) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}


@pytest.fixture
def settings_for(run_dir):
    def make(**env: str) -> Settings:
        return Settings.from_env({"RUN_DIR": str(run_dir), "BIND_HOST": "127.0.0.1",
                                  "GRPC_PORT": str(free_port())} | env)

    return make


@pytest.fixture
def rest(settings_for):
    def make(model: FakeModel | None = None, **env: str):
        return create_app(settings_for(**env), model or FakeModel()).test_client()

    return make


@pytest.fixture
def stub(settings_for):
    servers = []

    def make(model: FakeModel | None = None, **env: str):
        settings = settings_for(**env)
        metrics.init_multiprocess(settings)
        server, _ = build_server(settings, DetectionService(settings, model or FakeModel()))
        channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        servers.append((server, channel))
        return pb2_grpc.GRPCInferenceServiceStub(channel)

    yield make
    for server, channel in servers:
        channel.close()
        server.stop(None).wait()


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and "Traceback" not in body["error"]
    return body["error"]


# -- REST ----------------------------------------------------------------------------------


def test_health_and_metadata(rest):
    client = rest()
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/maskrcnn/versions/1/ready").get_json() == {"ready": True}
    assert client.get("/v2").get_json()["extensions"] == ["binary_tensor_data"]
    model = client.get("/v2/models/maskrcnn").get_json()
    assert [item["name"] for item in model["outputs"]] == ["labels", "scores", "boxes", "masks"]
    assert "unknown model 'other'" in error_of(client.get("/v2/models/other/ready"), 404)
    assert "version '2'" in error_of(client.get("/v2/models/maskrcnn/versions/2"), 404)
    loading = rest(FakeModel(state="loading", message="loading"))
    assert loading.get("/v2/health/ready").status_code == 503
    assert loading.get("/v2/models/maskrcnn/ready").get_json() == {"ready": False}
    assert loading.get("/v2/health/live").status_code == 200


def test_the_model_name_is_a_setting(rest):
    client = rest(V2_MODEL_NAME="detector")
    assert client.get("/v2/models/detector").get_json()["name"] == "detector"
    assert client.get("/v2/models/maskrcnn").status_code == 404


def test_infer_in_json(rest):
    client = rest()
    answer = client.post(INFER, json={"id": "r1", "inputs": [image_input()], "parameters": {"threshold": 0.3}},
                         headers={"X-Request-ID": "v2-call"})
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "v2-call"
    body = answer.get_json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("maskrcnn", "1", "r1")
    outputs = {item["name"]: item for item in body["outputs"]}
    assert list(outputs) == ["labels", "scores", "boxes"]  # masks only when asked
    assert outputs["labels"]["data"] == ["cat", "dog", "person"]
    assert outputs["boxes"]["shape"] == [3, 4] and outputs["boxes"]["data"][:4] == [1.0, 2.0, 30.0, 40.0]


def test_binary_data_both_ways_and_requested_outputs(rest):
    client = rest()
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(PNG) + 4}}],
        "outputs": [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "masks"}],
        "parameters": {"masks": "polygons"},
    }).encode()
    answer = client.post(INFER, data=header + open_inference.serialize_bytes([PNG]),
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert answer.status_code == 200 and answer.mimetype == "application/octet-stream"
    split = int(answer.headers["Inference-Header-Content-Length"])
    body = json.loads(answer.get_data()[:split])
    assert [item["name"] for item in body["outputs"]] == ["scores", "masks"]
    scores = struct.unpack("<2f", answer.get_data()[split:])
    assert body["outputs"][0]["parameters"] == {"binary_data_size": 8} and scores == pytest.approx((0.98, 0.9))
    assert set(json.loads(body["outputs"][1]["data"][0])) == {"polygons"}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": []}, "'inputs'"),
        ({"inputs": [image_input(), image_input()]}, "'inputs'"),
        ({"inputs": [image_input() | {"datatype": "FP32"}]}, "BYTES"),
        ({"inputs": [image_input() | {"shape": [2]}]}, "shape"),
        ({"inputs": [image_input() | {"data": ["not base64!"]}]}, "data"),
        ({"inputs": [image_input() | {"name": "picture"}]}, "picture"),
        ({"inputs": [image_input()], "parameters": {"treshold": 0.5}}, "treshold"),
        ({"inputs": [image_input()], "parameters": {"threshold": "high"}}, "threshold"),
        ({"inputs": [image_input()], "parameters": {"classes": "cat,unicorn"}}, "unicorn"),
        ({"inputs": [image_input()], "outputs": [{"name": "heatmap"}]}, "heatmap"),
        ({"inputs": [{"name": "url", "datatype": "BYTES", "shape": [1], "data": ["ftp://x/y"]}]}, "http"),
    ],
)
def test_bad_requests_are_400_in_the_protocols_form(rest, body, words):
    assert words in error_of(rest().post(INFER, json=body), 400)


def test_bad_binary_data(rest):
    client = rest()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 10}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    assert "binary_data_size is 10" in error_of(client.post(INFER, data=header + b"\0" * 3, headers=headers), 400)
    cut = header + struct.pack("<I", 99) + b"\0" * 6  # an element longer than the data
    assert "longer than" in error_of(client.post(INFER, data=cut, headers=headers), 400)
    bad_length = {"Inference-Header-Content-Length": "x"}
    assert "Inference-Header" in error_of(client.post(INFER, data=header, headers=bad_length), 400)


def test_limits_model_state_and_unknown_methods(rest, run_dir):
    assert error_of(rest(MAX_UPLOAD_BYTES="2048").post(INFER, json={"inputs": [image_input(b"\0" * 4096)]}), 413)
    assert "not" in error_of(rest().post(INFER, json={"inputs": [image_input(b"junk")]}), 422)
    error_of(rest(FakeModel(state="failed", message="bad weights")).post(INFER, json={"inputs": [image_input()]}),
             503)
    assert "see the service log" in error_of(
        rest(FakeModel(error=RuntimeError("secret"))).post(INFER, json={"inputs": [image_input()]}), 500)
    wrong = rest().put(INFER)
    assert "POST" in wrong.headers["Allow"]
    error_of(wrong, 405)


def test_a_full_stack_sheds_v2_calls_with_retry_after(rest):
    gate = threading.Event()
    model = FakeModel(gate=gate)
    client = rest(model, MAX_QUEUE_WAIT="0")
    held = [threading.Thread(target=client.post, args=(INFER,), kwargs={"json": {"inputs": [image_input()]}})
            for _ in "ab"]
    for thread in held:
        thread.start()
    for _ in held:  # the fake model lets both calls in: each holds an admission slot in its pass
        assert model.in_pass.acquire(timeout=10)
    shed = client.post(INFER, json={"inputs": [image_input()]})
    gate.set()
    for thread in held:
        thread.join(10)
    assert "capacity" in error_of(shed, 503) and int(shed.headers["Retry-After"]) >= 1


def test_calls_are_counted_under_their_own_endpoint(rest):
    client = rest()
    client.post(INFER, json={"inputs": [image_input()]})
    text = client.get("/metrics").get_data(as_text=True)
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "app_requests_total" and sample.labels.get("endpoint") == "v2_infer"]
    assert samples and samples[0].value >= 1


# -- gRPC ----------------------------------------------------------------------------------


def infer_request(**more) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name="maskrcnn", **more)
    if not request.inputs:
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(open_inference.serialize_bytes([PNG]))
    return request


def test_grpc_health_and_metadata(stub):
    client = stub()
    assert client.ServerLive(pb2.ServerLiveRequest()).live
    assert client.ServerReady(pb2.ServerReadyRequest()).ready
    assert client.ModelReady(pb2.ModelReadyRequest(name="maskrcnn", version="1")).ready
    assert client.ServerMetadata(pb2.ServerMetadataRequest()).extensions == ["binary_tensor_data"]
    model = client.ModelMetadata(pb2.ModelMetadataRequest(name="maskrcnn"))
    assert [(item.name, list(item.shape)) for item in model.outputs][2] == ("boxes", [-1, 4])
    with pytest.raises(grpc.RpcError) as failure:
        client.ModelMetadata(pb2.ModelMetadataRequest(name="other"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert not stub(FakeModel(state="loading")).ServerReady(pb2.ServerReadyRequest()).ready


def test_grpc_infer_answers_raw_outputs(stub):
    request = infer_request(id="g1")
    request.parameters["threshold"].double_param = 0.3
    request.parameters["masks"].string_param = "rle"
    answer, call = stub().ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-v2"),))
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-v2"
    assert answer.id == "g1" and [item.name for item in answer.outputs] == ["labels", "scores", "boxes", "masks"]
    labels = open_inference.deserialize_bytes(answer.raw_output_contents[0], "labels")
    assert labels == [b"cat", b"dog", b"person"]
    assert list(answer.outputs[2].shape) == [3, 4] and len(answer.raw_output_contents[2]) == 3 * 4 * 4
    by_contents = pb2.ModelInferRequest(model_name="maskrcnn")  # the input in contents, not raw
    by_contents.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(PNG)
    assert len(stub().ModelInfer(by_contents).outputs) == 3


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (lambda r: setattr(r, "model_name", "other"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP32"), grpc.StatusCode.INVALID_ARGUMENT, "BYTES"),
        (lambda r: r.inputs[0].shape.append(1), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x05\0"), grpc.StatusCode.INVALID_ARGUMENT, "cut"),
        (lambda r: r.outputs.add(name="heatmap"), grpc.StatusCode.INVALID_ARGUMENT, "heatmap"),
        (lambda r: r.parameters["treshold"].double_param, grpc.StatusCode.INVALID_ARGUMENT, "treshold"),
        (lambda r: setattr(r.parameters["threshold"], "string_param", "x"), grpc.StatusCode.INVALID_ARGUMENT,
         "threshold"),
    ],
    ids=["model", "datatype", "shape", "bytes", "output", "parameter", "parameter-type"],
)
def test_grpc_bad_requests(stub, change, code, words):
    request = infer_request()
    change(request)
    with pytest.raises(grpc.RpcError) as failure:
        stub().ModelInfer(request)
    assert failure.value.code() == code and words in failure.value.details()


def test_grpc_infer_when_not_ready_or_full(stub):
    with pytest.raises(grpc.RpcError) as failure:
        stub(FakeModel(state="failed", message="bad weights")).ModelInfer(infer_request())
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "bad weights" in failure.value.details()
    large = infer_request()
    large.raw_input_contents[0] = open_inference.serialize_bytes([PNG + b"\0" * 4096])
    with pytest.raises(grpc.RpcError) as failure:
        stub(MAX_UPLOAD_BYTES="2048").ModelInfer(large)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
