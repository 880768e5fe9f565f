#!/usr/bin/env python3
"""Tunnel benchmark: tunnelpass server + client against peer tunnels, one run, loopback.

Relays, each started in front of the scenario's target:

* direct loopback (no relay);
* tunnelpass, type 0 (TCP pool) at tls=0 and tls=1, and type 3 (HTTP/2
  multiplexed carrier, ``--type 3``) at tls=0 and tls=1: a server and a
  client, separate processes, receive flow (user -> server --target ->
  pool connection or carrier stream -> client -> target);
* ``ssh -L`` with aes128-gcm (the encrypted analogue of tls=1);
* socat two-hop chain (the plain two-process analogue of tls=0);
* haproxy, one hop (a reference; bulk and new connections only).

Scenarios (``--only``; the names and columns are in ``scenarios.py``):

* bulk: iperf3 TCP throughput;
* http, http-close: nginx serving 1 KiB to wrk with 32 connections on 2
  threads, keep-alive and ``Connection: close``: req/s, p50/p99 latency;
* newconn: sequential connect / 64-byte echo / close: p50, p99, rate;
* newconn-concurrent: 32 clients doing the same in a loop;
* fairness: a 64-byte echo's p50/p99 on one connection, idle and while a
  bulk sender runs on another connection of the same tunnel (type 0 and
  type 3 at tls=1);
* rss: RSS per tunnelled connection with --conns concurrent connections
  (type 3 tls=1, type 0 tls=1 and tls=0), and the RSS --settle seconds
  after they closed.

All but rss run --rounds interleaved rounds (round 1 measures every relay,
then round 2, ...) and report medians; measurements with the same target
share its processes.  The ratios the issues target come from the same run.
Needs iperf3, socat, haproxy, nginx, wrk and openssh-server (bench/run.sh
installs what is missing when run as root).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rss  # noqa: E402
import scenarios  # noqa: E402
from peers import HAPROXY, SOCAT, SSH, T0, T1, T3_0, T3_1  # noqa: E402
from rounds import ratio  # noqa: E402

SCENARIOS = scenarios.NAMES + ("rss",)


PEERS = {SSH: "ssh -L", SOCAT: "socat two-hop", HAPROXY: "haproxy one hop"}


def ratios(found: dict) -> list[str]:
    """The issues' targets, each figure against its peer from the same run; the target in brackets
    ("-": no target, shown for comparison)."""
    lines = ["ratios (same run; target in brackets):"]

    def figure(measurement: str, relay: str, column: str):
        row = found.get(measurement, {}).get(relay)
        return row[scenarios.column(measurement, column)] if row else None

    def line(measurement: str, column: str, relay: str, peer: str, target: str) -> None:
        if measurement in found:
            label = f"{measurement} {_short(relay)} / {PEERS[peer]}"
            value = ratio(figure(measurement, relay, column), figure(measurement, peer, column))
            lines.append(f"  {label:<46} {column:<6} = {value:>6}  ({target})")

    line("bulk", "Gbit/s", T3_1, SSH, ">= 0.8")
    line("bulk", "Gbit/s", T1, SSH, ">= 1.0")
    line("bulk", "Gbit/s", T3_0, SOCAT, "-")
    line("bulk", "Gbit/s", T0, SOCAT, ">= 2.0")
    for measurement in ("http", "http-close"):
        line(measurement, "req/s", T3_1, SSH, ">= 1.0")
        line(measurement, "req/s", T1, SSH, ">= 1.0" if measurement == "http" else "-")
        line(measurement, "req/s", T0, SOCAT, ">= 1.0" if measurement == "http" else "-")
    for measurement in ("newconn", "newconn-concurrent"):
        line(measurement, "conn/s", T3_1, SSH, ">= 1.0")
        line(measurement, "p50 ms", T3_1, SSH, "<= 1.0")
        line(measurement, "conn/s", T1, SSH, "-")
        line(measurement, "p50 ms", T1, SSH, "-")
        line(measurement, "conn/s", T3_0, HAPROXY, ">= 0.5")
        line(measurement, "conn/s", T0, HAPROXY, "-")
    for relay, target in ((T3_1, "<= 3.0"), (T1, "-; type 0 for comparison")):
        if "fairness" in found:
            label = f"fairness {_short(relay)}: busy p50 / idle p50"
            lines.append(f"  {label:<46} {'p50':<6} = {ratio(figure('fairness', relay, 'busy/idle'), 1.0):>6}  "
                         f"({target})")
    if "rss" in found:
        for name, r in found["rss"].items():
            per, back = r.per_connection(), r.returned()
            target = rss.TARGETS.get(name)
            lines.append(f"  rss {_short(name):<13} {per[0]:.1f} / {per[1]:.1f} KiB per connection (server / client"
                         f"{f'; <= {target:.0f}' if target else ''}), after close {back[0]:.0f}% / {back[1]:.0f}% "
                         f"of start (80-120%)")
    return lines


def _short(name: str) -> str:
    """tunnelpass-t3-tls1 -> t3 tls=1; tunnelpass-tls1 -> t0 tls=1."""
    parts = name.split("-")[1:]
    return f"{parts[0] if len(parts) == 2 else 't0'} tls={parts[-1][3:]}"


# option -> (default, --quick default, help)
DEFAULTS = {
    "rounds": (3, 1, "interleaved rounds per measurement"),
    "seconds": (4, 2, "iperf3 run length (bulk)"),
    "http_seconds": (4, 2, "wrk run length (http, http-close)"),
    "latency_count": (2000, 200, "sequential connections per round (newconn)"),
    "latency_seconds": (6.0, 2.0, "... or fewer: a sequential run also ends after this many seconds"),
    "concurrent_seconds": (3.0, 1.0, "length of a newconn-concurrent run"),
    "fair_seconds": (2.0, 1.0, "fairness: seconds of echoes idle, and as many while busy"),
    "conns": (5000, 500, "concurrent connections for RSS"),
    "settle": (60.0, 10.0, "seconds after close for the RSS reading"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: every --quick default below")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    for name, (full, short, text) in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(full),
                            help=f"{text} (default {full:g}; --quick {short:g})")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the measured rounds, one more run per tunnelpass relay with py-spy on its "
                             "server and client: raw stacks in DIR (not counted in the figures)")
    parser.add_argument("--workdir", help="keep configurations and process logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    for name, (full, short, _) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown scenario {', '.join(unknown)}" if unknown else "--rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tools = set().union(*(m.tools() for m in scenarios.MEASUREMENTS if m.name in args.only))
    missing = sorted(tool for tool in tools if shutil.which(tool) is None)
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (apt-get install -y {' '.join(missing)}; "
              f"nginx is in nginx-light)", file=sys.stderr)
        return 2
    with_ssh = os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") is not None
    if not with_ssh:
        print("bench: no /usr/sbin/sshd or ssh: ssh -L is left out (apt-get install -y openssh-server)", file=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if "rss" in args.only and min(hard, 65536) < 3 * args.conns + 200:
        print(f"bench: fd limit {min(hard, 65536)} is too low for --conns {args.conns}", file=sys.stderr)
        return 2
    # SIGTERM ends the run like Ctrl-C: the scenarios' `with Relays` blocks stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (a & job)

    started = time.monotonic()
    workdir = args.workdir or tempfile.mkdtemp(prefix="tunnel-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        found, tables = scenarios.run(workdir, args.only, args, left_out=() if with_ssh else (SSH,), started=started)
        if "rss" in args.only:
            found["rss"], lines = rss.run(workdir, args)
            tables.append(lines)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"tunnel benchmark: loopback, {os.cpu_count()} cores, {time.monotonic() - started:.0f} s; "
          f"tunnelpass server and client are separate twistd processes (receive flow)")
    for lines in tables:
        print()
        print("\n".join(lines))
    print()
    print("\n".join(ratios(found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
