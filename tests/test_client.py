"""The client against a real server, in memory (:mod:`tests.memtunnel`):
pool fill and retire, both flows end to end, the listeners, and the TLS
level a client learns from the server."""

from twisted.trial import unittest

from tests import memtunnel
from tests.memtunnel import HOST, PUBLIC_PORT, TARGET_PORT, TUNNEL_PORT, metric, tunnel
from tunnelpass.tunnel.client import TunnelClient


def failures(server, reason):
    return server.failures_by_reason[reason]


class PoolTests(unittest.TestCase):
    def test_fills_to_min_pool_on_both_ends(self):
        net, server, client = tunnel(self, client_overrides=dict(min_pool=5))
        self.assertEqual(metric(client, "server_connected"), 1)
        self.assertEqual(metric(client, "pool_idle"), 5)
        self.assertEqual(metric(client, "pool_dialing"), 0)
        self.assertEqual(metric(server, "pool_idle"), 5)
        self.assertEqual(net.live(TUNNEL_PORT), 1 + 5)  # control + pool
        self.assertEqual(server.handshake_failures, 0)

    def test_max_pool_from_the_server_caps_the_client(self):
        """The server's WELCOME carries its --max-pool: the client never
        aims above it, whatever its own --min-pool says."""
        net, server, client = tunnel(self, server_overrides=dict(max_pool=3), client_overrides=dict(min_pool=8))
        self.assertEqual(metric(client, "pool_idle"), 3)
        self.assertEqual(metric(client, "pool_target"), 3)
        self.assertEqual(net.live(TUNNEL_PORT), 1 + 3)

    def test_receive_flow_relays_and_refills(self):
        net, server, client = tunnel(self, client_overrides=dict(min_pool=2))
        net.listen_echo(TARGET_PORT)
        users = [net.user_connects(PUBLIC_PORT) for _ in range(5)]  # more users than idle connections
        net.settle()
        for i, user in enumerate(users):
            user.transport.write(b"hello %d" % i)
        net.settle()
        self.assertEqual([u.received for u in users], [b"hello %d" % i for i in range(5)])
        # Five claims in one second: the target rises by the demand and the
        # pool is refilled to it, beside the five busy connections; the
        # three users who waited were each asked for (POOL) on top of it.
        self.assertEqual(metric(client, "pool_target"), 2 + 5)
        self.assertEqual(metric(client, "pool_idle"), 2 + 5 + 3)
        self.assertEqual(metric(server, "pool_idle"), metric(client, "pool_idle"))
        self.assertEqual(metric(client, "pool_dialing"), 0)
        self.assertEqual(metric(server, "pool_waiting"), 0)

    def test_surplus_retired_through_the_server_in_the_receive_flow(self):
        """Demand gone, the client asks the server to RETIRE the surplus
        (only the server may close an idle connection in the receive flow:
        it is the side that claims); the server closes them."""
        net, server, client = tunnel(self, client_overrides=dict(min_pool=2))
        net.listen_echo(TARGET_PORT)
        users = [net.user_connects(PUBLIC_PORT) for _ in range(4)]
        net.settle()
        self.assertGreaterEqual(metric(client, "pool_idle"), 2 + 4)
        for user in users:
            user.transport.loseConnection()
        net.settle()
        closed_by_client = net.closed_by("client")
        net.advance(35)  # past the policy's 30-s memory of the demand
        self.assertEqual(metric(client, "pool_target"), 2)
        self.assertEqual(metric(client, "pool_idle"), 2)
        self.assertEqual(metric(server, "pool_idle"), 2)
        self.assertEqual(net.live(TUNNEL_PORT), 1 + 2)
        self.assertEqual(net.closed_by("client"), closed_by_client)  # the server closed every one
        self.assertEqual(server.handshake_failures, 0)

    def test_server_closing_idle_connections_refills(self):
        """Idle pool connections the server drops (its pool timeout, a
        restart of a middlebox) are replaced without a user waiting."""
        net, server, client = tunnel(self, client_overrides=dict(min_pool=3))
        server.stopService()  # closes the session and its idle pool
        net.settle()
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertEqual(metric(client, "pool_idle"), 0)
        self.assertEqual(net.live(TUNNEL_PORT), 0)
        self.assertTrue(net.logged("client_disconnected"))


