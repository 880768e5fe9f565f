# -*- test-case-name: tests.e2e.test_metrics_e2e -*-
"""``--metrics ENDPOINT``: Prometheus exposition in every mode.

The hot path keeps its plain counters (:class:`~tunnelpass.ops.stats.ListenerStats`
and the services' own fields); a custom collector reads them only when
Prometheus scrapes, so metrics cost nothing between scrapes.  Each service
describes itself with ``metrics()``: a list of :class:`Sample`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from tunnelpass.ops.starterror import StartupError
from tunnelpass.config.settings import is_ip_literal

PREFIX = "tunnelpass_"

#: ListenerStats field -> (metric name, kind, help).  Counters are exposed
#: with Prometheus' ``_total`` suffix.
LISTENER_METRICS = {
    "accepted": ("connections_accepted", "counter", "TCP connections accepted"),
    "refused": ("connections_refused", "counter", "TCP connections refused (limits, untrusted PROXY sources, "
                 "no file descriptor for them or their leg)"),
    "active": ("connections_active", "gauge", "TCP connections being relayed"),
    "connect_failures": ("connect_failures", "counter",
                         "connections that could not reach their remote or a pool connection"),
    "idle_timeouts": ("idle_timeouts", "counter", "connections closed by the idle timeout"),
    "blocked": ("connections_blocked", "counter",
                "user connections refused by --block for how they started (SOCKS, HTTP, TLS)"),
    "bytes_in": ("bytes_in", "counter", "bytes received from clients and relayed on"),
    "bytes_out": ("bytes_out", "counter", "bytes relayed back to clients"),
    "udp_sessions": ("udp_sessions_active", "gauge", "UDP sessions (client addresses) open"),
    "udp_sessions_total": ("udp_sessions_opened", "counter", "UDP sessions opened"),
    "udp_datagrams_in": ("udp_datagrams_in", "counter", "UDP datagrams relayed from clients"),
    "udp_datagrams_out": ("udp_datagrams_out", "counter", "UDP datagrams relayed back to clients"),
    "udp_drops": ("udp_drops", "counter", "UDP datagrams dropped (limits, full queues, send errors)"),
    "udp_refused": ("udp_sessions_refused", "counter", "new UDP sessions refused (--max-sessions, --slot, too many waiting for the pool, "
                    "an address whose sessions the far side refused)"),
    "udp_evictions": ("udp_sessions_evicted", "counter",
                      "UDP sessions closed to make room for a new one in a full table (least recently active "
                      "first, answered ones before those still waiting for a reply)"),
}


@dataclass(frozen=True)
class Sample:
    name: str  # without the prefix, and counters without "_total"
    kind: str  # "counter" or "gauge"
    help: str
    value: float
    labels: dict = field(default_factory=dict)


def rate_samples(limiter) -> list[Sample]:
    """--rate: how often senders had to wait (none without a limit)."""
    if limiter is None:
        return []
    return [Sample("rate_limit_bytes_per_second", "gauge", "the --rate budget", limiter.rate),
            Sample("rate_limited", "counter", "times a sender was paused by --rate", limiter.paused_total),
            Sample("rate_dropped", "counter", "UDP datagrams dropped by --rate", limiter.dropped_total)]


def listener_samples(stats, labels: dict, fields=LISTENER_METRICS) -> list[Sample]:
    return [Sample(name, kind, text, getattr(stats, attribute), labels)
            for attribute, (name, kind, text) in LISTENER_METRICS.items() if attribute in fields]


#: A tunnel keeps TCP and UDP counters apart: bytes are labelled by protocol.
TCP_FIELDS = frozenset(name for name in LISTENER_METRICS if not name.startswith("udp_"))
UDP_FIELDS = frozenset(name for name in LISTENER_METRICS if name.startswith(("udp_", "bytes_")))


def tunnel_samples(tcp_stats, udp_stats, role: str) -> list[Sample]:
    return (listener_samples(tcp_stats, {"role": role, "protocol": "tcp"}, TCP_FIELDS)
            + listener_samples(udp_stats, {"role": role, "protocol": "udp"}, UDP_FIELDS))


def parse_metrics_address(text: str) -> str:
    """``--metrics`` value -> a Twisted server endpoint description.

    Shorthands, for the habit of ``--web.listen-address``-style flags:
    ``9100`` (loopback: metrics are not for everyone), ``127.0.0.1:9100``,
    ``[::1]:9100``, ``:9100`` (all IPv4 interfaces).  Anything else must be a
    Twisted endpoint description (``tcp:9100:interface=127.0.0.1``,
    ``unix:/run/tunnelpass/metrics.sock``); it is checked here so that a bad
    value is a one-line option error, not a failure at startup.
    """
    text = text.strip()
    if text.isdigit():
        return f"tcp:{_port(text)}:interface=127.0.0.1"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        address = _ip_literal(host)
        if address.version != 6:
            raise ValueError(f"{text!r}: {host} in brackets is not an IPv6 address")
        return f"tcp6:{_port(port)}:interface={str(address).replace(':', chr(92) + ':')}"
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and (not host or host.lower() == "localhost" or is_ip_literal(host)):
        if not host:
            return f"tcp:{_port(port)}"
        if host.lower() == "localhost":
            host = "127.0.0.1"
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, [::1]:{port}")
        return f"tcp:{_port(port)}:interface={host}"
    if sep and "." in host and ":" not in host:  # a host name, not an endpoint type
        raise ValueError(f"{text!r}: give the address to listen on as an IP address, not a name")
    try:
        serverFromString(None, text)
    except OSError as e:
        raise ValueError(f"{text!r}: {e.strerror or e}: {e.filename}") from None
    except Exception as e:  # Twisted's parsers raise ValueError, TypeError, KeyError, IndexError
        raise ValueError(f"{text!r}: {e}; use PORT (on 127.0.0.1), HOST:PORT, [IPV6]:PORT "
                         "or a Twisted endpoint such as tcp:9100:interface=127.0.0.1") from None
    return text


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65535:
        raise ValueError(f"port {text!r} is not in 1-65535")
    return port


def _ip_literal(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


class _Collector:
    """prometheus_client collector over a ``metrics()`` callable."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families = {}
        for sample in self.source():
            name = PREFIX + sample.name
            family = families.get(name)
            if family is None:
                labels = sorted(sample.labels)
                kind = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                family = families[name] = (kind(name, sample.help, labels=labels), labels)
            metric, labels = family
            metric.add_metric([str(sample.labels[k]) for k in labels], sample.value)
        for metric, _ in families.values():
            yield metric


