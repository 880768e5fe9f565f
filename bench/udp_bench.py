#!/usr/bin/env python3
"""UDP benchmark: one run, loopback, every relay against the same backends.

Relays (the tunnel benchmark's, ``peers.py``, plus two UDP ones):

* direct loopback (no relay);
* socat, one hop (``UDP4-LISTEN,fork`` plus a TCP relay for iperf3's
  control connection): a reference;
* the tunnelpass forwarder (a ``/tcp+udp`` rule; ``/udp`` for the echo);
* tunnelpass tunnels, type 0 (TCP pool) and type 3 (HTTP/2 multiplexed
  carrier, ``--type 3``: each UDP session one stream), each at tls=0 and
  tls=1: a server and a client, separate processes, receive flow (user ->
  server --target -> pool connection or carrier stream -> client ->
  target).

Scenarios (``--only``), each with its own target and its own set of relays
in front of it (started, measured, stopped before the next):

* iperf3: ``iperf3 -u -l 1400 -w 4M`` at each offered rate (default 100M,
  500M, 1G; iperf3 carries its control connection over TCP and its data
  over UDP on one port): the rate the iperf3 server received and its loss;
* dns: DNS-style request/response against a UDP echo server, 48-byte
  queries and 120-byte answers: one client in lock step (p50/p99, rate,
  queries lost) and --clients clients with one query in flight each (total
  rate).

Each scenario runs --rounds interleaved rounds (round 1 measures every
relay, then round 2, ...; ``rounds.interleaved``) and reports medians.
Prints the tables and the targets of the UDP issue for every tunnel (loss
<= 1% at 500M offered; >= 0.5x of direct at 1G), from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TWISTD, free_port  # noqa: E402
from peers import DIRECT, T0, T1, T3_0, T3_1, TUNNELS, Relays, metric, wait_listening  # noqa: E402
from rounds import interleaved, medians, ratio, table  # noqa: E402

QUERY, ANSWER = 48, 120
SOCAT1, FORWARD = "socat-1hop", "tunnelpass-forward"
RELAYS = (DIRECT, SOCAT1, FORWARD, T0, T1, T3_0, T3_1)
SCENARIOS = ("iperf3", "dns")
BUSY_WAIT = 60.0  # seconds a run waits for an iperf3 server still busy with a lost test

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", int(sys.argv[1])))
answer = b"a" * %d
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(answer, addr)
""" % ANSWER


class UdpRelays(Relays):
    """The tunnel benchmark's relays (direct, the tunnelpass pairs), plus socat and the forwarder
    relaying UDP, and a UDP echo target."""

    def start_udp(self, names: list[str], target: int, tcp: bool) -> dict[str, int]:
        """Each named relay in front of 127.0.0.1:*target* (UDP, and TCP too when *tcp*: iperf3's
        control connection); name -> the port users send to.  A relay that does not come up is left
        out (``self.failed`` says why)."""
        ports = {DIRECT: target} if DIRECT in names else {}
        ports.update(self.start([name for name in names if name in TUNNELS], target))
        for name, starter in ((SOCAT1, self.socat_udp), (FORWARD, self.forwarder)):
            if name in names:
                try:
                    ports[name] = starter(target, tcp)
                except RuntimeError as e:
                    self.leave_out(name, str(e))
        for name, port in list(ports.items()):
            if name != DIRECT:  # iperf3 -s binds its UDP socket per test
                try:
                    wait_listening(port, udp=True)
                except RuntimeError as e:
                    self.leave_out(name, str(e))
                    del ports[name]
        return {name: ports[name] for name in names if name in ports}

    def socat_udp(self, target: int, tcp: bool) -> int:
        """socat, one hop: a process per UDP client (``fork``), and a TCP relay on the same port if *tcp*."""
        front = free_port()
        self.spawn(["socat", "-T", "30", f"UDP4-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork",
                    f"UDP4:127.0.0.1:{target}"], f"socat-udp-{front}.log")
        if tcp:
            self.spawn(["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{target}"],
                       f"socat-tcp-{front}.log")
            wait_listening(front)
        return front

    def forwarder(self, target: int, tcp: bool) -> int:
        """The tunnelpass forwarder, one rule: ``/tcp+udp`` if *tcp*, else ``/udp``."""
        front = free_port()
        rules = os.path.join(self.dir, f"rules-{front}.conf")
        with open(rules, "w") as f:
            f.write(f"127.0.0.1:{front}/{'tcp+udp' if tcp else 'udp'} | 127.0.0.1 | {target}\n")
        proc = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "forward", "--config", rules,
                           "--log", "info"], f"forward-{front}.log")
        wait_listening(front, proc=proc, udp=True)
        return front

    def udp_echo(self) -> int:
        """The request/response target: answers each datagram with ANSWER bytes."""
        port = free_port()
        proc = self.spawn([sys.executable, "-c", ECHO, str(port)], "udp-echo.log")
        wait_listening(port, proc=proc, udp=True)
        return port


