"""Tests for tunnelpass.wire.handshake: mutual HMAC auth with channel binding."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.wire.codec import Frame, FrameDecoder, ProtocolError, Type, encode
from tunnelpass.wire.handshake import (
    AUTH_FAILED,
    BAD_VERSION,
    MUX_CARRIER,
    POOL_CARRIER,
    ClientHandshake,
    HandshakeError,
    PoolAuthenticator,
    ReplayWindow,
    ServerHandshake,
    SessionConfig,
    check_mux_ok,
    mux_ok_frame,
    pool_auth_frame,
)

KEY = b"correct horse battery staple"
FP = bytes(range(32))


def frames(wire):
    return FrameDecoder().feed(wire)


def run(client, server):
    """Drive a full exchange; return the server's last output."""
    (challenge,) = server.receive(frames(client.start())[0])
    (auth,) = client.receive(frames(challenge)[0])
    (welcome,) = server.receive(frames(auth)[0])
    client.receive(frames(welcome)[0])
    return welcome


class ControlHandshakeTests(unittest.TestCase):
    def test_success_both_sides_agree(self):
        config = SessionConfig(flow=2, tls=1, max_pool=64, heartbeat_ms=2000)
        server = ServerHandshake(KEY, FP, config)
        client = ClientHandshake(KEY, FP)
        run(client, server)
        self.assertEqual(client.session, server.session)
        self.assertEqual(client.session.config, config)
        self.assertEqual(len(client.session.session_key), 32)
        self.assertNotIn(KEY, client.start())

    def test_wrong_key(self):
        server = ServerHandshake(KEY, FP, SessionConfig())
        client = ClientHandshake(b"wrong", FP)
        (challenge,) = server.receive(frames(client.start())[0])
        (auth,) = client.receive(frames(challenge)[0])
        with self.assertRaises(HandshakeError) as cm:
            server.receive(frames(auth)[0])
        refusal = cm.exception
        self.assertEqual(refusal.code, AUTH_FAILED)
        self.assertEqual(frames(refusal.frame())[0].type, Type.ERROR)
        with self.assertRaises(HandshakeError) as cm:
            client.receive(frames(refusal.frame())[0])
        self.assertIn("authentication failed", cm.exception.reason)

    def test_man_in_the_middle_certificate_detected(self):
        server = ServerHandshake(KEY, FP, SessionConfig())
        client = ClientHandshake(KEY, b"\xee" * 32)  # the client sees the MITM's certificate
        self.assertRaises(HandshakeError, run, client, server)
        self.assertIsNone(server.session)

    def test_replayed_auth_fails_against_a_new_challenge(self):
        server1 = ServerHandshake(KEY, FP, SessionConfig())
        client = ClientHandshake(KEY, FP)
        (challenge,) = server1.receive(frames(client.start())[0])
        (recorded_auth,) = client.receive(frames(challenge)[0])
        server2 = ServerHandshake(KEY, FP, SessionConfig())
        server2.receive(frames(client.start())[0])
        with self.assertRaises(HandshakeError) as cm:
            server2.receive(frames(recorded_auth)[0])
        self.assertEqual(cm.exception.code, AUTH_FAILED)

    def test_reflected_challenge_refused(self):
        server = ServerHandshake(KEY, FP, SessionConfig())
        (challenge,) = server.receive(frames(ClientHandshake(KEY, FP).start())[0])
        nonce = frames(challenge)[0].payload[:32]
        with self.assertRaises(HandshakeError):
            server.receive(Frame(Type.AUTH, nonce + b"\x00" * 32))

    def test_fake_server_detected_by_client(self):
        client = ClientHandshake(KEY, FP)
        client.start()
        client.receive(Frame(Type.CHALLENGE, b"n" * 32 + b"\x01"))
        with self.assertRaises(HandshakeError) as cm:
            client.receive(Frame(Type.WELCOME, b"\x00" * 32 + b"s" * 16 + SessionConfig().pack()))
        self.assertIn("man in the middle", cm.exception.reason)

    def test_version_mismatch(self):
        server = ServerHandshake(KEY, FP, SessionConfig())
        with self.assertRaises(HandshakeError) as cm:
            server.receive(Frame(Type.HELLO, b"\x09\x01"))
        self.assertEqual(cm.exception.code, BAD_VERSION)

    def test_wrong_order_and_sizes(self):
        for frame in [Frame(Type.AUTH, b"x" * 64), Frame(Type.HELLO, b"\x01"), Frame(Type.PING, b"")]:
            with self.assertRaises(HandshakeError):
                ServerHandshake(KEY, FP, SessionConfig()).receive(frame)

    def test_one_attempt_per_connection(self):
        server = ServerHandshake(KEY, FP, SessionConfig())
        good_client, bad_client = ClientHandshake(KEY, FP), ClientHandshake(b"wrong", FP)
        (challenge,) = server.receive(frames(good_client.start())[0])
        (bad_auth,) = bad_client.receive(frames(challenge)[0])
        (good_auth,) = good_client.receive(frames(challenge)[0])
        self.assertRaises(HandshakeError, server.receive, frames(bad_auth)[0])
        self.assertRaises(HandshakeError, server.receive, frames(good_auth)[0])
        self.assertIsNone(server.session, "a refused connection gets no second guess")

    def test_tampered_config_detected(self):
        server, client = ServerHandshake(KEY, FP, SessionConfig(tls=1)), ClientHandshake(KEY, FP)
        (challenge,) = server.receive(frames(client.start())[0])
        (auth,) = client.receive(frames(challenge)[0])
        (welcome,) = server.receive(frames(auth)[0])
        payload = bytearray(frames(welcome)[0].payload)
        payload[32 + 16 + 1] = 0  # a man in the middle "downgrades" tls=1 to tls=0
        with self.assertRaises(HandshakeError) as cm:
            client.receive(Frame(Type.WELCOME, bytes(payload)))
        self.assertEqual(cm.exception.code, AUTH_FAILED)

    def test_tampered_hello_detected(self):
        server, client = ServerHandshake(KEY, FP, SessionConfig()), ClientHandshake(KEY, FP)
        client.start()
        (challenge,) = server.receive(Frame(Type.HELLO, b"\x01\x01"))
        client._hello = b"\x01\x02"  # what the client "sent" differs from what the server got
        (auth,) = client.receive(frames(challenge)[0])
        self.assertRaises(HandshakeError, server.receive, frames(auth)[0])

    def test_heartbeat_bounds(self):
        for heartbeat in (0, 99, 600_001):
            raw = SessionConfig(heartbeat_ms=heartbeat).pack()
            self.assertRaises(HandshakeError, SessionConfig.unpack, raw)

    def test_no_frames_after_success(self):
        server, client = ServerHandshake(KEY, FP, SessionConfig()), ClientHandshake(KEY, FP)
        run(client, server)
        self.assertRaises(HandshakeError, server.receive, Frame(Type.AUTH, b"x" * 64))

    def test_empty_key_refused(self):
        self.assertRaises(ValueError, ServerHandshake, b"", FP, SessionConfig())
        self.assertRaises(ValueError, ClientHandshake, b"", FP)

    def test_bad_config_from_server(self):
        self.assertRaises(HandshakeError, SessionConfig.unpack, b"\x09" + SessionConfig().pack()[1:])
        self.assertRaises(HandshakeError, SessionConfig.unpack, b"short")

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=4))
    def test_hostile_bytes_only_ever_fail_cleanly(self, chunks):
        server = ServerHandshake(KEY, FP, SessionConfig())
        decoder = FrameDecoder()
        try:
            for chunk in chunks:
                for frame in decoder.feed(chunk):
                    server.receive(frame)
        except (HandshakeError, ProtocolError):
            pass
        self.assertIsNone(server.session)


