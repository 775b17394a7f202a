"""Fixtures for the container tests: podman, the image built from the repo's Dockerfile, containers.

The image is built once per session (podman's layer cache makes a rebuild without code changes
a matter of seconds) and its tag is kept for the next run; every container a test starts is
removed again. All traffic stays on loopback: the service container runs with ``--network host``
and binds 127.0.0.1, the one bridge-network container publishes its ports on 127.0.0.1 only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testkit.checkpoints import make_forced_checkpoint
from testkit.image_server import ImageServer
from testkit.images import encode, scene
from testkit.stack import free_port
from tests.container.support import (BUILD_ARGS, BUILD_TIMEOUT, CATEGORY, IMAGE, REPO, SETUP_PODMAN,
                                     Container, podman, wait_ready)


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
