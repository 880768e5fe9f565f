#!/usr/bin/env bash
# make bench: tunnelpass vs its peers on loopback, in one run per script.
#   bench/run.sh bench.py         the forwarder vs direct, socat, haproxy, twisted portforward
#   bench/run.sh tunnel_bench.py  server + client vs socat two-hop, ssh -L (aes128-gcm), haproxy
#   bench/run.sh udp_bench.py     UDP: forwarder and tunnel vs direct and socat (iperf3 -u, request/response)
# Needs: apt-get install -y iperf3 socat haproxy openssh-server  (run on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in iperf3 socat haproxy; do
  command -v "$tool" >/dev/null || { echo "bench: $tool missing: apt-get install -y iperf3 socat haproxy" >&2; exit 2; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
script=${1:-bench.py}
shift || true
exec "${PY:-.venv/bin/python}" "bench/$script" "$@"
