"""The benchmark: ``.venv/bin/python -m bench`` (``--help`` for options).

Prints a table and writes JSON (bench/results/<label>.json). In one run, side by side:
1. reference: torchvision eager fp32 ``maskrcnn_resnet50_fpn(box_score_thresh=0.75)``, ``model([t])``;
2. the service's detect path in process (``Detector.detect``), for every mode the service offers,
   with its deviation from the reference (Dice of labels per image, max score / box deviation);
3. end to end over HTTP and gRPC against the real stack (supervisord + gunicorn + gRPC, the
   repository's supervisord.conf), one client, images from 127.0.0.1: p50 / p95;
4. throughput at 1, 2, 4, 8 concurrent clients for a fixed duration, HTTP, gRPC and mixed;
5. whole-stack PSS (supervisord and all children) idle after warm-up and peak under load, against
   one process holding the model;
6. cold start: supervisord start until /readyz is 200 and gRPC health is SERVING.
Ratios: 2 / 1, 3 / in-process detect and throughput / in-process rate (both measured beside the
stack, in turn with it), memory / one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from testkit.stack import pss_kib, tree_pss_mib

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SERVICE_THRESHOLD = 0.75  # the service's SCORE_THRESHOLD default, and the reference's box_score_thresh


# --------------------------------------------------------------------------- helpers

def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return " ".join(sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))))


def available_modes() -> list[str]:
    from common import config

    return list(getattr(config, "DETECT_MODES", ("eager",)))


# The detect path's own knobs: the stack inherits them from this environment, so the in-process
# detectors take them from it too.
DETECT_PATH_ENV = ("ACCEL_CACHE_DIR", "WINOGRAD", "ROI_ALIGN_THREADS")


def detect_settings(weights: Path, mode: str):
    """The settings of an in-process detector in ``mode``, as the stack would run it."""
    from testkit.settings import settings_for

    return settings_for(weights, inherit=DETECT_PATH_ENV, DETECT_MODE=mode, SCORE_THRESHOLD=SERVICE_THRESHOLD)


def raw_outputs(detector, image):
    """(labels, scores, boxes) lists from the service's detector, or (labels, None, None)."""
    if hasattr(detector, "detect_raw"):
        from testkit.compare import as_lists

        return as_lists(detector.detect_raw(image))
    from common.model.weights import COCO_CATEGORIES

    names = detector.detect(image)
    return [COCO_CATEGORIES.index(n) for n in names], None, None


