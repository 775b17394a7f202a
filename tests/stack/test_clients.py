"""Real clients: grpcurl through server reflection, and a real Prometheus scraping /metrics."""

import json
import subprocess
import time

import requests

from testkit import VENV_BIN
from testkit.checkpoints import CLASS_A

GRPCURL = str(VENV_BIN / "grpcurl")


def grpcurl(*args: str) -> str:
    result = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_services_by_reflection(stack):
    services = grpcurl(stack.grpc_target, "list").split()
    assert "inference.InstanceDetector" in services
    assert "grpc.health.v1.Health" in services
    described = grpcurl(stack.grpc_target, "describe", "inference.InstanceDetector")
    assert "rpc Predict ( .inference.InstanceDetectorInput ) returns ( .inference.InstanceDetectorOutput )" \
        in described


def test_grpcurl_predict_matches_http(stack, image_server):
    url = image_server.url("/img/webp")
    reply = json.loads(grpcurl("-d", json.dumps({"url": url}), stack.grpc_target,
                               "inference.InstanceDetector/Predict"))
    assert reply == {"objects": [CLASS_A]}
    assert reply == stack.predict_http(url).json()


def test_grpcurl_health_check(stack):
    assert json.loads(grpcurl(stack.grpc_target, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}


def test_prometheus_scrapes_the_true_counter(stack, image_server, prometheus):
    assert stack.predict_http(image_server.url("/img/png")).status_code == 200
    expected = stack.metric_value("app_http_inference_count")
    assert expected >= 1
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = requests.get(prometheus + "/api/v1/query",
                              params={"query": "app_http_inference_count_total"}, timeout=5).json()
        results = answer["data"]["result"]
        if results:
            seen = float(results[0]["value"][1])
            if seen == expected:
                break
        time.sleep(0.5)
    assert seen == expected
    targets = requests.get(prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    assert [target["health"] for target in targets] == ["up"]
