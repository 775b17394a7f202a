"""The Open Inference Protocol (KServe v2) on the running stack, called with NVIDIA's real
clients (``tritonclient.http`` and ``tritonclient.grpc``, run in .venv-clients by
``testkit/triton_calls.py``): health and metadata as the protocol says, inference with JSON and
with binary data, requested outputs, masks, errors, admission and limits; the detections equal
``/v1/detect``'s for the same image.

The stack is its own: ``MAX_QUEUE_WAIT=0`` (one pass running and one waiting, so two slow
requests fill it) and ``MAX_UPLOAD_BYTES`` small enough to test the size limit cheaply."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from testkit import REPO
from testkit.checkpoints import CLASS_A
from testkit.clients import metric_sum
from testkit.images import encode, scene
from testkit.stack import FAST_LIMITS, Stack

CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"
SLOW = "/drip?every=0.3&max=3"  # holds its request (and its admission slot) for about 3 s
UPLOAD_LIMIT = 256 * 1024
TRANSPORTS = ("http", "grpc")


@pytest.fixture(scope="module")
def v2_stack(tmp_path_factory, checkpoints, image_server):
    path, sha256 = checkpoints[CLASS_A]
    stack = Stack(
        tmp_path_factory.mktemp("stack-v2"),
        WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
        ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}",
        MAX_QUEUE_WAIT="0", MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        **FAST_LIMITS,
    )
    with stack.running():
        yield stack


@pytest.fixture(scope="module")
def photo(tmp_path_factory, image_server):
    """(file path, URL) of one 640x480 JPEG, on disk for uploads and on the image server."""
    data = encode(scene(640, 480), "JPEG")
    path = tmp_path_factory.mktemp("v2-images") / "scene.jpg"
    path.write_bytes(data)
    return str(path), image_server.add("/v2/scene.jpg", data, "image/jpeg")


def triton(stack, calls: list[dict]) -> list[dict]:
    assert CLIENTS_PYTHON.exists(), "tritonclient's venv is missing: scripts/setup --dev makes .venv-clients"
    spec = {"http": stack.http, "grpc": stack.grpc_target, "calls": calls}
    run = subprocess.run([str(CLIENTS_PYTHON), str(REPO / "testkit" / "triton_calls.py")], input=json.dumps(spec),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def detect_v1(stack, url: str, **options) -> dict:
    answer = requests.post(stack.http + "/v1/detect", json={"url": url, **options}, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def same_detections(outputs: dict, v1: dict, masks: str | None = None) -> None:
    instances = v1["instances"]
    assert outputs["labels"]["data"] == [item["label"] for item in instances]
    assert outputs["scores"]["data"] == pytest.approx([item["score"] for item in instances], abs=1e-4)
    assert outputs["boxes"]["shape"] == [len(instances), 4]
    flat = [value for item in instances for value in item["box"]]
    assert outputs["boxes"]["data"] == pytest.approx(flat, abs=0.01)
    if masks is not None:
        assert [json.loads(mask) for mask in outputs["masks"]["data"]] == [item["mask"] for item in instances]


def test_health_and_metadata_as_the_protocol_says(v2_stack):
    calls = [{"transport": transport, "op": op} for transport in TRANSPORTS
             for op in ("live", "ready", "model_ready", "server_metadata", "model_metadata")]
    results = triton(v2_stack, calls)
    for transport, start in zip(TRANSPORTS, (0, 5), strict=True):
        live, ready, model_ready, server, model = (result["value"] for result in results[start:start + 5])
        assert live is ready is model_ready is True, transport
        assert server["name"] == "instance-detector" and "binary_tensor_data" in server["extensions"]
        assert model["name"] == "maskrcnn" and model["versions"] == ["1"]
        shapes = {item["name"]: (item["datatype"], [int(size) for size in item["shape"]]) for item in model["outputs"]}
        assert shapes == {"labels": ("BYTES", [-1]), "scores": ("FP32", [-1]), "boxes": ("FP32", [-1, 4]),
                          "masks": ("BYTES", [-1])}
        assert {item["name"] for item in model["inputs"]} == {"image", "url"}
    assert requests.get(v2_stack.http + "/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(v2_stack.http + "/v2/models/maskrcnn/versions/1/ready", timeout=10).json() == {"ready": True}


def test_inference_equals_v1_detect_over_both_transports(v2_stack, photo):
    path, url = photo
    v1 = detect_v1(v2_stack, url)
    v1_masks = detect_v1(v2_stack, url, masks="polygons")
    v1_rle = detect_v1(v2_stack, url, masks="rle")
    calls = [
        {"transport": "http", "op": "infer", "image_file": path},  # binary data both ways
        {"transport": "http", "op": "infer", "image_file": path, "binary": False},  # JSON, base64
        {"transport": "http", "op": "infer", "url": url, "outputs": ["labels", "scores", "boxes", "masks"],
         "binary_outputs": True, "parameters": {"masks": "polygons"}},
        {"transport": "grpc", "op": "infer", "image_file": path},
        {"transport": "grpc", "op": "infer", "url": url, "outputs": ["labels", "scores", "boxes", "masks"]},
    ]
    results = triton(v2_stack, calls)
    for result in results:
        assert "value" in result, result
    same_detections(results[0]["value"]["outputs"], v1)
    same_detections(results[1]["value"]["outputs"], v1)
    same_detections(results[2]["value"]["outputs"], v1_masks, masks="polygons")
    same_detections(results[3]["value"]["outputs"], v1)
    same_detections(results[4]["value"]["outputs"], v1_rle, masks="rle")  # masks asked as an output: RLE
    assert [name for name in results[0]["value"]["order"]] == ["labels", "scores", "boxes"]


def test_requested_outputs_and_options_are_honoured(v2_stack, photo):
    path, url = photo
    calls = [
        {"transport": transport, "op": "infer", "image_file": path, "outputs": ["boxes", "labels"],
         "parameters": {"threshold": 0.5, "classes": CLASS_A}}
        for transport in TRANSPORTS
    ] + [
        {"transport": transport, "op": "infer", "image_file": path, "parameters": {"classes": "dog"}}
        for transport in TRANSPORTS
    ]
    results = triton(v2_stack, calls)
    for result in results[:2]:
        assert result["value"]["order"] == ["boxes", "labels"]
        assert result["value"]["outputs"]["labels"]["data"] == [CLASS_A]
    for result in results[2:]:
        assert result["value"]["outputs"]["labels"] == {"shape": [0], "data": []}
        assert result["value"]["outputs"]["boxes"]["shape"] == [0, 4]


def test_errors_are_the_protocols_with_the_services_codes(v2_stack, photo, tmp_path):
    path, _ = photo
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (UPLOAD_LIMIT + 1024))
    cases = [  # (call, HTTP status, gRPC status, words in the message)
        ({"model": "nope", "image_file": path}, "404", "NOT_FOUND", "unknown model 'nope'"),
        ({"datatype": "FP32", "image_file": path}, "400", "INVALID_ARGUMENT", "BYTES"),
        ({"image_file": str(junk)}, "422", "INVALID_ARGUMENT", "not"),
        ({"image_file": str(big)}, "413", "RESOURCE_EXHAUSTED", ""),
        ({"image_file": path, "outputs": ["nope"]}, "400", "INVALID_ARGUMENT", "labels"),
        ({"image_file": path, "parameters": {"treshold": 0.5}}, "400", "INVALID_ARGUMENT", "treshold"),
        ({"image_file": path, "parameters": {"classes": "unicorn"}}, "400", "INVALID_ARGUMENT", "unicorn"),
        ({"image_file": path, "parameters": {"threshold": 0.01}}, "400", "INVALID_ARGUMENT", "MIN_SCORE_THRESHOLD"),
        ({"url": "http://10.0.0.1/a.jpg"}, "403", "PERMISSION_DENIED", "ALLOWED_PRIVATE_TARGETS"),
    ]
    calls = [{"transport": transport, "op": "infer", **call} for call, *_ in cases for transport in TRANSPORTS]
    results = triton(v2_stack, calls)
    for index, (call, http_status, grpc_status, words) in enumerate(cases):
        for transport, result in zip(TRANSPORTS, results[2 * index:2 * index + 2], strict=True):
            assert "error" in result, (call, transport, result)
            expected = http_status if transport == "http" else f"StatusCode.{grpc_status}"
            assert result["status"] == expected, (call, transport, result)
            assert words in result["error"] and "Traceback" not in result["error"], (call, transport, result)
    # REST errors are the protocol's {"error": "..."}, also for bad bytes the client would not send
    bad = requests.post(v2_stack.http + "/v2/models/maskrcnn/infer", data=b'{"inputs": [',
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    cut = requests.post(v2_stack.http + "/v2/models/maskrcnn/infer", data=b'{"inputs": []}\x00\x00',
                        headers={"Inference-Header-Content-Length": "99"}, timeout=10)
    assert cut.status_code == 400 and "Inference-Header-Content-Length" in cut.json()["error"]
    assert requests.get(v2_stack.http + "/v2/models/maskrcnn/versions/2", timeout=10).status_code == 404
    assert requests.get(v2_stack.http + "/readyz", timeout=10).status_code == 200  # still serving


def test_v2_calls_obey_admission(v2_stack, photo, image_server):
    path, _ = photo
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(v2_stack.predict_http, image_server.url(SLOW), 30) for _ in range(2)]
        v2_stack.wait_until(lambda: metric_sum(v2_stack.http, "app_requests_in_flight") >= 2, 10, "2 admitted")
        results = triton(v2_stack, [{"transport": transport, "op": "infer", "image_file": path}
                                    for transport in TRANSPORTS])
        direct = requests.post(v2_stack.http + "/v2/models/maskrcnn/infer", timeout=10, json={
            "inputs": [{"name": "url", "datatype": "BYTES", "shape": [1], "data": [image_server.url("/img/x")]}]})
        for call in slow:
            call.result(60)
    assert results[0]["status"] == "503" and "capacity" in results[0]["error"]
    assert results[1]["status"] == "StatusCode.UNAVAILABLE" and "overloaded: " in results[1]["error"]
    assert direct.status_code == 503 and int(direct.headers["Retry-After"]) >= 1 and "error" in direct.json()


def test_v2_requests_are_counted_under_their_own_endpoint_only(v2_stack, photo):
    path, _ = photo
    course_http = metric_sum(v2_stack.http, "app_http_inference_count_total")
    course_grpc = metric_sum(v2_stack.http, "app_grpc_inference_count_total")
    before = {protocol: metric_sum(v2_stack.http, "app_requests_total", protocol=protocol, endpoint="v2_infer")
              for protocol in TRANSPORTS}
    triton(v2_stack, [{"transport": transport, "op": "infer", "image_file": path} for transport in TRANSPORTS])
    for protocol in TRANSPORTS:
        after = metric_sum(v2_stack.http, "app_requests_total", protocol=protocol, endpoint="v2_infer")
        assert after == before[protocol] + 1, protocol
    assert metric_sum(v2_stack.http, "app_http_inference_count_total") == course_http
    assert metric_sum(v2_stack.http, "app_grpc_inference_count_total") == course_grpc


def test_reflection_and_health_list_the_protocols_service(v2_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(v2_stack.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {service.name for service in next(answers).list_services_response.service}
    assert {"inference.InstanceDetector", "inference.GRPCInferenceService"} <= names