def timed(fn, repeats: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# --------------------------------------------------------------------------- in process

def in_process(weights: Path, images, repeats: int, modes: list[str]) -> dict:
    """Reference and every mode, timed interleaved (ref, mode 1, mode 2, ref, ...) per image, so
    that load from elsewhere on the machine hits them alike and the ratios stay meaningful."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from common.model.detector import Detector
    from common.model.weights import build_model
    from testkit.compare import compare

    result = {"threads": torch.get_num_threads(), "reference": {}, "modes": {}}
    # torchvision's own model with the weights, as eager mode builds it, called directly
    model = build_model(torch.load(weights, map_location="cpu", weights_only=True), SERVICE_THRESHOLD)

    def reference(image):
        tensor = pil_to_tensor(image).float().div_(255.0)
        with torch.inference_mode():
            return model([tensor])[0]

    detectors = {}
    for mode in modes:
        start = time.perf_counter()
        try:
            detectors[mode] = Detector.from_settings(detect_settings(weights, mode))
        except Exception as exc:  # noqa: BLE001 - report, go on with the other modes
            result["modes"][mode] = {"error": repr(exc)}
            print(f"  mode {mode}: failed to load: {exc!r}", flush=True)
            continue
        result["modes"][mode] = {"load_seconds": time.perf_counter() - start, "images": {},
                                 "effective": getattr(detectors[mode], "mode", mode)}
    for name, image in images:
        out = reference(image)  # warm-up, and the answers
        ref = (out["labels"].tolist(), out["scores"].tolist(), out["boxes"].tolist())
        answers = {mode: raw_outputs(d, image) for mode, d in detectors.items()}
        times = {"reference": []} | {mode: [] for mode in detectors}
        for _ in range(repeats):
            times["reference"].append(timed(lambda: reference(image), 1)[0])
            for mode, detector in detectors.items():
                times[mode].append(timed(lambda: detector.detect(image), 1)[0])
        ref_seconds = statistics.median(times["reference"])
        result["reference"][name] = {"seconds": ref_seconds, "all": times["reference"],
                                     "kept": len(ref[0])}
        print(f"  reference {name}: {ref_seconds:.3f} s, {len(ref[0])} boxes", flush=True)
        for mode in detectors:
            median = statistics.median(times[mode])
            entry = result["modes"][mode]["images"][name] = {
                "seconds": median, "all": times[mode], "ratio": median / ref_seconds,
                **compare(ref, answers[mode], threshold=SERVICE_THRESHOLD)}
            print(f"  mode {mode} {name}: {median:.3f} s ({median / ref_seconds:.2f}x)  "
                  f"{ {k: v for k, v in entry.items() if k != 'all'} }", flush=True)
    ref_total = sum(result["reference"][n]["seconds"] for n, _ in images)
    for mode in detectors:
        entry = result["modes"][mode]
        entry["ratio"] = sum(v["seconds"] for v in entry["images"].values()) / ref_total
    del model, detectors
    return result


def one_process_pss(weights: Path, mode: str, env_extra: dict) -> float:
    """PSS (MiB) of a lone process that loaded the model and ran one detection."""
    code = (
        "import sys; from bench.__main__ import detect_settings; from testkit.stack import pss_kib; from pathlib import Path;"
        "from testkit.images import photo_like; from common.model.detector import Detector;"
        "import os;"
        f"d = Detector.from_settings(detect_settings(Path({str(weights)!r}), {mode!r}));"
        "d.detect(photo_like(640, 480, 1)); print(pss_kib(os.getpid()) / 1024)"
    )
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(out.stderr[-2000:])
        return float("nan")


# --------------------------------------------------------------------------- the stack

class Clients:
    def __init__(self, stack, url):
        import grpc

        from grpc_app.stubs import inference_pb2, inference_pb2_grpc

        self.stack, self.url = stack, url
        self._grpc, self._pb2, self._stubs = grpc, inference_pb2, inference_pb2_grpc

    def http_call(self, session):
        reply = session.post(self.stack.http + "/predict", json={"url": self.url}, timeout=300)
        reply.raise_for_status()
        return reply.json()["objects"]

    def grpc_stub(self):
        channel = self._grpc.insecure_channel(self.stack.grpc_target)
        return self._stubs.InstanceDetectorStub(channel)

    def grpc_call(self, stub):
        return list(stub.Predict(self._pb2.InstanceDetectorInput(url=self.url), timeout=300).objects)


def latency(stack, image_urls: dict, repeats: int, local_detect) -> dict:
    """p50/p95 over HTTP and gRPC, each call beside an in-process detection of the same decoded
    image (in-process, HTTP, gRPC, in-process, ...): the ratio of the two then holds on a machine
    whose speed drifts during the run (seen here: a whole in-process phase 40 % slower than the
    stack phase that followed it)."""
    import requests

    result = {}
    for name, (url, image) in image_urls.items():
        clients = Clients(stack, url)
        session, stub = requests.Session(), clients.grpc_stub()
        calls = {"in_process": lambda: local_detect(image), "http": lambda: clients.http_call(session),
                 "grpc": lambda: clients.grpc_call(stub)}
        for call in calls.values():
            call()  # warm-up
        times = {kind: [] for kind in calls}
        for _ in range(repeats):
            for kind, call in calls.items():
                times[kind].append(timed(call, 1)[0])
        entry = result[name] = {kind: {"p50": statistics.median(values), "p95": percentile(values, 95),
                                       "all": values} for kind, values in times.items()}
        print(f"  {name}: " + ", ".join(f"{kind} p50 {entry[kind]['p50']:.3f} s, p95 "
                                        f"{entry[kind]['p95']:.3f} s" for kind in calls), flush=True)
    return result


def load(stack, url: str, protocol: str, count: int, duration: float, on_tick=None):
    """``count`` clients calling back to back for ``duration`` s; [(start, end)] of the calls that
    started within it, the number of errors, and the start time. ``on_tick`` runs every 0.5 s."""
    import requests

    clients = Clients(stack, url)
    done, errors = [], []
    stop_at = [0.0]
    barrier = threading.Barrier(count + 1)

    def worker(index):
        use_http = protocol == "http" or (protocol == "mixed" and index % 2 == 0)
        session, stub = requests.Session(), clients.grpc_stub()
        barrier.wait()
        while True:
            if protocol == "mixed" and count == 1:
                use_http = not use_http  # one client alternates
            started = time.monotonic()
            if started >= stop_at[0]:
                return
            try:
                clients.http_call(session) if use_http else clients.grpc_call(stub)
                done.append((started, time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - count and go on
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + duration
    barrier.wait()
    while time.monotonic() < stop_at[0]:
        if on_tick:
            on_tick()
        time.sleep(0.5)
    for thread in threads:
        thread.join(600)
    return done, len(errors), began


def throughput(stack, url: str, image, concurrency: list[int], duration: float, supervisord_pid: int,
               local_detect) -> dict:
    """Requests per second per protocol and client count. Each run's ratio denominator is the
    in-process rate (detections back to back, the best a one-model stack can do) measured right
    before and right after it, for the same reason as in ``latency``."""
    result = {"duration": duration, "runs": {}}
    calls = 2

    def in_process_seconds():  # ``calls`` detections in this process, back to back
        return sum(timed(lambda: local_detect(image), calls)[1])

    local_before = in_process_seconds()
    for protocol in ("http", "grpc", "mixed"):
        for count in concurrency:
            done, errors, began = load(stack, url, protocol, count, duration)
            local_after = in_process_seconds()
            local_rate = 2 * calls / (local_before + local_after)
            local_before = local_after  # the next run's "before"
            # Every call started within the window counts, and the clock runs until the last one
            # ends: a few-second call cut off at the window's end would otherwise skew short runs.
            elapsed = max((end for _, end in done), default=began + duration) - began
            rate = len(done) / elapsed
            key = f"{protocol}x{count}"
            result["runs"][key] = {
                "requests_per_s": rate, "in_process_per_s": local_rate, "completed": len(done),
                "elapsed_s": elapsed, "errors": errors,
                "p50": statistics.median(end - start for start, end in done) if done else None}
            print(f"  {key}: {rate:.3f} req/s ({len(done)} in {elapsed:.1f} s, {errors} errors; "
                  f"in process before and after: {local_rate:.3f}/s)", flush=True)
    # Peak memory in a run of its own: reading every process's smaps costs CPU, which would
    # otherwise be taken from the runs above.
    peak = [0.0]
    load(stack, url, "mixed", max(concurrency), duration,
         on_tick=lambda: peak.__setitem__(0, max(peak[0], tree_pss_mib(supervisord_pid))))
    result["peak_pss_mib"] = peak[0]
    print(f"  peak PSS under load (mixed x{max(concurrency)}): {peak[0]:.0f} MiB", flush=True)
    return result


def stack_section(weights: Path, images, args, mode_env: dict, local_detect) -> dict:
    """The real stack; ``local_detect(image)`` is the same detect path in this process, measured
    beside it for the ratios."""
    sys.path.insert(0, str(REPO))
    from common.config import Settings
    from common.decode import decode_image
    from testkit.image_server import ImageServer
    from testkit.images import encode
    from testkit.stack import Stack

    server = ImageServer()
    urls = {}  # name -> (URL of the JPEG served, the pixels the servers decode from it)
    for name, image in images:
        data = encode(image, "JPEG", quality=90)
        urls[name] = (server.add(f"/{name}.jpg", data), decode_image(data, Settings().max_image_pixels))
    workdir = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    env = {"WEIGHTS_FILE": str(weights), "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{server.port}",
           "TORCH_THREADS": os.environ.get("TORCH_THREADS", "0"), **mode_env}
    result = {"env": {k: v for k, v in env.items() if k != "ALLOWED_PRIVATE_TARGETS"}}

    def start():
        stack = Stack(workdir, **env)
        began = time.monotonic()
        stack.start().wait_ready(timeout=600)
        return stack, time.monotonic() - began

    stack, result["first_start_s"] = start()
    print(f"  first start (cache as found): {result['first_start_s']:.1f} s", flush=True)
    try:
        pid = stack.process.pid
        result["latency"] = latency(stack, urls, args.repeats, local_detect)
        time.sleep(2)
        result["idle_pss_mib"] = tree_pss_mib(pid)
        result["processes"] = [{"pid": p, "cmd": command[:100], "pss_mib": pss_kib(p) / 1024}
                               for p, command in stack.processes().items()]
        print(f"  whole-stack PSS idle after warm-up: {result['idle_pss_mib']:.0f} MiB", flush=True)
        first_url, first_image = next(iter(urls.values()))
        result["throughput"] = throughput(stack, first_url, first_image, args.clients, args.duration,
                                          pid, local_detect)
    finally:
        stack.stop()
    stack, result["cold_start_s"] = start()  # again, with whatever the first start cached
    stack.stop()
    print(f"  cold start (caches warm): {result['cold_start_s']:.1f} s", flush=True)
    server.close()
    return result


# --------------------------------------------------------------------------- report

def report(data: dict) -> str:
    lines = []
    add = lines.append
    inp = data["in_process"]
    names = list(inp["reference"])
    add(f"## {data['label']}  ({data['when']}, {data['machine']['cpus']} CPUs, {data['weights']['kind']})")
    add("")
    add("| in process (median s) | " + " | ".join(names) + " | ratio to reference |")
    add("| --- |" + " --- |" * (len(names) + 1))
    add("| reference eager fp32 | " + " | ".join(f"{inp['reference'][n]['seconds']:.3f}" for n in names)
        + " | 1.00 |")
    for mode, entry in inp["modes"].items():
        if "error" in entry:
            add(f"| {mode} | failed: {entry['error'][:80]} |")
            continue
        add(f"| mode `{mode}` ({entry['effective']}) | "
            + " | ".join(f"{entry['images'][n]['seconds']:.3f}" for n in names)
            + f" | {entry['ratio']:.2f} |")
    add("")
    add("| deviation from reference | " + " | ".join(names) + " |")
    add("| --- |" + " --- |" * len(names))
    for mode, entry in inp["modes"].items():
        if "error" in entry:
            continue
        cells = []
        for n in names:
            d = entry["images"][n]
            cell = f"Dice {d['dice']:.3f} ({d['kept']}/{d['kept_ref']})"
            if "max_score_dev" in d:
                cell += f", score ±{d['max_score_dev']:.1e}, box ±{d['max_box_dev_px']:.2f}px"
            if d.get("borderline"):
                from testkit.compare import SCORE_TOLERANCE

                cell += (f", {d['borderline']} kept by one side only with a score within "
                         f"{SCORE_TOLERANCE:g} of the threshold")
            if d.get("same_answers") is not None:
                cell += ": same answers" if d["same_answers"] else ": **different answers**"
            cells.append(cell)
        add(f"| `{mode}` | " + " | ".join(cells) + " |")
    stack = data.get("stack")
    if stack:
        default = data["default_mode"]
        detect = {n: inp["modes"][default]["images"][n]["seconds"] for n in names}
        add("")
        # Ratios against the in-process detect path measured beside each call or run (older
        # results: against the in-process section's figures).
        add(f"End to end (default mode `{default}`, one client; ratio = p50 / in-process detect p50, "
            "measured call by call in turn with HTTP and gRPC):")
        add("")
        add("| image | in-process p50 | HTTP p50 | HTTP p95 | gRPC p50 | gRPC p95 | HTTP ratio | gRPC ratio |")
        add("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in names:
            lat = stack["latency"][n]
            local = lat.get("in_process", {}).get("p50", detect[n])
            add(f"| {n} | {local:.3f} | {lat['http']['p50']:.3f} | {lat['http']['p95']:.3f} "
                f"| {lat['grpc']['p50']:.3f} | {lat['grpc']['p95']:.3f} | {lat['http']['p50'] / local:.2f} "
                f"| {lat['grpc']['p50'] / local:.2f} |")
        tp = stack["throughput"]
        runs = tp["runs"]
        best = 1.0 / detect[names[0]]
        local_rates = [run["in_process_per_s"] for run in runs.values() if "in_process_per_s" in run]
        add("")
        if local_rates:
            add(f"Throughput, {names[0]}, {tp['duration']:.0f} s per run (ratio = req/s ÷ in-process "
                f"req/s measured right before and after the run: {min(local_rates):.3f}–{max(local_rates):.3f}):")
        else:
            add(f"Throughput, {names[0]}, {tp['duration']:.0f} s per run (ratio = req/s ÷ best in-process "
                f"{best:.3f} req/s):")
        add("")
        counts = sorted({int(k.rsplit("x", 1)[1]) for k in runs})
        add("| protocol | " + " | ".join(f"{c} clients" for c in counts) + " |")
        add("| --- |" + " --- |" * len(counts))
        for protocol in ("http", "grpc", "mixed"):
            cells = []
            for c in counts:
                run = runs[f"{protocol}x{c}"]
                rate = run["requests_per_s"]
                cells.append(f"{rate:.3f} ({rate / run.get('in_process_per_s', best):.2f})"
                             + (f" {run['errors']} err" if run["errors"] else ""))
            add(f"| {protocol} | " + " | ".join(cells) + " |")
        one = data.get("one_process_pss_mib", float("nan"))
        add("")
        add(f"Memory: whole stack idle {stack['idle_pss_mib']:.0f} MiB PSS "
            f"({stack['idle_pss_mib'] / one:.2f}× one model process of {one:.0f} MiB), "
            f"peak under load {tp['peak_pss_mib']:.0f} MiB ({tp['peak_pss_mib'] / one:.2f}×).")
        add(f"Cold start to /readyz 200 and gRPC SERVING: {stack['cold_start_s']:.1f} s with caches warm "
            f"(first start of this run: {stack['first_start_s']:.1f} s).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run", help="name of the JSON file under bench/results/")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per image (median)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput run")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels")
    parser.add_argument("--modes", default="", help="comma-separated modes (default: all offered)")
    parser.add_argument("--no-stack", action="store_true", help="in-process measurements only")
    parser.add_argument("--quick", action="store_true", help="repeats 2, duration 8 s, clients 1,4")
    parser.add_argument("--weights", default="", help="state dict to use (default: COCO_V1 if cached, "
                        "else a seeded realistic checkpoint made under bench/results/)")
    parser.add_argument("--report", default="", help="only print the table of this JSON result")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.duration, args.clients = 2, 8.0, "1,4"
    args.clients = [int(c) for c in args.clients.split(",") if c]
    sys.path.insert(0, str(REPO))

    import torch
    import torchvision

    from common.model.detector import Detector
    from common.model.weights import hub_checkpoint_path
    from testkit.checkpoints import cached_checkpoint
    from testkit.images import image_set

    if args.report:  # print the table of an earlier run's JSON
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    if args.weights:
        weights, kind = Path(args.weights), f"weights file {args.weights}"
    elif os.path.isfile(hub_checkpoint_path()):
        weights, kind = Path(hub_checkpoint_path()), "true COCO_V1 weights (torch hub cache)"
    else:
        weights = cached_checkpoint(RESULTS)
        kind = f"seeded realistic checkpoint ({weights.name})"
    images = image_set()
    modes = [m for m in args.modes.split(",") if m] or available_modes()
    from common.config import Settings

    default_mode = getattr(Settings(), "detect_mode", "eager")
    data = {
        "label": args.label, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__},
        "weights": {"kind": kind, "path": str(weights)}, "default_mode": default_mode,
        "args": {k: v for k, v in vars(args).items()},
    }
    try:
        import openvino

        data["machine"]["openvino"] = openvino.__version__
    except ImportError:
        pass
    print(f"weights: {kind}; modes: {modes}; default: {default_mode}", flush=True)
    print("in process:", flush=True)
    data["in_process"] = in_process(weights, images, args.repeats, modes)
    if not args.no_stack:
        print("one model process (PSS):", flush=True)
        data["one_process_pss_mib"] = one_process_pss(weights, default_mode, {})
        print(f"  {data['one_process_pss_mib']:.0f} MiB", flush=True)
        print("stack:", flush=True)
        local = Detector.from_settings(detect_settings(weights, default_mode))
        data["stack"] = stack_section(weights, images, args, {}, local.detect)
        del local
    save_results(args.label, data, report)
    return 0


def save_results(name: str, data: dict, render) -> None:
    """Write bench/results/<name>.json (first, so that a bug in ``render`` loses nothing), then the
    table ``render(data)`` gives into the JSON and <name>.md, and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(data, indent=1))
    table = render(data)
    data["table"] = table
    out.write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    sys.exit(main())
