"""A real tunnel for end-to-end tests: server and client ``twistd`` processes,
an echo backend, and fault-injecting proxies (recording, blackholing, TLS
man in the middle) that run in threads of the test process."""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import threading

from tests.certs import ca_signed, write_pem
from tests.e2e.harness import TCPServer, ThreadedListener, Twistd, can_connect, free_port, udp_bound, wait_until

KEY = "e2e-tunnel-key-0123456789abcdef"

#: The carriers (``--type``) every tunnelled-stream guarantee is checked on.
CARRIERS = (0, 3)


def on_both_carriers(cls):
    """Class decorator: *cls* (whose tests build ``Tunnel(..., carrier=self.carrier)``)
    runs as it is, on the TCP pool (``carrier = 0``), and once more as
    ``<Name>Type3`` on the HTTP/2 multiplexed carrier -- a subclass added to
    the class's module, so trial finds it and a failure names the carrier."""
    cls.carrier = 0
    name = cls.__name__ + "Type3"
    doc = f"{cls.__doc__ or cls.__name__}\n\nOn the HTTP/2 multiplexed carrier (--type 3)."
    sub = type(name, (cls,), {"carrier": 3, "__module__": cls.__module__, "__qualname__": name, "__doc__": doc})
    setattr(sys.modules[cls.__module__], name, sub)
    return cls


class Tunnel:
    """Server + client on loopback.  ``entry`` is the port users connect to:
    the server's --target in the receive flow, the client's in the send flow."""

    def __init__(self, testcase, flow: str = "receive", tls: int = 0, server_args=(), client_args=(),
                 backend: TCPServer | None = None, form: str = "flags", tunnel_port: int | None = None,
                 connect: bool = True, entry_host: str = "127.0.0.1", prefix: tuple = (), carrier: int = 0):
        """*carrier*: the server's ``--type`` (0 TCP pool, 3 HTTP/2 multiplexed);
        the client follows what the server announces."""
        self.testcase = testcase
        self.carrier = carrier
        self.prefix = tuple(prefix)  # a command both processes run under (prlimit ...)
        self.entry_host = entry_host  # the address users connect to, as the listening side is told it
        self.backend = backend or TCPServer(testcase)
        self.flow, self.tls, self.form = flow, tls, form
        self.tunnel_port = tunnel_port or free_port()
        self.entry = free_port()
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.tls_args: list[str] = []
        self.client_tls_args: list[str] = []
        if tls == 2:
            ca, key, cert = ca_signed("localhost")
            self.ca_certificate = ca
            self.ca, self.cert, self.key = write_pem(self.dir, ca, key, cert)
            self.tls_args = ["--cert", self.cert, "--private-key", self.key]
            self.client_tls_args = ["--ca", self.ca, "--sni", "localhost"]
        self.server_args, self.client_args = list(server_args), list(client_args)
        self.start_server()
        self.client = None
        if connect:
            self.start_client()

    @property
    def server_target(self) -> str:
        return f"{self.entry_host}:{self.entry}" if self.flow == "receive" else f"127.0.0.1:{self.backend.port}"

    @property
    def client_target(self) -> str:
        return f"127.0.0.1:{self.backend.port}" if self.flow == "receive" else f"{self.entry_host}:{self.entry}"

    def start_server(self) -> Twistd:
        if self.form == "url":
            url = (f"server://{KEY}@127.0.0.1:{self.tunnel_port}/{self.server_target}"
                   f"?tls={self.tls}&mode={1 if self.flow == 'receive' else 2}"
                   + (f"&type={self.carrier}" if self.carrier else ""))
            args = [url]
        else:
            args = ["--mode", "server", "--tunnel", f"127.0.0.1:{self.tunnel_port}", "--target",
                    self.server_target, "--tls", str(self.tls), "--flow", self.flow]
            if self.form != "token":
                args += ["--key", KEY]
            if self.carrier:
                args += ["--type", str(self.carrier)]
        extra = self.tls_args + ["--report-interval", "1s"] + self.server_args
        # Options stop at the first argument: a URL goes last.
        args = extra + args if self.form == "url" else args + extra
        self.server = Twistd(self.testcase, args,
                             ready="server running", directory=self.dir, prefix=self.prefix)
        return self.server

    def token(self) -> str:
        self.server.wait_for_log("--token ")
        return self.server.log().split("--token ", 1)[1].split()[0]

    def client_argv(self, tunnel_port: int | None = None) -> list[str]:
        port = tunnel_port or self.tunnel_port
        if self.form == "url":
            args = [f"client://{KEY}@127.0.0.1:{port}/{self.client_target}?min=8"]
        elif self.form == "token":
            args = ["--mode", "client", "--token", self.token(), "--target", self.client_target, "--min-pool", "8"]
        else:
            args = ["--mode", "client", "--tunnel", f"127.0.0.1:{port}", "--target", self.client_target,
                    "--key", KEY, "--min-pool", "8"]
        extra = self.client_tls_args + self.client_args
        return extra + args if self.form == "url" else args + extra

    def start_client(self, tunnel_port: int | None = None, ready: str | None = "connected to") -> Twistd:
        self.client = Twistd(self.testcase, self.client_argv(tunnel_port), ready=ready, directory=self.dir,
                             prefix=self.prefix)
        if ready == "connected to":
            for line in self.client.log().splitlines():  # every parametrised test runs on its carrier
                if "connected to" in line and not line.startswith("{") and f", type {self.carrier})" not in line:
                    raise AssertionError(f"not on carrier type {self.carrier}: {line}")
            carried = self.server_args + self.client_args
            if "--no-tcp" not in carried:
                wait_until(lambda: can_connect(self.entry), 10, what="the tunnel entry port")
            if "--no-udp" not in carried:
                # The UDP entry is bound just after the TCP one: a datagram
                # sent in between (a loaded machine) would be lost.
                wait_until(lambda: udp_bound(self.entry), 10, what="the tunnel's UDP entry port")
            if not self.carrier:  # type 3: a user waits for a carrier (--pool-timeout)
                self.wait_pool()
        return self.client

    def wait_pool(self, at_least: int = 1) -> None:
        """Wait until the server has idle pool connections, or (type 3) live
        carrier connections (its health event says so)."""
        field = re.compile(r"\b%s=(\d+)" % ("carriers" if self.carrier else "pool_idle"))

        def idle():
            values = field.findall(self.server.log())  # (text or JSON lines: the number ends the match)
            return values and int(values[-1]) >= at_least
        if self.flow == "receive" or self.carrier:
            wait_until(idle, 10, what="carrier connections" if self.carrier else "idle pool connections")


