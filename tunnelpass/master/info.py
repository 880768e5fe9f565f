# -*- test-case-name: tests.test_master_info -*-
"""The host figures of ``GET /info`` (NodePass's field names), from /proc.

Each parser takes a file's text and never raises: a line it cannot read
is skipped, a figure it cannot find is 0 (``cpu``: -1), numbers are
clamped to 0..2**64-1.  :class:`HostFigures` reads the files (at most
1 MiB each) and keeps the previous CPU sample, so ``cpu`` is the busy
share since the last call, not a blocking two-sample wait.
"""

from __future__ import annotations

import os
import platform
import re

MAX_READ = 1 << 20
_U64 = (1 << 64) - 1

#: Interface name prefixes that are virtual (bridges, containers, tunnels).
VIRTUAL_PREFIXES = ("lo", "veth", "docker", "podman", "br-", "virbr", "cni", "flannel", "vxlan", "tun", "tap",
                    "ifb", "dummy", "kube", "cali", "wg", "zt", "tailscale")
#: Block devices that are not disks (loop, RAM, compressed RAM, device
#: mapper, software RAID, optical) and partitions of disks.
_NOT_DISK = re.compile(r"^(loop|ram|zram|dm-|md|sr|fd|nbd)")
_PARTITION = re.compile(r"^((sd|vd|hd|xvd)[a-z]+\d+|(nvme\d+n\d+|mmcblk\d+|nbd\d+)p\d+)$")

#: platform.machine() -> Go's GOARCH names (NodePass's ``arch``).
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386",
         "i686": "386", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64", "mips64": "mips64"}


def _number(text: str) -> int | None:
    if not text.isdigit() or len(text) > 20:
        return None
    value = int(text)
    return value if value <= _U64 else None


def parse_cpu(text: str) -> tuple[int, int] | None:
    """``/proc/stat`` -> (idle, total) jiffies of the ``cpu`` line (idle
    counts iowait too: waiting for a disk is not work), or None."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [_number(field) for field in fields[1:11]]
            if len(values) < 4 or None in values:
                return None
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return idle, sum(values)
    return None


def cpu_percent(previous, current) -> int:
    """Busy share 0..100 between two :func:`parse_cpu` samples, -1 unknown."""
    if previous is None or current is None:
        return -1
    idle, total = current[0] - previous[0], current[1] - previous[1]
    if total <= 0 or idle < 0 or idle > total:
        return -1
    return min(100, max(0, round((total - idle) * 100 / total)))


def parse_meminfo(text: str) -> dict:
    """``/proc/meminfo`` -> mem_total, mem_used (total - available),
    swap_total, swap_used (total - free), in bytes."""
    found = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("MemTotal:", "MemAvailable:", "SwapTotal:", "SwapFree:"):
            value = _number(fields[1])
            if value is not None and fields[0] not in found:
                found[fields[0]] = min(value * 1024, _U64)
    total, swap = found.get("MemTotal:", 0), found.get("SwapTotal:", 0)
    return {"mem_total": total, "mem_used": max(0, total - found.get("MemAvailable:", total)),
            "swap_total": swap, "swap_used": max(0, swap - found.get("SwapFree:", swap))}


def is_virtual_interface(name: str, virtual=frozenset()) -> bool:
    return name in virtual or name.startswith(VIRTUAL_PREFIXES)


def parse_net_dev(text: str, virtual=frozenset()) -> tuple[int, int]:
    """``/proc/net/dev`` -> (received, sent) bytes over physical interfaces;
    *virtual*: names the kernel lists as virtual (/sys/devices/virtual/net)."""
    rx = tx = 0
    for line in text.splitlines():
        name, sep, counters = line.partition(":")
        fields = counters.split()
        name = name.strip()
        if not sep or not name or len(fields) < 9 or is_virtual_interface(name, virtual):
            continue
        received, sent = _number(fields[0]), _number(fields[8])
        if received is None or sent is None:
            continue
        rx, tx = min(rx + received, _U64), min(tx + sent, _U64)
    return rx, tx


def is_whole_disk(name: str) -> bool:
    return bool(name) and not _NOT_DISK.match(name) and not _PARTITION.match(name)


def parse_diskstats(text: str) -> tuple[int, int]:
    """``/proc/diskstats`` -> (read, written) bytes over whole disks
    (sectors are 512 bytes in this file whatever the device's size)."""
    read = written = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 14 or not is_whole_disk(fields[2]):
            continue
        sectors_read, sectors_written = _number(fields[5]), _number(fields[9])
        if sectors_read is None or sectors_written is None:
            continue
        read, written = min(read + sectors_read * 512, _U64), min(written + sectors_written * 512, _U64)
    return read, written


def parse_uptime(text: str) -> int:
    """``/proc/uptime`` -> whole seconds since boot (0 unknown)."""
    fields = text.split()
    if not fields:
        return 0
    whole, _, fraction = fields[0].partition(".")
    value = _number(whole)
    return value if value is not None and (not fraction or fraction.isdigit()) else 0


def read_proc(path: str) -> str:
    """At most 1 MiB of a /proc file as text ("" when unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ).decode("utf-8", "replace")
    except OSError:
        return ""


def _virtual_interfaces() -> frozenset:
    try:
        return frozenset(os.listdir("/sys/devices/virtual/net"))
    except OSError:
        return frozenset()


def os_arch() -> tuple[str, str]:
    """NodePass's ``os`` and ``arch`` (Go's names)."""
    machine = platform.machine().lower()
    return platform.system().lower(), _ARCH.get(machine, machine)


class HostFigures:
    """The /proc figures of ``/info``; *read* (path -> text) and
    *virtual* (-> interface names) are injectable for tests."""

    def __init__(self, read=read_proc, virtual=_virtual_interfaces):
        self.read, self.virtual = read, virtual
        self.previous_cpu = parse_cpu(self.read("/proc/stat"))

    def sample(self) -> dict:
        current = parse_cpu(self.read("/proc/stat"))
        cpu = cpu_percent(self.previous_cpu, current)
        if current is not None:
            self.previous_cpu = current
        figures = {"cpu": cpu}
        figures.update(parse_meminfo(self.read("/proc/meminfo")))
        figures["netrx"], figures["nettx"] = parse_net_dev(self.read("/proc/net/dev"), self.virtual())
        figures["diskr"], figures["diskw"] = parse_diskstats(self.read("/proc/diskstats"))
        figures["sysup"] = parse_uptime(self.read("/proc/uptime"))
        return figures
