"""Startup and option errors end the real ``twistd`` process (issue 10, item 2).

Every bad configuration below runs as its own ``twistd -n --pidfile=
tunnelpass`` process, all of them at once (they are independent).  Each
must exit non-zero within a few seconds -- status 1 for a startup error,
2 for an option error -- with one line naming the option, the file or
address and the reason, and no traceback: systemd's
``Restart=on-failure`` then fires and the journal says why.
"""

import os
import socket

from twisted.trial import unittest

from tests.certs import ca_signed, write_pem
from tests.e2e.harness import Twistd, free_port

KEY = "e2e-startup-key-0123456789abcdef"


class StartupErrorTests(unittest.TestCase):
    def busy_port(self) -> int:
        """A loopback TCP port something else listens on."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        self.addCleanup(sock.close)
        return sock.getsockname()[1]

    def file(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_each_bad_configuration_exits_with_one_line(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca, cert, _ = write_pem(self.dir, *ca_signed())
        other = os.path.join(self.dir, "other")
        os.makedirs(other)
        _, _, wrong_key = write_pem(other, *ca_signed())
        state = os.path.join(self.dir, "state")
        os.makedirs(state)
        self.file("state/tunnelpass.crt", b"half-written")
        self.file("state/tunnelpass.key", b"half-written")
        missing = os.path.join(self.dir, "missing.pem")
        busy = self.busy_port()
        rules = self.file("rules.conf", f"127.0.0.1:{busy} | 127.0.0.1 | 80\n".encode())
        tunnel = ["--tunnel", f"127.0.0.1:{free_port()}", "--target", f"127.0.0.1:{free_port()}"]
        client = ["--mode", "client", *tunnel, "--key", KEY]
        server = ["--mode", "server", "--key", KEY]

        # One process per mechanism (the unit tests cover each file and
        # parser): makeService's file checks, a bind failure in
        # privilegedStartService (tunnel, forward rule, metrics), an option error.
        cases = [  # (arguments, exit status, the line)
            ([*client, "--ca", missing], 1, f"tunnelpass: --ca {missing}: No such file or directory"),
            ([*server, *tunnel, "--tls", "2", "--cert", cert, "--private-key", wrong_key], 1,
             f"tunnelpass: --private-key {wrong_key}: is not the private key of the certificate in --cert {cert}"),
            ([*server, *tunnel, "--tls", "2", "--cert", missing, "--private-key", wrong_key], 1,
             f"tunnelpass: --cert {missing}: No such file or directory"),
            ([*server, *tunnel, "--tls", "2", "--cert", cert, "--private-key", other], 1,
             f"tunnelpass: --private-key {other}: "),
            ([*server, *tunnel, "--tls", "1", "--state-dir", "/proc/tunnelpass-state"], 1,
             "tunnelpass: --state-dir /proc/tunnelpass-state: cannot be created"),
            ([*server, *tunnel, "--tls", "1", "--state-dir", state], 1,
             f"tunnelpass: --state-dir {state}: saved certificate tunnelpass.crt: not a PEM certificate"),
            (["--mode", "forward", "--config", missing], 1,
             f"tunnelpass: --config {missing}: No such file or directory"),
            ([*server, "--tunnel", f"127.0.0.1:{busy}", "--target", f"127.0.0.1:{free_port()}"], 1,
             f"tunnelpass: --tunnel: cannot listen on 127.0.0.1:{busy}: Address already in use"),
            (["--mode", "forward", "--config", rules], 1,
             f"tunnelpass: cannot listen on 127.0.0.1:{busy}/tcp: Address already in use"),
            ([*server, *tunnel, "--metrics", f"127.0.0.1:{busy}"], 1, "Address already in use"),
            ([*server, *tunnel, "--tls", "3"], 2,
             "tunnelpass: --tls: invalid value '3': choose one of 0, 1, 2 "
             "(see: twistd -n --pidfile= tunnelpass --help)"),
            # NodePass's pool types that are not built yet (issue 12): refused, never run as another type.
            ([*server, *tunnel, "--type", "1"], 2,
             "tunnelpass: --type 1 (QUIC) is not available in this version; use 0 (TCP pool) or 3 (HTTP/2 "
             "multiplexed) (see: twistd -n --pidfile= tunnelpass --help)"),
            ([f"client://{KEY}@{tunnel[1]}/{tunnel[3]}?type=2"], 2,
             "tunnelpass: URL query type=2 (WebSocket) is not available in this version; use 0 (TCP pool) or 3 "
             "(HTTP/2 multiplexed) (see: twistd -n --pidfile= tunnelpass --help)"),
        ]
        processes = [Twistd(self, args, directory=self.dir) for args, _, _ in cases]
        for process, (args, status, line) in zip(processes, cases):
            self.assertEqual(process.wait_exit(timeout=30), status, f"{args}:\n{process.log()}")
            log = process.log()
            self.assertIn(line, log, args)
            self.assertNotIn("Traceback", log, args)
            errors = [text for text in log.splitlines() if "tunnelpass: " in text]
            self.assertEqual(len(errors), 1, f"{args}:\n{log}")
            if status == 2:  # an option error: that one line and nothing else (no usage text)
                self.assertEqual(log.strip(), errors[0], args)
