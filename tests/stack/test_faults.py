"""Faults, on a stack of its own: hostile image hosts are cut at their limits without memory
growth, and each process killed with SIGKILL under load comes back while the counters stay exact.

Cases already in test_bad_inputs.py (a drip of body bytes past the deadline, an undeclared 8 MB
body, a declared 10 GB body, a late answer) are not repeated; this file adds a drip of header
bytes, a chunked endless body, a Content-Length that declares less or more than is sent, and the
memory of the stack across twenty such requests.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.clients import metric_sum
from testkit.images import encode, scene
from testkit.stack import FAST_LIMITS, Stack

JPEG = encode(scene(320, 240, seed=7), "JPEG", quality=90)
FETCH_TOTAL_TIMEOUT = float(FAST_LIMITS["FETCH_TOTAL_TIMEOUT"])
FETCH_READ_TIMEOUT = float(FAST_LIMITS["FETCH_READ_TIMEOUT"])
FETCH_MAX_BYTES = int(FAST_LIMITS["FETCH_MAX_BYTES"])
# How long past its limit a cut request may take to be answered (the pipeline's own work, a busy
# machine); far below what an uncut hostile host holds a request (HOSTILE_MAX_SECONDS).
CUT_SLACK = 3.0
HOSTILE_MAX_SECONDS = 20.0  # no hostile route holds a connection longer than this
OFFERED_BYTES = 64 * 1024 * 1024  # what the endless routes offer, far over FETCH_MAX_BYTES
APP_CODES = ("invalid_request", "forbidden_target", "too_large", "not_an_image", "upstream_failed",
             "upstream_timeout", "not_ready", "overloaded", "cancelled", "internal")
APP_DETAILS = re.compile("^({}): ".format("|".join(APP_CODES)))


# --------------------------------------------------------------------------- the hostile host

class _HostileHandler(socketserver.StreamRequestHandler):
    """One request on a raw socket, so that every byte and header is exactly as a hostile host
    sends it (http.server would fix up framing). Routes:

    - ``/ok``: the JPEG, well formed;
    - ``/header-drip?every=0.3``: the status line, then one header byte every ``every`` seconds,
      never ending the headers;
    - ``/short?declared=N&sent=M&then=close|hold``: declares N bytes, sends the first M of the
      JPEG (zero-padded), then closes or keeps the connection open without sending;
    - ``/long``: declares the JPEG's length, sends the JPEG, then junk without end;
    - ``/chunked-endless``: chunked transfer encoding, chunks without end.

    Nothing is held longer than ``HOSTILE_MAX_SECONDS`` nor sends more than ``OFFERED_BYTES``.
    """

    def handle(self):
        self.connection.settimeout(HOSTILE_MAX_SECONDS)
        self.sent, self.path = 0, ""
        try:
            fields = self.rfile.readline(8192).decode("latin-1").split(" ")
            while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                pass
            self.path = fields[1] if len(fields) > 1 else ""
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query).items()}
            route = getattr(self, "_route_" + parts.path.strip("/").replace("-", "_"), None)
            if route is not None:
                route(query)
        except OSError:
            pass  # the service hung up, as it should
        finally:
            self.server.sending.pop(id(self), None)
            self.server.served.append((self.path, self.sent))

    def _write(self, data: bytes) -> None:
        self.connection.sendall(data)
        self.sent += len(data)
        self.server.sending[id(self)] = (self.path, self.sent)

    def _headers(self, *lines: str) -> None:
        head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + "".join(f"{line}\r\n" for line in lines)
        self._write((head + "\r\n").encode("latin-1"))

    def _route_ok(self, query):
        self._headers(f"Content-Length: {len(JPEG)}", "Connection: close")
        self._write(JPEG)

    def _route_header_drip(self, query):
        every = float(query.get("every", 0.3))
        self._write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Drip: ")
        deadline = time.monotonic() + HOSTILE_MAX_SECONDS
        while time.monotonic() < deadline:
            self._write(b"a")
            time.sleep(every)

    def _route_short(self, query):
        declared, sent = int(query["declared"]), int(query["sent"])
        self._headers(f"Content-Length: {declared}")
        self._write((JPEG + b"\0" * sent)[:sent])
        if query.get("then") == "hold":
            self.connection.recv(1)  # until the service hangs up (or HOSTILE_MAX_SECONDS)

    def _route_long(self, query):
        self._headers(f"Content-Length: {len(JPEG)}")
        self._write(JPEG)
        junk = b"\xff" * 65536
        while self.sent < OFFERED_BYTES:
            self._write(junk)

    def _route_chunked_endless(self, query):
        self._headers("Transfer-Encoding: chunked")
        chunk = b"%x\r\n%s\r\n" % (65536, b"\xff" * 65536)
        while self.sent < OFFERED_BYTES:
            self._write(chunk)


class _HostileServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass


class HostileHost:
    """A loopback host misbehaving on purpose."""

    def __init__(self):
        self._server = _HostileServer(("127.0.0.1", 0), _HostileHandler)
        self._server.served = []
        self._server.sending = {}
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def sent(self, path: str) -> list[int]:
        """Bytes sent so far for each request of ``path``, ended or not."""
        live = [sent for served_path, sent in list(self._server.sending.values()) if served_path == path]
        return live + [sent for served_path, sent in list(self._server.served) if served_path == path]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def hostile_host():
    host = HostileHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, checkpoints, image_server, hostile_host):
    """A stack of its own (it gets killed). Admission lets every client of these tests in (shedding
    is test_load.py's subject): a closed-loop client that is admitted calls again the moment it is
    answered and takes its slot back, so with fewer slots than clients the others would never be
    served, and a process's return could not be shown by a call it answers."""
    path, sha256 = checkpoints[CLASS_A]
    allowed = f"127.0.0.1:{image_server.port},127.0.0.1:{hostile_host.port}"
    stack = Stack(tmp_path_factory.mktemp("stack-faults"), WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
                  ALLOWED_PRIVATE_TARGETS=allowed, MAX_QUEUE_WAIT="120", **FAST_LIMITS)
    with stack.running():
        yield stack


@pytest.fixture(scope="module")
def predict_grpc(fault_stack, grpc_stubs):
    """``call(url, timeout)`` -> (status name, details) of one Predict on the fault stack."""
    pb2, pb2_grpc = grpc_stubs
    channel = grpc.insecure_channel(fault_stack.grpc_target)
    stub = pb2_grpc.InstanceDetectorStub(channel)

    def call(url, timeout=30.0):
        try:
            reply = stub.Predict(pb2.InstanceDetectorInput(url=url), timeout=timeout)
            return "OK", list(reply.objects)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()

    yield call
    channel.close()


def _predict(stack, predict_grpc, protocol, url, timeout=30.0):
    """(protocol's status, error code or objects, seconds): one call on ``protocol``."""
    began = time.monotonic()
    if protocol == "http":
        try:
            response = stack.predict_http(url, timeout=timeout)
        except requests.Timeout:
            return "no answer", f"no answer within {timeout} s", time.monotonic() - began
        body = response.json()
        outcome = body["error"]["code"] if response.status_code != 200 else body["objects"]
        return str(response.status_code), outcome, time.monotonic() - began
    status, details = predict_grpc(url, timeout)
    outcome = details if status == "OK" else details.split(":", 1)[0]
    return status, outcome, time.monotonic() - began


# --------------------------------------------------------------------------- hostile image hosts

# (id, route on the hostile host, HTTP status, gRPC status, error code, the limit that cuts it: at
# most how many seconds the answer may take, before CUT_SLACK)
HOSTILE_CASES = [
    ("header-drip", "/header-drip?every=0.3", "504", "DEADLINE_EXCEEDED", "upstream_timeout",
     FETCH_TOTAL_TIMEOUT),
    ("chunked-endless", "/chunked-endless", "413", "RESOURCE_EXHAUSTED", "too_large", FETCH_TOTAL_TIMEOUT),
    ("declares-more-then-closes", f"/short?declared={FETCH_MAX_BYTES // 2}&sent=1000&then=close",
     "502", "FAILED_PRECONDITION", "upstream_failed", FETCH_READ_TIMEOUT),
    ("declares-more-then-stalls", f"/short?declared={FETCH_MAX_BYTES // 2}&sent=1000&then=hold",
     "504", "DEADLINE_EXCEEDED", "upstream_timeout", FETCH_READ_TIMEOUT),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[case[0] for case in HOSTILE_CASES])
def test_a_hostile_host_is_cut_at_its_limit(fault_stack, predict_grpc, hostile_host, case, protocol):
    _name, route, http_status, grpc_status, code, limit = case
    status, outcome, seconds = _predict(fault_stack, predict_grpc, protocol, hostile_host.url(route),
                                        timeout=limit + CUT_SLACK + 2)
    expected = (http_status if protocol == "http" else grpc_status), code
    assert (status, outcome) == expected, (
        f"{route}: got {status} {outcome!r} after {seconds:.1f} s; expected {expected} within {limit} s "
        f"(+{CUT_SLACK} s)")
    assert seconds <= limit + CUT_SLACK, f"answered after {seconds:.1f} s, its limit is {limit} s"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_body_longer_than_declared_is_read_only_as_far_as_declared(fault_stack, predict_grpc,
                                                                     hostile_host, protocol):
    """Content-Length frames the body: the image is the declared bytes, the junk after them is
    not read (the host is cut off far below what it offers), and the next request to the same
    host is not answered from that junk (no poisoned kept-alive connection)."""
    success = "200" if protocol == "http" else "OK"
    status, outcome, _ = _predict(fault_stack, predict_grpc, protocol, hostile_host.url("/long"))
    assert (status, outcome) == (success, [CLASS_A])
    status, outcome, _ = _predict(fault_stack, predict_grpc, protocol, hostile_host.url("/ok"))
    assert (status, outcome) == (success, [CLASS_A])

    time.sleep(1)  # a client draining the junk would take it all by now (loopback: GB/s)
    sent = hostile_host.sent("/long")
    assert sent and max(sent) < OFFERED_BYTES // 2, f"the host got {max(sent)} bytes of junk out"


def test_stack_memory_does_not_grow_across_twenty_hostile_requests(fault_stack, predict_grpc, image_server,
                                                                   hostile_host):
    """Twenty hostile downloads (body drip, endless bodies with and without chunking, bodies
    shorter than declared), half over each protocol, four at a time: each gets its error, and the
    stack's PSS afterwards is what it was (a retained body would be up to FETCH_MAX_BYTES each)."""
    kinds = [
        (image_server.url("/drip?every=0.5&max=8"), "upstream_timeout"),
        (image_server.url(f"/endless?mb={OFFERED_BYTES >> 20}"), "too_large"),
        (hostile_host.url("/chunked-endless"), "too_large"),
        (hostile_host.url(f"/short?declared={FETCH_MAX_BYTES // 2}&sent=1000&then=close"), "upstream_failed"),
        (hostile_host.url(f"/short?declared={FETCH_MAX_BYTES // 2}&sent=1000&then=hold"), "upstream_timeout"),
    ]
    stack = fault_stack

    def run(calls):
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [(code, pool.submit(_predict, stack, predict_grpc, protocol, url, 30))
                       for protocol, (url, code) in calls]
            return [(code, future.result()) for code, future in futures]

    warm_up = [(protocol, kind) for kind in kinds for protocol in ("http", "grpc")]
    for expected, (_status, outcome, _) in run(warm_up):  # every path and thread pool used once
        assert outcome == expected
    time.sleep(1)
    before = stack.pss_mib()
    calls = [(("http", "grpc")[index % 2], kinds[index % len(kinds)]) for index in range(20)]
    results = run(calls)
    time.sleep(1)
    after = stack.pss_mib()
    assert [outcome for _, (_, outcome, _) in results] == [code for code, _ in results]
    print(f"stack PSS across 20 hostile requests: {before:.0f} -> {after:.0f} MiB")
    # 20 retained bodies would be up to 40 MiB; allocator noise across ~40 threads stays below 24
    assert after - before < 24, f"stack PSS grew from {before:.0f} to {after:.0f} MiB"


# --------------------------------------------------------------------------- kill -9 under load

@dataclass
class Call:
    protocol: str
    started: float
    ended: float
    reached: bool  # answered by the app (any HTTP status; gRPC OK or an error of the app's)
    outcome: str  # "200", "503 overloaded", "UNAVAILABLE not_ready", "connection: ...", ...


class Traffic:
    """HTTP and gRPC clients calling Predict back to back on threads, every call recorded.

    HTTP uses a new connection per call, so that a call either reaches a worker's handler or fails
    at that worker's death; a shed client waits its Retry-After (at most 2 s) as a polite one does.
    gRPC clients keep one channel each, as real ones do, and pause 0.2 s after a transport failure
    (the server is down)."""

    def __init__(self, stack: Stack, url: str, stubs, http_clients: int = 2, grpc_clients: int = 2):
        self.stack, self.url = stack, url
        self.pb2, self.pb2_grpc = stubs
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        clients = [self._http_client] * http_clients + [self._grpc_client] * grpc_clients
        self._threads = [threading.Thread(target=client, daemon=True) for client in clients]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self._threads), "a client call never returned"

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _http_client(self):
        while not self._stop.is_set():
            began, pause = time.monotonic(), 0.0
            try:
                response = requests.post(self.stack.http + "/predict", json={"url": self.url}, timeout=90,
                                         headers={"Connection": "close"})
                outcome, reached = str(response.status_code), True
                try:
                    body = response.json()
                except ValueError:
                    body = {"error": {"code": f"(not JSON: {response.text[:80]!r})"}}
                if response.status_code != 200:
                    outcome += " " + str(body.get("error", {}).get("code"))
                    pause = min(2.0, float(response.headers.get("Retry-After", 0)))
                elif body != {"objects": [CLASS_A]}:
                    outcome += f" wrong answer {response.text[:100]}"
            except requests.Timeout as exc:
                outcome, reached = f"timeout: {exc}", False
            except requests.ConnectionError as exc:
                outcome, reached, pause = f"connection: {exc}", False, 0.2
            self._record(Call("http", began, time.monotonic(), reached, outcome))
            self._stop.wait(pause)

    def _grpc_client(self):
        with grpc.insecure_channel(self.stack.grpc_target) as channel:
            predict = self.pb2_grpc.InstanceDetectorStub(channel).Predict
            while not self._stop.is_set():
                began, pause = time.monotonic(), 0.0
                try:
                    reply = predict(self.pb2.InstanceDetectorInput(url=self.url), timeout=90)
                    outcome, reached = "OK" if list(reply.objects) == [CLASS_A] else f"OK wrong {reply}", True
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    reached = bool(APP_DETAILS.match(details))
                    outcome = f"{exc.code().name} {details.split(':', 1)[0] if reached else details}"
                    if not reached:
                        pause = 0.2
                    elif "overloaded" in outcome:
                        trailers = dict(exc.trailing_metadata() or ())
                        pause = min(2.0, int(trailers.get("grpc-retry-pushback-ms", 0)) / 1000)
                self._record(Call("grpc", began, time.monotonic(), reached, outcome))
                self._stop.wait(pause)

    def succeeded_since(self, protocol: str, moment: float) -> bool:
        """A call on ``protocol`` answered with success after ``moment``."""
        with self._lock:
            return any(c.protocol == protocol and c.ended >= moment and c.outcome in ("200", "OK")
                       for c in self.calls)


