# -*- test-case-name: tests.test_tlsreason -*-
"""Why a client's TLS handshake with the server failed, in words.

OpenSSL reports every verification failure as "certificate verify
failed"; an operator needs to know which: a certificate from a CA the
client does not trust (and who issued it), a name that does not match
(the name expected, the names the certificate has), a pin that does not
match (both fingerprints), or a server that does not speak TLS at all.

:func:`describe_tls_failure` works from what is left once the handshake
has failed: the failure itself, the certificate chain the server sent
(OpenSSL keeps it), and what this client expected (its level, pin, name
and CA file).  For a chain that failed verification it verifies the chain
again with :class:`OpenSSL.crypto.X509StoreContext` to get OpenSSL's own
reason.  Pure apart from reading the ``--ca`` file: no network, no clock.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from tunnelpass.carriers.tls import fingerprint, format_pin

#: OpenSSL reasons that mean the peer answered a ClientHello with bytes
#: that are not TLS (a plain server, an HTTP server, a tunnel frame).
_NOT_TLS = ("wrong version number", "packet length too long", "http request", "unknown protocol",
            "record layer failure", "record_layer_failure", "unexpected message")


@dataclass(frozen=True)
class Expected:
    """What this client expected of the server's certificate."""

    level: int  # 1 pinned / channel-bound, 2 CA-verified
    pin: bytes | None = None
    name: str = ""  # the name a tls=2 certificate must carry (--sni, else the server's host)
    ca: str | None = None  # --ca file (None: the system's roots)


#: At most this many of a certificate's names are quoted, each at most
#: ``_NAME_LIMIT`` characters: the server (or whoever answers in its place)
#: chooses them, and they go into a log line.
_NAMES_SHOWN = 8
_NAME_LIMIT = 100


def printable(text: str, limit: int = _NAME_LIMIT) -> str:
    """*text* as one log-safe line: control and other non-printable
    characters (line breaks included) become ``?``, and it is cut to
    *limit* characters.  Certificate fields are the peer's words."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def names_in(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its
    subjectAltName; its common name only when it has none), made safe to
    log (:func:`printable`) and at most ``_NAMES_SHOWN`` of them (then a
    count of the others)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName) + [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    shown = [printable(name) for name in names[:_NAMES_SHOWN]]
    if len(names) > _NAMES_SHOWN:
        shown.append(f"and {len(names) - _NAMES_SHOWN} more")
    return shown


def _chain_of(connection) -> list[x509.Certificate]:
    """The certificates the server sent, leaf first ([] if none arrived)."""
    get = getattr(connection, "get_peer_cert_chain", None)
    chain = (get() if get is not None else None) or []
    return [c.to_cryptography() for c in chain]


def _openssl_reasons(error: SSL.Error) -> list[str]:
    reasons = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return reasons


def _untrusted_reason(chain: list[x509.Certificate], ca: str | None) -> str | None:
    """OpenSSL's verdict on *chain* against *ca* (or the system's roots),
    or None if it verifies now."""
    store = crypto.X509Store()
    if ca is None:
        paths = ssl.get_default_verify_paths()  # what the handshake trusted: the system's roots
        try:
            store.load_locations(paths.cafile, paths.capath)
        except crypto.Error:
            return "not trusted by the system's CA certificates (give --ca with the issuing CA)"
    else:
        try:
            with open(ca, "rb") as f:
                for root in x509.load_pem_x509_certificates(f.read()):
                    store.add_cert(crypto.X509.from_cryptography(root))
        except (OSError, ValueError) as e:
            return f"cannot read --ca {ca}: {e}"
    leaf = crypto.X509.from_cryptography(chain[0])
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, leaf, untrusted).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e.args[0]) if e.args else "verification failed"
    return None


def _issuer(certificate: x509.Certificate) -> str:
    return printable(certificate.issuer.rfc4514_string(), 200) or "an empty issuer name"


def describe_tls_failure(reason: BaseException | None, connection, expected: Expected, now=None,
                         chain: list | None = None) -> str:
    """One line saying why the handshake failed (never a repr).

    *reason*: the exception the connection was lost with; *chain*: the
    certificates the server sent (a stream's ``peer_certificates()``), or
    else *connection*, an ``OpenSSL.SSL.Connection`` to read them from."""
    if chain is None:  # the peer's certificates, as the stream gives them, or from the connection
        chain = _chain_of(connection) if connection is not None else []
    kind = type(reason).__name__
    if kind == "VerificationError":  # service_identity: the name does not match
        names = ", ".join(names_in(chain[0])) if chain else "(none received)"
        return (f"certificate name mismatch: expected {expected.name!r}, the certificate is for {names} "
                "(set --sni to a name it carries, or fix the server's certificate)")
    reasons = _openssl_reasons(reason) if isinstance(reason, SSL.Error) else []
    if "certificate verify failed" in reasons and chain:
        leaf = chain[0]
        if expected.level == 1 and expected.pin is not None:
            seen = fingerprint(leaf)
            if seen != expected.pin:
                return (f"certificate pin mismatch: expected {format_pin(expected.pin)}, the server presented "
                        f"{format_pin(seen)} (a new server certificate, or a man in the middle)")
        trusted = f"--ca {expected.ca}" if expected.ca else "the system's CA certificates"
        why = _untrusted_reason(chain, expected.ca) or "verification failed"
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if leaf.not_valid_after_utc < now:
            return f"the server's certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({why})"
        return (f"certificate not signed by a trusted CA: issued by {_issuer(leaf)}, not trusted by {trusted} "
                f"(OpenSSL: {why})")
    if any(r in _NOT_TLS for r in reasons):
        return ("the server does not speak TLS: it answered our TLS hello in plain text "
                f"(OpenSSL: {', '.join(reasons)}); check --tls on both ends")
    if reasons:
        return f"TLS error: {', '.join(reasons)}"
    if not chain:
        return ("the server closed the connection during the TLS handshake, before sending a certificate: "
                "it does not speak TLS (a --tls 0 server closes on a TLS hello) or it refused us")
    text = str(reason) if reason is not None else "connection closed"
    return f"the server closed the connection during the TLS handshake ({text})"
