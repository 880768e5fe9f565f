"""A whole tunnel in memory: a real :class:`~tunnelpass.tunnel.server.TunnelServer`
and a real :class:`~tunnelpass.tunnel.client.TunnelClient` on one
``MemoryReactorClock``, their connections joined by :mod:`twisted.test.iosim`.

Both services are started as twistd would start them (privileged start,
start, the reactor "running"); every ``connectTCP`` either service makes is
routed to whatever factory listens on that port in the same reactor (the
server's gate, the server's or client's public listener, a test's echo
target), or refused like a closed port.  :meth:`MemNet.settle` moves bytes
on every connection and runs due calls until nothing moves; time moves only
when a test says so (:meth:`MemNet.advance`).  TLS is real (pyOpenSSL over
the memory transports), so pinning, channel binding and the level fallback
are exercised as they are on sockets.

The tests drive and observe the services through their public surface only
(settings, start/stop, connections, metrics, log events), so they hold
across refactors of the modules inside.
"""

from __future__ import annotations

import itertools

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, _FakePort
from twisted.logger import globalLogPublisher
from twisted.protocols import tls as tls_protocols
from twisted.python.failure import Failure
from twisted.test import iosim

from zope.interface.interface import adapter_hooks

from tunnelpass.tunnel.client import ClientSettings, TunnelClient
from tunnelpass.tunnel.server import ServerSettings, TunnelServer
from tunnelpass.carriers.stream import IStream, TCPStream

KEY = "memtunnel-test-key-0123456789abcdef"
HOST = "127.0.0.1"
TUNNEL_PORT = 7000  # the server's --tunnel
PUBLIC_PORT = 7001  # the server's --target (receive flow: users connect here)
TARGET_PORT = 7002  # the client's --target (receive flow: dialled; send flow: listened on)

_ports = itertools.count(40000)


class MemReactor(MemoryReactorClock):
    """A memory reactor whose ``listenTCP`` can be made to fail for chosen
    ports (a port someone else holds), like a real bind."""

    def __init__(self):
        super().__init__()
        self.busy_ports: set[int] = set()
        self.udpPorts: dict = {}

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy_ports:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        """UDP beside TCP: recorded (``udpPorts``) and never delivered to."""
        if port in self.busy_ports:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.udpPorts[port] = protocol
        return _FakePort(IPv4Address("UDP", interface or "0.0.0.0", port))


class MemTransport(iosim.FakeTransport):
    """iosim's transport, with what the tunnel asks of a TCP transport:
    ``connected``, a connector told when the connection ends (as Twisted's
    own client connections are), and who closed it (``closed_here``).

    Like Twisted's TCP transport it does not provide
    :class:`~tunnelpass.carriers.stream.IStream` itself but is adapted to it
    (:class:`MemStream`): a TLS wrapper copies the interfaces its transport
    provides, and would then pass for a plain stream."""

    factory = connector = None
    closed_here = False  # this end closed the connection (not its peer)

    @property
    def connected(self) -> bool:
        return not self.disconnected

    def loseConnection(self):
        self.closed_here = self.closed_here or not self.disconnecting
        super().loseConnection()

    def abortConnection(self):
        self.closed_here = self.closed_here or not self.disconnecting
        super().abortConnection()

    def reportDisconnect(self):
        super().reportDisconnect()
        if self.factory is not None and hasattr(self.factory, "clientConnectionLost"):
            self.factory.clientConnectionLost(self.connector, Failure(ConnectionDone()))


class MemStream(TCPStream):
    """:class:`~tunnelpass.carriers.stream.IStream` for :class:`MemTransport`:
    as Twisted's TCP transport (hand-over, no certificates), but no
    half-close (a relay closes both directions), never paused (iosim does
    not pause producers), no socket (the copy relay)."""

    half_closes = False

    def consumer_paused(self) -> bool:
        return False

    def unsent(self) -> int:
        return sum(map(len, self.transport.stream))

    def native_end(self):
        return None

    def set_write_buffer(self, size: int) -> None:
        pass


