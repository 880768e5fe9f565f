"""The server's tunnel port without sockets: hostile first bytes, the guard's
accounting, pool authentication, and TLS material (state dir, reload)."""

import os
import shutil

from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from tests.helpers import RelayTransport

from tests.certs import ca_signed, write_pem
from twisted.logger import Logger, LogLevel

from tunnelpass.wire.codec import FrameDecoder, Type, decode_text, encode, encode_open
from tunnelpass.wire.handshake import AUTH_FAILED, ClientHandshake, SessionConfig, pool_auth_frame
from tunnelpass.tunnel.gate import _GateFactory
from tunnelpass.tunnel.dispatch import OpenDispatcher
from tunnelpass.tunnel.server import ServerSettings, TunnelServer

TRY_LATER = 8  # the ERROR code for a control connection turned away (docs/protocol.rst)

KEY = "server-test-key-0123456789"


def make_server(**overrides):
    settings = ServerSettings(tunnel_host="127.0.0.1", tunnel_port=0, target_host="127.0.0.1", target_port=0,
                              key=KEY, handshake_timeout=5.0, **overrides)
    server = TunnelServer(settings, MemoryReactorClock())
    server.session_config = SessionConfig()
    server.target_factory = None
    return server


def connect(server, host="192.0.2.1"):
    protocol = _GateFactory(server).buildProtocol(None)
    transport = RelayTransport(peerAddress=IPv4Address("TCP", host, 40000))  # an IStream, as TCP is
    protocol.makeConnection(transport)
    return protocol, transport


def authenticate(server):
    """A real control handshake through the gate; returns the client's Session."""
    protocol, transport = connect(server)
    client = ClientHandshake(KEY.encode(), b"")
    protocol.dataReceived(client.start())
    decoder = FrameDecoder()
    for _ in range(2):
        frames = decoder.feed(transport.value())
        transport.clear()
        for frame in frames:
            if client.session is not None:
                break  # signals after WELCOME (e.g. POOL) are not the handshake's
            for reply in client.receive(frame):
                protocol.dataReceived(reply)
    assert client.session is not None and server.session is not None
    return client.session, protocol, transport


class GateTests(unittest.TestCase):
    def test_garbage_first_frame_closes_only_that_connection(self):
        server = make_server()
        for junk in (b"\xff\x00\x00\x00", encode(Type.PING, b"x"), b"\x01\x01\x00\x02ab", b"\x05\x00\xff\xff"):
            protocol, transport = connect(server)
            protocol.dataReceived(junk)
            self.assertTrue(transport.disconnecting, junk)
            protocol.connectionLost(None)
        self.assertEqual(server.guard.pending, 0)
        self.assertEqual(server.handshake_failures, 4)

    def test_failures_counted_by_reason(self):
        server = make_server()
        protocol, _ = connect(server)
        protocol.dataReceived(b"\xff\x00\x00\x00")  # not a frame
        protocol.connectionLost(None)
        protocol, _ = connect(server)
        protocol.dataReceived(b"\x16\x03\x01\x00\x10")  # TLS to a plain server
        protocol.connectionLost(None)
        protocol, _ = connect(server)
        server.clock.advance(5)  # silent until the deadline
        protocol.connectionLost(None)
        protocol, _ = connect(server)
        protocol.connectionLost(None)  # gone mid-handshake
        protocol, transport = connect(server)
        wrong = ClientHandshake(b"another key 0123456789", b"")
        protocol.dataReceived(wrong.start())
        for frame in FrameDecoder().feed(transport.value()):
            for reply in wrong.receive(frame):
                protocol.dataReceived(reply)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        session = authenticate(server)[0]
        forged = bytearray(pool_auth_frame(session, 1, b"i" * 16, b""))
        forged[-1] ^= 1
        protocol, _ = connect(server)
        protocol.dataReceived(bytes(forged))  # a guess at the session key
        protocol.connectionLost(None)
        self.assertEqual(server.failures_by_reason,
                         {"timeout": 1, "protocol": 1, "auth": 1, "pool_auth": 1, "tls": 1, "no_tls": 0,
                          "closed": 1})
        self.assertEqual(server.handshake_failures, 6)
        samples = {s.labels.get("reason"): s.value for s in server.metrics() if s.name == "handshake_failures"}
        self.assertEqual(samples, server.failures_by_reason)

    def test_deadline_covers_the_handshake(self):
        server = make_server()
        protocol, transport = connect(server)
        protocol.dataReceived(b"\x01\x00")  # half a header, then nothing
        server.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(server.guard.pending, 0)

    def test_plain_client_told_tls_required(self):
        server = make_server(tls=1)
        protocol, transport = connect(server)
        protocol.dataReceived(ClientHandshake(KEY.encode(), b"").start())
        self.assertIn(b"requires TLS (level 1)", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_tls_offered_to_a_plain_server_is_refused(self):
        server = make_server(tls=0)
        protocol, transport = connect(server)
        protocol.dataReceived(b"\x16\x03\x01\x00\x10")
        self.assertTrue(transport.disconnecting)

    def test_pending_cap_per_source(self):
        server = make_server()
        server.guard.max_pending_per_source = 2
        connections = [connect(server) for _ in range(3)]
        self.assertEqual([t.disconnecting for _, t in connections], [False, False, True])
        self.assertTrue(connect(server, "192.0.2.2")[1].disconnecting is False)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.integers(1, 40))
    def test_hostile_bytes_in_any_slicing(self, data, step):
        server = make_server()
        protocol, transport = connect(server)
        for i in range(0, len(data), step):
            if transport.disconnecting:
                break
            protocol.dataReceived(data[i:i + step])
        protocol.connectionLost(None)
        self.assertEqual(server.guard.pending, 0)


