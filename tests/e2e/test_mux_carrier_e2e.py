"""End-to-end: what only the HTTP/2 multiplexed carrier (``--type 3``) has.

* SIGTERM at the server drains: a stream open across it finishes with its
  data, a new user connection during the drain is refused, the process then
  exits 0 without waiting for --shutdown-timeout.
* A dead carrier connection (blackholed by a proxy on the path, the control
  channel left alone) is found by the heartbeat: its streams end with a
  reset at both ends within a few heartbeats, and new users go to the
  replacement carrier the client dials.
* A client insisting on ``--type 0`` refuses a type-3 server's session with
  one clear error line.

Real ``twistd`` processes on loopback (tests/e2e/tunnel_harness.py).
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import Twistd, tcp_round_trip, wait_until
from tests.e2e.test_carrier_matrix_e2e import CommandBackend, read_to_end
from tests.e2e.tunnel_harness import ThreadedProxy, Tunnel, relay_bytes

HEARTBEAT = 0.5


class CarrierProxy(ThreadedProxy):
    """A byte pipe in front of the server's tunnel port that can blackhole
    the carrier connections open now (every connection but the first, the
    control channel): their bytes are swallowed both ways, the sockets stay
    open, as a dead path or a stalled middlebox would leave them."""

    def __init__(self, testcase, server_port: int):
        self.gates: list[threading.Event] = []
        super().__init__(testcase, server_port)

    def _serve(self, downstream: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.server_port))
        except OSError:
            downstream.close()
            return
        self.sockets.append(upstream)
        gate = threading.Event()
        with self.lock:
            self.gates.append(gate)
        threading.Thread(target=relay_bytes, args=(upstream, downstream, None, gate), daemon=True).start()
        relay_bytes(downstream, upstream, None, gate)

    def blackhole_carriers(self) -> int:
        with self.lock:
            carriers = self.gates[1:]
        for gate in carriers:
            gate.set()
        return len(carriers)


class DrainTests(unittest.TestCase):
    """SIGTERM at a type-3 server: existing streams finish, new ones are refused."""

    def check(self, flow: str):
        backend = CommandBackend(self)
        # Send flow: the client keeps its listener across sessions, and a
        # user there waits up to --pool-timeout for a carrier of a session.
        tunnel = Tunnel(self, flow=flow, backend=backend, carrier=3, server_args=["--shutdown-timeout", "20s"],
                        client_args=["--pool-timeout", "1s"])
        with socket.create_connection(("127.0.0.1", tunnel.entry), timeout=10) as user:
            user.sendall(b"E" + b"before" * 1000)
            received = b""
            while len(received) < 6000:
                received += user.recv(65536)
            started = time.monotonic()
            tunnel.server.signal(signal.SIGTERM)
            tunnel.server.wait_for_log("received SIGTERM")
            # A new user during the drain: refused (receive flow: the listener
            # is closed; send flow: no carrier takes it, closed at the client's
            # --pool-timeout without a byte), never served, never left hanging.
            asked = time.monotonic()
            try:
                late = tcp_round_trip(tunnel.entry, b"Elate", timeout=10)
            except (ConnectionRefusedError, ConnectionResetError):
                late = b""
            self.assertEqual(late, b"", "a new user connection was served during the drain")
            self.assertLess(time.monotonic() - asked, 5, "the new user was left waiting")
            # The stream open across the SIGTERM carries on both ways.
            user.sendall(b"after" * 1000)
            user.shutdown(socket.SHUT_WR)
            outcome, rest = read_to_end(user)
        self.assertEqual((outcome, received + rest), ("eof", b"before" * 1000 + b"after" * 1000))
        self.assertEqual(tunnel.server.wait_exit(15), 0, tunnel.server.log())
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 12, "the server waited for --shutdown-timeout, not for its last stream")
        self.assertNotIn("Traceback", tunnel.server.log() + tunnel.client.log())

    def test_receive_flow(self):
        self.check("receive")

    def test_send_flow(self):
        self.check("send")


class DeadCarrierTests(unittest.TestCase):
    def test_blackholed_carriers_reset_their_streams_and_are_replaced(self):
        """Receive flow, --heartbeat 500ms: both carriers blackholed while a
        user's stream is open.  The user and the target each see a reset
        within a few heartbeats; a new user is then served on a replacement."""
        backend = CommandBackend(self)
        tunnel = Tunnel(self, backend=backend, carrier=3, connect=False,
                        server_args=["--heartbeat", f"{int(HEARTBEAT * 1000)}ms"])
        proxy = CarrierProxy(self, tunnel.tunnel_port)
        tunnel.start_client(proxy.port)
        tunnel.wait_pool(2)
        user = socket.create_connection(("127.0.0.1", tunnel.entry), timeout=10)
        self.addCleanup(user.close)
        user.sendall(b"S" + b"u" * 50_000)
        wait_until(lambda: backend.sunk >= 50_000, 10, what="bytes at the target")
        self.assertEqual(proxy.blackhole_carriers(), 2)
        blackholed = time.monotonic()
        outcome, _ = read_to_end(user, timeout=10 * HEARTBEAT + 5)
        waited = time.monotonic() - blackholed
        self.assertEqual(outcome, "reset", f"the user saw {outcome} after {waited:.1f}s")
        self.assertLess(waited, 6 * HEARTBEAT + 2, "not found dead within a few heartbeats")
        wait_until(lambda: backend.ends[b"S"], 10, what="the target leg to end")
        self.assertEqual(backend.ends[b"S"][0][0], "reset", "the target sees the dead carrier as a reset")
        tunnel.server.wait_for_log("the carrier connection is dead")
        # New users: on a carrier the client dialled again (through the proxy, not blackholed).
        tunnel.client.wait_for_log("dialling a replacement")
        for i in range(5):
            self.assertEqual(tcp_round_trip(tunnel.entry, b"Eagain %d" % i, timeout=10), b"again %d" % i)
        self.assertGreater(len(proxy.gates), 3, "the users went over new carrier connections")


class CarrierTypeMismatchTests(unittest.TestCase):
    def test_client_insisting_on_type_0_refuses_a_type_3_server(self):
        tunnel = Tunnel(self, carrier=3, connect=False)
        client = Twistd(self, tunnel.client_argv() + ["--type", "0"], directory=tunnel.dir,
                        ready="the server runs --type 3 but this client insists on --type 0; refusing the session")
        self.assertIn("#error]", [line for line in client.log().splitlines() if "insists on --type 0" in line][0])
        self.assertNotIn("connected to", client.log())
        tunnel.server.wait_for_log("client disconnected")  # after its session, which the client dropped


class FirstFramesTests(unittest.TestCase):
    """In memory, no processes: the race DeadCarrierTests met on a real
    carrier (a user's first bytes sent the moment both carriers were up)."""

    def test_a_large_frame_behind_the_settings_ack_in_one_read(self):
        """The opener acknowledges the acceptor's SETTINGS (64 KiB frames)
        and sends a 50,001-byte DATA frame at once; both arrive in one read.
        h2 read the batch with the 16 KiB default limit and the acceptor
        closed the carrier as a protocol error."""
        from twisted.internet.task import Clock

        from tests.helpers import RelayTransport
        from tests.test_muxconn import V4, Acceptor, Recorder
        from tunnelpass.carriers.muxconn import MuxConnection

        ended, acceptor = [], Acceptor()
        a = MuxConnection(True, None, Clock(), 0.0, lambda c, why: ended.append(why), name="carrier aaaaaaaa")
        b = MuxConnection(False, acceptor, Clock(), 0.0, lambda c, why: ended.append(why), name="carrier bbbbbbbb")
        ta, tb = RelayTransport(), RelayTransport()
        a.makeConnection(ta)
        b.makeConnection(tb)

        def carry(transport, peer):
            data = transport.value()
            transport.clear()
            peer.dataReceived(data)

        carry(ta, b)  # the opener's preface and SETTINGS
        carry(tb, a)  # the acceptor's SETTINGS (and its ACK)
        stream = a.open_stream("tcp", V4)
        stream.attach(Recorder())
        stream.write(b"x" * 50_001)
        carry(ta, b)  # ACK + HEADERS + one 50,001-byte DATA frame, in one read
        self.assertEqual(ended, [])
        self.assertFalse(b.closed)
        (_, _, _, recorder), = acceptor.accepted
        self.assertEqual(recorder.received, b"x" * 50_001)
