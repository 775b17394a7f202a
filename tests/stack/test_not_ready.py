"""Bad weights leave the whole stack up but not ready, saying which setting to fix."""

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.stack import Stack


def _missing(checkpoints, tmp_path):
    return {"WEIGHTS_FILE": tmp_path / "absent.pt"}, "WEIGHTS_FILE"


def _truncated(checkpoints, tmp_path):
    path, _ = checkpoints[CLASS_A]
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(path.read_bytes()[:50_000_000])
    return {"WEIGHTS_FILE": cut}, "WEIGHTS_FILE"


def _wrong_checksum(checkpoints, tmp_path):
    path, sha256 = checkpoints[CLASS_A]
    return {"WEIGHTS_FILE": path, "WEIGHTS_SHA256": sha256[::-1]}, "WEIGHTS_SHA256"


@pytest.mark.parametrize("make_settings", [_missing, _truncated, _wrong_checksum],
                         ids=["missing", "truncated", "wrong-checksum"])
def test_bad_weights_leave_the_service_up_but_not_ready(tmp_path, checkpoints, image_server,
                                                        grpc_client, make_settings):
    settings, named_setting = make_settings(checkpoints, tmp_path)
    stack = Stack(tmp_path / "stack", ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}",
                  **settings).start()
    try:
        stack.wait_failed()
        # the model process (the only one that loads weights) has given up on them
        stack.wait_until(lambda: stack.log_path.read_text(errors="replace").count("MODEL NOT LOADED") == 1,
                         what="the failed model load")
        assert requests.get(stack.http + "/healthz", timeout=5).status_code == 200
        # each worker reports the reason once its channel to the model process is up (within a
        # second or so of the first try); from then on every answer names the setting
        stack.wait_until(lambda: named_setting in requests.get(stack.http + "/readyz", timeout=5).json()["message"],
                         10, "the reason on /readyz")
        for _ in range(6):
            ready = requests.get(stack.http + "/readyz", timeout=5)
            assert ready.status_code == 503 and named_setting in ready.json()["message"]

        response = stack.predict_http(image_server.url("/img/jpeg"))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "not_ready"
        assert named_setting in response.json()["error"]["message"]

        with pytest.raises(grpc.RpcError) as failure:
            grpc_client(stack.grpc_target, image_server.url("/img/jpeg"))
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert named_setting in failure.value.details()

        log = stack.log_path.read_text(errors="replace")
        assert log.count("spawned:") == 3  # nothing crashed or restarted
        assert log.count("MODEL NOT LOADED") == 1
    finally:
        assert stack.stop() == 0
