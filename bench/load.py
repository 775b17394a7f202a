"""The load and fault run: ``.venv/bin/python -m bench.load`` (``--help`` for options).

Starts the real stack (``testkit.stack.Stack``: supervisord with the repository's supervisord.conf,
gunicorn, the gRPC server, the model process) with the seeded realistic checkpoint (or the true
COCO_V1 weights if cached, ``--weights FILE`` or ``--forced``), serves one 640x480 JPEG from
127.0.0.1, and measures:

1. for each client count (``--clients``, default 4,32,64): closed-loop clients for ``--duration``
   seconds, half HTTP and half gRPC, each waiting the Retry-After (HTTP) or grpc-retry-pushback-ms
   (gRPC) it is given after a shed (``--impolite``: calling again at once), while a process of its
   own probes /healthz, /readyz and gRPC health every 0.25 s with a new connection each time.
   Reported: calls sent / accepted / shed / failed, accepted per second, accepted p50 and p99, shed
   p50 and p99, the slowest health check, whole-stack PSS before / peak / after;
2. under 4 clients, SIGKILL once each to a gunicorn worker, the gRPC server and the model process:
   seconds until it is back (a new pid; for a worker, one that has loaded the app) and the stack
   ready again (/readyz 200 and gRPC SERVING);
3. the two course counters at the end against the calls made: each must have grown by the calls
   the app answered, plus at most the calls that were inside a killed process when it died.

Prints a Markdown table and writes bench/results/load-<label>.json (and .md). Loopback only;
every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.__main__ import save_results
from testkit.stack import tree_pss_mib

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CALL_TIMEOUT = 120.0  # seconds a client waits for one answer (a failure past it)
APP_CODES = ("invalid_request", "forbidden_target", "too_large", "not_an_image", "upstream_failed",
             "upstream_timeout", "not_ready", "overloaded", "cancelled", "internal")
APP_DETAILS = re.compile("^({}): ".format("|".join(APP_CODES)))
KILL_BOUNDS = {"worker": 60.0, "grpc": 90.0, "model": 300.0}  # seconds to come back, at most


# --------------------------------------------------------------------------- measurements

def percentile(values, q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def course_counters(http_base: str) -> tuple[float, float]:
    """(app_http_inference_count_total, app_grpc_inference_count_total) from one scrape."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(http_base + "/metrics", timeout=10).text
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples}
    return found["app_http_inference_count_total"], found["app_grpc_inference_count_total"]


