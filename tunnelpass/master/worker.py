# -*- test-case-name: tests.test_master_supervisor -*-
"""A worker process of the master: ``python -m tunnelpass.master.worker``.

It hosts many tunnel instances in its reactor (:class:`~tunnelpass.master.hosting.InstanceHost`),
takes commands from the master on stdin and writes events on fd 3, both
JSON lines (:mod:`tunnelpass.master.workerwire`).  Standard output and
standard error are the master's to log as this worker's lines; log events
no instance owns go to standard error as text.

It never outlives its master: it asks the kernel for SIGKILL when the
master dies (``prctl(PR_SET_PDEATHSIG)``, Linux), checks that the master is
still its parent right after, and exits at once when its stdin ends.
SIGTERM or SIGINT stops every instance (each drained within its own
``--shutdown-timeout``) and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import sys

from twisted.internet import protocol
from twisted.logger import FilteringLogObserver, Logger, LogLevelFilterPredicate, PredicateResult, \
    globalLogBeginner, textFileLogObserver

from tunnelpass.master.workerwire import LOG_LEVELS, CommandDecoder, WireError, encode

PR_SET_PDEATHSIG = 1
EVENTS_FD = 3

#: Seconds a stopping worker waits for the master to read its last events.
FLUSH_GRACE = 2.0

log = Logger(namespace="tunnelpass.master.worker")


def die_with_parent(parent: int | None) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if
    the parent *parent* is already gone (it died before the prctl)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m tunnelpass.master.worker")
    parser.add_argument("--report-interval", type=float, default=5.0)
    parser.add_argument("--log", choices=LOG_LEVELS, default="info", help="level of the worker's own lines")
    parser.add_argument("--parent", type=int, default=None, help="the master's pid")
    return parser.parse_args(argv)


_CHATTER = re.compile(r"^\(\w+ Port \d+ Closed\)$|^\S+ starting on \d+$")


def socket_chatter(level: str):
    """Twisted's own "X starting on N" / "(TCP Port N Closed)" lines that
    no instance could be found for (a port closing a tick after its stop):
    kept out of the master's log unless the worker logs at debug."""

    def predicate(event) -> PredicateResult:
        if level != "debug" and event.get("log_namespace") == "log_legacy":
            message = event.get("message")
            if message and _CHATTER.match(" ".join(map(str, message))):
                return PredicateResult.no
        return PredicateResult.maybe

    return predicate


class CommandProtocol(protocol.Protocol):
    """Reads the master's commands on stdin (via ``StandardIO``, whose
    output is fd 3) and carries them out on the host."""

    def __init__(self, host, on_eof):
        self.host = host
        self.on_eof = on_eof
        self.decoder = CommandDecoder()

    def dataReceived(self, data: bytes) -> None:
        try:
            commands = self.decoder.feed(data)
        except WireError as e:
            log.critical("worker: bad command from the master: {error}; exiting", error=str(e))
            self.on_eof()
            return
        for command in commands:
            try:
                if command["op"] == "start":
                    self.host.start(command["id"], command["url"], command["dir"], command["log"])
                else:
                    self.host.stop(command["id"], float(command["timeout"]))
            except Exception:
                log.failure("worker: command {op} failed", op=command["op"])

    def connectionLost(self, reason=None) -> None:
        self.on_eof()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent(args.parent)

    from twisted.internet import reactor, stdio
    from twisted.internet.task import deferLater

    from tunnelpass.master.hosting import InstanceHost
    from tunnelpass.ops.logs import LEVELS as TWISTED_LEVELS

    fallback = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=TWISTED_LEVELS[args.log]),
                                     socket_chatter(args.log)])
    writer = []  # the StandardIO transport, once made

    def send(id: str, kind: str, data: dict) -> None:
        message = {"ev": kind, "id": id, **data}
        try:
            line = encode(message)
        except (WireError, ValueError, TypeError):
            return
        if writer:
            writer[0].write(line)

    host = InstanceHost(reactor, send, args.report_interval, fallback=fallback)
    globalLogBeginner.beginLoggingTo([host], redirectStandardIO=False, discardBuffer=True)

    def eof() -> None:
        # The master is gone (or closed our stdin to end us): no drain.
        os._exit(0)

    io = stdio.StandardIO(CommandProtocol(host, eof), stdin=0, stdout=EVENTS_FD, reactor=reactor)
    writer.append(io)
    io.write(encode({"ev": "hello", "pid": os.getpid()}))
    def drain():
        # SIGTERM/SIGINT: stop every instance, then flush the events (their
        # "stopped") and exit as the output closes; bounded either way.
        d = host.stop_all()
        d.addBoth(lambda _: io.loseConnection())
        d.addBoth(lambda _: deferLater(reactor, FLUSH_GRACE, lambda: None))
        return d

    reactor.addSystemEventTrigger("before", "shutdown", drain)
    reactor.callWhenRunning(host.start_reports)
    reactor.run()  # SIGTERM/SIGINT: the reactor stops, "before shutdown" drains the instances
    os._exit(0)


if __name__ == "__main__":
    main()
