"""Memory under a crowd: ``.venv/bin/python -m bench.memory`` (``--help`` for options).

Starts the real stack (``testkit.stack.Stack``) with the seeded realistic checkpoint, warms it up
with one call per protocol, then runs ``--clients`` closed-loop clients (``--protocols``: all HTTP
``/predict``, the default and the issue's measurement, all gRPC, or half and half; one 640x480
photo from 127.0.0.1) for ``--duration`` seconds and watches for ``--after`` seconds once they
have stopped. PSS is sampled every second, per process (the model
process, each gunicorn worker and the master, the gRPC server, supervisord) and for the tree.

Reported per process and for the tree: idle (after warm-up), peak during the load, the last
sample of the watch after it ("after"), and the ratios peak/idle and after/idle. For the model
process it also splits the PSS by kind of mapping at idle, peak and after: anonymous memory
(the allocators' heaps and arenas, torch's and OpenVINO's buffers) and file-backed (the libraries
and the memory-mapped weights); the anonymous part is split further into the main heap (``[heap]``,
glibc's main arena, grown by brk), regions of 1 MiB or more (glibc's per-thread arenas, reserved
64 MiB at a time, jemalloc's extents, and the large tensors glibc maps on their own) and smaller ones.

``--env KEY=VALUE`` (repeatable) sets an environment variable for the stack, e.g.
``--env MALLOC_ARENA_MAX=2`` or ``--env MAX_QUEUE_WAIT=600`` (every call admitted and queued,
so the service holds the whole crowd at once). Prints a Markdown table and writes
bench/results/memory-<label>.json (and .md). Loopback only; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


SPLIT_KINDS = ("anon", "file", "heap", "anon_large", "anon_small")
LARGE_MAPPING = 1024 * 1024  # bytes: an anonymous region this large or larger is "anon_large"


def smaps_split_kib(pid: int) -> dict[str, int]:
    """PSS of one process by kind of mapping (KiB): ``anon`` (heap, arenas, buffers) and ``file``
    (libraries, mapped weights); ``anon`` again as ``heap`` ([heap]: brk, glibc's main arena),
    ``anon_large`` (regions of at least 1 MiB: thread arenas, jemalloc extents, big tensors) and
    ``anon_small`` (the rest: stacks, small mappings)."""
    split = dict.fromkeys(SPLIT_KINDS, 0)
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            kinds = ("anon", "anon_small")
            for line in handle:
                first = line.split(maxsplit=5)
                if first and "-" in first[0] and not first[0].endswith(":") and len(first) >= 5:
                    name = first[5].strip() if len(first) > 5 else ""
                    start, end = (int(part, 16) for part in first[0].split("-"))
                    if name.startswith("/"):
                        kinds = ("file",)
                    elif name == "[heap]":
                        kinds = ("anon", "heap")
                    elif end - start >= LARGE_MAPPING:
                        kinds = ("anon", "anon_large")
                    else:
                        kinds = ("anon", "anon_small")
                elif line.startswith("Pss:"):
                    for kind in kinds:
                        split[kind] += int(line.split()[1])
    except OSError:
        pass
    return split


def crowd(stack, url: str, count: int, protocols: str):
    """``count`` closed-loop clients of bench.load: all HTTP, all gRPC, or alternating ("both")."""
    import threading

    from bench.load import Clients

    clients = Clients(stack.http, stack.grpc_target, url, count)
    if protocols != "both":
        target = clients._http if protocols == "http" else clients._grpc
        clients._threads = [threading.Thread(target=target, args=(index,), daemon=True)
                            for index in range(count)]
    return clients.start()


def roles(stack) -> dict[int, str]:
    """{pid: role} of the stack's processes: model, grpc, http master, http worker N, supervisord."""
    named: dict[int, str] = {}
    model = stack.program_pid("model")
    grpc_pid = stack.program_pid("detector:grpc")
    master = stack.program_pid("detector:http")
    workers = sorted(stack.worker_pids())
    for pid in stack.processes():
        if pid == model:
            named[pid] = "model"
        elif pid == grpc_pid:
            named[pid] = "grpc"
        elif pid == master:
            named[pid] = "http master"
        elif pid in workers:
            named[pid] = f"http worker {workers.index(pid) + 1}"
        elif pid == stack.process.pid:
            named[pid] = "supervisord"
    return named


def sample(stack, named: dict[int, str]) -> dict[str, float]:
    """PSS (MiB) of each process and the tree, and as ``<role> anon`` the anonymous part
    (``Pss_Anon``: what the allocators hold; the file-backed rest is the libraries and weights,
    whose PSS also depends on how many other processes on the machine map the same files)."""
    from testkit.stack import pss_kib

    figures = {role: pss_kib(pid) / 1024 for pid, role in named.items()}
    figures["tree"] = stack.pss_mib()
    anon = {f"{role} anon": anon_kib(pid) / 1024 for pid, role in named.items()}
    anon["tree anon"] = sum(anon.values())
    return {**figures, **anon}


def anon_kib(pid: int) -> int:
    """``Pss_Anon`` of one process (KiB; 0 once it is gone)."""
    from testkit.stack import smaps_rollup_kib

    return smaps_rollup_kib(pid, "Pss_Anon")


def run(args) -> dict:
    from bench.load import cpu_model, warm_up, weights_for
    from testkit.image_server import ImageServer
    from testkit.images import encode, photo_like
    from testkit.stack import Stack

    weights, kind = weights_for(args)
    server = ImageServer()
    url = server.add("/photo.jpg", encode(photo_like(640, 480, seed=1), "JPEG", quality=90))
    extra = dict(item.split("=", 1) for item in args.env)
    stack = Stack(Path(tempfile.mkdtemp(prefix="bench-memory-stack-")), WEIGHTS_FILE=weights,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{server.port}",
                  TORCH_THREADS=os.environ.get("TORCH_THREADS", "0"), **extra)
    data: dict = {
        "label": args.label, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "features": _features()},
        "weights": kind, "clients": args.clients, "protocols": args.protocols, "duration": args.duration,
        "after": args.after, "env": extra,
    }
    stack.start()
    try:
        stack.wait_ready(timeout=600)
        warm_up(stack, url)
        time.sleep(3)
        named = roles(stack)
        idle = sample(stack, named)
        split = {"idle": {role: smaps_split_kib(pid) for pid, role in named.items()}}
        clients = crowd(stack, url, args.clients, args.protocols)
        began = time.monotonic()
        peak = dict(idle)
        peak_split = dict(split["idle"])
        while time.monotonic() < began + args.duration:
            now = sample(stack, named)
            for pid, role in named.items():
                if now[role] >= peak[role]:
                    peak_split[role] = smaps_split_kib(pid)
            peak = {role: max(peak[role], value) for role, value in now.items()}
            time.sleep(1.0)
        split["peak"] = peak_split
        stuck = clients.stop()
        stopped = time.monotonic()
        trace = []
        while time.monotonic() < stopped + args.after:
            time.sleep(1.0)
            now = sample(stack, named)
            trace.append((round(time.monotonic() - stopped, 1), now["tree"], now["tree anon"]))
        after = sample(stack, named)
        split["after"] = {role: smaps_split_kib(pid) for pid, role in named.items()}
        calls = clients.calls
        data.update({
            "idle": idle, "peak": peak, "after_load": after, "split_kib": split,
            "log_notes": _log_notes(stack),
            "tree_after_trace": trace, "stuck_clients": stuck,
            "calls": {k: sum(c.kind == k for c in calls) for k in ("ok", "shed", "error", "lost")},
            "drain_s": stopped - began - args.duration,
        })
    finally:
        stack.stop()
        server.close()
    shutil.rmtree(stack.workdir, ignore_errors=True)
    return data


