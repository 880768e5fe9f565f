# -*- test-case-name: tests.test_master_service -*-
"""The master's settings: what ``--mode master`` and its URL configure,
checked before anything starts, shared read-only by every part."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass


def default_workers() -> int:
    """One worker process per core."""
    return max(1, os.cpu_count() or 1)


def default_state_dir() -> str:
    """systemd's ``StateDirectory=`` when set, else the user's state
    directory (``~/.local/state/tunnelpass/master``)."""
    given = os.environ.get("STATE_DIRECTORY")
    if given:
        return given.split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "tunnelpass", "master")


@dataclass(frozen=True)
class MasterSettings:
    api_host: str = "127.0.0.1"
    api_port: int = 9090
    prefix: str = "/api"
    tls: int = 0
    crt: str | None = None
    key: str | None = None
    state_dir: str = "."
    workers: int = 1
    cors: tuple = ()
    report_interval: float = 5.0
    backup_interval: float = 3600.0
    shutdown_timeout: float = 5.0
    log: str = "info"
    alias: str = ""

    @property
    def loopback(self) -> bool:
        """The API listens on a loopback address only (so the Host header
        must name loopback: DNS rebinding)."""
        host = self.api_host.strip("[]")
        if host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    # The names the tunnel server's certificate code reads (servertls).

    @property
    def cert(self) -> str | None:
        return self.crt

    @property
    def private_key(self) -> str | None:
        return self.key

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def base(self) -> str:
        """The path every API route starts with: ``{prefix}/v1``."""
        return f"{self.prefix.rstrip('/')}/v1"
