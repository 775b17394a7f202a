"""The product contract, end to end through supervisord, gunicorn (2 workers) and the gRPC server."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict

from testkit.checkpoints import CLASS_A, CLASS_B
from testkit.images import sample_images
from testkit.stack import FAST_LIMITS, Stack

HTTP_COUNTER = "app_http_inference_count"
GRPC_COUNTER = "app_grpc_inference_count"


@pytest.mark.parametrize("name", sorted(sample_images()))
def test_every_format_is_answered_over_http(stack, image_server, name):
    response = stack.predict_http(image_server.url(f"/img/{name}"))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["objects"]
    assert body["objects"] == [CLASS_A]


@pytest.mark.parametrize("name", ["jpeg", "png-16bit", "gif-animated"])
def test_http_and_grpc_give_the_same_objects(stack, image_server, grpc_predict, name):
    url = image_server.url(f"/img/{name}")
    over_http = stack.predict_http(url).json()["objects"]
    assert grpc_predict(url) == over_http


def test_one_predict_raises_the_http_counter_by_exactly_one(stack, image_server):
    before = stack.metric_value(HTTP_COUNTER)
    grpc_before = stack.metric_value(GRPC_COUNTER)
    assert stack.predict_http(image_server.url("/img/jpeg")).status_code == 200
    assert stack.metric_value(HTTP_COUNTER) == before + 1
    assert stack.metric_value(GRPC_COUNTER) == grpc_before


def test_metrics_exposition_shape(stack):
    text = requests.get(stack.http + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("app_http_inference_count")]
    assert len(lines) == 1 and lines[0].startswith("app_http_inference_count_total ")
    assert "# TYPE app_http_inference_count_total counter" in text or \
        "# TYPE app_http_inference_count counter" in text


def _values_by_pid(metrics_dir: Path, metric: str) -> dict[int, float]:
    values = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for _key, value, *_timestamps in MmapedDict.read_all_values_from_file(str(path)):
            if metric in _key:
                values[pid] = values.get(pid, 0.0) + value
    return values


def test_concurrent_calls_are_counted_exactly_across_workers(stack, image_server):
    """Good and failing calls at once, spread over both gunicorn workers: every one counts."""
    urls = [image_server.url("/img/jpeg")] * 4 + [image_server.url("/missing")] * 8
    before = stack.metric_value(HTTP_COUNTER)
    with ThreadPoolExecutor(len(urls)) as pool:
        statuses = sorted(pool.map(lambda url: stack.predict_http(url).status_code, urls))
    assert statuses == [200] * 4 + [502] * 8
    assert stack.metric_value(HTTP_COUNTER) == before + len(urls)
    busy_workers = [pid for pid, value in _values_by_pid(stack.metrics_dir, HTTP_COUNTER).items() if value]
    assert len(busy_workers) >= 2, "the calls did not reach both gunicorn workers"


def test_grpc_calls_are_counted_exactly(stack, image_server, grpc_predict):
    import grpc

    before = stack.metric_value(GRPC_COUNTER)
    http_before = stack.metric_value(HTTP_COUNTER)

    def call(url):
        try:
            return len(grpc_predict(url))
        except grpc.RpcError as error:
            return error.code().name

    urls = [image_server.url("/img/png")] * 2 + [image_server.url("/missing")] * 4
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(call, urls))
    assert results == [1, 1] + ["FAILED_PRECONDITION"] * 4
    assert stack.metric_value(GRPC_COUNTER) == before + len(urls)
    assert stack.metric_value(HTTP_COUNTER) == http_before


def test_health_and_readiness(stack):
    assert requests.get(stack.http + "/healthz", timeout=5).json() == {"status": "alive"}
    ready = requests.get(stack.http + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert stack.grpc_health() == "SERVING"


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/predict", 405, "method_not_allowed"), ("GET", "/nope", 404, "not_found"),
    ("PUT", "/predict", 405, "method_not_allowed"), ("POST", "/metrics", 405, "method_not_allowed"),
])
def test_unknown_routes_answer_json(stack, method, path, status, code):
    response = requests.request(method, stack.http + path, timeout=5)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_a_second_checkpoint_gives_a_different_answer(tmp_path_factory, checkpoints, image_server,
                                                      grpc_client, stack):
    """Same image, other weights file: the other class, over both protocols."""
    url = image_server.url("/img/jpeg")
    assert stack.predict_http(url).json()["objects"] == [CLASS_A]
    path, _ = checkpoints[CLASS_B]
    other = Stack(tmp_path_factory.mktemp("stack-b"), WEIGHTS_FILE=path,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}", **FAST_LIMITS).start()
    try:
        other.wait_ready()
        objects = other.predict_http(url).json()["objects"]
        assert objects == [CLASS_B]
        assert grpc_client(other.grpc_target, url) == objects
    finally:
        assert other.stop() == 0
