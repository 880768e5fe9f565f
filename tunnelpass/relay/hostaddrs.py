# -*- test-case-name: tests.test_hostaddrs -*-
"""Which address the server's logged token and client command carry.

A server bound to a wildcard (``0.0.0.0``, ``::``, an empty host) is
reachable on every address of the host, but a token can carry one: the
token must work when pasted on *another* machine, so it must never carry
a loopback address unless the host has nothing else.  ``--public-address``
(a NAT's public address, a DNS name) settles it; otherwise the choice is
:func:`choose_public` over the host's interface addresses.

:func:`choose_public` is sans-IO (the addresses are passed in);
:func:`host_addresses` reads them from the kernel without any route or
packet: IPv4 from the ``SIOCGIFCONF`` ioctl on an ``AF_INET`` socket (every
interface address, aliases included; it needs no netlink socket, which a
systemd unit's ``RestrictAddressFamilies`` forbids and glibc's
``if_nameindex`` uses), else ``SIOCGIFADDR`` per ``socket.if_nameindex()``
entry; IPv6 from ``/proc/net/if_inet6``.  Both are Linux interfaces; elsewhere the list is
whatever could be read (possibly empty, which means loopback).
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

SIOCGIFCONF = 0x8912
SIOCGIFADDR = 0x8915
_IFREQ = 40 if struct.calcsize("P") == 8 else 32  # sizeof(struct ifreq) on Linux
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class PublicAddress:
    """What the token carries and why (for the log line)."""

    host: str
    port: int
    why: str  # "from --public-address", "the bound address", "the host's first ... address"
    others: tuple = ()  # the other usable addresses (listed in the log, with --public-address)
    loopback_only: bool = False  # the host has nothing but loopback


def _usable(address: ipaddress._BaseAddress) -> bool:
    """An address another machine could dial: not loopback, link-local
    (an IPv6 one needs a scope no token carries), multicast or unspecified."""
    return not (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified)


def choose_public(bind_host: str, port: int, addresses, public: tuple | None = None) -> PublicAddress:
    """The address for the token of a server bound to *bind_host*:*port*.

    *addresses*: the host's interface addresses as text, in interface
    order; *public*: ``(host, port or None)`` from ``--public-address``.
    For a wildcard bind the first usable address wins, global ones before
    private ones and IPv4 before IPv6 (an ``0.0.0.0`` bind takes IPv4
    only); when there is none, loopback."""
    if public is not None:
        host, public_port = public
        return PublicAddress(host, public_port or port, "from --public-address")
    if bind_host not in WILDCARDS:
        return PublicAddress(bind_host, port, "the address the tunnel port is bound to")
    ipv4_only = bind_host != "::"  # Twisted binds an empty host as IPv4
    candidates = []
    for order, text in enumerate(addresses):
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if _usable(address) and not (ipv4_only and address.version != 4):
            candidates.append((not address.is_global, address.version != 4, order, str(address)))
    ranked = [text for *_, text in sorted(candidates)]
    ranked = list(dict.fromkeys(ranked))  # an address on two interfaces counts once
    if not ranked:
        loopback = "127.0.0.1" if ipv4_only else "::1"
        return PublicAddress(loopback, port, "this host has only loopback addresses", loopback_only=True)
    kind = "global" if ipaddress.ip_address(ranked[0]).is_global else "non-loopback"
    return PublicAddress(ranked[0], port, f"the host's first {kind} address", tuple(ranked[1:]))


def host_addresses() -> list[str]:
    """The host's interface addresses (IPv4 first, then IPv6), as text."""
    return _ipv4_addresses() + _ipv6_addresses()


def _ipv4_addresses() -> list[str]:
    try:
        return _ipv4_ifconf()
    except OSError:
        return _ipv4_per_interface()


def _ipv4_ifconf(slots: int = 256) -> list[str]:
    """Every IPv4 interface address, from one ``SIOCGIFCONF``."""
    buffer = array.array("B", bytes(_IFREQ * slots))
    address, _ = buffer.buffer_info()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        answer = fcntl.ioctl(probe.fileno(), SIOCGIFCONF, struct.pack("iP", _IFREQ * slots, address))
    length = struct.unpack("iP", answer)[0]
    data = buffer.tobytes()[:length]
    return [socket.inet_ntoa(data[i + 20:i + 24]) for i in range(0, length - _IFREQ + 1, _IFREQ)]


def _ipv4_per_interface() -> list[str]:
    try:
        interfaces = socket.if_nameindex()
    except OSError:
        return []
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in interfaces:
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            found.append(socket.inet_ntoa(answer[20:24]))
    return found


def _ipv6_addresses(path: str = "/proc/net/if_inet6") -> list[str]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return parse_if_inet6(lines)


def parse_if_inet6(lines) -> list[str]:
    """Addresses from ``/proc/net/if_inet6`` lines (32 hex digits, then
    index, prefix length, scope, flags and name), in interface order."""
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            index = int(fields[1], 16)
        except ValueError:
            continue
        entries.append((index, str(address)))
    return [text for _, text in sorted(entries, key=lambda entry: entry[0])]


def parse_public_address(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` -> (host, port or None)."""
    from tunnelpass.config.settings import parse_host, parse_port

    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected HOST, HOST:PORT or [IPV6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            raise ValueError(f"{inside!r} is not an IPv6 address") from None
        return host, parse_port(rest[1:]) if rest else None
    if text.count(":") > 1:  # a bare IPv6 literal
        try:
            return str(ipaddress.IPv6Address(text)), None
        except ValueError:
            raise ValueError(f"{text!r}: write an IPv6 address with a port as [IPV6]:PORT") from None
    host, sep, port = text.partition(":")
    return parse_host(host, "public address"), parse_port(port) if sep else None