def _log_notes(stack) -> list[str]:
    """The stack's log lines about the allocator and any preload that failed."""
    return [line[:300] for line in stack.log_tail(100000).splitlines()
            if "alloc" in line.lower() or "LD_PRELOAD" in line][:20]


def _features() -> list[str]:
    from common.model.accel.backend import cpu_features

    return cpu_features()


def report(data: dict) -> str:
    lines = [f"## memory-{data['label']}  ({data['when']}, {data['machine']['cpu_model']}, "
             f"{data['machine']['cpus']} CPUs, {', '.join(data['machine']['features'])}; {data['weights']})",
             "", f"{data['clients']} closed-loop clients ({PROTOCOLS[data.get('protocols', 'both')]}, "
             f"640x480 JPEG) for "
             f"{data['duration']:.0f} s, then {data['after']:.0f} s without load; environment "
             f"{data['env'] or 'as configured'}; calls {data['calls']}.", "",
             "| process | idle MiB | peak MiB | after MiB | peak / idle | after / idle |",
             "| --- | --- | --- | --- | --- | --- |"]
    order = sorted(data["idle"], key=lambda r: (r.endswith("anon"), r in ("tree", "tree anon"), r))
    for role in order:
        idle, peak, after = data["idle"][role], data["peak"][role], data["after_load"][role]
        name = f"**{role}**" if role.startswith("tree") else role
        lines.append(f"| {name} | {idle:.0f} | {peak:.0f} | {after:.0f} "
                     f"| {peak / idle:.2f} | {after / idle:.2f} |")
    split = data.get("split_kib")
    if split is None:  # results written before the per-process split
        split = {phase: {"model": value} for phase, value in data["model_split_kib"].items()}
    shown = [kind for kind in SPLIT_KINDS if kind in split["idle"]["model"]]
    lines += ["", "PSS by mapping (MiB), idle / peak / after (anon = heap + anon_large + anon_small):", "",
              "| process | " + " | ".join(shown) + " |", "| --- |" + " --- |" * len(shown)]
    for role in sorted(split["idle"]):
        kinds = [kind for kind in SPLIT_KINDS if kind in split["idle"][role]]
        lines.append(f"| {role} | " + " | ".join(
            f"{split['idle'][role][kind] / 1024:.0f} / {split['peak'][role][kind] / 1024:.0f} / "
            f"{split['after'][role][kind] / 1024:.0f}" for kind in kinds) + " |")
    lines.append("")
    trace = data["tree_after_trace"]
    if trace:
        marks = [next(point for point in trace if point[0] >= mark) for mark in (1, 5, 10, 30)
                 if trace[-1][0] >= mark] + [trace[-1]]
        back = next((point[0] for point in trace if point[1] <= 1.1 * data["idle"]["tree"]), None)
        lines.append("Tree PSS back to 1.1x idle or less: "
                     + ("not within the watch" if back is None else f"{back:.0f} s after the load"))
        lines.append("Tree after the load (PSS, anon): " + ", ".join(
            f"{point[0]:.0f} s {point[1]:.0f}" + (f" / {point[2]:.0f}" if len(point) > 2 else "") + " MiB"
            for point in marks))
    return "\n".join(lines)


PROTOCOLS = {"http": "all HTTP /predict", "grpc": "all gRPC Predict", "both": "half HTTP /predict, half gRPC"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run", help="results go to bench/results/memory-<label>.json")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--after", type=float, default=60.0, help="seconds watched after the load")
    parser.add_argument("--protocols", choices=sorted(PROTOCOLS), default="http",
                        help="what the clients call (default http: HTTP /predict only, as in issue #22)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the stack (repeatable)")
    parser.add_argument("--weights", default="", help="state dict to serve")
    parser.add_argument("--report", default="", help="only print the table of this JSON result")
    args = parser.parse_args(argv)
    args.forced = False
    sys.path.insert(0, str(REPO))
    if args.report:
        import json

        print(report(json.loads(Path(args.report).read_text())))
        return 0
    from bench.__main__ import save_results

    data = run(args)
    save_results(f"memory-{args.label}", data, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
