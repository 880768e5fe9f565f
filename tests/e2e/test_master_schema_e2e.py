"""Property-based API testing of a real master with ``schemathesis``
against the ``/openapi.json`` it serves: every operation, with the key (no
5xx, every response matches its schema) and without it (401 everywhere but
the public routes)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial import unittest

from tests.e2e.harness import free_port
from tests.e2e.master_harness import STRONG, Master

SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")


class SchemaTests(unittest.TestCase):
    def setUp(self):
        if not os.path.exists(SCHEMATHESIS):
            raise unittest.SkipTest("schemathesis is not installed (pip install -e '.[test]')")
        self.master = Master(self)
        self.spec_url = f"http://127.0.0.1:{self.master.port}{self.master.base}/openapi.json"

    def test_every_operation_with_the_key(self):
        """No 5xx and every response as its schema says, over generated
        requests (examples, coverage of edge values, random fuzzing), with
        ``{id}`` naming a real instance (a server on free loopback ports) so
        GET/PATCH/PUT/DELETE reach it.  ``GET /events`` never ends: it has
        its own tests (test_master_sse, test_master_e2e)."""
        url = f"server://{STRONG}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"
        instance = self.master.ok("POST", "/instances", {"alias": "fuzzed", "url": url}, expect=201)
        config = os.path.join(self.master.dir, "schemathesis.toml")
        with open(config, "w") as f:
            f.write(f'[parameters]\n"path.id" = "{instance["id"]}"\n')
        done = subprocess.run(
            [SCHEMATHESIS, "--config-file", config, "run", self.spec_url, "-H", f"X-API-Key: {self.master.key}",
             "--exclude-operation-id", "streamEvents", "--checks",
             "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
             "response_headers_conformance,unsupported_method,allow_header_conformance,ignored_auth",
             "--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--seed", "13",
             "--workers", "1", "--request-timeout", "10", "--generation-deterministic"],
            capture_output=True, text=True, timeout=240, cwd=self.master.dir,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        report = done.stdout[-6000:] + done.stderr[-2000:]
        self.assertEqual(done.returncode, 0, f"{report}\n--- master log ---\n{self.master.log()[-3000:]}")
        self.assertIn("operations", report.lower())
        print(report[-1500:])

    def test_every_protected_operation_refuses_a_missing_key(self):
        status, _, spec = self.master.call("GET", "/openapi.json", key=None)
        self.assertEqual(status, 200)
        seen = 0
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                if method not in ("get", "post", "put", "patch", "delete"):
                    continue
                concrete = path.replace("{id}", "0123abcd")
                if concrete.startswith(self.master.base):
                    concrete = concrete[len(self.master.base):]
                body = {} if method in ("post", "put", "patch") else None
                got, _, answer = self.master.call(method.upper(), concrete, body, key=None)
                public = operation.get("security") == []
                if public:
                    self.assertNotEqual(got, 401, f"{method} {path} is public")
                else:
                    self.assertEqual(got, 401, f"{method} {path} without a key -> {got} {answer}")
                    self.assertEqual(answer, {"error": "Unauthorized: API key required"})
                seen += 1
        self.assertGreaterEqual(seen, 11)
