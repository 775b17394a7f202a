"""Download an image by URL, within the configured time and size limits, through the SSRF guard."""

from __future__ import annotations

import re
import time
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urljoin

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from common.config import Settings
from common.errors import ForbiddenTarget, InvalidRequest, TooLarge, UpstreamFailed, UpstreamTimeout
from common.netguard import Allowlist, GuardedHTTPAdapter, response_deadline

ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 64 * 1024
USER_AGENT = "instance-detector/1.0"


_H16 = "[0-9A-Fa-f]{1,4}"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
# RFC 3986's IPv6address, which is what urlsplit (via ipaddress) accepts between brackets
_IPV6 = "|".join(
    (
        rf"(?:{_H16}:){{6}}{_LS32}",
        rf"::(?:{_H16}:){{5}}{_LS32}",
        rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    )
)
_PORT = "0*(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_BLANK = r"[\t\n\x0b\x0c\r ]*"
# The URLs a request may name, as the API's schema states it (common.api): blanks around it are
# ignored; http(s); an optional user (without a backslash, where urllib3 ends the host); a host
# name of ASCII labels, or an IPv6 address in brackets (with a zone id, RFC 6874, which the SSRF
# guard ignores: the address is what it checks); a port from 1 to 65535; then anything
# without control characters. Host names in another script are sent in their ASCII (punycode)
# form.
URL_PATTERN = (
    f"^{_BLANK}[Hh][Tt][Tt][Pp][Ss]?://"
    r"(?:[^\x00-\x20\x7f/\\?#@\[\]]*@)?"
    f"(?:[A-Za-z0-9_~-]{{1,63}}(?:\\.[A-Za-z0-9_~-]{{1,63}})*\\.?|\\[(?:{_IPV6})(?:%25[A-Za-z0-9._~-]+)?\\])"
    f"(?::(?:{_PORT})?)?"
    r"(?:[/?#][^\x00-\x1f\x7f]*)?"
    f"{_BLANK}$"
)
_URL = re.compile(URL_PATTERN)
_ZONE_ID = re.compile(r"[^/]*//(?:[^@/\[]*@)?\[[^\]]*%25")


def validate_url(url, max_length: int) -> str:
    """Return the URL without the blanks around it, or raise InvalidRequest."""
    if not isinstance(url, str):
        raise InvalidRequest("'url' must be a string")
    if len(url) > max_length:
        raise InvalidRequest(f"'url' is longer than {max_length} characters (MAX_URL_LENGTH)")
    stripped = url.strip(" \t\n\x0b\x0c\r")
    if not stripped:
        raise InvalidRequest("'url' must not be empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in stripped):
        raise InvalidRequest("'url' contains control characters")
    scheme = stripped.partition(":")[0] if ":" in stripped else ""
    if scheme.lower() not in ALLOWED_SCHEMES:
        raise InvalidRequest(f"'url' must use http or https, not {scheme or 'no scheme'!r}")
    if not _URL.fullmatch(url):
        raise InvalidRequest(
            "'url' is not a valid URL: it needs a host name of ASCII letters, digits, '-' and '_' "
            "(or an IPv6 address in brackets) and a port from 1 to 65535"
        )
    if _ZONE_ID.match(stripped):
        # a zone id names a network interface of this machine: only local addresses have one
        raise ForbiddenTarget("refusing to fetch from an IPv6 address with a zone id (a local interface)")
    return stripped


class ImageFetcher:
    """Fetches image bytes; one instance per process, reusing its guarded session."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session = requests.Session()
        self.session.trust_env = (
            False  # no proxies or netrc from the environment: they would bypass the guard
        )
        # One session serves every client: never keep an image host's cookies for the next caller.
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        adapter = GuardedHTTPAdapter(Allowlist.parse(settings.allowed_private_targets), max_retries=0)
        for scheme in ALLOWED_SCHEMES:
            self.session.mount(f"{scheme}://", adapter)
        self.session.headers.update(
            {"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"}
        )

    def fetch(self, url: str) -> bytes:
        """The body at ``url``, a URL as ``validate_url`` returns it (redirects are validated here)."""
        settings = self.settings
        deadline = time.monotonic() + settings.fetch_total_timeout
        for _hop in range(settings.fetch_max_redirects + 1):
            response = self._get(url, deadline)
            with response:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    url = self._redirect_target(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise UpstreamFailed(f"the image host answered HTTP {response.status_code}")
                return self._read_body(response, deadline)
        raise UpstreamFailed(f"more than {settings.fetch_max_redirects} redirects")

    def _redirect_target(self, current: str, location: str) -> str:
        target = urljoin(current, location)
        try:
            return validate_url(target, self.settings.max_url_length)
        except InvalidRequest as exc:
            raise UpstreamFailed(f"the image host redirected to an unusable URL: {exc.message}") from None

    def _get(self, url: str, deadline: float) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout("the image download exceeded its overall deadline")
        timeout = (
            min(self.settings.fetch_connect_timeout, remaining),
            min(self.settings.fetch_read_timeout, remaining),
        )
        token = response_deadline.set(deadline)
        try:
            return self.session.get(url, stream=True, timeout=timeout, allow_redirects=False)
        except ForbiddenTarget:
            raise
        except requests.exceptions.InvalidURL as exc:
            raise InvalidRequest(f"'url' is not a valid URL: {_short(exc)}") from None
        except requests.Timeout:
            raise UpstreamTimeout("the image host did not answer in time") from None
        except requests.ConnectionError as exc:
            if time.monotonic() >= deadline:  # cut off by the deadline while sending its headers
                raise UpstreamTimeout("the image download exceeded its overall deadline") from None
            raise UpstreamFailed(f"could not connect to the image host: {_short(exc)}") from None
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("the image download exceeded its overall deadline") from None
            raise UpstreamFailed(f"the image request failed: {_short(exc)}") from None
        finally:
            response_deadline.reset(token)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        """The body, capped in bytes and time. Each read returns what one receive brings
        (``read1``) and waits at most until the overall deadline, so a host that trickles bytes
        cannot stretch the download past FETCH_TOTAL_TIMEOUT."""
        cap = self.settings.fetch_max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise TooLarge(f"the image is larger than the {cap}-byte download limit")
        raw = response.raw
        body = bytearray()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTimeout("the image download exceeded its overall deadline")
                sock = getattr(raw.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(min(self.settings.fetch_read_timeout, remaining))
                chunk = raw.read1(_CHUNK_BYTES, decode_content=True)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > cap:
                    raise TooLarge(f"the image is larger than the {cap}-byte download limit")
        except ReadTimeoutError:
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("the image download exceeded its overall deadline") from None
            raise UpstreamTimeout("the image host stopped sending data") from None
        except (Urllib3Error, OSError) as exc:
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("the image download exceeded its overall deadline") from None
            raise UpstreamFailed(f"the image download broke off: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    """The innermost cause's message: enough to diagnose, without urllib3's object reprs."""
    inner: BaseException | None = exc
    while inner is not None:
        exc, inner = inner, inner.__cause__ or inner.__context__
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
