#!/usr/bin/env python3
"""Forwarder benchmark: tunnelpass against peer relays, all in one run, on loopback.

Peers: direct loopback (no relay), socat, haproxy (mode tcp), Twisted's own
``twistd portforward``.  Scenarios:

* bulk TCP throughput with iperf3 (median of --runs interleaved runs);
* new-connection latency: sequential connect / 64-byte echo / close,
  p50, p99 and rate;
* RSS per idle forwarded connection with --conns concurrent connections.

Prints one table with ratios.  Run through ``make bench`` (bench/run.sh
installs nothing; it checks the tools are there and raises the fd limit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(VENV_BIN, "twistd")


def free_port() -> int:
    """A loopback port free for both TCP and UDP (relays may take both)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Peers:
    """Starts every relay twice: in front of iperf3 and in front of the echo server."""

    def __init__(self, workdir: str):
        self.dir = workdir
        self.procs: list[subprocess.Popen] = []
        self.iperf = free_port()
        self.echo = free_port()
        # name -> (port to iperf3, port to echo, pid whose RSS counts)
        self.relays: dict[str, tuple[int, int, int | None]] = {}

    def spawn(self, args, **kw) -> subprocess.Popen:
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir, **kw)
        self.procs.append(p)
        return p

    def start(self) -> None:
        self.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf)])
        self.spawn([sys.executable, os.path.join(HERE, "echo.py"), str(self.echo)])
        wait_port(self.echo)
        self.relays["direct"] = (self.iperf, self.echo, None)
        self._socat()
        self._haproxy()
        self._portforward()
        self._tunnelpass()
        for a, b, _ in self.relays.values():
            wait_port(b)
        time.sleep(0.5)

    def _socat(self) -> None:
        ports = []
        for target in (self.iperf, self.echo):
            port = free_port()
            self.spawn(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                        f"TCP:127.0.0.1:{target}"])
            ports.append(port)
        self.relays["socat"] = (ports[0], ports[1], None)

    def _haproxy(self) -> None:
        a, b = free_port(), free_port()
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen bulk
  bind 127.0.0.1:{a}
  server s1 127.0.0.1:{self.iperf}
listen echo
  bind 127.0.0.1:{b}
  server s1 127.0.0.1:{self.echo}
