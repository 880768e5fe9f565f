"""Tests for tunnelpass.tunnel.tlslevel: what an unauthenticated peer may (not) change."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.tunnel.tlslevel import LEVELS, TLSLevel


def attempt_until_session(levels: TLSLevel, real: int, forged_by_level: dict, attempts: int = 10) -> list:
    """Drive *levels* against a server at level *real* behind an attacker that
    answers every attempt at a level in *forged_by_level* with "TLS required
    (level N)"; returns the levels tried, up to the first session."""
    tried = []
    for _ in range(attempts):
        level = levels.current
        tried.append(level)
        if level in forged_by_level:
            levels.failed()
            levels.hint(forged_by_level[level])
            continue
        if level == real:
            levels.succeeded(level)
            return tried
        levels.failed()
        if level == 0:  # the real server's own answer to a plain HELLO
            levels.hint(real)
    return tried


class LearningTests(unittest.TestCase):
    def test_learns_from_the_servers_answer(self):
        levels = TLSLevel()
        self.assertEqual(attempt_until_session(levels, real=1, forged_by_level={}), [0, 1])
        self.assertEqual(levels.current, 1, "the next reconnect starts at the settled level")

    def test_forged_answer_in_clear_does_not_lock_out(self):
        """The issue's attack: ERROR(7) answers the plain HELLO; today the
        client stayed at level 2 for good and never reached a tls=1 server."""
        levels = TLSLevel()
        tried = attempt_until_session(levels, real=1, forged_by_level={0: 2})
        self.assertEqual(tried[-1], 1, tried)
        self.assertLessEqual(len(tried), 3)

    def test_forged_answer_inside_tls_does_not_lock_out(self):
        """On a reconnect an attacker terminates TLS (a pinless client accepts
        any certificate) and sends ERROR(7) inside; the client settled at 1."""
        levels = TLSLevel()
        levels.succeeded(1)
        tried = attempt_until_session(levels, real=1, forged_by_level={1: 2}, attempts=3)
        self.assertNotEqual(tried[-1], 1, "the attacker holds level 1 in this run")
        # The attacker goes away: the loop reaches the real server.
        self.assertEqual(attempt_until_session(levels, real=1, forged_by_level={})[-1], 1)

    def test_a_hint_lasts_one_attempt(self):
        levels = TLSLevel()
        levels.failed()
        self.assertTrue(levels.hint(2))
        self.assertEqual(levels.current, 2)
        levels.failed()
        self.assertEqual(levels.current, 1, "back to the rotation, which had moved on from 0")

    def test_server_reconfigured_is_followed(self):
        levels = TLSLevel()
        levels.succeeded(2)
        self.assertEqual(attempt_until_session(levels, real=0, forged_by_level={})[-1], 0)

    def test_failures_without_answers_rotate_through_every_level(self):
        levels = TLSLevel()
        seen = set()
        for _ in range(3):
            seen.add(levels.current)
            levels.failed()
        self.assertEqual(seen, set(LEVELS))

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 2), st.lists(st.tuples(st.sampled_from(["fail", "hint"]), st.sampled_from(LEVELS)),
                                       max_size=20))
    def test_after_any_history_of_forgeries_the_loop_reaches_the_server(self, real, history):
        """Whatever unauthenticated peers said before, once they stop the
        client reaches the real server within a forged hint's one attempt
        plus one turn through the levels."""
        levels = TLSLevel()
        for action, level in history:
            if action == "fail":
                levels.failed()
            else:
                levels.hint(level)
        tried = attempt_until_session(levels, real, {}, attempts=5)
        self.assertEqual(tried[-1], real, tried)
        self.assertLessEqual(len(tried), 4, tried)


class KnownLevelTests(unittest.TestCase):
    def test_never_changes(self):
        for known in LEVELS:
            levels = TLSLevel(known)
            for forged in LEVELS:
                self.assertFalse(levels.hint(forged))
                levels.failed()
                self.assertEqual(levels.current, known)
            levels.succeeded((known + 1) % 3)
            self.assertEqual(levels.current, known)

    def test_bad_level(self):
        self.assertRaises(ValueError, TLSLevel, 3)
