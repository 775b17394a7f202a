"""The SSRF guard's address policy and resolve-and-check function (no connection is made)."""

import ipaddress
import socket

import pytest

from common.errors import ConfigError, ForbiddenTarget
from common.netguard import Allowlist, non_public_reason, resolve_and_check

REFUSED = [
    "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.254",
    "192.168.1.1", "169.254.169.254", "100.64.0.1", "192.0.0.1", "192.0.2.5", "198.18.0.1",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "64:ff9b::a00:1",
    "2001:db8::1", "::127.0.0.1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert non_public_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert non_public_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("host", [
    "127.0.0.1", "localhost", "2130706433", "0x7f.1", "017700000001", "0x7f000001", "127.1",
    "0", "::1", "::ffff:127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.0.1",
    "LOCALHOST.", "api.localhost", "127.0.0.1.", "fe80::1%lo", "fe80::1%25eth0", "::1%lo",
])
def test_resolve_and_check_refuses_internal_spellings(host):
    with pytest.raises(ForbiddenTarget):
        resolve_and_check(host, 80, Allowlist())


def test_any_bad_address_refuses_the_host(monkeypatch):
    """A name resolving to one public and one private address is refused (DNS rebinding)."""
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(ForbiddenTarget, match="10.0.0.7"):
        resolve_and_check("rebind.example", 80, Allowlist())


def test_allowlist_endpoint_is_exact_to_the_port():
    allow = Allowlist.parse(["127.0.0.1:8000"])
    resolved = resolve_and_check("127.0.0.1", 8000, allow)  # getaddrinfo's entries, checked
    assert {info[4][:2] for info in resolved} == {("127.0.0.1", 8000)}
    with pytest.raises(ForbiddenTarget):
        resolve_and_check("127.0.0.1", 8001, allow)


def test_allowlist_cidr_and_ipv6():
    allow = Allowlist.parse(["10.0.0.0/8", "[::1]:9000"])
    assert allow.permits(ipaddress.ip_address("10.9.8.7"), 1)
    assert not allow.permits(ipaddress.ip_address("11.0.0.1"), 1)
    assert allow.permits(ipaddress.ip_address("::1"), 9000)
    assert not allow.permits(ipaddress.ip_address("::1"), 9001)


@pytest.mark.parametrize("entry", ["localhost", "127.0.0.1", "example.com:80", "10.0.0.0/33", "1.2.3.4:x"])
def test_bad_allowlist_entries_are_config_errors(entry):
    with pytest.raises(ConfigError, match="ALLOWED_PRIVATE_TARGETS"):
        Allowlist.parse([entry])
