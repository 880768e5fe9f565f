# -*- test-case-name: tests.test_master_dashboard -*-
"""The ready-to-paste client end of a master's server instance: the
``client`` field of ``GET /instances/{id}`` (the dashboard shows it with a
copy button).

The address is chosen as the server's own logged token chooses it
(:func:`tunnelpass.relay.hostaddrs.choose_public`): the URL's ``public=``,
else the bound tunnel host, else for a wildcard bind the master's first
non-loopback address.  The token carries the key, the TLS level and, for
tls=1, the pin of the certificate the instance saved in its directory at
its first start; before that the pin is unknown and there is no token, only
a command with ``--tunnel``/``--key``/``--tls 1`` (the client then relies on
the key's channel binding instead of the pin).
"""

from __future__ import annotations

import os
import shlex

from tunnelpass.config.settings import format_address
from tunnelpass.config.urls import make_token

COMMAND = "twistd -n --pidfile= tunnelpass --mode client"


def saved_pin(directory: str) -> bytes | None:
    """The SHA-256 pin of the tls=1 certificate saved in *directory*, or
    None when there is none yet (the instance never started) or it is
    unreadable."""
    from tunnelpass.carriers.tls import CertificateError, fingerprint, load_saved_pair

    if not (os.path.exists(os.path.join(directory, "tunnelpass.crt"))
            or os.path.exists(os.path.join(directory, "tunnelpass.crt.bak"))):
        return None
    try:
        _, chain = load_saved_pair(directory)
    except (CertificateError, OSError, ValueError):
        return None
    return fingerprint(chain[0])


def client_end(options, directory: str, addresses) -> dict | None:
    """``{"command": ..., "token": ...}`` for a server instance's checked
    *options* (``token`` left out when it cannot be made: tls=1 before the
    first start, or a weak key a token refuses); None for a client instance
    or a server whose port is not known (port 0)."""
    from tunnelpass.relay.hostaddrs import choose_public

    if options is None or options.get("mode") != "server":
        return None
    host, _, port_text = options["tunnel"].rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return None
    if not 1 <= port <= 65535:
        return None
    choice = choose_public(host, port, addresses, options.get("public-address"))
    tls = options.get("tls") or 0
    key = options["key"]
    pin = saved_pin(options.get("state-dir") or directory) if tls == 1 else None
    token = None
    if tls != 1 or pin is not None:
        try:
            token = make_token(choice.host, choice.port, key, pin, tls=tls)
        except ValueError:
            token = None
    if token is not None:
        return {"command": f"{COMMAND} --token {token} --target HOST:PORT", "token": token}
    flags = f" --tls {tls}" if tls else ""
    if options.get("weak-key"):
        flags += " --weak-key"
    address = format_address(choice.host, choice.port)
    return {"command": f"{COMMAND} --tunnel {shlex.quote(address)} --key {shlex.quote(key)}{flags} "
                       "--target HOST:PORT"}
