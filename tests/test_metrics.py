"""Tests for tunnelpass.ops.metrics' ``--metrics`` shorthands (the exposition
itself is covered end to end by tests.e2e.test_metrics_e2e)."""

from twisted.python import usage
from twisted.trial import unittest

from tests.test_tap import parse
from tunnelpass.ops.metrics import parse_metrics_address


class MetricsAddressTests(unittest.TestCase):
    def test_shorthands(self):
        for text, description in [
            ("9100", "tcp:9100:interface=127.0.0.1"),  # a bare port is loopback only
            ("127.0.0.1:9100", "tcp:9100:interface=127.0.0.1"),
            ("localhost:9100", "tcp:9100:interface=127.0.0.1"),
            ("10.1.2.3:9100", "tcp:9100:interface=10.1.2.3"),
            ("[::1]:9100", "tcp6:9100:interface=\\:\\:1"),
            ("[::]:9100", "tcp6:9100:interface=\\:\\:"),
            (":9100", "tcp:9100"),
        ]:
            self.assertEqual(parse_metrics_address(text), description, text)

    def test_endpoint_strings_pass_through(self):
        for text in ("tcp:9100:interface=127.0.0.1", "tcp6:9100:interface=\\:\\:1", "unix:/run/tp/metrics.sock"):
            self.assertEqual(parse_metrics_address(text), text)

    def test_bad_values_are_one_line_errors(self):
        for text, fragment in [
            ("0", "not in 1-65535"), ("70000", "not in 1-65535"), ("127.0.0.1:99999", "not in 1-65535"),
            ("::1:9100", "in brackets, [::1]:9100"), ("[127.0.0.1]:9100", "not an IPv6 address"),
            ("[::1]", "expected [IPV6]:PORT"), ("metrics.example:9100", "an IP address, not a name"),
            ("foo:9100", "Unknown endpoint type: 'foo'; use PORT (on 127.0.0.1)"),
            ("tcp:abc", "use PORT"), ("tcp:9100:bogus=1", "use PORT"),
            ("ssl:9100:privateKey=/nonexistent/key.pem", "No such file or directory: /nonexistent/key.pem"),
        ]:
            with self.assertRaises(ValueError) as cm:
                parse_metrics_address(text)
            self.assertIn(fragment, str(cm.exception), text)
            self.assertNotIn("\n", str(cm.exception))

    def test_option_and_environment(self):
        self.assertEqual(parse(["--mode", "forward", "--metrics", "9100"])["metrics"],
                         "tcp:9100:interface=127.0.0.1")
        self.assertEqual(parse(["--mode", "forward"], {"TUNNELPASS_METRICS": "[::1]:9100"})["metrics"],
                         "tcp6:9100:interface=\\:\\:1")
        with self.assertRaises(usage.UsageError) as cm:
            parse(["--mode", "forward", "--metrics", "nonsense"])
        self.assertTrue(str(cm.exception).startswith("--metrics: 'nonsense': Unknown endpoint type"))
