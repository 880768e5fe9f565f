"""Tests for tunnelpass.poolpolicy: adaptive pool size with bounded dialling."""

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.poolpolicy import PoolPolicy


class PoolPolicyTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.policy = PoolPolicy(self.clock, min_pool=4, max_pool=64, dial_rate=10, dial_burst=8, shrink_after=30)

    def test_fills_to_min_within_the_burst(self):
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=0), 4)
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=4), 0, "in-flight dials count")

    def test_grows_when_drained_and_is_rate_limited(self):
        self.policy.to_dial(0, 0)
        self.policy.used(idle_left=0)
        self.assertEqual(self.policy.target, 8)
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=0), 4, "only 4 tokens left of the burst of 8")
        self.clock.advance(0.5)
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=0), 4)

    def test_server_request_raises_target_up_to_max(self):
        self.policy.requested(100)
        self.assertEqual(self.policy.target, 64)

    def test_shrinks_back_after_quiet_period(self):
        for _ in range(4):
            self.policy.used(0)
        self.assertEqual(self.policy.target, 64)
        self.clock.advance(30)
        self.policy.to_dial(64, 0)
        self.assertEqual(self.policy.target, 48)
        self.assertEqual(self.policy.surplus(idle=64), 16)
        for _ in range(20):
            self.clock.advance(30)
            self.policy.to_dial(4, 0)
        self.assertEqual(self.policy.target, 4)

    def test_server_max_pool_caps(self):
        self.policy.limit_max_pool(2)
        self.assertEqual((self.policy.min_pool, self.policy.target), (2, 2))
        self.policy.requested(10)
        self.assertEqual(self.policy.target, 2)

    def test_server_cannot_raise_bounds(self):
        self.policy.limit_max_pool(1000)
        self.policy.requested(10**6)
        self.assertEqual(self.policy.target, 64)
        self.policy.limit_max_pool(2)
        self.policy.limit_max_pool(64)
        self.assertEqual((self.policy.min_pool, self.policy.max_pool), (4, 64))

    def test_clock_stepping_back(self):
        dialled = [self.policy.to_dial(0, 0)]
        self.clock.rightNow -= 5  # the wall clock steps back
        self.policy.used(0)
        dialled += [self.policy.to_dial(0, 0) for _ in range(3)]
        self.assertTrue(all(n >= 0 for n in dialled), dialled)
        self.assertEqual(sum(dialled), 8, "no more than the burst while time does not move forward")

    def test_empty_requests_do_not_hold_the_pool_up(self):
        for _ in range(4):
            self.policy.used(0)
        for _ in range(3):
            self.clock.advance(29)
            self.policy.requested(0)
        self.clock.advance(2)
        self.policy.to_dial(64, 0)
        self.assertLess(self.policy.target, 64)

    def test_bad_bounds(self):
        self.assertRaises(ValueError, PoolPolicy, self.clock, 0, 4)
        self.assertRaises(ValueError, PoolPolicy, self.clock, 5, 4)
        self.assertRaises(ValueError, PoolPolicy, self.clock, 1, 4, dial_rate=0)
        self.assertRaises(ValueError, PoolPolicy, self.clock, 1, 4, dial_burst=0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["used", "request", "tick"]), st.integers(0, 100),
                              st.floats(0, 5)), max_size=60))
    def test_invariants(self, steps):
        clock = Clock()
        policy = PoolPolicy(clock, min_pool=2, max_pool=32, dial_rate=5, dial_burst=4)
        dialled, elapsed = 0, 0.0
        for action, count, wait in steps:
            clock.advance(wait)
            elapsed += wait
            if action == "used":
                policy.used(count % 3)
            elif action == "request":
                policy.requested(count)
            else:
                dialled += policy.to_dial(idle=count % 40, in_flight=0)
            self.assertTrue(2 <= policy.target <= 32)
            self.assertLessEqual(dialled, 4 + elapsed * 5 + 1e-6, "dial rate bound")
