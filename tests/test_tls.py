"""Tests for tunnelpass.carriers.tls: self-signed certificates, pins, pair loading."""

import os

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tests.certs import ca_signed
from tunnelpass.carriers.tls import (
    CertificateError,
    fingerprint,
    format_pin,
    load_pair,
    load_saved_pair,
    PinnedClientCreator,
    peer_fingerprint,
    server_options,
    verified_client_creator,
    parse_pin,
    save_pair,
    self_signed,
)


class TLSHelperTests(unittest.TestCase):
    def test_self_signed_round_trip_and_fingerprint(self):
        key, cert = self_signed("tunnel.example")
        directory = self.mktemp()
        cert_path, key_path = save_pair(directory, key, cert)
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        loaded_key, chain = load_pair(cert_path, key_path)
        self.assertEqual(fingerprint(chain[0]), fingerprint(cert))
        self.assertEqual(len(fingerprint(cert)), 32)

    def test_second_save_keeps_backup(self):
        directory = self.mktemp()
        first = self_signed()
        save_pair(directory, *first)
        second = self_signed()
        cert_path, key_path = save_pair(directory, *second)
        self.assertEqual(fingerprint(load_pair(cert_path, key_path)[1][0]), fingerprint(second[1]))
        self.assertEqual(fingerprint(load_pair(cert_path + ".bak", key_path + ".bak")[1][0]),
                         fingerprint(first[1]))

    def test_half_written_pair_falls_back_to_backup(self):
        directory = self.mktemp()
        first = self_signed()
        save_pair(directory, *first)
        save_pair(directory, *self_signed())
        # As if a crash hit between the key's rename and the certificate's:
        second_key, _ = self_signed()
        with open(os.path.join(directory, "tunnelpass.key"), "wb") as f:
            f.write(second_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        _, chain = load_saved_pair(directory)
        self.assertEqual(fingerprint(chain[0]), fingerprint(first[1]))

    def test_no_temp_files_left(self):
        directory = self.mktemp()
        save_pair(directory, *self_signed())
        save_pair(directory, *self_signed())
        self.assertEqual(sorted(os.listdir(directory)),
                         ["tunnelpass.crt", "tunnelpass.crt.bak", "tunnelpass.key", "tunnelpass.key.bak"])

    def test_mismatched_pair_refused(self):
        directory = self.mktemp()
        cert_path, _ = save_pair(directory, *self_signed(), name="a")
        _, other_key = save_pair(directory, *self_signed(), name="b")
        with self.assertRaises(CertificateError) as cm:
            load_pair(cert_path, other_key)
        self.assertIn("is not the private key of", str(cm.exception))

    def test_garbage_files_refused(self):
        directory = self.mktemp()
        os.makedirs(directory)
        junk = os.path.join(directory, "junk.pem")
        with open(junk, "wb") as f:
            f.write(b"\x00not a pem\xff" * 100)
        cert_path, key_path = save_pair(directory, *self_signed())
        self.assertRaises(CertificateError, load_pair, junk, key_path)
        self.assertRaises(CertificateError, load_pair, cert_path, junk)
        self.assertRaises(CertificateError, load_pair, "/nonexistent.crt", key_path)

    def test_pins(self):
        digest = bytes(range(32))
        self.assertEqual(parse_pin(format_pin(digest)), digest)
        self.assertEqual(parse_pin("SHA256:" + ":".join(f"{b:02X}" for b in digest)), digest)
        for bad in ["", "sha1:abcd", "sha256:", "sha256:" + "z" * 64, "sha256:" + "ab" * 31, digest.hex()]:
            self.assertRaises(ValueError, parse_pin, bad)

    def test_key_is_p256(self):
        key, _ = self_signed()
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertIn(b"BEGIN PRIVATE KEY", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


class TLSContextTests(unittest.TestCase):
    """Real TLS handshakes on loopback for the three client behaviours."""

    def serve(self, key, chain):
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        class Echo(Protocol):
            def dataReceived(self, data):
                self.transport.write(data)

        port = reactor.listenSSL(0, Factory.forProtocol(Echo), server_options(key, chain), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def exchange(self, port, creator):
        """Connect, send b'ping', return (echo, fingerprint seen) or raise."""
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
        from twisted.internet.protocol import Protocol

        class Client(Protocol):
            def __init__(self):
                self.done = Deferred()
                self.lost = Deferred()

            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                if not self.done.called:
                    self.done.callback((data, peer_fingerprint(self.transport)))
                    self.transport.loseConnection()

            def connectionLost(self, reason):
                if not self.done.called:
                    self.done.errback(reason)
                self.lost.callback(None)

        client = Client()
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        result = await client.done.addTimeout(10, reactor)
        await client.lost  # a clean reactor: the TLS close has finished
        return result

    async def assertRefused(self, exchange):
        """The TLS handshake must fail (quickly: not by the 10 s timeout)."""
        from OpenSSL.SSL import Error as TLSError
        from service_identity import VerificationError
        from twisted.internet.error import ConnectionLost

        try:
            await exchange
        except (TLSError, ConnectionLost, VerificationError) as e:
            return e
        except Exception as e:  # pragma: no cover - the assertion explains
            self.fail(f"expected a TLS failure, got {e!r}")
        self.fail("the connection was accepted")

    async def test_pinned_self_signed(self):
        key, cert = self_signed()
        port = self.serve(key, [cert])
        data, seen = await self.exchange(port, PinnedClientCreator(fingerprint(cert)))
        self.assertEqual((data, seen), (b"ping", fingerprint(cert)))

    async def test_wrong_pin_fails_the_tls_handshake(self):
        key, cert = self_signed()
        port = self.serve(key, [cert])
        await self.assertRefused(self.exchange(port, PinnedClientCreator(b"\x00" * 32)))

    async def test_no_pin_accepts_and_reports_what_it_saw(self):
        key, cert = self_signed()
        port = self.serve(key, [cert])
        data, seen = await self.exchange(port, PinnedClientCreator(None))
        self.assertEqual(seen, fingerprint(cert), "the fingerprint the handshake will bind to")

    async def test_verified_chain_and_hostname(self):
        ca, key, cert = ca_signed("localhost")
        ca_path = self.mktemp()
        with open(ca_path, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        port = self.serve(key, [cert])
        data, _ = await self.exchange(port, verified_client_creator("localhost", ca_path))
        self.assertEqual(data, b"ping")
        await self.assertRefused(self.exchange(port, verified_client_creator("other.example", ca_path)))

    async def test_self_signed_fails_verification(self):
        key, cert = self_signed("localhost")
        ca, _, _ = ca_signed()
        ca_path = self.mktemp()
        with open(ca_path, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        port = self.serve(key, [cert])
        await self.assertRefused(self.exchange(port, verified_client_creator("localhost", ca_path)))

    def test_bad_ca_file(self):
        self.assertRaises(CertificateError, verified_client_creator, "h", "/nonexistent/ca.pem")

    def test_hostnames(self):
        verified_client_creator("[::1]")  # as URLs write IPv6 literals
        self.assertRaises(CertificateError, verified_client_creator, "bad..name")

    def test_no_tls_no_fingerprint(self):
        from twisted.internet.testing import StringTransport

        self.assertEqual(peer_fingerprint(StringTransport()), b"")
