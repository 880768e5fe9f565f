# -*- test-case-name: tests.test_stats -*-
"""Per-listener counters and the periodic structured stats event.

Counters are plain attributes bumped on the hot path (no locks: everything
runs in the reactor thread); :func:`stats_event_fields` turns them into the
keyword fields of one structured log event so JSON logs are machine-readable.
"""

from __future__ import annotations

from twisted.logger import Logger


class ListenerStats:
    """What one listening endpoint has done since it started."""

    __slots__ = (
        "accepted",
        "refused",
        "active",
        "connect_failures",
        "idle_timeouts",
        "bytes_in",
        "bytes_out",
        "udp_sessions",
        "udp_sessions_total",
        "udp_datagrams_in",
        "udp_datagrams_out",
        "udp_drops",
        "udp_refused",
        "udp_evictions",
        "blocked",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def tunnel_fields(tcp: ListenerStats, udp: ListenerStats) -> dict[str, int]:
    """A tunnel's health-event fields: TCP counters, the UDP session
    counters, and UDP bytes apart (``udp_bytes_in``/``udp_bytes_out``)."""
    fields = tcp.snapshot()
    for name in ListenerStats.__slots__:
        if name.startswith("udp_"):
            fields[name] = getattr(udp, name)
    fields["udp_bytes_in"], fields["udp_bytes_out"] = udp.bytes_in, udp.bytes_out
    return fields


class StatsReporter:
    """Emits one ``tunnelpass.stats`` event per listener on demand.

    Driven by a ``LoopingCall`` owned by the service (every
    ``--report-interval``) and once more at shutdown.
    """

    log = Logger(namespace="tunnelpass.stats")

    def report(self, listeners, final: bool = False) -> None:
        for listener in listeners:
            fields = listener.stats.snapshot()
            if listener.endpoint.protocol == "udp":
                text = ("stats {listener} -> {remote}: udp_sessions={udp_sessions} "
                        "sessions_total={udp_sessions_total} datagrams_in={udp_datagrams_in} "
                        "datagrams_out={udp_datagrams_out} bytes_in={bytes_in} bytes_out={bytes_out} "
                        "udp_drops={udp_drops} udp_evictions={udp_evictions}{final_mark}")
            else:
                text = ("stats {listener} -> {remote}: active={active} accepted={accepted} "
                        "refused={refused} connect_failures={connect_failures} blocked={blocked} "
                        "bytes_in={bytes_in} bytes_out={bytes_out}{final_mark}")
            self.log.info(
                text,
                event="stats",
                listener=str(listener.endpoint),
                remote=listener.rule.remote,
                final=final,
                final_mark=" (final)" if final else "",
                **fields,
            )
