"""The client's session with a real server, in memory (:mod:`tests.memtunnel`):
a session replaced while pool connections are being dialled, losing the
server and coming back with backoff, a silent server, a wrong key, a second
client with the same key, and the stop."""

from twisted.trial import unittest

from tests import memtunnel
from tests.memtunnel import TUNNEL_PORT, metric, tunnel
from tunnelpass.tunnel.client import TunnelClient


class ReplacedWhileDiallingTests(unittest.TestCase):
    def test_connections_dialled_for_an_old_session_are_closed_not_filed(self):
        net, server, client = tunnel(self, client_overrides=dict(min_pool=3), start_client=False)
        net.held.add(TUNNEL_PORT)
        memtunnel.start(client)
        net.settle()
        net.complete(0)  # the control connection only: session 1, three pool dials left hanging
        self.assertEqual(metric(client, "server_connected"), 1)
        self.assertEqual(net.pending(TUNNEL_PORT), 3)
        self.assertEqual(metric(client, "pool_dialing"), 3)
        net.cut(TUNNEL_PORT)  # session 1 ends; its three dials are still under way
        self.assertEqual(metric(client, "server_connected"), 0)
        net.advance(4)  # the reconnect delay
        self.assertEqual(net.pending(TUNNEL_PORT), 4)
        net.complete(-1)  # the new control connection: session 2
        self.assertEqual(metric(client, "server_connected"), 1)
        old_session_failures = server.handshake_failures
        net.held.clear()
        net.settle()  # the old dials connect now (and are closed)
        self.assertEqual(metric(client, "pool_idle"), 0)
        self.assertEqual(metric(server, "pool_idle"), 0)
        net.advance(1)  # the refill tick: the new session's own connections
        # The old session's connections were closed without a POOL_AUTH
        # (the server would have refused one: no such session) and none
        # went into the pool; the new session's pool is exactly its own.
        self.assertEqual(metric(client, "pool_idle"), 3)
        self.assertEqual(metric(server, "pool_idle"), 3)
        self.assertEqual(net.live(TUNNEL_PORT), 1 + 3)
        self.assertEqual(metric(client, "pool_dialing"), 0)  # every dial accounted for
        self.assertEqual(server.handshake_failures - old_session_failures, 3)  # closed before any frame
        self.assertEqual(server.failures_by_reason["pool_auth"], 0)


class ReconnectTests(unittest.TestCase):
    def test_lost_server_is_retried_with_growing_delays_then_reconnected(self):
        net, server, client = tunnel(self, client_overrides=dict(min_pool=2))
        net.down.add(TUNNEL_PORT)
        lost_at = net.reactor.seconds()
        net.cut(TUNNEL_PORT)
        lost = net.logged("client_disconnected", "client")
        self.assertEqual(len(lost), 1)
        self.assertEqual(lost[0]["log_level"].name, "warn")
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertEqual(metric(client, "pool_idle"), 0)
        net.advance(30, step=0.05)
        attempts = [when for port, when in net.refusals if port == TUNNEL_PORT]
        # Capped, jittered exponential backoff (from 0.5 s up to 3 s): the
        # first retry at once, then a dozen in 30 s, not one per tick.
        self.assertLessEqual(attempts[0] - lost_at, 0.6)
        self.assertGreaterEqual(len(attempts), 8)
        self.assertLessEqual(len(attempts), 20)
        late_gaps = [b - a for a, b in zip(attempts[-6:], attempts[-5:])]
        self.assertGreaterEqual(min(late_gaps), 1.4)  # at the cap: jittered within its upper half
        self.assertLessEqual(max(late_gaps), 3.6)
        net.down.clear()
        net.advance(4)
        self.assertEqual(metric(client, "server_connected"), 1)
        self.assertEqual(metric(client, "pool_idle"), 2)
        self.assertEqual(len(net.logged("client_connected", "client")), 2)

    def test_silent_server_declared_dead_after_three_heartbeats(self):
        net, server, client = tunnel(self, server_overrides=dict(heartbeat=1.0), client_overrides=dict(min_pool=1))
        net.advance(5)  # PING/PONG keep a live session up
        self.assertEqual(metric(client, "server_connected"), 1)
        net.blackholed.add(TUNNEL_PORT)
        net.advance(2.5, step=0.25)
        self.assertEqual(metric(client, "server_connected"), 1)  # not yet: under three heartbeats
        net.advance(1.5, step=0.25)
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertTrue(any("silent for 3 heartbeats" in t for t in net.texts()), net.texts())
        self.assertTrue(net.logged("client_disconnected", "client"))
        net.blackholed.clear()
        net.advance(20)  # attempts made while the path was still dead time out first (5 s), then back off
        self.assertEqual(metric(client, "server_connected"), 1)


class RefusedTests(unittest.TestCase):
    def test_wrong_key_backs_off_slowly_and_says_why(self):
        net, server, client = tunnel(self, client_overrides=dict(key="not-the-servers-key-0123456789"),
                                     settle=False)
        net.advance(60, step=0.25)
        self.assertEqual(metric(client, "server_connected"), 0)
        self.assertEqual(metric(server, "client_connected"), 0)
        tries = server.failures_by_reason["auth"]
        self.assertGreaterEqual(tries, 2)
        # The slow cap (30 s) once the key is refused: far fewer tries than
        # an unreachable server gets (about one per 1.5-3 s).
        self.assertLessEqual(tries, 10)
        self.assertTrue(any("authentication failed" in t for t in net.texts()), net.texts())

    def test_second_client_with_the_key_replaces_the_first_which_pauses(self):
        net, server, first = tunnel(self, client_overrides=dict(min_pool=2))
        second = memtunnel.start(TunnelClient(memtunnel.client_settings(min_pool=2), net.reactor))
        self.addCleanup(memtunnel.stop, net, second)
        net.settle()
        self.assertEqual(metric(second, "server_connected"), 1)
        self.assertEqual(metric(first, "server_connected"), 0)
        self.assertEqual(metric(server, "session_replacements"), 1)
        self.assertTrue(any("another client uses this key" in t for t in net.texts()), net.texts())
        # The first does not take the session straight back: about 5 s.
        net.advance(3)
        self.assertEqual(metric(second, "server_connected"), 1)
        self.assertEqual(metric(server, "session_replacements"), 1)  # no fight over the session
        self.assertEqual(metric(server, "pool_idle"), 2)


class StopTests(unittest.TestCase):
    def test_stop_closes_control_and_pool_and_reports(self):
        net, server, client = tunnel(self, client_overrides=dict(min_pool=3, report_interval=10))
        net.advance(10)
        health = net.logged("health")
        self.assertTrue(health and health[-1]["connected"] and health[-1]["pool_idle"] == 3, health)
        memtunnel.stop(net, client)
        self.assertEqual(net.live(TUNNEL_PORT), 0)
        self.assertEqual(metric(server, "client_connected"), 0)
        self.assertTrue(net.logged("health")[-1]["final"])
        # A stop is not a failure: the lost server is an info line then.
        self.assertEqual(net.logged("client_disconnected", "client")[-1]["log_level"].name, "info")

    def test_reload_without_a_ca_changes_nothing(self):
        net, server, client = tunnel(self)
        client.reload()
        self.assertTrue(any("nothing to reload" in t for t in net.texts()))
        self.assertEqual(metric(client, "server_connected"), 1)

