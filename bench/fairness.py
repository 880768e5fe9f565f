#!/usr/bin/env python3
"""Fairness: a 64-byte echo's latency on one connection, idle and while a bulk transfer runs beside it.

Both connections go through the same tunnel to the same target, the
benchmark's echo server (``echo.py``): a connection that starts with
``SINK\\n`` is read and discarded there instead of echoed, so the bulk
transfer loads one direction of the tunnel only.  The bulk sender is a
separate process (this file run as ``fairness.py send PORT SECONDS``:
``sendall`` of 1 MiB buffers, the bytes it sent printed at the end) so
that no thread of the measuring process competes for the GIL while a
latency is timed.

One run: the echo connection is opened, --fair-seconds of lock-step
64-byte round trips give the idle p50/p99; then the sender starts, after
RAMP seconds the same number of seconds of round trips give the busy
p50/p99, and the sender's bytes over its run give the bulk rate it reached
meanwhile.  On a type 0 tunnel the two connections are separate pool
connections (the kernel shares the bandwidth); on type 3 they are two
streams of one carrier connection, and the carrier decides.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time

SINK = b"SINK\n"
RAMP = 0.5  # s between the sender's start and the busy measurement: the transfer is at full speed
MESSAGE = b"e" * 64


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    latencies = sorted(latencies)
    if not latencies:
        return float("nan"), float("nan")
    return statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def _round_trips(sock: socket.socket, seconds: float) -> list[float]:
    """Lock-step 64-byte echoes for *seconds*; each one's latency in ms."""
    latencies = []
    deadline = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < deadline:
        sock.sendall(MESSAGE)
        got = 0
        while got < len(MESSAGE):
            chunk = sock.recv(len(MESSAGE) - got)
            if not chunk:
                raise OSError("echo connection closed")
            got += len(chunk)
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def fairness(port: int, seconds: float) -> tuple[float, float, float, float, float, float]:
    """idle p50, idle p99, busy p50, busy p99 (ms), busy p50 / idle p50, bulk Gbit/s meanwhile (NaN on failure)."""
    nan = float("nan")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            idle = _percentiles(_round_trips(sock, seconds))
            sender = subprocess.Popen([sys.executable, os.path.abspath(__file__), "send", str(port),
                                       str(seconds + 2 * RAMP)], stdout=subprocess.PIPE, text=True)
            try:
                time.sleep(RAMP)
                busy = _percentiles(_round_trips(sock, seconds))
                out, _ = sender.communicate(timeout=seconds + 30)
            finally:
                if sender.poll() is None:
                    sender.kill()
                    sender.wait()
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"bench: fairness through port {port} failed: {e!r}", file=sys.stderr)
        return nan, nan, nan, nan, nan, nan
    sent, elapsed = (float(x) for x in out.split()) if out.strip() else (0.0, 1.0)
    return (*idle, *busy, busy[0] / idle[0] if idle[0] else nan, sent * 8 / elapsed / 1e9)


def send(port: int, seconds: float) -> None:
    """The bulk sender: SINK, then 1 MiB buffers for *seconds*; prints the bytes sent and the seconds."""
    block = bytes(1 << 20)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(SINK)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.sendall(block)
            sent += len(block)
        elapsed = time.perf_counter() - started
    print(sent, elapsed)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "send":
        sys.exit("usage: fairness.py send PORT SECONDS")
    send(int(sys.argv[2]), float(sys.argv[3]))