def probe(http_base: str, grpc_target: str, seconds: float) -> dict:
    """Health probes every 0.25 s for ``seconds``, a new connection each (as a kubelet probes):
    {probe: [seconds, ...], "failures": [...]}. Run in a process of its own (``--probe``) so that
    the load's client threads do not slow it down."""
    import grpc
    import requests
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def grpc_health():
        with grpc.insecure_channel(grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    probes = {
        "healthz": lambda: requests.get(http_base + "/healthz", timeout=5).status_code == 200,
        "readyz": lambda: requests.get(http_base + "/readyz", timeout=5).status_code == 200,
        "grpc_health": grpc_health,
    }
    result: dict = {name: [] for name in probes}
    result["failures"] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, check in probes.items():
            began = time.monotonic()
            try:
                healthy = check()
            except Exception as exc:  # noqa: BLE001 - a probe that fails is reported, not fatal
                healthy = False
                result["failures"].append(f"{name}: {exc!r}"[:200])
            result[name].append(time.monotonic() - began)
            if not healthy:
                result["failures"].append(f"{name}: not healthy")
        time.sleep(0.25)
    return result


# --------------------------------------------------------------------------- clients

@dataclass
class Call:
    protocol: str
    started: float
    ended: float
    kind: str  # ok, shed, error (another answer of the app), lost (no answer from the app)
    detail: str = ""
    client: int = 0  # which client made it

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def reached(self) -> bool:
        """Answered by the app (and so counted by it)."""
        return self.kind != "lost"


class Clients:
    """``count`` closed-loop clients on threads (even: HTTP, a new connection per call; odd: gRPC,
    one channel each), calling Predict with ``url`` until stopped; every call recorded."""

    def __init__(self, http_base: str, grpc_target: str, url: str, count: int, polite: bool = True):
        self.http_base, self.grpc_target, self.url, self.polite = http_base, grpc_target, url, polite
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=(self._http, self._grpc)[index % 2], args=(index,),
                                          daemon=True) for index in range(count)]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> int:
        """Stop and wait for the calls in flight; the number of client threads still stuck."""
        self._stop.set()
        deadline = time.monotonic() + CALL_TIMEOUT + 30
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def _record(self, call: Call, pause: float, client: int) -> None:
        call.client = client
        with self._lock:
            self.calls.append(call)
        if pause:
            self._stop.wait(pause)

    def _http(self, client: int) -> None:
        import requests

        while not self._stop.is_set():
            began, pause = time.monotonic(), 0.0
            try:
                response = requests.post(self.http_base + "/predict", json={"url": self.url},
                                         timeout=CALL_TIMEOUT, headers={"Connection": "close"})
            except requests.RequestException as exc:
                self._record(Call("http", began, time.monotonic(), "lost", repr(exc)[:200]), 0.2, client)
                continue
            ended = time.monotonic()
            try:
                code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
            except ValueError:
                code = "(not JSON)"
            if response.status_code == 200:
                kind = "ok"
            elif response.status_code == 503 and code == "overloaded":
                kind = "shed"
                pause = float(response.headers.get("Retry-After", 1)) if self.polite else 0.0
            else:
                kind = "error"
                pause = 0.5  # not ready, say: do not spin
            detail = f"{response.status_code} {code}".strip()
            self._record(Call("http", began, ended, kind, detail), pause, client)

    def _grpc(self, client: int) -> None:
        import grpc

        from grpc_app.stubs import inference_pb2, inference_pb2_grpc

        with grpc.insecure_channel(self.grpc_target) as channel:
            predict = inference_pb2_grpc.InstanceDetectorStub(channel).Predict
            while not self._stop.is_set():
                began, pause = time.monotonic(), 0.0
                try:
                    predict(inference_pb2.InstanceDetectorInput(url=self.url), timeout=CALL_TIMEOUT)
                    kind, detail = "ok", "OK"
                except grpc.RpcError as exc:
                    details = exc.details() or ""
                    app = APP_DETAILS.match(details)
                    detail = f"{exc.code().name} {app.group(1) if app else details[:150]}"
                    if app is None:
                        kind, pause = "lost", 0.2
                    elif app.group(1) == "overloaded" and exc.code() == grpc.StatusCode.UNAVAILABLE:
                        kind = "shed"
                        trailers = dict(exc.trailing_metadata() or ())
                        if self.polite:
                            pause = int(trailers.get("grpc-retry-pushback-ms", 1000)) / 1000
                    else:
                        kind, pause = "error", 0.5
                self._record(Call("grpc", began, time.monotonic(), kind, detail), pause, client)


# --------------------------------------------------------------------------- phases

