"""SSRF: with the default configuration no spelling of a loopback address reaches the canary."""

import grpc
import pytest

from testkit.checkpoints import CLASS_A
from testkit.image_server import ImageServer
from testkit.stack import Stack


@pytest.fixture(scope="module")
def canary():
    server = ImageServer()
    server.add("/secret", b"internal data", "text/plain")
    yield server
    server.close()


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory, checkpoints):
    """Weights only: ALLOWED_PRIVATE_TARGETS and every fetch setting at its default."""
    path, _ = checkpoints[CLASS_A]
    running = Stack(tmp_path_factory.mktemp("stack-default"), WEIGHTS_FILE=path).start()
    try:
        yield running.wait_ready()
    finally:
        running.stop()


def vectors(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/secret",
        f"https://127.0.0.1:{port}/secret",
        f"http://localhost:{port}/secret",
        f"http://LocalHost.:{port}/secret",
        f"http://metadata.localhost:{port}/secret",
        f"http://[::1]:{port}/secret",
        f"http://0.0.0.0:{port}/secret",
        f"http://0:{port}/secret",
        f"http://127.1:{port}/secret",
        f"http://127.0.0.2:{port}/secret",
        f"http://2130706433:{port}/secret",
        f"http://0x7f.1:{port}/secret",
        f"http://0x7f000001:{port}/secret",
        f"http://017700000001:{port}/secret",
        f"http://0177.0.0.1:{port}/secret",
        f"http://[::ffff:127.0.0.1]:{port}/secret",
        f"http://[::ffff:7f00:1]:{port}/secret",
        f"http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/secret",
        f"http://[::1%25lo]:{port}/secret",  # IPv6 zone ids (RFC 6874)
        f"http://[fe80::1%25lo]:{port}/secret",
        f"http://user:pass@127.0.0.1:{port}/secret",
        f"http://example.com@127.0.0.1:{port}/secret",
        f"HTTP://127.0.0.1:{port}/secret",
        f" http://127.0.0.1:{port}/secret ",
    ]


def test_default_config_refuses_every_loopback_spelling_over_http(default_stack, canary):
    for url in vectors(canary.port):
        response = default_stack.predict_http(url, timeout=30)
        assert response.status_code == 403, (url, response.text)
        assert response.json()["error"]["code"] == "forbidden_target"
    assert canary.hits == []


def test_default_config_refuses_every_loopback_spelling_over_grpc(default_stack, grpc_client, canary):
    for url in vectors(canary.port):
        with pytest.raises(grpc.RpcError) as failure:
            grpc_client(default_stack.grpc_target, url, timeout=30)
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED, url
    assert canary.hits == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_from_an_allowed_host_to_the_canary_is_refused(stack, image_server, grpc_predict,
                                                                 canary, status):
    """The main stack allows the image server only; its redirects must not reach the canary."""
    for target in (f"http://127.0.0.1:{canary.port}/secret", f"http://localhost:{canary.port}/secret",
                   f"http://[::ffff:127.0.0.1]:{canary.port}/secret"):
        url = image_server.url(f"/redirect?status={status}&to={target}")
        response = stack.predict_http(url, timeout=30)
        assert response.status_code == 403, response.text
        with pytest.raises(grpc.RpcError) as failure:
            grpc_predict(url, timeout=30)
        assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert canary.hits == []


def test_a_redirect_between_allowed_urls_is_followed(stack, image_server):
    """The guard is not a blanket refusal: an allowed redirect chain still gets its answer."""
    url = image_server.url(f"/redirect?to={image_server.url('/img/jpeg')}")
    assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