def try_key(server, key: bytes, host: str = "192.0.2.1", keep: bool = False):
    """One control connection with *key* from *host*, through the gate:
    "welcome", the ERROR code it was answered with, or "dropped" (closed
    without a word).  The connection is closed afterwards, unless *keep*
    and it authenticated (it is then the server's session)."""
    protocol, transport = connect(server, host)
    client = ClientHandshake(key, b"")
    outcome = "dropped"
    if not transport.disconnecting:
        protocol.dataReceived(client.start())
    for _ in range(2):
        frames = FrameDecoder().feed(transport.value())
        transport.clear()
        for frame in frames:
            if frame.type is Type.ERROR:
                outcome = decode_text(frame.payload)[0]
            elif frame.type is Type.WELCOME:
                outcome = "welcome"
            else:
                for reply in client.receive(frame):
                    protocol.dataReceived(reply)
    if not (keep and outcome == "welcome"):
        protocol.connectionLost(None)
    return outcome


class AdmissionTests(unittest.TestCase):
    """Issue items 2 and 3 at the gate: fair admission under the global
    cap; wrong keys that neither a success forgives nor lock a live session
    out."""

    def test_full_cap_still_admits_a_client_holding_few(self):
        """8 flooders keep the cap full (re-opening whatever is dropped, as
        the issue's attack does); the client still authenticates and fills
        its pool, each of its connections taking a flooder's oldest slot."""
        server = make_server(max_handshakes=32, max_handshakes_per_source=8)
        flood = []

        def reopen():
            for i in range(8):
                while True:
                    protocol, transport = connect(server, f"198.51.100.{i}")
                    if not protocol.admitted:
                        break
                    flood.append((protocol, transport))

        reopen()
        self.assertEqual(server.guard.pending, 32)
        session, _, _ = authenticate(server)  # from 192.0.2.1
        for counter in range(1, 11):
            reopen()
            protocol, transport = connect(server)
            protocol.dataReceived(pool_auth_frame(session, counter, bytes([counter]) * 16, b""))
            self.assertEqual(transport.value(), encode(Type.POOL_OK), counter)
        reopen()
        self.assertEqual(len(server.session.pool.idle), 10)
        evicted = [(p, t) for p, t in flood if t.disconnecting]
        self.assertEqual(len(evicted), server.guard.evictions, "only flooders were evicted")
        self.assertGreaterEqual(len(evicted), 11)
        for protocol, _ in evicted:
            protocol.connectionLost(None)
        self.assertEqual(server.handshake_failures, 0, "an eviction is not the peer's failure")
        metrics = {(m.name, m.labels.get("reason")): m.value for m in server.metrics()}
        self.assertEqual(metrics[("handshakes_pending", None)], 32)
        self.assertEqual(metrics[("handshakes_pending_top_source", None)], 4)
        self.assertEqual(metrics[("handshake_evictions", None)], len(evicted))
        self.assertGreater(metrics[("handshake_refused", "global_cap")], 0)

    def test_wrong_keys_interleaved_with_successes_stay_within_the_budget(self):
        """From the client's own address: rounds of 4 wrong keys, one real
        pool connection and one real control connection, every 3 s for 5
        minutes: no more than 5 wrong keys are evaluated in any minute."""
        server = make_server()
        session, _, _ = authenticate(server)
        evaluated = []
        for counter in range(1, 101):
            for _ in range(4):
                if try_key(server, b"wrong key 0123456789abcdef") == AUTH_FAILED:
                    evaluated.append(server.clock.seconds())
            protocol, transport = connect(server)
            protocol.dataReceived(pool_auth_frame(server.session.session, counter, b"p" * 16, b""))
            self.assertEqual(transport.value(), encode(Type.POOL_OK), "the live session's pool refills")
            protocol.connectionLost(None)
            try_key(server, KEY.encode(), keep=True)  # the client reconnects (turned away while banned)
            server.clock.advance(3)
        worst = max(sum(1 for t in evaluated if start <= t < start + 60) for start in evaluated)
        self.assertLessEqual(worst, 5)

    def test_a_banned_neighbour_does_not_stop_a_live_session(self):
        server = make_server()
        events = []
        server.log = Logger(namespace="tunnelpass.server", observer=events.append)
        session, control, control_transport = authenticate(server)
        outcomes = [try_key(server, b"wrong key 0123456789abcdef") for _ in range(6)]
        for counter in range(1, 31):  # the session refills its pool from the same address
            protocol, transport = connect(server)
            protocol.dataReceived(pool_auth_frame(session, counter, bytes([counter]) * 16, b""))
            self.assertEqual(transport.value(), encode(Type.POOL_OK), counter)
        self.assertEqual(len(server.session.pool.idle), 30)
        self.assertEqual(outcomes, [AUTH_FAILED] * 5 + [TRY_LATER])
        self.assertFalse(control_transport.disconnecting)
        self.assertEqual(try_key(server, KEY.encode()), TRY_LATER, "control connections wait out the ban")
        self.assertEqual(try_key(server, KEY.encode(), "192.0.2.99"), "welcome", "other addresses do not")
        bans = [e for e in events if e.get("event") == "handshake_ban"]
        self.assertEqual(len(bans), 1)
        self.assertEqual(bans[0]["log_level"], LogLevel.warn)
        self.assertEqual((bans[0]["address"], bans[0]["duration"]), ("192.0.2.1", 60.0))
        self.assertIn("wrong keys", bans[0]["reason"])
        self.assertEqual([m.value for m in server.metrics() if m.name == "bans"], [1])
        refused = {m.labels["reason"]: m.value for m in server.metrics() if m.name == "handshake_refused"}
        self.assertEqual(refused, {"global_cap": 0, "source_cap": 0, "banned": 2, "key_attempts": 0})
        server.clock.advance(60)
        self.assertEqual(try_key(server, KEY.encode()), "welcome")

    def test_parallel_control_connections_cannot_overshoot(self):
        """Eight connections all get a CHALLENGE, then send their (wrong)
        keys together: five are evaluated, the rest are turned away."""
        server = make_server()
        wrong = [(connect(server), ClientHandshake(b"wrong key 0123456789abcdef", b"")) for _ in range(8)]
        for (protocol, transport), client in wrong:
            protocol.dataReceived(client.start())
            self.assertEqual(FrameDecoder().feed(transport.value())[0].type, Type.CHALLENGE)
        answers = []
        for (protocol, transport), client in wrong:
            challenge = FrameDecoder().feed(transport.value())[0]
            transport.clear()
            for reply in client.receive(challenge):
                protocol.dataReceived(reply)
            answers.append(decode_text(FrameDecoder().feed(transport.value())[0].payload)[0])
        self.assertEqual(answers, [AUTH_FAILED] * 5 + [TRY_LATER] * 3)
        self.assertEqual(server.guard.bans, 1)

    def test_a_wrong_key_counts_although_the_peer_never_finishes_the_close(self):
        """Under TLS the close after a wrong key waits for the peer's
        close_notify; a guesser that never sends it used to end by the gate
        deadline as a timeout, and its key was never counted."""
        server = make_server()
        for _ in range(5):
            protocol, transport = connect(server)
            client = ClientHandshake(b"wrong key 0123456789abcdef", b"")
            protocol.dataReceived(client.start())
            challenge = FrameDecoder().feed(transport.value())[0]
            for reply in client.receive(challenge):
                protocol.dataReceived(reply)  # answered ERROR(1); the peer stays silent
        self.assertEqual(server.guard.bans, 1, "counted when evaluated")
        self.assertEqual(try_key(server, KEY.encode()), TRY_LATER)
        server.clock.advance(server.settings.handshake_timeout)
        self.assertEqual(server.guard.pending, 0, "the deadline still ends refused connections")

    def test_turned_away_with_a_reason(self):
        """A control connection from a banned address is told why (ERROR 8)
        and closed: no new failure, no slot kept."""
        server = make_server()
        for _ in range(5):
            try_key(server, b"wrong key 0123456789abcdef")
        protocol, transport = connect(server)
        protocol.dataReceived(ClientHandshake(KEY.encode(), b"").start())
        frames = FrameDecoder().feed(transport.value())
        self.assertEqual([(f.type, decode_text(f.payload)[0]) for f in frames], [(Type.ERROR, TRY_LATER)])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(server.guard.pending, 1, "its slot is held until the connection is gone: under TLS "
                                                  "the close waits for a close_notify that may never come")
        server.clock.advance(server.settings.handshake_timeout)
        self.assertEqual(server.guard.pending, 0, "the deadline ends it")
        protocol.connectionLost(None)
        self.assertEqual(server.guard.pending, 0)
        self.assertEqual(server.handshake_failures, 5, "a turned-away connection is not a new failure")