class PoolAuthTests(unittest.TestCase):
    def setUp(self):
        server, client = ServerHandshake(KEY, FP, SessionConfig()), ClientHandshake(KEY, FP)
        run(client, server)
        self.session = client.session
        self.verifier = PoolAuthenticator(server.session, FP, window=8)

    def auth(self, counter, conn_id=b"i" * 16, fingerprint=FP):
        return frames(pool_auth_frame(self.session, counter, conn_id, fingerprint))[0]

    def test_accepts_once(self):
        frame = self.auth(1)
        self.assertEqual(self.verifier.verify(frame), b"i" * 16)
        with self.assertRaises(HandshakeError) as cm:
            self.verifier.verify(frame)
        self.assertIn("replayed", cm.exception.reason)

    def test_out_of_order_within_the_window(self):
        for counter in (5, 3, 4, 1, 2, 9):
            self.verifier.verify(self.auth(counter))
        for counter in (3, 9, 1):  # 1 has slid out of the window of 8 below 9
            self.assertRaises(HandshakeError, self.verifier.verify, self.auth(counter))
        self.verifier.verify(self.auth(6))

    def test_forged_fields(self):
        good = self.auth(1).payload
        forged = [
            good[:16] + (2).to_bytes(8, "big") + good[24:],  # another counter
            good[:24] + b"k" * 16 + good[40:],  # another id
            b"z" * 16 + good[16:],  # another session
            good[:-1] + bytes([good[-1] ^ 1]),  # another proof
        ]
        for payload in forged:
            self.assertRaises(HandshakeError, self.verifier.verify, Frame(Type.POOL_AUTH, payload))
        self.verifier.verify(Frame(Type.POOL_AUTH, good))

    def test_other_fingerprint(self):
        self.assertRaises(HandshakeError, self.verifier.verify, self.auth(1, fingerprint=b"\x01" * 32))

    def test_counter_zero_and_bad_ids(self):
        self.assertRaises(ValueError, pool_auth_frame, self.session, 0, b"i" * 16, FP)
        self.assertRaises(ValueError, pool_auth_frame, self.session, 1, b"short", FP)

    def test_window_memory_is_bounded(self):
        window = ReplayWindow(size=64)
        for counter in range(1, 10_000, 3):
            self.assertTrue(window.accept(counter))
        self.assertLess(window.bits.bit_length(), 65)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 200), max_size=60))
    def test_window_never_accepts_twice(self, counters):
        window, accepted = ReplayWindow(size=16), set()
        for counter in counters:
            if window.accept(counter):
                self.assertNotIn(counter, accepted)
                accepted.add(counter)


