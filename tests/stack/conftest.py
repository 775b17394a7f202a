"""Fixtures of the stack tests: the loopback image server, the main stack (one per session) and a
real Prometheus scraping it."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.image_server import ImageServer
from testkit.images import sample_images
from testkit.stack import FAST_LIMITS, Stack, free_port


@pytest.fixture(scope="session")
def image_server():
    """Serves every ``sample_images()`` entry at ``/img/<name>`` (and the special routes)."""
    server = ImageServer()
    for name, (body, content_type) in sample_images().items():
        server.add(f"/img/{name}", body, content_type)
    yield server
    server.close()


@pytest.fixture(scope="session")
def closed_port():
    """A loopback port nobody listens on (allowlisted, to test 'connection refused')."""
    return free_port()


@pytest.fixture(scope="session")
def evaluation_port():
    """A loopback port the main stack allows, for the evaluation command's own image server."""
    return free_port()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, checkpoints, image_server, closed_port, evaluation_port):
    """The main stack: class-A checkpoint with its sha256; the test's own servers allowlisted;
    ``FAST_LIMITS``; admission generous enough that the tests' bursts are never shed (shedding has
    its own stack in test_overload.py)."""
    path, sha256 = checkpoints[CLASS_A]
    allowed = (image_server.port, closed_port, evaluation_port)
    running = Stack(
        tmp_path_factory.mktemp("stack-a"),
        WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
        ALLOWED_PRIVATE_TARGETS=",".join(f"127.0.0.1:{port}" for port in allowed),
        MAX_QUEUE_WAIT="600",
        **FAST_LIMITS,
    ).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def grpc_predict(stack, grpc_client):
    """Predict on the main stack."""
    return lambda url, timeout=120: grpc_client(stack.grpc_target, url, timeout)


@pytest.fixture
def prometheus(tmp_path, stack):
    """A real Prometheus scraping the main stack every second (job ``instance-detector``, as in
    deploy/prometheus/prometheus.yml); its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: scripts/test installs Debian's 'prometheus'"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: instance-detector\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{stack.http_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()
