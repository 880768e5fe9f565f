# -*- test-case-name: tests.e2e.test_demo -*-
"""``make demo``: the forwarder in front of a small built-in service, on loopback.

Starts, in this process, a demo HTTP service (127.0.0.1:18081) and a TCP+UDP
echo service (127.0.0.1:18007), then runs the real forwarder as a child
``twistd -n tunnelpass --mode forward --config etc/tunnelpass.conf`` and
prints what to type to see traffic go through it.  Ctrl-C stops both.

    python -m tunnelpass.demo [--config PATH]
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
            f"You reached 127.0.0.1:{HTTP_PORT} through the forwarder; "
            f"the service saw the connection come from {peer.host}:{peer.port}.\n"
        ).encode()


class Forwarder(ProcessProtocol):
    """Passes the forwarder's output through and stops the demo when it exits."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.exit_code = None
        self.ended = Deferred()

    def outReceived(self, data):
        sys.stdout.buffer.write(data)
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


def main(argv=None) -> int:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description="tunnelpass forwarder demo on loopback")
    parser.add_argument("--config", default="etc/tunnelpass.conf")
    args = parser.parse_args(argv)

    reactor.listenTCP(HTTP_PORT, Site(Hello()), interface="127.0.0.1")
    reactor.listenTCP(ECHO_PORT, Factory.forProtocol(Echo), interface="127.0.0.1")
    reactor.listenUDP(ECHO_PORT, UDPEcho(), interface="127.0.0.1")

    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    command = [twistd, "-n", "--pidfile=", "tunnelpass", "--mode", "forward", "--config", args.config]
    forwarder = Forwarder(reactor)
    process = reactor.spawnProcess(forwarder, twistd, command, env=os.environ)

    def stop_forwarder():
        # Let the forwarder drain and print its final stats before we exit.
        if forwarder.exit_code is None:
            process.signalProcess("TERM")
            return forwarder.ended.addTimeout(10, reactor).addErrback(lambda _: None)

    reactor.addSystemEventTrigger("before", "shutdown", stop_forwarder)
    print(
        "\n"
        "tunnelpass demo: demo service on 127.0.0.1:18081 (HTTP) and 127.0.0.1:18007 (echo),\n"
        f"forwarder rules from {args.config}. Try, in another terminal:\n\n"
        "    curl http://127.0.0.1:8080/\n"
        "    echo hello | nc -q1 127.0.0.1 8007          # TCP echo\n"
        "    echo hello | nc -u -w1 127.0.0.1 8007       # UDP echo\n"
        "    kill -HUP <twistd pid>                      # reload the rules file\n\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    reactor.run()
    return forwarder.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
