# -*- test-case-name: tests.test_forward -*-
"""Process signals for the long-running services (forward, server, client).

* twistd's own SIGTERM/SIGINT handlers make the process die by the signal
  (exit status 143/130) after shutdown; a drained, orderly stop should exit
  0, so ours just stop the reactor (services drain in ``stopService``).
  The reactor installs its own when it starts, so services call
  :meth:`Signals.install_stop` twice: in ``privilegedStartService`` (a
  signal during startup) and from ``reactor.callWhenRunning``.
* SIGHUP would kill twistd (exit 129, no ``stopService``): services that
  reload install it with :meth:`Signals.install`.
* A handler only schedules its action in the reactor thread: signals may
  interrupt the reactor anywhere, so no work happens inside them.
"""

from __future__ import annotations

import signal

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

log = Logger(namespace="tunnelpass")


class Signals:
    def __init__(self, reactor):
        self.reactor = reactor
        self._old: dict[int, object] = {}

    def install(self, number: int, action) -> None:
        """Run *action* in the reactor thread on signal *number*."""
        def handler(signum, frame):
            self.reactor.callFromThread(action)

        self._old.setdefault(number, signal.getsignal(number))
        signal.signal(number, handler)

    def install_stop(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.install(number, lambda n=number: self._stop(n))

    def _stop(self, number: int) -> None:
        name = signal.Signals(number).name
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            log.info("received {signal} while already shutting down", signal=name)
        else:
            log.info("received {signal}, shutting down", signal=name)

    def restore(self) -> None:
        for number, old in self._old.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)
        self._old.clear()
