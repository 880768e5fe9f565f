# -*- test-case-name: tests.test_master_registry -*-
"""The Registry with in-memory fakes of the store, the supervisor, the SSE
hub and the key holder, on a task.Clock: every API operation and its
errors, supervisor events, counters across runs and master restarts,
automatic restarts with backoff, persistence, shutdown."""

from __future__ import annotations

import copy
import hashlib

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.master.errors import ApiError
from tunnelpass.master.lifecycle import restart_delay
from tunnelpass.master.registry import Registry
from tunnelpass.master.settings import MasterSettings

KEY = "9f3c1a7e5b2d8f4c6a0e1b9d7c3f5a28"
SERVER = f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080"
CLIENT = f"client://{KEY}@127.0.0.1:10101/127.0.0.1:9090"


class FakeStore:
    """The design's Store in memory.  ``held``: answers wait for release();
    ``broken``: every write fails."""

    def __init__(self, rows=(), settings=None):
        self.rows = {row["id"]: copy.deepcopy(row) for row in rows}
        self.settings = dict(settings or {})
        self.counter_saves, self.log = [], []
        self.held, self.pending, self.broken = False, [], False

    def _answer(self, apply, value=None):
        if self.broken:
            return fail(OSError("disk on fire"))
        if self.held:
            d = Deferred()
            self.pending.append((d, apply, value))
            return d
        apply()
        return succeed(value)

    def release(self):
        pending, self.pending = self.pending, []
        for d, apply, value in pending:
            apply()
            d.callback(value)

    def load_instances(self):
        return succeed([copy.deepcopy(row) for row in self.rows.values()])

    def save_instance(self, row):
        row = copy.deepcopy(row)
        return self._answer(lambda: (self.log.append(("save", row["id"])), self.rows.__setitem__(row["id"], row)))

    def delete_instance(self, id):
        return self._answer(lambda: (self.log.append(("delete", id)), self.rows.pop(id, None)))

    def save_counters(self, counters):
        counters = copy.deepcopy(counters)

        def apply():
            self.counter_saves.append(counters)
            for id, values in counters.items():
                if id in self.rows:
                    self.rows[id]["counters"] = values
        return self._answer(apply)

    def get_setting(self, name):
        return succeed(self.settings.get(name))

    def set_setting(self, name, value):
        return self._answer(lambda: self.settings.__setitem__(name, value))


class FakeSupervisor:
    def __init__(self):
        self.calls = []
        self.hold_stops = False
        self.stops: dict[str, Deferred] = {}

    def start_instance(self, id, url, log_level):
        self.calls.append(("start", id, url, log_level))

    def stop_instance(self, id, timeout):
        self.calls.append(("stop", id, timeout))
        d = self.stops[id] = Deferred()
        if not self.hold_stops:
            d.callback(None)
        return d

    def kinds(self, id):
        return [call[0] for call in self.calls if call[1] == id]


class FakeHub:
    def __init__(self):
        self.events, self.dropped = [], 0

    def publish(self, type, instance, logs=None):
        self.events.append((type, copy.deepcopy(instance), logs))

    def drop_all(self):
        self.dropped += 1

    def types(self):
        return [event[0] for event in self.events]


class FakeKeys:
    def __init__(self):
        self.hashes = []

    def replace(self, key_hash):
        self.hashes.append(key_hash)


