#!/usr/bin/env python3
"""Tunnel benchmark: tunnelpass server + client against peer tunnels, one run, loopback.

Relays, each started in front of the scenario's target:

* direct loopback (no relay);
* tunnelpass tls=0 and tls=1: a server and a client, separate processes,
  receive flow (user -> server --target -> pool connection -> client ->
  target);
* ``ssh -L`` with aes128-gcm (the encrypted analogue of tls=1);
* socat two-hop chain (the plain two-process analogue of tls=0);
* haproxy, one hop (a reference; bulk and new connections only).

Scenarios (``--only``; each starts its own processes and stops them):

* bulk: iperf3 TCP throughput;
* http: HTTP keep-alive request/response, nginx serving 1 KiB, wrk with 32
  connections on 2 threads: req/s and p50/p99 latency;
* newconn: sequential connect / 64-byte echo / close: p50, p99, rate;
* rss: RSS per tunnelled connection with --conns concurrent connections at
  tls=1 and tls=0, and the RSS --settle seconds after they closed.

bulk, http and newconn run --rounds interleaved rounds (round 1 measures
every relay, then round 2, ...) and report medians; the ratios the issue
targets come from the same run.  Needs iperf3, socat, haproxy, nginx, wrk
and openssh-server (bench/run.sh installs what is missing when run as root).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import httpbench  # noqa: E402
import rss  # noqa: E402
from bench import connection_latency, throughput  # noqa: E402
from peers import Relays, wait_listening  # noqa: E402

T0, T1, SSH, SOCAT, HAPROXY = "tunnelpass-tls0", "tunnelpass-tls1", "ssh-L-aes128gcm", "socat-2hop", "haproxy-1hop"
BULK = ["direct", T0, T1, SSH, SOCAT, HAPROXY]
HTTP = ["direct", T0, T1, SSH, SOCAT]
SCENARIOS = ("bulk", "http", "newconn", "rss")
TOOLS = {"bulk": ["iperf3", "socat", "haproxy"], "http": ["nginx", "wrk", "socat"],
         "newconn": ["socat", "haproxy"], "rss": []}


def interleaved(ports: dict[str, int], rounds: int, measure) -> dict[str, list]:
    """Round r measures every relay once, in order; name -> the per-round results."""
    results = {name: [] for name in ports}
    for r in range(rounds):
        for name, port in ports.items():
            print(f"bench: round {r + 1}/{rounds} {name}", file=sys.stderr, flush=True)
            results[name].append(measure(port))
    return results


def profile(relays: Relays, ports: dict[str, int], measure, scenario: str, outdir: str | None) -> None:
    """--profile: one extra, unreported run per tunnelpass relay with py-spy recording its server and
    client (collapsed stacks ``{scenario}-{relay}-{side}.txt``, and the functions taking the most
    samples printed): what limits the figure."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not outdir:
        return
    os.makedirs(outdir, exist_ok=True)
    for name, pair in relays.pairs.items():
        if name not in ports:
            continue
        print(f"bench: profiling {scenario} {name}", file=sys.stderr, flush=True)
        outputs = {side: os.path.join(outdir, f"{scenario}-{name}-{side}.txt") for side in ("server", "client")}
        spies = [relays.spawn([spy, "record", "--nonblocking", "--idle", "--rate", "250", "--format", "raw",
                               "-o", outputs[side], "--pid", str(p.pid)],
                              f"py-spy-{scenario}-{name}-{side}.log")
                 for side, p in (("server", pair.server), ("client", pair.client))]
        time.sleep(1.0)  # attached
        measure(ports[name])
        for p in spies:
            p.send_signal(signal.SIGINT)  # py-spy writes its flame graph on SIGINT
        for p in spies:
            p.wait(60)
        for side, path in outputs.items():
            print(f"profile {scenario} {name} {side}: " + top_functions(path), file=sys.stderr, flush=True)


def top_functions(path: str, count: int = 8) -> str:
    """The functions with the most samples on top of the stack (self time), as percentages."""
    own: dict[str, int] = {}
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, samples = line.rstrip().rpartition(" ")
                if not samples.isdigit():
                    continue
                leaf = stack.split(";")[-1]
                own[leaf] = own.get(leaf, 0) + int(samples)
                total += int(samples)
    except OSError as e:
        return f"no profile ({e.strerror})"
    top = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "; ".join(f"{100 * n / total:.0f}% {name}" for name, n in top) if total else "no samples"


