#!/usr/bin/env python3
"""UDP benchmark: one run, loopback, every relay against the same backends.

Relays (each in front of iperf3 -- TCP control and UDP data on one port --
and of a UDP echo server):

* direct loopback (no relay);
* socat, one hop (``UDP4-LISTEN,fork`` plus a TCP relay for iperf3's
  control connection): a reference;
* the tunnelpass forwarder (a ``/tcp+udp`` rule);
* tunnelpass tunnels, tls=0 and tls=1: a server and a client, separate
  processes, receive flow (user -> server --target -> pool connection ->
  client -> target).

Scenarios:

* iperf3 ``-u -l 1400`` at each offered rate (default 100M, 500M, 1G): the
  rate the iperf3 server received and its loss (median of --runs
  interleaved runs);
* DNS-style request/response: 48-byte queries, 120-byte answers; one
  client in lock step (rate and p50/p99) and --clients clients with one
  query in flight each (total rate).

Prints a table and the ratios the issue targets (tunnel loss <= 1% at
500M; >= 50% of direct at 1G).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TWISTD, free_port, wait_port  # noqa: E402
from tunnel_bench import Peers  # noqa: E402

QUERY, ANSWER = 48, 120

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


class Relays(Peers):
    """The tunnel benchmark's relays, set up for UDP: iperf3 (TCP control
    and UDP data on one port) and a UDP echo server behind each."""

    def start(self) -> None:
        self.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf)])
        self.spawn([sys.executable, "-c", ECHO, str(self.echo)])
        wait_port(self.iperf)
        self.relays["direct"] = (self.iperf, self.echo, [])
        self._socat()
        self._forwarder()
        self._tunnelpass(0)
        self._tunnelpass(1)
        for port, _, _ in self.relays.values():
            wait_port(port, 20)
        time.sleep(1.5)  # pools filled

    def _socat(self) -> None:
        ports = []
        for target in (self.iperf, self.echo):
            front = free_port()
            self.spawn(["socat", "-T", "30", f"UDP4-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork",
                        f"UDP4:127.0.0.1:{target}"])
            if target == self.iperf:
                self.spawn(["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork",
                            f"TCP:127.0.0.1:{target}"])
            ports.append(front)
        self.relays["socat-1hop"] = (ports[0], ports[1], [])

    def _forwarder(self) -> None:
        a, b = free_port(), free_port()
        rules = os.path.join(self.dir, "rules.conf")
        with open(rules, "w") as f:
            f.write(f"127.0.0.1:{a}/tcp+udp | 127.0.0.1 | {self.iperf}\n"
                    f"127.0.0.1:{b}/udp | 127.0.0.1 | {self.echo}\n")
        self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "forward", "--config", rules,
                    "--log", "warn"], "forward.log")
        self.relays["tunnelpass-forward"] = (a, b, [])


def iperf_udp(port: int, rate: str, seconds: int) -> tuple[float, float]:
    """(received Mbit/s, loss %) of one iperf3 UDP run."""
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", "1400",
                          "-w", "4M", "-t", str(seconds), "-J"], capture_output=True, text=True,
                         timeout=seconds + 30)
    try:
        end = json.loads(out.stdout)["end"]
        received = end["sum_received"] if "sum_received" in end else end["sum"]
        return received["bits_per_second"] / 1e6, received["lost_percent"]
    except (ValueError, KeyError) as e:
        print(f"iperf3 on {port} failed: {e}: {out.stdout[-300:]} {out.stderr[-300:]}", file=sys.stderr)
        return 0.0, 100.0


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="100M,500M,1G")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    missing = [t for t in ("iperf3", "socat") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    rates = args.rates.split(",")

    with tempfile.TemporaryDirectory() as workdir:
        relays = Relays(workdir)
        try:
            relays.start()
            names = list(relays.relays)
            runs = {(name, rate): [] for name in names for rate in rates}
            for _ in range(args.runs):  # interleaved: noise hits every relay alike
                for rate in rates:
                    for name in names:
                        runs[name, rate].append(iperf_udp(relays.relays[name][0], rate, args.seconds))
            results = {key: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                       for key, v in runs.items()}
            steps = {name: [] for name in names}
            parallel = {name: [] for name in names}
            for _ in range(args.runs):
                for name in names:
                    steps[name].append(lock_step(relays.relays[name][1], args.queries))
                    parallel[name].append(concurrent(relays.relays[name][1], args.clients, 2.0))
            step = {name: tuple(statistics.median(r[i] for r in rs) for i in range(4)) for name, rs in steps.items()}
            many = {name: statistics.median(v) for name, v in parallel.items()}
        finally:
            relays.stop()

    print()
    print(f"loopback, {os.cpu_count()} cores; iperf3 -u -l 1400 -w 4M, {args.seconds}s x{args.runs} per rate "
          f"(median); {args.queries} lock-step {QUERY}B/{ANSWER}B queries and {args.clients} concurrent "
          f"clients for 2s, x{args.runs} (median)")
    cells = "".join(f" {rate + ' Mbit/s':>12} {'loss':>6}" for rate in rates)
    header = f"{'relay':<19}{cells} {'p50 ms':>7} {'p99 ms':>7} {'q/s 1':>7} {'q/s ' + str(args.clients):>7}"
    print(header)
    print("-" * len(header))
    for name in names:
        row = "".join(f" {results[name, rate][0]:>12.1f} {results[name, rate][1]:>5.2f}%" for rate in rates)
        p50, p99, rate1, lost = step[name]
        print(f"{name:<19}{row} {p50:>7.3f} {p99:>7.3f} {rate1:>7.0f} {many[name]:>7.0f}")
    print()
    print("targets (same run):")
    for name in ("tunnelpass-tls0", "tunnelpass-tls1"):
        if "500M" in rates:
            print(f"  {name} loss at 500M offered = {results[name, '500M'][1]:.2f}%  (target <= 1%)")
        if "1G" in rates:
            ratio = results[name, "1G"][0] / results["direct", "1G"][0]
            print(f"  {name} delivered at 1G / direct = {ratio:.2f}x  (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