def row(id, url=SERVER, restart=True, desired="running", counters=None, created=1.0, alias=""):
    return {"id": id, "alias": alias, "url": url, "restart": restart, "desired": desired,
            "meta": {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}},
            "counters": counters or {"tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}, "created": created}


class Base(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store, self.supervisor, self.hub, self.keys = FakeStore(), FakeSupervisor(), FakeHub(), FakeKeys()
        self.settings = MasterSettings(log="warn", report_interval=5.0, shutdown_timeout=3.0, alias="m1")

    def registry(self, load=True) -> Registry:
        registry = Registry(self.clock, self.store, self.supervisor, self.hub, self.keys, self.settings)
        registry.random = lambda: 0.5  # no jitter: delays are exact
        if load:
            self.successResultOf(registry.load())
            self.addCleanup(lambda: registry.saver.running and registry.saver.stop())
        return registry

    def create(self, registry, url=SERVER, alias="a"):
        return self.successResultOf(registry.create(alias, url))

    def api_error(self, d, status, text=None) -> ApiError:
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual(error.status, status, error.message)
        if text is not None:
            self.assertIn(text, error.message)
        return error

    def event(self, registry, id, kind, **data):
        registry.on_supervisor_event(id, kind, data)


class CreateTests(Base):
    def test_create_saves_starts_publishes(self):
        registry = self.registry()
        created = self.create(registry, SERVER, "web")
        id = created["id"]
        self.assertRegex(id, r"^[0-9a-f]{8}$")
        self.assertEqual((created["alias"], created["type"], created["status"], created["restart"], created["url"]),
                         ("web", "server", "running", True, SERVER))
        self.assertIn(KEY, created["config"])
        self.assertEqual(self.store.rows[id]["desired"], "running")
        self.assertIs(self.store.rows[id]["restart"], True)
        self.assertEqual(self.supervisor.calls, [("start", id, SERVER, "warn")])
        type, instance, logs = self.hub.events[-1]
        self.assertEqual(type, "create")
        self.assertNotIn(KEY, str(instance))

    def test_saved_before_started(self):
        registry = self.registry()
        self.store.held = True
        d = registry.create("", SERVER)
        self.assertNoResult(d)
        self.assertEqual(self.supervisor.calls, [])
        self.assertEqual(registry.list(), [])
        self.store.release()
        created = self.successResultOf(d)
        self.assertEqual(self.supervisor.kinds(created["id"]), ["start"])

    def test_store_failure_leaves_nothing(self):
        registry = self.registry()
        self.store.broken = True
        self.failureResultOf(registry.create("", SERVER), OSError)
        self.assertEqual((registry.list(), self.supervisor.calls, self.hub.events), ([], [], []))

    def test_keyless_server_gets_a_key_masked_in_list(self):
        registry = self.registry()
        created = self.create(registry, "server://127.0.0.1:10101/127.0.0.1:8080")
        key = created["url"].split("://")[1].split("@")[0]
        self.assertRegex(key, r"^[0-9a-f]{32}$")
        self.assertEqual(self.store.rows[created["id"]]["url"], created["url"])
        self.assertEqual(registry.get(created["id"])["url"], created["url"])
        listed = registry.list()[0]
        self.assertEqual(listed["url"], "server://********@127.0.0.1:10101/127.0.0.1:8080")
        self.assertNotIn(key, str(registry.list()))

    def test_bad_input(self):
        registry = self.registry()
        self.api_error(registry.create("", "server://127.0.0.1:1/127.0.0.1:2?nope=1"), 400, "URL: unknown URL query")
        self.api_error(registry.create("", "client://127.0.0.1:1/127.0.0.1:2?mode=2"), 400)
        self.api_error(registry.create(5, SERVER), 400, "alias must be a string")
        self.api_error(registry.create("x" * 257, SERVER), 400, "alias exceeds")
        self.api_error(registry.create("", None), 400, "url must be a string")
        self.api_error(registry.create("", {"url": SERVER}), 400, "url must be a string")
        self.api_error(registry.create("", SERVER + "?x=" + "a" * 2048), 400, "longer than 2048")
        self.assertEqual((self.store.rows, self.supervisor.calls), ({}, []))

    def test_list_sorted_by_creation_get_full(self):
        registry = self.registry()
        ids = []
        for url in (CLIENT, SERVER, CLIENT):
            ids.append(self.create(registry, url)["id"])
            self.clock.advance(1)
        self.assertEqual([item["id"] for item in registry.list()], ids)
        self.assertTrue(all(item["url"].startswith(("server://********@", "client://********@"))
                            for item in registry.list()))
        self.assertEqual(registry.get(ids[0])["url"], CLIENT)
        for bad in ("deadbeef", "", None, 5):
            with self.assertRaises(ApiError) as caught:
                registry.get(bad)
            self.assertEqual((caught.exception.status, caught.exception.message), (404, "Instance not found"))


class LoadTests(Base):
    def test_master_id_created_once(self):
        registry = self.registry()
        self.assertRegex(registry.master_id, r"^[0-9a-f]{16}$")
        self.assertEqual(self.store.settings["master_id"], registry.master_id)
        again = self.registry()
        self.assertEqual(again.master_id, registry.master_id)
        entry = again.get("********")
        self.assertEqual((entry["config"], entry["url"], entry["alias"], entry["status"]),
                         (registry.master_id, "********", "m1", "running"))
        self.assertNotIn("********", [item["id"] for item in again.list()])

    def test_rows_come_back(self):
        bad = row("00000004", url="server://127.0.0.1:1/nowhere")
        self.store = FakeStore([row("00000001", counters={"tcprx": 70, "tcptx": 1, "udprx": 2, "udptx": 3}),
                                row("00000002", restart=False), row("00000003", desired="stopped"), bad],
                               {"master_alias": "stored"})
        registry = self.registry()
        self.assertEqual([call[1] for call in self.supervisor.calls], ["00000001"])
        status = {item["id"]: item["status"] for item in registry.list()}
        self.assertEqual(status, {"00000001": "running", "00000002": "stopped", "00000003": "stopped",
                                  "00000004": "error"})
        self.assertEqual(self.store.rows["00000002"]["desired"], "stopped")
        self.assertEqual(registry.get("00000001")["tcprx"], 70)
        self.assertEqual(registry.alias, "stored")
        self.event(registry, "00000004", "status", status="running")  # never started: nothing for it to say
        self.assertEqual(registry.get("00000004")["config"], bad["url"])


class PatchTests(Base):
    def setUp(self):
        super().setUp()
        self.reg = self.registry()
        self.iid = self.create(self.reg)["id"]
        self.hub.events.clear()
        self.store.log.clear()

    def patch(self, body):
        return self.successResultOf(self.reg.patch(self.iid, body))

    def test_alias_restart_meta(self):
        meta = {"peer": {"sid": "550e8400-e29b-41d4-a716-446655440000", "type": "1", "alias": "far"},
                "tags": {"env": "prod"}}
        answer = self.patch({"alias": "new", "restart": False, "meta": meta})
        self.assertEqual((answer["alias"], answer["restart"], answer["meta"]), ("new", False, meta))
        self.assertIn(KEY, answer["url"])
        stored = self.store.rows[self.iid]
        self.assertEqual((stored["alias"], stored["restart"], stored["meta"]), ("new", False, meta))
        self.assertEqual(self.hub.types(), ["update"])
        answer = self.patch({"meta": {"peer": {}, "tags": {"env": "dev"}}})
        self.assertEqual(answer["meta"], {"peer": meta["peer"], "tags": {"env": "dev"}})
        self.assertEqual(self.patch({"meta": {"tags": {}}})["meta"]["peer"], meta["peer"])

    def test_answer_waits_for_commit(self):
        self.store.held = True
        d = self.reg.patch(self.iid, {"alias": "slow"})
        self.assertNoResult(d)
        self.assertEqual(self.hub.events, [])
        self.store.release()
        self.assertEqual(self.successResultOf(d)["alias"], "slow")

    def test_failed_save_puts_memory_back(self):
        self.store.broken = True
        self.failureResultOf(self.reg.patch(self.iid, {"alias": "lost", "action": "stop"}), OSError)
        self.assertEqual((self.reg.get(self.iid)["alias"], self.reg.instances[self.iid].desired), ("a", "running"))
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"])

    def test_hostile_bodies_change_nothing(self):
        for body in ({"alias": 5}, {"restart": "no"}, {"action": "fly"}, {"meta": {"tags": {"k": 1}}},
                     {"meta": {"x": 1}}, {"meta": {"tags": {str(i): "" for i in range(65)}}}, {"alias": "y" * 257},
                     {"bogus": 1}, [], "x", {"alias": "ok", "action": "explode"}):
            self.api_error(self.reg.patch(self.iid, body), 400)
        self.api_error(self.reg.patch(self.iid, {"action": "fly"}), 400, "Invalid action: fly")
        self.assertEqual((self.store.log, self.hub.events), ([], []))
        self.assertEqual(self.reg.get(self.iid)["alias"], "a")
        self.api_error(self.reg.patch("deadbeef", {"alias": "x"}), 404, "Instance not found")

    def test_stop_start_restart(self):
        answer = self.patch({"action": "stop"})
        self.assertEqual(answer["status"], "stopped")
        self.assertEqual(self.store.rows[self.iid]["desired"], "stopped")
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop"])
        self.patch({"action": "stop"})  # already stopped: nothing to do
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop"])
        self.assertEqual(self.patch({"action": "start"})["status"], "running")
        self.assertEqual(self.store.rows[self.iid]["desired"], "running")
        self.patch({"action": "start"})  # already running
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop", "start"])
        self.patch({"action": "restart"})
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop", "start", "stop", "start"])
        self.assertEqual(self.hub.types(), ["update"] * 5)

    def test_start_after_error_stops_first(self):
        self.reg.instances[self.iid].restart = False
        self.event(self.reg, self.iid, "status", status="error", error="bind: address in use")
        self.assertEqual(self.reg.get(self.iid)["status"], "error")
        self.patch({"action": "start"})
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop", "start"])

    def test_stop_waits_for_the_supervisor(self):
        self.supervisor.hold_stops = True
        d = self.reg.patch(self.iid, {"action": "stop"})
        self.assertNoResult(d)
        self.assertEqual(self.store.rows[self.iid]["desired"], "stopped")  # saved, then acted
        self.supervisor.stops[self.iid].callback(None)
        self.assertEqual(self.successResultOf(d)["status"], "stopped")

    def test_reset_persisted(self):
        self.event(self.reg, self.iid, "stats", tcprx=100, tcptx=50, udprx=5, udptx=6, tcps=1)
        answer = self.patch({"action": "reset"})
        self.assertEqual([answer[name] for name in ("tcprx", "tcptx", "udprx", "udptx")], [0, 0, 0, 0])
        self.assertEqual(self.store.rows[self.iid]["counters"], {"tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0})
        self.event(self.reg, self.iid, "stats", tcprx=130, tcptx=50, udprx=5, udptx=6)
        self.assertEqual(self.reg.get(self.iid)["tcprx"], 30)

    def test_api_key_rotation(self):
        from tunnelpass.master.auth import hash_key

        answer = self.successResultOf(self.reg.patch("********", {"action": "restart"}))
        key = answer["url"]
        self.assertRegex(key, r"^[0-9a-f]{64}$")
        self.assertEqual(answer["config"], self.reg.master_id)
        self.assertEqual(self.store.settings["api_key_hash"], hash_key(key))
        self.assertEqual(hash_key(key), hashlib.sha256(key.encode()).hexdigest())
        self.assertEqual(self.keys.hashes, [hash_key(key)])
        self.assertNotIn(key, str(self.hub.events))
        self.assertEqual(self.reg.get("********")["url"], "********")
        for body in ({"action": "stop"}, {"alias": "x"}, {"action": "restart", "alias": "x"}, {}, []):
            self.api_error(self.reg.patch("********", body), 400)
        self.assertEqual(len(self.keys.hashes), 1)

    def test_rotation_waits_for_commit(self):
        self.store.held = True
        d = self.reg.patch("********", {"action": "restart"})
        self.assertEqual(self.keys.hashes, [])
        self.store.release()
        self.successResultOf(d)
        self.assertEqual(len(self.keys.hashes), 1)


class PutDeleteTests(Base):
    def setUp(self):
        super().setUp()
        self.reg = self.registry()
        self.iid = self.create(self.reg)["id"]
        self.hub.events.clear()

    def test_unchanged_is_a_conflict(self):
        for same in (SERVER, f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080?mode=0&tls=0",
                     "server://127.0.0.1:10101/127.0.0.1:8080"):  # keyless: keeps the instance's key
            self.api_error(self.reg.put(self.iid, same), 409, "Instance URL conflict")
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"])

    def test_replace(self):
        new = f"server://{KEY}@127.0.0.1:10102/127.0.0.1:8080"
        answer = self.successResultOf(self.reg.put(self.iid, new))
        self.assertEqual((answer["url"], answer["status"]), (new, "running"))
        self.assertIn("10102", answer["config"])
        self.assertEqual(self.store.rows[self.iid]["url"], new)
        self.assertEqual(self.supervisor.calls[-2:], [("stop", self.iid, 3.0), ("start", self.iid, new, "warn")])
        self.assertEqual(self.hub.types(), ["update"])

    def test_keyless_replacement_keeps_the_key(self):
        answer = self.successResultOf(self.reg.put(self.iid, "server://127.0.0.1:10103/127.0.0.1:8080?tls=1"))
        self.assertEqual(answer["url"], f"server://{KEY}@127.0.0.1:10103/127.0.0.1:8080?tls=1")

    def test_a_put_the_store_refuses_leaves_the_old_url_running(self):
        self.store.broken = True
        other = SERVER.replace("127.0.0.1:8080", "127.0.0.1:8081")
        self.assertNotEqual(other, SERVER)
        self.failureResultOf(self.reg.put(self.iid, other), OSError)
        self.assertEqual(self.reg.get(self.iid)["url"], SERVER)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop", "start"])
        self.assertEqual(self.reg.get(self.iid)["status"], "running")

    def test_put_errors(self):
        self.api_error(self.reg.put("********", SERVER), 403, "Forbidden: API Key")
        self.api_error(self.reg.put("deadbeef", SERVER), 404)
        self.api_error(self.reg.put(self.iid, "server://x"), 400)
        self.api_error(self.reg.put(self.iid, 7), 400)
        self.assertEqual(self.reg.get(self.iid)["url"], SERVER)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"])

    def test_delete_stops_first(self):
        self.supervisor.hold_stops = True
        d = self.reg.delete(self.iid)
        self.assertNoResult(d)
        self.assertIn(self.iid, self.store.rows)
        self.supervisor.stops[self.iid].callback(None)
        self.assertIsNone(self.successResultOf(d))
        self.assertNotIn(self.iid, self.store.rows)
        self.assertEqual(self.hub.types(), ["delete"])
        self.assertNotIn(KEY, str(self.hub.events))
        self.api_error(self.reg.patch(self.iid, {}), 404)
        self.event(self.reg, self.iid, "stats", tcprx=5)  # late report: ignored
        self.assertEqual(self.reg.list(), [])

    def test_delete_removes_the_instance_state(self):
        """A deleted instance's own state (a tls=1 certificate) goes with it,
        and only its own."""
        import dataclasses
        import os

        state = os.path.abspath(self.mktemp())
        self.reg.settings = dataclasses.replace(self.settings, state_dir=state)
        mine, other = (os.path.join(state, "instances", name) for name in (self.iid, "0badcafe"))
        for directory in (mine, other):
            os.makedirs(directory)
            open(os.path.join(directory, "tunnelpass.crt"), "w").close()
        self.successResultOf(self.reg.delete(self.iid))
        self.assertFalse(os.path.exists(mine))
        self.assertTrue(os.path.exists(os.path.join(other, "tunnelpass.crt")))

    def test_delete_stopped_and_errors(self):
        self.successResultOf(self.reg.patch(self.iid, {"action": "stop"}))
        self.successResultOf(self.reg.delete(self.iid))
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop"])
        self.api_error(self.reg.delete("********"), 403, "Forbidden: API Key")
        self.api_error(self.reg.delete(self.iid), 404)


class EventTests(Base):
    def setUp(self):
        super().setUp()
        self.reg = self.registry()
        self.iid = self.create(self.reg)["id"]
        self.hub.events.clear()

    def test_status_and_stats(self):
        self.event(self.reg, self.iid, "status", status="running")
        self.event(self.reg, self.iid, "stats", tcps=3, udps=1, pool=8, ping=12, tcprx=10, tcptx=20, udprx=1, udptx=2)
        got = self.reg.get(self.iid)
        self.assertEqual([got[name] for name in ("tcps", "udps", "pool", "ping", "tcprx", "udptx")],
                         [3, 1, 8, 12, 10, 2])
        self.event(self.reg, self.iid, "status", status="stopped")
        got = self.reg.get(self.iid)
        self.assertEqual((got["status"], got["tcps"], got["pool"], got["tcprx"]), ("stopped", 0, 0, 10))
        self.assertEqual(self.hub.types(), ["update"] * 3)
        self.assertNotIn(KEY, str(self.hub.events))
        self.event(self.reg, self.iid, "status", status="sideways")
        self.event(self.reg, "deadbeef", "status", status="error")
        self.reg.on_supervisor_event(self.iid, "stats", None)  # not a dict: nothing
        self.assertEqual(len(self.hub.events), 3)

    def test_counters_survive_restarts_and_master_restarts(self):
        self.event(self.reg, self.iid, "stats", tcprx=100, tcptx=10)
        self.successResultOf(self.reg.patch(self.iid, {"action": "restart"}))
        self.event(self.reg, self.iid, "stats", tcprx=30, tcptx=1)
        self.assertEqual(self.reg.get(self.iid)["tcprx"], 130)
        self.clock.advance(5)  # the report interval: counters saved
        self.assertEqual(self.store.counter_saves[-1], {self.iid: {"tcprx": 130, "tcptx": 11, "udprx": 0, "udptx": 0}})
        saves = len(self.store.counter_saves)
        self.clock.advance(5)  # nothing changed: nothing written
        self.assertEqual(len(self.store.counter_saves), saves)
        self.successResultOf(self.reg.stop())
        self.supervisor.calls.clear()
        again = self.registry()
        self.assertEqual(again.get(self.iid)["tcprx"], 130)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"])  # desired survived the shutdown

    def test_logs(self):
        self.event(self.reg, self.iid, "log", level="info", text="hello", time=1.0)
        self.assertEqual(self.hub.events[-1][0], "log")
        self.assertEqual(self.hub.events[-1][2], "[info] hello")
        self.event(self.reg, self.iid, "log", level="warn", text="careful", time=1.0)
        self.assertEqual(self.hub.events[-1][2], "[warn] careful")
        self.event(self.reg, self.iid, "log", level="<script>", text="odd", time=1.0)
        self.assertEqual(self.hub.events[-1][2], "[info] odd")
        del self.hub.events[-2:]
        for i in range(250):
            self.event(self.reg, self.iid, "log", level="info", text=f"line {i}", time=1.0)
        self.assertEqual(len(self.reg.recent_logs(self.iid)), 200)
        self.event(self.reg, self.iid, "log", level="info", text=None)
        self.assertEqual(len(self.hub.events), 251)

    def test_error_is_logged_to_the_instance(self):
        self.reg.instances[self.iid].restart = False
        self.event(self.reg, self.iid, "status", status="error", error="worker exited: signal 9")
        self.assertEqual(self.hub.types(), ["log", "update"])
        self.assertEqual(self.hub.events[0][2], "[error] worker exited: signal 9")


class RestartTests(Base):
    def setUp(self):
        super().setUp()
        self.reg = self.registry()
        self.iid = self.create(self.reg)["id"]

    def fail_once(self):
        self.event(self.reg, self.iid, "status", status="error", error="boom")
        calls = self.clock.getDelayedCalls()
        restarts = [call for call in calls if call.func == self.reg._restart_due]
        self.assertEqual(len(restarts), 1)
        delay = restarts[0].getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay

    def test_backoff_sequence(self):
        delays = [round(self.fail_once(), 3) for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"] + ["stop", "start"] * 9)
        self.assertEqual(self.reg.get(self.iid)["status"], "running")

    def test_backoff_resets_after_a_minute_up(self):
        self.fail_once()
        self.fail_once()
        self.event(self.reg, self.iid, "status", status="running")
        self.clock.advance(61)
        self.assertEqual(self.fail_once(), 1)

    def test_jitter(self):
        self.assertEqual(restart_delay(0, 0.0), 0.8)
        self.assertAlmostEqual(restart_delay(2, 0.999999), 4.8, places=3)
        self.assertEqual(restart_delay(10, 0.0), 60)
        self.assertEqual(restart_delay(10_000, 0.5), 60)

    def test_no_restart_when_not_wanted(self):
        self.successResultOf(self.reg.patch(self.iid, {"restart": False}))
        self.event(self.reg, self.iid, "status", status="error", error="boom")
        self.assertEqual(self.clock.getDelayedCalls()[1:], [])
        other = self.create(self.reg)["id"]
        self.successResultOf(self.reg.patch(other, {"action": "stop"}))
        self.event(self.reg, other, "status", status="error", error="late")
        self.assertEqual([call for call in self.clock.getDelayedCalls() if call.func == self.reg._restart_due], [])

    def test_operator_stop_cancels_a_due_restart(self):
        self.event(self.reg, self.iid, "status", status="error", error="boom")
        self.successResultOf(self.reg.patch(self.iid, {"action": "stop"}))
        self.clock.advance(120)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop"])

    def test_restart_flag_on_reschedules(self):
        self.successResultOf(self.reg.patch(self.iid, {"restart": False}))
        self.event(self.reg, self.iid, "status", status="error", error="boom")
        self.successResultOf(self.reg.patch(self.iid, {"restart": True}))
        self.clock.advance(1)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start", "stop", "start"])

    def test_a_silent_instance_that_reports_again_is_running(self):
        self.event(self.reg, self.iid, "status", status="error", error="no report for 15 s")
        self.event(self.reg, self.iid, "stats", tcprx=1)
        self.assertEqual(self.reg.get(self.iid)["status"], "running")
        self.clock.advance(120)
        self.assertEqual(self.supervisor.kinds(self.iid), ["start"])


class ShutdownInfoTests(Base):
    def test_stop_in_parallel_bounded(self):
        reg = self.registry()
        ids = [self.create(reg)["id"] for _ in range(3)]
        stopped = self.create(reg)["id"]
        self.successResultOf(reg.patch(stopped, {"action": "stop"}))
        for id in ids:
            self.event(reg, id, "stats", tcprx=7)
        self.supervisor.hold_stops = True
        d = reg.stop()
        self.assertEqual([call[1] for call in self.supervisor.calls if call[0] == "stop"][1:], ids)
        self.supervisor.stops[ids[0]].callback(None)
        self.assertNoResult(d)
        self.clock.advance(self.settings.shutdown_timeout + 2)  # the others never answer
        self.successResultOf(d)
        for id in ids[1:]:  # answered late: theirs were never cancelled, so firing them is fine
            self.supervisor.stops[id].callback(None)
        self.assertEqual(self.hub.dropped, 1)
        self.assertTrue(all(self.store.rows[id]["desired"] == "running" for id in ids))
        self.assertEqual({id: self.store.rows[id]["counters"]["tcprx"] for id in ids}, dict.fromkeys(ids, 7))
        self.event(reg, ids[1], "status", status="error", error="late")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(reg.saver.running)

    def test_info_and_alias(self):
        reg = self.registry()
        got = reg.info()
        for name in ("mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total", "swap_used", "netrx",
                     "nettx", "diskr", "diskw", "sysup", "ver", "name", "uptime", "log", "tls", "crt", "key"):
            self.assertIn(name, got)
        self.assertEqual((got["alias"], got["log"], got["tls"], got["crt"], got["uptime"]), ("m1", "warn", "0", "", 0))
        self.clock.advance(90)
        self.assertEqual(reg.info()["uptime"], 90)
        answer = self.successResultOf(reg.set_alias("renamed"))
        self.assertEqual(answer["alias"], "renamed")
        self.assertEqual(self.store.settings["master_alias"], "renamed")
        self.assertEqual(reg.get("********")["alias"], "renamed")
        self.api_error(reg.set_alias("x" * 257), 400)
        self.api_error(reg.set_alias(None), 400)

    def test_samples(self):
        reg = self.registry()
        id = self.create(reg, alias="web")["id"]
        self.event(reg, id, "stats", tcprx=5, tcps=2)
        samples = {(s.name, s.labels.get("protocol"), s.labels.get("direction")): s for s in reg.samples()}
        self.assertEqual(samples[("instance_bytes", "tcp", "rx")].value, 5)
        self.assertEqual(samples[("instance_tcp_connections", None, None)].value, 2)
        self.assertEqual(samples[("instance_up", None, None)].value, 1)
        self.assertEqual(samples[("instance_up", None, None)].labels, {"instance": id, "alias": "web"})

    def test_tcping_is_the_pingers(self):
        reg = self.registry()
        self.api_error(reg.tcping("no port"), 400)
