"""The descriptor budget where connections are dialled and pools are sized:
a target dial that gets EMFILE refuses its user (not a connect failure,
not a failed target); the client dials no more pool connections than the
budget allows; the server's idle pool is bounded by the open-files limit."""

import errno

from twisted.internet.error import ConnectBindError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import RelayTransport
from tests.test_server import KEY, authenticate
from tunnelpass.tunnel import tunnelend
from tunnelpass.tunnel.client import ClientSettings, TunnelClient
from tunnelpass.ops.fdbudget import Descriptors
from tunnelpass.carriers.pool import IdlePool
from tunnelpass.tunnel.poolpolicy import PoolPolicy
from tunnelpass.relay.relay import TCPForwardFactory
from tunnelpass.config.limits import Limits
from tunnelpass.tunnel.server import ServerSettings, TunnelServer


def emfile():
    return Failure(ConnectBindError(errno.EMFILE, "Too many open files"))


class DialTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = TCPForwardFactory(self.reactor, "target", "127.0.0.1", 1, Limits(connect_timeout=3),
                                         remotes=[("127.0.0.1", 1), ("127.0.0.1", 2)])
        self.descriptors = self.factory.descriptors = Descriptors(self.reactor, limit=1024, count=lambda: 10)

    def accept(self):
        inbound = self.factory.buildProtocol(None)
        transport = RelayTransport()
        inbound.makeConnection(transport)
        return inbound, transport

    def test_emfile_on_the_target_dial_refuses_the_user(self):
        inbound, transport = self.accept()
        self.reactor.tcpClients[0][2].clientConnectionFailed(None, emfile())
        stats = self.factory.stats
        self.assertEqual((stats.refused, stats.connect_failures), (1, 0))
        self.assertEqual(self.descriptors.exhausted["dial"], 1)
        self.assertEqual(self.descriptors.refused, 1)
        self.assertTrue(transport.disconnecting)

    def test_emfile_says_nothing_about_the_target(self):
        self.accept()
        self.reactor.tcpClients[0][2].clientConnectionFailed(None, emfile())
        self.assertEqual(len(self.reactor.tcpClients), 1, "no failover: the next target would fail the same")
        self.assertTrue(self.factory.group.healthy(0), "the target is not put in a cool-down")

    def test_dials_are_spent_from_the_budget(self):
        self.descriptors.open_now()
        self.accept()
        self.assertEqual(self.descriptors.open_now(), 11)


class ClientPoolTests(unittest.TestCase):
    def make_client(self, open_now):
        reactor = MemoryReactorClock()
        client = TunnelClient(ClientSettings("127.0.0.1", 1, "127.0.0.1", 2, key=KEY, min_pool=64), reactor)
        client.descriptors = Descriptors(reactor, limit=100, count=lambda: open_now)
        client.session = object()
        client.policy = PoolPolicy(reactor, 64, 1024)
        client.pool = IdlePool(reactor, 1024, lambda n: None)
        client.server_address = ("127.0.0.1", 1)
        client.flow = "receive"
        return client, reactor

    def test_pool_dials_stop_at_the_descriptor_budget(self):
        client, reactor = self.make_client(open_now=50)
        client.fill()
        # (100 - 4 reserved - 50 open) // 2: each needs a leg when used.
        self.assertEqual(len(reactor.tcpClients), 23)
        client.fill()
        self.assertEqual(len(reactor.tcpClients), 23, "the dials in flight are counted")

    def test_plenty_of_descriptors_leaves_the_policy_alone(self):
        client, reactor = self.make_client(open_now=10)
        client.descriptors.set_limit(100000)
        client.fill()
        self.assertEqual(len(reactor.tcpClients), 64)

    def test_a_pool_dial_without_a_descriptor_is_counted(self):
        client, reactor = self.make_client(open_now=10)
        client.fill()
        client.pool_dial_failed(b"id", emfile())
        self.assertEqual(client.descriptors.exhausted["dial"], 1)


class ServerPoolTests(unittest.TestCase):
    def start(self, limit, max_pool=1024):
        self.patch(tunnelend, "raise_fd_limit", lambda: limit)
        settings = ServerSettings(tunnel_host="127.0.0.1", tunnel_port=0, target_host="127.0.0.1", target_port=0,
                                  key=KEY, max_pool=max_pool, udp=False, report_interval=0)
        server = TunnelServer(settings, MemoryReactorClock())
        server.privilegedStartService()
        return server

    def test_idle_pool_bounded_by_the_open_files_limit(self):
        server = self.start(1024)
        self.assertEqual(server.pool_bound, 256)
        self.assertEqual(server.session_config.max_pool, 256, "WELCOME tells the client")
        authenticate(server)
        self.assertEqual(server.session.pool.max_size, 256)
        names = {sample.name: sample.value for sample in server.metrics()}
        self.assertEqual((names["fd_limit"], names["pool_fd_bound"]), (1024, 256))

    def test_a_lower_max_pool_is_kept(self):
        server = self.start(1024, max_pool=100)
        self.assertEqual(server.session_config.max_pool, 100)


class ServerIdleRoomTests(unittest.TestCase):
    def test_idle_pool_connections_leave_each_user_a_descriptor(self):
        """Near the open-files limit the server files no more idle pool
        connections than it has descriptors for their users (500 users
        through a tunnel at 1,024 files lost 36 to an idle pool that kept
        growing), unless a user is already waiting for one."""
        from tests.test_server import connect, make_server
        from tunnelpass.wire.codec import Type, encode
        from tunnelpass.wire.handshake import pool_auth_frame

        server = make_server()
        session, _, _ = authenticate(server)
        server.descriptors = Descriptors(server.clock, limit=100, count=lambda: 90)  # reserve 4: 6 to spare
        filed = []
        for counter in range(1, 10):
            protocol, transport = connect(server)
            protocol.dataReceived(pool_auth_frame(session, counter, bytes([counter]) * 16, b""))
            filed.append(transport.value() == encode(Type.POOL_OK))
        self.assertEqual(filed, [True] * 6 + [False] * 3)
        self.assertEqual(len(server.session.pool.idle), 6)
        for _ in range(6):  # users take every idle one; the next waits
            server.session.pool.take()
        waiting = server.session.pool.take()
        self.assertFalse(waiting.called)
        server.descriptors = Descriptors(server.clock, limit=100, count=lambda: 99)  # nothing to spare
        protocol, transport = connect(server)
        protocol.dataReceived(pool_auth_frame(session, 20, b"w" * 16, b""))
        self.assertEqual(transport.value(), encode(Type.POOL_OK), "a waiting user's connection is always filed")
        self.assertTrue(waiting.called)
