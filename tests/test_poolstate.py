"""tunnelpass.carriers.poolstate: the pool connection's life on each side, and the
protocols that feed it (clientpool.PoolConnection, gate.TunnelConnection)."""

from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tunnelpass.tunnel import clientpool
from tunnelpass.tunnel.clientpool import PoolConnection, PoolKeeping, _PoolConnectionFactory
from tunnelpass.wire.codec import encode, encode_open, Type
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.carriers.poolstate import (AUTHENTICATING, CLAIMED, CLOSED, CONTROL, DIALLING, HEADER, IDLE,
                                  ClientPoolLife, InvalidTransition, PendingCount, ServerPoolLife)
from tunnelpass.carriers.stream import TCP

ID = b"p" * 16
POOL_OK = encode(Type.POOL_OK)


class MachineTests(unittest.TestCase):
    def test_client_every_transition(self):
        changes = []
        life = ClientPoolLife(lambda old, new: changes.append((old, new)))
        for event in ("auth_sent", "pool_ok", "claimed", "lost"):
            life.fire(event)
        self.assertEqual(changes, [(None, DIALLING), (DIALLING, AUTHENTICATING), (AUTHENTICATING, IDLE),
                                   (IDLE, CLAIMED), (CLAIMED, CLOSED)])

    def test_server_every_transition(self):
        life = ServerPoolLife()
        self.assertEqual([life.fire(e) for e in ("filed", "claimed", "lost")], [IDLE, CLAIMED, CLOSED])
        life = ServerPoolLife()
        self.assertEqual(life.fire("hello"), CONTROL)
        self.assertEqual(life.state, CONTROL)

    def test_lost_from_every_state_and_only_once(self):
        paths = {DIALLING: [], AUTHENTICATING: ["auth_sent"], IDLE: ["auth_sent", "pool_ok"],
                 CLAIMED: ["auth_sent", "pool_ok", "claimed"]}
        for state, events in paths.items():
            changes = []
            life = ClientPoolLife(lambda old, new: changes.append(new))
            for event in events:
                life.fire(event)
            self.assertEqual(life.state, state)
            life.fire("lost")
            life.fire("lost")
            self.assertEqual(changes.count(CLOSED), 1, state)
        for events in ([], ["hello"], ["filed"], ["filed", "claimed"]):
            life = ServerPoolLife()
            for event in events:
                life.fire(event)
            self.assertEqual(life.fire("lost"), CLOSED)

    def test_wrong_state_raises(self):
        life = ClientPoolLife()
        for event in ("pool_ok", "claimed", "filed"):
            self.assertRaises(InvalidTransition, life.fire, event)
            self.assertFalse(life.can(event))
        life.fire("lost")
        self.assertRaises(InvalidTransition, life.fire, "auth_sent")
        server = ServerPoolLife()
        self.assertRaises(InvalidTransition, server.fire, "claimed")
        server.fire("hello")
        self.assertRaises(InvalidTransition, server.fire, "filed")

    def test_pending_count(self):
        pending = PendingCount()
        a, b = ClientPoolLife(pending), ClientPoolLife(pending)
        self.assertEqual(pending.count, 2)
        a.fire("auth_sent")
        self.assertEqual(pending.count, 2)
        a.fire("pool_ok")
        b.fire("lost")
        self.assertEqual(pending.count, 0)
        a.fire("claimed")
        a.fire("lost")
        self.assertEqual(pending.count, 0)


class Acceptor:
    def __init__(self, accept=True):
        self.accept, self.accepted = accept, []

    def stream_accepted(self, kind, addresses, stream, data):
        self.accepted.append((kind, addresses, stream, data))
        if not self.accept:
            stream.abortConnection()
        return self.accept


class Client(PoolKeeping):
    """The pool part of a TunnelClient, with the rest faked."""

    log = Logger()
    policy = None

    def __init__(self, flow="receive"):
        self.session = object()
        self.flow = flow
        self.pool = IdlePool(Clock(), 8, lambda n: None)
        self.pool_pending = PendingCount()
        self.retiring = set()
        self.acceptor = Acceptor()
        self.used = 0

    def policy_used(self):
        self.used += 1


