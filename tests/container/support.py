"""podman, containers and polling for the container tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
SETUP_PODMAN = REPO.parent / "shared" / "container" / "setup-podman.sh"
IMAGE = os.environ.get("CONTAINER_TEST_IMAGE", "localhost/instance-detector:tests")
# Here only PyPI is reachable and the COCO_V1 weights cannot be downloaded: build from the
# ordinary index and without the weights; the tests mount a checkpoint instead.
BUILD_ARGS = {"TORCH_INDEX_URL": "", "DOWNLOAD_WEIGHTS": "false"}
BUILD_TIMEOUT = 45 * 60  # a cold build downloads the CUDA-enabled torch from PyPI (about 4 GB)
LABEL = "instance-detector-tests=1"
CATEGORY = "dog"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    """Run podman with a bound on its time; output captured as text."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25, on_timeout=lambda: ""):
    """Poll ``predicate`` until it returns a truthy value (returned); connection errors count as no."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, OSError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last error: {last_error})\n{on_timeout()}")


class Container:
    """A container of the image under test, started with ``podman run -d``."""

    def __init__(self, name: str, http: str, grpc_target: str):
        self.name = name
        self.http = http  # base URL of the HTTP server, as seen from the host
        self.grpc_target = grpc_target
        self.started = time.monotonic()

    @classmethod
    def run(cls, *, network_args: list[str], env: dict[str, str], volumes: list[str] = (),
            http: str, grpc_target: str) -> "Container":
        name = f"idtest-{uuid.uuid4().hex[:10]}"
        args = ["run", "-d", "--name", name, "--label", LABEL, *network_args]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for volume in volumes:
            args += ["-v", volume]
        container = cls(name, http, grpc_target)
        podman(*args, IMAGE, timeout=60)
        return container

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def logs(self, lines: int = 80) -> str:
        result = podman("logs", "--tail", str(lines), self.name, check=False, timeout=30)
        return result.stdout + result.stderr

    def exec(self, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, timeout=timeout, check=check)

    def python(self, code: str, timeout: float = 30) -> str:
        """Run Python inside the container as its user; stdout."""
        return self.exec("python", "-c", code, timeout=timeout).stdout

    def healthcheck(self) -> int:
        return podman("healthcheck", "run", self.name, check=False, timeout=30).returncode

    def wait(self, predicate, timeout: float, what: str):
        """Poll ``predicate``, failing at once (with the log) if the container stops."""
        def alive_and(pred=predicate):
            if not self.running():
                raise AssertionError(f"container {self.name} stopped:\n{self.logs()}")
            return pred()
        return wait_for(alive_and, timeout, f"{self.name}: {what}", on_timeout=self.logs)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "2", self.name, check=False, timeout=60)


def grpc_health(target: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.RpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_ready(container: Container, timeout: float = 240) -> float:
    """Wait for HTTP /readyz 200 and gRPC health SERVING; seconds since ``podman run``."""
    container.wait(lambda: requests.get(container.http + "/readyz", timeout=2).status_code == 200,
                   timeout, "HTTP /readyz 200")
    elapsed = time.monotonic() - container.started
    container.wait(lambda: grpc_health(container.grpc_target) == "SERVING", timeout, "gRPC SERVING")
    return elapsed
