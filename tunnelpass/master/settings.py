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

    @property
    def base(self) -> str:
        """The path every API route starts with: ``{prefix}/v1``."""
        return f"{self.prefix.rstrip('/')}/v1"
