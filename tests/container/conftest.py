"""Fixtures for the container tests: podman, the image built from the repo's Dockerfile, containers.

The image is built once per session (podman's layer cache makes a rebuild without code changes
a matter of seconds) and its tag is kept for the next run; every container a test starts is
removed again. All traffic stays on loopback: the service container runs with ``--network host``
and binds 127.0.0.1, the one bridge-network container publishes its ports on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.helpers import ImageServer, encode, free_port, generate_client_stubs, make_forced_checkpoint, scene

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


@pytest.fixture(scope="session")
def container_image(tmp_path_factory) -> str:
    """The image built from the repo's Dockerfile (torch from the ordinary index, no weights)."""
    if not SETUP_PODMAN.is_file():
        pytest.fail(f"{SETUP_PODMAN} is missing: the container tests need ../shared next to the repo")
    setup = subprocess.run(["bash", str(SETUP_PODMAN)], capture_output=True, text=True, timeout=15 * 60)
    assert setup.returncode == 0, f"setup-podman.sh failed:\n{setup.stdout}\n{setup.stderr}"

    before = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    log_path = tmp_path_factory.mktemp("build") / "build.log"
    command = ["podman", "build", "--format", "docker", "-t", IMAGE, "-f", str(REPO / "Dockerfile")]
    for key, value in BUILD_ARGS.items():
        command += ["--build-arg", f"{key}={value}"]
    with open(log_path, "w") as log:
        build = subprocess.run([*command, str(REPO)], stdout=log, stderr=subprocess.STDOUT,
                               timeout=BUILD_TIMEOUT)
    if build.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        pytest.fail(f"podman build failed ({build.returncode}):\n{tail}")
    after = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if before and before != after:
        # the image this build replaced: drop it unless it still has a tag (or a container) of its own
        tags = podman("image", "inspect", "--format", "{{len .RepoTags}}", before, check=False).stdout
        if tags.strip() == "0":
            podman("rmi", before, check=False, timeout=120)
    return IMAGE


@pytest.fixture(scope="session")
def dog_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A real-architecture checkpoint that answers 'dog' for every detected box: (path, sha256)."""
    path = tmp_path_factory.mktemp("container-weights") / "forced-dog.pt"
    sha256 = make_forced_checkpoint(path, CATEGORY)
    path.chmod(0o644)  # read by the container's non-root user through a read-only bind mount
    return path, sha256


@pytest.fixture(scope="session")
def container_images():
    """Loopback image server on the host; the service container reaches it through --network host."""
    server = ImageServer()
    server.add("/img/jpeg", encode(scene(320, 240, seed=3), "JPEG", quality=90))
    yield server
    server.close()


@pytest.fixture(scope="session")
def client_stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc) generated like a course client: ``-I protos``."""
    generate_client_stubs(tmp_path_factory.mktemp("container-client-stubs"))
    import inference_pb2
    import inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


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


@pytest.fixture(scope="module")
def service(container_image, dog_checkpoint, container_images):
    """The service container the course's way, with host networking so that it can fetch from the
    host's loopback: the dog checkpoint mounted read-only, both servers on free loopback ports."""
    path, sha256 = dog_checkpoint
    http_port, grpc_port = free_port(), free_port()
    container = Container.run(
        network_args=["--network", "host"],
        env={
            "BIND_HOST": "127.0.0.1",
            "HTTP_PORT": str(http_port),
            "GRPC_PORT": str(grpc_port),
            "WEIGHTS_FILE": "/weights/forced-dog.pt",
            "WEIGHTS_SHA256": sha256,
            "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{container_images.port}",
            "TORCH_THREADS": "1",
        },
        volumes=[f"{path}:/weights/forced-dog.pt:ro"],
        http=f"http://127.0.0.1:{http_port}",
        grpc_target=f"127.0.0.1:{grpc_port}",
    )
    try:
        container.seconds_to_ready = wait_ready(container)
        yield container
    finally:
        container.remove()
