# -*- test-case-name: tests.test_logs -*-
"""``--log debug``: a trace of each relayed TCP connection.

One debug line per step, all under the ``tunnelpass.conn`` namespace and
numbered per process (``conn``) so the lines of one connection can be
grepped together:

* ``conn_accept``: a connection to relay arrived (``peer``; ``user``, the
  user's own address when a PROXY header or the tunnel's OPEN frame says
  it -- on the side of a tunnel that dials, the accepted connection is a
  pool connection from the other side);
* ``conn_pool_claim``: it took an idle pool connection (``wait_ms``);
* ``conn_dial``: its remote answered (``target``, ``connect_ms``), or
  ``conn_dial_failed`` (``target``, ``reason``, ``detail``);
* ``conn_close``: it ended (``reason``, ``detail``, ``bytes_in`` from the
  accepted side, ``bytes_out`` to it, ``duration_ms``).

Close reasons: ``normal`` (both sides finished with FIN or close_notify),
``reset`` (a side was reset, or its TLS or stream was cut), ``timeout``
(idle past ``--idle``/``--read``), ``aborted`` (cut at the end of the
shutdown drain), ``cancelled`` (the user left before the remote answered),
``no_pool`` (no pool connection within ``--pool-timeout``, or no session),
and for a failed dial ``refused``, ``connect_timeout``, ``unresolved``,
``unreachable`` or ``connect_failed``.

Tracing costs nothing unless the log level is debug: :data:`TRACING` is
switched on by ``makeService`` and each hook returns at once for a
connection that has no :class:`Trace`.
"""

from __future__ import annotations

import itertools

from twisted.internet import error
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger

from tunnelpass.config.settings import format_address

log = Logger(namespace="tunnelpass.conn")


class _Switch:
    """Whether new connections are traced (``--log debug``)."""

    enabled = False


TRACING = _Switch()
_numbers = itertools.count(1)

#: Dial failures by exception type, checked in order.
_DIAL_REASONS = (
    (error.ConnectionRefusedError, "refused"),
    ((error.TimeoutError, error.TCPTimedOutError, TimeoutError, CancelledError), "connect_timeout"),
    (error.DNSLookupError, "unresolved"),
    ((error.NoRouteError, error.UnknownHostError), "unreachable"),
)


class Trace:
    """What the trace of one connection needs to remember."""

    __slots__ = ("number", "clock", "started", "dial_started", "target", "reason", "detail")

    def __init__(self, clock):
        self.number = next(_numbers)
        self.clock = clock
        self.started = clock.seconds()
        self.dial_started = self.target = self.reason = self.detail = None

    def elapsed_ms(self, since: float) -> float:
        return round((self.clock.seconds() - since) * 1000, 3)


def _address(address) -> str | None:
    host = getattr(address, "host", None)
    if host is None:
        return None
    return format_address(host, getattr(address, "port", 0))


def _user(original) -> str | None:
    if not original:
        return None
    (host, port), _ = original
    return format_address(host, port) if host else None


def dial_reason(failure) -> str:
    """The close reason for a failed dial, from its failure."""
    for kinds, name in _DIAL_REASONS:
        if failure.check(*(kinds if isinstance(kinds, tuple) else (kinds,))):
            return name
    return "connect_failed"


def accepted(inbound) -> None:
    """*inbound* was admitted; start its trace if tracing is on."""
    if not TRACING.enabled:
        return
    factory = inbound.factory
    trace = inbound.trace = Trace(factory.clock)
    transport = inbound.transport
    log.debug("{listener}: #{conn} accepted from {peer}{via}", listener=factory.name, conn=trace.number,
              peer=_address(transport.getPeer()), user=_user(inbound.original),
              via=f" (user {_user(inbound.original)})" if inbound.original else "", event="conn_accept")


def claimed(inbound, waited: float) -> None:
    """*inbound* took an idle pool connection after *waited* seconds."""
    trace = inbound.trace
    if trace is None:
        return
    log.debug("{listener}: #{conn} took a pool connection after {wait_ms} ms", listener=inbound.factory.name,
              conn=trace.number, wait_ms=round(waited * 1000, 3), event="conn_pool_claim")


def dialling(inbound, host: str, port: int) -> None:
    """*inbound*'s remote is being dialled (each target of a group in turn)."""
    trace = inbound.trace
    if trace is None:
        return
    trace.dial_started, trace.target = trace.clock.seconds(), format_address(host, port)


def connected(inbound) -> None:
    """*inbound*'s remote answered (a dial traced by :func:`dialling`)."""
    trace = inbound.trace
    if trace is None or trace.dial_started is None:
        return
    log.debug("{listener}: #{conn} connected to {target} in {connect_ms} ms", listener=inbound.factory.name,
              conn=trace.number, target=trace.target, connect_ms=trace.elapsed_ms(trace.dial_started),
              event="conn_dial")


def dial_failed(inbound, failure) -> None:
    """A dial of *inbound*'s remote failed (a group may try the next)."""
    trace = inbound.trace
    if trace is None or trace.dial_started is None:
        return
    trace.reason, trace.detail = dial_reason(failure), failure.getErrorMessage()
    log.debug("{listener}: #{conn} cannot reach {target} after {connect_ms} ms: {detail}",
              listener=inbound.factory.name, conn=trace.number, target=trace.target,
              connect_ms=trace.elapsed_ms(trace.dial_started), reason=trace.reason, detail=trace.detail,
              event="conn_dial_failed")


def ending(inbound, reason: str, detail: str | None = None) -> None:
    """Say why *inbound* is about to end, unless a reason is already set
    (an idle timeout aborts through the same path as a shutdown)."""
    trace = inbound.trace
    if trace is not None and trace.reason is None:
        trace.reason, trace.detail = reason, detail


def closed(inbound, reason) -> None:
    """*inbound* is gone: log how it ended, its bytes and its duration."""
    trace = inbound.trace
    if trace is None:
        return
    why, detail = trace.reason, trace.detail
    if why is not None and inbound.outbound is not None and why in ("refused", "connect_timeout", "unresolved",
                                                                     "unreachable", "connect_failed"):
        why = detail = None  # a group's earlier target failed; a later one answered
    if why is None:
        if inbound.outbound is None and inbound.engine is None:
            why = "cancelled"
        elif inbound.engine is not None:
            why = "normal" if reason is None or reason.check(ConnectionDone) else "reset"
        else:
            why = "normal" if inbound.ended_cleanly(reason) else "reset"
        if why != "normal" and reason is not None and not reason.check(ConnectionDone):
            detail = reason.getErrorMessage()
    log.debug("{listener}: #{conn} closed ({reason}): {bytes_in} bytes in, {bytes_out} bytes out, "
              "{duration_ms} ms", listener=inbound.factory.name, conn=trace.number, reason=why, detail=detail,
              bytes_in=inbound.bytes_in, bytes_out=inbound.bytes_out, duration_ms=trace.elapsed_ms(trace.started),
              target=trace.target, event="conn_close")
