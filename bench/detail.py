"""Full detections and batches: ``.venv/bin/python -m bench.detail`` (``--quick``, ``--help``).

Prints a table and writes JSON and Markdown (bench/results/<label>.json, .md). In one run:

1. in process, per mode (default: ``exact``, and ``eager`` for reference), with the realistic
   checkpoint at the service's threshold (0.75) and at a lower one (0.3, more instances), over the
   benchmark's image set: the time per image of names only (``Detector.detect(image)``: run and
   describe without options), of full detections with boxes (``DetectOptions(t, (), "none")``) and
   with masks as polygons, as RLE and both. The variants run interleaved per image, in an order
   rotated every repeat, so that load from elsewhere hits them alike. Reported: medians, the ratio
   boxes / names (should be about 1) and the extra cost of masks per instance (median over repeats
   of masks minus boxes, run side by side, divided by the instances);
2. on the real stack (supervisord, the model process, gunicorn, gRPC; images from 127.0.0.1): the
   latency of single ``/predict`` calls (a) alone and (b) sent one after another while a 20-image
   ``/v1/detect/batch`` runs, (c) the wait a single call would have behind the batch's 20 passes
   in a FIFO without sharing (the batch's total time when run alone), and the batch's own total and
   per-image time, alone and shared. The three are measured in rounds (alone, batch alone, shared,
   ...), so that drift hits them alike.
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

from bench.__main__ import (
    REPO,
    RESULTS,
    SERVICE_THRESHOLD,
    cpu_flags,
    detect_settings,
    percentile,
    save_results,
)
from bench.load import cpu_model as load_cpu_model
from common.model.detection import MASK_FORMATS as ALL_MASK_FORMATS

LOW_THRESHOLD = 0.3
MASK_FORMATS = tuple(name for name in ALL_MASK_FORMATS if name != "none")
BATCH_IMAGES = 20


def cpu_model() -> str:
    """``lscpu``'s "Model name" (else /proc/cpuinfo's "model name")."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return load_cpu_model()


def cpu_line(machine: dict) -> str:
    flags = machine["cpu_flags"] or "none of avx2/avx512/amx"
    return f"{machine['cpu']}, {machine['cpus']} CPUs, flags: {flags}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


# --------------------------------------------------------------------------- in process


def variants(thresholds: list[float]) -> dict:
    """{key: DetectOptions or None}: names only, then per threshold boxes and each mask format."""
    from common.model.detection import DetectOptions

    found: dict = {"names": None}
    for threshold in thresholds:
        for masks in ("none", *MASK_FORMATS):
            found[f"{'boxes' if masks == 'none' else masks}@{threshold:g}"] = DetectOptions(
                threshold, (), masks
            )
    return found


def full_detection(detector, image, options) -> tuple[float, float, float, int]:
    """(total, forward pass, describe) seconds and the instances of run + describe; with ``options``
    None this is ``Detector.detect(image)``'s own body (names only)."""
    start = time.perf_counter()
    done = detector.run(image, options=options)
    middle = time.perf_counter()
    detection = detector.describe(done, options)
    end = time.perf_counter()
    found = detection.objects if detection.instances is None else detection.instances
    return end - start, done.pass_seconds, end - middle, len(found)


def in_process(weights: Path, images, modes: list[str], thresholds: list[float], repeats: int) -> dict:
    from common.model.detector import Detector

    options = variants(thresholds)
    keys = list(options)
    result = {}
    for mode in modes:
        began = time.perf_counter()
        try:
            detector = Detector.from_settings(detect_settings(weights, mode))
        except Exception as exc:  # noqa: BLE001 - report, go on with the other modes
            result[mode] = {"error": repr(exc)}
            print(f"  mode {mode}: failed to load: {exc!r}", flush=True)
            continue
        entry = result[mode] = {
            "effective": detector.mode,
            "load_seconds": time.perf_counter() - began,
            "images": {},
        }
        for name, image in images:
            for key in ("names", keys[-1]):  # warm-up: this size, and the mask path
                full_detection(detector, image, options[key])
            runs = {key: [] for key in keys}
            for repeat in range(repeats):
                shift = repeat % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    runs[key].append(full_detection(detector, image, options[key]))
            entry["images"][name] = summarise(runs, thresholds)
            print(
                f"  {mode} {name}: "
                + ", ".join(
                    f"{key} {ms(v['seconds'])} ms ({v['instances']})"
                    for key, v in entry["images"][name]["variants"].items()
                ),
                flush=True,
            )
        entry["overall"] = overall(entry["images"], thresholds)
        del detector
    return result


