# -*- test-case-name: tests.e2e.test_demo -*-
"""``make demo``: a working tunnel on loopback, with built-in defaults.

Starts, in this process, a demo HTTP service (127.0.0.1:18081) and a TCP+UDP
echo service (127.0.0.1:18007), then runs real ``twistd tunnelpass``
children: a server (tunnel 127.0.0.1:10101, tls=1, generated key) that
publishes the service on 127.0.0.1:8080, and a client started with the
token the server logged.  It prints the ``curl`` line that reaches the
service through the tunnel.  Ctrl-C stops everything (each child drains).

    python -m tunnelpass.demo             # the tunnel (make demo)
    python -m tunnelpass.demo --forward   # the static forwarder (make demo-forward)
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, ProcessProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

HTTP_PORT = 18081
ECHO_PORT = 18007
DEMO_TUNNEL_PORT = 10101
DEMO_PUBLIC_PORT = 8080


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Echoes until the client half-closes, then closes after the echo."""

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class UDPEcho(DatagramProtocol):
    def datagramReceived(self, datagram, addr):
        self.transport.write(datagram, addr)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        peer = request.getClientAddress()
        return (
            f"Hello from the tunnelpass demo service!\n"
            f"You reached 127.0.0.1:{HTTP_PORT} through tunnelpass; "
            f"the service saw the connection come from {peer.host}:{peer.port}.\n"
        ).encode()


class Child(ProcessProtocol):
    """A ``twistd tunnelpass`` child: its output is passed through (prefixed
    with its name) and watched for lines the demo waits for."""

    def __init__(self, reactor, name: str, on_line=None):
        self.reactor = reactor
        self.name = name
        self.on_line = on_line
        self.exit_code = None
        self.ended = Deferred()
        self._partial = b""

    def outReceived(self, data):
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            text = line.decode("utf-8", "replace")
            sys.stdout.write(f"[{self.name}] {text}\n")
            if self.on_line is not None:
                self.on_line(text)
        sys.stdout.flush()

    errReceived = outReceived

    def processEnded(self, reason):
        self.exit_code = reason.value.exitCode
        self.ended.callback(None)
        if self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass


def _twistd(reactor, name, arguments, on_line=None):
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    child = Child(reactor, name, on_line)
    process = reactor.spawnProcess(child, twistd, [twistd, "-n", "--pidfile=", "tunnelpass", *arguments],
                                   env=os.environ)

    def stop():
        # Let the child drain and print its final stats before we exit.
        if child.exit_code is None:
            process.signalProcess("TERM")
            return child.ended.addTimeout(10, reactor).addErrback(lambda _: None)

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    return child


def main(argv=None) -> int:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="tunnelpass demo on loopback")
    parser.add_argument("--forward", action="store_true",
                        help="demo the static forwarder instead of the tunnel")
    parser.add_argument("--config", default="etc/tunnelpass.conf", help="forwarder rules (with --forward)")
    args = parser.parse_args(argv)

    reactor.listenTCP(HTTP_PORT, Site(Hello()), interface="127.0.0.1")
    reactor.listenTCP(ECHO_PORT, Factory.forProtocol(Echo), interface="127.0.0.1")
    reactor.listenUDP(ECHO_PORT, UDPEcho(), interface="127.0.0.1")
    children = []
    if args.forward:
        children.append(_twistd(reactor, "forward", ["--mode", "forward", "--config", args.config]))
        print(
            "\n"
            "tunnelpass forwarder demo: demo service on 127.0.0.1:18081 (HTTP) and 127.0.0.1:18007 (echo),\n"
            f"forwarder rules from {args.config}. Try, in another terminal:\n\n"
            "    curl http://127.0.0.1:8080/\n"
            "    echo hello | nc -q1 127.0.0.1 8007          # TCP echo\n"
            "    echo hello | nc -u -w1 127.0.0.1 8007       # UDP echo\n"
            "    kill -HUP <twistd pid>                      # reload the rules file\n\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
    else:
        # A reverse tunnel with tls=1: the server generates a key and a
        # certificate and logs a token; the client is started with it.
        def server_line(text):
            if "--token " in text and len(children) == 1:
                token = text.split("--token ", 1)[1].split()[0]
                children.append(_twistd(reactor, "client", [
                    "--mode", "client", "--token", token, "--target", f"127.0.0.1:{HTTP_PORT}",
                    "--min-pool", "8"], client_line))

        def client_line(text):
            if "connected to" in text:
                print(
                    "\n"
                    f"tunnelpass demo: a server (tunnel 127.0.0.1:{DEMO_TUNNEL_PORT}, tls=1) and a client are up;\n"
                    f"the client reaches the demo HTTP service on 127.0.0.1:{HTTP_PORT}, and the server\n"
                    f"publishes it on 127.0.0.1:{DEMO_PUBLIC_PORT}. Try, in another terminal:\n\n"
                    f"    curl http://127.0.0.1:{DEMO_PUBLIC_PORT}/\n\n"
                    "Press Ctrl-C to stop.\n",
                    flush=True,
                )

        children.append(_twistd(reactor, "server", [
            "--mode", "server", "--tunnel", f"127.0.0.1:{DEMO_TUNNEL_PORT}",
            "--target", f"127.0.0.1:{DEMO_PUBLIC_PORT}", "--flow", "receive", "--tls", "1"], server_line))
    reactor.run()
    return max((child.exit_code or 0) for child in children) if children else 0


if __name__ == "__main__":
    sys.exit(main())
