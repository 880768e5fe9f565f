"""``--mode master`` end to end: a real master process with real worker
processes, instances created through the API, bytes through them, and the
master and its workers killed and restarted."""

from __future__ import annotations

import os
import signal

from twisted.trial import unittest

from tests.e2e.harness import echo_backends, free_port, tcp_round_trip, udp_round_trip, wait_until
from tests.e2e.master_harness import STRONG, EventReader, Master, process_alive, wait_port_free


def through(port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    """*payload* echoed through the tunnel entry *port*, retried while the
    client is still connecting."""
    answer = {}

    def echoed():
        try:
            answer["data"] = tcp_round_trip(port, payload)
        except OSError:
            return False
        return answer["data"] == payload

    wait_until(echoed, timeout, interval=0.2, what=f"an echo through port {port}")
    return answer["data"]


class MasterTunnelTests(unittest.TestCase):
    def make_pair(self, master: Master, backend, tls: int = 1):
        tunnel, entry = free_port(), free_port()
        server = master.ok("POST", "/instances", {
            "alias": "edge", "url": f"server://{STRONG}@127.0.0.1:{tunnel}/127.0.0.1:{entry}?tls={tls}"}, expect=201)
        client = master.ok("POST", "/instances", {
            "alias": "inside", "url": f"client://{STRONG}@127.0.0.1:{tunnel}/127.0.0.1:{backend.port}"}, expect=201)
        return server, client, entry

    def test_instances_carry_traffic_and_report_their_bytes(self):
        """Two instances created through the API (a tls=1 server and its
        client, on the two workers) carry TCP and UDP; GET and SSE
        ``update`` events count the bytes; the list masks the tunnel key."""
        backend = echo_backends(self)
        master = Master(self, workers=2)
        events = EventReader(master)
        self.addCleanup(events.close)
        server, client, entry = self.make_pair(master, backend)
        self.assertEqual((server["type"], server["status"] in ("stopped", "running"), server["restart"]),
                         ("server", True, True))
        self.assertIn(STRONG, server["url"])  # the creator sees the URL it gave
        master.wait_status(server["id"], "running")
        master.wait_status(client["id"], "running")
        payload = os.urandom(300_000)
        self.assertEqual(through(entry, payload), payload)
        self.assertEqual(udp_round_trip(entry, b"datagram"), b"datagram")

        def counted():
            now = master.instance(server["id"])
            return now["tcprx"] >= len(payload) and now["tcptx"] >= len(payload) and now["udprx"] >= 8
        wait_until(counted, 20, interval=0.2, what="the server instance's counters")
        wait_until(lambda: any(e["instance"].get("tcprx", 0) >= len(payload)
                               for e in events.of_type("update", server["id"])), 10, what="an SSE update with bytes")
        listed = master.ok("GET", "/instances")
        self.assertEqual({i["id"] for i in listed}, {server["id"], client["id"]})
        for item in listed:
            self.assertNotIn(STRONG, item["url"] + item["config"])
            self.assertIn("********", item["url"])
        self.assertEqual(events.retry is not None, True)
        self.assertEqual(len(events.of_type("initial")), 0)  # no instance existed when it connected
        self.assertGreaterEqual(len(events.of_type("create")), 2)
        self.assertEqual(len(master.children()), 2)

    def test_stop_start_restart_put_delete(self):
        backend = echo_backends(self)
        master = Master(self)
        server, client, entry = self.make_pair(master, backend, tls=0)
        sid = server["id"]
        master.wait_status(sid, "running")
        through(entry, b"x" * 100)
        self.assertEqual(master.ok("PATCH", f"/instances/{sid}", {"action": "stop"})["id"], sid)
        master.wait_status(sid, "stopped")
        wait_port_free(entry)
        master.ok("PATCH", f"/instances/{sid}", {"action": "start"})
        master.wait_status(sid, "running")
        through(entry, b"y" * 100)
        # The counters survive the instance's restart: both runs' bytes count.
        wait_until(lambda: master.instance(sid)["tcprx"] >= 200, 15, interval=0.2, what="both runs' bytes")
        master.ok("PATCH", f"/instances/{sid}", {"action": "reset"})
        self.assertEqual(master.instance(sid)["tcprx"], 0)
        status, _, body = master.call("PUT", f"/instances/{sid}", {"url": server["url"]})
        self.assertEqual((status, body), (409, {"error": "Instance URL conflict"}))
        moved = free_port()
        new_url = server["url"].replace(f"/127.0.0.1:{entry}", f"/127.0.0.1:{moved}")
        self.assertEqual(master.ok("PUT", f"/instances/{sid}", {"url": new_url})["url"], new_url)
        master.wait_status(sid, "running")
        wait_port_free(entry)
        through(moved, b"z" * 100)
        status, _, _ = master.call("DELETE", f"/instances/{sid}")
        self.assertEqual(status, 204)
        wait_port_free(moved)
        self.assertEqual(master.call("GET", f"/instances/{sid}")[0], 404)

    def test_a_killed_worker_marks_its_instances_error_then_they_come_back(self):
        backend = echo_backends(self)
        master = Master(self)
        server, client, entry = self.make_pair(master, backend, tls=0)
        master.wait_status(server["id"], "running")
        through(entry, b"before")
        (worker,) = master.children()
        os.kill(worker, signal.SIGKILL)
        master.wait_status(server["id"], "error", timeout=10)
        master.wait_status(server["id"], "running", timeout=30)
        master.wait_status(client["id"], "running", timeout=30)
        self.assertNotIn(worker, master.children())
        self.assertEqual(through(entry, b"after", timeout=30), b"after")

    def test_sigkill_of_the_master_leaves_no_orphan_and_a_restart_brings_everything_back(self):
        backend = echo_backends(self)
        master = Master(self, workers=2)
        server, client, entry = self.make_pair(master, backend, tls=1)
        master.wait_status(server["id"], "running")
        through(entry, b"before")
        workers = master.children()
        master.ok("PATCH", f"/instances/{client['id']}", {"alias": "renamed", "meta": {"tags": {"site": "lab"}}})
        master.sigkill()
        wait_until(lambda: not any(process_alive(pid) for pid in workers), 10, what="workers gone with the master")
        wait_port_free(entry)
        again = Master(self, state_dir=master.state_dir, port=master.port, workers=2, key=master.key)
        again.wait_status(server["id"], "running")
        back = again.wait_status(client["id"], "running")
        self.assertEqual((back["alias"], back["meta"]["tags"]), ("renamed", {"site": "lab"}))
        self.assertEqual(through(entry, b"after", timeout=30), b"after")
        self.assertEqual(again.call("GET", "/instances", key="0" * 64)[0], 401)
