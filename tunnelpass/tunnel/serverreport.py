# -*- test-case-name: tests.test_server -*-
"""What the server tells its operator: the health line and ``--metrics``.

One place for the server's counters as an operator sees them: the periodic
``health`` event (and its final one at stop) and the samples the metrics
endpoint exposes -- the session, the pool, the handshake guard and the
failures by reason, the open-files budget and the rate limiter.

A mixin of :class:`tunnelpass.tunnel.server.TunnelServer`, kept apart so the
service module holds listeners and sessions.
"""

from __future__ import annotations

from tunnelpass.ops.metrics import Sample, rate_samples, tunnel_samples
from tunnelpass.ops.stats import tunnel_fields


class ServerReporting:
    """The reporting part of :class:`~tunnelpass.tunnel.server.TunnelServer`."""


    def report(self, final: bool = False) -> None:
        session = self.session
        fields = tunnel_fields(self.stats, self.udp_stats)
        self.log.info(
            "health: client={client} pool_idle={pool_idle} active={active} connect_failures={connect_failures} "
            "blocked={blocked} session_replacements={session_replacements} bytes_in={bytes_in} "
            "bytes_out={bytes_out} udp_sessions={udp_sessions} udp_drops={udp_drops} "
            "udp_evictions={udp_evictions} rtt_ms={rtt_ms} "
            "handshake_failures={handshake_failures} handshakes_pending={handshakes_pending} "
            "handshake_evictions={handshake_evictions} bans={bans} carriers={carriers}",
            event="health", client=session is not None, carriers=len(self.carriers), session_replacements=self.replacements.count,
            pool_idle=len(session.pool.idle) if session else 0,
            rtt_ms=round(session.control.rtt * 1000, 3) if session and session.control.rtt is not None else None,
            handshake_failures=self.handshake_failures, handshake_refused=sum(self.guard.refused.values()),
            handshake_refused_by_reason=dict(self.guard.refused), handshakes_pending=self.guard.pending,
            handshake_evictions=self.guard.evictions, bans=self.guard.bans,
            pool_timeouts=session.pool.timeouts if session else 0, final=final,
            handshake_failures_by_reason=dict(self.failures_by_reason), **fields,
        )

    def metrics(self) -> list:
        """What ``--metrics`` exposes."""
        session = self.session
        rtt = session.control.rtt if session is not None else None
        return tunnel_samples(self.stats, self.udp_stats, "server") + [
            Sample("client_connected", "gauge", "1 while a client session is up", int(session is not None)),
            Sample("session_replacements", "counter", "sessions replaced by a newer one with the same key",
                   self.replacements.count),
            Sample("pool_idle", "gauge", "idle pool connections", len(session.pool.idle) if session else 0),
            Sample("pool_waiting", "gauge", "user connections waiting for a pool connection",
                   sum(1 for w in session.pool.waiters if not w.called) if session else 0),
        ] + self.carriers.samples() + [
            Sample("handshake_failures", "counter", "failed tunnel handshakes, by reason", count, {"reason": reason})
            for reason, count in self.failures_by_reason.items()
        ] + [
            Sample("handshake_refused", "counter", "connections refused by the handshake guard, by reason", count,
                   {"reason": reason})
            for reason, count in self.guard.refused.items()
        ] + [
            Sample("handshakes_pending", "gauge", "unauthenticated connections (handshakes in progress)",
                   self.guard.pending),
            Sample("handshakes_pending_top_source", "gauge",
                   "handshakes in progress held by the source (address, IPv6 /64) holding the most",
                   self.guard.top_source_pending),
            Sample("handshake_evictions", "counter",
                   "pending handshakes closed to admit a source holding fewer (the overall cap was full)",
                   self.guard.evictions),
            Sample("bans", "counter", "sources banned from control connections after repeated wrong keys",
                   self.guard.bans),
            Sample("rtt_seconds", "gauge", "control channel round-trip time (NaN before the first PONG)",
                   rtt if rtt is not None else float("nan")),
        ] + self.descriptors.samples(pool=self.pool_bound) + rate_samples(self.settings.limits.limiter)
