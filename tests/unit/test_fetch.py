"""The fetcher in process, against a loopback server: what the stack tests cannot see.

Address policy and resolve-and-check are in test_netguard.py; fetches through the running stack
(hostile hosts, SSRF spellings, redirects) in tests/stack/test_bad_inputs.py and test_ssrf.py.
"""

import gzip
import time

import pytest

from common.errors import TooLarge, UpstreamTimeout
from common.fetch import ImageFetcher
from testkit.image_server import ImageServer
from testkit.settings import settings_for


@pytest.fixture(scope="module")
def server():
    running = ImageServer()
    yield running
    running.close()


def fetcher_for(server, **env):
    return ImageFetcher(settings_for(ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{server.port}", **env))


def test_cookies_from_one_image_host_are_not_kept(server):
    url = server.add("/cookie", b"data", headers={"Set-Cookie": "session=secret; Path=/"})
    fetcher = fetcher_for(server)
    assert fetcher.fetch(url) == b"data"
    assert len(fetcher.session.cookies) == 0
    assert fetcher.fetch(url) == b"data"  # the next request, as the host received it
    first, second = server.requests_for("/cookie")
    assert first.headers.get("Cookie") is None and second.headers.get("Cookie") is None


def test_a_gzip_bomb_is_capped_on_decoded_bytes(server):
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # ~64 KB that inflates to 64 MB
    url = server.add("/gzip-bomb", bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(TooLarge):
        fetcher_for(server, FETCH_MAX_BYTES=1024 * 1024).fetch(url)


def test_the_request_asks_for_images_and_no_compression(server):
    url = server.add("/plain", b"ok")
    assert fetcher_for(server).fetch(url) == b"ok"
    (received,) = server.requests_for("/plain")  # the headers as they arrived on the wire
    assert received.headers.get_all("Accept-Encoding") == ["identity"]
    assert received.headers.get_all("Accept") == ["image/*"]


def test_environment_proxies_are_ignored(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9/")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9/")
    assert fetcher_for(server).fetch(server.add("/direct", b"direct")) == b"direct"


def test_a_trickling_host_cannot_outlast_the_overall_deadline(server):
    """One byte every 0.3 s never trips the read timeout, but the whole download still stops at
    FETCH_TOTAL_TIMEOUT."""
    fetcher = fetcher_for(server, FETCH_TOTAL_TIMEOUT=2.0, FETCH_READ_TIMEOUT=1.0)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="overall deadline"):
        fetcher.fetch(server.url("/drip?every=0.3&max=30"))
    assert time.monotonic() - started < 3.5