""")
        p = self.spawn(["haproxy", "-f", cfg, "-db"])
        self.relays["haproxy"] = (a, b, p.pid)

    def _portforward(self) -> None:
        ports, pid = [], None
        for target in (self.iperf, self.echo):
            port = free_port()
            p = self.spawn([TWISTD, "-n", "--pidfile=", "portforward", "-p",
                            f"tcp:{port}:interface=127.0.0.1:backlog=4096", "-h", "127.0.0.1", "-d", str(target)])
            ports.append(port)
            pid = p.pid
        self.relays["twisted-portforward"] = (ports[0], ports[1], pid)

    def _tunnelpass(self) -> None:
        a, b = free_port(), free_port()
        rules = os.path.join(self.dir, "bench.conf")
        with open(rules, "w") as f:
            f.write(f"127.0.0.1:{a} | 127.0.0.1 | {self.iperf}\n"
                    f"127.0.0.1:{b} | 127.0.0.1 | {self.echo} | max-conns=100000\n")
        p = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "forward",
                        "--config", rules, "--log", "warn"])
        self.relays["tunnelpass"] = (a, b, p.pid)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def throughput(port: int, seconds: int, attempts: int = 2) -> float:
    """Received Gbit/s of one iperf3 run; a failed run (e.g. the iperf3 server still ending the
    previous test) is said on stderr and tried again after a second, NaN if every attempt failed."""
    for attempt in range(attempts):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                             capture_output=True, text=True, timeout=seconds + 30)
        report = None
        try:
            report = json.loads(out.stdout)
            return report["end"]["sum_received"]["bits_per_second"] / 1e9
        except (KeyError, TypeError, ValueError):
            error = report.get("error") if isinstance(report, dict) else out.stderr.strip()
            print(f"bench: iperf3 through port {port} failed: {error or out.returncode}", file=sys.stderr)
            time.sleep(1.0)
    return float("nan")


def connection_latency(port: int, count: int, give_up: int | None = None,
                       seconds: float | None = None) -> tuple[float, float, float, int]:
    """p50 ms, p99 ms, connections/s, failures (all *count* counted as failed once
    *give_up* connections in a row have failed: a broken relay must not hold the run
    for count x 5 s).  With *seconds*, the run also ends after that long: a slow
    relay is measured on fewer connections instead of holding the run."""
    message, latencies, failures = b"x" * 64, [], 0
    started = time.perf_counter()
    for i in range(count):
        if give_up is not None and failures >= give_up and not latencies:
            failures += count - i
            break
        if seconds is not None and time.perf_counter() - started > seconds:
            break
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(message)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        raise OSError("closed early")
                    got += chunk
            latencies.append((time.perf_counter() - t0) * 1000)
        except OSError:
            failures += 1
    elapsed = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        return float("nan"), float("nan"), 0.0, failures
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return statistics.median(latencies), p99, len(latencies) / elapsed, failures


def rss_per_connection(port: int, pid: int, count: int) -> float:
    """KiB of relay RSS per idle, established, forwarded connection."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            if i % 500 == 499:  # keep the accept queue short
                s.sendall(b"y")
                s.recv(1)
        for s in socks:  # every connection is relayed end to end
            s.sendall(b"z")
        for s in socks:
            s.recv(1)
        time.sleep(1.0)
        after = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4, help="iperf3 run length")
    parser.add_argument("--runs", type=int, default=3, help="interleaved iperf3 runs per relay (median)")
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=5000, help="concurrent idle connections for RSS")
    args = parser.parse_args()

    missing = [tool for tool in ("iperf3", "socat", "haproxy") if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install {' '.join(missing)})", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 3 * args.conns + 100:
        print(f"fd limit {want} is too low for --conns {args.conns}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as workdir:
        peers = Peers(workdir)
        try:
            peers.start()
            names = list(peers.relays)
            bulk = {name: [] for name in names}
            for _ in range(args.runs):
                for name in names:
                    bulk[name].append(throughput(peers.relays[name][0], args.seconds))
            gbps = {name: statistics.median(v) for name, v in bulk.items()}
            rounds = {name: [] for name in names}
            for _ in range(args.runs):  # interleaved, like throughput: noise hits every relay alike
                for name in names:
                    rounds[name].append(connection_latency(peers.relays[name][1], args.latency_count))
            latency = {
                name: tuple(statistics.median(r[i] for r in results) for i in range(4))
                for name, results in rounds.items()
            }
            rss = {}
            for name in ("tunnelpass", "twisted-portforward", "haproxy"):
                _, port, pid = peers.relays[name]
                rss[name] = rss_per_connection(port, pid, args.conns)
        finally:
            peers.stop()

    print()
    print(f"loopback, {os.cpu_count()} cores; iperf3 {args.seconds}s x{args.runs} (median); "
          f"{args.latency_count} sequential connect/64B echo/close x{args.runs} (median); "
          f"{args.conns} idle conns for RSS")
    header = f"{'relay':<20} {'Gbit/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'conn/s':>7} {'fails':>5} {'KiB/conn':>9}"
    print(header)
    print("-" * len(header))
    for name in names:
        p50, p99, rate, fails = latency[name]
        per_conn = f"{rss[name]:.1f}" if name in rss else "-"
        print(f"{name:<20} {gbps[name]:>7.2f} {p50:>7.3f} {p99:>7.3f} {rate:>7.0f} {fails:>5.0f} {per_conn:>9}")
    tp = gbps["tunnelpass"]
    print()
    print("ratios (tunnelpass vs peer, same run):")
    print(f"  throughput / twisted-portforward = {tp / gbps['twisted-portforward']:.2f}x  (target >= 1.0)")
    print(f"  throughput / socat               = {tp / gbps['socat']:.2f}x  (target >= 0.8)")
    print(f"  throughput / direct              = {tp / gbps['direct']:.2f}x")
    print(f"  new-conn p50 / haproxy p50       = {latency['tunnelpass'][0] / latency['haproxy'][0]:.2f}x  (target <= 1.5)")
    print(f"  new-conn rate / haproxy rate     = {latency['tunnelpass'][2] / latency['haproxy'][2]:.2f}x")
    print(f"  RSS per idle connection          = {rss['tunnelpass']:.1f} KiB  (target <= 10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
