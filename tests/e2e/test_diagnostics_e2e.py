"""End-to-end: runtime failures an operator sees at the default log level
(issue 10 item 2): an unreachable target (tunnel and forward mode), a client
not speaking TLS, and two clients fighting over one key.  Real ``twistd``
processes on loopback; as few of them as the checks allow."""

import re
import socket
from types import SimpleNamespace

from twisted.trial import unittest

from tests.e2e.harness import Forwarder, Twistd, free_port, wait_until
from tests.e2e.tunnel_harness import Tunnel, on_both_carriers


def hung_up(port: int, payload: bytes = b"GET / HTTP/1.0\r\n\r\n", timeout: float = 10.0) -> bytes:
    """Connect to *port*, send *payload*, return what came back before the
    close (b"" when the relay hung up without a byte: curl's "Empty reply")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        received = b""
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def health_value(log: str, field: str) -> int:
    values = re.findall(rf"\b{field}=(\d+)", log)
    return int(values[-1]) if values else -1


@on_both_carriers
class DiagnosticsTests(unittest.TestCase):
    def test_tunnel_target_refused_plain_client_and_key_fight(self):
        """One TLS server, two clients with one key (both learning the level).

        1. Receive flow, the client's target a closed port: the user is hung
           up on, the client warns with the target and "refused", and its
           health line counts connect_failures.
        2. Plain bytes twice from one address at the TLS server: one warning
           that it is not speaking TLS (the clients' single learning attempts
           were not).
        3. A second client with the same key: the two take the session from
           each other, and the server says so.
        """
        closed = free_port()
        # The client's "backend" is a closed port.
        tunnel = Tunnel(self, tls=1, client_args=["--report-interval", "1s"], backend=SimpleNamespace(port=closed),
                        carrier=self.carrier)
        client = tunnel.client
        self.assertEqual(hung_up(tunnel.entry), b"", "the user sees the connection closed")
        self.assertNotIn("not speaking TLS", tunnel.server.log(), "a client learning the level is no failure")
        for _ in range(2):
            self.assertIn(b"requires TLS", hung_up(tunnel.tunnel_port, b"\x01plain, not a ClientHello"))
        # The same key again (started now, checked last: it boots while the rest is checked).
        Twistd(self, tunnel.client_argv(), directory=tunnel.dir)

        client.wait_for_log(f"cannot reach target 127.0.0.1:{closed} (tcp): connection refused")
        wait_until(lambda: health_value(client.log(), "connect_failures") >= 1, 10, what="connect_failures=1")
        tunnel.server.wait_for_log("is not speaking TLS (the server runs --tls 1; "
                                   "start the client with the token / --tls 1)")
        tunnel.server.wait_for_log("replaced by a new session from 127.0.0.1:")
        tunnel.server.wait_for_log("two clients are using the same key and take the session from each other: "
                                   "127.0.0.1:", timeout=30)
        wait_until(lambda: health_value(tunnel.server.log(), "session_replacements") >= 3, 10,
                   what="session_replacements in the health line")

    def test_forward_target_refused(self):
        if self.carrier:
            raise unittest.SkipTest("the forwarder has no carrier")
        closed, port = free_port(), free_port()
        """A rule whose target (a name, resolved per connection) is a closed
        port: the user is hung up on, the log says which target and why (not
        "Starting factory / Stopping factory"), the stats line counts it."""
        closed, port = free_port(), free_port()
        forwarder = Forwarder(self, f"127.0.0.1:{port} | localhost | {closed}\n", "--report-interval", "1s")
        self.assertEqual(hung_up(port), b"")
        forwarder.wait_for_log(f"cannot reach target localhost:{closed} (tcp): connection refused")
        wait_until(lambda: health_value(forwarder.log(), "connect_failures") >= 1, 10, what="connect_failures=1")
        self.assertNotIn("Starting factory", forwarder.log())
