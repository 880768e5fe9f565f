# -*- test-case-name: tests.test_pump -*-
"""Native socket ends (:class:`tunnelpass.carriers.stream.INativeEnd`): one socket as
a relay engine (:mod:`tunnelpass.relay.splice`, :mod:`tunnelpass.relay.pump`) drives it
from the reactor's readiness events, with the Twisted transport out of the
loop.

* :class:`SocketEnd`: a plain TCP socket.  Its ``recv_into``/``send`` are the
  socket's own bound methods (no Python layer per call); ``EAGAIN`` comes as
  the plain ``BlockingIOError``, meaning the natural readiness (readable for
  a read, writable for a write).
* :class:`TLSEnd`: TLS done by OpenSSL on the socket itself (a pyOpenSSL
  ``SSL.Connection`` built over the socket, as the TLS carrier
  :mod:`tunnelpass.carriers.tlssocket` holds it in ``transport.socket``).  OpenSSL's
  want-read / want-write become :class:`~tunnelpass.carriers.stream.NeedRead` /
  :class:`~tunnelpass.carriers.stream.NeedWrite`, close_notify is a clean end (0), a
  TCP end without close_notify (truncation) is ``ConnectionResetError``,
  any other TLS error is :class:`TLSEndError`.

This is a carrier module: it is where the socket and the TLS library are
touched, so that the engines never type-check a transport.
"""

from __future__ import annotations

import socket

from OpenSSL import SSL
from zope.interface import implementer

from tunnelpass.carriers.stream import INativeEnd, NeedRead, NeedWrite, socket_unsent

try:  # pyOpenSSL's own cffi handles: read straight into the engine's buffer
    from OpenSSL.SSL import _ffi, _lib  # type: ignore[attr-defined]
    _FAST_READ = hasattr(_lib, "SSL_read") and hasattr(_ffi, "from_buffer")
except ImportError:  # pragma: no cover - a pyOpenSSL without them
    _FAST_READ = False


class TLSEndError(OSError):
    """A TLS protocol error on a native end (bad record, alert, ...): an
    abnormal end, with OpenSSL's reason as text."""


@implementer(INativeEnd)
class SocketEnd:
    """A plain TCP socket of a Twisted transport."""

    kind = "socket"
    __slots__ = ("transport", "sock", "recv_into", "send", "fd")

    def __init__(self, transport):
        self.transport = transport
        self.sock = transport.socket
        self.fd = self.sock.fileno()
        self.recv_into = self.sock.recv_into
        self.send = self.sock.send

    def fileno(self) -> int:
        return self.fd

    def pending(self) -> int:
        return 0

    def shutdown_write(self) -> bool:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the engine learns it from the next read or write
        return True

    def unsent(self) -> int:
        return socket_unsent(self.sock)


@implementer(INativeEnd)
class TLSEnd:
    """A pyOpenSSL ``SSL.Connection`` over a socket (handshake done).

    *connection* defaults to ``transport.socket``, where the TLS carrier
    keeps it."""

    kind = "tls"
    __slots__ = ("transport", "conn", "fd", "_ssl", "_notified", "pending")

    def __init__(self, transport, connection: SSL.Connection | None = None):
        self.transport = transport
        self.conn = connection if connection is not None else transport.socket
        self.fd = self.conn.fileno()
        self._ssl = getattr(self.conn, "_ssl", None) if _FAST_READ else None
        self._notified = False  # close_notify sent
        self.pending = self.conn.pending

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, buffer) -> int:
        try:
            if self._ssl is not None:
                # SSL_read into the caller's buffer: pyOpenSSL's recv_into
                # would allocate a fresh buffer of len(buffer) and copy.
                with _ffi.from_buffer(buffer, require_writable=True) as data:
                    result = _lib.SSL_read(self._ssl, data, len(buffer))
                if result > 0:
                    return result
                self.conn._raise_ssl_error(self._ssl, result)
            return self.conn.recv_into(buffer)
        except SSL.WantReadError:
            raise NeedRead() from None
        except SSL.WantWriteError:
            raise NeedWrite() from None
        except SSL.ZeroReturnError:
            return 0  # close_notify: the peer's clean end of data
        except SSL.SysCallError as e:
            raise _syscall_error(e) from None
        except SSL.Error as e:
            raise TLSEndError(_reason(e)) from None

    def send(self, data) -> int:
        try:
            return self.conn.send(data)
        except SSL.WantWriteError:
            raise NeedWrite() from None
        except SSL.WantReadError:
            raise NeedRead() from None
        except SSL.SysCallError as e:
            raise _syscall_error(e) from None
        except SSL.Error as e:
            raise TLSEndError(_reason(e)) from None

    def shutdown_write(self) -> bool:
        """close_notify once (``SSL_shutdown`` without waiting for the
        peer's); False while the socket cannot take it.  No TCP FIN
        follows: a TLS peer on Twisted's TLS (an older tunnelpass) reads a
        FIN as the end of both directions, and the direction still open
        would be cut.  The socket closes once both directions are done."""
        if not self._notified:
            try:
                self.conn.shutdown()
            except (SSL.WantWriteError, SSL.WantReadError):
                return False
            except (SSL.Error, OSError):
                pass  # broken: the next read or write reports it
            self._notified = True
        return True

    def unsent(self) -> int:
        return socket_unsent(self.conn)


def _syscall_error(e: SSL.SysCallError) -> OSError:
    """pyOpenSSL's ``SysCallError(errno, text)``, ``(-1, "Unexpected EOF")``
    for a TCP end without close_notify: both are abnormal ends."""
    code = e.args[0] if e.args and isinstance(e.args[0], int) else -1
    text = e.args[1] if len(e.args) > 1 else str(e)
    if code > 0:
        error = OSError(code, text)
        return error if isinstance(error, ConnectionError) else ConnectionResetError(code, text)
    return ConnectionResetError(f"TLS stream cut without close_notify ({text})")


def _reason(e: SSL.Error) -> str:
    """OpenSSL's error queue as one line (``[(lib, func, reason), ...]``)."""
    details = e.args[0] if e.args else None
    if isinstance(details, list) and details:
        return "; ".join(str(entry[-1]) for entry in details if entry)
    return str(e) or type(e).__name__
