"""Tests for tunnelpass.carriers.muxopener: the carrier set a listening side
opens its users' streams on, the users waiting for a carrier, and the
openers over it.  The carriers are real MuxConnection pairs joined in
memory (tests.test_muxconn.Wire)."""

import math

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.carriers import muxconn, muxopener
from tunnelpass.carriers.muxopener import CarrierSet, MuxOpener, SessionOpener
from tunnelpass.carriers.muxstream import MuxStream
from tunnelpass.carriers.stream import IStreamOpener, StreamUnavailable

from tests.test_muxconn import V4, Recorder, Wire

TIMEOUT = 5.0


def results(d):
    """What *d* fired with so far: ``[]`` while it waits."""
    out = []
    d.addBoth(out.append)
    return out


class Carriers:
    """A CarrierSet and the wires behind its connections."""

    def __init__(self, testcase):
        self.clock = Clock()
        self.set = CarrierSet(self.clock, TIMEOUT)
        self.wires = []
        self.testcase = testcase

    def wire(self, name: str, add=True) -> Wire:
        wire = Wire(clock=self.clock)
        wire.a.name = f"carrier {name}"
        self.wires.append(wire)
        if add:
            self.set.add(wire.a)
        return wire

    def load(self, wire: Wire, count: int) -> None:
        for _ in range(count):
            wire.a.open_stream("tcp").attach(Recorder())
        wire.pump()


class PickTests(unittest.TestCase):
    def test_least_loaded(self):
        c = Carriers(self)
        busy, idle, some = c.wire("11111111"), c.wire("22222222"), c.wire("33333333")
        c.load(busy, 3)
        c.load(some, 1)
        self.assertIs(c.set.pick(), idle.a)
        stream = results(c.set.open("tcp", V4))[0]
        self.assertIsInstance(stream, MuxStream)
        self.assertIs(stream.connection, idle.a)
        idle.pump()
        self.assertEqual([(k, a) for k, a, _, _ in idle.acceptor.accepted], [("tcp", V4)])
        # now idle and some carry one each: the first of them in the set
        self.assertIs(c.set.pick(), idle.a)
        c.load(idle, 1)
        self.assertIs(c.set.pick(), some.a)

    def test_skips_retiring_closed_and_full(self):
        c = Carriers(self)
        retiring, closed, busy = c.wire("11111111"), c.wire("22222222"), c.wire("33333333")
        self.patch(muxconn, "MAX_STREAMS", 2)  # the next wire's acceptor side allows two streams
        full = c.wire("44444444")
        c.load(busy, 3)
        c.load(retiring, 1)
        retiring.a.retire()
        closed.a.close()
        closed.pump()
        self.assertTrue(closed.a.closed)
        c.load(full, 2)
        self.assertFalse(full.a.usable)
        self.assertIs(c.set.pick(), busy.a)
        busy.a.retire()
        self.assertIsNone(c.set.pick())

    def test_no_carrier_at_all(self):
        self.assertIsNone(CarrierSet(Clock(), TIMEOUT).pick())