def iperf_udp(port: int, rates: list[str], seconds: int, ready=lambda: None) -> tuple[float, ...]:
    """One iperf3 UDP run at each offered rate, each after *ready()* (the tunnel is up): (received
    Mbit/s, loss %) for each, flattened.  A run that fails (iperf3's control connection reset, nothing
    received) counts as 0 Mbit/s, 100% loss: what its user got.  While the iperf3 server is still busy
    with an earlier test whose control connection was lost (it waits for it up to its own timeout), the
    run is retried for up to BUSY_WAIT seconds: that earlier failure is not this relay's."""
    figures: list[float] = []
    for rate in rates:
        ready()
        deadline = time.monotonic() + BUSY_WAIT
        while isinstance(result := _iperf_once(port, rate, seconds), str) and "busy" in result \
                and time.monotonic() < deadline:
            time.sleep(1.0)
        if isinstance(result, str):
            print(f"bench: iperf3 -u -b {rate} on {port} failed: {result}", file=sys.stderr)
            result = (0.0, 100.0)
        figures += result
    return tuple(figures)


def _iperf_once(port: int, rate: str, seconds: int) -> tuple[float, float] | str:
    """(received Mbit/s, loss %) of one iperf3 UDP run, or why it failed."""
    try:
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", "1400",
                              "-w", "4M", "-t", str(seconds), "-J"], capture_output=True, text=True,
                             timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return f"did not end in {seconds + 30} s"
    try:
        result = json.loads(out.stdout)
        if "error" in result:
            return result["error"]
        end = result["end"]
        received = end["sum_received"] if "sum_received" in end else end["sum"]
        if not received["packets"]:
            return "no datagram received"
        return received["bits_per_second"] / 1e6, received["lost_percent"]
    except (ValueError, KeyError) as e:
        return f"{e!r} {out.stderr[-300:]}"


def lock_step(port: int, count: int) -> tuple[float, float, float, int]:
    """One client, one query in flight: (p50 ms, p99 ms, queries/s, lost)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    query = b"q" * QUERY
    times, lost = [], 0
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendto(query, ("127.0.0.1", port))
        try:
            s.recv(65535)
        except socket.timeout:
            lost += 1
            continue
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    s.close()
    times.sort()
    if not times:
        return float("nan"), float("nan"), 0.0, lost
    return (times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000, len(times) / elapsed, lost)


def concurrent(port: int, clients: int, seconds: float) -> float:
    """*clients* sockets, one query in flight each, resent after 0.5 s
    without an answer: answered queries per second."""
    selector = selectors.DefaultSelector()
    query = b"q" * QUERY
    sent_at = {}
    for _ in range(clients):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        selector.register(s, selectors.EVENT_READ)
        s.send(query)
        sent_at[s] = time.perf_counter()
    answered = 0
    started = time.perf_counter()
    deadline = started + seconds
    while (now := time.perf_counter()) < deadline:
        for key, _ in selector.select(0.1):
            s = key.fileobj
            try:
                while True:
                    s.recv(65535)
                    answered += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
            s.send(query)
            sent_at[s] = time.perf_counter()
        for s, at in sent_at.items():
            if now - at > 0.5:
                s.send(query)
                sent_at[s] = now
    elapsed = time.perf_counter() - started
    for s in sent_at:
        selector.unregister(s)
        s.close()
    return answered / elapsed


def request_response(port: int, args) -> tuple[float, float, float, int, float]:
    """The dns scenario's run through one relay: lock step (p50, p99, q/s, lost), then --clients at once (q/s)."""
    return (*lock_step(port, args.queries), concurrent(port, args.clients, args.concurrent_seconds))


