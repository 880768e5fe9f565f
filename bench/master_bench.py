#!/usr/bin/env python3
"""``make bench-master``: the master's control plane, measured on loopback.

* RSS of the master and its worker processes with 0, then --instances idle
  server instances (tls=0, each its own tunnel and target port), summed
  over the processes, and the cost per instance;
* ``GET /instances`` latency with --instances instances (one keep-alive
  connection, --requests requests; p50 and p99);
* time from ``POST /instances`` (a server and a client) to the first byte
  echoed through the new tunnel (--pairs pairs; median and max).

Prints one table and the issue's targets (p50 <= 5 ms with 100 instances,
master + 100 instances <= 1 GiB).  Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
KEY = "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"


def free_ports(count: int) -> list[int]:
    """*count* distinct ports free on 127.0.0.1 for TCP and UDP (a tunnel
    server binds its target port for both), all held until all are found."""
    held, ports = [], []
    while len(ports) < count:
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            udp.close()
            continue
        held += [tcp, udp]
        ports.append(port)
    for s in held:
        s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class MasterProcess:
    def __init__(self, workers: int, directory: str):
        self.port = free_port()
        self.log_path = os.path.join(directory, "master.log")
        self.log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNELPASS_", "NP_"))}
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "master", "--api", f"127.0.0.1:{self.port}",
             "--state-dir", os.path.join(directory, "state"), "--workers", str(workers)],
            cwd=directory, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = open(self.log_path, "rb").read().decode("utf-8", "replace")
            if "master running" in text:
                self.key = re.search(r"keep it now: ([0-9a-f]{64})", text).group(1)
                break
            if self.process.poll() is not None:
                raise SystemExit(f"master exited:\n{text}")
            time.sleep(0.05)
        else:
            raise SystemExit("master did not start")
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def call(self, method: str, path: str, body=None, parse: bool = True):
        headers = {"X-API-Key": self.key}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.connection.request(method, "/api/v1" + path, body=data, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise SystemExit(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload and parse else payload

    def rss(self) -> tuple[int, int]:
        """(master KiB, workers KiB)."""
        return rss_kib(self.process.pid), sum(rss_kib(pid) for pid in children(self.process.pid))

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_running(master: MasterProcess, ids: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = {i["id"]: i["status"] for i in master.call("GET", "/instances")}
        if all(statuses.get(i) == "running" for i in ids):
            return
        time.sleep(0.2)
    raise SystemExit("instances did not all reach running")


def echo_through(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"ping")
            return s.recv(16) == b"ping"
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="tp-bench-master-")
    backend = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    started = time.monotonic()
    master = MasterProcess(args.workers, directory)
    try:
        time.sleep(1.0)
        idle_master, idle_workers = master.rss()
        ids = []
        ports = free_ports(2 * args.instances)
        for n in range(args.instances):
            url = f"server://{KEY}@127.0.0.1:{ports[2 * n]}/127.0.0.1:{ports[2 * n + 1]}?tls=0"
            ids.append(master.call("POST", "/instances", {"alias": f"idle-{n}", "url": url})["id"])
        wait_running(master, ids)
        time.sleep(2.0)
        full_master, full_workers = master.rss()
        assert len(master.call("GET", "/instances")) == args.instances
        samples = []
        for _ in range(args.requests):  # request sent -> whole body received (not parsed: the client's cost)
            t = time.perf_counter()
            master.call("GET", "/instances", parse=False)
            samples.append((time.perf_counter() - t) * 1000)
        samples.sort()
        p50 = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        flows = []
        for _ in range(args.pairs):
            tunnel, entry = free_ports(2)
            t = time.perf_counter()
            master.call("POST", "/instances", {"url": f"server://{KEY}@127.0.0.1:{tunnel}/127.0.0.1:{entry}"})
            master.call("POST", "/instances", {"url": f"client://{KEY}@127.0.0.1:{tunnel}/127.0.0.1:"
                                                      f"{backend.server_address[1]}"})
            while not echo_through(entry, 2.0):
                if time.perf_counter() - t > 60:
                    raise SystemExit("no traffic 60 s after POST")
                time.sleep(0.01)
            flows.append((time.perf_counter() - t) * 1000)
    finally:
        master.stop()
        shutil.rmtree(directory, ignore_errors=True)
    total = full_master + full_workers
    per_instance = (full_workers - idle_workers) / max(1, args.instances)
    print(f"master benchmark: {args.instances} idle server instances on {args.workers} workers, "
          f"{time.monotonic() - started:.0f} s")
    print()
    print(f"{'figure':<44} {'value':>12}  target")
    print(f"{'RSS master, no instances (MiB)':<44} {idle_master / 1024:>12.1f}")
    print(f"{'RSS workers, no instances (MiB)':<44} {idle_workers / 1024:>12.1f}")
    print(f"{'RSS master + workers, N instances (MiB)':<44} {total / 1024:>12.1f}  <= 1024 "
          f"({'MET' if total <= 1024 * 1024 else 'NOT MET'})")
    print(f"{'RSS per idle instance (KiB)':<44} {per_instance:>12.0f}")
    print(f"{'GET /instances p50 (ms)':<44} {p50:>12.2f}  <= 5 ({'MET' if p50 <= 5 else 'NOT MET'})")
    print(f"{'GET /instances p99 (ms)':<44} {p99:>12.2f}")
    print(f"{'POST server+client -> echo, median (ms)':<44} {statistics.median(flows):>12.0f}")
    print(f"{'POST server+client -> echo, max (ms)':<44} {max(flows):>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
