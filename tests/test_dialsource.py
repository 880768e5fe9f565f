"""tunnelpass.relay.dialsource: --dial (source address, family) and the routing of
every target dial (TCP relay, UDP sessions, options) through the instance's
Dialer and its --dns cache."""

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tests.test_namecache import Lookups, result
from tests.test_udptunnel import FakeReactor
from tunnelpass import tap
from tunnelpass.relay.dialsource import Dialer, DialSourceError, check_target, parse_dial
from tunnelpass.relay.namecache import NameCache
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits
from tunnelpass.ops.stats import ListenerStats
from tunnelpass.relay.udp import UDPForwardProtocol
from tunnelpass.tunnel.udpegress import UDPEgress
from tunnelpass.config.urls import parse_url

KEY = "dial-test-key-0123456789abcdef"


def dialer(clock, source=None, ttl=300):
    lookups = Lookups()
    return Dialer(clock, source, NameCache(lookups, clock, ttl)), lookups


class ParseTests(unittest.TestCase):
    def test_auto_and_empty_mean_the_kernels_choice(self):
        for text in ("auto", "", " AUTO "):
            self.assertIsNone(parse_dial(text))

    def test_local_addresses_accepted_normalized(self):
        self.assertEqual(parse_dial("127.0.0.2"), "127.0.0.2")
        self.assertEqual(parse_dial("[0::1]"), "::1")

    def test_an_address_not_of_this_host_is_one_clear_line(self):
        with self.assertRaises(ValueError) as caught:
            parse_dial("192.0.2.1")
        self.assertEqual(str(caught.exception), "192.0.2.1 is not an address of this host "
                                                "(bind: Cannot assign requested address (EADDRNOTAVAIL))")

    def test_not_an_ip(self):
        self.assertRaisesRegex(ValueError, "is not an IP address", parse_dial, "eth0")

    def test_literal_target_of_the_other_family(self):
        self.assertRaisesRegex(ValueError, r"--dial 127.0.0.2 is IPv4 but target \[::1\]:80 is IPv6",
                               check_target, "127.0.0.2", "::1", 80)
        check_target("127.0.0.2", "127.0.0.3", 80)
        check_target("127.0.0.2", "db.example", 80)  # a name: checked when dialled
        check_target(None, "::1", 80)


class DialerTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_a_name_of_only_the_other_family_fails_with_the_reason(self):
        d, lookups = dialer(self.reactor, "127.0.0.2")
        failure = []
        d.addresses("v6only.example").addErrback(failure.append)
        lookups.answer(["2001:db8::1", "2001:db8::2"])
        failure[0].trap(DialSourceError)
        self.assertEqual(failure[0].getErrorMessage(), "target v6only.example resolves only to IPv6 "
                                                       "(2001:db8::1, 2001:db8::2) but --dial 127.0.0.2 is IPv4")

    def test_addresses_of_the_other_family_are_skipped(self):
        d, lookups = dialer(self.reactor, "::1")
        got = d.addresses("dual.example")
        lookups.answer(["10.0.0.1", "2001:db8::1"])
        self.assertEqual(result(got), ["2001:db8::1"])

    def test_tcp_to_a_name_dials_the_cached_address_from_the_source(self):
        d, lookups = dialer(self.reactor, "127.0.0.2")
        d.connect_tcp("db.example", 5432, Factory.forProtocol(Protocol), 5)
        lookups.answer(["127.0.0.3"])
        d.connect_tcp("db.example", 5432, Factory.forProtocol(Protocol), 5)
        self.reactor.advance(1)  # Happy Eyeballs starts its attempts on the clock
        self.assertEqual([(h, p, b) for h, p, _, _, b in self.reactor.tcpClients],
                         [("127.0.0.3", 5432, ("127.0.0.2", 0))] * 2)
        self.assertEqual(len(lookups.queries), 1)

    def test_udp_binds_the_source(self):
        d, _ = dialer(self.reactor, "127.0.0.2")
        self.assertEqual(d.udp_interface("127.0.0.3"), "127.0.0.2")
        auto, _ = dialer(self.reactor)
        self.assertEqual((auto.udp_interface("127.0.0.3"), auto.udp_interface("::1")), ("0.0.0.0", "::"))