class PoolAuthTests(unittest.TestCase):
    def test_valid_pool_connection_is_filed_and_acknowledged(self):
        server = make_server()
        session, _, _ = authenticate(server)
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        self.assertEqual(transport.value(), encode(Type.POOL_OK))
        self.assertIn(b"i" * 16, server.session.pool.idle)
        protocol.connectionLost(None)
        self.assertNotIn(b"i" * 16, server.session.pool.idle, "a closed idle connection leaves the pool")

    def test_replayed_forged_and_sessionless_pool_auth(self):
        server = make_server()
        frame = pool_auth_frame(authenticate(server)[0], 1, b"i" * 16, b"")
        first, _ = connect(server)
        first.dataReceived(frame)
        replay, replay_transport = connect(server)
        replay.dataReceived(frame)
        self.assertTrue(replay_transport.disconnecting, "a counter is accepted once")
        forged = bytearray(frame)
        forged[-1] ^= 1
        protocol, transport = connect(server)
        protocol.dataReceived(bytes(forged))
        self.assertTrue(transport.disconnecting)
        fresh = make_server()
        protocol, transport = connect(fresh)
        protocol.dataReceived(frame)
        self.assertTrue(transport.disconnecting, "no session, no pool connections")
        self.assertEqual(fresh.handshake_failures, 0, "a client whose session ended is not penalized")

    def test_reused_connection_id_and_full_pool_get_no_pool_ok(self):
        server = make_server(max_pool=1)
        session, _, _ = authenticate(server)
        first, first_transport = connect(server)
        first.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        self.assertEqual(first_transport.value(), encode(Type.POOL_OK))
        for counter, conn_id in ((2, b"i" * 16), (3, b"j" * 16)):  # same id; then the pool is full
            protocol, transport = connect(server)
            protocol.dataReceived(pool_auth_frame(session, counter, conn_id, b""))
            self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.disconnecting)
        self.assertEqual(list(server.session.pool.idle), [b"i" * 16])
        self.assertFalse(first_transport.disconnecting)

    def test_bytes_on_an_idle_receive_flow_connection_close_it(self):
        server = make_server()
        server.flow = "receive"
        session, _, _ = authenticate(server)
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        protocol.dataReceived(b"unexpected")
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"i" * 16, server.session.pool.idle)

    def test_retire_closes_only_idle_connections(self):
        server = make_server()
        session, _, _ = authenticate(server)
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        server.session.retire(b"x" * 16)  # unknown: nothing happens
        self.assertFalse(transport.disconnecting)
        server.session.retire(b"i" * 16)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"i" * 16, server.session.pool.idle)

    def test_new_session_replaces_the_old(self):
        server = make_server()
        authenticate(server)
        old = server.session
        authenticate(server)
        self.assertIsNot(server.session, old)
        self.assertIn(b"replaced", old.control.transport.value())


