# -*- test-case-name: tests.test_enginepoll -*-
"""One epoll set for every native relay engine, driven by the reactor.

Request/response traffic through a relay is a stream of small events, and
at tens of thousands of them a second the reactor's own dispatch (a logging
context and a call chain around every ``doRead``) costs as much as the
relaying itself.  The engines' sockets therefore live in an epoll set of
their own: the reactor watches only that set's descriptor, which is
readable while any engine socket is ready, and one reactor event then runs
every ready engine socket in a batch, calling its ``doRead`` / ``doWrite``
directly.  The set is level-triggered like the reactor's: a batch capped
at :data:`BATCH` leaves the rest ready for the next reactor iteration, so
other work is never starved.

:func:`poller_for` gives the reactor's set (made on first use), or the
reactor itself when it is not an epoll reactor (tests' memory reactors):
both offer ``addReader``/``removeReader``/``addWriter``/``removeWriter``.
"""

from __future__ import annotations

import select
import weakref

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

#: Ready sockets handled per reactor event at most.
BATCH = 512

_READ = select.EPOLLIN if hasattr(select, "EPOLLIN") else 0
_WRITE = select.EPOLLOUT if hasattr(select, "EPOLLOUT") else 0
_BROKEN = (select.EPOLLHUP | select.EPOLLERR) if hasattr(select, "EPOLLHUP") else 0

_pollers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
log = Logger(namespace="tunnelpass.relay")


def poller_for(reactor):
    """The engines' epoll set on *reactor*, or *reactor* itself when it
    does not run on epoll."""
    poller = _pollers.get(reactor)
    if poller is None:
        if not hasattr(select, "epoll") or not hasattr(reactor, "_poller"):
            return reactor
        poller = _pollers[reactor] = EnginePoller(reactor)
    return poller


class EnginePoller:
    """An epoll set of engine sockets, itself one reader of the reactor."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.epoll = select.epoll()
        self.selectables: dict[int, object] = {}
        self.masks: dict[int, int] = {}
        self.watched = False

    # The reactor's view: one readable descriptor

    def fileno(self) -> int:
        return self.epoll.fileno()

    def logPrefix(self) -> str:
        return "tunnelpass-engines"

    def doRead(self):
        selectables, masks = self.selectables, self.masks
        for fd, event in self.epoll.poll(0, BATCH):
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event & _BROKEN and not event & _READ:
                    self._drop(selectable, fd)
                    selectable.connectionLost(Failure(ConnectionDone() if event & select.EPOLLHUP
                                                      else ConnectionLost()))
                    continue
                if event & _READ and masks.get(fd, 0) & _READ:
                    selectable.doRead()
                if event & _WRITE and masks.get(fd, 0) & _WRITE and selectables.get(fd) is selectable:
                    selectable.doWrite()
            except Exception:
                log.failure("a relay engine failed handling its socket")
                self._drop(selectable, fd)
                try:
                    selectable.connectionLost(Failure())
                except Exception:
                    log.failure("a relay engine failed closing after an error")
        return None

    def connectionLost(self, reason) -> None:
        """The reactor is shutting down (or lost the set): every engine
        socket is lost with it."""
        selectables = list(self.selectables.values())
        self.watched = False  # the reactor has already let go of the set
        for fd in list(self.selectables):
            self._unregister(fd)
        for selectable in selectables:
            try:
                selectable.connectionLost(reason)
            except Exception:
                log.failure("a relay engine failed closing at shutdown")

    # The engines' view: the reactor's registration calls

    def addReader(self, selectable) -> None:
        self._set(selectable, _READ, True)

    def removeReader(self, selectable) -> None:
        self._set(selectable, _READ, False)

    def addWriter(self, selectable) -> None:
        self._set(selectable, _WRITE, True)

    def removeWriter(self, selectable) -> None:
        self._set(selectable, _WRITE, False)

    def getReaders(self) -> list:
        return [self.selectables[fd] for fd, mask in self.masks.items() if mask & _READ]

    def getWriters(self) -> list:
        return [self.selectables[fd] for fd, mask in self.masks.items() if mask & _WRITE]

    def _set(self, selectable, flag: int, on: bool) -> None:
        fd = selectable.fileno()
        if fd < 0:
            return
        old = self.masks.get(fd, 0)
        new = old | flag if on else old & ~flag
        if new == old and (not new or self.selectables.get(fd) is selectable):
            return
        if not new:
            self._unregister(fd)
            return
        try:
            if old:
                self.epoll.modify(fd, new)
            else:
                self.epoll.register(fd, new)
        except FileNotFoundError:  # the socket was closed and its number reused
            self.epoll.register(fd, new)
        except FileExistsError:
            self.epoll.modify(fd, new)
        self.masks[fd] = new
        self.selectables[fd] = selectable
        if not self.watched:
            self.watched = True
            self.reactor.addReader(self)

    def _drop(self, selectable, fd: int) -> None:
        if self.selectables.get(fd) is selectable:
            self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        self.masks.pop(fd, None)
        self.selectables.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed: the kernel dropped it from the set
        if not self.selectables and self.watched:
            self.watched = False  # nothing to watch: the reactor need not (and may then stop clean)
            self.reactor.removeReader(self)
