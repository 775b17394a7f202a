"""SSRF guard: decide which addresses the service may connect to, and connect only to those.

Default deny: every address that is not globally routable unicast is refused (loopback,
private, link-local, unspecified, multicast, reserved, shared/CGN, documentation ranges),
including IPv4 addresses embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64).

The check runs inside the HTTP connection itself (``GuardedHTTPAdapter``): the host is
resolved once, *every* resolved address is checked, and the socket is opened to a checked
address. So odd spellings (``2130706433``, ``0x7f.1``), DNS rebinding between check and
connect, and redirects to internal hosts all meet the same check.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from common.errors import ConfigError, ForbiddenTarget

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            reason = non_public_reason(inner)
            return f"IPv6 form of a {reason} IPv4 address" if reason else None
    for attribute, reason in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attribute):
            return reason
    if not ip.is_global:
        return "non-global"
    return None


@dataclass(frozen=True)
class Allowlist:
    """Explicit exceptions to the default deny: CIDR networks and exact ``host:port`` pairs."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    endpoints: frozenset[tuple[IPAddress, int]] = frozenset()

    @classmethod
    def parse(cls, entries) -> Allowlist:
        networks, endpoints = [], set()
        for entry in entries:
            try:
                if "/" in entry:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                    continue
                host, sep, port = entry.rpartition(":")
                if not sep or not port.isdigit():
                    raise ValueError("expected host:port or a CIDR network")
                host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
                endpoints.add((ipaddress.ip_address(host), int(port)))
            except ValueError as exc:
                raise ConfigError(
                    f"ALLOWED_PRIVATE_TARGETS entry {entry!r} is invalid ({exc}); use an IP "
                    f"literal with a port (127.0.0.1:8000, [::1]:8000) or a CIDR (10.0.0.0/8)"
                ) from None
        return cls(tuple(networks), frozenset(endpoints))

    def permits(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self.endpoints:
            return True
        return any(ip.version == net.version and ip in net for net in self.networks)


def _normalise(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _lookup_name(host: str) -> str:
    """The name to resolve: without the root dot, RFC 6761 ``*.localhost`` as ``localhost``, and an
    IPv6 literal without its zone id (``[fe80::1%25eth0]``: the address alone is what is checked)."""
    name = host.rstrip(".")
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return "localhost"
    if "%" in name:
        address = name.split("%", 1)[0]
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return name
        return address
    return name


def resolve_and_check(host: str, port: int, allowlist: Allowlist) -> list[tuple]:
    """Resolve ``host`` and return its getaddrinfo entries, or raise ForbiddenTarget.

    Refuses the whole host if *any* address it resolves to is non-public and not allowlisted.
    Raises socket.gaierror when the name does not resolve.
    """
    infos = socket.getaddrinfo(_lookup_name(host), port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = _normalise(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        reason = non_public_reason(ip)
        if reason and not allowlist.permits(ip, port):
            raise ForbiddenTarget(
                f"refusing to fetch from {host!r}: it resolves to {ip}, a {reason} address "
                "(ALLOWED_PRIVATE_TARGETS lists the private hosts the service may fetch from)"
            )
    return infos


def connect_checked(host: str, port: int, timeout, allowlist: Allowlist, socket_options=None):
    """Open a TCP connection to one of the addresses ``resolve_and_check`` approved."""
    last_error: OSError | None = None
    for family, type_, proto, _canon, sockaddr in resolve_and_check(host, port, allowlist):
        sock = socket.socket(family, type_, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not None:
                sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            last_error = exc
            sock.close()
    raise last_error or OSError(f"no address to connect to for {host!r}")


# When set (a ``time.monotonic()`` value), the moment by which a response's status line and headers
# must have arrived: a host that drips header bytes within every read timeout is cut off there.
response_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "response_deadline", default=None
)


class _GuardedConnectionMixin(HTTPConnection):
    """Mixed into urllib3's HTTP and HTTPS connections: connects through ``connect_checked`` and
    reads a response's head within ``response_deadline``."""

    allowlist: Allowlist = Allowlist()

    def getresponse(self, *args, **kwargs):
        deadline = response_deadline.get()
        if deadline is None:
            return super().getresponse(*args, **kwargs)
        # Read timeouts bound each read, not their sum: past the deadline the socket is shut down,
        # so the read under way fails at once (the caller reports the deadline).
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            watchdog.cancel()

    def _cut_off(self) -> None:
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def _new_conn(self):  # same error mapping as urllib3's own implementation
        try:
            return connect_checked(
                self._dns_host, self.port, self.timeout, self.allowlist, self.socket_options
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from exc
        except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: a name IDNA refuses
            raise NewConnectionError(self, f"failed to establish a new connection: {exc}") from exc


class GuardedHTTPAdapter(HTTPAdapter):
    """A requests adapter whose connections go through ``connect_checked``."""

    def __init__(self, allowlist: Allowlist, **kwargs):
        guarded = {"allowlist": allowlist}
        http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection), guarded)
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection), guarded)
        self._pool_classes = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes
