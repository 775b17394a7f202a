"""Admission control, cancelled clients, request ids and request log lines, on a stack of their own.

``MAX_QUEUE_WAIT=0`` gives the smallest admission: one pass running and one waiting, so two slow
requests fill the stack and a third must be shed at once.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.clients import metric_sum
from testkit.images import encode, scene
from testkit.stack import FAST_LIMITS, Stack

SLOW = "/drip?every=0.3&max=3"  # holds its request (and its admission slot) for about 3 s


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory, checkpoints, image_server):
    path, sha256 = checkpoints[CLASS_A]
    stack = Stack(
        tmp_path_factory.mktemp("stack-overload"),
        WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
        ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}",
        MAX_QUEUE_WAIT="0",
        **FAST_LIMITS,
    )
    with stack.running():
        yield stack


def _grpc_call(stub_and_pb2, target, url, timeout=30.0, metadata=()):
    """(code, details, trailing metadata, initial metadata) of one Predict."""
    pb2, pb2_grpc = stub_and_pb2
    with grpc.insecure_channel(target) as channel:
        call = pb2_grpc.InstanceDetectorStub(channel).Predict.with_call
        try:
            _, outcome = call(pb2.InstanceDetectorInput(url=url), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            outcome = exc
        return (outcome.code(), outcome.details(), dict(outcome.trailing_metadata() or ()),
                dict(outcome.initial_metadata() or ()))


def _wait_admitted(stack, count, timeout=10.0):
    """Until ``count`` requests hold admission slots (in flight, both protocols)."""
    stack.wait_until(lambda: metric_sum(stack.http, "app_requests_in_flight") >= count, timeout,
                     f"{count} requests admitted")


def test_beyond_capacity_requests_are_shed_at_once_before_fetching(small_stack, image_server, grpc_stubs):
    stack = small_stack
    image_server.add("/overload/never-fetched.jpg", encode(scene(), "JPEG"))
    shed_url = image_server.url("/overload/never-fetched.jpg")
    counted_before = metric_sum(stack.http, "app_http_inference_count_total")
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(stack.predict_http, image_server.url(SLOW), 30) for _ in range(2)]
        _wait_admitted(stack, 2)

        began = time.monotonic()
        response = stack.predict_http(shed_url, timeout=10)
        http_seconds = time.monotonic() - began
        began = time.monotonic()
        code, details, trailers, _ = _grpc_call(grpc_stubs, stack.grpc_target, shed_url)
        grpc_seconds = time.monotonic() - began

        # health is answered at once while the stack is full
        for probe in ("/healthz", "/readyz"):
            began = time.monotonic()
            assert requests.get(stack.http + probe, timeout=5).status_code == 200
            assert time.monotonic() - began < 1.0, probe
        assert stack.grpc_health() == "SERVING"
        assert not any(call.done() for call in slow), "the slow requests should still hold their slots"
        [call.result() for call in slow]

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "overloaded"
    assert int(response.headers["Retry-After"]) >= 1
    assert http_seconds < 1.0, f"a shed took {http_seconds:.2f} s"
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("overloaded: "), (code, details)
    assert int(trailers["grpc-retry-pushback-ms"]) >= 1000
    assert grpc_seconds < 1.0, f"a gRPC shed took {grpc_seconds:.2f} s"
    assert image_server.requests_for("/overload/never-fetched.jpg") == [], "a shed request fetched its image"
    # every call is counted, shed or not; sheds are counted per protocol and as errors
    assert metric_sum(stack.http, "app_http_inference_count_total") == counted_before + 3
    assert metric_sum(stack.http, "app_requests_shed_total", protocol="http") >= 1
    assert metric_sum(stack.http, "app_requests_shed_total", protocol="grpc") >= 1
    assert metric_sum(stack.http, "app_request_errors_total", code="overloaded") >= 2
    # once the slots are free again, requests are admitted
    assert stack.predict_http(shed_url, timeout=60).json() == {"objects": [CLASS_A]}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_client_gone_before_its_pass_costs_no_pass(small_stack, image_server, grpc_stubs, protocol):
    stack = small_stack
    url = image_server.url("/img/jpeg")
    passes_before = metric_sum(stack.http, "app_model_passes_total", result="run")
    skipped_before = metric_sum(stack.http, "app_model_passes_total", result="skipped")
    first = threading.Thread(target=stack.predict_http, args=(url, 60))
    first.start()
    _wait_admitted(stack, 1)
    time.sleep(0.3)  # fetched and decoded by now: its pass (seconds long on one thread) is running
    # the second request waits behind the first's pass, and its client gives up meanwhile
    if protocol == "http":
        with pytest.raises(requests.Timeout):
            stack.predict_http(url, timeout=0.5)
    else:
        code, *_ = _grpc_call(grpc_stubs, stack.grpc_target, url, timeout=0.5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    first.join(60)
    stack.wait_until(
        lambda: metric_sum(stack.http, "app_model_passes_total", result="skipped") == skipped_before + 1,
        10, "the abandoned request's pass skipped")
    assert metric_sum(stack.http, "app_model_passes_total", result="run") == passes_before + 1
    stack.wait_until(lambda: any(line["code"] == "cancelled" and line["protocol"] == protocol
                                 for line in stack.request_lines()), 10, "the cancelled request's log line")


def test_request_ids_are_honoured_returned_and_logged(small_stack, image_server, grpc_stubs):
    stack = small_stack
    url = image_server.url("/img/jpeg") + "?token=SECRET-VALUE"
    response = requests.post(stack.http + "/predict", json={"url": url},
                             headers={"X-Request-ID": "trace-42.a"}, timeout=60)
    assert response.json() == {"objects": [CLASS_A]}
    assert response.headers["X-Request-ID"] == "trace-42.a"
    unusable = requests.post(stack.http + "/predict", json={"url": "ftp://x/y.jpg"},
                             headers={"X-Request-ID": "bad id with spaces"}, timeout=10)
    assert unusable.status_code == 400
    made = unusable.headers["X-Request-ID"]
    assert made != "bad id with spaces" and len(made) == 32

    code, _, _, initial = _grpc_call(grpc_stubs, stack.grpc_target, url, metadata=(("x-request-id", "g-7"),))
    assert code == grpc.StatusCode.OK
    assert initial["x-request-id"] == "g-7"

    def logged():
        return {line["request_id"]: line for line in stack.request_lines()}

    stack.wait_until(lambda: {"trace-42.a", made, "g-7"} <= logged().keys(), 10, "the request log lines")
    lines = logged()
    http_line, grpc_line, bad_line = lines["trace-42.a"], lines["g-7"], lines[made]
    assert (http_line["protocol"], http_line["status"], http_line["code"]) == ("http", "200", "ok")
    assert (grpc_line["protocol"], grpc_line["status"], grpc_line["code"]) == ("grpc", "OK", "ok")
    for line in (http_line, grpc_line):
        assert line["image_host"] == "127.0.0.1" and line["objects"] == 1
        assert set(line["stages"]) == {"fetch", "decode", "queue_wait", "inference"}
        assert line["duration_seconds"] >= line["stages"]["inference"] > 0
    assert (bad_line["status"], bad_line["code"]) == ("400", "invalid_request") and bad_line["reason"]
    assert "SECRET-VALUE" not in stack.log_path.read_text(errors="replace"), "a query string reached the log"


def test_every_process_logs_json(small_stack):
    import json

    processes = set()
    for line in small_stack.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            processes.add(json.loads(line)["process"])
    assert {"http", "grpc", "model"} <= processes


def test_detections_and_batches_obey_admission_too(small_stack, image_server, grpc_stubs):
    """A full stack sheds /v1/detect, a whole batch (HTTP and gRPC) before fetching any of its
    images, with the retry hint; once there is room, the same batch runs."""
    stack = small_stack
    pb2, pb2_grpc = grpc_stubs
    image_server.add("/overload/batch.jpg", encode(scene(), "JPEG"))
    url = image_server.url("/overload/batch.jpg")
    fetched_before = len(image_server.requests_for("/overload/batch.jpg"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        slow = [pool.submit(stack.predict_http, image_server.url(SLOW), 30) for _ in range(2)]
        _wait_admitted(stack, 2)
        single = requests.post(stack.http + "/v1/detect", json={"url": url}, timeout=10)
        batch = requests.post(stack.http + "/v1/detect/batch", json={"urls": [url] * 3}, timeout=10)
        with grpc.insecure_channel(stack.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                list(pb2_grpc.InstanceDetectorStub(channel).DetectBatch(
                    pb2.DetectBatchRequest(images=[pb2.ImageInput(url=url)] * 3), timeout=10))
        assert not any(call.done() for call in slow), "the slow requests should still hold their slots"
        for answer in (single, batch):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "overloaded"
            assert int(answer.headers["Retry-After"]) >= 1
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details().startswith("overloaded:")
        assert "grpc-retry-pushback-ms" in dict(caught.value.trailing_metadata() or ())
        assert len(image_server.requests_for("/overload/batch.jpg")) == fetched_before
        for call in slow:
            call.result()
    lines = requests.post(stack.http + "/v1/detect/batch", json={"urls": [url] * 3}, timeout=120).text
    assert [line.count('"label": "kite"') for line in lines.splitlines()] == [1, 1, 1]