class MuxAuthTests(unittest.TestCase):
    """The multiplexed carrier's connection proofs (--type 3): MUX_AUTH from
    the client, MUX_OK from the server."""

    def setUp(self):
        server, client = ServerHandshake(KEY, FP, SessionConfig(carrier=MUX_CARRIER)), ClientHandshake(KEY, FP)
        run(client, server)
        self.session = client.session
        self.verifier = PoolAuthenticator(server.session, FP, window=8)

    def mux_auth(self, counter=1, conn_id=b"m" * 16, fingerprint=FP):
        return pool_auth_frame(self.session, counter, conn_id, fingerprint, Type.MUX_AUTH)

    def test_verify(self):
        wire = self.mux_auth()
        frame = frames(wire)[0]
        self.assertEqual(frame.type, Type.MUX_AUTH)
        self.assertEqual(len(frame.payload), 72)
        self.assertEqual(self.verifier.verify(frame), b"m" * 16)
        self.assertRaises(HandshakeError, self.verifier.verify, frame)  # once only

    def test_mux_and_pool_auth_share_the_counter_window(self):
        self.verifier.verify(frames(pool_auth_frame(self.session, 1, b"p" * 16, FP))[0])
        with self.assertRaises(HandshakeError) as cm:
            self.verifier.verify(frames(self.mux_auth(counter=1))[0])
        self.assertIn("replayed", cm.exception.reason)

    def test_a_pool_proof_is_not_a_mux_proof_and_the_reverse(self):
        pool = frames(pool_auth_frame(self.session, 1, b"p" * 16, FP))[0]
        mux = frames(self.mux_auth(counter=2))[0]
        for forged in (Frame(Type.MUX_AUTH, pool.payload), Frame(Type.POOL_AUTH, mux.payload)):
            with self.assertRaises(HandshakeError) as cm:
                self.verifier.verify(forged)
            self.assertEqual(cm.exception.code, AUTH_FAILED)
        # the genuine ones are still good (a failed attempt used no counter)
        self.verifier.verify(pool)
        self.verifier.verify(mux)

    def test_mux_auth_binds_the_certificate(self):
        self.assertRaises(HandshakeError, self.verifier.verify, frames(self.mux_auth(fingerprint=b"\x01" * 32))[0])
        self.assertEqual(self.verifier.verify(frames(self.mux_auth(fingerprint=b"\x01" * 32))[0],
                                              fingerprint=b"\x01" * 32), b"m" * 16)

    def test_mux_ok(self):
        auth = self.mux_auth()
        ok = frames(mux_ok_frame(self.session, frames(auth)[0].payload, FP))[0]
        self.assertEqual((ok.type, len(ok.payload)), (Type.MUX_OK, 32))
        check_mux_ok(self.session, auth, FP, ok)  # no exception

    def test_mux_ok_refused(self):
        auth = self.mux_auth()
        payload = frames(auth)[0].payload
        other_server, other_client = ServerHandshake(KEY, FP, SessionConfig()), ClientHandshake(KEY, FP)
        run(other_client, other_server)
        wrong = {
            "wrong fingerprint": mux_ok_frame(self.session, payload, b"\xee" * 32),
            "wrong session": mux_ok_frame(other_server.session, payload, FP),
            "another MUX_AUTH": mux_ok_frame(self.session, frames(self.mux_auth(counter=2))[0].payload, FP),
            "wrong payload": encode(Type.MUX_OK, bytes(32)),
        }
        for what, wire in wrong.items():
            with self.assertRaises(HandshakeError) as cm:
                check_mux_ok(self.session, auth, FP, frames(wire)[0])
            self.assertEqual(cm.exception.code, AUTH_FAILED, what)
            self.assertIn("man in the middle", cm.exception.reason)

    def test_mux_ok_of_another_type_or_size(self):
        auth = self.mux_auth()
        for frame in (Frame(Type.POOL_OK, b""), Frame(Type.MUX_OK, bytes(31))):
            self.assertRaises(HandshakeError, check_mux_ok, self.session, auth, FP, frame)
        with self.assertRaises(HandshakeError) as cm:
            check_mux_ok(self.session, auth, FP, frames(HandshakeError(AUTH_FAILED, "no").frame())[0])
        self.assertEqual(cm.exception.code, AUTH_FAILED)


