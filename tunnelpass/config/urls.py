# -*- test-case-name: tests.test_urls -*-
"""NodePass-style URLs, connection tokens and tunnel keys.

``server://KEY@0.0.0.0:10101/0.0.0.0:8080?tls=1&log=debug`` reads as:
scheme = mode, userinfo = tunnel key, host:port = ``--tunnel``, path =
``--target``, query = other options (mapping below).  Unknown or repeated
query keys are errors, never ignored.  Everything here is sans-IO and
raises :class:`ValueError` with a message fit for a user.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import secrets
from urllib.parse import parse_qsl, unquote, urlsplit

from tunnelpass.config.settings import _show, format_address, parse_carrier_type, parse_host, parse_port

MAX_URL = 2048
MAX_TOKEN = 1024
MIN_KEY_LENGTH = 16

#: URL query key -> command-line option, as NodePass names them.
QUERY_OPTIONS = {
    "log": "log",
    "tls": "tls",
    "crt": "cert",
    "key": "private-key",
    "min": "min-pool",
    "max": "max-pool",
    "mode": "flow",
    "read": "read",
    "slot": "slot",
    "notcp": "no-tcp",
    "noudp": "no-udp",
    "proxy": "proxy-protocol",
    "weakkey": "weak-key",
    "rate": "rate",
    "public": "public-address",  # tunnelpass's own: what the server's logged token carries
    "dial": "dial",
    "dns": "dns",
    "lbs": "lbs",
    "block": "block",
    "sni": "sni",
    "type": "type",  # NodePass's pool type: 0 TCP pool, 3 HTTP/2 multiplexed (1 and 2 are refused)
}

#: NodePass URL parts tunnelpass does not have yet (they are planned): a
#: clear "not available" instead of "unknown key".
PLANNED_SCHEMES: dict[str, str] = {}

#: An empty host (``server://:10101/...``, NodePass's "all interfaces"):
#: listened on, it is every IPv4 interface; dialled, Linux connects to
#: this host, as Go's dialer does for an empty host.  ``[::]`` listens
#: on IPv6 (and IPv4) instead.
EMPTY_HOST = "0.0.0.0"

#: At most this many addresses in a target group.
MAX_TARGETS = 64

#: NodePass ``mode=`` numbers per scheme -> ``--flow``.
_FLOWS = {
    "server": {"0": "auto", "1": "receive", "2": "send"},
    "client": {"0": "auto", "1": "local", "2": "tunnel"},
}
_BOOLEAN = {"0": "0", "1": "1", "false": "0", "true": "1"}
_PROXY = {"0": "off", "1": "v1", "2": "v2", "off": "off", "v1": "v1", "v2": "v2"}


def split_url(text: str):
    """``(urlsplit parts, port)`` of a URL argument, checked for length,
    spaces and control characters; ValueError with a user's message."""
    if not isinstance(text, str) or len(text) > MAX_URL:
        raise ValueError(f"URL longer than {MAX_URL} characters")
    _decoded(text, "URL")
    try:
        parts = urlsplit(text)
        return parts, parts.port
    except ValueError as e:
        raise ValueError(f"malformed URL: {e}") from None


def parse_url(text: str) -> dict[str, str]:
    """Options (long option name -> value) from a NodePass-style URL."""
    parts, port = split_url(text)
    scheme = parts.scheme.lower()
    if scheme in PLANNED_SCHEMES:
        raise ValueError(f"{PLANNED_SCHEMES[scheme]} is not available in this version of tunnelpass (planned); "
                         "run each instance as server:// or client://")
    if scheme not in _FLOWS:
        raise ValueError(f"URL scheme {_show(parts.scheme)}: use server:// or client://")
    if parts.fragment:
        raise ValueError("URL must not have a #fragment")
    if port is None or (parts.hostname is None and not parts.netloc.rpartition("@")[2].startswith(":")):
        raise ValueError("URL needs the tunnel address as HOST:PORT after the key, e.g. server://KEY@0.0.0.0:10101/...")
    host = parts.hostname or EMPTY_HOST  # server://:10101/...: all interfaces, as in NodePass
    options = {"mode": scheme, "tunnel": parse_address(format_address(host, port), "tunnel address")}
    if parts.password is not None:
        raise ValueError("put only the key before '@' (no ':' in it; percent-encode it)")
    if parts.username is not None:
        options["key"] = check_key(_decoded(unquote(parts.username, errors="strict"), "key"), weak_ok=True)
    target = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not target:
        raise ValueError("URL needs the target address as /HOST:PORT")
    options["target"] = parse_targets(_decoded(unquote(target, errors="strict"), "target"), "target",
                                      empty_host=EMPTY_HOST)
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed URL query: {e}") from None
    seen = set()
    for name, value in query:
        value = _decoded(value, f"query {name}")
        if name in seen:
            raise ValueError(f"URL query key {_show(name)} given twice")
        seen.add(name)
        if name not in QUERY_OPTIONS:
            raise ValueError(f"unknown URL query key {_show(name)}; known: {', '.join(QUERY_OPTIONS)}")
        options[QUERY_OPTIONS[name]] = _query_value(scheme, name, value)
    return options


