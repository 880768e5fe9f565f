"""Tests for tunnelpass.tunnel.poolpolicy: a pool sized by measured demand, with bounded dialling."""

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.tunnel.poolpolicy import PoolPolicy


class PoolPolicyTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.policy = PoolPolicy(self.clock, min_pool=4, max_pool=64, dial_rate=10, dial_burst=8, memory=30)

    def test_fills_to_min_within_the_burst(self):
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=0), 4)
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=4), 0, "in-flight dials count")

    def test_grows_with_claims_and_is_rate_limited(self):
        self.policy.to_dial(0, 0)
        for _ in range(4):
            self.policy.used()
        self.assertEqual(self.policy.target, 8, "min_pool plus this second's claims")
        self.assertEqual(self.policy.to_dial(idle=0, in_flight=0), 4, "only 4 tokens left of the burst of 8")
        self.clock.advance(0.5)
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=0), 4)

    def test_requests_are_dialled_at_once_but_are_not_demand(self):
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=0), 0)
        self.policy.requested(3)
        self.assertEqual(self.policy.target, 4, "a waiting user's claim is counted when it happens")
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=0), 3)
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=3), 0, "asked for once, dialled once")

    def test_dials_under_way_are_bounded(self):
        policy = PoolPolicy(self.clock, min_pool=8, max_pool=1024, max_in_flight=16)
        policy.requested(500)
        self.assertEqual(policy.to_dial(idle=0, in_flight=0), 16)
        self.assertEqual(policy.to_dial(idle=0, in_flight=16), 0, "the server caps pending handshakes per source")
        self.assertEqual(policy.to_dial(idle=10, in_flight=6), 10)

    def test_what_cannot_be_dialled_for_lack_of_room_stays_owed(self):
        self.policy.requested(6)
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=0, room=2), 2)
        self.clock.advance(1)
        self.assertEqual(self.policy.to_dial(idle=4, in_flight=2, room=10), 4, "the other four, later")

    def test_requests_are_bounded_by_max_pool(self):
        self.policy.requested(10**6)
        dialled = 0
        for _ in range(100):
            self.clock.advance(1)
            dialled += self.policy.to_dial(idle=0, in_flight=dialled)
        self.assertEqual(dialled, 64)

    def test_repeated_shortages_do_not_compound(self):
        """Today's bug: every claim that emptied the pool doubled the target
        (8 -> 1,024 after a burst of 64).  Demand is counted, not doubled."""
        policy = PoolPolicy(self.clock, min_pool=8, max_pool=1024)
        for _ in range(64):  # each claim empties the pool and the server asks for one more
            policy.used()
            policy.requested(1)
        self.assertEqual(policy.target, 8 + 64)
        self.assertLessEqual(policy.to_dial(idle=0, in_flight=0), 2 * 64 + 8, "all it would ever dial for it")

    def test_peak_of_the_busiest_second_is_remembered(self):
        for _ in range(10):
            self.policy.used()
        self.clock.advance(1)
        for _ in range(3):
            self.policy.used()
        self.assertEqual(self.policy.target, 14, "the busiest second of the window counts")
        self.clock.advance(29)
        self.assertEqual(self.policy.target, 7, "the burst fell out of the window, the later second did not")

    def test_back_to_min_pool_after_quiet_period(self):
        for _ in range(50):
            self.policy.used()
        self.assertEqual(self.policy.target, 54)
        self.assertEqual(self.policy.surplus(idle=54), 0)
        self.clock.advance(29)
        self.assertEqual(self.policy.target, 54, "still within the memory")
        self.clock.advance(2)
        self.assertEqual(self.policy.target, 4)
        self.assertEqual(self.policy.surplus(idle=54), 50)

    def test_steady_load_keeps_its_rate_idle(self):
        for _ in range(120):  # 20 claims a second for two minutes
            for _ in range(20):
                self.policy.used()
            self.clock.advance(1)
        self.assertEqual(self.policy.target, 24)

    def test_server_max_pool_caps(self):
        self.policy.limit_max_pool(2)
        self.assertEqual((self.policy.min_pool, self.policy.target), (2, 2))
        for _ in range(10):
            self.policy.used()
        self.assertEqual(self.policy.target, 2)

    def test_limits_only_lower(self):
        self.policy.limit_max_pool(1000)
        for _ in range(1000):
            self.policy.used()
        self.assertEqual(self.policy.target, 64)
        self.policy.limit_max_pool(32)
        self.policy.limit_max_pool(64)
        self.assertEqual((self.policy.min_pool, self.policy.max_pool), (4, 32), "the lower of two limits holds")

    def test_clock_stepping_back(self):
        dialled = [self.policy.to_dial(0, 0)]
        self.clock.rightNow -= 5  # the wall clock steps back
        self.policy.used()
        dialled += [self.policy.to_dial(0, 0) for _ in range(3)]
        self.assertTrue(all(n >= 0 for n in dialled), dialled)
        self.assertEqual(sum(dialled), 8, "no more than the burst while time does not move forward")

    def test_empty_requests_do_not_hold_the_pool_up(self):
        for _ in range(4):
            self.policy.used()
        for _ in range(3):
            self.clock.advance(29)
            self.policy.requested(0)
        self.assertEqual(self.policy.target, 4)

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
                policy.used()
            elif action == "request":
                policy.requested(count)
            else:
                dialled += policy.to_dial(idle=count % 40, in_flight=0)
            self.assertTrue(2 <= policy.target <= 32)
            self.assertLessEqual(dialled, 4 + elapsed * 5 + 1e-6, "dial rate bound")
