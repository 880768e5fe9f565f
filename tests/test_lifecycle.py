"""tunnelpass.tunnel.lifecycle: every transition of the client session and the
server gate machines, and the gate wiring (one guard release per gate)."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.carriers.poolstate import InvalidTransition
from tunnelpass.tunnel.lifecycle import GateLife, SessionLife


class SessionLifeTests(unittest.TestCase):
    def walk(self, *events):
        life = SessionLife(Clock())
        for event in events:
            life.fire(event)
        return life.state

    def test_each_transition(self):
        self.assertEqual(self.walk(), "idle")
        self.assertEqual(self.walk("connect"), "connecting")
        self.assertEqual(self.walk("connect", "fail"), "lost")
        self.assertEqual(self.walk("connect", "connected"), "handshaking")
        self.assertEqual(self.walk("connect", "connected", "fail"), "lost")
        self.assertEqual(self.walk("connect", "connected", "establish"), "up")
        self.assertEqual(self.walk("connect", "connected", "establish", "replaced"), "replaced")
        self.assertEqual(self.walk("connect", "connected", "establish", "lose"), "lost")
        self.assertEqual(self.walk("connect", "connected", "establish", "replaced", "back_off"), "backing_off")
        self.assertEqual(self.walk("connect", "fail", "back_off", "connect"), "connecting")
        for prefix in ((), ("connect",), ("connect", "connected"), ("connect", "connected", "establish")):
            self.assertEqual(self.walk(*prefix, "stop"), "stopped")

    def test_disallowed_events_raise(self):
        life = SessionLife(Clock())
        for event in ("establish", "lose", "back_off", "connected"):
            self.assertRaises(InvalidTransition, life.fire, event)
        self.assertEqual(life.state, "idle")
        life.fire("stop")
        self.assertRaises(InvalidTransition, life.fire, "connect")

    def test_since_follows_the_injected_clock(self):
        clock = Clock()
        life = SessionLife(clock)
        clock.advance(5)
        life.fire("connect")
        self.assertEqual(life.since, 5)
        self.assertFalse(life.up)


class GateLifeTests(unittest.TestCase):
    def walk(self, *events):
        life = GateLife(Clock())
        for event in events:
            life.fire(event)
        return life

    def test_each_transition(self):
        self.assertEqual(self.walk("deny").state, "not_admitted")
        self.assertEqual(self.walk("admit").state, "admitted")
        self.assertEqual(self.walk("admit", "header").state, "handshaking")
        for before in (("admit",), ("admit", "header")):
            self.assertEqual(self.walk(*before, "pass").state, "passed")
            self.assertEqual(self.walk(*before, "refuse").state, "refused")
            self.assertEqual(self.walk(*before, "expire").state, "timed_out")
            self.assertEqual(self.walk(*before, "evict").state, "evicted")
            self.assertEqual(self.walk(*before, "lose").state, "closed")
        self.assertEqual(self.walk("admit", "header", "turn_away").state, "turned_away")
        self.assertEqual(self.walk("admit", "header", "turn_away", "lose").state, "closed")
        self.assertEqual(self.walk("admit", "header", "turn_away", "expire").state, "timed_out")

    def test_open_states_hold_the_slot_and_a_final_state_is_final(self):
        self.assertTrue(self.walk("admit").open)
        self.assertTrue(self.walk("admit", "header", "turn_away").open)
        for final in ("pass", "refuse", "expire", "evict", "lose"):
            life = self.walk("admit", final)
            self.assertFalse(life.open)
            for event in ("pass", "refuse", "expire", "evict", "lose", "header"):
                self.assertFalse(life.can(event), (final, event))
        self.assertFalse(self.walk("deny").can("header"))


class ClientSessionWiringTests(unittest.TestCase):
    """A real TunnelClient against a real TunnelServer in memory
    (tests.memtunnel): the session machine follows what happens."""

    def test_up_then_lost_then_backing_off(self):
        from tests.memtunnel import tunnel

        net, server, client = tunnel(self, client_overrides=dict(min_pool=1))
        self.assertEqual(client.life.state, "up")
        states = []
        fire = client.life.fire
        self.patch(client.life, "fire", lambda event: states.append(fire(event)))
        client.control.transport.abortConnection()
        net.settle()
        self.assertIsNone(client.session, "the client saw the loss")
        self.assertEqual(states[:2], ["lost", "backing_off"])
        net.advance(40)  # past any backoff: a new session comes up
        self.assertEqual(client.life.state, "up")
        self.assertIsNotNone(client.session)