def load_run(stack, url: str, count: int, duration: float, polite: bool) -> tuple[dict, list[Call]]:
    """``count`` clients for ``duration`` s; the figures of the run and its calls."""
    pid = stack.process.pid
    before = tree_pss_mib(pid)
    prober = subprocess.Popen(
        [sys.executable, "-m", "bench.load", "--probe", stack.http, stack.grpc_target, str(duration)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients = Clients(stack.http, stack.grpc_target, url, count, polite).start()
    began = time.monotonic()
    peak, pass_seconds = before, []
    while time.monotonic() < began + duration:
        peak = max(peak, tree_pss_mib(pid))
        with contextlib.suppress(OSError, ValueError):  # not published yet
            pass_seconds.append(float((stack.run_dir / "pass-seconds").read_text()))
        time.sleep(1.0)
    stuck = clients.stop()
    drained = time.monotonic()
    out, err = prober.communicate(timeout=120)
    health = json.loads(out) if prober.returncode == 0 else {"failures": [err[-500:]]}
    time.sleep(3)  # let freed memory settle before "after"
    after = tree_pss_mib(pid)
    calls = clients.calls
    by_kind = {kind: [c for c in calls if c.kind == kind] for kind in ("ok", "shed", "error", "lost")}
    accepted = [c.seconds for c in by_kind["ok"]]
    shed = [c.seconds for c in by_kind["shed"]]
    probes = {name: times for name, times in health.items() if name != "failures"}
    figures = {
        "clients": count, "polite": polite, "duration_s": duration, "drain_s": drained - began - duration,
        "sent": len(calls), "accepted": len(accepted), "shed": len(shed),
        "clients_served": len({c.client for c in by_kind["ok"]}),
        "failed": len(by_kind["error"]) + len(by_kind["lost"]) + stuck,
        "failures": sorted({c.detail for c in by_kind["error"] + by_kind["lost"]})[:10],
        "accepted_per_s": len(accepted) / (drained - began),
        "accepted_p50_s": percentile(accepted, 50), "accepted_p99_s": percentile(accepted, 99),
        "shed_p50_s": percentile(shed, 50), "shed_p99_s": percentile(shed, 99),
        "slowest_health_s": {name: max(times, default=None) for name, times in probes.items()},
        "health_checks": sum(len(times) for times in probes.values()),
        "health_failures": health["failures"][:10],
        "pass_seconds_published": [min(pass_seconds, default=None), max(pass_seconds, default=None)],
        "pss_mib": {"before": before, "peak": peak, "after": after},
    }
    slowest = max((v for v in figures["slowest_health_s"].values() if v is not None), default=float("nan"))
    print(f"  {count} clients: {len(calls)} sent, {len(accepted)} accepted, {len(shed)} shed, "
          f"{figures['failed']} failed; accepted p50 {_s(figures['accepted_p50_s'])} p99 "
          f"{_s(figures['accepted_p99_s'])}; shed p99 {_s(figures['shed_p99_s'])}; slowest health "
          f"{slowest:.3f} s; PSS {before:.0f}/{peak:.0f}/{after:.0f} MiB", flush=True)
    return figures, calls


def warm_up(stack, url: str) -> None:
    """One call per protocol: the model has run a pass and published its pass time."""
    import grpc
    import requests

    from grpc_app.stubs import inference_pb2, inference_pb2_grpc

    requests.post(stack.http + "/predict", json={"url": url}, timeout=CALL_TIMEOUT).raise_for_status()
    with grpc.insecure_channel(stack.grpc_target) as channel:
        inference_pb2_grpc.InstanceDetectorStub(channel).Predict(
            inference_pb2.InstanceDetectorInput(url=url), timeout=CALL_TIMEOUT)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    return False


def _ready(stack) -> bool:
    import requests

    http_ready = requests.get(stack.http + "/readyz", timeout=2).status_code == 200
    return http_ready and stack.grpc_health() == "SERVING"


def kill_and_time(stack, name: str) -> dict:
    """SIGKILL to ``name`` (worker, grpc, model); seconds until it is back and the stack ready."""
    old = stack.worker_pids()
    program = {"grpc": "detector:grpc", "model": "model"}.get(name, "detector:http")
    victim, killed = stack.sigkill(name)
    bound = KILL_BOUNDS[name]
    if name == "worker":
        # back: a new worker that has loaded the app (its first metrics file is written then)
        def back():
            new = stack.worker_pids() - old
            return new and any(stack.metrics_dir.glob(f"*_{min(new)}.db"))
    else:
        def back():
            return stack.program_pid(program) not in (0, victim)
    came_back = _wait(back, bound)
    ready = came_back and _wait(lambda: _ready(stack), max(1.0, bound - (time.monotonic() - killed)))
    seconds = time.monotonic() - killed
    result = {"process": name, "pid": victim, "killed_at": killed,
              "seconds_to_ready": seconds if ready else None}
    print(f"  SIGKILL {name} (pid {victim}): " + (f"ready again after {seconds:.1f} s" if ready
                                                  else f"NOT back within {bound:.0f} s"), flush=True)
    return result


def fault_run(stack, url: str, clients: int = 4, settle: float = 4.0) -> tuple[list[dict], list[Call]]:
    """Under ``clients`` clients, each process killed once in turn, with ``settle`` seconds of
    traffic before each kill and after the last recovery."""
    traffic = Clients(stack.http, stack.grpc_target, url, clients).start()
    kills = []
    try:
        for name in ("worker", "grpc", "model"):
            time.sleep(settle)
            kills.append(kill_and_time(stack, name))
        time.sleep(settle)
    finally:
        traffic.stop()
    return kills, traffic.calls


def counters_check(before: tuple[float, float], after: tuple[float, float], calls: list[Call],
                   kills: list[dict]) -> dict:
    """The counters' growth against the calls: exact when ``answered <= grown <= answered +
    in_killed``, where in_killed are unanswered calls in flight at the moment their protocol's
    process (worker for HTTP, gRPC server for gRPC) was killed."""
    moments = {kill["process"]: kill["killed_at"] for kill in kills}
    result = {}
    for index, (protocol, killed) in enumerate((("http", "worker"), ("grpc", "grpc"))):
        mine = [c for c in calls if c.protocol == protocol]
        answered = sum(c.reached for c in mine)
        at = moments.get(killed)
        in_killed = sum(1 for c in mine if not c.reached and at is not None and c.started <= at <= c.ended)
        grown = after[index] - before[index]
        result[protocol] = {
            "calls": len(mine), "answered_by_app": answered, "unanswered": len(mine) - answered,
            "in_killed_process": in_killed, "counter_grew_by": grown,
            "exact": answered <= grown <= answered + in_killed,
        }
    return result


# --------------------------------------------------------------------------- report

def _s(value, digits: int = 2, unit: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def report(data: dict) -> str:
    lines = [f"## load-{data['label']}  ({data['when']}, {data['machine']['cpu_model']}, "
             f"{data['machine']['cpus']} CPUs, {data['weights']['kind']})", ""]
    stack = data["stack"]
    lines.append(f"Stack: TORCH_THREADS={stack['torch_threads']}, MAX_QUEUE_WAIT={stack['max_queue_wait']}, "
                 f"one 640x480 JPEG from 127.0.0.1; published pass time after warm-up "
                 f"{_s(stack['pass_seconds_after_warm_up'])} s; clients half HTTP, half gRPC, "
                 f"{'polite (wait Retry-After)' if data['polite'] else 'impolite (retry at once)'}, "
                 f"{data['duration']:.0f} s per run.")
    lines += ["", "| clients | sent | accepted | shed | failed | clients served | accepted/s | accepted p50 "
              "| accepted p99 | shed p50 | shed p99 | slowest health | PSS before / peak / after (MiB) |",
              "| --- |" + " --- |" * 12]
    for run in data["runs"]:
        slowest = max((v for v in run["slowest_health_s"].values() if v is not None), default=None)
        pss = run["pss_mib"]
        lines.append(
            f"| {run['clients']} | {run['sent']} | {run['accepted']} | {run['shed']} | {run['failed']} "
            f"| {run.get('clients_served', '–')} | {run['accepted_per_s']:.2f} "
            f"| {_s(run['accepted_p50_s'], 2, ' s')} | {_s(run['accepted_p99_s'], 2, ' s')} "
            f"| {_s(run['shed_p50_s'], 3, ' s')} | {_s(run['shed_p99_s'], 3, ' s')} | {_s(slowest, 3, ' s')} "
            f"| {pss['before']:.0f} / {pss['peak']:.0f} / {pss['after']:.0f} |")
    if data.get("kills"):
        lines += ["", "| SIGKILL under 4 clients | seconds until ready again |", "| --- | --- |"]
        names = {"worker": "a gunicorn worker", "grpc": "the gRPC server", "model": "the model process"}
        for kill in data["kills"]:
            seconds = kill["seconds_to_ready"]
            shown = "not back" if seconds is None else f"{seconds:.1f}"
            lines.append(f"| {names[kill['process']]} | {shown} |")
    if data.get("counters"):
        lines += ["", "| counter | calls made | answered by the app | unanswered (in a killed process) "
                  "| counter grew by | exact |", "| --- | --- | --- | --- | --- | --- |"]
        for protocol, check in data["counters"].items():
            lines.append(
                f"| app_{protocol}_inference_count_total | {check['calls']} | {check['answered_by_app']} "
                f"| {check['unanswered']} ({check['in_killed_process']}) | {check['counter_grew_by']:.0f} "
                f"| {'yes' if check['exact'] else '**no**'} |")
        lines += ["", "Exact: answered ≤ grown ≤ answered + unanswered calls that were inside the killed "
                  "process (counted on arrival, never answered). Counted from the first load run to the end."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def weights_for(args) -> tuple[Path, str]:
    from common.model.weights import hub_checkpoint_path
    from testkit.checkpoints import CLASS_A, cached_checkpoint, make_forced_checkpoint

    if args.weights:
        return Path(args.weights), f"weights file {args.weights}"
    if args.forced:
        path = Path(tempfile.mkdtemp(prefix="bench-load-")) / f"forced-{CLASS_A}.pt"
        make_forced_checkpoint(path, CLASS_A)
        return path, f"forced-class checkpoint ({CLASS_A})"
    if os.path.isfile(hub_checkpoint_path()):
        return Path(hub_checkpoint_path()), "true COCO_V1 weights (torch hub cache)"
    path = cached_checkpoint(RESULTS)
    return path, f"seeded realistic checkpoint ({path.name})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run", help="results go to bench/results/load-<label>.json")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per client count")
    parser.add_argument("--clients", default="4,32,64", help="client counts, comma-separated")
    parser.add_argument("--impolite", action="store_true",
                        help="clients ignore Retry-After and retry at once")
    parser.add_argument("--no-faults", action="store_true", help="skip the SIGKILL phase")
    parser.add_argument("--weights", default="", help="state dict to serve (default: COCO_V1 if cached, "
                        "else the seeded realistic checkpoint made under bench/results/)")
    parser.add_argument("--forced", action="store_true", help="serve a forced-class checkpoint instead")
    parser.add_argument("--report", default="", help="only print the table of this JSON result")
    parser.add_argument("--probe", nargs=3, metavar=("HTTP", "GRPC", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1], float(args.probe[2]))))
        return 0
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0

    from common.config import Settings
    from testkit.image_server import ImageServer
    from testkit.images import encode, photo_like
    from testkit.stack import Stack

    weights, kind = weights_for(args)
    counts = [int(c) for c in args.clients.split(",") if c]
    server = ImageServer()
    url = server.add("/photo.jpg", encode(photo_like(640, 480, seed=1), "JPEG", quality=90))
    torch_threads = os.environ.get("TORCH_THREADS", "0")
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-load-stack-")), WEIGHTS_FILE=weights,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{server.port}", TORCH_THREADS=torch_threads)
    max_queue_wait = stack.env.get("MAX_QUEUE_WAIT") or str(getattr(Settings(), "max_queue_wait", "?"))
    data: dict = {
        "label": args.label, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "weights": {"kind": kind, "path": str(weights)}, "duration": args.duration,
        "polite": not args.impolite, "args": vars(args),
        "stack": {"torch_threads": torch_threads, "max_queue_wait": max_queue_wait},
        "runs": [], "kills": [], "counters": {},
    }
    print(f"weights: {kind}; clients {counts}, {args.duration:.0f} s each", flush=True)
    began = time.monotonic()
    stack.start()
    try:
        stack.wait_ready(timeout=600)
        data["stack"]["start_to_ready_s"] = time.monotonic() - began
        warm_up(stack, url)
        try:
            data["stack"]["pass_seconds_after_warm_up"] = float((stack.run_dir / "pass-seconds").read_text())
        except (OSError, ValueError):
            data["stack"]["pass_seconds_after_warm_up"] = None
        time.sleep(2)
        counters_before = course_counters(stack.http)
        calls: list[Call] = []
        for count in counts:
            figures, run_calls = load_run(stack, url, count, args.duration, not args.impolite)
            data["runs"].append(figures)
            calls += run_calls
        if not args.no_faults:
            print("faults (4 clients):", flush=True)
            data["kills"], fault_calls = fault_run(stack, url)
            calls += fault_calls
        _wait(lambda: _ready(stack), 60)
        time.sleep(1)
        data["counters"] = counters_check(counters_before, course_counters(stack.http), calls, data["kills"])
    finally:
        stack.stop()
        server.close()
    shutil.rmtree(stack.workdir, ignore_errors=True)  # kept (with its stack.log) only if the run failed
    if args.forced:
        shutil.rmtree(weights.parent, ignore_errors=True)
    save_results(f"load-{args.label}", data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
