# -*- test-case-name: tests.test_masteroptions -*-
"""``--mode master``'s own values: the API address, its path prefix, CORS
origins and the ``master://HOST:PORT[/PREFIX]?log=&tls=&crt=&key=`` URL
(NodePass's form).  Sans-IO; every parser raises :class:`ValueError` with a
message fit for a user."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from tunnelpass.config.settings import _show, format_address, parse_host, parse_port
from tunnelpass.config.urls import EMPTY_HOST, _decoded, parse_address, split_url

#: Where the API listens when nothing says otherwise: loopback only.
DEFAULT_API = "127.0.0.1:9090"
DEFAULT_PREFIX = "/api"
#: The query keys a master URL takes -> options.
MASTER_QUERY = {"log": "log", "tls": "tls", "crt": "cert", "key": "private-key"}
MAX_ORIGINS = 16

_SEGMENT = re.compile(r"[A-Za-z0-9._~-]{1,32}")
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def parse_api_address(text: str) -> str:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every IPv4 interface, as
    NodePass's ``master://:9090``) -> normalized ``HOST:PORT``."""
    if text.startswith(":") and text[1:].isdigit():
        return format_address(EMPTY_HOST, parse_port(text[1:]))
    return parse_address(text, "--api")


def parse_prefix(text: str) -> str:
    """An API path prefix: ``/api``, ``/admin/np``; no trailing slash, no
    dots-only segments, at most 4 segments of ``[A-Za-z0-9._~-]``."""
    if not text.startswith("/"):
        raise ValueError(f"API prefix {_show(text)} must start with /")
    segments = text.strip("/").split("/") if text.strip("/") else []
    if not segments or len(segments) > 4:
        raise ValueError(f"API prefix {_show(text)}: give 1 to 4 path segments, e.g. /api")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment) or set(segment) == {"."}:
            raise ValueError(f"API prefix {_show(text)}: segment {_show(segment)} may use only letters, digits "
                             "and . _ ~ - (32 at most)")
    return "/" + "/".join(segments)


def parse_origins(text: str) -> tuple:
    """``--cors`` origins: ``https://dash.example.com[:PORT]`` comma
    separated; ``*`` is refused (a key-bearing API is no public resource)."""
    origins = []
    for item in text.split(","):
        origin = item.strip().rstrip("/")
        if origin == "*":
            raise ValueError("--cors * would let every web page drive this API with a stolen key; "
                             "name the dashboard's origin, e.g. https://dash.example.com")
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(f"--cors {_show(item)}: an origin is http(s)://HOST[:PORT], nothing after it")
        if origin.lower() not in origins:
            origins.append(origin.lower())
    if not origins or len(origins) > MAX_ORIGINS:
        raise ValueError(f"--cors: give 1 to {MAX_ORIGINS} origins")
    return tuple(origins)


def parse_master_url(text: str) -> dict[str, str]:
    """Options (long option name -> value) from
    ``master://HOST:PORT[/PREFIX]?log=&tls=&crt=&key=``."""
    parts, port = split_url(text)
    if parts.scheme.lower() != "master":
        raise ValueError(f"URL scheme {_show(parts.scheme)}: expected master://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a master:// URL carries no key: the API key is generated at first start")
    if parts.fragment:
        raise ValueError("URL must not have a #fragment")
    if port is None:
        raise ValueError("master:// URL needs the API address as HOST:PORT, e.g. master://127.0.0.1:9090")
    host = parts.hostname or EMPTY_HOST
    options = {"mode": "master", "api": parse_api_address(format_address(parse_host(host, "API address"), port))}
    if parts.path not in ("", "/"):
        options["api-prefix"] = parse_prefix(parts.path.rstrip("/"))
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed URL query: {e}") from None
    for name, value in query:
        if name not in MASTER_QUERY:
            raise ValueError(f"unknown master URL query key {_show(name)}; known: {', '.join(MASTER_QUERY)}")
        if MASTER_QUERY[name] in options:
            raise ValueError(f"URL query key {_show(name)} given twice")
        if not value:
            raise ValueError(f"URL query key {name} needs a value")
        options[MASTER_QUERY[name]] = _decoded(value, f"query {name}")
    return options
