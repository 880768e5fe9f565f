"""HTTP request/response for the tunnel benchmark: nginx serving 1 KiB, wrk driving it.

nginx runs as a child process with its own configuration in the work
directory (``daemon off``, ``worker_processes 1``, no access log, keep-alive
connections never closed by request count), so it is no system service and
stops with the benchmark.  wrk runs 32 connections on 2 threads for a fixed
duration, either keep-alive (many requests per connection) or with
``Connection: close`` (nginx closes after each answer and wrk connects
again: one new tunnelled connection per request); its request rate and
latency percentiles are what the table shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from bench import free_port

PAGE = "1k.html"
PAGE_SIZE = 1024
CONNECTIONS, THREADS = 32, 2
SETUP = f"nginx worker_processes 1 serving a {PAGE_SIZE}-byte file; wrk -c {CONNECTIONS} -t {THREADS}"


def start_nginx(relays) -> int:
    """Write a private nginx configuration and start nginx under *relays*; its port."""
    root = os.path.join(relays.dir, "nginx")
    www = os.path.join(root, "www")
    os.makedirs(os.path.join(root, "tmp"), exist_ok=True)
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, PAGE), "wb") as f:
        f.write(b"x" * (PAGE_SIZE - 1) + b"\n")
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers read the private (0700) work directory
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
  client_body_temp_path {root}/tmp/body;
  proxy_temp_path {root}/tmp/proxy;
  default_type text/html;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {www};
  }}
}}
""")
    relays.spawn(["nginx", "-p", root, "-e", f"{root}/error.log", "-c", conf], "nginx.log")
    return port


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(out: str) -> tuple[float, float, float, int]:
    """req/s, p50 ms, p99 ms, errors (socket errors plus non-2xx/3xx answers) from ``wrk --latency``."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        errors += int(bad.group(1))
    return rate, p50, p99, errors


def wrk(port: int, seconds: int, close: bool = False) -> tuple[float, float, float, int]:
    """One wrk run against 127.0.0.1:*port*, keep-alive or (*close*) ``Connection: close``:
    req/s, p50 ms, p99 ms, errors (NaN if wrk failed)."""
    header = ["-H", "Connection: close"] if close else []
    try:
        done = subprocess.run(["wrk", "-c", str(CONNECTIONS), "-t", str(THREADS), "-d", f"{seconds}s", "--latency",
                               "--timeout", "10s", *header, f"http://127.0.0.1:{port}/{PAGE}"],
                              capture_output=True, text=True, timeout=seconds + 60)
        return parse_wrk(done.stdout)
    except (subprocess.TimeoutExpired, AttributeError) as e:
        print(f"bench: wrk on port {port} failed: {e!r}", file=sys.stderr)
        nan = float("nan")
        return nan, nan, nan, -1