def summarise(runs: dict, thresholds: list[float]) -> dict:
    """Medians per variant, and per threshold the boxes / names ratio and the masks' extra cost per
    instance (median of the differences masks - boxes of the same repeat)."""
    found = {"variants": {}, "thresholds": {}}
    for key, values in runs.items():
        found["variants"][key] = {
            "seconds": statistics.median(v[0] for v in values),
            "pass_seconds": statistics.median(v[1] for v in values),
            "describe_seconds": statistics.median(v[2] for v in values),
            "instances": values[0][3],
            "all": [v[0] for v in values],
        }
    names = runs["names"]
    for threshold in thresholds:
        boxes = runs[f"boxes@{threshold:g}"]
        instances = boxes[0][3]
        entry = found["thresholds"][f"{threshold:g}"] = {
            "instances": instances,
            "boxes_over_names": statistics.median(b[0] / n[0] for b, n in zip(boxes, names, strict=True)),
            "masks": {},
        }
        for masks in MASK_FORMATS:
            with_masks = runs[f"{masks}@{threshold:g}"]
            extra = statistics.median(m[0] - b[0] for m, b in zip(with_masks, boxes, strict=True))
            in_pass = statistics.median(m[1] - b[1] for m, b in zip(with_masks, boxes, strict=True))
            entry["masks"][masks] = {
                "extra_seconds": extra,
                "extra_in_pass_seconds": in_pass,
                "ms_per_instance": extra * 1000 / instances if instances else None,
            }
    return found


def overall(per_image: dict, thresholds: list[float]) -> dict:
    """Over the image set: the mean boxes / names ratio and the extra seconds of all images over
    all their instances."""
    found = {}
    for threshold in thresholds:
        entries = [image["thresholds"][f"{threshold:g}"] for image in per_image.values()]
        instances = sum(e["instances"] for e in entries)
        found[f"{threshold:g}"] = {
            "instances": instances,
            "boxes_over_names": statistics.mean(e["boxes_over_names"] for e in entries),
            "ms_per_instance": {
                masks: (
                    sum(e["masks"][masks]["extra_seconds"] for e in entries) * 1000 / instances
                    if instances
                    else None
                )
                for masks in MASK_FORMATS
            },
        }
    return found


# --------------------------------------------------------------------------- the stack


def singles(session, stack, url: str, tag: str, count: int | None = None, until=None) -> list:
    """``/predict`` calls one after another: ``count`` of them, or as long as ``until()`` is False;
    [(start, end)] (time.monotonic). Their request ids are ``tag-<n>`` (the stack's log lines)."""
    done = []
    while (count is not None and len(done) < count) or (count is None and not until()):
        started = time.monotonic()
        reply = session.post(
            stack.http + "/predict",
            json={"url": url},
            timeout=900,
            headers={"X-Request-ID": f"{tag}-{len(done)}"},
        )
        reply.raise_for_status()
        done.append((started, time.monotonic()))
    return done


def batch(stack, urls: list[str], masks: str, tag: str) -> dict:
    """One ``/v1/detect/batch`` with the request id ``tag``: its start and end (time.monotonic), the
    arrival time of each line, and the errors it reported."""
    import json

    import requests

    started = time.monotonic()
    arrivals, errors = [], []
    with requests.post(
        stack.http + "/v1/detect/batch",
        json={"urls": urls, "masks": masks},
        headers={"X-Request-ID": tag},
        stream=True,
        timeout=900,
    ) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line:
                arrivals.append(time.monotonic())
                answer = json.loads(line)
                if "error" in answer:
                    errors.append(answer)
    return {"start": started, "end": time.monotonic(), "arrivals": arrivals, "errors": errors}


def latency_stats(calls: list[tuple[float, float]]) -> dict:
    values = [end - start for start, end in calls]
    return {
        "count": len(values),
        "p50": statistics.median(values) if values else None,
        "p95": percentile(values, 95) if values else None,
        "max": max(values, default=None),
        "all": values,
    }


def batch_stats(run: dict, images: int) -> dict:
    total = run["end"] - run["start"]
    return {
        "total_seconds": total,
        "per_image_seconds": total / images,
        "lines": len(run["arrivals"]),
        "errors": run["errors"][:5],
        "error_count": len(run["errors"]),
        "first_line_seconds": run["arrivals"][0] - run["start"] if run["arrivals"] else None,
    }


