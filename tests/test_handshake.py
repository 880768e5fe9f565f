"""Tests for tunnelpass.handshake: mutual HMAC auth with channel binding."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.codec import Frame, FrameDecoder, ProtocolError, Type, encode
from tunnelpass.handshake import (
    AUTH_FAILED,
    BAD_VERSION,
    ClientHandshake,
    HandshakeError,
    PoolAuthenticator,
    ServerHandshake,
    SessionConfig,
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
        self.verifier = PoolAuthenticator(server.session, FP, max_ids=3)

    def test_accepts_once(self):
        frame = frames(pool_auth_frame(self.session, b"i" * 16, FP))[0]
        self.assertEqual(self.verifier.verify(frame), b"i" * 16)
        with self.assertRaises(HandshakeError) as cm:
            self.verifier.verify(frame)
        self.assertIn("already used", cm.exception.reason)

    def test_forged_proof_or_session(self):
        good = frames(pool_auth_frame(self.session, b"j" * 16, FP))[0].payload
        for forged in (good[:16] + b"k" * 16 + good[32:], b"z" * 16 + good[16:], good[:-1] + b"\x00"):
            self.assertRaises(HandshakeError, self.verifier.verify, Frame(Type.POOL_AUTH, forged))

    def test_other_fingerprint(self):
        frame = frames(pool_auth_frame(self.session, b"m" * 16, b"\x01" * 32))[0]
        self.assertRaises(HandshakeError, self.verifier.verify, frame)

    def test_id_budget_is_bounded(self):
        for i in range(3):
            self.verifier.verify(frames(pool_auth_frame(self.session, bytes([i]) * 16, FP))[0])
        self.assertTrue(self.verifier.exhausted)
        self.assertRaises(HandshakeError, self.verifier.verify,
                          frames(pool_auth_frame(self.session, b"\x09" * 16, FP))[0])
        self.assertEqual(len(self.verifier.used), 3)

    def test_bad_id_length(self):
        self.assertRaises(ValueError, pool_auth_frame, self.session, b"short", FP)

    def test_encoded_frames_fit_limits(self):
        encode(Type.POOL_AUTH, b"x" * 64)
