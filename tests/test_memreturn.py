"""Memory goes back to the system after a burst of connections ends."""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tunnelpass.ops.memreturn import MIN_DROP, MemoryReturn, _libc_trim, memory_return_service


class MemoryReturnTests(TestCase):
    def setUp(self):
        self.live = self.opened = 0
        self.trimmed = 0

        def trim():
            self.trimmed += 1

        self.watcher = MemoryReturn(lambda: self.live, lambda: self.opened, trim)

    def burst(self, count):
        self.live += count
        self.opened += count

    def test_trims_once_after_a_large_drop(self):
        self.burst(5000)
        self.watcher.check()
        self.live = 10
        self.watcher.check()
        self.assertEqual(self.trimmed, 1)
        self.watcher.check()  # nothing new has ended since
        self.assertEqual(self.trimmed, 1)

    def test_a_burst_between_two_checks_is_not_missed(self):
        self.watcher.check()
        self.burst(3000)
        self.live = 0  # opened and closed before the next check
        self.watcher.check()
        self.assertEqual(self.trimmed, 1)

    def test_small_or_partial_drops_do_not_trim(self):
        self.burst(MIN_DROP - 1)
        self.watcher.check()
        self.live = 0
        self.watcher.check()  # fewer than MIN_DROP ended
        self.burst(3000)
        self.watcher.check()
        self.live -= 1000
        self.watcher.check()  # still more than half of the highest count
        self.assertEqual(self.trimmed, 0)

    def test_service_runs_the_check_on_its_clock(self):
        clock = Clock()
        service = memory_return_service(lambda: self.live, lambda: self.opened, clock, interval=5,
                                        trim=lambda: None)
        service.startService()
        self.addCleanup(service.stopService)
        self.burst(1000)
        clock.advance(5)
        self.live = 0
        clock.advance(5)
        self.assertEqual(service.watcher.trims, 1)

    def test_glibc_trim_returns_freed_pages(self):
        trim = _libc_trim()
        if trim is None:
            self.skipTest("no malloc_trim in this C library")

        def rss_kib():
            with open(f"/proc/{os.getpid()}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

        # Many small C-heap blocks (below glibc's mmap threshold), the last
        # one kept: freeing the rest leaves holes that only a trim returns.
        blocks = [bytearray(8000) for _ in range(20000)]
        keep = blocks[-1]
        before = rss_kib()
        del blocks
        trim()
        self.assertLess(rss_kib(), before - 50_000)  # most of the ~160 MB is back
        del keep
