"""The real stack: supervisord with the repository's supervisord.conf (the model process,
gunicorn with the Flask app, the gRPC server), on free loopback ports, in a folder of its own."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import requests

from testkit import REPO, VENV_BIN
from testkit.clients import metric_value

# Tight fetch limits, so that hostile-input cases run quickly; production defaults are larger.
FAST_LIMITS = {
    "FETCH_CONNECT_TIMEOUT": "2",
    "FETCH_READ_TIMEOUT": "1.5",
    "FETCH_TOTAL_TIMEOUT": "4",
    "FETCH_MAX_BYTES": str(2 * 1024 * 1024),
    "MAX_IMAGE_PIXELS": str(12_000_000),
}


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def smaps_rollup_kib(pid: int, field: str) -> int:
    """One field of a process's /proc/<pid>/smaps_rollup, e.g. "Pss" (KiB; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith(f"{field}:")), 0)
    except OSError:
        return 0


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (KiB; 0 once it is gone)."""
    return smaps_rollup_kib(pid, "Pss")


def tree_pss_mib(root: int) -> float:
    """PSS of ``root`` and every process below it (MiB)."""
    return sum(pss_kib(pid) for pid in process_tree(root)) / 1024


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range, so that no outgoing connection's
    source port takes it between this check and the server's bind."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


class Stack:
    """supervisord with the repository's supervisord.conf: the model process, gunicorn (Flask)
    and the gRPC server. ``settings``: environment variables for the stack (values are str()'d);
    the environment of this process is inherited, RUN_DIR is ``workdir/run``, both servers bind
    127.0.0.1 on free ports, 2 HTTP workers, 1 torch thread unless given."""

    def __init__(self, workdir: Path, **settings):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.log_path = self.workdir / "stack.log"
        self.env = {
            # the stack's processes find their metrics directory from RUN_DIR, not from this process
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith("SUPERVISOR_") and k != "PROMETHEUS_MULTIPROC_DIR"
            },
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RUN_DIR": str(self.workdir / "run"),
            "BIND_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "GRPC_PORT": str(self.grpc_port),
            "HTTP_WORKERS": "2",
            "TORCH_THREADS": "1",
        }
        self.env.update({key: str(value) for key, value in settings.items()})
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def run_dir(self) -> Path:
        return Path(self.env["RUN_DIR"])

    @property
    def metrics_dir(self) -> Path:
        """prometheus_client's multiprocess directory: always ``$RUN_DIR/metrics``."""
        return self.run_dir / "metrics"

    @property
    def model_socket(self) -> Path:
        return self.run_dir / "model.sock"

    def start(self) -> Stack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "-c", str(REPO / "supervisord.conf")],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @contextmanager
    def running(self) -> Iterator[Stack]:
        """Start, wait until ready, and on leaving stop; a stop that does not exit 0 fails."""
        self.start()
        try:
            self.wait_ready()
            yield self
        finally:
            assert self.stop() == 0

    def wait_until(self, predicate, timeout: float = 120.0, what: str = "the stack") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"supervisord exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if predicate():
                    return
            except (requests.RequestException, OSError, grpc.RpcError):
                pass  # not listening (yet)
            time.sleep(0.25)
        raise TimeoutError(f"{what} not up after {timeout}s:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 120.0) -> Stack:
        """Both servers answer and report the model process's model loaded."""
        self.wait_until(lambda: requests.get(self.http + "/readyz", timeout=2).status_code == 200,
                        timeout, "HTTP readiness")
        self.wait_until(lambda: self.grpc_health() == "SERVING", timeout, "gRPC readiness")
        return self

    def wait_failed(self, timeout: float = 120.0) -> Stack:
        """Both servers answer, and report that the model failed to load."""
        self.wait_until(
            lambda: requests.get(self.http + "/readyz", timeout=2).json().get("status") == "failed",
            timeout, "HTTP not-ready state")
        self.wait_until(lambda: self.grpc_health() == "NOT_SERVING", timeout, "gRPC health")
        return self

    def grpc_health(self) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to supervisord; its exit code (SIGKILL to the whole group after ``timeout``)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)

    def supervisorctl(self, *args: str) -> str:
        """Run supervisorctl against this stack; its output."""
        result = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(REPO / "supervisord.conf"),
                                 *args], env=self.env, capture_output=True, text=True, timeout=60)
        return result.stdout

    def program_pid(self, program: str) -> int:
        """The pid supervisord reports for ``program`` (``model``, ``detector:http``,
        ``detector:grpc``); 0 while it is not running."""
        return int(self.supervisorctl("pid", program).strip() or 0)

    def pss_mib(self) -> float:
        """PSS of supervisord and every process below it (MiB)."""
        assert self.process is not None
        return tree_pss_mib(self.process.pid)

    def worker_pids(self) -> set[int]:
        """The gunicorn workers' pids (below the master supervisord runs as detector:http)."""
        master = self.program_pid("detector:http")
        return set(process_tree(master)[1:]) if master else set()

    def sigkill(self, name: str) -> tuple[int, float]:
        """SIGKILL to ``name``: ``worker`` (the oldest gunicorn worker), ``grpc`` or ``model``;
        (the pid killed, ``time.monotonic()`` just before)."""
        if name == "worker":
            victim = min(self.worker_pids())
        else:
            victim = self.program_pid({"grpc": "detector:grpc", "model": "model"}[name])
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        return victim, killed

    def processes(self) -> dict[int, str]:
        """{pid: command line} of supervisord and every process below it."""
        commands = {}
        for pid in process_tree(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            commands[pid] = " ".join(arg.decode(errors="replace") for arg in argv if arg)
        return commands

    def request_lines(self) -> list[dict]:
        """The JSON log lines of requests (``common.observe``), oldest first."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"common.requests"' in line:
                lines.append(json.loads(line))
        return lines

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients ----------------------------------------------------------------------

    def predict_http(self, url, timeout: float = 120.0) -> requests.Response:
        return requests.post(self.http + "/predict", json={"url": url}, timeout=timeout)

    def metric_value(self, family: str) -> float:
        return metric_value(self.http, family)