def medians(results: dict[str, list]) -> dict[str, tuple]:
    """Field-wise medians of tuples (or of plain numbers)."""
    out = {}
    for name, runs in results.items():
        if isinstance(runs[0], tuple):
            out[name] = tuple(statistics.median(run[i] for run in runs) for i in range(len(runs[0])))
        else:
            out[name] = (statistics.median(runs),)
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a else "n/a"


def table(title: str, columns: str, rows: dict[str, str], failed: dict[str, str]) -> list[str]:
    """A scenario's table: title, header, one row per measured relay, then the relays left out and why."""
    lines = [title, columns, "-" * len(columns)]
    lines += [f"{name:<18} {row}" for name, row in rows.items()]
    lines += [f"{name:<18} left out: {reason.splitlines()[0]}" for name, reason in failed.items()]
    return lines


def measure(relays: Relays, ports: dict[str, int], args, scenario: str, one) -> dict[str, list]:
    """*one(port)* for every relay in --rounds interleaved rounds, then the
    --profile run with the same measurement."""
    runs = interleaved(ports, args.rounds, one)
    profile(relays, ports, one, scenario, args.profile)
    return runs


def bulk(workdir: str, names: list[str], args) -> tuple[dict, list[str]]:
    with Relays(workdir) as relays:
        ports = relays.start(names, relays.iperf3())
        runs = measure(relays, ports, args, "bulk", lambda port: throughput(port, args.seconds))
    gbps = {name: v[0] for name, v in medians(runs).items()}
    rows = {name: f"{gbps[name]:>7.2f} {min(runs[name]):>7.2f} {max(runs[name]):>7.2f}" for name in runs}
    return gbps, table(f"bulk TCP: iperf3 {args.seconds} s, median of {args.rounds} interleaved rounds",
                       f"{'relay':<18} {'Gbit/s':>7} {'min':>7} {'max':>7}", rows, relays.failed)


def http(workdir: str, names: list[str], args) -> tuple[dict, list[str]]:
    with Relays(workdir) as relays:
        nginx = httpbench.start_nginx(relays)
        wait_listening(nginx, proc=relays.procs[-1])
        ports = relays.start(names, nginx)
        runs = measure(relays, ports, args, "http", lambda port: httpbench.keepalive(port, args.http_seconds))
    result = medians(runs)
    rows = {name: f"{rate:>8.0f} {p50:>7.3f} {p99:>7.3f} {errors:>6.0f}"
            for name, (rate, p50, p99, errors) in result.items()}
    return result, table(f"HTTP keep-alive: {httpbench.SETUP}, {args.http_seconds} s, "
                         f"median of {args.rounds} interleaved rounds",
                         f"{'relay':<18} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}", rows, relays.failed)


def newconn(workdir: str, names: list[str], args) -> tuple[dict, list[str]]:
    with Relays(workdir) as relays:
        ports = relays.start(names, relays.echo())
        runs = measure(relays, ports, args, "newconn",
                       lambda port: connection_latency(port, args.latency_count, give_up=20))
    result = medians(runs)
    rows = {name: f"{p50:>7.3f} {p99:>7.3f} {rate:>7.0f} {fails:>5.0f}"
            for name, (p50, p99, rate, fails) in result.items()}
    return result, table(f"new connections: {args.latency_count} sequential connect / 64 B echo / close, "
                         f"median of {args.rounds} interleaved rounds",
                         f"{'relay':<18} {'p50 ms':>7} {'p99 ms':>7} {'conn/s':>7} {'fails':>5}", rows, relays.failed)