class CounterSampler:
    """Both course counters read from /metrics every 0.5 s (scrapes that fail are skipped)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _run(self):
        while not self._stop.wait(0.5):
            with contextlib.suppress(requests.RequestException, ValueError):  # a worker being killed
                self.samples.append((time.monotonic(), *counters(self.stack)))


def counters(stack: Stack) -> tuple[float, float]:
    """(app_http_inference_count_total, app_grpc_inference_count_total), from one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(stack.http + "/metrics", timeout=10).text
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples}
    return found["app_http_inference_count_total"], found["app_grpc_inference_count_total"]


def _kill_and_wait(stack: Stack, traffic: Traffic, name: str, bound: float) -> tuple[float, float]:
    """SIGKILL to ``name`` (a gunicorn worker, the gRPC server or the model process); wait until it
    is back: a new pid, the stack ready, and a call answered with success on each protocol after
    the new pid was seen (for the gRPC server and the model process, necessarily by the new
    process). Returns the moment of the kill and the seconds from it until the stack was ready."""
    old = stack.worker_pids()
    program = {"grpc": "detector:grpc", "model": "model"}.get(name, "detector:http")
    victim, killed = stack.sigkill(name)
    if name == "worker":
        stack.wait_until(lambda: len(stack.worker_pids() - old) == 1 and len(stack.worker_pids()) == 2,
                         bound, "a new gunicorn worker")
    else:
        stack.wait_until(lambda: stack.program_pid(program) not in (0, victim), bound, f"{program} restarted")
    back = time.monotonic()
    stack.wait_ready(timeout=bound)
    ready = time.monotonic()
    stack.wait_until(lambda: all(traffic.succeeded_since(protocol, back) for protocol in ("http", "grpc")),
                     90, f"calls answered on both protocols after the {name} came back")
    return killed, ready - killed