def _decoded(text: str, what: str) -> str:
    """Refuse control characters and spaces, checked again after %-decoding."""
    if any(ord(c) < 33 or c == "\x7f" or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError(f"{what} contains spaces or control characters")
    return text


def _query_value(scheme: str, name: str, value: str) -> str:
    if name == "type":  # checked here, so the error names the URL key the user wrote
        return str(parse_carrier_type(value, "URL query type={}"))
    table = {"mode": _FLOWS[scheme], "notcp": _BOOLEAN, "noudp": _BOOLEAN, "proxy": _PROXY,
             "weakkey": _BOOLEAN}.get(name)
    if table is None:
        if not value and name != "dial":  # dial= (empty) is NodePass's auto
            raise ValueError(f"URL query key {name} needs a value")
        return value
    if value.lower() not in table:
        raise ValueError(f"URL query {name}={_show(value)}: use one of {', '.join(table)}")
    return table[value.lower()]


def parse_address(text: str, what: str = "address") -> str:
    """``HOST:PORT`` or ``[V6]:PORT`` -> normalized ``HOST:PORT`` text."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{what} {_show(text)}: expected [IPV6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{what} {_show(text)}: {_show(host)} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"{what} {_show(text)}: expected HOST:PORT")
        host = parse_host(host, what)
    return format_address(host, parse_port(port))


def parse_targets(text: str, what: str = "--target", empty_host: str | None = None) -> str:
    """``HOST:PORT[,HOST:PORT...]`` (a target group) -> normalized text.

    With *empty_host* (URLs), ``:PORT`` means that host (NodePass's "all
    interfaces"); elsewhere a host is required."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_TARGETS:
        raise ValueError(f"at most {MAX_TARGETS} targets in a group")
    if empty_host is not None:
        parts = [empty_host + part if part.startswith(":") else part for part in parts]
    addresses = [parse_address(part, what) for part in parts]
    if len(set(addresses)) != len(addresses):
        raise ValueError("a target is listed twice")
    return ",".join(addresses)


# Keys
#
# The rule (README "Tunnels", docs/protocol.rst): a key is weak if it has fewer than
# MIN_DISTINCT different characters or an estimated strength under MIN_BITS.
# The estimate gives each character log2(N) bits, N being the size of the
# character classes the key uses (a-z 26, A-Z 26, 0-9 10, anything else
# 33), and gives nothing to a character that only continues a run
# ("aaa", "abc", "321") or repeats an earlier stretch of 3 or more
# characters ("passwordpassword").  Simple enough to explain in an error
# message; it catches the keys people type, not every guessable one.

MIN_DISTINCT = 8
MIN_BITS = 64
KEY_RULE = f"{MIN_KEY_LENGTH}+ characters, {MIN_DISTINCT}+ different ones and an estimated {MIN_BITS}+ bits"
KEY_ADVICE = "generate one with 'openssl rand -hex 32', or omit --key on the server to have one generated"
_CLASSES = (
    (lambda c: "a" <= c <= "z", 26),
    (lambda c: "A" <= c <= "Z", 26),
    (lambda c: "0" <= c <= "9", 10),
    (lambda c: not (c.isascii() and c.isalnum()), 33),
)


def generate_key(token=secrets.token_urlsafe) -> str:
    """A fresh tunnel key: 256 random bits, URL-safe.

    Drawn again in the (2**-200-ish) case that the random draw looks weak,
    so a generated key always passes :func:`check_key`; *token* is
    injectable for tests."""
    while True:
        key = token(32)
        if key_weakness(key) is None:
            return key


def estimated_bits(key: str) -> float:
    """The strength estimate of the rule above, in bits."""
    pool = sum(size for member, size in _CLASSES if any(member(c) for c in key))
    counted, i = 0, 0
    while i < len(key):
        repeat = _repeat_length(key, i)
        if repeat:
            i += repeat
            continue
        if not (i >= 2 and abs(step := ord(key[i]) - ord(key[i - 1])) <= 1
                and step == ord(key[i - 1]) - ord(key[i - 2])):
            counted += 1
        i += 1
    return counted * math.log2(pool) if counted else 0.0


def _repeat_length(key: str, i: int) -> int:
    """Length of the longest stretch (3+ characters) at *i* that also starts
    earlier in the key (overlapping allowed, so runs count as repeats)."""
    length = 0
    while i + length + 1 <= len(key) and key.find(key[i:i + length + 1], 0, i + length) != -1:
        length += 1
    return length if length >= 3 else 0


def key_weakness(key: str) -> str | None:
    """Why *key* is weak under the rule above, or None if it is not."""
    if len(key) < MIN_KEY_LENGTH:
        return f"it has {len(key)} characters"
    distinct = len(set(key))
    if distinct < MIN_DISTINCT:
        return f"it has only {distinct} different character{'s' if distinct > 1 else ''}"
    bits = estimated_bits(key)
    if bits < MIN_BITS:
        return f"it is only about {bits:.0f} bits by tunnelpass's estimate"
    return None


def check_key(key: str, weak_ok: bool = False) -> str:
    """Refuse keys an offline guesser could find (see docs/protocol.rst).

    Empty, short (< MIN_KEY_LENGTH) and overlong keys are always refused;
    *weak_ok* (``--weak-key``) lets an otherwise weak key through.  Parsers
    of single sources (URLs, tokens, one option) pass ``weak_ok=True``: the
    strength check runs once, on the key finally chosen, where
    ``--weak-key`` is known (``tap.Options``)."""
    if not key:
        raise ValueError("the tunnel key is empty; omit --key to have a strong one generated")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the tunnel key is shorter than {MIN_KEY_LENGTH} characters; {KEY_ADVICE}")
    if len(key) > 256:
        raise ValueError("the tunnel key is longer than 256 characters")
    weakness = None if weak_ok else key_weakness(key)
    if weakness is not None:
        raise ValueError(f"the tunnel key is weak: {weakness} (a key needs {KEY_RULE}); {KEY_ADVICE} "
                         "(--weak-key accepts it anyway)")
    return key


# Tokens: everything a client needs, in one copy-pasteable string

_TOKEN_PREFIX = "tp1."


def make_token(host: str, port: int, key: str, pin: bytes | None = None, tls: int | None = None) -> str:
    """One copy-pasteable string with the server address, key, TLS level
    and (tls=1) certificate pin.  Not the carrier type (``--type``): the
    client learns it from the authenticated session, so a server can change
    it without new tokens."""
    parse_host(host, "token host")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError("token port must be 1..65535")
    check_key(key)
    body = {"h": host, "p": port, "k": key}
    if pin is not None:
        if not isinstance(pin, bytes) or len(pin) != 32:
            raise ValueError("a certificate pin is 32 bytes (SHA-256)")
        body["f"] = pin.hex()
    if tls is not None:
        if tls not in (0, 1, 2) or (pin is not None and tls != 1):
            raise ValueError("a token's TLS level is 0, 1 or 2 (a pin goes with 1)")
        body["t"] = tls
    raw = json.dumps(body, separators=(",", ":")).encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_token(token: str) -> dict:
    """``{"host", "port", "key", "pin" (bytes or None), "tls" (0-2 or None)}``
    from a token."""
    if not isinstance(token, str) or not token.startswith(_TOKEN_PREFIX) or len(token) > MAX_TOKEN:
        raise ValueError("not a tunnelpass token (they start with 'tp1.')")
    encoded = token[len(_TOKEN_PREFIX):]
    try:
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("token is damaged (copy it again whole)") from None
    if not isinstance(body, dict) or set(body) - {"h", "p", "k", "f", "t"} or not {"h", "p", "k"} <= set(body):
        raise ValueError("token has unexpected contents")
    host, port, key, pin, tls = body["h"], body["p"], body["k"], body.get("f"), body.get("t")
    if not isinstance(host, str) or type(port) is not int or not 1 <= port <= 65535:
        raise ValueError("token has an invalid server address")
    parse_host(host, "token host")
    if not isinstance(key, str):
        raise ValueError("token has an invalid key")
    check_key(_decoded(key, "token key"), weak_ok=True)
    if pin is not None:
        if not isinstance(pin, str) or len(pin) != 64:
            raise ValueError("token has an invalid certificate pin")
        try:
            pin = bytes.fromhex(pin)
        except ValueError:
            raise ValueError("token has an invalid certificate pin") from None
    if tls is not None and (type(tls) is not int or tls not in (0, 1, 2) or (pin is not None and tls != 1)):
        raise ValueError("token has an invalid TLS level")
    return {"host": host, "port": port, "key": key, "pin": pin, "tls": tls}
