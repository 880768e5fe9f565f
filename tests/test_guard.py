"""Tests for tunnelpass.tunnel.guard: bounded unauthenticated state, fair eviction
under the global cap, and key guesses bounded per source whatever else the
source does."""

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.tunnel.guard import REFUSAL_REASONS, HandshakeGuard, Refused, source_key


class Connections:
    """Admitted tickets and which of them the guard evicted."""

    def __init__(self, guard):
        self.guard = guard
        self.evicted = []

    def admit(self, host):
        holder = []
        ticket = self.guard.admit(host, lambda: self.evicted.append(holder[0]))
        holder.append(ticket)
        return ticket

    def refusal(self, host):
        """The reason *host* is refused, or None (and the ticket is kept)."""
        try:
            self.admit(host)
        except Refused as e:
            return e.reason
        return None


class CapTests(unittest.TestCase):
    def setUp(self):
        self.guard = HandshakeGuard(Clock(), max_pending=4, max_pending_per_source=3)
        self.c = Connections(self.guard)

    def test_per_source_cap(self):
        for _ in range(3):
            self.c.admit("a")
        self.assertEqual(self.c.refusal("a"), "source_cap")
        self.assertEqual(self.guard.refused["source_cap"], 1)
        self.assertEqual((self.guard.pending, self.guard.held("a")), (3, 3))

    def test_full_cap_evicts_the_oldest_of_the_top_source(self):
        a1, a2, a3 = (self.c.admit("a") for _ in range(3))
        b1 = self.c.admit("b")
        c1 = self.c.admit("c")  # full: "a" holds the most, its oldest goes
        self.assertEqual(self.c.evicted, [a1])
        self.assertTrue(a1.released)
        self.assertEqual((self.guard.pending, self.guard.held("a"), self.guard.evictions), (4, 2, 1))
        self.assertIsNone(self.guard.release(a1), "releasing an evicted ticket changes nothing")
        self.assertEqual(self.guard.pending, 4)
        self.assertFalse(any(t.released for t in (a2, a3, b1, c1)))

    def test_newcomer_refused_when_evicting_would_not_be_fairer(self):
        for host in "aabb":
            self.c.admit(host)
        self.assertEqual(self.c.refusal("a"), "global_cap", "a already holds the most (tied)")
        self.assertEqual(self.c.evicted, [])
        guard = HandshakeGuard(Clock(), max_pending=4, max_pending_per_source=4)
        c = Connections(guard)
        for host in "aaab":
            c.admit(host)
        self.assertIsNone(c.refusal("b"), "1 + 1 < 3: b takes one of a's")
        self.assertEqual((guard.held("a"), guard.held("b")), (2, 2))
        self.assertEqual(c.refusal("a"), "global_cap", "equal shares: no churn between equals")
        self.assertEqual(c.refusal("b"), "global_cap")
        self.assertEqual(guard.refused["global_cap"], 2)

    def test_a_source_holding_nothing_always_gets_a_slot(self):
        guard = HandshakeGuard(Clock(), max_pending=3)
        c = Connections(guard)
        first = [c.admit(host) for host in "abc"]
        c.admit("d")
        c.admit("e")
        self.assertEqual(c.evicted, first[:2], "oldest first among sources holding one")

    def test_release_frees_a_slot(self):
        tickets = [self.c.admit(host) for host in "aabc"]
        self.guard.release(tickets[0])
        self.guard.release(tickets[0])  # twice: once counted
        self.assertEqual(self.guard.pending, 3)
        self.assertIsNone(self.c.refusal("a"))
        self.assertEqual(self.c.evicted, [])

    def test_flood_from_eight_sources_never_evicts_a_light_source(self):
        """The issue's attack at full scale: 8 addresses x 140 silent
        sockets against a 1,024 cap, re-opened when dropped, while a client
        keeps one or two handshakes pending."""
        guard = HandshakeGuard(Clock())
        c = Connections(guard)
        attackers = [f"198.51.100.{i}" for i in range(8)]
        for _ in range(140):
            for host in attackers:
                c.refusal(host)
        self.assertEqual(guard.pending, 1024)
        self.assertEqual(sorted(guard.held(h) for h in attackers), [128] * 8)

        def reopen():  # the attackers re-open whatever was dropped, until refused
            for host in attackers:
                while c.refusal(host) is None:
                    pass

        for _ in range(500):
            mine = [c.admit("203.0.113.5"), c.admit("203.0.113.5")]
            reopen()
            self.assertFalse(set(mine) & set(c.evicted))
            for ticket in mine:
                guard.release(ticket)
            reopen()
            self.assertEqual(guard.pending, 1024)
            shares = [guard.held(h) for h in attackers]
            self.assertLessEqual(max(shares) - min(shares), 1, "the flooders' shares level out")
        self.assertGreaterEqual(guard.evictions, 1000)
        self.assertEqual(guard.top_source_pending, 128)

    def test_ipv6_counted_per_64(self):
        guard = HandshakeGuard(Clock(), max_pending_per_source=2)
        c = Connections(guard)
        self.assertIsNone(c.refusal("2001:db8:0:1::1"))
        self.assertIsNone(c.refusal("2001:db8:0:1::2"))
        self.assertEqual(c.refusal("2001:db8:0:1:ffff::3"), "source_cap", "same /64")
        self.assertIsNone(c.refusal("2001:db8:0:2::1"), "another /64")
        self.assertEqual(source_key("::ffff:10.0.0.1"), "10.0.0.1")

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from("abcdefg"), st.booleans(), st.integers(0, 3)), max_size=120))
    def test_accounting_and_eviction_order(self, steps):
        """Counts never drift; a victim is always the oldest ticket of a
        source holding the most, and never one of a source that, after the
        newcomer's admission, would hold more than the victim's."""
        guard = HandshakeGuard(Clock(), max_pending=6, max_pending_per_source=4)
        c = Connections(guard)
        live = []  # admission order
        for host, close, which in steps:
            before = {h: guard.held(h) for h in "abcdefg"}
            evicted_before = len(c.evicted)
            try:
                ticket = c.admit(host)
            except Refused as e:
                self.assertIn(e.reason, REFUSAL_REASONS)
            else:
                live.append(ticket)
            for victim in c.evicted[evicted_before:]:
                top = max(before.values())
                self.assertEqual(before[victim.source], top)
                self.assertIs(victim, next(t for t in live if t.source == victim.source), "its oldest")
                self.assertTrue(before[host] == 0 or before[host] + 1 < top)
                live.remove(victim)
            if close and live:
                guard.release(live.pop(which % len(live)))
            self.assertEqual(guard.pending, len(live))
            self.assertLessEqual(guard.pending, 6)
            held = {h: sum(1 for t in live if t.source == h) for h in "abcdefg"}
            self.assertEqual({h: guard.held(h) for h in held}, held)
            self.assertEqual(guard.top_source_pending, max(held.values()))


class KeyGuessTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.guard = HandshakeGuard(self.clock, failures=5, window=60, penalty=60, max_tracked_sources=5)
        self.c = Connections(self.guard)

    def attempt(self, host, wrong=True):
        """A control connection that tries a key: True if it was evaluated."""
        ticket = self.c.admit(host)
        try:
            self.guard.may_try_key(host)
        except Refused as e:
            self.guard.release(ticket)
            self.last_refusal = e
            return False
        self.last_ban = self.guard.key_failed(host) if wrong else None
        self.guard.release(ticket)
        return True

    def pool_connection(self, host):
        ticket = self.c.admit(host)
        self.guard.release(ticket)

    def test_five_wrong_keys_ban_control_attempts(self):
        for _ in range(4):
            self.assertTrue(self.attempt("x"))
            self.assertIsNone(self.last_ban)
        self.assertTrue(self.attempt("x"))
        ban = self.last_ban
        self.assertEqual((ban.source, ban.duration, ban.log), ("x", 60, True))
        self.assertIn("5 wrong keys within 60 s", ban.reason)
        self.assertFalse(self.attempt("x", wrong=False), "even the right key waits")
        self.assertEqual(self.last_refusal.reason, "banned")
        self.assertIn("try again in 60 s", self.last_refusal.text)
        self.assertTrue(self.guard.banned("x"))
        self.assertTrue(self.attempt("y"), "others are not punished")
        self.clock.advance(60)
        self.assertFalse(self.guard.banned("x"))
        self.assertTrue(self.attempt("x"))
        self.assertEqual((self.guard.bans, self.guard.refused["banned"]), (1, 1))

    def test_a_banned_source_is_still_admitted(self):
        """Pool connections prove a session with its own key: the ban is on
        key attempts, not on connections."""
        for _ in range(5):
            self.attempt("x")
        for _ in range(20):
            self.pool_connection("x")
        self.assertEqual(self.guard.pending, 0)

    def test_successes_do_not_forgive_failures(self):
        """Rounds of 4 wrong keys, then a real pool connection and a real
        control connection, from the same address, for 5 minutes: at most 5
        wrong keys evaluated in any minute."""
        evaluated = []
        for _ in range(100):
            for _ in range(4):
                if self.attempt("x"):
                    evaluated.append(self.clock.seconds())
            self.pool_connection("x")
            self.attempt("x", wrong=False)
            self.clock.advance(3)
        worst = max(sum(1 for t in evaluated if start <= t < start + 60) for start in evaluated)
        self.assertLessEqual(worst, 5)
        self.assertGreaterEqual(len(evaluated), 15, "the budget comes back each window")

    def test_failures_outside_the_window_do_not_count(self):
        for _ in range(4):
            self.attempt("x")
        self.clock.advance(60)
        self.attempt("x")
        self.assertIsNone(self.last_ban)
        self.assertTrue(self.attempt("x"))

    def test_parallel_evaluations_cannot_overshoot(self):
        """Keys are counted when evaluated: ten connections that all passed
        the HELLO check get five keys evaluated, not ten."""
        tickets = [self.c.admit("x") for _ in range(10)]
        for _ in tickets:
            self.guard.may_try_key("x")  # HELLO: all may go on to CHALLENGE
        evaluated = 0
        for ticket in tickets:  # then their AUTH frames arrive, one by one
            try:
                self.guard.may_try_key("x")
            except Refused:
                continue
            evaluated += 1
            self.guard.key_failed("x")
        self.assertEqual(evaluated, 5)
        self.assertEqual(self.guard.bans, 1)

    def test_stalled_connections_hold_no_budget(self):
        """A neighbour's connections that never send a key (stalled after
        HELLO) do not keep the real client's key out."""
        for _ in range(50):
            self.c.admit("x")
            self.guard.may_try_key("x")
        self.assertTrue(self.attempt("x", wrong=False))

    def test_a_wrong_key_counts_even_if_its_connection_never_ends(self):
        """The failure is recorded at evaluation: evicting the connection or
        never finishing its close loses nothing."""
        guard = HandshakeGuard(Clock(), max_pending=1, failures=2)
        c = Connections(guard)
        c.admit("x")
        guard.key_failed("x")
        c.admit("y")  # evicts x's connection
        self.assertEqual(len(c.evicted), 1)
        self.assertIsNotNone(guard.key_failed("x"), "the first failure was kept: the second bans")

    def test_a_ban_is_logged_once_per_window(self):
        guard = HandshakeGuard(Clock(), failures=1, window=60, penalty=60)
        bans = [guard.key_failed("x"), guard.key_failed("x")]
        self.assertEqual([b.log for b in bans], [True, False])
        self.assertEqual(guard.bans, 2)
        guard.clock.advance(60)
        self.assertTrue(guard.key_failed("x").log, "a window later: logged again")

    def test_failure_tables_are_bounded(self):
        for i in range(50):
            for _ in range(5):
                self.attempt(f"10.0.0.{i}")
        self.assertLessEqual(len(self.guard._failures), 5)
        self.assertLessEqual(len(self.guard._banned_until), 5)
        self.assertLessEqual(len(self.guard._ban_logged), 5)
