"""Tests for tunnelpass.config.settings: the value parsers every input goes through."""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from tunnelpass.config.settings import (
    LOG_LEVELS,
    format_duration,
    parse_carrier_type,
    parse_choice,
    parse_count,
    parse_duration,
    parse_log_level,
    parse_port,
)


class DurationTests(unittest.TestCase):
    def test_units(self):
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertEqual(parse_duration("30s"), 30)
        self.assertEqual(parse_duration("10m"), 600)
        self.assertEqual(parse_duration("1h"), 3600)
        self.assertEqual(parse_duration("2.5s"), 2.5)
        self.assertEqual(parse_duration("45"), 45)
        self.assertEqual(parse_duration("0"), 0)

    def test_rejects_garbage(self):
        for bad in ["", "s", "-1s", "1d", "1 h h", "10mins", "1e3", "nan", "inf", "1h30m",
                    "\x00", "9" * 50, "٣s"]:
            with self.assertRaises(ValueError) as cm:
                parse_duration(bad)
            self.assertLess(len(str(cm.exception)), 200)

    def test_rejects_absurdly_long(self):
        self.assertRaises(ValueError, parse_duration, "9999h")

    def test_non_string(self):
        self.assertRaises(ValueError, parse_duration, None)

    @given(st.floats(min_value=0.001, max_value=7 * 24 * 3600, allow_nan=False))
    def test_format_round_trips(self, seconds):
        seconds = round(seconds, 3)
        self.assertAlmostEqual(parse_duration(format_duration(seconds)), seconds, places=3)

    @given(st.text(max_size=30))
    def test_never_raises_anything_but_valueerror(self, text):
        try:
            value = parse_duration(text)
        except ValueError:
            return
        self.assertGreaterEqual(value, 0)


class CountAndPortTests(unittest.TestCase):
    def test_counts(self):
        self.assertEqual(parse_count("1"), 1)
        self.assertEqual(parse_count(" 200 "), 200)
        for bad in ["0", "-3", "1.5", "abc", "", "1" * 20, "１２"]:
            self.assertRaises(ValueError, parse_count, bad)

    def test_ports(self):
        self.assertEqual(parse_port("65535"), 65535)
        for bad in ["0", "65536", "http", "-1", "8080a"]:
            with self.assertRaises(ValueError) as cm:
                parse_port(bad)
            self.assertIn("1..65535", str(cm.exception))

    def test_choice(self):
        self.assertEqual(parse_choice("JSON", ("text", "json")), "json")
        with self.assertRaises(ValueError) as cm:
            parse_choice("xml", ("text", "json"))
        self.assertIn("text, json", str(cm.exception))


class LogLevelTests(unittest.TestCase):
    def test_levels_and_nodepass_aliases(self):
        for level in LOG_LEVELS:
            self.assertEqual(parse_log_level(level.upper()), level)
        # NodePass's none (nothing) keeps fatal lines, so an exit says why; event -> warn (operator events).
        self.assertEqual(parse_log_level("none"), "fatal")
        self.assertEqual(parse_log_level(" Event "), "warn")

    def test_garbage(self):
        for bad in ["", "loud", "\udcff", "x" * 10_000, None, "nonee"]:
            with self.assertRaises(ValueError) as cm:
                parse_log_level(bad)
            self.assertIn("debug, info, warn, error, fatal", str(cm.exception))
            self.assertLess(len(str(cm.exception)), 200)

    @given(st.text(max_size=30))
    def test_never_raises_anything_but_valueerror(self, text):
        try:
            self.assertIn(parse_log_level(text), LOG_LEVELS)
        except ValueError:
            pass


class CarrierTypeTests(unittest.TestCase):
    """``--type`` (NodePass's pool type): 0 and 3 run, 1 and 2 say they are not built."""

    def test_accepted(self):
        self.assertEqual(parse_carrier_type("0"), 0)
        self.assertEqual(parse_carrier_type(" 3 "), 3)

    def test_unbuilt_types_have_their_own_line(self):
        for number, name in (("1", "QUIC"), ("2", "WebSocket")):
            with self.assertRaises(ValueError) as cm:
                parse_carrier_type(number)
            self.assertEqual(str(cm.exception), f"--type {number} ({name}) is not available in this version; "
                                                "use 0 (TCP pool) or 3 (HTTP/2 multiplexed)")
        with self.assertRaises(ValueError) as cm:
            parse_carrier_type("2", "URL query type={}")
        self.assertTrue(str(cm.exception).startswith("URL query type=2 (WebSocket) is not available"))

    def test_garbage_names_the_accepted_values(self):
        for bad in ["4", "x", "-1", "", "03", "3.0", "0x3", "３", "9" * 10_000, "\udcff", None]:
            with self.assertRaises(ValueError) as cm:
                parse_carrier_type(bad)
            self.assertIn("choose 0 (TCP pool) or 3 (HTTP/2 multiplexed)", str(cm.exception))
            self.assertLess(len(str(cm.exception)), 200)

    @given(st.text(max_size=30))
    def test_never_raises_anything_but_valueerror(self, text):
        try:
            self.assertIn(parse_carrier_type(text), (0, 3))
        except ValueError:
            pass
