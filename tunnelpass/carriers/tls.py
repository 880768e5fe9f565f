# -*- test-case-name: tests.test_tls -*-
"""Certificates and TLS contexts for the tunnel's TLS levels (``--tls 1|2``).

* :func:`self_signed` makes the EC P-256 certificate of ``--tls 1``;
* :func:`fingerprint` is the SHA-256 of a certificate's DER form, the value
  pinned with ``--pin sha256:HEX`` and bound into the handshake;
* :func:`load_pair` reads a ``--cert``/``--private-key`` pair and refuses a
  key that does not match its certificate (a reload keeps the old pair then);
* :func:`save_pair` / :func:`load_saved_pair` persist a pair so that a crash
  never leaves it unloadable (temp files, fsync, ``.bak`` links, rename).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import tempfile

import hmac

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from zope.interface import implementer

from tunnelpass.config.settings import is_ip_literal
from tunnelpass.carriers.stream import IStream


class CertificateError(ValueError):
    """A certificate or key is unusable; the message says why."""


def self_signed(common_name: str = "tunnelpass", days: int = 3650, now=None):
    """A fresh EC P-256 key and a self-signed certificate for it (with SAN)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def fingerprint(certificate: x509.Certificate) -> bytes:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


def format_pin(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def parse_pin(text: str) -> bytes:
    """``sha256:HEX`` (colons between byte pairs allowed) -> 32 bytes."""
    prefix, _, value = text.partition(":")
    if prefix.lower() != "sha256" or not value:
        raise ValueError("a pin looks like sha256:<64 hex digits>")
    hexdigits = value.replace(":", "").strip()
    if len(hexdigits) != 64:
        raise ValueError("a sha256 pin has 64 hex digits")
    try:
        return bytes.fromhex(hexdigits)
    except ValueError:
        raise ValueError("a pin must be hexadecimal") from None


def load_pair(cert_path: str, key_path: str):
    """Load and cross-check a PEM certificate (chain) and its private key."""
    try:
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as e:
        raise CertificateError(f"{cert_path}: cannot load certificate: {e}") from None
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertificateError(f"{key_path}: cannot load private key: {e}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CertificateError(f"{key_path} is not the private key of {cert_path}")
    return key, chain


def save_pair(directory: str, key, certificate, name: str = "tunnelpass") -> tuple[str, str]:
    """Write ``NAME.crt``/``NAME.key`` so that a crash at any point leaves a
    loadable pair: both are written to private temp files and fsynced, the
    current pair is hard-linked to ``.bak`` (the live names never vanish),
    then key and certificate are renamed into place and the directory is
    fsynced.  :func:`load_saved_pair` falls back to the ``.bak`` pair."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, name + ".crt")
    key_path = os.path.join(directory, name + ".key")
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_cert = certificate.public_bytes(serialization.Encoding.PEM)
    staged = [(_write_private_temp(directory, data), path) for path, data in ((key_path, pem_key), (cert_path, pem_cert))]
    for _, path in staged:
        if os.path.exists(path):
            backup = path + ".bak"
            if os.path.lexists(backup):
                os.unlink(backup)
            os.link(path, backup)
    for tmp, path in staged:
        os.replace(tmp, path)
    _fsync_directory(directory)
    return cert_path, key_path


def load_saved_pair(directory: str, name: str = "tunnelpass"):
    """Load a pair written by :func:`save_pair`, or its backup if the current
    one is damaged or mismatched; :class:`CertificateError` if neither loads."""
    cert_path = os.path.join(directory, name + ".crt")
    key_path = os.path.join(directory, name + ".key")
    try:
        return load_pair(cert_path, key_path)
    except CertificateError as first:
        try:
            return load_pair(cert_path + ".bak", key_path + ".bak")
        except CertificateError:
            raise first from None


def _write_private_temp(directory: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tunnelpass-", suffix=".tmp")  # O_EXCL, 0600
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _fsync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Twisted TLS contexts for the three modes

#: TLS 1.3 suites, AES-128-GCM first (AES-NI; what ``ssh -L`` with
#: aes128-gcm is compared with); the others stay for old peers.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: TLS 1.2 ciphers (forward secret AEAD only), AES-128-GCM first.
TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                 b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def tune_context(context: SSL.Context) -> SSL.Context:
    """What every tunnel TLS context gets: TLS 1.2 or newer, no
    renegotiation, OpenSSL's buffers released while a connection is idle
    (memory per idle connection), partial writes from a buffer that may
    move between retries (Twisted's write buffer), AES-128-GCM preferred."""
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS | _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
                     | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
    context.set_tls13_ciphersuites(TLS13_SUITES)
    context.set_cipher_list(TLS12_CIPHERS)
    return context


ALPN_H2 = b"h2"
ALPN_HTTP1 = b"http/1.1"


def server_options(key, chain, alpn: bytes = ALPN_H2) -> CertificateOptions:
    """The server side of ``--tls 1`` and ``--tls 2``: TLS 1.2 or newer;
    ALPN *alpn* for a client that offers it (the tunnel's ``h2``: a
    multiplexed carrier connection; the master's API: ``http/1.1``, which
    is all it speaks), none for the others."""
    options = CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=list(chain[1:]) or None,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    context = tune_context(options.getContext())  # built once and cached by the options
    context.set_alpn_select_callback(
        lambda connection, offered: alpn if alpn in offered else SSL.NO_OVERLAPPING_PROTOCOLS)
    return options


class ALPNCreator:
    """A client connection creator that offers ALPN *protocols* on top of
    what *creator* does (identity checks included)."""

    def __init__(self, creator, protocols=(ALPN_H2,)):
        self.creator = creator
        self.protocols = list(protocols)

    def clientConnectionForTLS(self, tls_protocol):
        connection = self.creator.clientConnectionForTLS(tls_protocol)
        connection.set_alpn_protos(self.protocols)
        return connection

    def socket_connection(self, sock) -> SSL.Connection:
        connection = self.creator.socket_connection(sock)
        connection.set_alpn_protos(self.protocols)
        return connection

    def check(self, connection) -> None:
        self.creator.check(connection)


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientCreator:
    """Client side of ``--tls 1``: the server's certificate is self-signed, so
    no CA can vouch for it.  With a pin, the handshake fails unless the
    leaf certificate's SHA-256 equals it (checked inside OpenSSL's verify
    callback, before any application byte); without one, the certificate
    is accepted here and the tunnel handshake's channel binding decides.
    """

    def __init__(self, pin: bytes | None = None):
        self.pin = pin
        self._context = tune_context(SSL.Context(SSL.TLS_METHOD))
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, connection, certificate, error, depth, ok) -> bool:
        if depth != 0 or self.pin is None:
            return True  # only the leaf is pinned; intermediates are irrelevant
        return hmac.compare_digest(fingerprint(certificate.to_cryptography()), self.pin)

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        return connection

    def socket_connection(self, sock) -> SSL.Connection:
        """TLS on *sock* itself (:mod:`tunnelpass.carriers.tlssocket`)."""
        connection = SSL.Connection(self._context, sock)
        connection.set_connect_state()
        return connection

    def check(self, connection) -> None:
        """Nothing after the handshake: the pin was checked inside it."""


@implementer(IOpenSSLClientConnectionCreator)
class VerifiedClientCreator:
    """Client side of ``--tls 2``: the chain is verified against the CA
    roots inside the handshake, the name (SNI and the certificate's
    subjectAltName, :mod:`service_identity`) right after it.

    ``clientConnectionForTLS`` is Twisted's own (the control connection
    runs on Twisted's TLS); ``socket_connection`` + ``check`` are the same
    policy for TLS on the socket (pool connections)."""

    def __init__(self, hostname: str, roots: list | None, twisted_creator):
        self.hostname = hostname
        self.is_ip = is_ip_literal(hostname)
        self.twisted_creator = twisted_creator
        self._context = tune_context(SSL.Context(SSL.TLS_METHOD))
        self._context.set_verify(SSL.VERIFY_PEER, lambda connection, certificate, error, depth, ok: bool(ok))
        if roots is None:
            self._context.set_default_verify_paths()
        else:
            store = self._context.get_cert_store()
            for root in roots:
                store.add_cert(crypto.X509.from_cryptography(root))
        self._sni = None if self.is_ip else hostname.encode("idna")

    def clientConnectionForTLS(self, tls_protocol):
        return self.twisted_creator.clientConnectionForTLS(tls_protocol)

    def socket_connection(self, sock) -> SSL.Connection:
        connection = SSL.Connection(self._context, sock)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        connection.set_connect_state()
        return connection

    def check(self, connection) -> None:
        """Raise ``service_identity.VerificationError`` unless the verified
        certificate is for :attr:`hostname`."""
        if self.is_ip:
            verify_ip_address(connection, self.hostname)
        else:
            verify_hostname(connection, self.hostname)


def verified_client_creator(hostname: str, ca_path: str | None = None):
    """Client side of ``--tls 2``: chain and hostname verified against
    *ca_path* (PEM, one or more certificates) or the system's roots."""
    roots = None
    if ca_path is None:
        trust = platformTrust()
    else:
        try:
            with open(ca_path, "rb") as f:
                roots = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError) as e:
            raise CertificateError(f"{ca_path}: cannot load CA certificates: {e}") from None
        trust = trustRootFromCertificates(
            [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in roots]
        )
    if hostname.startswith("[") and hostname.endswith("]"):
        hostname = hostname[1:-1]  # an IPv6 literal as URLs write it
    try:
        twisted_creator = optionsForClientTLS(
            hostname, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
        )
        return VerifiedClientCreator(hostname, roots, twisted_creator)
    except (ValueError, UnicodeError) as e:  # e.g. a name IDNA cannot encode
        raise CertificateError(f"cannot verify a certificate for {hostname!r}: {e}") from None


def local_fingerprint(transport) -> bytes:
    """SHA-256 of the certificate this side served on *transport* (``b""``
    without TLS, or for a transport that is no stream): after a reload, old
    and new connections differ."""
    stream = IStream(transport, None)
    return stream.local_fingerprint() if stream is not None else b""


def peer_fingerprint(transport) -> bytes:
    """SHA-256 of the certificate the peer presented (``b""`` without TLS,
    or for a transport that is no stream)."""
    stream = IStream(transport, None)
    return stream.peer_fingerprint() if stream is not None else b""