class RelayDialTests(unittest.TestCase):
    """The TCP relay (forward, server send flow, client receive flow) dials through limits.dialer."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reasons = []

    def factory(self, host, source=None):
        self.dialer, self.lookups = dialer(self.reactor, source)
        factory = TCPForwardFactory(self.reactor, "t", host, 80, Limits(connect_timeout=3, dialer=self.dialer))
        return factory

    def accept(self, factory):
        inbound = factory.buildProtocol(None)
        original = inbound.connect_failed
        inbound.connect_failed = lambda reason: self.reasons.append(reason.getErrorMessage()) or original(reason)
        transport = RelayTransport()
        inbound.makeConnection(transport)
        return inbound, transport

    def test_literal_target_dialled_from_the_source(self):
        factory = self.factory("127.0.0.3", "127.0.0.2")
        self.accept(factory)
        self.assertEqual(self.reactor.tcpClients[0][4], ("127.0.0.2", 0))
        self.assertEqual(self.lookups.queries, [])

    def test_named_target_looked_up_once_per_ttl(self):
        factory = self.factory("db.example")
        self.accept(factory)
        self.lookups.answer(["127.0.0.3"])
        self.accept(factory)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.lookups.queries), 1)
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("127.0.0.3", 80)] * 2)
        self.reactor.advance(300)
        self.accept(factory)
        self.assertEqual(len(self.lookups.queries), 2)

    def test_a_name_none_of_whose_addresses_answer_is_looked_up_again(self):
        """A connect that fails at every cached address drops the entry, so
        a name moved by DNS failover is not dialled at its old address for
        the rest of the TTL."""
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        factory = self.factory("db.example")
        self.accept(factory)
        self.lookups.answer(["127.0.0.3"])
        self.reactor.advance(0.5)
        host, port, client_factory, _, _ = self.reactor.tcpClients[0]
        client_factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.reactor.advance(0.5)
        self.assertEqual(factory.stats.connect_failures, 1)
        self.accept(factory)
        self.assertEqual(len(self.lookups.queries), 2, "asked again at once, within the TTL")

    def test_name_of_the_other_family_is_a_connect_failure(self):
        factory = self.factory("v6only.example", "127.0.0.2")
        inbound, transport = self.accept(factory)
        self.lookups.answer(["::1"])
        self.assertEqual(factory.stats.connect_failures, 1)
        self.assertEqual(self.reasons,
                         ["target v6only.example resolves only to IPv6 (::1) but --dial 127.0.0.2 is IPv4"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.tcpClients, [], "nothing dialled")

    def test_literal_of_the_other_family_is_a_connect_failure(self):
        # a forwarder rule reloaded with an IPv6 remote under an IPv4 --dial
        factory = self.factory("::1", "127.0.0.2")
        inbound, transport = self.accept(factory)
        self.assertEqual(factory.stats.connect_failures, 1)
        self.assertEqual(self.reasons, ["target ::1 is IPv6 but --dial 127.0.0.2 is IPv4"])
        self.assertEqual(self.reactor.tcpClients, [])


class Recorder(DatagramProtocol):
    """A UDP target that answers with the address it saw."""

    def datagramReceived(self, datagram, addr):
        self.transport.write(addr[0].encode(), addr)


class Client(DatagramProtocol):
    def __init__(self):
        self.replies = Deferred()

    def datagramReceived(self, datagram, addr):
        self.replies.callback(datagram)


class UDPDialTests(unittest.TestCase):
    async def test_forwarder_session_leaves_from_the_source(self):
        target = reactor.listenUDP(0, Recorder(), interface="127.0.0.3")
        self.addCleanup(target.stopListening)
        d = Dialer.create(reactor, "127.0.0.2")
        forwarder = UDPForwardProtocol(reactor, "u", "127.0.0.3", target.getHost().port, Limits(dialer=d))
        listening = reactor.listenUDP(0, forwarder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        client = Client()
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.write(b"who am i", ("127.0.0.1", listening.getHost().port))
        self.assertEqual(await client.replies.addTimeout(5, reactor), b"127.0.0.2")

    def test_egress_session_binds_the_source_and_uses_the_cache(self):
        fake = InterfaceReactor()
        d, lookups = dialer(fake, "127.0.0.2")
        egress = UDPEgress(fake, "target", [("dns.example", 53)], Limits(udp_idle=30.0, dialer=d),
                           ListenerStats(), 65535)
        egress.open(None).makeConnection(RelayTransport())
        lookups.answer(["127.0.0.3"])
        egress.open(None).makeConnection(RelayTransport())
        self.assertEqual(len(lookups.queries), 1, "the second session's lookup came from the cache")
        self.assertEqual([p.connected_to for p in fake.ports], [("127.0.0.3", 53)] * 2)
        self.assertEqual(fake.interfaces, ["127.0.0.2"] * 2)


class InterfaceReactor(FakeReactor):
    """Records the interface each UDP socket is bound to."""

    def __init__(self):
        super().__init__()
        self.interfaces = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.interfaces.append(interface)
        return super().listenUDP(port, protocol, interface, maxPacketSize)


class OptionTests(unittest.TestCase):
    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_dial_not_of_this_host_refused_at_startup(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2",
                       "--key", KEY, "--dial", "192.0.2.1")
        self.assertIn("--dial: 192.0.2.1 is not an address of this host", str(caught.exception))

    def test_literal_target_of_the_other_family_refused_at_startup(self):
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2,[::1]:3",
                       "--key", KEY, "--dial", "127.0.0.2")
        self.assertIn("--dial 127.0.0.2 is IPv4 but target [::1]:3 is IPv6", str(caught.exception))

    def test_url_keys(self):
        self.assertEqual({k: v for k, v in parse_url(f"client://{KEY}@127.0.0.1:1/db.example:2?dial=&dns=30s")
                          .items() if k in ("dial", "dns")}, {"dial": "", "dns": "30s"})
        options = self.parse(f"server://{KEY}@127.0.0.1:1/127.0.0.3:2?dial=127.0.0.2&dns=0")
        self.assertEqual((options["dial"], options["dns"]), ("127.0.0.2", 0.0))

    def test_one_dialer_per_instance_with_the_options(self):
        options = self.parse("--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "db.example:2",
                             "--key", KEY, "--dial", "127.0.0.2", "--dns", "30s")
        limits = tap._tunnel_limits(options, MemoryReactorClock())
        self.assertEqual((limits.dialer.source, limits.dialer.cache.ttl), ("127.0.0.2", 30.0))
        defaults = self.parse("--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "db.example:2", "--key", KEY)
        limits = tap._tunnel_limits(defaults, MemoryReactorClock())
        self.assertEqual((limits.dialer.source, limits.dialer.cache.ttl), (None, 300.0))

    def test_forward_rule_of_the_other_family_refused_at_startup(self):
        rules = os.path.join(self.mktemp() + ".conf")
        with open(rules, "w") as f:
            f.write("127.0.0.1:18080 | 127.0.0.3 | 80\n127.0.0.1:18081 | ::1 | 80\n")
        options = self.parse("--mode", "forward", "--config", rules, "--dial", "127.0.0.2")
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options, MemoryReactorClock())
        self.assertEqual(str(caught.exception),
                         f"tunnelpass: {rules}:2: --dial 127.0.0.2 is IPv4 but target [::1]:80 is IPv6: "
                         "give a source address of the target's family")
