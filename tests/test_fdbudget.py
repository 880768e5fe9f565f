"""The open-files budget (sans-IO): pool bound, dial allowance, the reserve,
recognising EMFILE in Twisted's errors, counting and warning."""

import errno

from twisted.internet.error import CannotListenError, ConnectBindError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tunnelpass.ops.fdbudget import (
    RELAXED_AGE,
    TIGHT_AGE,
    Descriptors,
    count_open,
    dial_allowance,
    pool_bound,
    ran_out,
    reserve_for,
    udp_socket_failed,
)
from tunnelpass.ops.stats import ListenerStats


class BudgetFunctionTests(unittest.TestCase):
    def test_pool_bound_is_a_quarter_of_the_limit_at_most(self):
        self.assertEqual(pool_bound(1024, 1024), 256)
        self.assertEqual(pool_bound(1024, 100), 100)  # --max-pool lower: it wins
        self.assertEqual(pool_bound(65536, 1024), 1024)
        self.assertEqual(pool_bound(3, 1024), 1)  # never zero: a tunnel needs one

    def test_reserve_scales_within_bounds(self):
        self.assertEqual(reserve_for(64), 4)
        self.assertEqual(reserve_for(1024), 4)
        self.assertEqual(reserve_for(4096), 16)
        self.assertEqual(reserve_for(1 << 20), 64)

    def test_dial_allowance_counts_the_leg_each_pool_connection_will_need(self):
        # 276 open, of which 256 idle pool connections: each will need a
        # target leg, so 1024 - 4 - 276 - 256 = 488 left, for 244 more pairs.
        self.assertEqual(dial_allowance(1024, 276, 256, 4), 244)
        # 500 users relayed (1000 descriptors) plus overhead: nothing more.
        self.assertEqual(dial_allowance(1024, 1018, 0, 4), 1)
        self.assertEqual(dial_allowance(1024, 1020, 0, 4), 0)
        self.assertEqual(dial_allowance(1024, 1100, 10, 4), 0)  # never negative

    def test_ran_out_recognises_each_form_twisted_uses(self):
        emfile = OSError(errno.EMFILE, "Too many open files")
        self.assertEqual(ran_out(emfile), errno.EMFILE)
        self.assertEqual(ran_out(OSError(errno.ENFILE, "File table overflow")), errno.ENFILE)
        self.assertEqual(ran_out(ConnectBindError(errno.EMFILE, "Too many open files")), errno.EMFILE)
        self.assertEqual(ran_out(Failure(ConnectBindError(errno.EMFILE, "x"))), errno.EMFILE)
        self.assertEqual(ran_out(CannotListenError("", 0, emfile)), errno.EMFILE)

    def test_ran_out_is_not_other_failures(self):
        self.assertIsNone(ran_out(ConnectionRefusedError()))
        self.assertIsNone(ran_out(Failure(ConnectBindError(errno.EADDRNOTAVAIL, "x"))))
        self.assertIsNone(ran_out(OSError(errno.ECONNRESET, "reset")))
        self.assertIsNone(ran_out(CannotListenError("", 0, OSError(errno.EADDRINUSE, "in use"))))
        self.assertIsNone(ran_out(ValueError("nothing to do with it")))

    def test_count_open_counts_this_process(self):
        before = count_open()
        if before is None:
            raise unittest.SkipTest("neither /proc/self/fd nor /dev/fd here")
        import os

        read_fd, write_fd = os.pipe()
        try:
            self.assertEqual(count_open(), before + 2)
        finally:
            os.close(read_fd)
            os.close(write_fd)


class DescriptorsTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.open = 100
        self.counts = 0

        def count():
            self.counts += 1
            return self.open

        self.descriptors = Descriptors(self.clock, limit=1024, count=count)

    def test_limit_sets_the_reserve_and_ceiling(self):
        self.assertEqual((self.descriptors.reserve, self.descriptors.ceiling), (4, 1020))
        self.descriptors.set_limit(64)
        self.assertEqual((self.descriptors.limit, self.descriptors.ceiling), (64, 60))
        self.assertEqual(self.descriptors.pool_bound(1024), 16)

    def test_open_count_is_recounted_rarely_while_plenty_are_free(self):
        self.assertEqual(self.descriptors.open_now(), 100)
        self.open = 200
        self.clock.advance(RELAXED_AGE / 2)
        self.assertEqual(self.descriptors.open_now(), 100)
        self.assertEqual(self.counts, 1)
        self.clock.advance(RELAXED_AGE / 2)
        self.assertEqual(self.descriptors.open_now(), 200)
        self.assertEqual(self.counts, 2)

    def test_open_count_is_recounted_often_when_few_are_free(self):
        self.open = 900
        self.descriptors.open_now()
        self.open = 950
        self.clock.advance(TIGHT_AGE)
        self.assertEqual(self.descriptors.open_now(), 950)

    def test_spent_descriptors_count_until_the_next_recount(self):
        self.descriptors.open_now()
        self.descriptors.spend(3)
        self.assertEqual(self.descriptors.open_now(), 103)
        self.assertEqual(self.descriptors.dial_allowance(0), (1024 - 4 - 103) // 2)
        # Spending pushes the estimate into the tight band: recounted soon.
        self.descriptors.spend(700)
        self.clock.advance(TIGHT_AGE)
        self.assertEqual(self.descriptors.open_now(), 100)

    def test_no_count_means_no_dynamic_limit(self):
        descriptors = Descriptors(self.clock, limit=1024, count=lambda: None)
        self.assertIsNone(descriptors.dial_allowance(10))
        self.assertNotIn("fd_open", [s.name for s in descriptors.samples()])

    def test_running_out_is_counted_by_place_and_warned_with_a_throttle(self):
        with capturedLogs() as events:
            self.descriptors.ran_out("accept", errno.EMFILE, lost=3, listener="127.0.0.1:80/tcp")
            self.descriptors.ran_out("dial", errno.EMFILE, lost=1, listener="target")
            self.clock.advance(10)
            self.descriptors.ran_out("udp", errno.ENFILE, lost=1)
        self.assertEqual(self.descriptors.exhausted, {"accept": 1, "dial": 1, "udp": 1})
        self.assertEqual(self.descriptors.refused, 5)
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        first, second = (formatEvent(e) for e in warnings)
        self.assertIn("EMFILE at accept on 127.0.0.1:80/tcp", first)
        self.assertIn("the open-files limit is 1024", first)
        self.assertIn("LimitNOFILE", first)
        self.assertIn("--max-pool", first)
        # The second warning covers what the throttle held back.
        self.assertIn("ENFILE at udp", second)
        self.assertIn("2 time(s), 2 connection(s) refused", second)
        self.assertEqual(warnings[0]["event"], "fd_exhausted")

    def test_samples(self):
        self.descriptors.ran_out("dial")
        samples = {(s.name, tuple(s.labels.items())): s for s in self.descriptors.samples(pool=256)}
        self.assertEqual(samples[("fd_limit", ())].value, 1024)
        self.assertEqual(samples[("fd_open", ())].value, 100)
        self.assertEqual(samples[("fd_exhausted", (("where", "dial"),))].value, 1)
        self.assertEqual(samples[("fd_exhausted", (("where", "accept"),))].value, 0)
        self.assertEqual(samples[("pool_fd_bound", ())].value, 256)
        self.assertEqual(samples[("fd_exhausted", (("where", "dial"),))].kind, "counter")

    def test_udp_socket_failure_refuses_the_session_only_for_want_of_descriptors(self):
        class Owner:
            name = "target"
            stats = ListenerStats()
            descriptors = self.descriptors

        udp_socket_failed(Owner, CannotListenError("", 0, OSError(errno.EMFILE, "Too many open files")))
        udp_socket_failed(Owner, OSError(errno.EAFNOSUPPORT, "not this family"))
        self.assertEqual(Owner.stats.udp_refused, 1)
        self.assertEqual(self.descriptors.exhausted["udp"], 1)
