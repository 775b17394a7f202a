"""Hostile and broken inputs: each gets its documented error, and the service keeps serving."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from PIL import Image

from common.config import Settings
from testkit.checkpoints import CLASS_A
from testkit.images import encode, scene

BOMB_PNG = encode(Image.new("1", (20000, 20000)), "PNG")  # tiny file, 400 megapixels
JPEG = encode(scene(320, 240), "JPEG")


@pytest.fixture(scope="module", autouse=True)
def hostile_routes(image_server):
    image_server.add("/too-wide.png", encode(Image.new("RGB", (20000, 10)), "PNG"), "image/png")
    image_server.add("/html", b"<!doctype html><html><body>not an image</body></html>", "text/html")
    image_server.add("/truncated.jpg", JPEG[: len(JPEG) // 2])
    image_server.add("/empty.jpg", b"")
    image_server.add("/bomb.png", BOMB_PNG, "image/png")
    image_server.add("/noise.bin", bytes(range(256)) * 40, "application/octet-stream")
    image_server.add("/oversize.jpg", JPEG + b"\0" * (3 * 1024 * 1024))
    image_server.add("/error500", b"boom", "text/plain", status=500)
    image_server.add("/forbidden", b"no", "text/plain", status=403)


def _url(image_server, path):
    return image_server.url(path)


# (case id, request body: bytes or a function of (image server, closed port) giving a URL,
#  HTTP status, error code, gRPC status or None when the case has no gRPC form)
CASES = [
    ("malformed-json", b'{"url": ', 400, "invalid_request", None),
    ("json-array", b'["http://example.com/a.jpg"]', 400, "invalid_request", None),
    ("json-string", b'"http://example.com/a.jpg"', 400, "invalid_request", None),
    ("json-null", b"null", 400, "invalid_request", None),
    ("empty-body", b"", 400, "invalid_request", None),
    ("not-utf8", b'{"url": "\xff\xfe"}', 400, "invalid_request", None),
    ("missing-url", b'{"link": "http://example.com/a.jpg"}', 400, "invalid_request", None),
    ("url-null", b'{"url": null}', 400, "invalid_request", None),
    ("url-number", b'{"url": 42}', 400, "invalid_request", None),
    ("url-list", b'{"url": ["http://example.com/a.jpg"]}', 400, "invalid_request", None),
    ("url-object", b'{"url": {"href": "x"}}', 400, "invalid_request", None),
    ("deep-nesting", b"[" * 60_000, 400, "invalid_request", None),
    ("huge-body", json.dumps({"url": "http://e.com/" + "a" * 200_000}).encode(), 413, "too_large", None),
    ("url-empty", lambda s, p: "", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("url-blank", lambda s, p: "   ", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("url-too-long", lambda s, p: "http://example.com/" + "a" * 5000, 400, "invalid_request",
     "INVALID_ARGUMENT"),
    ("scheme-ftp", lambda s, p: "ftp://example.com/a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("scheme-file", lambda s, p: "file:///etc/passwd", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("scheme-gopher", lambda s, p: "gopher://127.0.0.1:70/_x", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("scheme-data", lambda s, p: "data:image/png;base64,iVBORw0KGgo=", 400, "invalid_request",
     "INVALID_ARGUMENT"),
    ("no-scheme", lambda s, p: "example.com/a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("no-host", lambda s, p: "http:///a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("host-label-too-long", lambda s, p: f"http://{'a' * 70}.com/a.jpg", 400, "invalid_request",
     "INVALID_ARGUMENT"),
    ("host-empty-label", lambda s, p: "http://a..com/a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("host-with-space", lambda s, p: "http://exa mple.com/a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("bad-port", lambda s, p: "http://example.com:99999/a.jpg", 400, "invalid_request", "INVALID_ARGUMENT"),
    ("control-chars", lambda s, p: "http://example.com/a\r\nX-Injected: 1", 400, "invalid_request",
     "INVALID_ARGUMENT"),
    ("unresolvable-host", lambda s, p: "http://no-such-host.invalid/a.jpg", 502, "upstream_failed",
     "FAILED_PRECONDITION"),
    ("connection-refused", lambda s, p: f"http://127.0.0.1:{p}/a.jpg", 502, "upstream_failed",
     "FAILED_PRECONDITION"),
    ("upstream-404", lambda s, p: _url(s, "/missing.jpg"), 502, "upstream_failed", "FAILED_PRECONDITION"),
    ("upstream-500", lambda s, p: _url(s, "/error500"), 502, "upstream_failed", "FAILED_PRECONDITION"),
    ("upstream-403", lambda s, p: _url(s, "/forbidden"), 502, "upstream_failed", "FAILED_PRECONDITION"),
    ("redirect-loop", lambda s, p: _url(s, "/loop"), 502, "upstream_failed", "FAILED_PRECONDITION"),
    ("redirect-to-ftp", lambda s, p: _url(s, "/redirect?to=ftp://example.com/a.jpg"), 502,
     "upstream_failed", "FAILED_PRECONDITION"),
    ("html-page", lambda s, p: _url(s, "/html"), 422, "not_an_image", "INVALID_ARGUMENT"),
    ("too-elongated", lambda s, p: _url(s, "/too-wide.png"), 422, "not_an_image", "INVALID_ARGUMENT"),
    ("random-bytes", lambda s, p: _url(s, "/noise.bin"), 422, "not_an_image", "INVALID_ARGUMENT"),
    ("empty-image", lambda s, p: _url(s, "/empty.jpg"), 422, "not_an_image", "INVALID_ARGUMENT"),
    ("truncated-jpeg", lambda s, p: _url(s, "/truncated.jpg"), 422, "not_an_image", "INVALID_ARGUMENT"),
    ("decompression-bomb", lambda s, p: _url(s, "/bomb.png"), 413, "too_large", "RESOURCE_EXHAUSTED"),
    ("oversize-declared", lambda s, p: _url(s, "/oversize.jpg"), 413, "too_large", "RESOURCE_EXHAUSTED"),
    ("oversize-undeclared", lambda s, p: _url(s, "/endless?mb=8"), 413, "too_large", "RESOURCE_EXHAUSTED"),
    ("lying-content-length", lambda s, p: _url(s, "/big-header"), 413, "too_large", "RESOURCE_EXHAUSTED"),
    ("slow-headers", lambda s, p: _url(s, "/slow?delay=3"), 504, "upstream_timeout", "DEADLINE_EXCEEDED"),
    ("drip-past-deadline", lambda s, p: _url(s, "/drip?every=0.5&max=8"), 504, "upstream_timeout",
     "DEADLINE_EXCEEDED"),
]
GRPC_CASES = [case for case in CASES if case[4] is not None]


def _http_body(case, image_server, closed_port) -> bytes:
    body = case[1]
    if callable(body):
        return json.dumps({"url": body(image_server, closed_port)}).encode()
    return body


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_http_bad_input(stack, image_server, closed_port, case):
    _name, _body, status, code, _grpc = case
    response = requests.post(stack.http + "/predict", data=_http_body(case, image_server, closed_port),
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[case[0] for case in GRPC_CASES])
def test_grpc_bad_input(grpc_predict, image_server, closed_port, case):
    _name, make_url, _status, code, grpc_status = case
    with pytest.raises(grpc.RpcError) as failure:
        grpc_predict(make_url(image_server, closed_port), timeout=30)
    assert failure.value.code().name == grpc_status
    assert failure.value.details().startswith(code + ":")


@pytest.mark.parametrize("message", [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff", b"\x0a\x10http://"],
                         ids=["url-not-utf8", "garbage", "truncated"])
def test_grpc_messages_that_do_not_parse_are_invalid_arguments(stack, message):
    with grpc.insecure_channel(stack.grpc_target) as channel:
        raw_predict = channel.unary_unary("/inference.InstanceDetector/Predict")
        with pytest.raises(grpc.RpcError) as failure:
            raw_predict(message, timeout=30)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("invalid_request:")


def test_an_oversize_chunked_body_is_refused(stack):
    """No Content-Length to check up front: the cap applies while the body is read."""
    def chunks():
        for _ in range(200):
            yield b" " * 1024
    response = requests.post(stack.http + "/predict", data=chunks(), timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_max_request_bytes_is_the_largest_body_accepted(stack, image_server, chunked):
    limit = Settings().max_request_bytes  # the stack runs with the default
    body = json.dumps({"url": image_server.url("/img/jpeg")}).encode()

    def post(size):
        padded = body + b" " * (size - len(body))
        data = iter([padded[:1000], padded[1000:]]) if chunked else padded
        return requests.post(stack.http + "/predict", data=data, timeout=60,
                             headers={"Content-Type": "application/json"})

    assert post(limit).json() == {"objects": [CLASS_A]}
    too_long = post(limit + 1)
    assert too_long.status_code == 413 and too_long.json()["error"]["code"] == "too_large"


def test_a_form_post_without_json_content_type_still_works(stack, image_server):
    """curl -d '{"url": ...}' sends form encoding; the body is still read as JSON."""
    response = requests.post(stack.http + "/predict", data=json.dumps({"url": image_server.url("/img/png")}),
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert response.status_code == 200 and response.json() == {"objects": [CLASS_A]}


def test_slow_clients_do_not_starve_the_server(stack, image_server):
    """Clients that send half a request and stall (slowloris) hold one handler thread each, not
    the whole server: with several of them connected, /healthz and /predict still answer."""
    import socket

    stalled = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", stack.http_port), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"url\":")
            stalled.append(sock)
        assert requests.get(stack.http + "/healthz", timeout=10).status_code == 200
        assert stack.predict_http(image_server.url("/img/jpeg"), timeout=60).json() == {"objects": [CLASS_A]}
    finally:
        for sock in stalled:
            sock.close()


def test_health_checks_answer_while_many_requests_wait(stack, image_server, grpc_predict):
    """Requests waiting on a slow image host (or for the model) hold handler threads; liveness,
    readiness and gRPC health must still answer at once, or an orchestrator restarts a healthy
    service under load."""
    url = image_server.url("/drip?every=0.3&max=10")  # held until FETCH_TOTAL_TIMEOUT (4 s)

    def grpc_call():
        try:
            grpc_predict(url, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(max_workers=20) as pool:
        calls = [pool.submit(stack.predict_http, url, 30) for _ in range(12)]
        calls += [pool.submit(grpc_call) for _ in range(6)]
        time.sleep(1.0)  # all of them are connected and waiting on the image host by now
        assert requests.get(stack.http + "/healthz", timeout=3).status_code == 200
        assert requests.get(stack.http + "/readyz", timeout=3).status_code == 200
        assert stack.grpc_health() == "SERVING"
        assert not any(call.done() for call in calls), \
            "the health checks were only answered once the slow requests had ended (no free thread)"
        results = [call.result() for call in calls]
    assert all(r.status_code == 504 for r in results[:12]), [r.text for r in results[:12]]
    assert all(code == grpc.StatusCode.DEADLINE_EXCEEDED for code in results[12:])


def test_service_still_answers_after_the_hostile_table(stack, image_server, grpc_predict):
    url = image_server.url("/img/jpeg")
    assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
    assert grpc_predict(url) == [CLASS_A]
    log = stack.log_path.read_text(errors="replace")
    assert log.count("spawned:") == 3, "a process crashed and was restarted"
    assert "Traceback" not in log
