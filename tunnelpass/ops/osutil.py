# -*- test-case-name: tests.test_osutil -*-
"""The process and its files: the open-files limit, why a port cannot be
bound, whether a file changed.

Shared by the forwarder and both tunnel ends; nothing here holds state.
"""

from __future__ import annotations

import os
import resource

from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from tunnelpass.config.settings import format_address

log = Logger(namespace="tunnelpass")


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; return the soft limit
    now in force (what :class:`~tunnelpass.ops.fdbudget.Descriptors` budgets).

    Each relayed TCP connection needs two descriptors (and a UDP session
    one); the common soft default of 1024 would cap a forwarder at ~500
    connections, far below --max-conns, with accept() failing on EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        log.debug("open-files limit raised from {soft} to {hard}", soft=soft, hard=hard)
        return hard
    return soft


def cannot_listen(where: str, error: CannotListenError) -> str:
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    return f"cannot listen on {where}: {reason}"


def listen_error(what: str, host: str, port: int, error: CannotListenError) -> str:
    """The one startup line for *what* (an option) that cannot be bound."""
    return f"{what}: {cannot_listen(format_address(host, port), error)}"


def file_stamp(path: str):
    """What tells a changed file apart (mtime, size, inode); None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