def run(workdir: str, args) -> tuple[dict, list[list[str]]]:
    """Each selected scenario under its own UdpRelays: {scenario: {relay: median figures}}, and the tables."""
    found, tables = {}, []
    if "iperf3" in args.only:
        with UdpRelays(workdir) as relays:
            ports = relays.start_udp(args.relays, relays.iperf3(), tcp=True)
            pairs = {pair.port: pair for pair in relays.pairs.values()}

            def one(port: int) -> tuple[float, ...]:
                # Each run starts on a tunnel that is up (pool filled, carriers settled): what an earlier
                # run did to it shows in the carrier notes below, not as a failure of the next run.
                return iperf_udp(port, args.rates, args.seconds,
                                 lambda: relays.wait_pool(pairs[port]) if port in pairs else None)

            runs = interleaved(relays, ports, args.rounds, one, "iperf3 -u")
            found["iperf3"] = medians(runs)
            header = f"{'relay':<18} " + " ".join(f"{rate + ' Mbit/s':>12} {'loss':>6}" for rate in args.rates)
            rows = {name: " ".join(f"{mbps:>12.1f} {loss:>5.2f}%" for mbps, loss in zip(f[::2], f[1::2]))
                    for name, f in found["iperf3"].items()}
            title = (f"UDP throughput: iperf3 -u -l 1400 -w 4M, {args.seconds} s per offered rate, received rate "
                     f"and loss as the iperf3 server saw them (a failed run: 0, 100%); "
                     f"median of {args.rounds} interleaved rounds")
            tables.append(table(title, header, rows, relays.failed) + carrier_notes(relays))
    if "dns" in args.only:
        with UdpRelays(workdir) as relays:
            ports = relays.start_udp(args.relays, relays.udp_echo(), tcp=False)
            runs = interleaved(relays, ports, args.rounds, lambda port: request_response(port, args), "dns")
            found["dns"] = medians(runs)
            header = (f"{'relay':<18} {'p50 ms':>7} {'p99 ms':>7} {'q/s 1':>7} {'lost':>5} "
                      f"{'q/s ' + str(args.clients):>7}")
            rows = {name: f"{p50:>7.3f} {p99:>7.3f} {rate1:>7.0f} {lost:>5.0f} {many:>7.0f}"
                    for name, (p50, p99, rate1, lost, many) in found["dns"].items()}
            title = (f"DNS-style request/response, {QUERY} B queries / {ANSWER} B answers: {args.queries} in lock "
                     f"step (one client), then {args.clients} clients with one query in flight each for "
                     f"{args.concurrent_seconds:g} s; median of {args.rounds} interleaved rounds")
            tables.append(table(title, header, rows, relays.failed) + carrier_notes(relays))
    return found, tables


def carrier_notes(relays: Relays) -> list[str]:
    """For each type-3 pair whose carrier connections ended during the runs (each one resets every
    stream on it), how many: read from the server's metrics before the pair stops."""
    notes = []
    for name, pair in relays.pairs.items():
        ended = metric(pair.metrics, "tunnelpass_carriers_ended_total") if pair.carrier and pair.metrics else None
        if ended:
            notes.append(f"{name:<18} note: {ended:.0f} carrier connection(s) ended during the runs "
                         f"(the client's log says why)")
    return notes


def targets(found: dict, rates: list[str]) -> list[str]:
    """The UDP issue's targets for each tunnel, from the same run (n/a: a figure is missing)."""
    lines = ["targets (same run; target in brackets):"]
    iperf = found.get("iperf3", {})
    for name in (T0, T1, T3_0, T3_1):
        row = iperf.get(name)
        if "500M" in rates:
            loss = f"{row[2 * rates.index('500M') + 1]:.2f}%" if row else "n/a"
            lines.append(f"  {name:<18} {'loss at 500M offered':<24} = {loss:>7}  (<= 1%)")
        if "1G" in rates:
            at = 2 * rates.index("1G")
            direct = iperf.get(DIRECT)
            value = ratio(row[at] if row else None, direct[at] if direct else None)
            lines.append(f"  {name:<18} {'received at 1G / direct':<24} = {value:>7}  (>= 0.5x)")
    return lines


# option -> (default, --quick default, help)
DEFAULTS = {
    "rounds": (3, 1, "interleaved rounds per scenario"),
    "seconds": (4, 2, "iperf3 run length per offered rate"),
    "queries": (5000, 1000, "lock-step queries per round (dns)"),
    "concurrent_seconds": (2.0, 1.0, "length of the --clients run (dns)"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: every --quick default below")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: both)")
    for name, (full, short, text) in DEFAULTS.items():
        flags = ["--" + name.replace("_", "-")] + (["--runs"] if name == "rounds" else [])
        parser.add_argument(*flags, dest=name, type=type(full), help=f"{text} (default {full:g}; --quick {short:g})")
    parser.add_argument("--rates", default="100M,500M,1G", help="iperf3 offered rates (default 100M,500M,1G)")
    parser.add_argument("--relays", default=",".join(RELAYS),
                        help=f"comma-separated subset of {','.join(RELAYS)} (default: all)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (dns; default 32)")
    parser.add_argument("--workdir", help="keep configurations and process logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    for name, (full, short, _) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.relays = [s.strip() for s in args.relays.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SCENARIOS] + [s for s in args.relays if s not in RELAYS]
    if unknown or args.rounds < 1:
        parser.error(f"unknown scenario or relay {', '.join(unknown)}" if unknown else "--rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("iperf3", "socat") if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    # SIGTERM ends the run like Ctrl-C: the `with UdpRelays` blocks stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)

    started = time.monotonic()
    workdir = args.workdir or tempfile.mkdtemp(prefix="udp-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        found, tables = run(workdir, args)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"UDP benchmark: loopback, {os.cpu_count()} cores, {time.monotonic() - started:.0f} s; tunnelpass server "
          f"and client are separate twistd processes (receive flow)")
    for lines in tables:
        print()
        print("\n".join(lines))
    print()
    print("\n".join(targets(found, args.rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
