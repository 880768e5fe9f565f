"""A ``--mode master`` twistd subprocess for e2e tests, and a small HTTP
client for its API (the standard library's, so the tests depend on nothing
the product does not)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading

from tests.e2e.harness import Twistd, free_port, wait_until

KEY_LINE = re.compile(r"keep it now: ([0-9a-f]{64})")
STRONG = "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"  # a tunnel key that passes the strength rule


class Master(Twistd):
    """``twistd tunnelpass --mode master`` on a free loopback port with its
    own state directory; ``key`` is the API key its first start logged."""

    def __init__(self, testcase, *args: str, state_dir: str | None = None, port: int | None = None,
                 workers: int = 1, key: str | None = None, wait: bool = True, env: dict | None = None,
                 prefix: str = "/api", ssl_context=None):
        self.port = port or free_port()
        self.state_dir = state_dir or os.path.abspath(testcase.mktemp())
        self.base = f"{prefix}/v1"
        self.ssl_context = ssl_context  # set: the API is called over HTTPS with it
        super().__init__(testcase, ["--mode", "master", "--api", f"127.0.0.1:{self.port}", "--state-dir",
                                    self.state_dir, "--workers", str(workers), "--shutdown-timeout", "2s", *args],
                         env=env)
        self.key = key
        if wait:
            self.wait_running()

    def wait_running(self, timeout: float = 20.0) -> None:
        self.wait_for_log("master running", timeout=timeout)
        if self.key is None:
            found = KEY_LINE.search(self.log())
            assert found, f"no API key in the log:\n{self.log()}"
            self.key = found.group(1)

    def call(self, method: str, path: str, body=None, key: str | None = "", headers: dict | None = None,
             raw: bytes | None = None, timeout: float = 15.0):
        """(status, headers, decoded JSON or None) of one request; *key* ""
        means this master's key, None means no key header."""
        if self.ssl_context is not None:
            connection = http.client.HTTPSConnection("localhost", self.port, timeout=timeout,
                                                     context=self.ssl_context)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("X-API-Key", self.key if key == "" else key)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, self.base + path, body=data, headers=sent)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        value = json.loads(payload) if payload and response.getheader("Content-Type", "").startswith(
            "application/json") else None
        return response.status, dict(response.getheaders()), value

    def ok(self, method: str, path: str, body=None, expect: int = 200):
        status, _, value = self.call(method, path, body)
        assert status == expect, f"{method} {path} -> {status} {value}\n--- master log ---\n{self.log()[-4000:]}"
        return value

    def instance(self, id: str) -> dict:
        return self.ok("GET", f"/instances/{id}")

    def wait_status(self, id: str, status: str, timeout: float = 20.0) -> dict:
        seen = {}

        def reached():
            seen.update(self.instance(id))
            return seen["status"] == status

        try:
            wait_until(reached, timeout, interval=0.1, what=f"instance {id} {status}")
        except AssertionError:
            raise AssertionError(f"instance {id} is {seen.get('status')}, not {status}: {seen}\n"
                                 f"--- master log ---\n{self.log()[-6000:]}") from None
        return seen

    def children(self) -> list[int]:
        """Process ids of this master's worker processes."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.process.pid:
                    pids.append(int(entry))
        return pids

    def sigkill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class EventReader:
    """Reads ``GET /events`` (SSE) in a thread; ``events`` collects each
    decoded frame's JSON, ``retry`` the retry line's value."""

    def __init__(self, master: Master, key: str | None = None):
        self.events: list[dict] = []
        self.retry = None
        self.closed = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", master.port), timeout=30)
        request = (f"GET {master.base}/events HTTP/1.0\r\nHost: 127.0.0.1:{master.port}\r\n"
                   f"X-API-Key: {key or master.key}\r\nAccept: text/event-stream\r\n\r\n")
        self.sock.sendall(request.encode())
        self.status = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buffer += data
                if self.status is None and b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    self.status = int(head.split()[1])
                while self.status is not None and b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    self._frame(frame.decode())
        except OSError:
            pass
        finally:
            self.closed.set()

    def _frame(self, text: str) -> None:
        # HTTP/1.0: no chunked encoding, the frames arrive as they are.
        data = []
        for line in text.splitlines():
            if line.startswith("retry:"):
                self.retry = int(line[6:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            try:
                self.events.append(json.loads("".join(data)))
            except ValueError:
                pass

    def of_type(self, kind: str, id: str | None = None) -> list[dict]:
        return [e for e in list(self.events) if e.get("type") == kind
                and (id is None or (e.get("instance") or {}).get("id") == id)]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def can_bind(port: int) -> bool:
    """Nothing listens on 127.0.0.1:*port* (a listener could bind it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_port_free(port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: can_bind(port), timeout, interval=0.1, what=f"port {port} free")
