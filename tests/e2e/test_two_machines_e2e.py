"""Two "machines" on loopback: the server on 127.0.0.2, the client and its
target on 127.0.0.3.  The token the server logs must work on the client's
machine as pasted; a client's --tunnel overrides a token's address; after a
20-second server outage the client is back within seconds, and says why it
could not reach the server once, not per attempt."""

from __future__ import annotations

import base64
import json
import os
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import Twistd, _EchoHandler, _ThreadingTCP, free_port, tcp_round_trip, wait_until
from tests.e2e.tunnel_harness import on_both_carriers

SERVER_HOST = "127.0.0.2"
CLIENT_HOST = "127.0.0.3"
KEY = "two-machines-e2e-key-0123456789abcdef"


def echo_on(testcase, host: str) -> int:
    """A TCP echo backend on *host* (the client's machine)."""
    server = _ThreadingTCP((host, 0), _EchoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)
    return server.server_address[1]


def token_body(token: str) -> dict:
    encoded = token[len("tp1."):]
    return json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))


def retoken(token: str, **changes) -> str:
    body = dict(token_body(token), **changes)
    raw = json.dumps(body, separators=(",", ":")).encode()
    return "tp1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@on_both_carriers
class TwoMachinesTests(unittest.TestCase):
    def test_the_logged_token_works_on_the_other_machine(self):
        """On type 3 the client's carrier connections go where the token
        (or --tunnel) says too, and it follows the server's --type."""
        tunnel_port, entry = free_port(), free_port()
        backend = echo_on(self, CLIENT_HOST)
        server = Twistd(self, ["--mode", "server", "--tunnel", f"0.0.0.0:{tunnel_port}",
                               "--target", f"{SERVER_HOST}:{entry}", "--public-address", SERVER_HOST, "--tls", "1",
                               "--type", str(self.carrier)],
                        ready="--token ")
        line = next(line for line in server.log().splitlines() if "--token " in line)
        self.assertIn("twistd -n --pidfile= tunnelpass --mode client --token ", line)
        token = line.split("--token ", 1)[1].split()[0]
        self.assertEqual((token_body(token)["h"], token_body(token)["p"]), (SERVER_HOST, tunnel_port))

        # The token alone, as pasted on the client's machine.
        client = Twistd(self, ["--mode", "client", "--token", token, "--target", f"{CLIENT_HOST}:{backend}",
                               "--min-pool", "2"], ready="connected to")
        self.assertIn(f"client running: server {SERVER_HOST}:{tunnel_port} (from the token)", client.log())
        self.assertIn(f", type {self.carrier})", client.log())
        self.assertEqual(wait_until(lambda: _try(SERVER_HOST, entry, b"pasted token"), 10, what="a round trip"),
                         b"pasted token")
        client.signal(15)
        client.wait_exit()

        # A token whose address is wrong (the server guessed an address this
        # machine cannot use): --tunnel overrides it; key and pin still hold.
        nowhere = free_port()
        wrong = retoken(token, p=nowhere)
        client = Twistd(self, ["--mode", "client", "--token", wrong, "--tunnel", f"{SERVER_HOST}:{tunnel_port}",
                               "--target", f"{CLIENT_HOST}:{backend}", "--min-pool", "2"], ready="connected to")
        self.assertIn(f"(--tunnel overrides the token's {SERVER_HOST}:{nowhere})", client.log())
        self.assertEqual(wait_until(lambda: _try(SERVER_HOST, entry, b"overridden"), 10, what="a round trip"),
                         b"overridden")


class TokenAddressTests(unittest.TestCase):
    """What address a token carries (no carrier, no stream)."""

    def test_a_wildcard_bind_without_public_address_tokens_a_host_address(self):
        """No --public-address: the token carries one of this host's own
        non-loopback addresses (loopback only on a host that has nothing
        else, with a warning), and the log names the option."""
        from tunnelpass.relay.hostaddrs import host_addresses

        server = Twistd(self, ["--mode", "server", "--tunnel", f"0.0.0.0:{free_port()}",
                               "--target", f"127.0.0.1:{free_port()}"], ready="carries ")
        line = next(line for line in server.log().splitlines() if "--token " in line)
        host = token_body(line.split("--token ", 1)[1].split()[0])["h"]
        others = [a for a in host_addresses() if ":" not in a and not a.startswith("127.")]
        if others:
            self.assertIn(host, others)
            self.assertIn("Choose with --public-address", server.log())
        else:
            self.assertEqual(host, "127.0.0.1")
            self.assertIn("only loopback addresses", server.log())


def _try(host: str, port: int, payload: bytes, timeout: float = 2.0):
    try:
        return tcp_round_trip(port, payload, timeout, host) or None
    except OSError:
        return None


class OutageTests(unittest.TestCase):
    """Type 0 only: the control channel's reconnection after an outage (a
    type-3 client's carriers after a server restart:
    tests/e2e/test_tunnel_e2e.py ResilienceTestsType3)."""

    OUTAGE = 20.0

    def test_back_within_seconds_of_the_servers_return_after_a_20s_outage(self):
        tunnel_port, entry = free_port(), free_port()
        backend = echo_on(self, CLIENT_HOST)
        state = os.path.abspath(self.mktemp())
        server_args = ["--mode", "server", "--tunnel", f"{SERVER_HOST}:{tunnel_port}", "--key", KEY,
                       "--target", f"{SERVER_HOST}:{entry}", "--tls", "1", "--state-dir", state]
        server = Twistd(self, server_args, ready="server running")
        pin = server.log().split("certificate ", 1)[1].split()[0]
        client = Twistd(self, ["--mode", "client", "--tunnel", f"{SERVER_HOST}:{tunnel_port}", "--key", KEY,
                               "--pin", pin, "--target", f"{CLIENT_HOST}:{backend}", "--min-pool", "2"],
                        ready="connected to")
        wait_until(lambda: _try(SERVER_HOST, entry, b"before"), 10, what="a round trip before the outage")

        server.kill()
        client.wait_for_log("connection refused")
        time.sleep(self.OUTAGE)  # the outage itself (what is measured comes after it)
        server = Twistd(self, server_args, ready=None)
        wait_until(lambda: "server running" in server.log(), 15, interval=0.01, what="the server's restart")
        running = time.monotonic()
        self.assertIn(pin, server.log(), "same --state-dir, same certificate")
        wait_until(lambda: _try(SERVER_HOST, entry, b"after", timeout=1.0), 15, interval=0.05,
                   what="a round trip after the outage")
        back = time.monotonic() - running
        self.assertLessEqual(back, 5.0, f"client back {back:.1f}s after the server's return")

        log = client.log()
        self.assertEqual(log.count("connection refused"), 1, "the reason once per change, not per attempt:\n" + log)
        client.wait_for_log("reached the server at")
        self.assertNotIn("object at 0x", log)
