"""The tunnel benchmark's measurements: the one place that names each one, its relays, its figures.

A :class:`Measurement` is what ``--only`` selects and what a table shows: a
target (the server the relays stand in front of), the relays it compares,
how one run through one relay goes, and the columns of its figures.
Measurements that share a target share one set of processes: the target
and every relay they need are started once, then each selected measurement
runs its interleaved rounds (``rounds.measure``), then everything stops.
The RSS scenario has its own processes and is in ``rss.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import connload
import fairness
import httpbench
from bench import connection_latency, throughput
from peers import DIRECT, HAPROXY, SOCAT, SSH, T0, T1, T3_0, T3_1, Relays, wait_listening
from rounds import measure, medians, table

EVERY = (DIRECT, T0, T1, T3_0, T3_1, SSH, SOCAT, HAPROXY)
HTTP = (DIRECT, T0, T1, T3_0, T3_1, SSH, SOCAT)  # haproxy one hop: a latency reference, not an HTTP peer
FAIR = (T1, T3_1)


def _nginx(relays: Relays) -> int:
    port = httpbench.start_nginx(relays)
    wait_listening(port, proc=relays.procs[-1])
    return port


# target -> (how it starts under a Relays, the tools it needs)
TARGETS: dict[str, tuple[Callable[[Relays], int], tuple[str, ...]]] = {
    "iperf3": (Relays.iperf3, ("iperf3",)),
    "nginx": (_nginx, ("nginx", "wrk")),
    "echo": (Relays.echo, ()),
}
RELAY_TOOLS = {SOCAT: ("socat",), HAPROXY: ("haproxy",)}


@dataclass(frozen=True)
class Measurement:
    name: str  # --only, the profile files' prefix, the key of its results
    target: str  # of TARGETS
    relays: tuple[str, ...]
    one: Callable  # (args) -> (port -> one run's figures: a number or a tuple)
    title: Callable  # (args) -> the table's title
    columns: tuple[tuple[str, int, int], ...]  # (header, width, decimals) per figure
    summary: Callable = medians  # {relay: per-round runs} -> {relay: the figures shown}

    def tools(self) -> set[str]:
        return set(TARGETS[self.target][1]).union(*(RELAY_TOOLS.get(name, ()) for name in self.relays))


def _spread(runs: dict[str, list]) -> dict[str, tuple]:
    """Median, min and max of each relay's rounds (bulk: how much the rounds moved)."""
    return {name: (statistics.median(v), min(v), max(v)) for name, v in runs.items()}


def _rounds(args) -> str:
    return f"median of {args.rounds} interleaved rounds"


MEASUREMENTS = (
    Measurement("bulk", "iperf3", EVERY,
                lambda args: lambda port: throughput(port, args.seconds),
                lambda args: f"bulk TCP: iperf3 {args.seconds} s, {_rounds(args)}",
                (("Gbit/s", 7, 2), ("min", 7, 2), ("max", 7, 2)), _spread),
    Measurement("http", "nginx", HTTP,
                lambda args: lambda port: httpbench.wrk(port, args.http_seconds),
                lambda args: f"HTTP keep-alive: {httpbench.SETUP}, {args.http_seconds} s, {_rounds(args)}",
                (("req/s", 8, 0), ("p50 ms", 7, 3), ("p99 ms", 7, 3), ("errors", 6, 0))),
    Measurement("http-close", "nginx", HTTP,
                lambda args: lambda port: httpbench.wrk(port, args.http_seconds, close=True),
                lambda args: f"HTTP Connection: close (a new connection per request): {httpbench.SETUP}, "
                             f"{args.http_seconds} s, {_rounds(args)}",
                (("req/s", 8, 0), ("p50 ms", 7, 3), ("p99 ms", 7, 3), ("errors", 6, 0))),
    Measurement("newconn", "echo", EVERY,
                lambda args: lambda port: connection_latency(port, args.latency_count, give_up=20,
                                                             seconds=args.latency_seconds),
                lambda args: f"new connections: {args.latency_count} sequential connect / 64 B echo / close "
                             f"(fewer if that takes over {args.latency_seconds:g} s), {_rounds(args)}",
                (("p50 ms", 7, 3), ("p99 ms", 7, 3), ("conn/s", 7, 0), ("fails", 5, 0))),
    Measurement("newconn-concurrent", "echo", EVERY,
                lambda args: lambda port: connload.concurrent(port, args.concurrent_seconds),
                lambda args: f"new connections, concurrent: {connload.CLIENTS} clients each doing connect / "
                             f"64 B echo / close in a loop for {args.concurrent_seconds:g} s, {_rounds(args)}",
                (("p50 ms", 7, 3), ("p99 ms", 7, 3), ("conn/s", 7, 0), ("fails", 5, 0))),
    Measurement("fairness", "echo", FAIR,
                lambda args: lambda port: fairness.fairness(port, args.fair_seconds),
                lambda args: f"fairness: lock-step 64 B echo on one connection for {args.fair_seconds:g} s, idle "
                             f"and while a bulk sender runs on another connection of the same tunnel; "
                             f"busy/idle = busy p50 / idle p50 (target <= 3x); {_rounds(args)}",
                (("idle p50", 8, 3), ("idle p99", 8, 3), ("busy p50", 8, 3), ("busy p99", 8, 3),
                 ("busy/idle", 9, 2), ("bulk Gbit/s", 11, 2))),
)
NAMES = tuple(m.name for m in MEASUREMENTS)


def column(name: str, title: str) -> int:
    """Where measurement *name*'s figure *title* is in its tuple of figures."""
    measurement = next(m for m in MEASUREMENTS if m.name == name)
    return [c[0] for c in measurement.columns].index(title)


def run(workdir: str, names: list[str], args, left_out: tuple[str, ...] = (),
        started: float | None = None) -> tuple[dict, list[list[str]]]:
    """Run the measurements named in *names* (in MEASUREMENTS' order), each target's group under
    one Relays; *left_out* relays are not started.  Returns {measurement: {relay: figures}} and the tables."""
    found, tables = {}, []
    chosen = [m for m in MEASUREMENTS if m.name in names]
    for target in dict.fromkeys(m.target for m in chosen):
        group = [m for m in chosen if m.target == target]
        wanted = [name for name in EVERY if name not in left_out and any(name in m.relays for m in group)]
        with Relays(workdir) as relays:
            ports = relays.start(wanted, TARGETS[target][0](relays))
            for m in group:
                mine = {name: port for name, port in ports.items() if name in m.relays}
                runs = measure(relays, mine, args.rounds, m.one(args), m.name, args.profile)
                found[m.name] = m.summary(runs)
                tables.append(_table(m, found[m.name], args,
                                     {n: why for n, why in relays.failed.items() if n in m.relays}))
                if started is not None:
                    print(f"bench: {m.name} done ({time.monotonic() - started:.0f} s so far)", file=sys.stderr,
                          flush=True)
    return found, tables


def _table(m: Measurement, figures: dict[str, tuple], args, failed: dict[str, str]) -> list[str]:
    header = f"{'relay':<18} " + " ".join(f"{title:>{width}}" for title, width, _ in m.columns)
    rows = {name: " ".join(f"{value:>{width}.{decimals}f}" for value, (_, width, decimals) in zip(values, m.columns))
            for name, values in figures.items()}
    return table(m.title(args), header, rows, failed)
