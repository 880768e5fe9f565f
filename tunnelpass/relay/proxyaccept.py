# -*- test-case-name: tests.test_proxyaccept -*-
"""``--accept-proxy``: a listener behind a load balancer reads the PROXY
protocol header (v1 or v2) its trusted proxies send.

Only peers inside the trusted networks are served, and each must open with
a valid header within ``HEADER_TIMEOUT``; anything else -- an untrusted
peer, a malformed header, no header -- is closed at once and counted as
refused.  Nothing is guessed: a header is either parsed exactly or the
connection ends.  The original client then replaces the peer address for
the relay (logs, and the header sent on with ``proxy=v1|v2``).
"""

from __future__ import annotations

import ipaddress

from tunnelpass.wire.proxyproto import ProxyError, parse
from tunnelpass.carriers.switch import SwitchingProtocol

HEADER_TIMEOUT = 5.0


def parse_networks(text: str) -> tuple:
    """``CIDR[,CIDR...]`` -> networks; an empty string means none."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=True))
        except ValueError as e:
            raise ValueError(f"{part!r} is not a network (CIDR such as 10.0.0.0/8 or 192.0.2.7/32): {e}") from None
    if len(networks) > 1024:
        raise ValueError("at most 1024 trusted networks")
    return tuple(networks)


def trusted(host: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class ProxyHeaderProtocol(SwitchingProtocol):
    """Reads the header, then hands the connection to the factory's relay."""

    def __init__(self, factory):
        self.factory = factory
        self.buffer = b""
        self.deadline = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        if not trusted(peer.host, self.factory.limits.accept_proxy):
            self._refuse("untrusted source for a PROXY header")
            return
        self.deadline = self.factory.clock.callLater(HEADER_TIMEOUT, self._refuse, "no PROXY header in time")

    def header_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            result = parse(self.buffer)
        except ProxyError as e:
            self._refuse(str(e))
            return
        if result is None:
            return
        header, used = result
        self._cancel_deadline()
        inbound = self.factory.protocol()
        inbound.factory = self.factory
        if header.source is not None:
            inbound.original = (header.source, header.destination)
        rest, self.buffer = self.buffer[used:], b""
        self.switch_to(inbound, rest)

    def _refuse(self, why: str) -> None:
        self._cancel_deadline()
        self.factory.stats.refused += 1
        self.factory.note_proxy_refusal(why)
        self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def header_lost(self, reason) -> None:
        self._cancel_deadline()