def _MetricsPage(registry):
    """``/metrics`` rendered in the reactor thread, where the counters live
    (prometheus_client's own Twisted resource renders in a thread pool)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from twisted.web.resource import Resource

    class MetricsPage(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(registry)

    return MetricsPage()


class MetricsService(Service):
    """Serves ``/metrics`` on a Twisted endpoint description
    (``tcp:9100:interface=127.0.0.1``); a bind failure stops startup."""

    log = Logger(namespace="tunnelpass.metrics")

    def __init__(self, description: str, source, reactor):
        self.description = description
        self.source = source
        self.reactor = reactor
        self.port = None

    def privilegedStartService(self) -> None:
        from prometheus_client import CollectorRegistry
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.source))
        root = Resource()
        root.putChild(b"metrics", _MetricsPage(registry))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # no access-log line per scrape (one every 15 s is noise)
        try:
            endpoint = serverFromString(self.reactor, self.description)
        except (ValueError, KeyError, TypeError) as e:
            raise StartupError(f"--metrics {self.description}: {e}") from None
        failures = []
        endpoint.listen(site).addCallbacks(lambda port: setattr(self, "port", port), failures.append)
        if failures:
            raise StartupError(f"--metrics {self.description}: {failures[0].getErrorMessage()}")
        super().privilegedStartService()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
