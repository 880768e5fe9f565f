"""The shared UDP session table, sans-IO: which session a full table
evicts, when it refuses, what it counts and logs (tunnelpass.relay.sessiontable)."""

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from tunnelpass.relay.sessiontable import ACTIVE_WINDOW, EVICTION_LOG_INTERVAL, REPLY_WAIT, SessionTable
from tunnelpass.ops.stats import ListenerStats


class Session:
    """What the table needs of a session: key, last_activity, answered and
    a close() that leaves the table (as the listeners' sessions do)."""

    answered = False

    def __init__(self, table: SessionTable, key):
        self.table, self.key = table, key
        self.last_activity = table.clock.seconds()
        self.closed = False

    def close(self):
        self.closed = True
        self.table.remove(self)


class SessionTableTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = ListenerStats()
        self.table = SessionTable("test", self.clock, self.stats)

    def add(self, *keys):
        sessions = []
        for key in keys:
            session = Session(self.table, key)
            self.table.add(session)
            sessions.append(session)
        return sessions

    def full(self, limit):
        return lambda: len(self.table) >= limit

    def test_a_mapping_of_keys(self):
        a, b = self.add("a", "b")
        self.assertEqual((len(self.table), "a" in self.table, self.table.get("b"), self.table.get("c")),
                         (2, True, b, None))
        self.table.replied(b, 0)
        self.assertEqual(set(self.table.values()), {a, b})
        self.assertTrue(self.table.remove(a))
        self.assertFalse(self.table.remove(a), "already gone")
        stale = Session(self.table, "b")  # another session under a live key
        self.assertFalse(self.table.remove(stale))
        self.assertIs(self.table.get("b"), b)
        self.table.touch(a, 5)  # a closed session's late datagram: no error
        self.assertEqual(list(self.table), [b])

    def test_answered_quiet_session_goes_first_then_least_recently_active(self):
        a, b, c, d = self.add("a", "b", "c", "d")
        self.table.replied(c, self.clock.seconds())
        self.clock.advance(0.1)
        self.table.replied(b, self.clock.seconds())
        self.clock.advance(REPLY_WAIT + 0.1)
        # a and d never had a reply; a is the oldest of all, but c (answered,
        # quiet longest among the answered) goes first.
        self.assertIs(self.table.victim(), c)
        self.table.touch(c, self.clock.seconds())  # c speaks again: b is now the quietest answered
        self.assertIs(self.table.victim(), b)
        self.table.touch(b, self.clock.seconds())
        # Every answered session is active: the least recently active of the
        # others, a, goes.
        self.assertIs(self.table.victim(), a)
        self.table.touch(a, self.clock.seconds())
        self.assertIs(self.table.victim(), d)
        self.table.touch(d, self.clock.seconds())
        self.assertIsNone(self.table.victim(), "every session active within the window")

    def test_a_session_awaiting_its_reply_is_active_longer(self):
        waiting, answered = self.add("waiting", "answered")
        self.table.replied(answered, self.clock.seconds())
        self.clock.advance(ACTIVE_WINDOW)
        self.assertIs(self.table.victim(), answered)
        self.table.touch(answered, self.clock.seconds())
        self.assertIsNone(self.table.victim(), "quiet for ACTIVE_WINDOW, but no reply yet: may be coming")
        self.assertFalse(self.table.make_room(self.full(2)))
        self.clock.advance(REPLY_WAIT - ACTIVE_WINDOW)
        self.table.touch(answered, self.clock.seconds())
        self.assertIs(self.table.victim(), waiting, "no reply within REPLY_WAIT")

    def test_replied_moves_a_waiting_session_to_the_answered(self):
        a, b = self.add("a", "b")
        self.clock.advance(ACTIVE_WINDOW)
        self.table.replied(a, self.clock.seconds() - ACTIVE_WINDOW)  # as if answered back then
        self.assertTrue(a.answered)
        self.assertIs(self.table.victim(), a, "answered and quiet: before the older waiting b")

    def test_make_room_evicts_only_what_is_needed(self):
        sessions = self.add(*range(5))
        self.clock.advance(REPLY_WAIT)
        self.assertTrue(self.table.make_room(self.full(5)))
        self.assertEqual([s.closed for s in sessions], [True, False, False, False, False])
        self.assertTrue(self.table.make_room(self.full(2)), "a lowered limit: several go")
        self.assertEqual([s.closed for s in sessions], [True, True, True, True, False])
        self.assertEqual((len(self.table), self.stats.udp_evictions), (1, 4))
        self.assertTrue(self.table.make_room(self.full(5)), "room already")
        self.assertEqual(self.stats.udp_evictions, 4)

    def test_a_close_that_fails_does_not_wedge_make_room(self):
        sessions = self.add(*range(3))
        broken = sessions[0]

        def close():
            broken.closed = True
            raise RuntimeError("the stream's close failed")

        broken.close = close
        self.clock.advance(REPLY_WAIT)
        self.assertTrue(self.table.make_room(self.full(3)), "it used to pick the same victim forever")
        self.assertEqual((len(self.table), self.stats.udp_evictions), (2, 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_full_of_active_sessions_refuses(self):
        sessions = self.add(*range(3))
        for session in sessions:
            self.table.replied(session, self.clock.seconds())
        self.clock.advance(ACTIVE_WINDOW / 2)
        self.assertFalse(self.table.make_room(self.full(3)))
        self.assertEqual((self.stats.udp_evictions, [s.closed for s in sessions]), (0, [False] * 3))
        self.clock.advance(ACTIVE_WINDOW / 2)
        self.table.touch(sessions[0], self.clock.seconds())
        self.assertTrue(self.table.make_room(self.full(3)))
        self.assertEqual([s.closed for s in sessions], [False, True, False], "the least recently active")

    def test_evictions_logged_throttled_info_then_warning_for_unanswered(self):
        sessions = self.add(*range(6))
        for session in sessions[:4]:
            self.table.replied(session, self.clock.seconds())
        self.clock.advance(ACTIVE_WINDOW)
        with capturedLogs() as events:
            for _ in range(3):
                self.table.make_room(self.full(len(self.table)))  # evicts one each
            self.assertEqual(len(events), 1, "one line per interval")
            self.assertEqual(events[0]["log_level"], LogLevel.info)
            self.assertIn("evicted 1 quiet, answered session(s)", formatEvent(events[0]))
            self.clock.advance(EVICTION_LOG_INTERVAL)
            for _ in range(2):  # the last answered one (logged), then one still waiting for a reply
                self.table.make_room(self.full(len(self.table)))
            self.clock.advance(EVICTION_LOG_INTERVAL)
            self.table.make_room(self.full(len(self.table)))
        self.assertEqual(len(events), 3)
        self.assertEqual((events[1]["log_level"], events[1]["count"], events[1]["unanswered"]),
                         (LogLevel.info, 3, 0))
        self.assertEqual((events[2]["log_level"], events[2]["count"], events[2]["unanswered"]),
                         (LogLevel.warn, 2, 2))
        self.assertIn("evicted 2 quiet session(s), 2 of them still without a reply", formatEvent(events[2]))
        self.assertEqual(self.stats.udp_evictions, 6)