def relay_bytes(source: socket.socket, sink: socket.socket, record: list | None = None,
                gate: threading.Event | None = None) -> None:
    """Copy source -> sink until EOF; while *gate* is set, swallow bytes (a blackhole)."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if record is not None:
                record.append(data)
            if gate is not None and gate.is_set():
                continue
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def throwaway_tls_server(testcase) -> ssl.SSLContext:
    """A TLS server context with a certificate nobody pinned or trusts (a
    man in the middle's)."""
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    ca, key, cert = ca_signed("localhost")
    _, cert_path, key_path = write_pem(directory, ca, key, cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


class ThreadedProxy:
    """Something on the path in front of the server's tunnel port: listens
    on 127.0.0.1, serves each connection in a thread (:meth:`_serve`), and
    closes everything it holds at cleanup."""

    def __init__(self, testcase, server_port: int):
        self.server_port = server_port
        self.lock = threading.Lock()
        self.listening = ThreadedListener(testcase, self._serve, keep=True)
        self.port, self.sockets = self.listening.port, self.listening.sockets  # upstream legs join them

    def _serve(self, downstream: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listening.close()


class Proxy(ThreadedProxy):
    """A TCP proxy in front of the server's tunnel port.

    Records what each connection's client sent (in order of arrival); can
    blackhole the first connection (the control channel) on demand; with
    *mitm* it terminates TLS with its own certificate and opens its own TLS
    connection to the server.
    """

    def __init__(self, testcase, server_port: int, mitm: bool = False):
        self.records: list[list[bytes]] = []
        self.blackhole = threading.Event()
        self.mitm = mitm
        if mitm:
            # Each relayed TLS socket is read in one thread and written in
            # another; TLS 1.3's post-handshake messages (session tickets)
            # make that unsafe in OpenSSL and stalled about one handshake in
            # three.  TLS 1.2 has none: the proxy stays a plain pipe.
            self.server_side = throwaway_tls_server(testcase)
            self.server_side.maximum_version = ssl.TLSVersion.TLSv1_2
            self.client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.client_side.maximum_version = ssl.TLSVersion.TLSv1_2
            self.client_side.check_hostname = False
            self.client_side.verify_mode = ssl.CERT_NONE
        super().__init__(testcase, server_port)

    def _serve(self, downstream: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.server_port))
            # A client without TLS settings speaks plain first and learns the
            # server's level from its answer; the MITM passes that through.
            if self.mitm and downstream.recv(1, socket.MSG_PEEK) == b"\x16":
                downstream = self.server_side.wrap_socket(downstream, server_side=True)
                upstream = self.client_side.wrap_socket(upstream)
        except OSError:
            downstream.close()
            return
        self.sockets += [downstream, upstream]
        record: list[bytes] = []
        first = not self.records
        self.records.append(record)
        gate = self.blackhole if first else None
        threading.Thread(target=relay_bytes, args=(upstream, downstream, None, gate), daemon=True).start()
        relay_bytes(downstream, upstream, record, gate)
