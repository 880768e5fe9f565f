# -*- test-case-name: tests.test_master_instances -*-
"""One master instance as the API shows it, sans-IO: its checked URL, the
``config`` URL with every default filled in, NodePass's ``mode`` number,
its counters (a persisted base plus the current run), its recent log lines,
and the checks on what an operator may change (alias, restart, meta).

Nothing here does I/O or knows the clock: :mod:`tunnelpass.master.registry`
drives it.  Every rejected input raises :class:`ApiError` (400) with a
message that names the field.
"""

from __future__ import annotations

import re
import secrets
from collections import deque
from urllib.parse import parse_qsl, quote, urlsplit

from twisted.python import usage

from tunnelpass.config.options import parse_tunnel_url
from tunnelpass.config.settings import format_duration
from tunnelpass.config.urls import MAX_URL
from tunnelpass.master.errors import ApiError
from tunnelpass.ops.metrics import Sample

#: The API key's pseudo instance (NodePass's id), and what a masked key reads.
API_KEY_ID = "********"
MASK = "********"

MAX_TEXT = 256
MAX_TAGS = 64
MAX_LOG_LINES = 200
MAX_LOG_BYTES = 64 * 1024
#: A single kept log line is cut to this many characters (a 64 KiB wire
#: line would otherwise evict every other line of the buffer).
MAX_LOG_LINE = 4096
COUNTERS = ("tcprx", "tcptx", "udprx", "udptx")
GAUGES = ("tcps", "udps", "pool", "ping")
ACTIONS = ("start", "stop", "restart", "reset")
PATCH_FIELDS = ("alias", "action", "restart", "meta")
PEER_TYPES = ("", "0", "1", "2")
_SID = re.compile(r"^[0-9A-Za-z-]{0,36}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: NodePass's ``mode`` number per (type, flow).
_MODES = {"server": {"auto": 0, "receive": 1, "send": 2},
          "client": {"auto": 0, "local": 1, "tunnel": 2, "receive": 2, "send": 2}}


def new_counters() -> dict:
    return dict.fromkeys(COUNTERS, 0)


def empty_meta() -> dict:
    return {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}


# URLs


def check_url(url, keep_key: str | None = None):
    """*url* checked exactly as the command line checks it -> (url, options).

    A ``server://`` URL without a key gets one: *keep_key* (a replacement
    URL keeps the key the client already holds) or 32 random hex digits,
    written into the URL so that it survives restarts and the client end
    can be given it."""
    if not isinstance(url, str):
        raise ApiError(400, "url must be a string")
    if not url:
        raise ApiError(400, "url is required")
    if len(url) > MAX_URL:
        raise ApiError(400, f"url is longer than {MAX_URL} characters")
    options = _parse(url)
    if options["mode"] == "server" and options["key"] is None:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://{quote(keep_key or secrets.token_hex(16), safe='')}@{rest}"
        options = _parse(url)
    return url, options


def _parse(url: str):
    try:
        return parse_tunnel_url(url)
    except usage.UsageError as e:
        raise ApiError(400, str(e)) from None


def _query(url: str) -> dict[str, str]:
    """The query keys *url* gives, as given (the URL parsed already)."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def _rate(options, given: str | None) -> str:
    if given is not None:
        return given.strip()
    return f"{options['rate'] * 8 / 1_000_000:.6f}".rstrip("0").rstrip(".")


#: query key -> its value from checked options (None: leave the key out).
_RENDER = {
    "log": lambda o, g: o["log"],
    "tls": lambda o, g: str(o["tls"] or 0) if o["mode"] == "server" or o["tls"] is not None else None,
    "crt": lambda o, g: o["cert"],
    "key": lambda o, g: o["private-key"],
    "sni": lambda o, g: o["sni"],
    "dns": lambda o, g: format_duration(o["dns"]),
    "min": lambda o, g: str(o["min-pool"]) if o["mode"] == "client" else None,
    "max": lambda o, g: str(o["max-pool"]),
    "mode": lambda o, g: str(_MODES[o["mode"]][o["flow"]]),
    "type": lambda o, g: str(o["type"] or 0) if o["mode"] == "server" or o["type"] is not None else None,
    "dial": lambda o, g: o["dial"] or "auto",
    "read": lambda o, g: format_duration(o["read"]),
    "rate": lambda o, g: _rate(o, g),
    "slot": lambda o, g: str(o["slot"]),
    "proxy": lambda o, g: {"off": "0", "v1": "1", "v2": "2"}[o["proxy-protocol"]],
    "block": lambda o, g: o["block"] or "0",
    "notcp": lambda o, g: "1" if o["no-tcp"] else "0",
    "noudp": lambda o, g: "1" if o["no-udp"] else "0",
    "lbs": lambda o, g: str(o["lbs"]),
    "public": lambda o, g: g,
    "weakkey": lambda o, g: "1" if o["weak-key"] else None,
}


def config_url(url: str, options, master_log: str) -> str:
    """The URL with every default filled in, in one canonical form (so two
    URLs that mean the same compare equal): normalised addresses, every
    query key of its type in a fixed order.  ``log`` is the URL's, else the
    master's level (NodePass's inheritance); TLS is never inherited from the
    master's API (an instance's tunnel TLS is its own choice)."""
    given = _query(url)
    values = []
    for name, render in _RENDER.items():
        value = render(options, given.get(name))
        if name == "log" and "log" not in given:
            value = master_log
        if value is not None:
            values.append(f"{name}={quote(str(value), safe=',:[]/')}")
    key = options["key"]
    userinfo = f"{quote(key, safe='')}@" if key is not None else ""
    target = quote(options["target"], safe=",:[]")
    return f"{options['mode']}://{userinfo}{options['tunnel']}/{target}?{'&'.join(values)}"


def mask_url(url: str) -> str:
    """*url* with the key (the userinfo before ``@``) replaced by ``********``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc = rest[:end]
    if "@" not in netloc:
        return url
    return f"{scheme}://{MASK}@{netloc.rpartition('@')[2]}{rest[end:]}"


