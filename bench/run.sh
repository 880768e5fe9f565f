#!/usr/bin/env bash
# make bench: tunnelpass forwarder vs direct, socat, haproxy, twisted portforward.
# Needs: apt-get install -y iperf3 socat haproxy  (run on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in iperf3 socat haproxy; do
  command -v "$tool" >/dev/null || { echo "bench: $tool missing: apt-get install -y iperf3 socat haproxy" >&2; exit 2; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "${PY:-.venv/bin/python}" bench/bench.py "$@"
