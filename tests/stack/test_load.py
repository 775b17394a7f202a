"""Overload, on a stack of its own: 32 and 64 closed-loop clients (half HTTP, half gRPC) for a
bounded time. Every call is answered, accepted or shed; sheds are fast; accepted calls wait a
bounded time derived from the published pass time and the admission capacity; health checks stay
fast; the counters match the calls; memory comes back after the load.

Polite clients wait the Retry-After (HTTP) or grpc-retry-pushback-ms (gRPC) they are given after a
shed; impolite ones call again at once, the flood a health check must still get through.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
import requests

from testkit import REPO
from testkit.checkpoints import CLASS_A
from testkit.clients import metric_sum
from testkit.stack import FAST_LIMITS, Stack

DURATION = 15.0  # seconds of load per run
# Admission: one pass running plus as many waiting as start within MAX_QUEUE_WAIT (a few passes
# here: the drain after each run stays short).
MAX_QUEUE_WAIT = 5.0
FETCH_ALLOWANCE = 2.0  # a loopback fetch and decode of a 320x240 JPEG, with room to spare
LATENCY_SLACK = 1.5  # on the derived bound: passes slow down under a flood on two cores
FAST = 1.0  # seconds: a shed, and every health check, are answered within this
MEMORY_RATIO, MEMORY_SLACK_MIB = 1.3, 64


def published_pass_seconds(stack: Stack) -> float | None:
    """The model's moving average pass time, as it publishes it for admission control."""
    try:
        return float((stack.run_dir / "pass-seconds").read_text())
    except (OSError, ValueError):
        return None


def course_counters(stack: Stack) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(stack.http + "/metrics", timeout=10).text
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples}
    return found["app_http_inference_count_total"], found["app_grpc_inference_count_total"]


# Health probes run in a process of their own, as an orchestrator's do: the client threads of this
# process (and their GIL) must not be what makes a probe slow. A new connection per probe, as the
# kubelet makes. Prints {probe: [seconds, ...], "failures": [...]}.
PROBE = r"""
import json, sys, time
import grpc, requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

http, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def grpc_health():
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING

probes = {
    "healthz": lambda: requests.get(http + "/healthz", timeout=5).status_code == 200,
    "readyz": lambda: requests.get(http + "/readyz", timeout=5).status_code == 200,
    "grpc_health": grpc_health,
}
times = {name: [] for name in probes}
failures = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    for name, probe in probes.items():
        began = time.monotonic()
        try:
            ok = probe()
        except Exception as exc:
            ok = False
            failures.append(f"{name}: {exc!r}")
        times[name].append(time.monotonic() - began)
        if not ok:
            failures.append(f"{name}: not healthy")
    time.sleep(0.25)
print(json.dumps({**times, "failures": failures}))
"""


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0


@dataclass
class Run:
    calls: list = field(default_factory=list)  # (protocol, kind, seconds, detail); kind: ok, shed, failed
    served: set = field(default_factory=set)  # the clients (by index) that had a call accepted
    pss: list = field(default_factory=list)  # MiB, sampled every second
    pass_seconds: list = field(default_factory=list)  # published values, sampled every second
    health: dict = field(default_factory=dict)

    def of(self, kind: str) -> list:
        return [call for call in self.calls if call[1] == kind]


