"""Tests for tunnelpass.carriers.pool: the server's idle pool registry."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.carriers.pool import IdlePool, PoolFull, PoolTimeout


class IdlePoolTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.asked = []
        self.pool = IdlePool(self.clock, max_size=2, want_more=self.asked.append, timeout=5, max_waiters=2)

    def test_take_oldest_idle_at_once(self):
        self.pool.add(b"a", "A")
        self.pool.add(b"b", "B")
        self.assertEqual(self.successResultOf(self.pool.take()), (b"a", "A"))
        self.assertEqual(self.asked, [])
        self.assertEqual(self.successResultOf(self.pool.take()), (b"b", "B"))
        self.assertEqual(self.asked, [1], "an emptied pool asks for more")

    def test_full_pool_refuses(self):
        self.assertTrue(self.pool.add(b"a", "A"))
        self.assertTrue(self.pool.add(b"b", "B"))
        self.assertFalse(self.pool.add(b"c", "C"))

    def test_waiter_served_by_next_connection(self):
        d = self.pool.take()
        self.assertNoResult(d)
        self.assertEqual(self.asked, [1])
        self.pool.add(b"n", "N")
        self.assertEqual(self.successResultOf(d), (b"n", "N"))
        self.assertEqual(self.pool.idle, {})

    def test_requests_grow_linearly_with_waiters(self):
        pool = IdlePool(self.clock, max_size=2, want_more=self.asked.append, max_waiters=100)
        for _ in range(100):
            pool.take()
        self.assertEqual(sum(self.asked), 100)

    def test_waiter_times_out(self):
        d = self.pool.take()
        self.clock.advance(5)
        self.failureResultOf(d, PoolTimeout)
        self.assertEqual(self.pool.timeouts, 1)
        self.pool.add(b"late", "L")
        self.assertEqual(list(self.pool.idle), [b"late"], "a timed-out waiter is not served")

    def test_waiters_bounded(self):
        self.pool.take(), self.pool.take()
        self.failureResultOf(self.pool.take(), PoolFull)

    def test_cancelled_waiter_forgotten(self):
        d = self.pool.take()
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(self.pool.waiters), 0)

    def test_remove_and_flush(self):
        self.pool.add(b"a", "A")
        self.pool.add(b"b", "B")
        self.pool.remove(b"a")
        self.pool.remove(b"unknown")
        self.assertEqual(self.pool.flush(), ["B"])
        self.assertEqual(self.pool.idle, {})
