# -*- test-case-name: tests.test_relay -*-
"""The outbound side of a relay: what is dialled, and how.

:class:`OutboundProtocol` is the dialled leg of a relay (a target, or a pool
connection the tunnel ends hand a user to); what it reads goes to the
accepted side, and its *greeting* (a tunnel's OPEN frame, a PROXY header)
goes out before any relayed byte.  :class:`OutboundDialing` is how a relay
factory reaches its target: IP literals straight to ``connectTCP``, names
through the instance's dialer (``--dial`` source, ``--dns`` cache) or
``HostnameEndpoint``, one connect timeout, and in a target group failover to
the next target (:class:`~tunnelpass.relay.targets.TargetGroup`), each failure
told to the target warnings and the connection trace.

A mixin of :class:`tunnelpass.relay.relay.TCPForwardFactory`, kept apart so the
relay module holds the accepted side, the limits and the drain; the pool
listeners (:mod:`tunnelpass.tunnel.pooldial`) replace this dial with a pool take.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory, Factory

from tunnelpass.ops import connlog
from tunnelpass.ops.fdbudget import ran_out
from tunnelpass.wire.proxyproto import encode_v1, encode_v2
from tunnelpass.carriers.stream import write_now
from tunnelpass.relay.relayend import RelayEnd, throttle

if TYPE_CHECKING:
    from tunnelpass.relay.relay import InboundProtocol


def user_addresses(inbound) -> tuple:
    """``(source, destination)`` of the user behind *inbound*: as a trusted
    proxy or the tunnel's OPEN frame told it, else its own peer and host."""
    if inbound.original is not None:
        return inbound.original
    peer, local = inbound.transport.getPeer(), inbound.transport.getHost()
    return (getattr(peer, "host", None), getattr(peer, "port", 0)), (getattr(local, "host", None),
                                                                     getattr(local, "port", 0))


def proxy_header(version: str, inbound, protocol: str = "tcp") -> bytes:
    """The PROXY protocol header (``v1``/``v2``; ``off``: none) telling the
    remote who the user behind *inbound* really is."""
    if version == "off":
        return b""
    source, destination = user_addresses(inbound)
    if version == "v1":
        return encode_v1(source, destination)
    return encode_v2(source, destination, protocol)


class OutboundProtocol(RelayEnd):
    """The dialled side: everything it reads goes to the accepted side.

    *greeting* is written to it before any relayed byte (a tunnel's start
    frame when the "dialled" side is a pool connection).
    """

    in_stream = None  # the accepted leg as a stream (set when this leg connects)

    def __init__(self, inbound: "InboundProtocol", greeting: bytes = b""):
        self.inbound = inbound
        self.greeting = greeting

    def connectionMade(self) -> None:
        self.inbound.outbound_connected(self)

    def dataReceived(self, data: bytes) -> None:
        inbound = self.inbound
        write_now(self.in_stream, data)
        inbound.stats.bytes_out += len(data)
        inbound.bytes_out += len(data)
        inbound.resetTimeout()
        if inbound.factory.limits.limiter is not None:
            throttle(self, inbound.factory, len(data))

    def peer_end(self):
        inbound = self.inbound
        return inbound if inbound.outbound is self and inbound.engine is None else None

    def relay_factory(self):
        return self.inbound.factory

    def connectionLost(self, reason=None) -> None:
        self._end_partner(reason)


class _OutboundFactory(ClientFactory):
    """Builds the one outbound protocol of one relay and reports failures."""

    noisy = False

    def __init__(self, inbound: "InboundProtocol", greeting: bytes = b"", on_failure=None, on_success=None):
        self.inbound = inbound
        self.greeting = greeting
        self.on_failure = on_failure or inbound.connect_failed
        self.on_success = on_success

    def buildProtocol(self, addr):
        if self.on_success is not None:
            self.on_success()
        return OutboundProtocol(self.inbound, self.greeting)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.on_failure(reason)


class OutboundDialing:
    """The dial path of :class:`~tunnelpass.relay.relay.TCPForwardFactory`."""

    def dial(self, inbound: InboundProtocol):
        """Start connecting *inbound*'s remote; return something cancellable.

        IP literals go straight to ``connectTCP`` (no resolver round trip on
        the hot path); names are resolved through the instance's name cache
        (``limits.dialer``, ``--dns``; without one, on every connection) and
        dialled with ``HostnameEndpoint``, IPv4 and IPv6, from the
        ``--dial`` source address.  In a target group a failed attempt moves
        on to the next target.
        """
        greeting = proxy_header(self.limits.proxy, inbound)
        return self._dial_at(inbound, greeting, self.group, self._literal, self.group.order(), 0)

    def _dial_at(self, inbound, greeting, group, literal, order, attempt):
        index = order[attempt]
        host, port = group.targets[index]
        timeout = self.limits.connect_timeout

        def failed(reason):
            if inbound.closed or ran_out(reason) is not None:
                # The user hung up, or this process is out of descriptors:
                # says nothing about the target.
                inbound.connect_failed(reason)
                return
            group.failed(index)
            connlog.dial_failed(inbound, reason)
            self.target_warnings.failed(self.name, host, port, reason)
            if attempt + 1 < len(order) and not inbound.closed:
                inbound._pending = self._dial_at(inbound, greeting, group, literal, order, attempt + 1)
            else:
                inbound.connect_failed(reason)

        def succeeded():
            group.succeeded(index)

        if self.descriptors is not None:
            self.descriptors.spend(1)  # the leg's socket, until the next recount
        connlog.dialling(inbound, host, port)
        dialer = self.limits.dialer  # --dial / --dns (None: kernel's source, a lookup per connection)
        if literal[index] and (dialer is None or dialer.fits(host)):
            factory = _OutboundFactory(inbound, greeting, failed, succeeded)
            return self.reactor.connectTCP(host, port, factory, timeout=timeout,
                                           bindAddress=dialer.bind_address if dialer else None)

        def build():
            succeeded()
            return OutboundProtocol(inbound, greeting)

        outbound_factory = Factory.forProtocol(build)
        outbound_factory.noisy = False  # no "Starting factory" line per connection
        if dialer is not None:  # names through the cache; a literal of the other family fails here
            d = dialer.connect_tcp(host, port, outbound_factory, timeout)
        else:
            d = HostnameEndpoint(self.reactor, host, port, timeout=timeout).connect(outbound_factory)
        d.addTimeout(timeout, self.clock)
        d.addErrback(lambda reason: None if reason.check(CancelledError) and inbound.closed else failed(reason))
        return d