def shared_run(stack, session, single_url: str, batch_urls: list[str], masks: str, tag: str) -> dict:
    """The batch on a thread of its own; single calls one after another from here while it runs."""
    box: dict = {}

    def run_batch():
        try:
            box["run"] = batch(stack, batch_urls, masks, f"{tag}-batch")
        except Exception as exc:  # noqa: BLE001 - reported with the results
            box["error"] = repr(exc)

    thread = threading.Thread(target=run_batch, daemon=True)
    thread.start()
    time.sleep(0.05)  # the batch's request is sent first
    calls = singles(session, stack, single_url, f"{tag}-single", until=lambda: not thread.is_alive())
    thread.join()
    if "error" in box:
        raise RuntimeError(f"the batch failed: {box['error']}")
    run = box["run"]
    finished_during = sum(1 for _, end in calls if end <= run["end"])
    return {
        "batch": batch_stats(run, len(batch_urls)),
        "singles": latency_stats(calls),
        "singles_finished_during_batch": finished_during,
        "single_starts_after_batch_start": [start - run["start"] for start, _ in calls],
    }


def stack_section(
    weights: Path, images, rounds: int, alone_count: int, batch_images: int, masks: str
) -> dict:
    import requests

    from testkit.image_server import ImageServer
    from testkit.images import encode
    from testkit.stack import Stack

    server = ImageServer()
    jpegs = [(name, encode(image, "JPEG", quality=90)) for name, image in images]
    single_name, single_jpeg = jpegs[0]
    single_url = server.add(f"/single-{single_name}.jpg", single_jpeg)
    batch_urls = [
        server.add(f"/batch-{index}-{jpegs[index % len(jpegs)][0]}.jpg", jpegs[index % len(jpegs)][1])
        for index in range(batch_images)
    ]
    env = {
        "WEIGHTS_FILE": str(weights),
        "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{server.port}",
        "MAX_QUEUE_WAIT": "3600",
        "TORCH_THREADS": os.environ.get("TORCH_THREADS", "0"),
    }
    result = {
        "env": {k: v for k, v in env.items() if k != "ALLOWED_PRIVATE_TARGETS"},
        "single_image": single_name,
        "batch_images": [name for name, _ in (jpegs[i % len(jpegs)] for i in range(batch_images))],
        "batch_masks": masks,
        "rounds": [],
    }
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-detail-")), **env)
    stack.start().wait_ready(timeout=600)
    try:
        session = requests.Session()
        singles(session, stack, single_url, "warmup-single", count=1)  # warm-up: every size once
        warm_up = [server.url(f"/batch-{i}-{jpegs[i][0]}.jpg") for i in range(len(jpegs))]
        batch(stack, warm_up, masks, "warmup-batch")
        for index in range(rounds):
            single_calls = singles(session, stack, single_url, f"alone{index}-single", count=alone_count)
            alone = latency_stats(single_calls)
            print(f"  round {index + 1}: singles alone p50 {alone['p50']:.3f} s", flush=True)
            batch_alone = batch_stats(batch(stack, batch_urls, masks, f"alone{index}-batch"), batch_images)
            print(f"  round {index + 1}: batch alone {batch_alone['total_seconds']:.1f} s", flush=True)
            shared = shared_run(stack, session, single_url, batch_urls, masks, f"shared{index}")
            print(
                f"  round {index + 1}: batch shared {shared['batch']['total_seconds']:.1f} s, "
                f"{shared['singles']['count']} singles, p50 {shared['singles']['p50']:.3f} s, "
                f"max {shared['singles']['max']:.3f} s",
                flush=True,
            )
            result["rounds"].append({"alone": alone, "batch_alone": batch_alone, "shared": shared})
        result["model_side"] = model_side(stack.request_lines())
    finally:
        stack.stop()
        server.close()
    rounds_ = result["rounds"]
    alone_all = [v for r in rounds_ for v in r["alone"]["all"]]
    shared_all = [v for r in rounds_ for v in r["shared"]["singles"]["all"]]
    result["summary"] = {
        "alone": latency_stats([(0.0, v) for v in alone_all]),
        "shared": latency_stats([(0.0, v) for v in shared_all]),
        "singles_finished_during_batch": [r["shared"]["singles_finished_during_batch"] for r in rounds_],
        "fifo_wait_seconds": statistics.median(r["batch_alone"]["total_seconds"] for r in rounds_),
        "batch_alone_seconds": [r["batch_alone"]["total_seconds"] for r in rounds_],
        "batch_shared_seconds": [r["shared"]["batch"]["total_seconds"] for r in rounds_],
        "batch_errors": sum(
            r["batch_alone"]["error_count"] + r["shared"]["batch"]["error_count"] for r in rounds_
        ),
    }
    return result


