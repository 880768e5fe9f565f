# -*- test-case-name: tests.test_relay -*-
"""TCP relay: an accepted connection joined to a freshly dialled one.

Flow control is Twisted's own: each transport is registered as the streaming
producer of the other, so a slow side pauses reading on the fast side and no
hop buffers more than one socket's worth of data.  Reading from the accepted
side stays paused until the remote is connected, half-close (FIN) is passed
through, and one idle timer covers both directions.

This module is the accepted side (:class:`InboundProtocol`) and the
listener's factory (limits, refusals, the shutdown drain); the dialled side
and the dial path are :mod:`tunnelpass.relay.outbound`.
"""

from __future__ import annotations


from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import NotConnectingError
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from tunnelpass.ops import connlog
from tunnelpass.relay.block import FirstBytesGate
from tunnelpass.ops.fdbudget import ran_out
from tunnelpass.ops.logs import Throttle
from tunnelpass.relay.outbound import OutboundDialing, OutboundProtocol
from tunnelpass.relay.proxyaccept import ProxyHeaderProtocol
from tunnelpass.carriers.stream import stream_of, write_now
from tunnelpass.relay.relayend import LegProducer, RelayEnd, cancel_resume, throttle
from tunnelpass.relay.targets import TargetGroup
from tunnelpass.config.limits import Limits
from tunnelpass.config.settings import format_address, is_ip_literal
from tunnelpass.relay.engines import engine_for
from tunnelpass.relay.relayengine import RelayEngine
from tunnelpass.ops.stats import ListenerStats
from tunnelpass.relay.targetlog import TargetWarnings

#: Refusals at max-conns are logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL = 10.0
#: Seconds a shutdown drain waits, after aborting what is left, for the
#: aborts to run (so the RSTs go out) before it ends regardless.
ABORT_GRACE = 0.5


