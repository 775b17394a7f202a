"""The multiprocess metrics directory: kept across a server restart, emptied at a stack start."""

import os
import signal
import subprocess

from tests.conftest import CLASS_A
from tests.helpers import REPO, VENV_BIN, Stack

HTTP_COUNTER = "app_http_inference_count"
GRPC_COUNTER = "app_grpc_inference_count"


def supervisor_pid(stack: Stack, program: str) -> int:
    result = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(REPO / "supervisord.conf"),
                             "pid", f"detector:{program}"], env=stack.env, capture_output=True,
                            text=True, timeout=30)
    return int(result.stdout.strip())


def test_counters_survive_a_crash_and_reset_with_the_stack(tmp_path, checkpoints, image_server, grpc_client):
    path, _ = checkpoints[CLASS_A]
    settings = {"WEIGHTS_FILE": path, "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{image_server.port}"}
    url = image_server.url("/img/jpeg")

    stack = Stack(tmp_path, **settings).start().wait_ready()
    try:
        assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
        assert grpc_client(stack.grpc_target, url) == [CLASS_A]
        assert (stack.metric_value(HTTP_COUNTER), stack.metric_value(GRPC_COUNTER)) == (1, 1)

        old_grpc = supervisor_pid(stack, "grpc")
        os.kill(old_grpc, signal.SIGKILL)  # a crash: supervisord restarts it
        stack.wait_until(lambda: supervisor_pid(stack, "grpc") not in (0, old_grpc), what="gRPC restart")
        stack.wait_ready()
        assert (stack.metric_value(HTTP_COUNTER), stack.metric_value(GRPC_COUNTER)) == (1, 1)
        assert grpc_client(stack.grpc_target, url) == [CLASS_A]
        assert stack.metric_value(GRPC_COUNTER) == 2
    finally:
        assert stack.stop() == 0

    assert any(stack.metrics_dir.glob("counter_*.db")), "the first run left its files behind"
    again = Stack(tmp_path, **settings)  # same RUN_DIR, so the same metrics directory
    again.start().wait_ready()
    try:
        assert (again.metric_value(HTTP_COUNTER), again.metric_value(GRPC_COUNTER)) == (0, 0)
    finally:
        again.stop()
