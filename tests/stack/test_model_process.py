"""The stack loads the model once, in its model process, and survives that process crashing."""

import os
import signal
import stat
from pathlib import Path

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.stack import Stack


def maps_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_only_the_model_process_holds_the_model(stack):
    processes = stack.processes()
    holders = [command for pid, command in processes.items() if maps_torch(pid)]
    assert holders == ["python -m common.model.server"], processes
    # supervisord, the model process, the gunicorn master and its two workers, the gRPC server
    assert len(processes) == 6, processes
    mode = stack.model_socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_crashed_model_process_is_restarted_and_the_servers_recover(tmp_path, checkpoints, image_server,
                                                                     grpc_client):
    path, _ = checkpoints[CLASS_A]
    stack = Stack(tmp_path, WEIGHTS_FILE=path,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}").start().wait_ready()
    url = image_server.url("/img/jpeg")
    try:
        fronts = {name: stack.program_pid(name) for name in ("detector:http", "detector:grpc")}
        old_model = stack.program_pid("model")
        os.kill(old_model, signal.SIGKILL)
        # while it is gone or reloading, a request either waits and succeeds or gets a clean 503
        response = stack.predict_http(url)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "not_ready"
        stack.wait_until(lambda: stack.program_pid("model") not in (0, old_model), what="model restart")
        stack.wait_ready()
        assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
        assert grpc_client(stack.grpc_target, url) == [CLASS_A]
        assert {name: stack.program_pid(name) for name in fronts} == fronts  # the servers stayed up
    finally:
        assert stack.stop() == 0


def test_servers_report_not_ready_while_the_model_process_is_down(tmp_path, checkpoints, image_server,
                                                                 grpc_client):
    """With the model process stopped by the operator, /readyz and gRPC health say so, and both
    protocols answer not-ready within MODEL_WAIT_TIMEOUT instead of hanging."""
    path, _ = checkpoints[CLASS_A]
    stack = Stack(tmp_path, WEIGHTS_FILE=path, MODEL_WAIT_TIMEOUT="2",
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}").start().wait_ready()
    try:
        stack.supervisorctl("stop", "model")
        assert stack.program_pid("model") == 0
        ready = requests.get(stack.http + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        response = stack.predict_http(image_server.url("/img/jpeg"), timeout=60)
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        assert "model process" in response.json()["error"]["message"]
        stack.wait_until(lambda: stack.grpc_health() == "NOT_SERVING", 30, "gRPC health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as failure:
            grpc_client(stack.grpc_target, image_server.url("/img/jpeg"), timeout=60)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model process" in failure.value.details()
        stack.supervisorctl("start", "model")
        stack.wait_ready()
        assert stack.predict_http(image_server.url("/img/jpeg")).json() == {"objects": [CLASS_A]}
    finally:
        assert stack.stop() == 0
