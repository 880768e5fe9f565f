# -*- test-case-name: tests.test_server -*-
"""The server's TLS material: its certificate, and the reload of it.

``--tls 1`` uses a self-signed certificate, generated at the first start
and kept in ``--state-dir`` when one is given (so its fingerprint, which
clients pin, survives restarts); ``--tls 2`` loads ``--cert`` and
``--private-key`` and re-reads them on SIGHUP and every
``--reload-interval`` when the files changed.  A new pair applies to new connections only; a bad pair is logged
and the current one kept.

A mixin of :class:`tunnelpass.tunnel.server.TunnelServer`, kept apart so the
service module holds listeners and sessions, not certificate handling.
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from zope.interface import implementer

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.ops.startup import os_reason
from tunnelpass.ops.osutil import file_stamp
from tunnelpass.ops.starterror import StartupError
from tunnelpass.carriers.tlshalf import HalfCloseTLSFactory


class ServerCertificate:
    """The certificate part of :class:`~tunnelpass.tunnel.server.TunnelServer`:
    sets ``fingerprint``, ``tls_context`` (TLS on the tunnel listener's
    sockets) and ``tls_factory`` (Twisted's TLS, for a reactor without
    sockets: in-memory tests) -- read by the listener, the gate and the
    logged client command."""


    def _load_tls(self) -> None:
        s = self.settings
        if s.tls == 0:
            return
        if s.tls == 1:
            saved = s.state_dir and (os.path.exists(os.path.join(s.state_dir, "tunnelpass.crt"))
                                     or os.path.exists(os.path.join(s.state_dir, "tunnelpass.crt.bak")))
            if saved:
                pair = tlsmod.load_saved_pair(s.state_dir)
            else:
                key, certificate = tlsmod.self_signed()
                if s.state_dir:
                    try:
                        os.makedirs(s.state_dir, mode=0o700, exist_ok=True)
                        tlsmod.save_pair(s.state_dir, key, certificate)
                    except OSError as e:
                        raise StartupError(f"--state-dir {s.state_dir}: cannot save the certificate: "
                                           f"{os_reason(e)}") from None
                pair = (key, [certificate])
        else:
            pair = tlsmod.load_pair(s.cert, s.private_key)
            self._cert_stamp = _stamp(s.cert, s.private_key)
        self._install_pair(*pair)

    #: The ALPN protocol selected for a client that offers it.
    alpn = tlsmod.ALPN_H2

    def _install_pair(self, key, chain) -> None:
        options = tlsmod.server_options(key, chain, self.alpn)
        self.fingerprint = tlsmod.fingerprint(chain[0])
        if self.tls_factory is None:
            self._current_options = _CurrentOptions(options)
            self.tls_factory = HalfCloseTLSFactory(self._current_options, False, Factory())
        else:
            self._current_options.current = options

    def tls_context(self):
        """The current ``SSL.Context`` for TLS on the tunnel listener's
        sockets (:class:`tunnelpass.carriers.tlssocket.TLSServer` asks it per
        accepted connection, so a reload applies to new ones only)."""
        return self._current_options.current.getContext()

    def reload_certificate(self) -> bool:
        """tls=2: adopt the cert/key files if they changed and are a valid pair."""
        s = self.settings
        if s.tls != 2:
            return False
        stamp = _stamp(s.cert, s.private_key)
        if stamp == self._cert_stamp:
            return False
        try:
            key, chain = tlsmod.load_pair(s.cert, s.private_key)
        except tlsmod.CertificateError as e:
            self.log.error("certificate reload failed, keeping the current one: {error}", error=str(e))
            return False
        self._cert_stamp = stamp
        self._install_pair(key, chain)
        self.log.info("certificate reloaded: {pin}", pin=tlsmod.format_pin(self.fingerprint), event="cert_reloaded")
        return True


@implementer(IOpenSSLServerConnectionCreator)


class _CurrentOptions:
    """TLS connections from whichever options are current, so a reloaded
    certificate applies to new connections and live ones keep theirs."""

    def __init__(self, options):
        self.current = options

    def serverConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.current.getContext(), None)
        connection.set_app_data(tls_protocol)
        connection.set_accept_state()
        return connection


def _stamp(*paths):
    return tuple(file_stamp(path) for path in paths)
