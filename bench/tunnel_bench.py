#!/usr/bin/env python3
"""Tunnel benchmark: tunnelpass server + client against peer tunnels, one run, loopback.

Relays (each in front of iperf3 and of a small echo server):

* direct loopback (no relay);
* tunnelpass tls=0 and tls=1: a server and a client, separate processes,
  receive flow (user -> server --target -> pool connection -> client ->
  target);
* socat two-hop chain (the plain two-process analogue of tls=0);
* ``ssh -L`` with aes128-gcm (the encrypted analogue of tls=1);
* haproxy, one hop (a latency reference).

Scenarios: bulk throughput (iperf3, median of --runs interleaved runs);
new-connection latency and rate (sequential connect / 64-byte echo / close);
RSS per tunnelled connection on each tunnelpass process with --conns
concurrent connections.  Prints a table and the ratios the issue targets.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import HERE, TWISTD, connection_latency, free_port, rss_kib, throughput, wait_port  # noqa: E402

KEY = "bench-key-0123456789abcdefghij"


class Peers:
    def __init__(self, workdir: str):
        self.dir = workdir
        self.procs: list[subprocess.Popen] = []
        self.iperf = free_port()
        self.echo = free_port()
        # name -> (port to iperf3, port to echo, pids whose RSS counts)
        self.relays: dict[str, tuple[int, int, list[int]]] = {}

    def spawn(self, args, log=None) -> subprocess.Popen:
        out = open(os.path.join(self.dir, log), "wb") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append(p)
        return p

    def start(self, with_ssh: bool) -> None:
        self.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf)])
        self.spawn([sys.executable, os.path.join(HERE, "echo.py"), str(self.echo)])
        wait_port(self.echo)
        self.relays["direct"] = (self.iperf, self.echo, [])
        self._tunnelpass(0)
        self._tunnelpass(1)
        self._socat_two_hop()
        if with_ssh:
            self._ssh()
        self._haproxy()
        for _, port, _ in self.relays.values():
            wait_port(port, 20)
        time.sleep(1.0)

    def _tunnelpass(self, level: int) -> None:
        ports = []
        pids = []
        for target in (self.iperf, self.echo):
            tunnel, public = free_port(), free_port()
            server = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "server",
                                 "--tunnel", f"127.0.0.1:{tunnel}", "--target", f"127.0.0.1:{public}",
                                 "--key", KEY, "--tls", str(level), "--log", "warn"], f"server{level}-{target}.log")
            wait_port(tunnel)
            client = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "client",
                                 "--tunnel", f"127.0.0.1:{tunnel}", "--target", f"127.0.0.1:{target}",
                                 "--key", KEY, "--log", "warn"], f"client{level}-{target}.log")
            ports.append(public)
            pids = [server.pid, client.pid]
        self.relays[f"tunnelpass-tls{level}"] = (ports[0], ports[1], pids)

    def _socat_two_hop(self) -> None:
        ports = []
        for target in (self.iperf, self.echo):
            middle, front = free_port(), free_port()
            self.spawn(["socat", f"TCP-LISTEN:{middle},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                        f"TCP:127.0.0.1:{target}"])
            self.spawn(["socat", f"TCP-LISTEN:{front},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                        f"TCP:127.0.0.1:{middle}"])
            ports.append(front)
        self.relays["socat-2hop"] = (ports[0], ports[1], [])

    def _ssh(self) -> None:
        host_key, client_key = os.path.join(self.dir, "hk"), os.path.join(self.dir, "ck")
        for key in (host_key, client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copy(client_key + ".pub", authorized)
        os.chmod(authorized, 0o600)
        os.makedirs("/run/sshd", exist_ok=True)
        port = free_port()
        self.spawn(["/usr/sbin/sshd", "-D", "-p", str(port), "-o", "ListenAddress=127.0.0.1", "-h", host_key,
                    "-o", f"AuthorizedKeysFile={authorized}", "-o", "PermitRootLogin=yes",
                    "-o", "StrictModes=no", "-o", "MaxStartups=100"])
        wait_port(port)
        a, b = free_port(), free_port()
        self.spawn(["ssh", "-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "Ciphers=aes128-gcm@openssh.com", "-i", client_key, "-p", str(port),
                    "-L", f"127.0.0.1:{a}:127.0.0.1:{self.iperf}", "-L", f"127.0.0.1:{b}:127.0.0.1:{self.echo}",
                    f"{os.environ.get('USER') or 'root'}@127.0.0.1"])
        self.relays["ssh-L-aes128gcm"] = (a, b, [])

    def _haproxy(self) -> None:
        a, b = free_port(), free_port()
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                    f"  timeout client 60s\n  timeout server 60s\n"
                    f"listen bulk\n  bind 127.0.0.1:{a}\n  server s1 127.0.0.1:{self.iperf}\n"
                    f"listen echo\n  bind 127.0.0.1:{b}\n  server s1 127.0.0.1:{self.echo}\n")
        self.spawn(["haproxy", "-f", cfg, "-db"])
        self.relays["haproxy-1hop"] = (a, b, [])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def rss_per_tunnelled_connection(port: int, pids: list[int], count: int) -> list[float]:
    """KiB of RSS per established tunnelled connection, for each process."""
    import socket

    time.sleep(1.0)
    before = [rss_kib(pid) for pid in pids]
    socks = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            socks.append(s)
            if i % 200 == 199:  # pace on the pool's refill
                s.sendall(b"y")
                s.recv(1)
        for s in socks:
            s.sendall(b"z")
        for s in socks:
            s.recv(1)
        time.sleep(1.0)
        after = [rss_kib(pid) for pid in pids]
    finally:
        for s in socks:
            s.close()
    return [(a - b) / count for a, b in zip(after, before)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=5000)
    args = parser.parse_args()
    missing = [t for t in ("iperf3", "socat", "haproxy") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    with_ssh = os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    with tempfile.TemporaryDirectory() as workdir:
        peers = Peers(workdir)
        try:
            peers.start(with_ssh)
            names = list(peers.relays)
            bulk = {name: [] for name in names}
            rounds = {name: [] for name in names}
            for _ in range(args.runs):  # interleaved: noise hits every relay alike
                for name in names:
                    bulk[name].append(throughput(peers.relays[name][0], args.seconds))
            for _ in range(args.runs):
                for name in names:
                    rounds[name].append(connection_latency(peers.relays[name][1], args.latency_count))
            gbps = {name: statistics.median(v) for name, v in bulk.items()}
            latency = {name: tuple(statistics.median(r[i] for r in rs) for i in range(4))
                       for name, rs in rounds.items()}
            _, port, pids = peers.relays["tunnelpass-tls0"]
            try:
                rss = rss_per_tunnelled_connection(port, pids, args.conns)
            except OSError as e:  # report the rest; say what failed
                print(f"RSS measurement failed: {e}", file=sys.stderr)
                rss = [float("nan"), float("nan")]
        finally:
            peers.stop()

    print()
    print(f"loopback, {os.cpu_count()} cores; iperf3 {args.seconds}s x{args.runs} (median); "
          f"{args.latency_count} sequential connect/64B echo/close x{args.runs} (median); "
          f"{args.conns} concurrent tunnelled connections for RSS")
    header = f"{'relay':<18} {'Gbit/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'conn/s':>7} {'fails':>5}"
    print(header)
    print("-" * len(header))
    for name in names:
        p50, p99, rate, fails = latency[name]
        print(f"{name:<18} {gbps[name]:>7.2f} {p50:>7.3f} {p99:>7.3f} {rate:>7.0f} {fails:>5.0f}")
    print(f"RSS per tunnelled connection (tls=0, {args.conns} concurrent): "
          f"server {rss[0]:.1f} KiB, client {rss[1]:.1f} KiB  (target <= 16)")
    print()
    print("ratios (same run):")
    t0, t1 = "tunnelpass-tls0", "tunnelpass-tls1"
    print(f"  tls=0 throughput / socat 2-hop     = {gbps[t0] / gbps['socat-2hop']:.2f}x  (target >= 1.0)")
    if with_ssh:
        ssh = "ssh-L-aes128gcm"
        print(f"  tls=1 throughput / ssh -L          = {gbps[t1] / gbps[ssh]:.2f}x  (target >= 0.8)")
        for name in (t0, t1):
            print(f"  {name} new-conn p50 / ssh -L p50 = {latency[name][0] / latency[ssh][0]:.2f}x  (target <= 1.0)")
            print(f"  {name} new-conn rate / ssh -L    = {latency[name][2] / latency[ssh][2]:.2f}x  (target >= 1.5)")
    for name in (t0, t1):
        print(f"  {name} new-conn p50 / haproxy p50 = {latency[name][0] / latency['haproxy-1hop'][0]:.2f}x")
        print(f"  {name} new-conn rate / haproxy    = {latency[name][2] / latency['haproxy-1hop'][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