class WaitingTests(unittest.TestCase):
    def test_waiting_users_are_served_in_order_when_a_carrier_comes(self):
        c = Carriers(self)
        opened = [results(c.set.open(kind, ((f"192.0.2.{i}", 1000 + i), ("198.51.100.1", 80))))
                  for i, kind in enumerate(["tcp", "udp", "tcp"])]
        self.assertEqual(opened, [[], [], []])
        self.assertEqual(c.set.waiting, 3)
        wire = c.wire("11111111")
        self.assertEqual(c.set.waiting, 0)
        self.assertEqual([r[0].stream_id for r in opened], [1, 3, 5])
        wire.pump()
        self.assertEqual([(k, a[0][0]) for k, a, _, _ in wire.acceptor.accepted],
                         [("tcp", "192.0.2.0"), ("udp", "192.0.2.1"), ("tcp", "192.0.2.2")])
        self.assertEqual(c.clock.getDelayedCalls(), [], "the waiters' timers are cancelled")

    def test_waiters_spread_over_the_carriers_that_come(self):
        c = Carriers(self)
        opened = [results(c.set.open("tcp", None)) for _ in range(4)]
        first = c.wire("11111111", add=False)
        second = c.wire("22222222", add=False)
        c.set.connections.append(first.a)  # in the set, but nobody told to look yet
        c.set.add(second.a)
        self.assertEqual([r[0].connection.name[-1] for r in opened], ["1", "2", "1", "2"])

    def test_timeout(self):
        c = Carriers(self)
        opened = results(c.set.open("tcp", V4))
        c.clock.advance(TIMEOUT - 0.1)
        self.assertEqual(opened, [])
        c.clock.advance(0.1)
        (failure,) = opened
        self.assertTrue(failure.check(StreamUnavailable))
        self.assertEqual(str(failure.value),
                         "no carrier connection to the far side within 5 s (--pool-timeout)")
        self.assertEqual(c.set.waiting, 0)
        c.wire("11111111")
        self.assertEqual(c.wires[0].a.opened, 0, "a user that gave up gets no stream later")

    def test_cancel_while_waiting(self):
        c = Carriers(self)
        d = c.set.open("tcp", V4)
        kept = results(c.set.open("udp", V4))
        opened = results(d)
        d.cancel()
        self.assertTrue(opened[0].check(CancelledError))
        self.assertEqual(c.set.waiting, 1)
        self.assertEqual(len(c.clock.getDelayedCalls()), 1)
        wire = c.wire("11111111")
        self.assertEqual(kept[0].stream_id, 1)
        self.assertEqual(wire.a.opened, 1)

    def test_max_waiting(self):
        self.patch(muxopener, "MAX_WAITING", 3)
        c = Carriers(self)
        waiting = [results(c.set.open("tcp", None)) for _ in range(3)]
        refused = results(c.set.open("tcp", None))
        self.assertTrue(refused[0].check(StreamUnavailable))
        self.assertEqual(str(refused[0].value), "3 users already wait for a carrier connection")
        self.assertEqual(waiting, [[], [], []])
        self.assertEqual(c.set.waiting, 3)

    def test_fail_waiters(self):
        c = Carriers(self)
        waiting = [results(c.set.open("tcp", None)) for _ in range(2)]
        c.set.fail_waiters("the tunnel is stopping")
        for (failure,) in waiting:
            self.assertTrue(failure.check(StreamUnavailable))
            self.assertEqual(str(failure.value), "the tunnel is stopping")
        self.assertEqual((c.set.waiting, c.clock.getDelayedCalls()), (0, []))


