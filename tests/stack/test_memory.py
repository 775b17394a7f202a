"""Memory under a crowd (issue #22), loosely: the whole stack's PSS under 16 closed-loop HTTP
clients that are all admitted and queued, and after them; and the model process without glibc's
``malloc_trim`` (docs/performance.md, "Memory under a crowd").

The bounds are looser than the goal (peak 1.3x idle, back to 1.1x), so that noise does not fail
them, while a regression to the issue's figures (1.63x peak, 1.59x after) would.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time

import pytest

from common.config import Settings
from common.model import local
from testkit.checkpoints import CLASS_A
from testkit.image_server import ImageServer
from testkit.images import encode, photo_like
from testkit.stack import Stack

CLIENTS = 16
LOAD_SECONDS = 20.0
SETTLE_SECONDS = 10.0  # after the load, before "after" is measured
PEAK_RATIO, AFTER_RATIO = 1.6, 1.3


@pytest.fixture(scope="module")
def photo():
    server = ImageServer()
    url = server.add("/photo.jpg", encode(photo_like(640, 480, seed=1), "JPEG", quality=90))
    yield server, url
    server.close()


def test_memory_stays_flat_under_a_crowd(tmp_path, checkpoints, photo):
    from bench.memory import crowd

    server, url = photo
    path, sha256 = checkpoints[CLASS_A]
    stack = Stack(tmp_path / "stack", WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{server.port}", MAX_QUEUE_WAIT="600",
                  TORCH_THREADS="0")
    with stack.running():
        for _ in range(2):  # the first passes allocate what every later one reuses
            stack.predict_http(url).raise_for_status()
        time.sleep(2)
        idle = stack.pss_mib()
        clients = crowd(stack, url, CLIENTS, "http")
        peak, began = idle, time.monotonic()
        while time.monotonic() < began + LOAD_SECONDS:
            peak = max(peak, stack.pss_mib())
            time.sleep(0.5)
        stuck = clients.stop()
        time.sleep(SETTLE_SECONDS)
        after = stack.pss_mib()
    calls = clients.calls
    ok = sum(call.kind == "ok" for call in calls)
    figures = f"idle {idle:.0f} MiB, peak {peak:.0f}, after {after:.0f}; {ok} of {len(calls)} calls ok"
    assert stuck == 0 and ok >= 1 and all(call.kind == "ok" for call in calls), figures
    assert peak <= PEAK_RATIO * idle, figures
    assert after <= AFTER_RATIO * idle, figures


@dataclasses.dataclass
class FakePass:
    queue_seconds: float = 0.0
    pass_seconds: float = 0.5


class FakeDetector:
    def run(self, image, proceed, options):
        proceed()
        return FakePass()


def test_passes_trim_glibc_and_go_on_without_it(tmp_path, monkeypatch, caplog):
    """With glibc, every pass ends with malloc_trim(0); with a C library that has none (musl,
    say), the model process says so once at start and runs its passes all the same."""
    settings = Settings(run_dir=str(tmp_path))
    assert local.find_malloc_trim() is not None  # this checkout runs on glibc
    model = local.LocalModel(settings)
    trims = []
    model._trim = trims.append
    done = model._run(FakeDetector(), None, lambda: True, time.perf_counter(), None)
    assert trims == [0] and done.pass_seconds == 0.5

    class NoTrim:
        def __init__(self, _name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoTrim)
    assert local.find_malloc_trim() is None
    with caplog.at_level(logging.INFO, logger="common.model.local"):
        model = local.LocalModel(settings)
    assert [r.message for r in caplog.records].count(
        "no malloc_trim in this C library: memory freed after passes stays with the allocator") == 1
    done = model._run(FakeDetector(), None, lambda: True, time.perf_counter(), None)
    assert done.pass_seconds == 0.5 and (tmp_path / "pass-seconds").exists()