class CertificateTests(unittest.TestCase):
    def test_state_dir_keeps_the_fingerprint(self):
        directory = os.path.join(os.path.abspath(self.mktemp()), "state")
        first = make_server(tls=1, state_dir=directory)
        first._load_tls()
        second = make_server(tls=1, state_dir=directory)
        second._load_tls()
        self.assertEqual(first.fingerprint, second.fingerprint)
        self.assertEqual(len(first.fingerprint), 32)
        ephemeral = make_server(tls=1)
        ephemeral._load_tls()
        self.assertNotEqual(ephemeral.fingerprint, first.fingerprint)

    def test_reload_adopts_a_valid_pair_and_keeps_the_old_otherwise(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        _, cert, key = write_pem(directory, *ca_signed())
        server = make_server(tls=2, cert=cert, private_key=key)
        server._load_tls()
        original = server.fingerprint
        self.assertFalse(server.reload_certificate(), "unchanged files: nothing to do")
        other = os.path.join(directory, "other")
        os.makedirs(other)
        _, cert2, key2 = write_pem(other, *ca_signed())
        shutil.copy(cert2, cert)  # new certificate, old key: mismatched
        self.assertFalse(server.reload_certificate())
        self.assertEqual(server.fingerprint, original)
        shutil.copy(key2, key)
        self.assertTrue(server.reload_certificate())
        self.assertNotEqual(server.fingerprint, original)


class SendFlowTests(unittest.TestCase):
    def test_start_frame_with_the_users_first_bytes(self):
        from twisted.internet.protocol import ServerFactory

        server = make_server()
        server.flow = "send"
        started = []

        class Inbound:
            def __setattr__(self, name, value):
                started.append((name, value))

            def makeConnection(self, transport):
                started.append(("made", transport))

            def dataReceived(self, data):
                started.append(("data", data))

        factory = ServerFactory()
        factory.buildProtocol = lambda addr: Inbound()
        server.target_factory = factory
        server.acceptor = OpenDispatcher(factory, None)
        session, _, _ = authenticate(server)
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        payload = b"u" * 50000
        protocol.dataReceived(encode_open(b"i" * 16, ("198.51.100.1", 1234), ("127.0.0.1", 80)) + payload)
        self.assertEqual(started, [("original", (("198.51.100.1", 1234), ("127.0.0.1", 80))),
                                   ("made", transport), ("data", payload)])
        self.assertNotIn(b"i" * 16, server.session.pool.idle)

    def test_start_frame_naming_another_connection_is_refused(self):
        server = make_server()
        server.flow = "send"
        session, _, _ = authenticate(server)
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"i" * 16, b""))
        protocol.dataReceived(encode_open(b"j" * 16))
        self.assertTrue(transport.disconnecting)


