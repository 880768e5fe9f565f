"""Processes for the tunnel benchmark: tunnelpass server + client pairs and the peer relays.

Each scenario of ``tunnel_bench.py`` opens one :class:`Relays` (a context
manager), starts its target and the relays in front of it, measures, and
leaves the ``with`` block: every process it started is stopped there, on
success, failure or Ctrl-C alike.

Readiness is checked without connecting through a relay (a stray connection
would disturb iperf3, which serves one client at a time): a relay is ready
when its port is in LISTEN state in ``/proc/net/tcp``, and a tunnelpass pair
when, in addition, the client's idle pool is filled (type 0) or its carrier
connections are up and have stayed the same for a second (type 3): as the
server's ``--metrics`` reports them (``tunnelpass_pool_idle``,
``tunnelpass_carriers``), or, for a pair started without ``--metrics`` (the
RSS scenario: the metrics service costs the server about 4 MiB), as the
connections established to the tunnel port (control connection plus pool or
carriers) in ``/proc/net/tcp``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from bench import HERE, TWISTD, free_port

KEY = "bench-key-0123456789abcdefghij"
MIN_POOL = 64  # tunnelpass's default --min-pool: what "pool filled" waits for
SETTLED = 1.0  # type 3: seconds its carrier connections must stay unchanged to count as up

# The relays, by the names the tables print: (carrier type, TLS level) for tunnelpass pairs.
DIRECT, SSH, SOCAT, HAPROXY = "direct", "ssh-L-aes128gcm", "socat-2hop", "haproxy-1hop"
TUNNELS = {"tunnelpass-tls0": (0, 0), "tunnelpass-tls1": (0, 1),
           "tunnelpass-t3-tls0": (3, 0), "tunnelpass-t3-tls1": (3, 1)}
T0, T1, T3_0, T3_1 = TUNNELS


def listening(port: int, udp: bool = False) -> bool:
    """Whether something listens on 127.0.0.1:*port* (read from /proc, no connection made); with *udp*,
    whether an unconnected UDP socket is bound there."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp" if udp else "/proc/net/tcp") as f:
        next(f)
        return any(fields[1] == want and fields[3] == ("07" if udp else "0A") for fields in map(str.split, f))


def log_tail(proc: subprocess.Popen, lines: int = 15) -> str:
    """The end of *proc*'s log (see Relays.spawn), for an error message."""
    path = getattr(proc, "log_path", None)
    if not path:
        return ""
    with open(path, errors="replace") as f:
        return "\n" + "".join(f.readlines()[-lines:])


def established(port: int) -> int:
    """TCP connections established to 127.0.0.1:*port* (the accepting side's sockets, from /proc)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for fields in map(str.split, f) if fields[1] == want and fields[3] == "01")


def wait_listening(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, udp: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port, udp):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args)} exited with {proc.returncode} before listening on {port}"
                               f"{log_tail(proc)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on 127.0.0.1:{port}{'/udp' if udp else ''} after {timeout:.0f} s")
        time.sleep(0.05)


def metric(port: int, name: str) -> float | None:
    """One unlabelled sample from a tunnelpass ``--metrics`` endpoint (None if not there)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(None, 1)[1])
    return None


@dataclass
class TunnelPair:
    name: str
    port: int  # the server's public port: where users connect
    server: subprocess.Popen
    client: subprocess.Popen
    tunnel: int  # the server's tunnel port: where the client's control and pool connections go
    metrics: int | None  # the server's --metrics port, if it has one
    carrier: int = 0  # the server's --type: 0 TCP pool, 3 HTTP/2 multiplexed

    def up(self) -> float:
        """The client's idle pool connections (type 0) or carrier connections (type 3), as the server
        sees them."""
        if self.metrics:
            return metric(self.metrics, "tunnelpass_carriers" if self.carrier else "tunnelpass_pool_idle") or 0
        return max(0, established(self.tunnel) - 1)  # less the control connection


