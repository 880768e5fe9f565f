"""The master in operation: its API over TLS 1 and 2, --metrics per
instance, instance log lines on SSE, and a damaged database restored from
the periodic backup."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl

from twisted.trial import unittest

from tests.certs import ca_signed, write_pem
from tests.e2e.harness import free_port, scrape, wait_until
from tests.e2e.master_harness import STRONG, EventReader, Master


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def served_fingerprint(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return "sha256:" + hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def alpn_answer(port: int) -> str | None:
    """What the API selects for a client offering h2 and http/1.1 (as curl does)."""
    context = unverified()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.selected_alpn_protocol()


class MasterTLSTests(unittest.TestCase):
    def test_tls1_api_serves_the_logged_certificate_and_keeps_it(self):
        master = Master(self, "--tls", "1", ssl_context=unverified())
        logged = re.search(r"certificate (sha256:[0-9a-f]{64})", master.log()).group(1)
        self.assertEqual(served_fingerprint(master.port, unverified()), logged)
        self.assertEqual(master.ok("GET", "/info")["tls"], "1")
        self.assertIn("curl -k ", master.log())
        self.assertEqual(alpn_answer(master.port), "http/1.1")  # curl offers h2 first; the API speaks HTTP/1.1
        master.signal(signal.SIGTERM)
        self.assertEqual(master.wait_exit(), 0)
        again = Master(self, "--tls", "1", state_dir=master.state_dir, port=master.port, key=master.key,
                       ssl_context=unverified())
        self.assertEqual(served_fingerprint(again.port, unverified()), logged)  # kept in --state-dir
        again.ok("GET", "/instances")

    def test_tls2_api_is_verified_and_reloads_changed_files_on_sighup(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca, key, cert = ca_signed("localhost")
        ca_path, cert_path, key_path = write_pem(directory, ca, key, cert)
        verified = ssl.create_default_context(cafile=ca_path)
        master = Master(self, "--tls", "2", "--cert", cert_path, "--private-key", key_path, ssl_context=verified)
        master.ok("GET", "/instances")  # chain and host name verified
        first = served_fingerprint(master.port, verified)
        write_pem(directory, ca, *ca_signed("localhost", ca=ca)[1:])
        master.signal(signal.SIGHUP)
        wait_until(lambda: served_fingerprint(master.port, verified) != first, 10, what="the new certificate")
        master.ok("GET", "/instances")


class MasterOperationTests(unittest.TestCase):
    def test_metrics_per_instance_and_log_lines_on_sse(self):
        metrics = free_port()
        master = Master(self, "--metrics", f"127.0.0.1:{metrics}")
        events = EventReader(master)
        self.addCleanup(events.close)
        url = f"server://{STRONG}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"
        created = master.ok("POST", "/instances", {"alias": 'we"ird\\alias', "url": url}, expect=201)
        master.wait_status(created["id"], "running")
        wait_until(lambda: any("server running" in (e.get("logs") or "")
                               for e in events.of_type("log", created["id"])), 15, what="an SSE log event")

        def up():
            samples = scrape(metrics)
            return any(name == "tunnelpass_instance_up" and dict(labels).get("instance") == created["id"]
                       and value == 1 for (name, labels), value in samples.items())
        wait_until(up, 15, interval=0.2, what="tunnelpass_instance_up for the instance")
        samples = scrape(metrics)
        self.assertEqual(samples[("tunnelpass_master_workers", ())], 1)

    def test_one_master_per_state_directory(self):
        master = Master(self)
        second = Master(self, state_dir=master.state_dir, wait=False)
        self.assertEqual(second.wait_exit(), 1)
        self.assertIn(f"another master uses it (pid {master.process.pid})", second.log())
        master.ok("GET", "/instances")

    def test_a_damaged_database_is_restored_from_the_backup(self):
        master = Master(self, "--reload-interval", "1s")
        url = f"server://{STRONG}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}"
        created = master.ok("POST", "/instances", {"alias": "kept", "url": url}, expect=201)
        backup = os.path.join(master.state_dir, "state.db.backup")
        wait_until(lambda: os.path.exists(backup), 10, what="the periodic backup")
        master.signal(signal.SIGTERM)
        self.assertEqual(master.wait_exit(), 0)
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(master.state_dir, "state.db" + suffix)
            if os.path.exists(path):
                with open(path, "r+b") as f:
                    f.write(b"\x00garbage" * 512)
        again = Master(self, state_dir=master.state_dir, port=master.port, key=master.key)
        self.assertIn("state_restored" if "state_restored" in again.log() else "restored from backup", again.log())
        self.assertEqual(again.wait_status(created["id"], "running")["alias"], "kept")
        self.assertTrue(any(name.startswith("state.db.corrupt-") for name in os.listdir(master.state_dir)))
