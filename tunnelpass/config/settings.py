# -*- test-case-name: tests.test_settings -*-
"""Value parsers shared by the command line, the environment and rule files.

Each parser takes a string and returns a value or raises :class:`ValueError`
with a message fit to show a user; callers add *where* the value came from
(an option name, an environment variable, a file and line).
"""

from __future__ import annotations

import ipaddress
import re

_DURATION = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_DIGITS = re.compile(r"^[0-9]{1,9}$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

#: Longest duration accepted anywhere (a week): anything larger is a typo.
MAX_DURATION = 7 * 24 * 3600.0

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
LOG_FORMATS = ("text", "json")

#: NodePass's log levels that tunnelpass has no level of its own for.
#: ``none`` still lets fatal lines through (a startup failure, a forced
#: shutdown), so a process that exits always says why; ``event`` (NodePass:
#: important operational events) is warn, the level every operator event
#: (``event=...``: connect_failed, session_replaced, ban, ...) is logged at.
LOG_LEVEL_ALIASES = {"none": "fatal", "event": "warn"}


def parse_duration(text: str) -> float:
    """Parse ``500ms``, ``30s``, ``10m``, ``1h`` (or bare seconds) into seconds.

    ``0`` is allowed and means "off" where the caller gives it that meaning.
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid duration {_show(text)}: use a number with ms, s, m or h, "
            "e.g. 500ms, 30s, 10m, 1h"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {_show(text)} is longer than a week")
    return seconds


def parse_positive_duration(text: str) -> float:
    """A duration that cannot be zero (a timeout where 0 would mean "at once")."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"duration {_show(text)} must be greater than zero")
    return seconds


def parse_count(text: str, minimum: int = 1, maximum: int = 10_000_000) -> int:
    """Parse a whole number within ``[minimum, maximum]``."""
    stripped = text.strip() if isinstance(text, str) else ""
    if not _DIGITS.match(stripped):
        raise ValueError(f"invalid number {_show(text)}: expected a whole number")
    value = int(stripped)
    if not minimum <= value <= maximum:
        raise ValueError(f"{value} is out of range ({minimum}..{maximum})")
    return value


def parse_port(text: str) -> int:
    """Parse a TCP/UDP port number, 1..65535."""
    try:
        return parse_count(text, 1, 65535)
    except ValueError:
        raise ValueError(f"invalid port {_show(text)}: expected 1..65535") from None


def parse_host(text: str, what: str = "host") -> str:
    """An IP literal (normalized) or a DNS name (a trailing dot dropped)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{what} {_show(text)} is neither an IP address nor a host name")
    if name.replace(".", "").isdigit():
        raise ValueError(f"{what} {_show(text)} is not a valid IPv4 address")
    return name


def parse_log_level(text: str) -> str:
    """``--log``: one of :data:`LOG_LEVELS`, or a NodePass alias of one."""
    value = text.strip().lower() if isinstance(text, str) else ""
    value = LOG_LEVEL_ALIASES.get(value, value)
    if value not in LOG_LEVELS:
        raise ValueError(f"invalid value {_show(text)}: choose one of {', '.join(LOG_LEVELS)} "
                         f"(NodePass's {' and '.join(LOG_LEVEL_ALIASES)} are read as "
                         f"{' and '.join(LOG_LEVEL_ALIASES.values())})")
    return value


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower() if isinstance(text, str) else ""
    if value not in choices:
        raise ValueError(f"invalid value {_show(text)}: choose one of {', '.join(choices)}")
    return value


#: ``--type`` (NodePass's pool ``type=``): the carriers tunnelpass runs.
CARRIER_TYPES = {0: "TCP pool", 3: "HTTP/2 multiplexed"}
#: NodePass's other pool types, refused at startup until they are built.
UNBUILT_CARRIER_TYPES = {1: "QUIC", 2: "WebSocket"}


def parse_carrier_type(text: str, spelling: str = "--type {}") -> int:
    """``--type``: 0 (TCP pool) or 3 (HTTP/2 multiplexed), NodePass's numbers.

    1 and 2 (NodePass's QUIC and WebSocket) get their own line, so a
    NodePass user knows the number is right but the carrier is missing.
    *spelling* is how the user wrote it (``--type {}``, ``URL query
    type={}``); the message starts with it, so callers add nothing."""
    value = text.strip() if isinstance(text, str) else ""
    accepted = " or ".join(f"{number} ({name})" for number, name in CARRIER_TYPES.items())
    if value in {str(number) for number in UNBUILT_CARRIER_TYPES}:
        name = UNBUILT_CARRIER_TYPES[int(value)]
        raise ValueError(f"{spelling.format(value)} ({name}) is not available in this version; use {accepted}")
    if value not in {str(number) for number in CARRIER_TYPES}:
        raise ValueError(f"{spelling.format(_show(text))}: choose {accepted}")
    return int(value)


def format_duration(seconds: float) -> str:
    """The shortest exact rendering of *seconds* in the units parse_duration reads."""
    if seconds and seconds < 1:
        return f"{_plain(seconds * 1000)}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{_plain(seconds / size)}{unit}"
    return f"{_plain(seconds)}s"


def _plain(number: float) -> str:
    return f"{number:.6f}".rstrip("0").rstrip(".")


def _show(value: object, limit: int = 40) -> str:
    """repr() of untrusted input, cut short so a huge value cannot flood a log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_ip_literal(host: str) -> bool:
    """Whether *host* is an IPv4 or IPv6 address (not a name to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
