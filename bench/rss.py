"""RSS per tunnelled connection, and whether it is returned after the connections close.

For each tunnel (type 3 at tls=1, type 0 at tls=1 and tls=0) a fresh
server + client pair (receive flow) carries N concurrent connections to an
echo server.  Each connection has exchanged a
byte end to end, so its relay is live on both sides, and every one is held
open at the same time.  The RSS (``VmRSS`` in ``/proc/PID/status``) of the
server and of the client is read before (pool filled, nothing open), with
all N open (pool growth included: the pool connections are what each user
connection consumes at type 0; at type 3 each is a stream of the carrier
connections), and ``settle`` seconds after all were closed.

Connections are opened in batches, each batch relayed end to end before the
next starts, so the client's pool refill (at tls=1 a TLS handshake per pool
connection) sets the pace instead of the server's --pool-timeout.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass, field

from bench import rss_kib
from peers import T0, T1, T3_1, TUNNELS, Relays, established, wait_listening

BATCH = 100
TARGETS = {T3_1: 8.0, T1: 16.0}  # KiB per connection and side the issues set


@dataclass
class RssResult:
    name: str
    wanted: int
    opened: int = 0
    failed: int = 0
    before: list[int] = field(default_factory=list)  # KiB, [server, client]
    loaded: list[int] = field(default_factory=list)
    after: list[int] = field(default_factory=list)
    tunnel_loaded: int = 0  # connections to the tunnel port (control + pool, busy and idle) with all N open
    tunnel_after: int = 0
    open_seconds: float = 0.0
    closed_at: float = 0.0

    def per_connection(self) -> list[float]:
        if not self.opened or not self.loaded:
            return [float("nan")] * 2
        return [(loaded - before) / self.opened for loaded, before in zip(self.loaded, self.before)]

    def returned(self) -> list[float]:
        """After-close RSS as % of the starting value."""
        if not self.after:
            return [float("nan")] * 2
        return [100.0 * after / before if before else float("nan") for after, before in zip(self.after, self.before)]


def tunnel_options(count: int) -> tuple[str, ...]:
    """Limits that let *count* concurrent connections through (defaults would too, say so explicitly)."""
    return ("--slot", str(max(65536, 2 * count)), "--max-pool", str(max(1024, count // 4)),
            "--pool-timeout", "30s", "--read", "0")


def _exchange(socks: list[socket.socket]) -> int:
    """One byte there and back on each socket; the number that failed (closed and dropped)."""
    failed = []
    for s in socks:
        try:
            s.sendall(b"z")
        except OSError:
            failed.append(s)
    for s in socks:
        if s in failed:
            continue
        try:
            if s.recv(1) != b"z":
                failed.append(s)
        except OSError:
            failed.append(s)
    for s in failed:
        socks.remove(s)
        s.close()
    return len(failed)


def load(pair, count: int) -> RssResult:
    """Measure before and with *count* connections open, then close them all (the caller reads `after`)."""
    pids = [pair.server.pid, pair.client.pid]
    result = RssResult(pair.name, count)
    time.sleep(1.0)
    result.before = [rss_kib(pid) for pid in pids]
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        while len(socks) + result.failed < count:
            batch = []
            for _ in range(min(BATCH, count - len(socks) - result.failed)):
                try:
                    batch.append(socket.create_connection(("127.0.0.1", pair.port), timeout=40))
                except OSError:
                    result.failed += 1
            result.failed += _exchange(batch)
            socks.extend(batch)
        result.open_seconds = time.monotonic() - started
        result.opened = len(socks)
        time.sleep(2.0)  # the pool's refill after the last batch
        result.loaded = [rss_kib(pid) for pid in pids]
        result.tunnel_loaded = established(pair.tunnel)
    finally:
        for s in socks:
            s.close()
        result.closed_at = time.monotonic()
    return result


def settle(pair, result: RssResult, seconds: float) -> None:
    """Read the after-close RSS *seconds* after the connections closed."""
    time.sleep(max(0.0, result.closed_at + seconds - time.monotonic()))
    result.after = [rss_kib(pair.server.pid), rss_kib(pair.client.pid)]
    result.tunnel_after = established(pair.tunnel)


def run(workdir: str, args) -> tuple[dict, list[str]]:
    """The RSS scenario: load each pair in turn with --conns connections; the first pair's
    --settle wait runs while the next one is loaded."""
    results = {}
    with Relays(workdir) as relays:
        echo = relays.echo()
        pairs = []
        for name in (T3_1, T1, T0):
            carrier, level = TUNNELS[name]
            try:
                pairs.append(relays.tunnelpass(level, carrier, echo, tunnel_options(args.conns),
                                               with_metrics=False))
            except RuntimeError as e:  # a server that exits at startup
                relays.leave_out(name, str(e))
        for pair in list(pairs):
            try:
                wait_listening(pair.port, proc=pair.server)
            except RuntimeError as e:
                relays.leave_out(pair.name, str(e))
            if pair.name in relays.failed or not relays.wait_pool(pair):
                pairs.remove(pair)
        for pair in pairs:
            print(f"bench: rss {pair.name}: opening {args.conns} connections", file=sys.stderr, flush=True)
            results[pair.name] = load(pair, args.conns)
        for pair in pairs:
            print(f"bench: rss {pair.name}: waiting {args.settle:.0f} s after close", file=sys.stderr, flush=True)
            settle(pair, results[pair.name], args.settle)
    failed = [f"{name:<18} left out: {reason.splitlines()[0]}" for name, reason in relays.failed.items()]
    return results, table(list(results.values()), args.conns, args.settle) + failed


def table(results: list[RssResult], count: int, seconds: float) -> list[str]:
    lines = [f"RSS per tunnelled connection: {count} concurrent idle connections (1 byte echoed each) to an "
             f"echo server, pool growth included; 'after' {seconds:.0f} s after all closed",
             f"{'relay':<18} {'side':<6} {'start MiB':>9} {f'{count} open':>9} {'KiB/conn':>8} "
             f"{'after MiB':>9} {'after %':>7} {'tunnel':>11} {'opened':>7} {'open s':>6}"]
    lines.append("-" * len(lines[-1]))
    for r in results:
        per, back = r.per_connection(), r.returned()
        tunnel = f"{r.tunnel_loaded}/{r.tunnel_after}"
        for i, side in enumerate(("server", "client")):
            loaded = r.loaded[i] / 1024 if r.loaded else float("nan")
            after = r.after[i] / 1024 if r.after else float("nan")
            lines.append(f"{r.name:<18} {side:<6} {r.before[i] / 1024:>9.1f} {loaded:>9.1f} {per[i]:>8.1f} "
                         f"{after:>9.1f} {back[i]:>6.0f}% {tunnel:>11} {r.opened:>7} {r.open_seconds:>6.1f}")
    targets = ", ".join(f"{name} <= {kib:.0f}" for name, kib in TARGETS.items())
    lines.append(f"  (tunnel: connections to the tunnel port (control, pool or carrier, busy and idle) with all "
                 f"open / after; the pairs run without --metrics; targets in KiB/conn per side: {targets}; "
                 f"after within 20% of start)")
    return lines