def test_each_process_killed_under_load_comes_back_and_the_counters_stay_exact(
        fault_stack, image_server, grpc_stubs):
    """SIGKILL, in turn, to a gunicorn worker, the gRPC server and the model process while 2 HTTP
    and 2 gRPC clients call without pause. Each comes back (a new pid, the stack ready again, a
    call answered on each protocol after that); the counters never go down; at the end each
    counter has grown by the calls that reached the app, give or take only the calls that were
    in the killed process when it died (counted when they arrived, never answered)."""
    stack = fault_stack
    url = image_server.url("/img/jpeg")
    assert stack.predict_http(url, timeout=60).json() == {"objects": [CLASS_A]}  # pass time published
    http_before, grpc_before = counters(stack)
    kills: dict[str, float] = {}  # process -> moment of the SIGKILL
    restarts: dict[str, float] = {}  # process -> seconds from the SIGKILL until ready again

    traffic = Traffic(stack, url, grpc_stubs).start()
    with CounterSampler(stack) as sampler:
        try:
            time.sleep(3)
            for name, bound in (("worker", 30), ("grpc", 60), ("model", 120)):
                kills[name], restarts[name] = _kill_and_wait(stack, traffic, name, bound)
        finally:
            traffic.stop()
        time.sleep(1)  # a last scrape after the last call
    print("seconds from SIGKILL to ready again:", {name: round(s, 1) for name, s in restarts.items()})
    http_after, grpc_after = counters(stack)

    samples = [*sampler.samples, (time.monotonic(), http_after, grpc_after)]
    for earlier, later in itertools.pairwise(samples):
        assert later[1] >= earlier[1] and later[2] >= earlier[2], f"a counter went down: {earlier} -> {later}"

    calls = traffic.calls
    unexpected = {c.outcome for c in calls if c.reached} - {"200", "503 overloaded", "503 not_ready", "OK",
                                                           "UNAVAILABLE overloaded", "UNAVAILABLE not_ready"}
    assert not unexpected, f"answers other than success, overloaded or not ready: {unexpected}"
    timed_out = [c for c in calls if c.outcome.startswith(("timeout", "DEADLINE_EXCEEDED"))]
    assert not timed_out, f"calls timed out: {timed_out}"

    def check(protocol, killed, counted):
        mine = [c for c in calls if c.protocol == protocol]
        reached = sum(c.reached for c in mine)
        lost = [c for c in mine if not c.reached]
        # a call can have reached the app unanswered only if it was in flight when its process died
        in_killed = [c for c in lost if c.started <= kills[killed] <= c.ended]
        print(f"{protocol}: {len(mine)} calls, {reached} answered by the app, {len(lost)} not "
              f"({len(in_killed)} of them in the killed process); the counter grew by {counted:.0f}")
        assert reached <= counted <= reached + len(in_killed), (
            f"{protocol}: counter grew by {counted}; {reached} calls answered by the app, "
            f"{len(in_killed)} in flight in the killed process, {len(lost)} unanswered")
        return lost

    lost_http = check("http", "worker", http_after - http_before)
    # HTTP calls fail only with the worker they were in: the listening socket never closes
    assert all(c.started <= kills["worker"] <= c.ended for c in lost_http), \
        [c.outcome for c in lost_http if not c.started <= kills["worker"] <= c.ended]
    lost_grpc = check("grpc", "grpc", grpc_after - grpc_before)
    grpc_down = (kills["grpc"], kills["grpc"] + restarts["grpc"])
    assert all(c.ended >= grpc_down[0] and c.started <= grpc_down[1] for c in lost_grpc), \
        "a gRPC call failed in transport while the gRPC server was up"

    # live gauges of the dead processes are gone: nothing is in flight any more
    stack.wait_until(lambda: metric_sum(stack.http, "app_requests_in_flight") == 0, 15,
                     "app_requests_in_flight back to 0")
    stack.wait_until(lambda: metric_sum(stack.http, "app_model_queue_length") == 0, 15,
                     "app_model_queue_length back to 0")
