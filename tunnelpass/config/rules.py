# -*- test-case-name: tests.test_rules -*-
"""Sans-IO parser for the forwarder's rules file.

One rule per line::

    # listen | remote_host | remote_port [| options]
    18080 | 127.0.0.1 | 8080
    127.0.0.1:15353/udp | 10.0.0.53 | 53
    [::1]:18443/tcp+udp | backend.internal | 443 | max-conns=200, idle=2m

The whole file is validated before anything is used, so a reload with a typo
never half-applies; every error names the file and line.

A file with no rules is usually a mistake (an editor's half-written save, a
truncated copy); the forwarder refuses to reload one unless it carries the
comment line ``# tunnelpass: empty`` (:data:`EMPTY_MARKER`), which says that
no rules is what the operator means.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from tunnelpass.config.settings import (
    _show,
    format_address,
    parse_choice,
    parse_count,
    parse_duration,
    parse_host,
    parse_port,
    parse_positive_duration,
)
from tunnelpass.config.limits import Limits

#: Limits that keep a hostile or corrupt file from costing much to reject.
MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 4096
MAX_RULES = 10_000

#: The comment line that marks a file meant to have no rules (case and spaces
#: around the words do not matter): ``# tunnelpass: empty``.
EMPTY_MARKER = "# tunnelpass: empty"
_EMPTY_MARKER = re.compile(r"\s*#\s*tunnelpass\s*:\s*empty\s*", re.IGNORECASE)

_PROTOCOL_SETS = {
    "tcp": ("tcp",),
    "udp": ("udp",),
    "tcp+udp": ("tcp", "udp"),
    "udp+tcp": ("tcp", "udp"),
}


class RulesError(ValueError):
    """A rules file is invalid; ``str()`` gives ``source:line: message``."""

    def __init__(self, source: str, line: int, message: str):
        self.source, self.line, self.message = source, line, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class RuleOptions:
    """Per-rule overrides; ``None`` means "use the global setting"."""

    max_conns: int | None = None
    connect_timeout: float | None = None
    idle: float | None = None
    udp_idle: float | None = None
    max_sessions: int | None = None
    proxy: str | None = None
    accept_proxy: tuple | None = None  # global only (--accept-proxy)
    limiter: object = None  # global only (--rate)
    dialer: object = None  # global only (--dial, --dns)
    block: str | None = None  # global only (--block)
    lbs: int | None = None  # global only (--lbs; a rule has one remote)
    fallback: float | None = None  # global only (--fallback-interval)


    def resolve(self, defaults: "Limits") -> "Limits":
        """The limits in force for a rule: its own options over the globals."""
        return Limits(**{
            name: getattr(defaults, name) if getattr(self, name) is None else getattr(self, name)
            for name in Limits.__dataclass_fields__
        })


_OPTION_PARSERS = {
    "max-conns": ("max_conns", lambda v: parse_count(v, 1, 1_000_000)),
    "connect-timeout": ("connect_timeout", parse_positive_duration),
    "idle": ("idle", parse_duration),
    "udp-idle": ("udp_idle", parse_positive_duration),
    "max-sessions": ("max_sessions", lambda v: parse_count(v, 1, 1_000_000)),
    "proxy": ("proxy", lambda v: parse_choice(v, ("off", "v1", "v2"))),
}


@dataclass(frozen=True)
class Endpoint:
    """A listening address: an IP literal, a port and one protocol."""

    host: str
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{format_address(self.host, self.port)}/{self.protocol}"


@dataclass(frozen=True)
class Rule:
    """One forwarding rule: listen on ``listen`` (one endpoint per protocol),
    relay to ``remote_host:remote_port``."""

    listen: tuple[Endpoint, ...]
    remote_host: str
    remote_port: int
    options: RuleOptions = field(default_factory=RuleOptions)
    line: int = 0

    @property
    def remote(self) -> str:
        return format_address(self.remote_host, self.remote_port)


class RuleList(list):
    """The rules of a file, in order; ``meant_empty`` tells whether the file
    carries :data:`EMPTY_MARKER` (an empty file that means it)."""

    meant_empty: bool = False


def parse_rules(data: str | bytes, source: str = "<rules>") -> RuleList:
    """Parse a whole rules file; raise :class:`RulesError` at the first fault."""
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise RulesError(source, 0, f"file is larger than {MAX_FILE_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise RulesError(source, line, "not UTF-8 text (binary data?)") from None
    elif len(data) > MAX_FILE_BYTES:
        raise RulesError(source, 0, f"file is larger than {MAX_FILE_BYTES} bytes")

    rules = RuleList()
    ports: dict[tuple[int, str], _PortUsage] = {}
    for number, raw in enumerate(data.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            if _EMPTY_MARKER.fullmatch(raw):
                rules.meant_empty = True
            continue
        try:
            rule = parse_rule(line, number)
        except ValueError as e:
            raise RulesError(source, number, str(e)) from None
        for endpoint in rule.listen:
            usage = ports.setdefault((endpoint.port, endpoint.protocol), _PortUsage())
            clash = usage.clash(endpoint)
            if clash is not None:
                other, other_line = clash
                raise RulesError(
                    source, number, f"listen address {endpoint} overlaps {other} on line {other_line}"
                )
            usage.add(endpoint, number)
        rules.append(rule)
        if len(rules) > MAX_RULES:
            raise RulesError(source, number, f"more than {MAX_RULES} rules")
    return rules


class _PortUsage:
    """The endpoints bound to one (port, protocol) so far, indexed so that
    finding a clash costs O(1) however many rules share the port."""

    def __init__(self):
        self.hosts: dict[str, tuple[Endpoint, int]] = {}
        self.first_ipv4: tuple[Endpoint, int] | None = None
        self.first_any: tuple[Endpoint, int] | None = None

    def clash(self, endpoint: Endpoint) -> tuple[Endpoint, int] | None:
        host = endpoint.host
        if host in self.hosts:
            return self.hosts[host]
        if host == "::":  # dual-stack: clashes with anything on this port
            return self.first_any
        for wildcard in ("::", "0.0.0.0") if ":" not in host else ("::",):
            if wildcard in self.hosts:
                return self.hosts[wildcard]
        if host == "0.0.0.0":
            return self.first_ipv4
        return None

    def add(self, endpoint: Endpoint, line: int) -> None:
        self.hosts[endpoint.host] = (endpoint, line)
        self.first_any = self.first_any or (endpoint, line)
        if ":" not in endpoint.host:
            self.first_ipv4 = self.first_ipv4 or (endpoint, line)


def parse_rule(line: str, number: int = 0) -> Rule:
    """Parse one non-comment line; raise :class:`ValueError` with the reason."""
    if len(line) > MAX_LINE_CHARS:
        raise ValueError(f"line is longer than {MAX_LINE_CHARS} characters")
    if any(ord(c) < 32 and c != "\t" for c in line) or "\x7f" in line:
        raise ValueError("control characters in line (binary data?)")
    fields = [f.strip() for f in line.split("|")]
    if len(fields) not in (3, 4):
        raise ValueError(
            f"expected 'listen | remote_host | remote_port [| options]', got {len(fields)} "
            "field(s) separated by '|'"
        )
    listen = parse_listen(fields[0])
    remote_host = parse_remote_host(fields[1])
    try:
        remote_port = parse_port(fields[2])
    except ValueError as e:
        raise ValueError(f"remote port: {e}") from None
    options = parse_options(fields[3]) if len(fields) == 4 else RuleOptions()
    if options.proxy == "v1" and any(endpoint.protocol == "udp" for endpoint in listen):
        raise ValueError("proxy=v1 carries TCP only; use proxy=v2 for a UDP rule")
    return Rule(listen, remote_host, remote_port, options, number)


def parse_listen(text: str) -> tuple[Endpoint, ...]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT``, optionally ``/tcp|/udp|/tcp+udp``."""
    address, _, protocol = text.partition("/")
    protocols = _PROTOCOL_SETS.get(protocol.lower() if protocol else "tcp")
    if protocols is None:
        raise ValueError(f"listen protocol {_show(protocol)}: use /tcp, /udp or /tcp+udp")
    if not address:
        raise ValueError("listen address is empty")
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError(f"listen address {_show(address)}: expected [IPV6]:PORT")
        host = _ip_literal(host, "listen host", version=6)
    elif ":" in address:
        host, port = address.rsplit(":", 1)
        if ":" in host:
            raise ValueError(f"listen address {_show(address)}: put IPv6 hosts in brackets, [::1]:PORT")
        host = "127.0.0.1" if host.lower() == "localhost" else _ip_literal(host, "listen host")
    else:
        host, port = "0.0.0.0", address
    try:
        port_number = parse_port(port)
    except ValueError as e:
        raise ValueError(f"listen port: {e}") from None
    return tuple(Endpoint(host, port_number, p) for p in protocols)


def parse_remote_host(text: str) -> str:
    """An IPv4/IPv6 literal (brackets optional) or a DNS name, resolved later."""
    if text.startswith("[") and text.endswith("]"):
        return _ip_literal(text[1:-1], "remote host", version=6)
    return parse_host(text, "remote host")


def parse_options(text: str) -> RuleOptions:
    """``key=value`` pairs separated by commas; unknown or repeated keys are errors."""
    values: dict[str, object] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"option {_show(item)}: expected key=value")
        if key not in _OPTION_PARSERS:
            raise ValueError(
                f"unknown option {_show(key)}: known options are {', '.join(_OPTION_PARSERS)}"
            )
        attribute, parser = _OPTION_PARSERS[key]
        if attribute in values:
            raise ValueError(f"option {key} given twice")
        try:
            values[attribute] = parser(value.strip())
        except ValueError as e:
            raise ValueError(f"option {key}: {e}") from None
    return RuleOptions(**values)


def _ip_literal(text: str, what: str, version: int | None = None) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {_show(text)} is not an IP address") from None
    if version is not None and address.version != version:
        raise ValueError(f"{what} {_show(text)} is not an IPv{version} address")
    return str(address)
