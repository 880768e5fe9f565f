"""--rate: the token bucket (sans-IO) and its parser."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.relay.ratelimit import RateLimiter, parse_rate


class RateLimiterTests(unittest.TestCase):
    def test_burst_then_wait_in_proportion(self):
        clock = Clock()
        limiter = RateLimiter(clock, 1_000_000)  # 1 MB/s, 64 KiB burst floor
        self.assertEqual(limiter.take(65536), 0.0)
        self.assertAlmostEqual(limiter.take(100_000), 0.1)
        clock.advance(0.1)
        self.assertEqual(limiter.take(0), 0.0, "the deficit is paid back over time")
        clock.advance(10)
        limiter.take(0)
        self.assertEqual(limiter.tokens, limiter.burst, "never more than one burst saved up")

    def test_clock_stepping_back(self):
        clock = Clock()
        clock.advance(100)
        limiter = RateLimiter(clock, 1000)
        clock.rightNow = 50
        self.assertGreaterEqual(limiter.take(10), 0.0)

    def test_udp_admitted_within_budget_only(self):
        clock = Clock()
        limiter = RateLimiter(clock, 100_000)  # burst: 65536 bytes
        self.assertTrue(limiter.admit(60000))
        self.assertFalse(limiter.admit(10000), "over budget: dropped, nothing spent")
        clock.advance(0.05)  # 5,000 bytes more
        self.assertTrue(limiter.admit(10000))
        self.assertEqual(limiter.dropped_total, 1)

    def test_hitting_the_limit_is_reported_at_most_every_10s(self):
        from twisted.logger import capturedLogs

        clock = Clock()
        limiter = RateLimiter(clock, 1000)
        with capturedLogs() as events:
            for _ in range(5):
                limiter.take(100_000)
                limiter.admit(100_000)
            clock.advance(10)
            limiter.admit(100_000)
        reports = [e for e in events if e.get("event") == "rate_limited"]
        self.assertEqual([(e["count"], e["paused"], e["dropped"]) for e in reports], [(1, 1, 0), (10, 5, 6)])

    def test_parse_rate(self):
        self.assertEqual(parse_rate("8"), 1_000_000)
        self.assertEqual(parse_rate("0"), 0)
        self.assertEqual(parse_rate("0.8"), 100_000)
        for bad in ("fast", "-1", "nan", "inf", "1e9"):
            self.assertRaises(ValueError, parse_rate, bad)
        self.assertRaises(ValueError, RateLimiter, Clock(), 0)
