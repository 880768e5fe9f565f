"""End-to-end: ``--metrics`` scraped over HTTP and parsed as Prometheus text."""


from twisted.trial import unittest

from tests.e2e.harness import (echo_backends, Forwarder, scrape, TCPServer, Twistd, free_port, tcp_round_trip,
                               udp_round_trip, wait_until)
from tests.e2e.tunnel_harness import Tunnel, on_both_carriers


class MetricsTests(unittest.TestCase):
    def test_forwarder_metrics(self):
        echo = TCPServer(self)
        port, metrics = free_port(), free_port()
        forwarder = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {echo.port}\n",
                              "--metrics", f"tcp:{metrics}:interface=127.0.0.1")
        self.assertEqual(tcp_round_trip(port, b"12345"), b"12345")
        labels = (("listener", f"127.0.0.1:{port}/tcp"), ("remote", f"127.0.0.1:{echo.port}"))
        wait_until(lambda: scrape(metrics).get(("tunnelpass_bytes_out_total", labels)) == 5, 10,
                   what="bytes_out to reach 5")
        samples = scrape(metrics)
        self.assertEqual(samples[("tunnelpass_bytes_in_total", labels)], 5)
        self.assertEqual(samples[("tunnelpass_connections_accepted_total", labels)], 1)
        self.assertEqual(samples[("tunnelpass_reloads_total", ())], 0)
        self.assertNotIn(("tunnelpass_rate_limited_total", ()), samples, "no --rate, no rate metrics")
        self.assertNotIn("GET /metrics", forwarder.log(), "no access-log line per scrape")

    def test_bad_or_busy_metrics_endpoint_fails_startup(self):
        for description, fragment in (("nonsense:1", "--metrics"), ("tcp:notaport", "--metrics")):
            process = Twistd(self, ["--mode", "client", "--flow", "local", "--tunnel", f"127.0.0.1:{free_port()}",
                                    "--target", "127.0.0.1:9", "--metrics", description])
            self.assertNotEqual(process.wait_exit(), 0)
            self.assertIn(fragment, process.log())


@on_both_carriers
class TunnelMetricsTests(unittest.TestCase):
    """A tunnel's server and client scraped; on type 3 with the carrier samples."""

    def test_tunnel_metrics(self):
        server_metrics, client_metrics = free_port(), free_port()
        backend = echo_backends(self)
        tunnel = Tunnel(self, backend=backend,
                        server_args=["--metrics", f"tcp:{server_metrics}:interface=127.0.0.1"],
                        client_args=["--metrics", f"tcp:{client_metrics}:interface=127.0.0.1"], carrier=self.carrier)
        if self.carrier:
            tunnel.wait_pool(2)  # both carrier connections up
        self.assertEqual(tcp_round_trip(tunnel.entry, b"hello"), b"hello")
        self.assertEqual(udp_round_trip(tunnel.entry, b"datagram"), b"datagram")
        server = scrape(server_metrics)
        self.assertEqual(server[("tunnelpass_client_connected", ())], 1)
        if self.carrier:
            # A stream each: the harness's readiness probe, the TCP user, the UDP session.
            self.check_carriers(server, 3)
        else:
            self.assertGreater(server[("tunnelpass_pool_idle", ())], 0)
        tcp, udp = (("protocol", "tcp"), ("role", "server")), (("protocol", "udp"), ("role", "server"))
        self.assertEqual(server[("tunnelpass_bytes_in_total", tcp)], 5)
        self.assertEqual(server[("tunnelpass_bytes_in_total", udp)], 8)
        self.assertEqual(server[("tunnelpass_udp_datagrams_out_total", udp)], 1)
        self.assertEqual(server[("tunnelpass_udp_sessions_active", udp)], 1)
        client = scrape(client_metrics)
        self.assertEqual(client[("tunnelpass_server_connected", ())], 1)
        self.assertEqual(client[("tunnelpass_bytes_out_total", (("protocol", "udp"), ("role", "client")))], 8)
        if self.carrier:
            self.check_carriers(client, 3)

    def check_carriers(self, samples: dict, streams: int):
        """Type 3: two carrier connections, each with its samples under
        ``carrier="<8 hex>"``; the streams opened on them add up."""
        self.assertEqual(samples[("tunnelpass_carriers", ())], 2)
        self.assertEqual(samples[("tunnelpass_streams_opened_all_total", ())], streams)
        self.assertEqual(samples[("tunnelpass_streams_refused_all_total", ())], 0)
        self.assertEqual(samples[("tunnelpass_streams_waiting", ())], 0)
        per_carrier = {labels: value for (name, labels), value in samples.items()
                       if name == "tunnelpass_streams_opened_total"}
        self.assertEqual(len(per_carrier), 2, samples)
        for labels in per_carrier:
            ((key, value),) = labels
            self.assertEqual((key, len(value), int(value, 16) >= 0), ("carrier", 8, True))
            self.assertIn(("tunnelpass_streams_active", labels), samples)
            self.assertEqual(samples[("tunnelpass_streams_refused_total", labels)], 0)
            self.assertIn(("tunnelpass_carrier_rtt_seconds", labels), samples)
        self.assertEqual(sum(per_carrier.values()), streams)
        self.assertLessEqual(sum(samples[("tunnelpass_streams_active", labels)] for labels in per_carrier), streams)