class InboundProtocol(RelayEnd, TimeoutMixin):
    """The accepted side; owns the relay's state and its idle timer."""

    factory: "TCPForwardFactory"
    outbound: OutboundProtocol | None = None
    engine: RelayEngine | None = None  # a native engine moving the bytes (splice, pump)
    admitted = False
    closed = False
    _pending = None  # an IConnector or a Deferred while dialling
    _early: list | None = None  # bytes read before the remote answered
    out_stream = None  # the outbound leg as a stream, once it is connected
    original = None  # (source, destination) from a trusted PROXY header
    gate: FirstBytesGate | None = None  # --block: judging the user's first bytes
    trace: connlog.Trace | None = None  # --log debug: this connection's trace
    bytes_in = bytes_out = 0  # this connection's payload, for its trace

    def connectionMade(self) -> None:
        factory = self.factory
        self.stats = factory.stats
        if len(factory.relays) + len(factory.udp_sessions) >= factory.limits.max_conns:
            self.stats.refused += 1
            factory.note_refusal()
            self.transport.loseConnection()
            return
        self.admitted = True
        factory.relays.add(self)
        self.stats.accepted += 1
        self.stats.active += 1
        self.callLater = factory.clock.callLater
        connlog.accepted(self)
        if factory.limits.block:
            self.gate = FirstBytesGate(self)
            if self.gate.start():  # it dials once the first bytes pass, or after a short wait
                return
        self.transport.pauseProducing()
        self._pending = factory.dial(self)

    def hold_early(self, data: bytes) -> None:
        """Bytes that came with the connection (a header's tail): relayed
        before anything else once the remote answers (see
        :meth:`~tunnelpass.carriers.switch.SwitchingProtocol.switch_to`)."""
        self._early = [data]

    def outbound_connected(self, outbound: OutboundProtocol) -> None:
        self._pending = None
        if self.closed:
            outbound.reset(flush=False)
            return
        connlog.connected(self)
        self.outbound = outbound
        # Each leg writes to the other as a stream (straight to its socket
        # when nothing is buffered; see stream.write_now).
        self.out_stream, outbound.in_stream = stream_of(outbound.transport), stream_of(self.transport)
        self.setTimeout(self.factory.limits.idle or None)
        if self.gate is not None:  # --block: the user has not spoken yet
            if outbound.greeting:
                outbound.transport.write(outbound.greeting)
                outbound.greeting = b""
            self.gate.hold(outbound)
            return
        self.start_relay(outbound)

    def start_relay(self, outbound: OutboundProtocol, native: bool = True) -> None:
        """Relay between the user and *outbound*: by a native engine when
        both streams offer their sockets (and *native*: zero-copy splice
        for two plain sockets, the copy pump when one is TLS), else
        through Twisted with flow control."""
        early = b"".join(self._early) if self._early else b""
        self._early = None
        greeting = outbound.greeting
        if native:
            engine = engine_for(self.factory.reactor, self.transport, outbound.transport, self.factory.zero_copy,
                                self.resetTimeout, self._count_in, self._count_out,
                                limiter=self.factory.limits.limiter)
            if engine is not None and engine.start(to_outbound=greeting + early):
                self.engine = engine
                self.stats.bytes_in -= len(greeting)  # protocol, not payload
                self.bytes_in -= len(greeting)
                return
        if greeting or early:
            outbound.transport.write(greeting + early)
            self.stats.bytes_in += len(early)
            self.bytes_in += len(early)
        if self._read_closed:  # the FIN came with the early bytes
            outbound.half_close()
        self.transport.registerProducer(LegProducer(outbound.transport), True)
        outbound.transport.registerProducer(LegProducer(self.transport), True)
        self._producing = outbound._producing = True
        self.transport.resumeProducing()

    def _count_in(self, n: int) -> None:
        self.stats.bytes_in += n
        self.bytes_in += n

    def _count_out(self, n: int) -> None:
        self.stats.bytes_out += n
        self.bytes_out += n

    def connect_failed(self, reason) -> None:
        self._pending = None
        if self.closed:
            return
        code = ran_out(reason)
        if code is not None:
            # Not the remote's fault: this process had no descriptor for the
            # leg.  The user is refused, and the budget says so loudly.
            self.stats.refused += 1
            descriptors = self.factory.descriptors
            if descriptors is not None:
                descriptors.ran_out("dial", code, lost=1, listener=self.factory.name)
            self.transport.loseConnection()
            return
        self.stats.connect_failures += 1
        self.factory.log.debug(
            "{listener}: cannot reach {remote}: {reason}",
            listener=self.factory.name, remote=self.factory.remote, reason=reason.getErrorMessage(),
        )
        self.close_cleanly()

    def dataReceived(self, data: bytes) -> None:
        if self.gate is not None:
            self.gate.data(data)
            return
        outbound = self.outbound
        if outbound is None:
            # Reading is paused until the remote answers, but bytes can come
            # with the connection (a tunnel header's tail): hold them.
            if self._early is None:
                self._early = []
            self._early.append(data)
            return
        write_now(self.out_stream, data)
        self.stats.bytes_in += len(data)
        self.bytes_in += len(data)
        self.resetTimeout()
        if self.factory.limits.limiter is not None:
            throttle(self, self.factory, len(data))

    def readConnectionLost(self) -> None:
        if self.gate is not None:
            self.gate.ended()  # what came is not a blocked start: the relay goes on
        super().readConnectionLost()

    def peer_end(self):
        return self.outbound if self.engine is None else None  # a native engine closes both itself

    def relay_factory(self):
        return self.factory

    def timeoutConnection(self) -> None:
        self.stats.idle_timeouts += 1
        connlog.ending(self, "timeout")
        self.abort()

    def abort(self) -> None:
        """Reset both sides now (idle timeout, end of a shutdown drain).
        Never raises: its callers are timers and the shutdown drain."""
        connlog.ending(self, "aborted")
        try:
            if self.engine is not None:
                self.engine.abort()
                return
            self.reset(flush=False)
            if self.outbound is not None:
                self.outbound.reset(flush=False)
        except Exception:
            self.factory.log.failure("{listener}: aborting a relay failed", listener=self.factory.name)

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        if not self.admitted:
            self._lost = True
            cancel_resume(self)
            return
        try:
            self.setTimeout(None)
            self.stats.active -= 1
            if self.gate is not None:
                self.gate.cancel()
            connlog.closed(self, reason)
            if self.outbound is None and self._pending is not None:
                pending, self._pending = self._pending, None
                if isinstance(pending, Deferred):
                    pending.cancel()
                else:
                    try:
                        pending.stopConnecting()
                    except NotConnectingError:
                        pass
            self._end_partner(reason)
        finally:
            self.factory.relay_closed(self)


