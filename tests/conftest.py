"""Fixtures shared by tests/stack and tests/container (or tests/unit): forced-class checkpoints
and gRPC client stubs. Stack fixtures are in tests/stack/conftest.py; support code is in testkit/.

Where a new test goes: tests/unit if it starts no process (servers on threads in this process
are fine), tests/stack if it needs the supervisord stack, tests/container for the image.
"""

from __future__ import annotations

import os
import tempfile

# The in-process tests (tests/unit) build the HTTP app and the gRPC server, which count in
# prometheus_client's multiprocess mode; prometheus_client decides its mode when it is first
# imported, and tests/stack's modules import it when collected, so the variable is set here,
# before any test module is. (testkit.stack does not pass it on: each stack has its own.)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="unit-metrics-"))

import pytest  # noqa: E402

from testkit.checkpoints import CLASS_A, CLASS_B, make_forced_checkpoint  # noqa: E402
from testkit.clients import generate_client_stubs  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two real-architecture checkpoints forcing two different classes: {class: (path, sha256)}."""
    folder = tmp_path_factory.mktemp("weights")
    return {
        name: (folder / f"forced-{name}.pt", make_forced_checkpoint(folder / f"forced-{name}.pt", name, seed))
        for seed, name in enumerate((CLASS_A, CLASS_B))
    }


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc) generated like a course client: ``-I protos``."""
    generate_client_stubs(tmp_path_factory.mktemp("client-stubs"))
    import inference_pb2
    import inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="session")
def grpc_client(grpc_stubs):
    """``call(target, url)``: Predict through client stubs; the objects, or grpc.RpcError."""
    import grpc

    pb2, pb2_grpc = grpc_stubs

    def call(target, url, timeout=120):
        with grpc.insecure_channel(target) as channel:
            reply = pb2_grpc.InstanceDetectorStub(channel).Predict(
                pb2.InstanceDetectorInput(url=url), timeout=timeout)
        return list(reply.objects)

    return call