def rss_scenario(workdir: str, args) -> tuple[dict, list[str]]:
    results = {}
    with Relays(workdir) as relays:
        echo = relays.echo()
        pairs = [relays.tunnelpass(level, echo, rss.tunnel_options(args.conns) + ("--log", "info"), with_metrics=False)
                 for level in (1, 0)]
        for pair in list(pairs):
            wait_listening(pair.port, proc=pair.server)
            if not relays.wait_pool(pair):
                pairs.remove(pair)
        for pair in pairs:  # the first pair's settle time runs while the second is loaded
            print(f"bench: rss {pair.name}: opening {args.conns} connections", file=sys.stderr, flush=True)
            results[pair.name] = rss.load(pair, args.conns)
        for pair in pairs:
            print(f"bench: rss {pair.name}: waiting {args.settle:.0f} s after close", file=sys.stderr, flush=True)
            rss.settle(pair, results[pair.name], args.settle)
    failed = [f"{name:<16} left out: {reason.splitlines()[0]}" for name, reason in relays.failed.items()]
    return results, rss.table(list(results.values()), args.conns, args.settle) + failed


def ratios(found: dict) -> list[str]:
    lines = ["ratios (same run; target in brackets):"]
    if "bulk" in found:
        g = found["bulk"]
        lines.append(f"  bulk     tls=1 / ssh -L          = {ratio(g.get(T1), g.get(SSH)):>6}  (>= 1.0)")
        lines.append(f"  bulk     tls=0 / socat two-hop   = {ratio(g.get(T0), g.get(SOCAT)):>6}  (>= 2.0)")
    if "http" in found:
        h = {name: v[0] for name, v in found["http"].items()}
        lines.append(f"  http     tls=1 / ssh -L req/s    = {ratio(h.get(T1), h.get(SSH)):>6}  (>= 1.0)")
        lines.append(f"  http     tls=0 / socat req/s     = {ratio(h.get(T0), h.get(SOCAT)):>6}  (>= 1.0)")
    if "newconn" in found:
        n = found["newconn"]
        for name in (T0, T1):
            for peer in (SSH, HAPROXY):
                if name in n and peer in n:
                    lines.append(f"  newconn  {name} / {peer}: p50 {ratio(n[name][0], n[peer][0])}, "
                                 f"rate {ratio(n[name][2], n[peer][2])}")
    if "rss" in found:
        for name, r in found["rss"].items():
            per, back = r.per_connection(), r.returned()
            lines.append(f"  rss      {name}: {per[0]:.1f} / {per[1]:.1f} KiB per connection (server / client; "
                         f"<= 16 at tls=1), after close {back[0]:.0f}% / {back[1]:.0f}% of start (80-120%)")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="interleaved rounds per scenario (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: short durations, 1 round, --conns 500, --settle 10")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    parser.add_argument("--seconds", type=int, help="iperf3 run length (default 4; --quick 2)")
    parser.add_argument("--http-seconds", type=int, help="wrk run length (default 5; --quick 2)")
    parser.add_argument("--latency-count", type=int, help="sequential connections per round (default 2000; --quick 200)")
    parser.add_argument("--conns", type=int, help="concurrent connections for RSS (default 5000; --quick 500)")
    parser.add_argument("--settle", type=float, help="seconds after close for the RSS reading (default 60; --quick 10)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the measured rounds, one more run per tunnelpass relay with py-spy on its "
                             "server and client: flame graphs in DIR (not counted in the figures)")
    parser.add_argument("--workdir", help="keep configurations and process logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, short in (("rounds", 3, 1), ("seconds", 4, 2), ("http_seconds", 5, 2),
                              ("latency_count", 2000, 200), ("conns", 5000, 500), ("settle", 60.0, 10.0)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown scenario {', '.join(unknown)}" if unknown else "--rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = sorted({tool for s in args.only for tool in TOOLS[s] if shutil.which(tool) is None})
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

    def peers(names):
        return [n for n in names if with_ssh or n != SSH]

    started = time.monotonic()
    found, tables = {}, []
    workdir = args.workdir or tempfile.mkdtemp(prefix="tunnel-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        for scenario in SCENARIOS:
            if scenario not in args.only:
                continue
            if scenario == "rss":
                result, lines = rss_scenario(workdir, args)
            else:
                run = {"bulk": bulk, "http": http, "newconn": newconn}[scenario]
                result, lines = run(workdir, peers(HTTP if scenario == "http" else BULK), args)
            found[scenario] = result
            tables.append(lines)
            print(f"bench: {scenario} done ({time.monotonic() - started:.0f} s so far)", file=sys.stderr, flush=True)
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
