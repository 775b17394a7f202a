"""In-process tests build the HTTP app and the gRPC server, which count in prometheus-client's
multiprocess mode: prometheus_client decides its mode when first imported, so the variable is set
before any test module imports it. Each app then points it at its own RUN_DIR's metrics."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="unit-metrics-"))