class Relays:
    """Starts relays in front of one target and stops everything it started."""

    def __init__(self, workdir: str):
        self.dir = workdir
        self.procs: list[subprocess.Popen] = []
        self.pairs: dict[str, TunnelPair] = {}
        self.failed: dict[str, str] = {}  # relay -> why it was left out
        self._sshd: int | None = None

    def __enter__(self) -> "Relays":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def spawn(self, args, log: str | None = None) -> subprocess.Popen:
        out = open(os.path.join(self.dir, log), "ab") if log else subprocess.DEVNULL
        try:
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        finally:
            if log:
                out.close()
        p.log_path = os.path.join(self.dir, log) if log else None
        self.procs.append(p)
        return p

    def stop(self) -> None:
        """SIGTERM every process (newest first: clients before their servers), then reap; SIGKILL stragglers."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    # -- relays ------------------------------------------------------------

    def start(self, names: list[str], target: int) -> dict[str, int]:
        """Start each named relay in front of 127.0.0.1:*target*; name -> port users connect to."""
        starters = {DIRECT: lambda: target,
                    SOCAT: lambda: self.socat_two_hop(target),
                    SSH: lambda: self.ssh(target),
                    HAPROXY: lambda: self.haproxy(target)}
        for name, (carrier, level) in TUNNELS.items():
            starters[name] = lambda level=level, carrier=carrier: self.tunnelpass(level, carrier, target).port
        ports = {}
        for name in names:
            try:
                ports[name] = starters[name]()
            except RuntimeError as e:  # a tunnelpass server that exits at startup (e.g. a --type it lacks)
                self.leave_out(name, str(e))
        for port in ports.values():
            wait_listening(port)
        for pair in self.pairs.values():
            if pair.name in ports and not self.wait_pool(pair):
                del ports[pair.name]
        return ports

    def tunnelpass(self, level: int, carrier: int, target: int, extra: tuple[str, ...] = (),
                   with_metrics: bool = True) -> TunnelPair:
        """A server (receive flow, --tls *level*, --type *carrier*) and its client, as the README starts them."""
        tunnel, public = free_port(), free_port()
        metrics = free_port() if with_metrics else None
        server_only = ("--metrics", f"127.0.0.1:{metrics}") if metrics else ()
        if carrier:
            server_only += ("--type", str(carrier))
        name = next(n for n, kind in TUNNELS.items() if kind == (carrier, level))
        tag = f"{name}-{target}"
        server = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "server",
                             "--tunnel", f"127.0.0.1:{tunnel}", "--target", f"127.0.0.1:{public}",
                             "--key", KEY, "--tls", str(level), "--log", "info", *server_only, *extra],
                            f"server-{tag}.log")
        wait_listening(tunnel, proc=server)
        client = self.spawn([TWISTD, "-n", "--pidfile=", "tunnelpass", "--mode", "client",
                             "--tunnel", f"127.0.0.1:{tunnel}", "--target", f"127.0.0.1:{target}",
                             "--key", KEY, "--log", "info", *extra], f"client-{tag}.log")
        pair = TunnelPair(name, public, server, client, tunnel, metrics, carrier)
        self.pairs[pair.name] = pair
        return pair

    def wait_pool(self, pair: TunnelPair, timeout: float = 30.0) -> bool:
        """Until the tunnel is up and settled: the client's idle pool filled (type 0), or its
        carrier connections up and unchanged for SETTLED seconds (type 3).

        False (and the reason in ``self.failed``) when not one connection came
        up: such a relay is left out of the measurements, it would only time
        out on every connection.  A partly filled pool is measured anyway.
        """
        what = "carrier" if pair.carrier else "pool"
        deadline = time.monotonic() + timeout
        count, since = 0, time.monotonic()  # connections up, and since when that number has not changed

        def ready() -> bool:
            if pair.carrier:
                return count > 0 and time.monotonic() - since >= SETTLED
            return count >= MIN_POOL

        while not ready():
            for p in (pair.server, pair.client):
                if p.poll() is not None:
                    return self.leave_out(pair.name, f"a tunnelpass process exited with {p.returncode}{log_tail(p)}")
            if time.monotonic() > deadline:
                if not count:
                    return self.leave_out(pair.name, f"no {what} connection after {timeout:.0f} s; "
                                                     f"client log:{log_tail(pair.client, 3)}")
                print(f"bench: {pair.name}: {what} {count:.0f} connections after {timeout:.0f} s; measuring anyway",
                      file=sys.stderr)
                return True
            time.sleep(0.1)
            now = pair.up()
            if now != count:
                count, since = now, time.monotonic()
        return True

    def exited(self, name: str) -> str | None:
        """Why tunnelpass relay *name* cannot be measured any more (its server or client exited), or None."""
        pair = self.pairs.get(name)
        for side, p in (("server", pair.server), ("client", pair.client)) if pair else ():
            if p.poll() is not None:
                return f"the tunnelpass {side} exited with {p.returncode} during the run{log_tail(p)}"
        return None

    def leave_out(self, name: str, reason: str) -> bool:
        self.failed[name] = reason
        print(f"bench: {name} left out: {reason}", file=sys.stderr)
        return False

    def socat_two_hop(self, target: int) -> int:
        """Two socat processes in a chain: the plain two-process analogue of tls=0."""
        middle, front = free_port(), free_port()
        for listen, to in ((middle, target), (front, middle)):
            self.spawn(["socat", f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                        f"TCP:127.0.0.1:{to}"])
        return front

    def ssh(self, target: int) -> int:
        """``ssh -L`` with aes128-gcm through a private sshd: the encrypted analogue of tls=1."""
        client_key = os.path.join(self.dir, "ck")
        if self._sshd is None:
            host_key = os.path.join(self.dir, "hk")
            for key in (host_key, client_key):
                if not os.path.exists(key):
                    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
            authorized = os.path.join(self.dir, "authorized_keys")
            shutil.copy(client_key + ".pub", authorized)
            os.chmod(authorized, 0o600)
            os.makedirs("/run/sshd", exist_ok=True)
            self._sshd = free_port()
            sshd = self.spawn(["/usr/sbin/sshd", "-D", "-e", "-p", str(self._sshd), "-o", "ListenAddress=127.0.0.1",
                               "-h", host_key, "-o", f"AuthorizedKeysFile={authorized}",
                               "-o", "PermitRootLogin=yes", "-o", "StrictModes=no", "-o", "MaxStartups=100",
                               "-o", "UsePAM=no"], "sshd.log")
            wait_listening(self._sshd, proc=sshd)
        port = free_port()
        self.spawn(["ssh", "-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                    "-o", "Ciphers=aes128-gcm@openssh.com", "-i", client_key, "-p", str(self._sshd),
                    "-L", f"127.0.0.1:{port}:127.0.0.1:{target}",
                    f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1"], "ssh.log")
        return port

    def haproxy(self, target: int) -> int:
        """haproxy, mode tcp, one hop: a latency reference."""
        port = free_port()
        cfg = os.path.join(self.dir, f"haproxy-{port}.cfg")
        with open(cfg, "w") as f:
            f.write(f"global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                    f"  timeout client 60s\n  timeout server 60s\n"
                    f"listen relay\n  bind 127.0.0.1:{port}\n  server s1 127.0.0.1:{target}\n")
        self.spawn(["haproxy", "-f", cfg, "-db"], "haproxy.log")
        return port

    # -- targets -------------------------------------------------------------

    def iperf3(self) -> int:
        port = free_port()
        self.spawn(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], "iperf3.log")
        wait_listening(port)
        return port

    def echo(self) -> int:
        port = free_port()
        self.spawn([sys.executable, os.path.join(HERE, "echo.py"), str(port)], "echo.log")
        wait_listening(port)
        return port