# Operator input


def check_text(value, field: str, limit: int = MAX_TEXT) -> str:
    """A short printable string (control characters would corrupt logs and
    the metrics' alias label)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{field} must be a string")
    if len(value) > limit:
        raise ApiError(400, f"{field} exceeds maximum length {limit}")
    if _CONTROL.search(value):
        raise ApiError(400, f"{field} contains control characters")
    return value


def check_patch(body) -> dict:
    """A PATCH body -> the same fields, each checked; nothing is applied
    unless every field is valid.  Unknown fields are refused (NodePass
    ignores them; a typo such as ``restrat`` would then silently do
    nothing).  ``alias`` present means "set it", "" included (NodePass
    cannot clear an alias)."""
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid request body")
    for name in body:
        if name not in PATCH_FIELDS:
            raise ApiError(400, f"Unknown field: {str(name)[:64]}")
    # A null field is an absent one, as NodePass (Go) reads it: clients
    # built on Go structs (NodePassDash) send null for unset pointers.
    body = {name: value for name, value in body.items() if value is not None}
    checked = {}
    if "alias" in body:
        checked["alias"] = check_text(body["alias"], "alias")
    if "action" in body:
        action = body["action"]
        if not isinstance(action, str) or action not in ACTIONS:
            raise ApiError(400, f"Invalid action: {str(action)[:64]}")
        checked["action"] = action
    if "restart" in body:
        if not isinstance(body["restart"], bool):
            raise ApiError(400, "restart must be true or false")
        checked["restart"] = body["restart"]
    if "meta" in body:
        checked["meta"] = check_meta(body["meta"])
    return checked


def check_meta(meta) -> dict:
    """``meta`` -> {"peer": dict or None (keep), "tags": dict or None (keep)}."""
    if not isinstance(meta, dict):
        raise ApiError(400, "meta must be an object")
    for name in meta:
        if name not in ("peer", "tags"):
            raise ApiError(400, f"Unknown meta field: {str(name)[:64]}")
    peer = tags = None
    if meta.get("peer") is not None:
        raw = meta["peer"]
        if not isinstance(raw, dict):
            raise ApiError(400, "meta.peer must be an object")
        for name in raw:
            if name not in ("sid", "type", "alias"):
                raise ApiError(400, f"Unknown meta.peer field: {str(name)[:64]}")
        if raw:  # an empty peer object keeps the peer (NodePass)
            # null reads as "", as NodePass's Go decoder leaves it.
            peer = {name: check_text("" if raw.get(name) is None else raw[name], f"meta.peer.{name}")
                    for name in ("sid", "type", "alias")}
            if not _SID.match(peer["sid"]):
                raise ApiError(400, "meta.peer.sid must be a UUID (at most 36 letters, digits and '-')")
            if peer["type"] not in PEER_TYPES:
                raise ApiError(400, 'meta.peer.type must be "0", "1" or "2"')
    if meta.get("tags") is not None:
        raw = meta["tags"]
        if not isinstance(raw, dict):
            raise ApiError(400, "meta.tags must be an object")
        if len(raw) > MAX_TAGS:
            raise ApiError(400, f"meta.tags has more than {MAX_TAGS} tags")
        tags = {}
        for key, value in raw.items():
            check_text(key, "meta tag key")
            if not key:
                raise ApiError(400, "meta tag key must not be empty")
            tags[key] = check_text("" if value is None else value, "meta tag value")
    return {"peer": peer, "tags": tags}


def check_meta_row(meta) -> dict:
    """Stored meta, trusted less than nothing: what fails is dropped."""
    try:
        checked = check_meta(meta)
    except ApiError:
        return empty_meta()
    fresh = empty_meta()
    return {"peer": checked["peer"] or fresh["peer"], "tags": checked["tags"] or {}}


# The record


class Instance:
    """One tunnel instance: what is persisted (id, alias, url, restart,
    desired, meta, counters, created) and what is live (status, gauges,
    the current run's counters, recent log lines).

    Counters: ``total = base + max(0, run - offset)``, where ``run`` is
    what the current run reported (bytes since it began) and ``offset`` is
    the part of the run already folded into ``base`` (at a run's end, or by
    ``reset``).  A report that arrives after the run was folded (a silent
    instance that speaks again) then counts only what is new."""

    def __init__(self, id: str, alias: str, url: str, options, master_log: str, *, restart: bool = True,
                 desired: str = "running", meta: dict | None = None, counters: dict | None = None,
                 created: float = 0.0):
        self.id, self.alias, self.restart, self.desired, self.created = id, alias, restart, desired, created
        self.meta = meta if meta is not None else empty_meta()
        self.base = {name: int((counters or {}).get(name, 0)) for name in COUNTERS}
        self.run = new_counters()
        self.offset = new_counters()
        self.gauges = dict.fromkeys(GAUGES, 0)
        self.status = "stopped"
        self.error = ""
        self.logs: deque[str] = deque()
        self.log_bytes = 0
        self.set_url(url, options, master_log)

    def set_url(self, url: str, options, master_log: str) -> None:
        """A checked URL (or, for a stored URL that no longer passes the
        checks, options None: the instance is kept, shown, never started)."""
        self.url, self.options = url, options
        if options is None:
            self.type = "server" if url.lower().startswith("server") else "client"
            self.mode, self.config = 0, url
        else:
            self.type = options["mode"]
            self.mode = _MODES[self.type].get(options["flow"], 0)
            self.config = config_url(url, options, master_log)

    @property
    def key(self) -> str | None:
        return None if self.options is None else self.options["key"]

    # counters

    def totals(self) -> dict:
        return {name: self.base[name] + max(0, self.run[name] - self.offset[name]) for name in COUNTERS}

    def fold(self) -> None:
        """The run ended (or is cut here): what it counted joins the base."""
        self.base = self.totals()
        self.offset = dict(self.run)

    def new_run(self) -> None:
        """A run begins: its reports start again from zero."""
        self.fold()
        self.run, self.offset = new_counters(), new_counters()

    def reset(self) -> None:
        self.fold()
        self.base = new_counters()

    def apply_stats(self, data: dict) -> None:
        for name in COUNTERS:
            value = data.get(name)
            if _count(value):
                self.run[name] = value
        for name in GAUGES:
            value = data.get(name)
            if _count(value) or (name == "ping" and isinstance(value, float) and 0 <= value < 1e9):
                self.gauges[name] = int(value)

    def idle(self) -> None:
        """Not running: no connections, no pool, no ping."""
        self.gauges = dict.fromkeys(GAUGES, 0)

    # logs

    def add_log(self, text: str) -> str:
        """Keep *text* among the last lines (at most 200 and 64 KiB) -> the kept text."""
        if len(text) > MAX_LOG_LINE:
            text = text[:MAX_LOG_LINE] + "..."
        size = len(text.encode("utf-8", "replace"))
        self.logs.append(text)
        self.log_bytes += size
        while len(self.logs) > MAX_LOG_LINES or self.log_bytes > MAX_LOG_BYTES:
            self.log_bytes -= len(self.logs.popleft().encode("utf-8", "replace"))
        return text

    # what a failed save puts back

    def snapshot(self) -> dict:
        fields = ("alias", "restart", "desired", "url", "options", "type", "mode", "config", "meta")
        saved = {name: getattr(self, name) for name in fields}
        saved.update(base=dict(self.base), offset=dict(self.offset))
        return saved

    def restore(self, saved: dict) -> None:
        for name, value in saved.items():
            setattr(self, name, value)

    # views

    def to_json(self, masked: bool) -> dict:
        """NodePass's instance object; *masked*: the key reads ``********``."""
        if masked:
            cached = getattr(self, "_masked", None)
            if cached is None or cached[0] != (self.url, self.config):  # a list of 100 asks 200 times a call
                cached = self._masked = ((self.url, self.config), mask_url(self.url), mask_url(self.config))
            url, config = cached[1], cached[2]
        else:
            url, config = self.url, self.config
        view = {"id": self.id, "alias": self.alias, "type": self.type, "status": self.status,
                "url": url, "config": config,
                "restart": self.restart,
                "meta": {"peer": dict(self.meta["peer"]), "tags": dict(self.meta["tags"])},
                "mode": self.mode}
        view.update(self.gauges)
        view.update(self.totals())
        return view

    def samples(self) -> list:
        """Metrics, labelled ``instance`` (id) and ``alias`` (always both:
        a metric family has one label set)."""
        labels = {"instance": self.id, "alias": self.alias}
        gauges, totals = self.gauges, self.totals()
        out = [Sample("instance_up", "gauge", "1 when the instance is running", int(self.status == "running"), labels),
               Sample("instance_tcp_connections", "gauge", "TCP connections being relayed", gauges["tcps"], labels),
               Sample("instance_udp_sessions", "gauge", "UDP sessions open", gauges["udps"], labels),
               Sample("instance_pool", "gauge", "idle pool connections or carriers", gauges["pool"], labels),
               Sample("instance_ping_seconds", "gauge", "round trip to the other end (0: unknown)",
                      gauges["ping"] / 1000, labels)]
        for name in COUNTERS:
            out.append(Sample("instance_bytes", "counter", "bytes relayed, across restarts until a reset",
                              totals[name], dict(labels, protocol=name[:3], direction=name[3:])))
        return out

    def to_row(self) -> dict:
        return {"id": self.id, "alias": self.alias, "url": self.url, "restart": self.restart,
                "desired": self.desired, "meta": {"peer": dict(self.meta["peer"]), "tags": dict(self.meta["tags"])},
                "counters": self.totals(), "created": self.created}

    @classmethod
    def from_row(cls, row: dict, master_log: str) -> "Instance":
        """A stored row; a URL that no longer passes the checks keeps its
        instance (options None, status error) so the operator can fix or
        delete it."""
        try:
            url, options = check_url(row["url"])
        except ApiError:
            url, options = row["url"], None
        counters = {name: value for name, value in (row.get("counters") or {}).items() if _count(value)}
        instance = cls(row["id"], row.get("alias") or "", url, options, master_log,
                       restart=row.get("restart") is True,
                       desired="running" if row.get("desired") == "running" else "stopped",
                       meta=check_meta_row(row.get("meta") or {}), counters=counters,
                       created=float(row.get("created") or 0.0))
        return instance


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def api_key_entry(master_alias: str, master_id: str, key: str = MASK) -> dict:
    """NodePass's ``********`` pseudo instance: the master's alias, its id
    in ``config``, and in ``url`` the key (only right after a rotation)."""
    entry = {"id": API_KEY_ID, "alias": master_alias, "type": "", "status": "running", "url": key,
             "config": master_id, "restart": False, "meta": empty_meta(), "mode": 0}
    entry.update(dict.fromkeys(GAUGES, 0))
    entry.update(new_counters())
    return entry
