#!/usr/bin/env bash
# make bench: tunnelpass vs its peers on loopback, in one run per script.
#   bench/run.sh bench.py         the forwarder vs direct, socat, haproxy, twisted portforward
#   bench/run.sh tunnel_bench.py  server + client (type 0 and 3, tls 0 and 1) vs socat two-hop, ssh -L
#                                 (aes128-gcm), haproxy: bulk (iperf3), HTTP keep-alive and Connection: close
#                                 (nginx + wrk), new connections (sequential, 32 concurrent), fairness, RSS
#                                 (options: --quick, --rounds N, --only bulk,http,http-close,newconn,
#                                 newconn-concurrent,fairness,rss, --profile DIR; --help)
#   bench/run.sh udp_bench.py     UDP: forwarder and tunnel vs direct and socat (iperf3 -u, request/response)
# Needs: iperf3 socat haproxy openssh-server (and for tunnel_bench.py nginx-light wrk); as root, the
# missing ones are installed with apt-get.  Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
script=${1:-bench.py}
shift || true
declare -A package=([iperf3]=iperf3 [socat]=socat [haproxy]=haproxy [sshd]=openssh-server [ssh]=openssh-client
                    [nginx]=nginx-light [wrk]=wrk)
tools=(iperf3 socat haproxy)
[ "$script" = tunnel_bench.py ] && tools+=(nginx wrk sshd ssh)
missing=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("${package[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "bench: missing ${missing[*]}: run as root to have them installed, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "${PY:-.venv/bin/python}" "bench/$script" "$@"
