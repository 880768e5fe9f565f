# -*- test-case-name: tests.test_logs -*-
"""``--log-format json``: one flat JSON object per event, one per line.

The schema (documented in docs/operations.rst, "Log format"):

``time``
    RFC 3339 with the local UTC offset, microseconds
    (``2026-11-30T08:35:40.123456+00:00``).
``level``
    ``debug`` | ``info`` | ``warn`` | ``error`` | ``critical``.
``logger``
    the namespace of the logger (``tunnelpass.server``; ``log_legacy`` for
    Twisted's own ``log.msg`` lines, ``stdout``/``stderr`` for prints).
``message``
    the rendered text, as the text format shows it.
``event``
    a stable snake_case name: the event's own ``event`` field, else
    :data:`FALLBACK_EVENT`.
``traceback``
    only for an event that carries a failure: the formatted traceback.

Every other field of the event follows as a top-level key, made JSON-safe
(numbers, strings, booleans, null, lists and objects of those; anything
else as its ``str()``).  A field whose name is a schema key is written as
``field_<name>``.  Twisted's internal keys (``log_*``) and the legacy
log system's (``message`` tuples, ``isError``, ``system``, ``format`` ...)
never appear: Twisted's own serialisation (``jsonFileLogObserver``) would
write them, with unrendered format strings and unpersistable markers,
which is why tunnelpass does not use it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime

from constantly import NamedConstant
from twisted.logger import formatEvent
from twisted.python.failure import Failure

SCHEMA = ("time", "level", "logger", "message", "event", "traceback")
#: Prefix for an event field whose name is a schema key.
COLLISION_PREFIX = "field_"
#: ``event`` of an event that has no ``event`` field of its own.
FALLBACK_EVENT = "log"
#: Keys the legacy log system (``twisted.python.log``) and the bridge to it
#: put into events; dropped from events that went through that bridge.
LEGACY_KEYS = frozenset({"message", "time", "system", "isError", "format", "why", "failure", "printed",
                         "logLevel"})
#: Nesting kept in lists and objects; deeper values are rendered as text.
MAX_DEPTH = 6


def iso_time(when: float | None) -> str | None:
    """RFC 3339 time with the local offset (as the text format), microseconds."""
    if when is None:
        return None
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="microseconds")


def _is_legacy(event) -> bool:
    return event.get("log_namespace") == "log_legacy" or "log_legacy" in event or "isError" in event


def json_safe(value, depth: int = 0):
    """*value* as something ``json.dumps`` writes faithfully: finite numbers,
    strings, booleans, None, lists and string-keyed objects of those;
    anything else (and NaN/infinity, and nesting past :data:`MAX_DEPTH`)
    as its ``str()``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < MAX_DEPTH:
        if isinstance(value, (list, tuple)):
            return [json_safe(item, depth + 1) for item in value]
        if isinstance(value, (set, frozenset)):
            return sorted((json_safe(item, depth + 1) for item in value), key=str)
        if isinstance(value, dict):
            return {str(key): json_safe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, NamedConstant):  # a LogLevel, for one
        return value.name
    if isinstance(value, Failure):
        return value.getErrorMessage()
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be rendered>"


def _failure_of(event, legacy: bool):
    failure = event.get("log_failure")
    if failure is None and legacy:
        failure = event.get("failure")
    return failure if isinstance(failure, Failure) else None


def _traceback(failure: Failure) -> str:
    try:
        return failure.getTraceback()
    except Exception:
        return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def record(event) -> dict:
    """The flat, JSON-safe object for one log event (see the module doc)."""
    legacy = _is_legacy(event)
    failure = _failure_of(event, legacy)
    if failure is not None and legacy and "log_failure" not in event:
        # log.err(failure, why): the legacy text is why + the traceback;
        # the message is why alone, the traceback has its own key.
        message = str(event.get("why") or "Unhandled Error")
    else:
        message = formatEvent(event)
    level = event.get("log_level")
    name = event.get("event")
    out = {
        "time": iso_time(event.get("log_time")),
        "level": level.name if isinstance(level, NamedConstant) else "info",
        "logger": str(event.get("log_namespace") or "-"),
        "message": message,
        "event": str(name) if name else FALLBACK_EVENT,
    }
    if failure is not None:
        out["traceback"] = _traceback(failure)
    for key, value in event.items():
        if key == "event" or key.startswith("log_") or key.startswith("__"):
            continue
        if legacy and key in LEGACY_KEYS:
            continue
        out[COLLISION_PREFIX + key if key in SCHEMA else key] = json_safe(value)
    return out


def json_line(event) -> str:
    """One event as one line of JSON (newline included); never raises."""
    try:
        return json.dumps(record(event)) + "\n"
    except Exception as e:  # the log must never take the process down
        return json.dumps({"time": iso_time(event.get("log_time")), "level": "error", "logger": "tunnelpass.logs",
                           "message": f"an event could not be written as JSON: {e}",
                           "event": "log_format_error"}) + "\n"
