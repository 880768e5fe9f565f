# -*- test-case-name: tests.test_fdport -*-
"""A TCP listening port that handles running out of descriptors itself.

Twisted's ``tcp.Port`` copes with ``EMFILE`` on ``accept()`` by giving up a
reserved descriptor and accepting-and-closing what waits, but it says so
only at info level, three lines per connection, and nobody counts the
connections it closed.  :class:`BudgetPort` does the same recovery and
reports it once per batch to :class:`~tunnelpass.ops.fdbudget.Descriptors`
(a throttled warning and ``fd_exhausted``), with the closed connections
counted as refused by the listener's stats.

It also refuses, the same way, a connection whose descriptor lands in the
last few kept for work already admitted: POSIX hands out the lowest free
descriptor number, so an accepted descriptor numbered *n* means at least
*n* others are open -- a check that costs no system call.

:func:`listen_tcp` is ``reactor.listenTCP`` with this port on a real POSIX
reactor (and the reactor's own elsewhere, e.g. in memory in tests).
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import tcp
from twisted.logger import Logger

from tunnelpass.ops.fdbudget import Descriptors
from tunnelpass.carriers.tlssocket import TLSPort, TLSServer

#: Seconds to stop accepting when nothing can be freed to accept-and-close.
PAUSE = 0.1
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
_SKIP = (errno.EPERM, errno.ECONNABORTED, errno.EINTR)
_NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)
_NO_MEMORY = (errno.ENOBUFS, errno.ENOMEM)


class SpareDescriptor:
    """One descriptor (``/dev/null``) held open to be given up when
    ``accept()`` fails for want of one: then what waits can be accepted and
    closed (a prompt refusal) instead of staying queued."""

    def __init__(self, opener=None, closer=os.close):
        self._opener = opener or (lambda: os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        self._closer = closer
        self.fd: int | None = None

    def take(self) -> bool:
        """Hold a descriptor (again); False if none can be had now."""
        if self.fd is None:
            try:
                self.fd = self._opener()
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Give the descriptor up; False if none was held."""
        if self.fd is None:
            return False
        fd, self.fd = self.fd, None
        self._closer(fd)
        return True


#: One per process is enough: everything runs in the reactor thread.
SPARE = SpareDescriptor()


class BudgetPort(tcp.Port):
    """``tcp.Port`` whose accept loop reports running out of descriptors."""

    _log = Logger(namespace="tunnelpass.fd")
    _pause_call = None
    transport = TLSServer  # plain TCP unless tls_context is given (see tunnelpass.carriers.tlssocket)

    def __init__(self, port, factory, backlog, interface, reactor, descriptors: Descriptors,
                 stats=None, name: str = "", spare: SpareDescriptor = SPARE, tls_context=None):
        super().__init__(port, factory, backlog, interface, reactor)
        self.descriptors, self.stats, self.name, self.spare = descriptors, stats, name, spare
        self.tls_context = tls_context

    def startListening(self) -> None:
        super().startListening()
        self.spare.take()

    def doRead(self) -> None:
        try:
            self._accept_some()
        except Exception:
            self._log.failure("{listener}: accept failed", listener=self.name)

    def _accept_some(self) -> None:
        accepted = refused = 0
        for _ in range(self.numberAccepts):
            try:
                skt, addr = self.socket.accept()
            except OSError as e:
                if e.errno in _AGAIN:
                    break
                if e.errno in _SKIP:
                    continue
                if e.errno in _NO_DESCRIPTOR or e.errno in _NO_MEMORY:
                    if refused:
                        self._report("reserve", refused)
                    self._ran_out(e.errno)
                    return
                raise
            if skt.fileno() >= self.descriptors.ceiling:
                skt.close()  # it would take one of the last few: refuse it
                refused += 1
                continue
            accepted += 1
            self._serve(skt, addr)
        if refused:
            self._report("reserve", refused)
        # Twisted's own scaling of the accept batch.
        if accepted + refused >= self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted + refused)

    def _serve(self, skt: socket.socket, addr) -> None:
        if len(addr) == 4:  # IPv6: keep the scope id, as tcp.Port does
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = tuple([host[0]] + list(addr[1:]))
        protocol = self.factory.buildProtocol(self._buildAddr(addr))
        if protocol is None:
            skt.close()
            return
        self.descriptors.spend(1)
        session, self.sessionno = self.sessionno, self.sessionno + 1
        protocol.makeConnection(self.transport(skt, protocol, addr, self, session, self.reactor))

    def _ran_out(self, code: int) -> None:
        """accept() failed for want of a descriptor or of memory: with a
        spare descriptor given up, accept and close what waits; otherwise
        stop accepting for a moment (the kernel keeps the queue)."""
        closed = 0
        if code in _NO_DESCRIPTOR and self.spare.release():
            try:
                while closed < self.numberAccepts:
                    try:
                        skt, _ = self.socket.accept()
                    except OSError:
                        break
                    skt.close()
                    closed += 1
            finally:
                self.spare.take()
        if not closed:
            self.spare.take()  # maybe something was closed since
            self.stopReading()
            self._pause_call = self.reactor.callLater(PAUSE, self._resume)
        self._report(errno.errorcode.get(code, str(code)), closed)

    def _resume(self) -> None:
        self._pause_call = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def _report(self, code: str, refused: int) -> None:
        if self.stats is not None:
            self.stats.refused += refused
        self.descriptors.ran_out("accept", code, lost=refused, listener=self.name)

    def connectionLost(self, reason) -> None:
        if self._pause_call is not None and self._pause_call.active():
            self._pause_call.cancel()
        self._pause_call = None
        super().connectionLost(reason)


def listen_tcp(reactor, port: int, factory, backlog: int, interface: str, descriptors: Descriptors | None,
               stats=None, name: str = "", tls_context=None):
    """``reactor.listenTCP`` with a :class:`BudgetPort` (a real POSIX
    reactor and a budget given), else the reactor's own port.  With
    *tls_context* (a callable returning the current ``SSL.Context``) a
    connection that starts with a TLS record gets TLS on its socket
    (:class:`tunnelpass.carriers.tlssocket.TLSServer`); a reactor without sockets
    gets its own port, and Twisted's TLS is the gate's business then."""
    from twisted.internet.posixbase import PosixReactorBase

    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog, interface)
    if descriptors is None:
        if tls_context is None:
            return reactor.listenTCP(port, factory, backlog, interface)
        listening = TLSPort(port, factory, backlog, interface, reactor, tls_context)
    else:
        listening = BudgetPort(port, factory, backlog, interface, reactor, descriptors, stats, name,
                               tls_context=tls_context)
    listening.startListening()
    return listening