class WaitingUserTests(unittest.TestCase):
    def test_users_waiting_on_a_replaced_session_wait_on_the_new_one(self):
        server = make_server()
        authenticate(server)
        waiting = server.session.pool.take()  # no idle connection: the user waits
        taken = []
        waiting.addCallback(taken.append)
        session, _, _ = authenticate(server)  # the client reconnects: a new session
        self.assertEqual(taken, [])
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 1, b"n" * 16, b""))
        self.assertEqual([conn_id for conn_id, _ in taken], [b"n" * 16])
        server.clock.advance(60)  # the wait's own timeout is cancelled, not fired

    def test_users_waiting_while_no_session_is_up(self):
        server = make_server()
        _, control, control_transport = authenticate(server)
        waiting = server.session.pool.take()
        failures = []
        waiting.addErrback(failures.append)
        control.connectionLost(None)  # the client went away
        self.assertIsNone(server.session)
        server.clock.advance(5)  # nobody came back within --pool-timeout
        self.assertEqual(len(failures), 1)

    def test_ended_waiters_make_room(self):
        from tunnelpass.carriers.pool import IdlePool

        pool = IdlePool(MemoryReactorClock(), 10, lambda n: None, timeout=1, max_waiters=2)
        first, second = pool.take(), pool.take()
        for d in (first, second):
            d.addErrback(lambda f: None)
            d.cancel()
        pool.waiters.extend([first, second])  # e.g. moved here from another session's pool
        third = pool.take()
        self.assertFalse(third.called, "ended waiters do not count against max_waiters")
        third.cancel()
        third.addErrback(lambda f: None)
