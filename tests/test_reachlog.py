"""The client's reconnect policy and its log of why the server cannot be
reached; ``--tunnel`` over a token's address."""

from __future__ import annotations

import errno
import os

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tunnelpass.tunnel.client import ClientSettings, TunnelClient
from tunnelpass.wire.handshake import AUTH_FAILED, TLS_REQUIRED
from tunnelpass.tunnel.reachlog import RETRY_CAP, Reachability, connect_failure, handshake_failure, retry_delay
from tunnelpass.tap import Options
from tunnelpass.tunnel.tlslevel import TLSLevel
from tunnelpass.config.urls import make_token

KEY = "reachlog-test-key-0123456789abcdef"


class RetryPolicyTests(unittest.TestCase):
    def test_bounded_and_jittered_within_the_upper_half(self):
        for attempt in range(1, 200):
            low, high = retry_delay(attempt, rng=lambda: 0.0), retry_delay(attempt, rng=lambda: 1.0)
            self.assertLessEqual(high, RETRY_CAP)
            self.assertAlmostEqual(low, high / 2)
        self.assertEqual(retry_delay(1, rng=lambda: 1.0), 0.5)
        self.assertEqual(retry_delay(100, rng=lambda: 0.0), RETRY_CAP / 2, "attempt rate stays bounded")

    def test_client_delay_after_a_long_outage_is_capped(self):
        """Today's ClientService policy reached 30 s; a long outage must
        leave the client at most RETRY_CAP from its next attempt."""
        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY), MemoryReactorClock())
        client.failures = 3  # a few TLS-level attempts on top
        self.assertTrue(all(client._retry_delay(n) <= RETRY_CAP for n in range(1, 60)))


    def test_a_refused_key_or_a_ban_backs_off_to_the_slow_cap(self):
        """The server refused the key, or turned the client away: retrying
        every few seconds cannot help and keeps a ban alive."""
        from tunnelpass.tunnel.reachlog import SLOW_RETRY_CAP

        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY), MemoryReactorClock())
        client._slow = True
        delays = [client._retry_delay(n) for n in range(1, 12)]
        self.assertTrue(all(d <= SLOW_RETRY_CAP for d in delays))
        self.assertGreater(max(delays), RETRY_CAP * 4, delays)

    def test_a_replaced_session_pauses_before_reconnecting(self):
        from tunnelpass.tunnel.reachlog import REPLACED_PAUSE

        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY), MemoryReactorClock())
        client._pause_next = REPLACED_PAUSE
        self.assertGreaterEqual(client._retry_delay(1), REPLACED_PAUSE * 0.8)
        self.assertLessEqual(client._retry_delay(1), RETRY_CAP, "once")


class SessionEndTests(unittest.TestCase):
    def lost(self, running: bool, reason=None, code=None):
        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY), MemoryReactorClock())

        class Control:
            session = object()
            close_reason = reason
            close_code = code

        client.running = running
        client.control = control = Control()
        with capturedLogs() as events:
            client.control_lost(control)
        [event] = [e for e in events if e.get("event") == "client_disconnected"]
        return event["log_level"], formatEvent(event), client

    def test_a_stop_is_not_a_warning(self):
        self.assertEqual(self.lost(running=False)[0], LogLevel.info)
        self.assertEqual(self.lost(running=True)[0], LogLevel.warn)

    def test_replaced_by_another_client_pauses_and_says_why(self):
        from tunnelpass.wire.handshake import REPLACED

        level, text, client = self.lost(True, "peer closed: replaced by a newer session", REPLACED)
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("another client uses this key", text)
        self.assertGreater(client._pause_next, 0)


class VerdictKindTests(unittest.TestCase):
    def test_refused_key_and_turned_away_are_slow(self):
        from tunnelpass.wire.handshake import AUTH_FAILED
        from tunnelpass.wire.handshake import TRY_LATER
        from tunnelpass.tunnel.reachlog import handshake_failure

        class Control:
            close_reason = "peer refused: too many wrong keys from this address; try again in 59 s"
            lost_reason = None
            transport = None

        for code in (AUTH_FAILED, TRY_LATER):
            control = Control()
            control.close_code = code
            verdict = handshake_failure(control, 0, None, None)
            self.assertTrue(verdict.slow and verdict.back_off, code)


class ConnectFailureTests(unittest.TestCase):
    def test_each_reason_in_words(self):
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.TCPTimedOutError(), "connection timed out"),
            (error.TimeoutError(), "connection timed out"),
            (error.DNSLookupError("no.such.host"), "name not resolved"),
            (error.getConnectError((errno.ENETUNREACH, "Network is unreachable")), "network unreachable"),
            (error.getConnectError((errno.EHOSTUNREACH, "No route to host")), "host unreachable"),
            (error.getConnectError((errno.EADDRNOTAVAIL, "Cannot assign")), "cannot connect: EADDRNOTAVAIL"),
        ]
        for value, text in cases:
            described = connect_failure(value)
            self.assertTrue(described.startswith(text), (described, text))
            self.assertNotIn("object at 0x", described)


class _Control:
    """What handshake_failure reads of a control connection that ended."""

    def __init__(self, code=None, reason=None, lost=None):
        self.close_code, self.close_reason, self.session, self.transport = code, reason, None, None
        self.lost_reason = Failure(lost) if lost is not None else None


