"""Replaced sessions and fights over one key: the sans-IO detector with
explicit times, the logging adapter, and the server's wiring."""

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from tests.test_server import KEY, make_server
from tunnelpass.wire.codec import FrameDecoder
from tunnelpass.wire.handshake import ClientHandshake
from tunnelpass.tunnel.replacement import FightDetector, SessionReplacements
from tunnelpass.tunnel.gate import _GateFactory

A, B = ("192.0.2.1", 40001), ("198.51.100.7", 50002)


class DetectorTests(unittest.TestCase):
    def test_three_contested_replacements_within_the_window_are_a_fight(self):
        detector = FightDetector()
        self.assertIsNone(detector.replaced(0.0, A, B, True))
        self.assertIsNone(detector.replaced(1.5, B, A, True))
        fight = detector.replaced(3.0, A, B, True)
        self.assertEqual(fight.clients, ("192.0.2.1", "198.51.100.7"))
        self.assertEqual(fight.replacements, 3)

    def test_reported_once_per_episode(self):
        detector = FightDetector()
        now, fights = 0.0, []
        for i in range(40):  # a fight every 1.5 s for a minute
            fights.append(detector.replaced(now, (A, B)[i % 2], (B, A)[i % 2], True))
            now += 1.5
        self.assertEqual(sum(f is not None for f in fights), 1)
        now += 60  # quiet for a whole window: that episode is over
        fights = [detector.replaced(now + i, (A, B)[i % 2], (B, A)[i % 2], True) for i in range(3)]
        self.assertEqual([f is not None for f in fights], [False, False, True])

    def test_spread_out_replacements_are_no_fight(self):
        detector = FightDetector()
        for i in range(10):  # one every 40 s: never three within 60 s
            self.assertIsNone(detector.replaced(40.0 * i, (A, B)[i % 2], (B, A)[i % 2], True))

    def test_a_client_reconnecting_over_its_dead_session_is_no_fight(self):
        detector = FightDetector()
        for i in range(6):  # the old session was silent: not taken from a live client
            self.assertIsNone(detector.replaced(2.0 * i, ("192.0.2.1", 40000 + i), ("192.0.2.1", 40001 + i), False))

    def test_two_clients_on_one_host_are_named_by_port(self):
        detector = FightDetector()
        events = [(("127.0.0.1", 1000), ("127.0.0.1", 2000)), (("127.0.0.1", 2000), ("127.0.0.1", 1001)),
                  (("127.0.0.1", 1001), ("127.0.0.1", 2001))]
        fight = [detector.replaced(float(i), old, new, True) for i, (old, new) in enumerate(events)][-1]
        self.assertEqual(fight.clients, ("127.0.0.1:1001", "127.0.0.1:2001"))


class _Control:
    """What the adapter reads of a control protocol."""

    def __init__(self, address, last_heard, heartbeat=5.0):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", *address))
        self.last_heard, self.heartbeat = last_heard, heartbeat


class AdapterTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.replacements = SessionReplacements(self.clock)
        self.replacements.log = Logger(observer=self.events.append)

    def test_replacement_warned_with_both_addresses(self):
        self.clock.advance(100)
        self.replacements.replaced(_Control(A, last_heard=99.0), _Control(B, last_heard=100.0))
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual((event["event"], event["old"], event["new"], event["old_alive"]),
                         ("session_replaced", "192.0.2.1:40001", "198.51.100.7:50002", True))
        self.assertIn("two clients may be using this key", formatEvent(event))
        self.assertEqual(self.replacements.count, 1)

    def test_silent_old_session_said_to_be_a_reconnect(self):
        self.clock.advance(100)
        self.replacements.replaced(_Control(A, last_heard=85.0), _Control(A, last_heard=100.0))
        self.assertIn("silent for 15 s: probably the same client reconnecting", formatEvent(self.events[0]))
        self.assertFalse(self.events[0]["old_alive"])

    def test_fight_warned_once_and_replacements_throttled(self):
        for i in range(20):  # every second, each client alive
            self.clock.advance(1)
            now = self.clock.seconds()
            self.replacements.replaced(_Control((A, B)[i % 2], now - 1), _Control((B, A)[i % 2], now))
        fights = [e for e in self.events if e["event"] == "session_fight"]
        replaced = [e for e in self.events if e["event"] == "session_replaced"]
        self.assertEqual(len(fights), 1)
        self.assertEqual(formatEvent(fights[0]),
                         "two clients are using the same key and take the session from each other: 192.0.2.1 and "
                         "198.51.100.7; stop one of them or give each its own server/key (3 replacements within 60 s)")
        self.assertEqual([e["count"] for e in replaced], [1, 10], "one line per 10 s, the rest counted")
        self.assertEqual(self.replacements.count, 20)


def authenticate_from(server, host: str, port: int):
    """A real control handshake through the server's gate from host:port."""
    protocol = _GateFactory(server).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    client = ClientHandshake(KEY.encode(), b"")
    protocol.dataReceived(client.start())
    decoder = FrameDecoder()
    while client.session is None:
        frames = decoder.feed(transport.value())
        transport.clear()
        for frame in frames:
            for reply in client.receive(frame):
                protocol.dataReceived(reply)
    return protocol, transport


class ServerTests(unittest.TestCase):
    def test_two_clients_fighting_over_one_key(self):
        server = make_server()
        events = []
        server.replacements.log = Logger(observer=events.append)
        health = []
        server.log = Logger(observer=health.append)
        authenticate_from(server, *A)
        for i in range(3):
            server.clock.advance(1.5)
            authenticate_from(server, *(B, A)[i % 2])
        self.assertEqual(server.replacements.count, 3)
        self.assertEqual([e["event"] for e in events],
                         ["session_replaced", "session_fight"])
        self.assertEqual(events[1]["addresses"], ["192.0.2.1", "198.51.100.7"])
        server.report()
        line = formatEvent([e for e in health if e.get("event") == "health"][0])
        self.assertIn("session_replacements=3", line)
        self.assertIn("connect_failures=0", line)
        samples = {s.name: s.value for s in server.metrics()}
        self.assertEqual(samples["session_replacements"], 3)
