# -*- test-case-name: tests.test_switch -*-
"""TCP keepalive for tunnel connections that can sit idle for long.

An idle pool connection behind a NAT or a stateful firewall can be dropped
silently; the server would then hand a user a dead connection.  Keepalive
probes after ``IDLE`` seconds of silence (every ``INTERVAL``, ``COUNT``
times) make the kernel notice within about a minute, and the connection is
closed (and leaves the pool) like any other.
"""

from __future__ import annotations

import socket

IDLE, INTERVAL, COUNT = 30, 10, 3


def enable_keepalive(transport) -> bool:
    """Turn keepalive on for *transport*'s TCP socket (a TLS transport
    reaches the socket beneath it); ``False`` if there is no socket."""
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", IDLE), ("TCP_KEEPINTVL", INTERVAL), ("TCP_KEEPCNT", COUNT)):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        return False
    return True