class AccountingTests(unittest.TestCase):
    def samples(self, carrier_set):
        return {(s.name, s.labels.get("carrier")): s.value for s in carrier_set.samples()}

    def test_lost_moves_the_counters_to_the_totals(self):
        """On the side that accepts streams (the send flow's server), where
        refusals are counted."""
        clock = Clock()
        accepting = CarrierSet(clock, TIMEOUT)
        gone, live = Wire(clock=clock, accept=False), Wire(clock=clock)
        gone.b.name, live.b.name = "carrier 11111111", "carrier 22222222"
        accepting.add(gone.b)
        accepting.add(live.b)
        for wire, count in ((gone, 3), (live, 2)):
            for _ in range(count):
                wire.a.open_stream("tcp").attach(Recorder())
            wire.pump()
        self.assertEqual((gone.b.opened, gone.b.refused, live.b.opened, live.b.refused), (3, 3, 2, 0))
        self.assertEqual(self.samples(accepting)[("streams_refused_all", None)], 3)
        gone.a.close()
        gone.pump()
        accepting.lost(gone.b)
        self.assertEqual(len(accepting), 1)
        self.assertEqual((accepting.ended, accepting.ended_opened, accepting.ended_refused), (1, 3, 3))
        samples = self.samples(accepting)
        self.assertEqual(samples[("carriers", None)], 1)
        self.assertEqual(samples[("carriers_ended", None)], 1)
        self.assertEqual(samples[("streams_opened_all", None)], 5)
        self.assertEqual(samples[("streams_refused_all", None)], 3)
        self.assertNotIn(("streams_active", "11111111"), samples)
        self.assertEqual(samples[("streams_active", "22222222")], 2)

    def test_samples(self):
        c = Carriers(self)
        wire = c.wire("abcdef01")
        c.load(wire, 2)
        samples = self.samples(c.set)
        self.assertEqual(samples[("carriers", None)], 1)
        self.assertEqual(samples[("streams_waiting", None)], 0)
        self.assertEqual(samples[("streams_active", "abcdef01")], 2)
        self.assertEqual(samples[("streams_opened", "abcdef01")], 2)
        self.assertEqual(samples[("streams_refused", "abcdef01")], 0)
        self.assertTrue(math.isnan(samples[("carrier_rtt_seconds", "abcdef01")]))
        wire.a.rtt = 0.004
        self.assertEqual(self.samples(c.set)[("carrier_rtt_seconds", "abcdef01")], 0.004)
        c.set.connections.clear()
        results(c.set.open("tcp", None))
        self.assertEqual(self.samples(c.set)[("streams_waiting", None)], 1)
        kinds = {s.name: s.kind for s in CarrierSet(Clock(), 1).samples()}
        self.assertEqual(kinds, {"carriers": "gauge", "carriers_ended": "counter", "streams_waiting": "gauge",
                                 "streams_opened_all": "counter", "streams_refused_all": "counter"})

    def test_a_closed_carrier_not_yet_lost_is_not_counted_live(self):
        c = Carriers(self)
        wire = c.wire("11111111")
        wire.a.close()
        wire.pump()
        self.assertEqual(self.samples(c.set)[("carriers", None)], 0)

    def test_retire_all(self):
        c = Carriers(self)
        empty, busy = c.wire("11111111"), c.wire("22222222")
        c.load(busy, 1)
        c.set.retire_all()
        empty.pump()
        busy.pump()
        self.assertEqual(len(c.set), 0)
        self.assertTrue(empty.a.closed)
        self.assertTrue(busy.a.retiring)
        self.assertFalse(busy.a.closed)

    def test_counters_never_go_back_when_a_session_ends(self):
        """Carriers retired with streams still on them stay in the metrics
        until they end (a Prometheus counter that drops reads as a reset)."""
        c = Carriers(self)
        busy = c.wire("11111111")
        c.load(busy, 2)
        before = self.samples(c.set)
        c.set.retire_all()
        after = self.samples(c.set)
        self.assertEqual(after[("streams_opened_all", None)], before[("streams_opened_all", None)])
        self.assertEqual(after[("streams_active", "11111111")], 2)
        self.assertEqual(len(c.set), 0, "no new stream goes to a retired carrier")
        for stream in list(busy.a.streams.values()):
            stream.abortConnection()
        busy.pump()
        self.assertTrue(busy.a.closed)
        c.set.lost(busy.a)  # what on_lost does
        final = self.samples(c.set)
        self.assertEqual(final[("streams_opened_all", None)], 2)
        self.assertEqual((final[("carriers", None)], final[("carriers_ended", None)]), (0, 1))
        self.assertEqual(c.set.retired, [])

    def test_count_for(self):
        c = Carriers(self)
        one, two, other = c.wire("11111111"), c.wire("22222222"), c.wire("33333333")
        session, other_session = object(), object()
        one.a.session = two.a.session = session
        other.a.session = other_session
        self.assertEqual((c.set.count_for(session), c.set.count_for(other_session), c.set.count_for(None)),
                         (2, 1, 0))


class OpenerTests(unittest.TestCase):
    def test_mux_opener(self):
        c = Carriers(self)
        wire = c.wire("11111111")
        seen = []
        opener = MuxOpener(lambda: c.set, on_open=seen.append)
        self.assertTrue(IStreamOpener.providedBy(opener))
        (stream,) = results(opener.open("udp", V4))
        self.assertEqual(seen, [stream])
        wire.pump()
        self.assertEqual([(k, a) for k, a, _, _ in wire.acceptor.accepted], [("udp", V4)])

    def test_mux_opener_without_a_session(self):
        opener = MuxOpener(lambda: None, unavailable="no session with the client")
        (failure,) = results(opener.open("tcp", V4))
        self.assertTrue(failure.check(StreamUnavailable))
        self.assertEqual(str(failure.value), "no session with the client")
        self.assertRaises(ValueError, opener.open, "sctp", None)

    def test_mux_opener_on_open_runs_for_a_waiter_too(self):
        c = Carriers(self)
        seen = []
        opened = results(MuxOpener(lambda: c.set, on_open=seen.append).open("tcp"))
        self.assertEqual(seen, [])
        c.wire("11111111")
        self.assertEqual(seen, opened)

    def test_session_opener_follows_the_current_choice(self):
        first, second = Carriers(self), Carriers(self)
        first.wire("11111111")
        second.wire("22222222")
        current = [MuxOpener(lambda: first.set)]
        opener = SessionOpener(lambda: current[0])
        self.assertTrue(IStreamOpener.providedBy(opener))
        (a,) = results(opener.open("tcp", V4))
        current[0] = MuxOpener(lambda: second.set)
        (b,) = results(opener.open("tcp"))
        self.assertEqual((a.connection.name, b.connection.name), ("carrier 11111111", "carrier 22222222"))
