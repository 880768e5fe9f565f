"""End-to-end: the forwarder's PROXY protocol headers, read by a real HAProxy
(``accept-proxy``) and by our own parser for UDP."""

import os
import shutil
import socket
import subprocess

from twisted.trial import unittest

from tests.e2e.harness import Forwarder, can_connect, free_port, wait_until
from tests.e2e.tunnel_harness import on_both_carriers
from tunnelpass.wire.proxyproto import parse


class HAProxy:
    """HAProxy accepting PROXY headers and answering each HTTP request with
    the client address it was told."""

    def __init__(self, testcase, extra: str = ""):
        if shutil.which("haproxy") is None:
            raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")
        self.port = free_port()
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(f"""global
  maxconn 100
defaults
  mode http
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend echo_source
  bind 127.0.0.1:{self.port} accept-proxy
  http-request return status 200 content-type text/plain lf-string "%[src] %[src_port]"
{extra}""")
        self.process = subprocess.Popen(["haproxy", "-f", config, "-db"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        testcase.addCleanup(self.stop)
        wait_until(lambda: can_connect(self.port), 10, what="haproxy")

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def http_from(port: int, source_host: str) -> tuple[bytes, int]:
    """GET / from *source_host*; the body and our source port."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source_host, 0))
        s.connect(("127.0.0.1", port))
        source_port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1], source_port


class ProxyProtocolTests(unittest.TestCase):
    def test_haproxy_sees_the_original_client_with_v1_and_v2(self):
        haproxy = HAProxy(self)
        v1, v2 = free_port(), free_port()
        Forwarder(self, f"127.0.0.1:{v1} | 127.0.0.1 | {haproxy.port} | proxy=v1\n"
                        f"127.0.0.1:{v2} | 127.0.0.1 | {haproxy.port} | proxy=v2\n")
        for port in (v1, v2):
            body, source_port = http_from(port, "127.0.0.2")  # the forwarder itself dials from 127.0.0.1
            self.assertEqual(body, f"127.0.0.2 {source_port}".encode())

    def test_without_proxy_haproxy_refuses(self):
        haproxy = HAProxy(self)
        plain = free_port()
        Forwarder(self, f"127.0.0.1:{plain} | 127.0.0.1 | {haproxy.port}\n")
        with socket.create_connection(("127.0.0.1", plain), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            # accept-proxy resets a connection without a header; the
            # forwarder passes the reset on (docs/protocol.rst, "What a user
            # sees when a stream is cut"), never a clean EOF.
            with self.assertRaises(ConnectionResetError):
                s.recv(100)

    def test_udp_datagrams_each_carry_a_v2_header(self):
        backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(5)
        self.addCleanup(backend.close)
        port = free_port()
        Forwarder(self, f"127.0.0.1:{port}/udp | 127.0.0.1 | {backend.getsockname()[1]} | proxy=v2\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.2", 0))
            for payload in (b"first", b"second"):
                client.sendto(payload, ("127.0.0.1", port))
                datagram, _ = backend.recvfrom(65535)
                header, used = parse(datagram)
                self.assertEqual((header.protocol, header.source), ("udp", client.getsockname()))
                self.assertEqual(header.destination, ("127.0.0.1", port))
                self.assertEqual(datagram[used:], payload)

    def test_v1_on_a_udp_rule_is_refused(self):
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port}/tcp+udp | 127.0.0.1 | 9 | proxy=v1\n", wait=False)
        self.assertNotEqual(fwd.wait_exit(), 0)
        self.assertIn("proxy=v1 carries TCP only", fwd.log())


class AcceptProxyTests(unittest.TestCase):
    def test_behind_a_load_balancer_the_original_client_goes_on(self):
        """client (127.0.0.2) -> HAProxy (send-proxy-v2) -> forwarder
        (--accept-proxy 127.0.0.1/32, proxy=v1) -> HAProxy (accept-proxy),
        which must see 127.0.0.2 and the client's port."""
        fwd_port, front = free_port(), free_port()
        echo = HAProxy(self, extra=f"""listen balancer
  mode tcp
  bind 127.0.0.1:{front}
  server fwd 127.0.0.1:{fwd_port} send-proxy-v2
""")
        Forwarder(self, f"127.0.0.1:{fwd_port} | 127.0.0.1 | {echo.port} | proxy=v1\n",
                  "--accept-proxy", "127.0.0.1/32")
        body, source_port = http_from(front, "127.0.0.2")
        self.assertEqual(body, f"127.0.0.2 {source_port}".encode())

    def test_untrusted_source_and_spoofed_header_are_refused(self):
        echo = HAProxy(self)
        port = free_port()
        fwd = Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {echo.port} | proxy=v1\n",
                        "--accept-proxy", "127.0.0.1/32")
        for source, payload in (("127.0.0.2", b"PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\n"),
                                ("127.0.0.2", b"GET / HTTP/1.1\r\n\r\n"),
                                ("127.0.0.1", b"GET / HTTP/1.1\r\n\r\n")):  # trusted, but no header
            with socket.socket() as s:
                s.settimeout(5)
                s.bind((source, 0))
                try:
                    # The refusal is a reset, which can reach even connect().
                    s.connect(("127.0.0.1", port))
                    s.sendall(payload)
                    self.assertEqual(s.recv(100), b"")
                except ConnectionResetError:
                    pass
        fwd.wait_for_log("PROXY header")


@on_both_carriers
class TunnelProxyProtocolTests(unittest.TestCase):
    """The user's address crosses the tunnel (OPEN frame) and the side that
    dials the target sends it in a PROXY header."""

    def test_receive_flow_client_sends_v1(self):
        from tests.e2e.tunnel_harness import Tunnel

        echo = HAProxy(self)
        tunnel = Tunnel(self, backend=echo, client_args=["--proxy-protocol", "v1"], carrier=self.carrier)
        body, source_port = http_from(tunnel.entry, "127.0.0.2")
        self.assertEqual(body, f"127.0.0.2 {source_port}".encode())

    def test_send_flow_server_sends_v2_over_tls(self):
        from tests.e2e.tunnel_harness import Tunnel

        echo = HAProxy(self)
        tunnel = Tunnel(self, flow="send", tls=1, backend=echo, server_args=["--proxy-protocol", "v2"],
                        carrier=self.carrier)
        body, source_port = http_from(tunnel.entry, "127.0.0.2")
        self.assertEqual(body, f"127.0.0.2 {source_port}".encode())

    def test_server_behind_a_load_balancer(self):
        """client (127.0.0.2) -> HAProxy send-proxy-v2 -> tunnel server
        (--accept-proxy) -> client (--proxy-protocol v1) -> HAProxy."""
        from tests.e2e.tunnel_harness import Tunnel

        echo = HAProxy(self)
        tunnel = Tunnel(self, backend=echo, server_args=["--accept-proxy", "127.0.0.1/32"],
                        client_args=["--proxy-protocol", "v1"], carrier=self.carrier)
        front = free_port()
        HAProxy(self, extra=f"""listen balancer
  mode tcp
  bind 127.0.0.1:{front}
  server tunnel 127.0.0.1:{tunnel.entry} send-proxy-v2
""")
        body, source_port = http_from(front, "127.0.0.2")
        self.assertEqual(body, f"127.0.0.2 {source_port}".encode())