class TCPForwardFactory(OutboundDialing, ServerFactory):
    """Accepts connections for one listening endpoint and relays each one.

    The remote and the limits may be swapped by :meth:`update` (a reload that
    changed only those): new connections use the new values, live ones are
    left alone.
    """

    protocol = InboundProtocol
    noisy = False
    log = Logger(namespace="tunnelpass.forward")
    #: UDP sessions sharing this listener's limit (a tunnel's --slot counts both).
    udp_sessions = ()
    #: The process's :class:`~tunnelpass.ops.fdbudget.Descriptors`, if its owner set one.
    descriptors = None
    #: The option that sets ``limits.max_conns``, for the refusal warning.
    limit_name = "max-conns"

    def __init__(self, reactor, name: str, remote_host: str, remote_port: int,
                 limits: Limits, stats: ListenerStats | None = None, clock=None,
                 zero_copy: bool = True, remotes: list | None = None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.name = name
        self.stats = stats or ListenerStats()
        self.zero_copy = zero_copy
        self.relays: set[InboundProtocol] = set()
        #: Legs the relay is closing (cleanly or with a reset) that are not
        #: gone yet; a leg may outlive its relay while it flushes.
        self.closing: set[RelayEnd] = set()
        self._drain_waiters: list[Deferred] = []
        self._refusals = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self._proxy_refusals = Throttle(self.clock, REFUSAL_LOG_INTERVAL)
        self.target_warnings = TargetWarnings(self.clock)  # why a target is unreachable, throttled per target
        self.update(remote_host, remote_port, limits, remotes)

    def update(self, remote_host: str, remote_port: int, limits: Limits, remotes: list | None = None) -> None:
        """*remotes*: a target group (round robin with failover) instead of
        the single remote."""
        self.remote_host, self.remote_port, self.limits = remote_host, remote_port, limits
        targets = list(remotes) if remotes else [(remote_host, remote_port)]
        self.group = TargetGroup(targets, self.clock, strategy=limits.lbs, fallback=limits.fallback)
        # Decided once here, not per connection: literals skip the resolver.
        self._literal = [is_ip_literal(host) for host, _ in targets]
        self.remote = ",".join(format_address(host, port) for host, port in targets)

    def buildProtocol(self, addr):
        if self.limits.accept_proxy:
            return ProxyHeaderProtocol(self)
        return super().buildProtocol(addr)

    def note_proxy_refusal(self, why: str) -> None:
        if self._proxy_refusals.ready():
            self.log.warn("{listener}: refused {count} connection(s) for their PROXY header: {why}",
                          listener=self.name, count=self._proxy_refusals.take_count(), why=why)

    def note_refusal(self) -> None:
        if self._refusals.ready():
            self.log.warn(
                "{listener}: {limit} {max_conns} reached, refused {count} connection(s)",
                listener=self.name, limit=self.limit_name, max_conns=self.limits.max_conns,
                count=self._refusals.take_count(),
            )

    def relay_closed(self, inbound: InboundProtocol) -> None:
        self.relays.discard(inbound)
        self._check_drained()

    def leg_closed(self, end: RelayEnd) -> None:
        self.closing.discard(end)
        self._check_drained()

    def _check_drained(self, force: bool = False) -> None:
        if (force or not (self.relays or self.closing)) and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred:
        """Fire once every live relay (and every leg still closing) has
        ended; after *timeout*, reset what is left and fire at most
        :data:`ABORT_GRACE` later, whether or not everything went."""
        if not (self.relays or self.closing):
            return succeed(None)
        d = Deferred()
        self._drain_waiters.append(d)

        def expired():
            nonlocal deadline
            self.abort_all()
            deadline = self.clock.callLater(ABORT_GRACE, self._drain_expired)

        def cancel_deadline(result):
            if deadline.active():
                deadline.cancel()
            return result

        deadline = self.clock.callLater(timeout, expired)
        d.addBoth(cancel_deadline)
        return d

    def _drain_expired(self) -> None:
        left = len(self.relays) + len(self.closing)
        if left:
            self.log.warn("{listener}: {count} connection(s) still closing after the shutdown timeout; "
                          "not waiting for them", listener=self.name, count=left)
        self._check_drained(force=True)

    def abort_all(self) -> None:
        """Reset every relay and every leg still closing, at once; never raises."""
        for inbound in list(self.relays):
            inbound.abort()
        for end in list(self.closing):
            try:
                end.reset(flush=False)
            except Exception:
                self.log.failure("{listener}: aborting a closing connection failed", listener=self.name)
