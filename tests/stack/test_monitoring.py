"""deploy/'s dashboard and alert rules against the real stack and a real Prometheus scraping it.

After traffic on both protocols (answers, a client error, a server-side error), every dashboard
panel's query and the ``<query>`` part of every alert (``<query> <comparison> <threshold>``),
evaluated through Prometheus's HTTP query API, returns at least one series.

The queries select ``job="instance-detector"`` (deploy/prometheus/prometheus.yml); here they are
evaluated with the job name the suite's Prometheus gives the stack's target.
"""

from __future__ import annotations

import time

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from tests.unit.test_deploy import JOB, alert_queries, dashboard_queries

# For Grafana's $__rate_interval: at least four scrape intervals (the suite scrapes every second).
RATE_INTERVAL = "1m"
DEADLINE = 90  # seconds for the scrapes to show what was sent


def query(base: str, expr: str) -> dict[tuple, float]:
    """An instant query to the Prometheus at ``base``: {sorted label pairs: value}."""
    answer = requests.get(base + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return {tuple(sorted(series["metric"].items())): float(series["value"][1])
            for series in answer["data"]["result"]}


def eventually(base: str, expr: str, check, what: str) -> None:
    seen = None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        seen = query(base, expr)
        if check(seen):
            return
        time.sleep(1)
    raise AssertionError(f"{what}: {expr} gave {seen}")


def stack_job(base: str, stack) -> str:
    """The job label of the stack's target, once Prometheus has scraped it."""
    targets = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        targets = requests.get(base + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        for target in targets:
            if target["labels"]["instance"] == f"127.0.0.1:{stack.http_port}" and target["health"] == "up":
                return target["labels"]["job"]
        time.sleep(0.5)
    raise AssertionError(f"Prometheus has not scraped the stack: {targets}")


def test_every_dashboard_and_alert_query_returns_data(stack, image_server, grpc_predict, closed_port,
                                                      prometheus):
    job = stack_job(prometheus, stack)  # scraped once before the traffic, so that rates see it

    # two answers per protocol, an invalid_request over HTTP and an upstream_failed over gRPC
    url = image_server.url("/img/png")
    for _ in range(2):
        assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
        assert grpc_predict(url) == [CLASS_A]
    answer = stack.predict_http("ftp://example.com/image.png")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"
    with pytest.raises(grpc.RpcError) as error:
        grpc_predict(f"http://127.0.0.1:{closed_port}/image.png")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Prometheus sees that traffic
    selector = f'job="{job}"'
    eventually(prometheus, f"up{{{selector}}}", lambda seen: list(seen.values()) == [1.0], "the target is up")
    eventually(prometheus, f"min by (instance) (app_model_ready{{{selector}}})",
               lambda seen: list(seen.values()) == [1.0], "the model is ready")
    eventually(prometheus,
               f'sum by (protocol) (increase(app_request_duration_seconds_count{{{selector}, outcome="ok"}}'
               f"[{RATE_INTERVAL}]))",
               lambda seen: {dict(key)["protocol"] for key, value in seen.items() if value > 0}
               == {"http", "grpc"},
               "answers on both protocols")
    eventually(prometheus, f"sum by (protocol, code) (app_request_errors_total{{{selector}}})",
               lambda seen: {("http", "invalid_request"), ("grpc", "upstream_failed")}
               <= {(dict(key)["protocol"], dict(key)["code"]) for key, value in seen.items() if value > 0},
               "the errors sent, by protocol and code")

    # every panel and every alert has data
    queries = [(f"panel {name}", expr) for name, expr in dashboard_queries(rate_interval=RATE_INTERVAL)]
    queries += [(f"alert {name}", expr) for name, expr in alert_queries()]
    empty = {name: expr.replace(f'job="{JOB}"', f'job="{job}"') for name, expr in queries}
    deadline = time.monotonic() + DEADLINE
    while empty and time.monotonic() < deadline:
        empty = {name: expr for name, expr in empty.items() if not query(prometheus, expr)}
        if empty:
            time.sleep(1)
    assert not empty, "queries without data:\n" + "\n".join(f"{name}: {expr}" for name, expr in empty.items())
