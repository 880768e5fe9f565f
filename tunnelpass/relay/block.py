# -*- test-case-name: tests.test_block -*-
"""``--block`` (URL ``block=``, NodePass's digits): refuse user connections
that start as a proxy protocol, HTTP or TLS.

``1`` SOCKS4/4a/5, ``2`` an HTTP request (GET, POST, HEAD, PUT, DELETE,
OPTIONS, CONNECT, PATCH, TRACE, or HTTP/2's PRI preface), ``3`` a TLS
ClientHello; digits combine (``block=13``), ``0`` blocks nothing.

:func:`classify` is sans-IO: it looks at no more than :data:`MAX_PEEK`
bytes and decides as soon as the prefix allows.  :class:`FirstBytesGate`
applies it where users connect (the relay's accepted side), before
anything of the user's crosses a tunnel or reaches a target:

1. For up to :data:`FIRST_BYTES_WAIT` seconds nothing is dialled (no pool
   connection claimed, no target touched): a client that speaks first is
   judged on its first bytes, and a refused one never costs the far side a
   connection.  Bytes that pass go on with the connection, so the
   zero-copy path (splice) starts as it would without ``--block``.
2. A connection still silent then (a protocol where the server speaks
   first: SMTP, SSH, FTP, MySQL banners) is dialled, and what the remote
   sends reaches the user at once; the user's own first bytes are judged
   when they come (waiting longer does not get round the check), and the
   relay -- splice included, if nothing is buffered -- starts once they
   pass.  A refusal then resets the remote leg, which carried nothing of
   the user's.  The end of the user's stream ends the check: what came is
   not one of the blocked starts.

Refused connections are reset, counted (``blocked`` in the health line and
metrics) and logged at warning level, at most once per
:data:`LOG_INTERVAL` per listener.
"""

from __future__ import annotations

from twisted.logger import Logger

from tunnelpass.ops import connlog
from tunnelpass.ops.logs import Throttle

#: Digit -> what it blocks (NodePass's numbering).
KINDS = {"1": "socks", "2": "http", "3": "tls"}
#: Bytes looked at, at most: enough for every check below.
MAX_PEEK = 8
#: Seconds a new connection may take to send its first bytes before it is
#: dialled anyway (then judged on its first bytes later).
FIRST_BYTES_WAIT = 0.2
#: A listener logs its refusals at most once per this many seconds.
LOG_INTERVAL = 10.0

HTTP_METHODS = tuple(m.encode() + b" " for m in (
    "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH", "TRACE", "PRI"))

log = Logger(namespace="tunnelpass.block")


def parse_block(text: str) -> str:
    """``--block`` value -> the digits it blocks, sorted, no repeats ("" =
    nothing).  ``0`` alone means nothing; any other character is an error."""
    text = text.strip()
    if not text or any(c not in "0123" for c in text):
        raise ValueError(f"{text!r}: use digits 1 (SOCKS), 2 (HTTP), 3 (TLS), combined (e.g. 123), or 0 (none)")
    return "".join(sorted(set(text) - {"0"}))


def describe(digits: str) -> str:
    return "+".join(KINDS[d] for d in digits) or "nothing"


def _socks(p: bytes):
    if p[0] == 4:  # VER 4, CMD connect/bind, then port and address
        return None if len(p) < 2 else p[1] in (1, 2)
    if p[0] == 5:  # VER 5, NMETHODS, METHODS (0xFF is never offered)
        if len(p) < 2:
            return None
        count = p[1]
        if not 1 <= count <= MAX_PEEK - 2:
            return False
        methods = p[2:2 + count]
        if 0xFF in methods:
            return False
        return True if len(methods) == count else None
    return False


def _http(p: bytes):
    if any(p.startswith(method) for method in HTTP_METHODS):
        return True
    return None if any(method.startswith(p) for method in HTTP_METHODS) else False


#: A TLS record carrying a ClientHello: type 22, version 3.0-3.4, a length,
#: handshake type 1.  Each byte is checked as soon as it is there.
def _tls(p: bytes):
    checks = (lambda b: b == 0x16, lambda b: b == 3, lambda b: b <= 4, lambda b: True, lambda b: True,
              lambda b: b == 1)
    for byte, check in zip(p, checks):
        if not check(byte):
            return False
    if len(p) >= 5 and not 4 <= int.from_bytes(p[3:5], "big") <= 0x4800:
        return False
    return True if len(p) >= len(checks) else None


