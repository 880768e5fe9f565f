# -*- test-case-name: tests.test_master_workerwire -*-
"""The master <-> worker JSON-lines wire, fed hostile input."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunnelpass.master.workerwire import (
    MAX_LINE,
    CommandDecoder,
    EventDecoder,
    LineBudget,
    LineReader,
    WireError,
    decode_command,
    decode_event,
    encode,
)

STATS = {"ev": "stats", "id": "0123abcd", "tcps": 1, "udps": 2, "pool": 3, "ping": 1.5, "tcprx": 10,
         "tcptx": 20, "udprx": 30, "udptx": 40}
GOOD_EVENTS = [
    {"ev": "hello", "pid": 1234},
    {"ev": "status", "id": "0123abcd", "status": "running", "error": ""},
    {"ev": "status", "id": "0123abcd", "status": "error", "error": "--tunnel: cannot listen"},
    STATS,
    {"ev": "log", "id": "0123abcd", "level": "warn", "text": "héllo \x1b line", "time": 1764500000.25},
]
GOOD_COMMANDS = [
    {"op": "start", "id": "0123abcd", "url": "server://k@127.0.0.1:1/127.0.0.1:2", "dir": "/s/i/0123abcd",
     "log": "info"},
    {"op": "stop", "id": "0123abcd", "timeout": 5},
]


class RoundTrip(SynchronousTestCase):
    def test_events_and_commands_round_trip(self):
        for event in GOOD_EVENTS:
            self.assertEqual(decode_event(encode(event).rstrip(b"\n")), event)
        for command in GOOD_COMMANDS:
            self.assertEqual(decode_command(encode(command).rstrip(b"\n")), command)

    def test_status_error_defaults_to_empty(self):
        self.assertEqual(decode_event(b'{"ev":"status","id":"a","status":"stopped"}')["error"], "")

    def test_encode_refuses_oversized(self):
        with self.assertRaises(WireError):
            encode({"ev": "log", "text": "x" * MAX_LINE})

    def test_one_line_per_message(self):
        line = encode({"ev": "log", "id": "a", "level": "info", "text": "two\nlines", "time": 1})
        self.assertEqual(line.count(b"\n"), 1)

    @settings(max_examples=60, deadline=None)
    @given(st.text(max_size=300), st.integers(0, 10 ** 11))
    def test_any_text_round_trips(self, text, count):
        event = {"ev": "log", "id": "x", "level": "debug", "text": text, "time": count}
        self.assertEqual(decode_event(encode(event).rstrip(b"\n")), event)


class Hostile(SynchronousTestCase):
    def refused(self, line: bytes, decode=decode_event) -> str:
        with self.assertRaises(WireError) as caught:
            decode(line)
        return str(caught.exception)

    def test_not_json(self):
        for line in (b"", b"{", b"\xff\xfe", b"{'ev': 'hello'}", b'{"ev":"hello","pid":NaN}',
                     b'{"ev":"stats","ping":Infinity}', b"[" * 60000):
            self.assertIn("not JSON", self.refused(line))

    def test_not_an_object(self):
        for line in (b"[]", b"1", b'"hello"', b"null", b"true"):
            self.assertIn("not a JSON object", self.refused(line))

    def test_unknown_kind(self):
        self.assertIn("unknown ev", self.refused(b'{"ev":"reboot"}'))
        self.assertIn("unknown ev", self.refused(b'{"op":"start"}'))
        self.assertIn("unknown ev", self.refused(b'{"ev":1}'))
        self.assertIn("unknown op", self.refused(b'{"op":"exec","cmd":"sh"}', decode_command))
        self.assertIn("unknown op", self.refused(b'{"ev":"hello","pid":1}', decode_command))

    def test_missing_and_extra_fields(self):
        for name in STATS:
            if name != "ev":
                partial = {k: v for k, v in STATS.items() if k != name}
                self.assertIn(f"missing field {name}", self.refused(json.dumps(partial).encode()))
        self.assertIn("unknown field", self.refused(json.dumps({**STATS, "extra": 1}).encode()))
        self.assertIn("missing field url",
                      self.refused(b'{"op":"start","id":"a","dir":"/d","log":"info"}', decode_command))

    def test_wrong_types(self):
        bad = [("tcps", -1), ("tcps", True), ("tcps", 1.5), ("tcps", "1"), ("tcps", 2 ** 64), ("ping", "1"),
               ("ping", -0.5), ("ping", 1e300), ("ping", None), ("id", ""), ("id", 7), ("id", "x" * 65),
               ("id", "a\nb")]
        for name, value in bad:
            self.assertIn(f"bad {name}", self.refused(json.dumps({**STATS, name: value}).encode()),
                          (name, value))
        self.assertIn("bad status", self.refused(b'{"ev":"status","id":"a","status":"dead"}'))
        self.assertIn("bad level", self.refused(b'{"ev":"log","id":"a","level":"loud","text":"","time":1}'))
        self.assertIn("bad timeout", self.refused(b'{"op":"stop","id":"a","timeout":"5"}', decode_command))
        self.assertIn("bad log", self.refused(
            b'{"op":"start","id":"a","url":"u","dir":"/d","log":"verbose"}', decode_command))

    def test_oversized_line(self):
        self.assertIn("longer", self.refused(b" " * MAX_LINE + b"{}"))

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=200))
    def test_random_bytes_never_crash(self, line):
        for decode in (decode_event, decode_command):
            try:
                decode(line)
            except WireError:
                pass


class Streams(SynchronousTestCase):
    def test_split_across_reads(self):
        data = b"".join(encode(e) for e in GOOD_EVENTS)
        decoder = EventDecoder()
        got = []
        for i in range(len(data)):
            got += decoder.feed(data[i:i + 1])
        self.assertEqual(got, GOOD_EVENTS)
        self.assertEqual(decoder.reader.pending, 0)

    def test_many_lines_in_one_read(self):
        data = b"".join(encode(dict(STATS, tcps=n)) for n in range(500))
        self.assertEqual([e["tcps"] for e in EventDecoder().feed(data)], list(range(500)))

    def test_oversized_line_refused_before_its_newline(self):
        """The buffer stays bounded: a line past the limit fails as soon as
        it is, not when (or if) its newline comes."""
        reader = LineReader()
        reader.feed(b"x" * (MAX_LINE - 10))
        with self.assertRaises(WireError):
            reader.feed(b"x" * 20)

    def test_oversized_complete_line_in_one_read(self):
        with self.assertRaises(WireError):
            LineReader().feed(b"{}\n" + b"x" * MAX_LINE + b"\n{}\n")

    def test_a_line_exactly_at_the_limit_passes(self):
        self.assertEqual(LineReader().feed(b"x" * (MAX_LINE - 1) + b"\n"), [b"x" * (MAX_LINE - 1)])

    def test_bad_line_in_the_middle(self):
        data = encode(GOOD_EVENTS[0]) + b"garbage\n" + encode(GOOD_EVENTS[1])
        with self.assertRaises(WireError):
            EventDecoder().feed(data)

    def test_command_decoder(self):
        data = b"".join(encode(c) for c in GOOD_COMMANDS)
        self.assertEqual(CommandDecoder().feed(data), GOOD_COMMANDS)


class Budget(SynchronousTestCase):
    def test_rate_and_count_of_dropped(self):
        clock = Clock()
        budget = LineBudget(clock, rate=3)
        self.assertEqual([budget.take() for _ in range(5)], [True, True, True, False, False])
        self.assertEqual(budget.dropped, 2)
        clock.advance(1)
        self.assertTrue(budget.take())
        self.assertEqual(budget.take_dropped(), 2)
        self.assertEqual(budget.take_dropped(), 0)
