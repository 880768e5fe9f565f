"""Each TLS failure a client can meet says which it is: real handshakes
(OpenSSL over iosim) with throwaway certificates, read through the
client's control protocol as :func:`tunnelpass.tunnel.reachlog.handshake_failure`
sees them."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial import unittest

from tests.certs import ca_signed, write_pem
from tunnelpass.carriers import tls as tlsmod
from tunnelpass.tunnel.client import ClientSettings
from tunnelpass.tunnel.control import ClientControlProtocol
from tunnelpass.tunnel.reachlog import handshake_failure
from tunnelpass.carriers.tlshalf import HalfCloseTLSFactory
from tunnelpass.tunnel.tlslevel import TLSLevel

KEY = b"tlsreason-test-key-0123456789abcdef"


class _Handler:
    """The client side's handler: keeps what the client would log."""

    def __init__(self, level, settings):
        self.level, self.settings, self.reason = level, settings, None

    def control_lost(self, control):
        verdict = handshake_failure(control, self.level, TLSLevel(self.level), self.settings)
        self.reason = verdict.reason

    def session_started(self, control):
        raise AssertionError("no session was expected")


class _Abort(Protocol):
    """Something that closes on the first byte (a --tls 0 tunnelpass server
    does this to a TLS hello)."""

    def dataReceived(self, data):
        self.transport.abortConnection()


class _Plain(Protocol):
    """Something that answers in plain text."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class TLSReasonTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca, key, cert = ca_signed("localhost")
        self.ca_path, _, _ = write_pem(self.dir, ca, key, cert)
        self.signed = TLSMemoryBIOFactory(tlsmod.server_options(key, [cert]), False, Factory.forProtocol(Protocol))
        self_key, self.self_cert = tlsmod.self_signed()
        self.self_signed = TLSMemoryBIOFactory(tlsmod.server_options(self_key, [self.self_cert]), False,
                                               Factory.forProtocol(Protocol))

    def failure(self, level, creator, server_factory, **settings):
        settings = ClientSettings("127.0.0.1", 10101, "127.0.0.1", 8080, key=KEY.decode(), **settings)
        handler = _Handler(level, settings)
        control_factory = Factory.forProtocol(lambda: ClientControlProtocol(KEY, tlsmod.peer_fingerprint,
                                                                            handler, Clock()))
        client_factory = HalfCloseTLSFactory(creator, True, control_factory)
        connectedServerAndClient(lambda: server_factory.buildProtocol(None),
                                 lambda: client_factory.buildProtocol(None))
        self.assertIsNotNone(handler.reason, "the connection failed")
        self.assertNotIn(" object at 0x", handler.reason, "never a repr")
        self.assertTrue(handler.reason.startswith("TLS handshake with the server failed: "))
        return handler.reason

    def test_wrong_ca_names_the_issuer(self):
        other_ca, _, _ = ca_signed("localhost")
        other = os.path.join(self.dir, "other-ca.pem")
        with open(other, "wb") as f:
            f.write(other_ca.public_bytes(serialization.Encoding.PEM))
        reason = self.failure(2, tlsmod.verified_client_creator("localhost", other), self.signed, ca=other,
                              sni="localhost")
        self.assertIn("certificate not signed by a trusted CA", reason)
        self.assertIn("issued by CN=tunnelpass test CA", reason)
        self.assertIn(f"--ca {other}", reason)

    def test_private_ca_against_the_system_roots(self):
        """No --ca (the system's roots, the documented default) and a
        server certificate from a private CA: a reason, not a crash."""
        reason = self.failure(2, tlsmod.verified_client_creator("localhost", None), self.signed, ca=None,
                              sni="localhost")
        self.assertIn("certificate not signed by a trusted CA: issued by", reason)

    def test_a_failure_to_explain_is_still_a_reason(self):
        """Explaining runs inside the client's connection-lost path: if it
        ever raises, the client still logs a reason and backs off."""
        from tunnelpass.tunnel import reachlog

        def broken(*args, **kwargs):
            raise AttributeError("no such thing")

        self.patch(reachlog, "describe_tls_failure", broken)
        reason = self.failure(1, tlsmod.PinnedClientCreator(b"\xab" * 32), self.self_signed, pin=b"\xab" * 32)
        self.assertIn("TLS handshake with the server failed:", reason)
        self.assertIn("(not explained: AttributeError)", reason)

    def test_hostname_mismatch_names_both(self):
        reason = self.failure(2, tlsmod.verified_client_creator("tunnel.example.net", self.ca_path), self.signed,
                              ca=self.ca_path, sni="tunnel.example.net")
        self.assertIn("certificate name mismatch: expected 'tunnel.example.net', the certificate is for localhost",
                      reason)

    def test_pin_mismatch_shows_both_fingerprints(self):
        pin = b"\xab" * 32
        reason = self.failure(1, tlsmod.PinnedClientCreator(pin), self.self_signed, pin=pin)
        seen = tlsmod.format_pin(tlsmod.fingerprint(self.self_cert))
        self.assertIn(f"certificate pin mismatch: expected sha256:{'ab' * 32}, the server presented {seen}",
                      reason)

    def test_server_that_closes_on_the_tls_hello(self):
        reason = self.failure(1, tlsmod.PinnedClientCreator(None), Factory.forProtocol(_Abort))
        self.assertIn("closed the connection during the TLS handshake, before sending a certificate", reason)
        self.assertIn("does not speak TLS", reason)

    def test_server_that_answers_in_plain_text(self):
        reason = self.failure(1, tlsmod.PinnedClientCreator(None), Factory.forProtocol(_Plain))
        self.assertIn("the server does not speak TLS: it answered our TLS hello in plain text", reason)


class HostileCertificateTests(unittest.TestCase):
    """Certificate fields are the peer's words: what the client logs of them
    is one printable line of bounded length."""

    def certificate(self, names, issuer):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .sign(key, hashes.SHA256()))

    def test_control_characters_and_floods_are_neutralised(self):
        from tunnelpass.tunnel.tlsreason import _issuer, names_in

        forged = "a.example\n2030-01-01 [tunnelpass.server] forged\r\x1b[2J"
        names = [forged] + [f"n{i}.example" for i in range(500)] + ["x" * 5000]
        cert = self.certificate(names, "evil\nCN=forged line")
        shown = names_in(cert)
        self.assertTrue(all(name.isprintable() for name in shown), shown)
        self.assertLessEqual(len(shown), 9)
        self.assertEqual(shown[-1], f"and {len(names) - 8} more")
        self.assertTrue(shown[0].startswith("a.example?2030-01-01"), shown[0])
        issuer = _issuer(cert)
        self.assertTrue(issuer.isprintable(), issuer)
        self.assertLessEqual(sum(len(n) for n in shown), 8 * 103 + 20)