class SessionConfigCarrierTests(unittest.TestCase):
    def test_carrier_3_packs_ten_bytes(self):
        config = SessionConfig(flow=2, tls=1, max_pool=64, heartbeat_ms=2000, carrier=MUX_CARRIER)
        raw = config.pack()
        self.assertEqual((len(raw), raw[-1]), (10, 3))
        self.assertEqual(SessionConfig.unpack(raw), config)

    def test_carrier_0_packs_nine_bytes(self):
        """As every earlier release packed it."""
        config = SessionConfig(carrier=POOL_CARRIER)
        self.assertEqual(len(config.pack()), 9)
        self.assertEqual(SessionConfig.unpack(config.pack()).carrier, POOL_CARRIER)

    def test_unknown_carrier_refused(self):
        nine = SessionConfig().pack()
        for carrier in (1, 2, 4, 255):
            with self.assertRaises(HandshakeError) as cm:
                SessionConfig.unpack(nine + bytes([carrier]))
            self.assertIn("invalid session config", cm.exception.reason, carrier)
        self.assertRaises(HandshakeError, SessionConfig.unpack, nine + b"\x03\x03")

    def test_welcome_of_57_and_58_bytes_accepted(self):
        for carrier, size in ((POOL_CARRIER, 57), (MUX_CARRIER, 58)):
            server, client = ServerHandshake(KEY, FP, SessionConfig(carrier=carrier)), ClientHandshake(KEY, FP)
            welcome = run(client, server)
            self.assertEqual(len(frames(welcome)[0].payload), size)
            self.assertEqual(client.session.config.carrier, carrier)

    def test_welcome_of_other_sizes_refused(self):
        for size in (0, 48, 56, 59, 64):
            client = ClientHandshake(KEY, FP)
            client.start()
            client.receive(Frame(Type.CHALLENGE, b"n" * 32 + b"\x01"))
            with self.assertRaises(HandshakeError) as cm:
                client.receive(Frame(Type.WELCOME, bytes(size)))
            self.assertIn("malformed size", cm.exception.reason, size)