class VerdictTests(unittest.TestCase):
    settings = ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY)

    def test_key_rejected_backs_off(self):
        verdict = handshake_failure(_Control(AUTH_FAILED, "peer closed: authentication failed"), 0, TLSLevel(0),
                                    self.settings)
        self.assertIn("authentication failed: the server refused our key", verdict.reason)
        self.assertTrue(verdict.back_off)

    def test_tls_required_is_learnt_not_warned(self):
        levels = TLSLevel()
        levels.failed()
        verdict = handshake_failure(_Control(TLS_REQUIRED[1], "peer closed: TLS"), 0, levels, self.settings)
        self.assertEqual((verdict.reason, verdict.retry_now, levels.current), (None, True, 1))

    def test_closed_during_a_plain_handshake(self):
        verdict = handshake_failure(_Control(lost=error.ConnectionDone()), 0, TLSLevel(0), self.settings)
        self.assertEqual(verdict.reason, "the server closed the connection during the handshake "
                                         "(Connection was closed cleanly.)")


class ReachabilityTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.reach = Reachability(self.clock, Logger(namespace="test"), "127.0.0.2:10101")

    def test_a_countdown_in_the_reason_is_the_same_reason(self):
        with capturedLogs() as events:
            for left in (59, 37, 12):
                self.reach.failed(f"handshake with the server failed: peer refused: too many wrong keys; "
                                  f"try again in {left} s")
                self.reach.retrying(1.0)
        self.assertEqual(len(events), 1, [formatEvent(e) for e in events])

    def test_once_per_change_of_reason_then_one_line_when_back(self):
        with capturedLogs() as events:
            for _ in range(20):
                self.reach.failed("connection refused")
                self.clock.advance(1)
                self.reach.retrying(1.5)
            self.reach.failed("connection timed out")
            self.reach.retrying(3.0)
            self.clock.advance(3)
            self.reach.connected()
        lines = [(e["log_level"], formatEvent(e), e) for e in events]
        self.assertEqual(len(lines), 3, [text for _, text, _ in lines])
        self.assertEqual(lines[0][0], LogLevel.warn)
        self.assertEqual(lines[0][1], "cannot reach the server at 127.0.0.2:10101: connection refused "
                                      "(attempt 1, next retry in 1.5s)")
        self.assertEqual((lines[0][2]["event"], lines[0][2]["attempt"], lines[0][2]["retry_in"]),
                         ("server_unreachable", 1, 1.5))
        self.assertIn("connection timed out (attempt 21, next retry in 3.0s)", lines[1][1])
        self.assertEqual(lines[2][0], LogLevel.info)
        self.assertEqual(lines[2][1], "reached the server at 127.0.0.2:10101 again after 23.0s and 21 failed "
                                      "attempt(s)")
        self.assertEqual(lines[2][2]["event"], "server_reachable")

    def test_a_new_outage_logs_its_reason_again(self):
        with capturedLogs() as events:
            for _ in range(2):
                self.reach.failed("connection refused")
                self.reach.retrying(1.0)
                self.reach.connected()
        self.assertEqual([formatEvent(e).split(":")[0] for e in events],
                         ["cannot reach the server at 127.0.0.2", "reached the server at 127.0.0.2"] * 2)

    def test_client_logs_a_refused_connect_once_over_many_attempts(self):
        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY), MemoryReactorClock())
        with capturedLogs() as events:
            for attempt in range(1, 21):
                self.assertIsInstance(client.connect_failed(Failure(error.ConnectionRefusedError())), Failure)
                client._retry_delay(attempt)
        warnings = [formatEvent(e) for e in events if e.get("event") == "server_unreachable"]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("127.0.0.1:1: connection refused", warnings[0])


class TokenAddressTests(unittest.TestCase):
    """An explicit --tunnel wins over the token's address; key, pin and
    level still come from the token."""

    token = make_token("127.0.0.1", 10101, KEY, b"\x01" * 32, tls=1)

    def parse(self, *argv, env=None):
        options = Options()
        self.patch(os, "environ", env or {})
        options.parseOptions(["--mode", "client", "--token", self.token, "--target", "127.0.0.3:8080", *argv])
        return options

    def test_token_alone(self):
        options = self.parse()
        self.assertEqual((options["tunnel"], options.dial_reason), ("127.0.0.1:10101", "from the token"))

    def test_tunnel_flag_overrides_the_address_only(self):
        options = self.parse("--tunnel", "127.0.0.2:20202")
        self.assertEqual(options["tunnel"], "127.0.0.2:20202")
        self.assertEqual(options.dial_reason, "--tunnel overrides the token's 127.0.0.1:10101")
        self.assertEqual((options["key"], options["pin"], options["tls"]), (KEY, b"\x01" * 32, 1))

    def test_environment_overrides_too(self):
        options = self.parse(env={"TUNNELPASS_TUNNEL": "127.0.0.2:20202"})
        self.assertEqual(options["tunnel"], "127.0.0.2:20202")

    def test_tls2_token_keeps_its_name_for_verification(self):
        self.token = make_token("tunnel.example.net", 443, KEY, tls=2)
        options = self.parse("--tunnel", "127.0.0.2:443")
        self.assertEqual((options["tunnel"], options["sni"]), ("127.0.0.2:443", "tunnel.example.net"))
