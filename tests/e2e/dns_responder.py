"""A small authoritative DNS responder for end-to-end tests, on TCP and UDP
of one loopback port (Twisted Names): ``tunnelpass.test A`` is 192.0.2.53,
``big.tunnelpass.test TXT`` a ~3 KB answer; anything else is NXDOMAIN.

    python dns_responder.py PORT      # prints "ready" once both are bound
"""

import sys

from twisted.internet import defer, reactor
from twisted.names import dns, error, server

NAME = b"tunnelpass.test"
ADDRESS = "192.0.2.53"
BIG = b"big.tunnelpass.test"


class Answers:
    def query(self, query, timeout=None):
        name = query.name.name
        if name == NAME and query.type == dns.A:
            record = dns.Record_A(ADDRESS, ttl=60)
        elif name == BIG and query.type == dns.TXT:
            record = dns.Record_TXT(*[b"%03d" % i + b"x" * 200 for i in range(15)], ttl=60)
        else:
            return defer.fail(error.DomainError(name))
        return defer.succeed(([dns.RRHeader(name=name, type=record.TYPE, payload=record, ttl=60, auth=True)],
                              [], []))


def main(port: int) -> None:
    factory = server.DNSServerFactory(authorities=[Answers()])
    factory.noisy = False
    reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