class ClientPoolConnectionTests(unittest.TestCase):
    """Each state of a client pool connection, and the connection lost in each."""

    def setUp(self):
        self.patch(clientpool, "pool_auth_frame", lambda session, counter, conn_id, fp: b"AUTH")
        self.client = Client()

    def dial(self):
        factory = _PoolConnectionFactory(self.client, self.client.session, 1, ID)
        return factory

    def connect(self, factory=None):
        factory = factory or self.dial()
        connection = factory.buildProtocol(None)
        transport = RelayTransport()
        connection.makeConnection(transport)
        return connection, transport

    def filed(self):
        connection, transport = self.connect()
        connection.dataReceived(POOL_OK)
        return connection, transport

    def test_dial_failure_is_no_longer_dialling(self):
        factory = self.dial()
        self.assertEqual(self.client.dialing, 1)
        self.client.descriptors = None
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual((self.client.dialing, factory.life.state), (0, CLOSED))

    def test_connected_sends_pool_auth_and_waits(self):
        connection, transport = self.connect()
        self.assertEqual(transport.value(), b"AUTH")
        self.assertEqual((connection.life.state, self.client.dialing), (AUTHENTICATING, 1))

    def test_lost_while_authenticating(self):
        connection, _ = self.connect()
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((connection.life.state, self.client.dialing), (CLOSED, 0))

    def test_pool_ok_files_it(self):
        connection, _ = self.filed()
        self.assertEqual((connection.life.state, self.client.dialing), (IDLE, 0))
        self.assertIs(self.client.pool.idle[ID], connection)

    def test_pool_ok_in_pieces(self):
        connection, _ = self.connect()
        connection.dataReceived(POOL_OK[:2])
        self.assertEqual(connection.life.state, AUTHENTICATING)
        connection.dataReceived(POOL_OK[2:])
        self.assertEqual(connection.life.state, IDLE)

    def test_anything_but_pool_ok_aborts(self):
        connection, transport = self.connect()
        connection.dataReceived(b"\xff" * len(POOL_OK))
        self.assertTrue(transport.disconnected)
        self.assertNotIn(ID, self.client.pool.idle)

    def test_lost_while_idle_leaves_the_pool(self):
        connection, _ = self.filed()
        self.client.retiring.add(ID)
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(connection.life.state, CLOSED)
        self.assertEqual((self.client.pool.idle, self.client.retiring), ({}, set()))

    def test_filed_for_a_session_that_ended_is_closed(self):
        connection, transport = self.connect()
        self.client.session = object()
        connection.dataReceived(POOL_OK)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.pool.idle, {})

    def test_receive_flow_open_claims_it_and_dispatches(self):
        connection, transport = self.filed()
        self.client.retiring.add(ID)
        addresses = (("198.51.100.7", 4321), ("127.0.0.1", 8080))
        connection.dataReceived(encode_open(ID, *addresses) + b"user bytes")
        ((kind, got_addresses, stream, data),) = self.client.acceptor.accepted
        self.assertEqual((kind, got_addresses, data), (TCP, addresses, b"user bytes"))
        self.assertIs(stream, transport)
        self.assertEqual((connection.life.state, self.client.used, self.client.retiring), (CLAIMED, 1, set()))
        self.assertEqual(self.client.pool.idle, {})
        self.assertIsNone(connection.claim(), "claimed once")
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(connection.life.state, CLOSED)

    def test_refused_stream_does_not_refill(self):
        self.client.acceptor = Acceptor(accept=False)
        connection, transport = self.filed()
        connection.dataReceived(encode_open(ID))
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.client.used, 0)

    def test_open_for_another_connection_aborts_it(self):
        connection, transport = self.filed()
        connection.dataReceived(encode_open(b"q" * 16))
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.client.acceptor.accepted, [])

    def test_open_in_the_send_flow_aborts_it(self):
        self.client.flow = "send"
        connection, transport = self.filed()
        connection.dataReceived(encode_open(ID))
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.client.acceptor.accepted, [])

    def test_send_flow_claim(self):
        connection, transport = self.filed()
        self.assertIs(connection.claim(), transport)
        self.assertEqual(connection.life.state, CLAIMED)

    def test_closed_while_idle_cannot_be_claimed(self):
        connection, transport = self.filed()
        transport.connected = False
        self.assertIsNone(connection.claim())
        self.assertEqual(connection.life.state, IDLE)


class ServerTunnelConnectionTests(unittest.TestCase):
    """The server side's machine, driven through the gate."""

    def setUp(self):
        from tests.test_server import authenticate, connect, make_server

        self.server = make_server()
        self.session, _, _ = authenticate(self.server)
        self.connect = lambda: connect(self.server)

    def pool_connection(self):
        from tunnelpass.wire.handshake import pool_auth_frame

        gate, transport = self.connect()
        gate.dataReceived(pool_auth_frame(self.session, 1, ID, b""))
        return gate, gate.delegate, transport

    def test_header_lost(self):
        gate, transport = self.connect()
        gate.dataReceived(b"\x00")  # a part of a frame
        inner = gate.delegate
        self.assertEqual(inner.life.state, HEADER)
        gate.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(inner.life.state, CLOSED)

    def test_filed_then_lost_while_idle(self):
        gate, inner, transport = self.pool_connection()
        self.assertEqual(inner.life.state, IDLE)
        self.assertIs(self.server.session.pool.idle[ID], inner)
        gate.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(inner.life.state, CLOSED)
        self.assertEqual(self.server.session.pool.idle, {})

    def test_claimed_by_a_user(self):
        gate, inner, transport = self.pool_connection()
        _, member = self.successResultOf(self.server.session.pool.take())
        self.assertIs(member.claim(), transport)
        self.assertEqual(inner.life.state, CLAIMED)
        self.assertIsNone(member.claim())

    def test_bytes_on_an_idle_connection_in_the_receive_flow_drop_it(self):
        self.server.flow = "receive"
        gate, inner, transport = self.pool_connection()
        gate.dataReceived(encode_open(ID))
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.server.session.pool.idle, {})

    def test_hello_is_control(self):
        gate, transport = self.connect()
        from tunnelpass.wire.handshake import ClientHandshake

        gate.dataReceived(ClientHandshake(b"k" * 32, b"").start())
        self.assertEqual(gate.delegate.life.state, CONTROL)
        self.assertIsNone(gate.delegate.claim(), "a control channel is never a pool member")