def _adapt(interface, transport):
    if interface is IStream and isinstance(transport, MemTransport):
        return MemStream(transport)
    return None


adapter_hooks.append(_adapt)


class Echo(Protocol):
    """A target: echoes what it reads."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class User(Protocol):
    """A user's end of a connection: collects what it reads."""

    def __init__(self):
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class MemNet:
    """The reactor, its routed connections, and the log both ends write."""

    def __init__(self):
        self.reactor = MemReactor()
        self.reactor.running = True  # callWhenRunning runs at once, as in a running twistd
        self.pumps: list[iosim.IOPump] = []
        self.held: set[int] = set()  # ports whose connection attempts stay pending
        self.down: set[int] = set()  # ports refusing connections (a server that is down)
        self.blackholed: set[int] = set()  # ports whose connections lose every byte
        self.refusals: list[tuple[int, float]] = []  # (port, when) of each refused attempt
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        # Twisted's TLS transport coalesces small writes with a callLater on
        # the factory's clock, and the tunnel's TLS factories are made
        # without one (so: the global reactor, which does not run here).
        self._default_clock = tls_protocols._get_default_clock
        tls_protocols._get_default_clock = lambda: self.reactor

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)
        tls_protocols._get_default_clock = self._default_clock

    # Wiring

    def listener(self, port: int):
        for listen_port, factory, _backlog, _interface in reversed(self.reactor.tcpServers):
            if listen_port == port:
                return factory
        return None

    def listen_echo(self, port: int = TARGET_PORT) -> None:
        self.reactor.listenTCP(port, Factory.forProtocol(Echo))

    def join(self, client_protocol, server_protocol, port: int, client_factory=None, connector=None):
        """Connect two protocols as if *client_protocol* had dialled *port*."""
        client_address = IPv4Address("TCP", HOST, next(_ports))
        server_address = IPv4Address("TCP", HOST, port)
        client_transport = MemTransport(client_protocol, False, client_address, server_address)
        client_transport.factory, client_transport.connector = client_factory, connector
        server_transport = MemTransport(server_protocol, True, server_address, client_address)
        pump = iosim.connect(server_protocol, server_transport, client_protocol, client_transport,
                             greet=False, clock=self.reactor)
        pump.port = port
        self.pumps.append(pump)
        return pump

    def user_connects(self, port: int = PUBLIC_PORT) -> User:
        """A user connects to whatever listens on *port*."""
        user = User()
        factory = self.listener(port)
        assert factory is not None, f"nothing listens on {port}"
        protocol = factory.buildProtocol(IPv4Address("TCP", HOST, next(_ports)))
        self.join(user, protocol, port)
        return user

    def _route(self) -> bool:
        """Complete (or refuse) every pending connection attempt not held."""
        moved = False
        index = 0
        while index < len(self.reactor.tcpClients):
            if self.reactor.tcpClients[index][1] in self.held:
                index += 1
                continue
            self._connect_at(index)
            moved = True
        return moved

    def pending(self, port: int = TUNNEL_PORT) -> int:
        """Connection attempts to *port* not completed yet."""
        return sum(1 for attempt in self.reactor.tcpClients if attempt[1] == port)

    def complete(self, which: int, port: int = TUNNEL_PORT) -> None:
        """Complete one held attempt to *port*: *which* indexes them, oldest
        first (-1: the newest)."""
        indexes = [i for i, attempt in enumerate(self.reactor.tcpClients) if attempt[1] == port]
        self._connect_at(indexes[which])
        self.settle()

    def _connect_at(self, index: int) -> None:
        reactor = self.reactor
        host, port, factory, _timeout, _bind = reactor.tcpClients.pop(index)
        connector = reactor.connectors.pop(index)
        listening = None if port in self.down else self.listener(port)
        if listening is None:
            self.refusals.append((port, reactor.seconds()))
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return
        client_protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        server_protocol = listening.buildProtocol(IPv4Address("TCP", HOST, 0))
        self.join(client_protocol, server_protocol, port, factory, connector)

    def cut(self, port: int = TUNNEL_PORT) -> None:
        """Every live connection to *port* ends abruptly (both ends see it)."""
        for pump in self.pumps:
            if pump.port == port:
                pump.clientIO.abortConnection()
        self.settle()

    def closed_by(self, side: str, port: int = TUNNEL_PORT) -> int:
        """Connections to *port* that the dialling side (``"client"``) or
        the listening side (``"server"``) closed."""
        return sum(1 for pump in self.pumps if pump.port == port
                   and (pump.clientIO if side == "client" else pump.serverIO).closed_here)

    def live(self, port: int = TUNNEL_PORT) -> int:
        """Connections to *port* neither end has closed."""
        return sum(1 for pump in self.pumps
                   if pump.port == port and not (pump.clientIO.disconnecting or pump.serverIO.disconnecting))

    # Time and bytes

    def settle(self) -> None:
        """Route, move bytes and run due calls until nothing moves."""
        for _ in range(10_000):
            self.reactor.advance(0)
            moved = self._route()
            for pump in list(self.pumps):
                if pump.port in self.blackholed:
                    pump.clientIO.getOutBuffer(), pump.serverIO.getOutBuffer()  # lost on the way
                if pump.pump(advanceClock=False):
                    moved = True
            if not moved:
                return
        raise AssertionError("the tunnel never settled")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let *seconds* pass in steps, settling after each."""
        self.settle()
        left = seconds
        while left > 1e-9:
            now = min(step, left)
            self.reactor.advance(now)
            left -= now
            self.settle()

    def logged(self, event: str, side: str | None = None) -> list[dict]:
        """Log events with the ``event`` field *event*; from one *side*
        (``"client"``, ``"server"``) only, if given."""
        return [e for e in self.events if e.get("event") == event
                and (side is None or f".{side}" in e.get("log_namespace", ""))]

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]


def server_settings(**overrides) -> ServerSettings:
    values = dict(tunnel_host=HOST, tunnel_port=TUNNEL_PORT, target_host=HOST, target_port=PUBLIC_PORT, key=KEY,
                  zero_copy=False, report_interval=0)
    values.update(overrides)
    return ServerSettings(**values)


def client_settings(**overrides) -> ClientSettings:
    values = dict(server_host=HOST, server_port=TUNNEL_PORT, target_host=HOST, target_port=TARGET_PORT, key=KEY,
                  min_pool=4, max_pool=16, zero_copy=False, report_interval=0)
    values.update(overrides)
    return ClientSettings(**values)


def _never_exit():
    raise AssertionError("a stop did not finish in time (the watchdog would have ended the process)")


def _disarm(service) -> None:
    """A stop that hangs must fail the test, not end the trial process."""
    signals = getattr(service, "signals", None)
    watchdog = getattr(signals, "watchdog", None)
    if watchdog is not None:
        watchdog.last_resort = _never_exit


def start(service):
    _disarm(service)
    service.privilegedStartService()
    service.startService()
    return service


def stop(net: MemNet, *services) -> None:
    """Stop *services* (in order) and let their stops complete."""
    results = []
    for service in services:
        if service.running:
            d = service.stopService()
            if d is not None:
                d.addBoth(results.append)
    net.advance(12)
    for result in results:
        if isinstance(result, Failure):
            result.raiseException()


def tunnel(test, server_overrides=None, client_overrides=None, start_client=True, settle=True):
    """A server and a client on one MemNet, started, stopped at cleanup."""
    net = MemNet()
    test.addCleanup(net.close)
    server = start(TunnelServer(server_settings(**(server_overrides or {})), net.reactor))
    client = TunnelClient(client_settings(**(client_overrides or {})), net.reactor)
    test.addCleanup(stop, net, client, server)
    if start_client:
        start(client)
        if settle:
            net.settle()
    return net, server, client


def metric(service, name: str):
    for sample in service.metrics():
        if sample.name == name and not sample.labels:
            return sample.value
    raise KeyError(name)