_CHECKS = {"1": _socks, "2": _http, "3": _tls}


def classify(prefix: bytes, digits: str, final: bool = False) -> str | None:
    """What the first bytes *prefix* of a connection start: the blocked
    kind (``"socks"``, ``"http"``, ``"tls"``), ``""`` for none of those, or
    None while more bytes are needed to tell.  *final*: no more bytes will
    come (the stream ended), so an unfinished match is no match."""
    prefix = prefix[:MAX_PEEK]
    if not prefix:
        return "" if final or not digits else None
    undecided = False
    for digit in digits:
        verdict = _CHECKS[digit](prefix)
        if verdict:
            return KINDS[digit]
        undecided = undecided or verdict is None
    return None if undecided and not final else ""


class FirstBytesGate:
    """The check at one accepted connection (see the module docstring).

    It drives the relay's :class:`~tunnelpass.relay.relay.InboundProtocol` through
    a few steps: whether to dial now, what to do with the user's bytes while
    it judges, and when the relay proper may start."""

    def __init__(self, inbound):
        self.inbound = inbound
        self.factory = inbound.factory
        self.digits = self.factory.limits.block
        self.held = b""
        self.timer = None
        self.outbound = None  # the remote, once it answered before the user spoke

    def start(self) -> bool:
        """At accept: True while the gate holds the connection (it dials
        itself later); False: dial now (what came with the connection, a
        PROXY header's tail, already passed)."""
        inbound = self.inbound
        if inbound._early:
            self.held, inbound._early = b"".join(inbound._early), None
        verdict = classify(self.held, self.digits)
        if verdict == "":
            self._release_early()
            return False
        if verdict:
            self.refuse(verdict)
            return True
        self.timer = self.factory.clock.callLater(FIRST_BYTES_WAIT, self._waited)
        return True

    def data(self, data: bytes) -> None:
        self.held += data
        self._judge(final=False)

    def ended(self) -> None:
        """The user's stream ended (FIN) while the gate held it."""
        self._judge(final=True)

    def _judge(self, final: bool) -> None:
        verdict = classify(self.held, self.digits, final)
        if verdict is None:
            return
        if verdict:
            self.refuse(verdict)
        else:
            self._passed(final)

    def _waited(self) -> None:
        """Silent so far: dial now, judge the first bytes when they come."""
        self.timer = None
        inbound = self.inbound
        inbound.transport.pauseProducing()
        inbound._pending = self.factory.dial(inbound)

    def hold(self, outbound) -> None:
        """The remote answered before the user spoke: let the remote's bytes
        through (flow-controlled) and read the user's first bytes."""
        from tunnelpass.relay.relayend import LegProducer

        self.outbound = outbound
        inbound = self.inbound
        inbound.transport.registerProducer(LegProducer(outbound.transport), True)
        inbound._producing = True
        inbound.transport.resumeProducing()

    def _passed(self, final: bool) -> None:
        self.cancel()
        inbound = self.inbound
        inbound.gate = None
        if self.outbound is None:
            if self.held:
                self._release_early()
            elif final:
                return  # nothing to relay: the relay closes the connection
            if inbound._pending is None:  # still within FIRST_BYTES_WAIT
                inbound.transport.pauseProducing()
                inbound._pending = self.factory.dial(inbound)
            return
        # The remote has been talking through the copy path: hand over to
        # the relay proper, with the user's first bytes ahead of the rest.
        inbound.transport.unregisterProducer()
        inbound._producing = False
        self._release_early()
        inbound.start_relay(self.outbound, native=not final)

    def _release_early(self) -> None:
        if self.held:
            self.inbound._early, self.held = [self.held], b""
        self.inbound.gate = None

    def refuse(self, kind: str) -> None:
        self.cancel()
        inbound, factory = self.inbound, self.factory
        inbound.gate = None
        factory.stats.blocked += 1
        throttle = getattr(factory, "block_throttle", None)
        if throttle is None:
            throttle = factory.block_throttle = Throttle(factory.clock, LOG_INTERVAL)
        if throttle.ready():
            peer = inbound.transport.getPeer()
            log.warn("{listener}: refused {count} user connection(s) that started as {protocol} "
                     "(--block {block}); the latest from {peer}",
                     listener=factory.name, count=throttle.take_count(), protocol=kind,
                     block=describe(self.digits), peer=getattr(peer, "host", str(peer)), event="blocked")
        connlog.ending(inbound, "blocked", kind)
        inbound.transport.abortConnection()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
