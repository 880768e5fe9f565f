"""Tests for tunnelpass.guard: bounded unauthenticated state."""

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.guard import HandshakeGuard, source_key


class GuardTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.guard = HandshakeGuard(self.clock, max_pending=4, max_pending_per_source=2,
                                    failures=3, window=10, penalty=30, max_tracked_sources=5)

    def test_per_source_and_global_caps(self):
        self.assertIsNone(self.guard.admit("a"))
        self.assertIsNone(self.guard.admit("a"))
        self.assertIn("from this address", self.guard.admit("a"))
        self.assertIsNone(self.guard.admit("b"))
        self.assertIsNone(self.guard.admit("c"))
        self.assertEqual(self.guard.admit("d"), "too many handshakes in progress")
        self.guard.done("a", True)
        self.assertIsNone(self.guard.admit("d"))
        self.assertEqual(self.guard.refused, 2)

    def test_repeated_failures_ban_then_expire(self):
        for _ in range(3):
            self.assertIsNone(self.guard.admit("x"))
            self.guard.done("x", False)
        self.assertIn("failed handshakes", self.guard.admit("x"))
        self.assertIsNone(self.guard.admit("y"), "others are not punished")
        self.clock.advance(31)
        self.assertIsNone(self.guard.admit("x"))

    def test_failures_outside_the_window_do_not_count(self):
        for _ in range(2):
            self.guard.admit("x")
            self.guard.done("x", False)
        self.clock.advance(11)
        self.guard.admit("x")
        self.guard.done("x", False)
        self.assertIsNone(self.guard.admit("x"))

    def test_success_clears_failures(self):
        for outcome in (False, False, True, False, False):
            self.guard.admit("x")
            self.guard.done("x", outcome)
        self.assertIsNone(self.guard.admit("x"))

    def test_failure_table_is_bounded(self):
        for i in range(50):
            self.guard.admit(f"10.0.0.{i}")
            self.guard.done(f"10.0.0.{i}", False)
        self.assertLessEqual(len(self.guard._failures), 5)

    def test_ipv6_counted_per_64(self):
        guard = HandshakeGuard(Clock(), max_pending_per_source=2)
        self.assertIsNone(guard.admit("2001:db8:0:1::1"))
        self.assertIsNone(guard.admit("2001:db8:0:1::2"))
        self.assertIsNotNone(guard.admit("2001:db8:0:1:ffff::3"), "same /64")
        self.assertIsNone(guard.admit("2001:db8:0:2::1"), "another /64")
        self.assertEqual(source_key("::ffff:10.0.0.1"), "10.0.0.1")

    def test_unknown_done_is_ignored(self):
        self.guard.done("never-admitted", False)
        self.guard.admit("a")
        self.guard.done("a", False)
        self.guard.done("a", False)
        self.assertEqual((self.guard.pending, dict(self.guard.pending_by_source)), (0, {}))

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from("abcdefg"), st.booleans(), st.integers(0, 20)), max_size=80))
    def test_pending_counts_never_drift(self, steps):
        guard = HandshakeGuard(Clock(), max_pending=5, max_pending_per_source=2, failures=2, window=5, penalty=5)
        admitted = []
        for source, ok, wait in steps:
            guard.clock.advance(wait)
            if guard.admit(source) is None:
                admitted.append(source)
            if admitted and ok:
                guard.done(admitted.pop(0), wait % 2 == 0)
            self.assertEqual(guard.pending, len(admitted))
            self.assertLessEqual(guard.pending, 5)
            self.assertEqual(sum(guard.pending_by_source.values()), len(admitted))