def run_load(stack: Stack, stubs, url: str, clients: int, polite: bool, duration: float) -> Run:
    """``clients`` closed-loop clients (even: HTTP, odd: gRPC) calling Predict for ``duration`` s."""
    pb2, pb2_grpc = stubs
    run, lock = Run(), threading.Lock()
    stop = threading.Event()

    def record(protocol, kind, began, detail=""):
        with lock:
            run.calls.append((protocol, kind, time.monotonic() - began, detail))
            if kind == "ok":
                run.served.add(threading.current_thread().name)

    def http_client():  # a connection per call: no keep-alive race with the server's idle timeout
        while not stop.is_set():
            began, pause = time.monotonic(), 0.0
            try:
                response = requests.post(stack.http + "/predict", json={"url": url}, timeout=60)
                body = response.json()
            except (requests.RequestException, ValueError) as exc:
                record("http", "failed", began, repr(exc))
                continue
            if response.status_code == 200 and body == {"objects": [CLASS_A]}:
                record("http", "ok", began)
            elif (response.status_code == 503 and body["error"]["code"] == "overloaded"
                  and "Retry-After" in response.headers):
                record("http", "shed", began)
                pause = float(response.headers["Retry-After"])
            else:
                record("http", "failed", began, f"{response.status_code} {response.text[:200]}")
            if polite:
                stop.wait(pause)

    def grpc_client():
        with grpc.insecure_channel(stack.grpc_target) as channel:
            predict = pb2_grpc.InstanceDetectorStub(channel).Predict
            while not stop.is_set():
                began, pause = time.monotonic(), 0.0
                try:
                    reply = predict(pb2.InstanceDetectorInput(url=url), timeout=60)
                    if list(reply.objects) == [CLASS_A]:
                        record("grpc", "ok", began)
                    else:
                        record("grpc", "failed", began, f"OK {reply}")
                except grpc.RpcError as exc:
                    trailers = dict(exc.trailing_metadata() or ())
                    if (exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details().startswith("overloaded: ")
                            and "grpc-retry-pushback-ms" in trailers):
                        record("grpc", "shed", began)
                        pause = int(trailers["grpc-retry-pushback-ms"]) / 1000
                    else:
                        record("grpc", "failed", began, f"{exc.code().name} {exc.details()}")
                if polite:
                    stop.wait(pause)

    probe = subprocess.Popen([sys.executable, "-c", PROBE, stack.http, stack.grpc_target, str(duration)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = [threading.Thread(target=(http_client, grpc_client)[index % 2], name=f"client-{index}",
                                daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + duration
    while time.monotonic() < end:
        run.pss.append(stack.pss_mib())
        run.pass_seconds.append(published_pass_seconds(stack))
        time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(90)  # a call's own timeout is 60 s
    assert not any(thread.is_alive() for thread in threads), "a client call never returned"
    run.pass_seconds.append(published_pass_seconds(stack))  # the passes that ended in the drain
    out, err = probe.communicate(timeout=60)
    assert probe.returncode == 0, err
    run.health = json.loads(out)
    return run


@pytest.fixture(scope="module")
def load_stack(tmp_path_factory, checkpoints, image_server):
    path, sha256 = checkpoints[CLASS_A]
    stack = Stack(tmp_path_factory.mktemp("stack-load"), WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}", MAX_QUEUE_WAIT=MAX_QUEUE_WAIT,
                  **FAST_LIMITS)
    with stack.running():
        yield stack


@pytest.fixture(scope="module")
def idle_pss(load_stack, image_server, grpc_client):
    """Stack PSS at rest after a warm-up (one call per protocol; the pass time is published)."""
    url = image_server.url("/img/jpeg")
    assert load_stack.predict_http(url).json() == {"objects": [CLASS_A]}
    assert grpc_client(load_stack.grpc_target, url) == [CLASS_A]
    time.sleep(2)
    return load_stack.pss_mib()


@pytest.mark.parametrize(("clients", "polite"), [(32, True), (32, False), (64, True), (64, False)],
                         ids=["32-polite", "32-impolite", "64-polite", "64-impolite"])
def test_many_clients_get_fast_sheds_bounded_waits_and_fast_health(load_stack, image_server, grpc_stubs,
                                                                   idle_pss, clients, polite):
    stack = load_stack
    url = image_server.url("/img/jpeg")
    http_before, grpc_before = course_counters(stack)
    shed_before = metric_sum(stack.http, "app_requests_shed_total")

    run = run_load(stack, grpc_stubs, url, clients, polite, DURATION)

    stack.wait_until(lambda: metric_sum(stack.http, "app_requests_in_flight") == 0, 15,
                     "app_requests_in_flight back to 0")
    time.sleep(2)
    after = stack.pss_mib()
    accepted = [seconds for _, _, seconds, _ in run.of("ok")]
    shed = [seconds for _, _, seconds, _ in run.of("shed")]
    passes = [value for value in run.pass_seconds if value] or [published_pass_seconds(stack)]
    capacity = 1 + max(1, int(MAX_QUEUE_WAIT / min(passes)))  # admission with the fastest pass seen
    bound = LATENCY_SLACK * (capacity + 1) * max(passes) + FETCH_ALLOWANCE
    probes = {name: times for name, times in run.health.items() if name != "failures"}
    worst_health = {name: round(max(times, default=0.0), 3) for name, times in probes.items()}
    summary = (f"{clients} clients ({'polite' if polite else 'impolite'}): {len(run.calls)} calls, "
               f"{len(accepted)} accepted from {len(run.served)} clients "
               f"(p50 {percentile(accepted, 50):.2f} s, p99 {percentile(accepted, 99):.2f} s,"
               f" bound {bound:.1f} s = {LATENCY_SLACK} x ({capacity} + 1) x {max(passes):.2f} s"
               f" + {FETCH_ALLOWANCE}), {len(shed)} shed (p99 {percentile(shed, 99):.3f} s), "
               f"{len(run.of('failed'))} failed; slowest health {worst_health}; "
               f"PSS idle {idle_pss:.0f}, peak {max(run.pss):.0f}, after {after:.0f} MiB")
    print(summary)

    assert not run.of("failed"), f"{summary}\nfailed calls: {run.of('failed')[:5]}"
    assert accepted and shed, f"the load should be both served and shed: {summary}"
    assert percentile(shed, 99) < FAST, summary
    assert not run.health["failures"], run.health["failures"][:5]
    assert all(len(times) >= DURATION / 2 for times in probes.values()), probes
    assert max(worst_health.values()) < FAST, summary
    assert percentile(accepted, 99) <= bound, summary
    assert after <= MEMORY_RATIO * idle_pss + MEMORY_SLACK_MIB, summary

    # every call counted once on its protocol's course counter; every shed counted as one
    http_after, grpc_after = course_counters(stack)
    http_calls = sum(1 for call in run.calls if call[0] == "http")
    assert (http_after - http_before, grpc_after - grpc_before) == (http_calls, len(run.calls) - http_calls)
    assert metric_sum(stack.http, "app_requests_shed_total") - shed_before == len(shed)
