"""Admission slots: a bound shared by processes, freed when a holder dies, sized by the pass time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from common.admission import DEFAULT_PASS_SECONDS, Admission
from common.config import Settings
from common.errors import Overloaded
from common.model.pacing import publish_pass_seconds
from testkit import REPO

# Holds one slot of RUN_DIR's admission until killed; prints "held" once it has it.
HOLDER = """
import sys, time
from common.admission import Admission
from common.config import Settings
admission = Admission(Settings.from_env({"RUN_DIR": sys.argv[1], "MAX_QUEUE_WAIT": sys.argv[2]}))
with admission.admitted():
    print("held", flush=True)
    time.sleep(600)
"""


def admission(run_dir, max_queue_wait="0") -> Admission:
    return Admission(Settings.from_env({"RUN_DIR": str(run_dir), "MAX_QUEUE_WAIT": max_queue_wait}))


def start_holder(run_dir, max_queue_wait="0") -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), max_queue_wait],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_capacity_is_one_running_plus_what_fits_in_the_wait(tmp_path):
    gate = admission(tmp_path, "10")
    assert gate.pass_seconds() == DEFAULT_PASS_SECONDS
    assert gate.capacity() == 1 + int(10 / DEFAULT_PASS_SECONDS)
    publish_pass_seconds(str(tmp_path), 0.5, None)
    gate._pass_seconds_read_at = float("-inf")  # as after a second
    assert gate.pass_seconds() == 0.5 and gate.capacity() == 21 and gate.retry_after() == 1
    # the moving average follows new passes gradually, and a zero wait still admits one waiting
    assert publish_pass_seconds(str(tmp_path), 1.5, 0.5) == pytest.approx(0.8)
    assert admission(tmp_path, "0").capacity() == 2


def test_the_bound_holds_across_threads(tmp_path):
    gate = admission(tmp_path)  # 2 slots
    entered, results = threading.Barrier(5), []
    release = threading.Event()

    def request():
        entered.wait()
        try:
            with gate.admitted():
                results.append("admitted")
                release.wait(10)
        except Overloaded as exc:
            results.append(exc.retry_after)

    threads = [threading.Thread(target=request) for _ in range(5)]
    [thread.start() for thread in threads]
    deadline = time.monotonic() + 10
    while len(results) < 5 and time.monotonic() < deadline:  # the admitted ones wait for release
        time.sleep(0.01)
    release.set()
    [thread.join() for thread in threads]
    assert results.count("admitted") == 2
    assert sorted(r for r in results if r != "admitted") == [2, 2, 2]  # ceil(default pass seconds)
    with gate.admitted():  # all released
        with gate.admitted():
            pass


def test_the_bound_holds_across_processes_and_a_killed_holder_frees_its_slot(tmp_path):
    holders = [start_holder(tmp_path) for _ in range(2)]
    gate = admission(tmp_path)
    try:
        with pytest.raises(Overloaded) as refused:
            with gate.admitted():
                pass
        assert refused.value.code == "overloaded" and "retry in" in refused.value.message
        os.kill(holders[0].pid, signal.SIGKILL)  # no clean-up runs: the kernel drops its lock
        holders[0].wait(10)
        with gate.admitted():
            pass
    finally:
        for holder in holders:
            holder.kill()
            holder.wait(10)
