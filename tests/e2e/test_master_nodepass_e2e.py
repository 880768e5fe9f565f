"""NodePass's own API examples (the curl lines of its docs/en/usage.md and
examples.md, with this test's address, ports and key) against a real
master: they work unchanged, or fail where tunnelpass is stricter on
purpose, with a clear message."""

from __future__ import annotations

import json
import shutil
import subprocess

from twisted.trial import unittest

from tests.e2e.harness import free_port
from tests.e2e.master_harness import Master


def curl(*args: str, timeout: float = 15.0) -> tuple[int, str]:
    """(HTTP status, body) of ``curl -s ARGS``."""
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=timeout)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body


class NodePassExamplesTests(unittest.TestCase):
    def setUp(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed (apt-get install curl)")

    def test_usage_md_curl_lines(self):
        port = free_port()
        master = Master(self, f"master://127.0.0.1:{port}/admin?log=info", port=port, prefix="/admin")
        api, key = f"http://127.0.0.1:{port}/admin/v1", master.key
        tunnel, entry = free_port(), free_port()
        # "Create instance via API": -d without a Content-Type (curl sends a form type).
        status, body = curl("-X", "POST", f"{api}/instances", "-H", f"X-API-Key: {key}",
                            "-d", json.dumps({"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?tls=1"}))
        self.assertEqual(status, 201, body)
        created = json.loads(body)
        self.assertEqual((created["type"], created["restart"]), ("server", True))
        # "List all running instances".
        status, body = curl(f"{api}/instances", "-H", f"X-API-Key: {key}")
        self.assertEqual((status, [i["id"] for i in json.loads(body)]), (200, [created["id"]]))
        # "Control an instance".
        status, body = curl("-X", "PATCH", f"{api}/instances/{created['id']}", "-H", f"X-API-Key: {key}",
                            "-d", '{"action":"restart"}')
        self.assertEqual(status, 200, body)
        master.wait_status(created["id"], "running")
        # examples.md: "Get detailed instance information".
        status, body = curl("-H", f"X-API-Key: {key}", f"{api}/instances/{created['id']}")
        detail = json.loads(body)
        for field in ("id", "alias", "type", "status", "url", "config", "restart", "meta", "mode", "ping", "pool",
                      "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx"):
            self.assertIn(field, detail)
        # examples.md: "Use SSE to monitor real-time status changes".
        status, body = curl("-H", f"X-API-Key: {key}", "-H", "Accept: text/event-stream", "--max-time", "2",
                            f"{api}/events")
        self.assertIn("retry:", body)
        self.assertIn("event: instance", body)
        self.assertIn('"type":"initial"', body.replace(" ", ""))
        # The public endpoints.
        self.assertEqual(curl(f"{api}/openapi.json")[0], 200)
        self.assertEqual(curl(f"{api}/docs")[0], 200)
        # Without the key: 401.
        self.assertEqual(curl(f"{api}/instances")[0], 401)

    def test_examples_md_and_the_stricter_cases(self):
        master = Master(self)
        api, key = f"http://127.0.0.1:{master.port}/api/v1", master.key
        tunnel = free_port()
        status, body = curl("-X", "POST", f"{api}/instances", "-H", "Content-Type: application/json",
                            "-H", f"X-API-Key: {key}",
                            "-d", json.dumps({"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{free_port()}?tls=1"}))
        self.assertEqual(status, 201, body)
        server = json.loads(body)
        # A keyless server URL gets a generated key (NodePass would derive one from the port).
        self.assertRegex(server["url"], r"^server://[0-9a-f]{32}@127\.0\.0\.1:")
        # A keyless client URL is refused, with the command line's reason.
        status, body = curl("-X", "POST", f"{api}/instances", "-H", "Content-Type: application/json",
                            "-H", f"X-API-Key: {key}",
                            "-d", json.dumps({"url": f"client://localhost:{tunnel}/127.0.0.1:{free_port()}"}))
        self.assertEqual(status, 400, body)
        self.assertIn("key", json.loads(body)["error"])
        # examples.md's "PUT {action: restart}" has no url: NodePass answers 400 too.
        status, body = curl("-X", "PUT", f"{api}/instances/{server['id']}", "-H", "Content-Type: application/json",
                            "-H", f"X-API-Key: {key}", "-d", '{"action":"restart"}')
        self.assertEqual(status, 400, body)
        # Key rotation, as NodePass's docs show it; the old key stops working.
        status, body = curl("-X", "PATCH", f"{api}/instances/********", "-H", "Content-Type: application/json",
                            "-H", f"X-API-Key: {key}", "-d", '{"action":"restart"}')
        self.assertEqual(status, 200, body)
        new_key = json.loads(body)["url"]
        self.assertRegex(new_key, r"^[0-9a-f]{64}$")
        self.assertEqual(curl(f"{api}/instances", "-H", f"X-API-Key: {key}")[0], 401)
        self.assertEqual(curl(f"{api}/instances", "-H", f"X-API-Key: {new_key}")[0], 200)
        # The master id, where NodePass keeps it.
        status, body = curl(f"{api}/instances/********", "-H", f"X-API-Key: {new_key}")
        self.assertRegex(json.loads(body)["config"], r"^[0-9a-f]{16}$")
