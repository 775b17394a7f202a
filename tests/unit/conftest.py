"""In-process tests build the HTTP app and the gRPC server, which count in prometheus-client's
multiprocess mode: prometheus_client decides its mode when first imported, so the variable is set
before any test module imports it; the ``run_dir`` fixture keeps every app on that directory."""

from __future__ import annotations

import os
import tempfile

METRICS_DIR = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="unit-metrics-"))

import pytest  # noqa: E402


@pytest.fixture
def run_dir(tmp_path):
    """A RUN_DIR of its own for an in-process app or server, whose metrics directory is the one
    above: prometheus_client writes a process's values to the first directory it used, so every
    app of this process must read that one."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "metrics").symlink_to(METRICS_DIR, target_is_directory=True)
    return path
