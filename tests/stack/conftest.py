"""Fixtures of the stack tests: the loopback image server and the main stack (one per session)."""

from __future__ import annotations

import pytest

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