def model_side(lines: list[dict]) -> dict:
    """From the stack's request log lines: per (phase, kind), e.g. ``shared single``, the
    seconds each image waited for the model (``queue_wait``) and its pass (``inference``)."""
    groups: dict = {}
    for line in lines:
        ident, stages = line.get("request_id", ""), line.get("stages") or {}
        phase = ident.split("-", 1)[0].rstrip("0123456789")
        if phase not in ("alone", "shared") or "queue_wait" not in stages:
            continue
        kind = "single" if "-single-" in ident else "batch image"
        group = groups.setdefault(f"{phase} {kind}", {"queue_wait": [], "inference": []})
        group["queue_wait"].append(stages["queue_wait"])
        group["inference"].append(stages.get("inference", float("nan")))
    return {
        key: {
            "count": len(group["queue_wait"]),
            **{
                f"{stage}_{q}": percentile(group[stage], {"p50": 50, "p95": 95, "max": 100}[q])
                for stage in ("queue_wait", "inference")
                for q in ("p50", "p95", "max")
            },
        }
        for key, group in sorted(groups.items())
    }


# --------------------------------------------------------------------------- report


def report(data: dict) -> str:
    lines = []
    add = lines.append
    add(f"## {data['label']}: full detections and batches ({data['when']})")
    add("")
    add(f"CPU: {cpu_line(data['machine'])}; torch {data['machine']['torch']}; {data['weights']['kind']}.")
    for mode, entry in data.get("in_process", {}).items():
        add("")
        if "error" in entry:
            add(f"In process, mode `{mode}`: failed: {entry['error'][:200]}")
            continue
        add(
            f"In process, mode `{mode}` ({entry['effective']}), median ms per image over "
            f"{data['args']['repeats']} interleaved repeats; masks: extra ms per instance over boxes "
            "(of which in the forward pass):"
        )
        add("")
        add(
            "| image | threshold | instances | names | boxes | boxes / names | polygons | rle | both "
            "| polygons ms/inst | rle ms/inst | both ms/inst |"
        )
        add("| --- |" + " --- |" * 11)
        for name, image in entry["images"].items():
            v = image["variants"]
            for threshold, t in image["thresholds"].items():
                cells = [
                    name,
                    threshold,
                    str(t["instances"]),
                    ms(v["names"]["seconds"]),
                    ms(v[f"boxes@{threshold}"]["seconds"]),
                    f"{t['boxes_over_names']:.3f}",
                ]
                cells += [ms(v[f"{masks}@{threshold}"]["seconds"]) for masks in MASK_FORMATS]
                for masks in MASK_FORMATS:
                    m = t["masks"][masks]
                    if m["ms_per_instance"] is None:
                        cells.append("–")
                    else:
                        in_pass = m["extra_in_pass_seconds"] * 1000 / t["instances"]
                        cells.append(f"{m['ms_per_instance']:.1f} ({in_pass:.1f})")
                add("| " + " | ".join(cells) + " |")
        for threshold, t in entry["overall"].items():
            add(
                f"| all | {threshold} | {t['instances']} | | | {t['boxes_over_names']:.3f} (mean) | | | | "
                + " | ".join(
                    f"{t['ms_per_instance'][m]:.1f}" if t["ms_per_instance"][m] is not None else "–"
                    for m in MASK_FORMATS
                )
                + " |"
            )
    stack = data.get("stack")
    if stack:
        s = stack["summary"]
        rounds = len(stack["rounds"])
        add("")
        n = len(stack["batch_images"])
        add(
            f"Stack (default mode; `{stack['single_image']}` single `/predict` calls one after another; "
            f"a {n}-image `/v1/detect/batch`, masks `{stack['batch_masks']}`, of the three sizes in "
            f"turn; {rounds} round(s) of alone / batch alone / shared):"
        )
        add("")
        add("| single `/predict` latency (s) | calls | p50 | p95 | max |")
        add("| --- | --- | --- | --- | --- |")
        for key, title in (("alone", "(a) alone"), ("shared", "(b) while the batch runs")):
            st = s[key]
            add(f"| {title} | {st['count']} | {st['p50']:.2f} | {st['p95']:.2f} | {st['max']:.2f} |")
        add(
            f"| (c) behind the batch's {n} passes in a FIFO without sharing "
            f"(batch alone, total) | | {s['fifo_wait_seconds']:.2f} | | |"
        )
        add("")
        alone = ", ".join(f"{v:.1f}" for v in s["batch_alone_seconds"])
        shared = ", ".join(f"{v:.1f}" for v in s["batch_shared_seconds"])
        alone_each = statistics.median(s["batch_alone_seconds"]) / n
        shared_each = statistics.median(s["batch_shared_seconds"]) / n
        finished = ", ".join(map(str, s["singles_finished_during_batch"]))
        add(
            f"Batch total: alone {alone} s ({alone_each:.2f} s per image); while singles run {shared} s "
            f"({shared_each:.2f} s per image). Singles finished while the batch ran: {finished} (per "
            f"round). Batch lines with an error: {s['batch_errors']}."
        )
        side = stack.get("model_side") or {}
        if side:
            add("")
            add("In the model process (the stack's request log): seconds waiting for the model, and the pass")
            add("")
            add("| requests | count | wait p50 | wait p95 | wait max | pass p50 | pass max |")
            add("| --- | --- | --- | --- | --- | --- | --- |")
            for key, g in side.items():
                add(
                    f"| {key} | {g['count']} | {g['queue_wait_p50']:.2f} | {g['queue_wait_p95']:.2f} "
                    f"| {g['queue_wait_max']:.2f} | {g['inference_p50']:.2f} | {g['inference_max']:.2f} |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.detail",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--label",
        default="",
        help="results name under bench/results/ (default: detail-run, detail-quick with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per image and variant (median)")
    parser.add_argument("--modes", default="exact,eager", help="comma-separated detect modes in process")
    parser.add_argument("--thresholds", default=f"{SERVICE_THRESHOLD:g},{LOW_THRESHOLD:g}")
    parser.add_argument("--rounds", type=int, default=2, help="stack rounds (alone, batch alone, shared)")
    parser.add_argument("--singles", type=int, default=10, help="single calls alone per round")
    parser.add_argument("--batch-images", type=int, default=BATCH_IMAGES)
    parser.add_argument("--batch-masks", default="none", help="the batch's masks option")
    parser.add_argument("--no-stack", action="store_true", help="in-process measurements only")
    parser.add_argument("--no-in-process", action="store_true", help="stack measurements only")
    parser.add_argument(
        "--quick", action="store_true", help="repeats 2, mode exact, 1 stack round, 5 singles"
    )
    parser.add_argument("--report", default="", help="only print the table of this JSON result")
    parser.add_argument("--weights", default="", help="state dict (default: the seeded realistic checkpoint)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.modes, args.rounds, args.singles = 2, "exact", 1, 5
    args.label = args.label or ("detail-quick" if args.quick else "detail-run")
    if args.report:  # print the table of an earlier run's JSON
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    sys.path.insert(0, str(REPO))

    import torch
    import torchvision

    from testkit.checkpoints import cached_checkpoint
    from testkit.images import image_set

    if args.weights:
        weights, kind = Path(args.weights), f"weights file {args.weights}"
    else:
        weights = cached_checkpoint(RESULTS)
        kind = f"seeded realistic checkpoint ({weights.name})"
    images = image_set()
    modes = [m for m in args.modes.split(",") if m]
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    data = {
        "label": args.label,
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "weights": {"kind": kind, "path": str(weights)},
        "args": vars(args),
    }
    print(f"CPU: {cpu_line(data['machine'])}", flush=True)
    print(f"weights: {kind}; modes: {modes}; thresholds: {thresholds}", flush=True)
    if not args.no_in_process:
        print("in process:", flush=True)
        data["in_process"] = in_process(weights, images, modes, thresholds, args.repeats)
    if not args.no_stack:
        print("stack:", flush=True)
        data["stack"] = stack_section(
            weights, images, args.rounds, args.singles, args.batch_images, args.batch_masks
        )
    save_results(args.label, data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