class SendFlowTests(unittest.TestCase):
    def test_send_flow_relays_through_the_clients_listener(self):
        net, server, client = tunnel(self, server_overrides=dict(flow="send"), client_overrides=dict(min_pool=2))
        net.listen_echo(PUBLIC_PORT)  # the server dials its --target
        self.assertEqual(server.flow, "send")
        users = [net.user_connects(TARGET_PORT) for _ in range(3)]  # the client listens on its --target
        net.settle()
        for i, user in enumerate(users):
            user.transport.write(b"send %d" % i)
        net.settle()
        self.assertEqual([u.received for u in users], [b"send %d" % i for i in range(3)])
        self.assertEqual(metric(client, "pool_dialing"), 0)
        self.assertEqual(metric(client, "pool_idle"), metric(server, "pool_idle"))

    def test_send_flow_closes_its_own_surplus(self):
        """Send flow: this side claims, so it closes idle surplus itself
        (no RETIRE round trip)."""
        net, server, client = tunnel(self, server_overrides=dict(flow="send"), client_overrides=dict(min_pool=2))
        net.listen_echo(PUBLIC_PORT)
        users = [net.user_connects(TARGET_PORT) for _ in range(4)]
        net.settle()
        self.assertEqual(metric(client, "pool_idle"), 6)
        for user in users:
            user.transport.loseConnection()
        net.settle()
        closed_by_server = net.closed_by("server")
        net.advance(35)
        self.assertEqual(metric(client, "pool_idle"), 2)
        self.assertEqual(metric(server, "pool_idle"), 2)
        self.assertEqual(net.live(TUNNEL_PORT), 1 + 2)
        self.assertEqual(net.closed_by("server"), closed_by_server)  # the client closed every one

    def test_send_flow_bind_failure_is_an_error_and_no_session(self):
        """The client's --target cannot be bound: a clear error naming the
        address, and the session is given up (not left half working)."""
        net, server, client = tunnel(self, server_overrides=dict(flow="send"), start_client=False)
        net.reactor.busy_ports.add(TARGET_PORT)
        memtunnel.start(client)
        net.settle()
        texts = [t for t in net.texts() if "cannot listen" in t]
        self.assertTrue(texts, net.texts())
        self.assertIn(f"{HOST}:{TARGET_PORT}", texts[0])
        self.assertIn("in use", texts[0])
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertEqual(metric(server, "client_connected"), 0)
        # Once the port is free, the next attempt listens and relays.
        net.reactor.busy_ports.clear()
        net.listen_echo(PUBLIC_PORT)
        net.advance(5)
        self.assertEqual(metric(client, "server_connected"), 1)
        user = net.user_connects(TARGET_PORT)
        user.transport.write(b"after")
        net.settle()
        self.assertEqual(user.received, b"after")

    def test_client_insisting_on_the_other_flow_refuses_the_session(self):
        net, server, client = tunnel(self, client_overrides=dict(flow="send"))
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertTrue(any("--flow send" in t for t in net.texts()), net.texts())
        self.assertEqual(net.live(TUNNEL_PORT), 0)


class LocalFlowTests(unittest.TestCase):
    def test_local_forwarding_without_a_server(self):
        net = memtunnel.MemNet()
        self.addCleanup(net.close)
        client = memtunnel.start(TunnelClient(memtunnel.client_settings(flow="local"), net.reactor))
        self.addCleanup(memtunnel.stop, net, client)
        net.listen_echo(TARGET_PORT)
        user = net.user_connects(TUNNEL_PORT)  # --tunnel is the local listener here
        user.transport.write(b"local")
        net.settle()
        self.assertEqual(user.received, b"local")
        self.assertEqual(net.pending(TUNNEL_PORT), 0)  # no server is dialled

    def test_local_listener_bind_failure_stops_the_start(self):
        net = memtunnel.MemNet()
        self.addCleanup(net.close)
        net.reactor.busy_ports.add(TUNNEL_PORT)
        client = TunnelClient(memtunnel.client_settings(flow="local"), net.reactor)
        memtunnel._disarm(client)
        try:
            with self.assertRaises((SystemExit, Exception)) as caught:
                client.privilegedStartService()
        finally:
            signals = getattr(client, "signals", None)
            if signals is not None:
                signals.restore()
        self.assertIn(f"{HOST}:{TUNNEL_PORT}", str(caught.exception))
        self.assertIn("--tunnel", str(caught.exception))


class TLSLevelTests(unittest.TestCase):
    def test_plain_client_learns_level_1_and_retries_at_once(self):
        """No --tls/--pin: the first HELLO goes in clear, the server answers
        "TLS required (level 1)", and the next attempt -- without waiting --
        is TLS; the pool follows the session's level."""
        net, server, client = tunnel(self, server_overrides=dict(tls=1), client_overrides=dict(min_pool=2))
        self.assertEqual(metric(client, "server_connected"), 1)
        connected = net.logged("client_connected")
        self.assertEqual([e["tls"] for e in connected if "tls" in e], [1])
        self.assertEqual(failures(server, "no_tls"), 1)
        self.assertEqual(server.handshake_failures, 1)  # the plain HELLO only: every pool connection passed
        self.assertEqual(metric(client, "pool_idle"), 2)
        self.assertEqual(metric(server, "pool_idle"), 2)
        self.assertTrue(any("requires TLS level 1" in t for t in net.texts()), net.texts())
        net.listen_echo(TARGET_PORT)
        user = net.user_connects(PUBLIC_PORT)
        user.transport.write(b"over TLS")
        net.settle()
        self.assertEqual(user.received, b"over TLS")

    def test_pinned_client_to_level_1(self):
        net, server, client = tunnel(self, server_overrides=dict(tls=1), start_client=False)
        client = memtunnel.start(TunnelClient(memtunnel.client_settings(pin=server.fingerprint, min_pool=2),
                                              net.reactor))
        self.addCleanup(memtunnel.stop, net, client)
        net.settle()
        self.assertEqual(metric(client, "server_connected"), 1)
        self.assertEqual(server.handshake_failures, 0)  # no plain attempt first: the pin says TLS
        self.assertEqual(metric(server, "pool_idle"), 2)

    def test_wrong_pin_never_connects(self):
        net, server, client = tunnel(self, server_overrides=dict(tls=1),
                                     client_overrides=dict(pin=b"\x01" * 32), settle=False)
        net.advance(10)
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertEqual(metric(server, "client_connected"), 0)
        self.assertGreaterEqual(failures(server, "tls"), 1)
        self.assertTrue(any("TLS handshake with the server failed" in t for t in net.texts()), net.texts())

    def test_tls_offered_to_a_plain_server_is_refused(self):
        """--tls 1 at a tls=0 server: the server refuses the TLS hello (it
        speaks no TLS), counts it, and no session starts."""
        net, server, client = tunnel(self, server_overrides=dict(tls=0), client_overrides=dict(tls=1),
                                     settle=False)
        net.advance(4)
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertGreaterEqual(failures(server, "tls"), 1)
        self.assertEqual(net.live(TUNNEL_PORT), 0)
        self.assertTrue(net.logged("server_unreachable") or any("TLS" in t for t in net.texts()))
