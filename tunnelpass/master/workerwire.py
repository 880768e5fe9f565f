# -*- test-case-name: tests.test_master_workerwire -*-
"""The wire between the master and its worker processes: JSON lines.

Sans-IO.  One UTF-8 JSON object per line, at most :data:`MAX_LINE` bytes
with its newline.  The master writes commands (``op``) on a worker's
stdin; the worker writes events (``ev``) on its fd 3, a pipe of its own, so
a stray ``print`` cannot corrupt the stream.  Either side treats a line
that is too long, not JSON, not an object, of an unknown kind, or with a
missing, extra or mistyped field as a :class:`WireError`: the master kills
and respawns such a worker (a bug, or a compromised process), since after
one bad line nothing later can be trusted.

* :class:`LineReader` splits bytes into lines, bounded while it buffers;
* :func:`encode` turns a message into one line;
* :func:`decode_command` / :func:`decode_event` check one line;
* :class:`EventDecoder` / :class:`CommandDecoder` do both for a stream;
* :class:`LineBudget` caps lines per second (logs of an instance, chatter
  of a worker), counting what it drops.
"""

from __future__ import annotations

import json
import math

#: Longest line, newline included (64 KiB).
MAX_LINE = 64 * 1024

#: Longest instance id and log text carried (characters); a log line is
#: cut to LOG_TEXT so that, escaped, it still fits in MAX_LINE.
MAX_ID = 64
LOG_TEXT = 8000

LEVELS = ("debug", "info", "warn", "error")  # of a log event
#: An instance's log level (``--log``; ``fatal`` lets only critical lines through).
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
STATUSES = ("running", "stopped", "error")
STAT_FIELDS = ("tcps", "udps", "pool", "ping", "tcprx", "tcptx", "udprx", "udptx")


class WireError(ValueError):
    """A line breaks the wire's rules; ``str()`` says how."""


def _ident(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID and value.isprintable()


def _text(limit: int):
    return lambda value: isinstance(value, str) and len(value) <= limit


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value < 1e12)


def _one_of(choices):
    return lambda value: value in choices if isinstance(value, str) else False


#: kind -> {field: check}; every field is required except those in _OPTIONAL.
COMMANDS = {
    "start": {"id": _ident, "url": _text(4096), "dir": _text(4096), "log": _one_of(LOG_LEVELS)},
    "stop": {"id": _ident, "timeout": _number},
}
EVENTS = {
    "hello": {"pid": _count},
    "status": {"id": _ident, "status": _one_of(STATUSES), "error": _text(LOG_TEXT)},
    "stats": {"id": _ident, **{name: _count for name in STAT_FIELDS if name != "ping"}, "ping": _number},
    "log": {"id": _ident, "level": _one_of(LEVELS), "text": _text(LOG_TEXT), "time": _number},
}
_OPTIONAL = {("status", "error"): ""}


def encode(message: dict) -> bytes:
    """One line for *message* (compact JSON and a newline); WireError if
    it would be longer than :data:`MAX_LINE`."""
    line = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
    if len(line) > MAX_LINE:
        raise WireError(f"message of {len(line)} bytes is longer than {MAX_LINE}")
    return line


def _decode(line: bytes, key: str, schema: dict) -> dict:
    if len(line) > MAX_LINE:
        raise WireError(f"line of {len(line)} bytes is longer than {MAX_LINE}")
    try:
        message = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError(f"not JSON: {type(e).__name__}") from None
    if not isinstance(message, dict):
        raise WireError(f"not a JSON object but {type(message).__name__}")
    kind = message.get(key)
    if not isinstance(kind, str) or kind not in schema:
        raise WireError(f"unknown {key} {kind!r:.40}")
    checks = schema[kind]
    for name in message:
        if name != key and name not in checks:
            raise WireError(f"{kind}: unknown field {name!r:.40}")
    out = {key: kind}
    for name, check in checks.items():
        if name not in message:
            if (kind, name) in _OPTIONAL:
                out[name] = _OPTIONAL[kind, name]
                continue
            raise WireError(f"{kind}: missing field {name}")
        if not check(message[name]):
            raise WireError(f"{kind}: bad {name}")
        out[name] = message[name]
    return out


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def decode_command(line: bytes) -> dict:
    """A checked master -> worker command (``{"op": ...}``)."""
    return _decode(line, "op", COMMANDS)


def decode_event(line: bytes) -> dict:
    """A checked worker -> master event (``{"ev": ...}``)."""
    return _decode(line, "ev", EVENTS)


class LineReader:
    """Bytes in, complete lines (without their newline) out.  A line that
    grows past *limit* bytes raises WireError as soon as that is known
    (not when its newline finally comes): the buffer stays bounded."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if len(line) + 1 > self.limit:
                raise WireError(f"line longer than {self.limit} bytes")
        if len(self._buffer) + 1 > self.limit:
            raise WireError(f"line longer than {self.limit} bytes")
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buffer)


class _Decoder:
    decode = None

    def __init__(self, limit: int = MAX_LINE):
        self.reader = LineReader(limit)

    def feed(self, data: bytes) -> list[dict]:
        """Every complete message in *data*; WireError at the first bad one
        (the stream is then unusable)."""
        return [type(self).decode(line) for line in self.reader.feed(data)]


class EventDecoder(_Decoder):
    """The master's reader of a worker's fd 3."""

    decode = staticmethod(decode_event)


class CommandDecoder(_Decoder):
    """The worker's reader of its stdin."""

    decode = staticmethod(decode_command)


class LineBudget:
    """At most *rate* lines per second: :meth:`take` says whether this line
    may go; the first line allowed after some were refused comes with the
    count of the refused ones (:attr:`dropped` until :meth:`take_dropped`)."""

    def __init__(self, clock, rate: int = 100):
        self.clock, self.rate = clock, rate
        self._second = None
        self._used = 0
        self.dropped = 0

    def take(self) -> bool:
        second = math.floor(self.clock.seconds())
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.rate:
            self.dropped += 1
            return False
        self._used += 1
        return True

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped
