"""In-process tests build the HTTP app and the gRPC server, which count in prometheus-client's
multiprocess mode over the directory tests/conftest.py names (before anything imports
prometheus_client); the ``run_dir`` fixture keeps every app on that directory."""

from __future__ import annotations

import os
import tempfile

# set by tests/conftest.py; the default only serves a run of this folder's files without it
METRICS_DIR = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="unit-metrics-"))

import pytest  # noqa: E402

from testkit.image_server import ImageServer  # noqa: E402
from testkit.images import encode, scene  # noqa: E402


@pytest.fixture
def run_dir(tmp_path):
    """A RUN_DIR of its own for an in-process app or server, whose metrics directory is the one
    above: prometheus_client writes a process's values to the first directory it used, so every
    app of this process must read that one."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics").symlink_to(METRICS_DIR, target_is_directory=True)
    return path


@pytest.fixture(scope="module")
def images():
    """Images on 127.0.0.1 for the in-process apps (which allow its port): a 64x48 scene, a text
    body and a 404; tests add their own."""
    server = ImageServer()
    server.add("/img/scene.png", encode(scene(64, 48), "PNG"), "image/png")
    server.add("/img/text", b"not an image", "text/plain")
    server.add("/img/missing", b"", status=404)
    yield server
    server.close()
