"""The multiprocess metrics directory: kept across a server restart, emptied at a stack start."""

import os
import signal

from testkit.checkpoints import CLASS_A
from testkit.stack import Stack

HTTP_COUNTER = "app_http_inference_count"
GRPC_COUNTER = "app_grpc_inference_count"


def test_counters_survive_a_crash_and_reset_with_the_stack(tmp_path, checkpoints, image_server, grpc_client):
    path, _ = checkpoints[CLASS_A]
    settings = {"WEIGHTS_FILE": path, "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{image_server.port}"}
    url = image_server.url("/img/jpeg")

    stack = Stack(tmp_path, **settings).start().wait_ready()
    try:
        assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
        assert grpc_client(stack.grpc_target, url) == [CLASS_A]
        assert (stack.metric_value(HTTP_COUNTER), stack.metric_value(GRPC_COUNTER)) == (1, 1)

        old_grpc = stack.program_pid("detector:grpc")
        os.kill(old_grpc, signal.SIGKILL)  # a crash: supervisord restarts it
        stack.wait_until(lambda: stack.program_pid("detector:grpc") not in (0, old_grpc), what="gRPC restart")
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
