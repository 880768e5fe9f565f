# -*- test-case-name: tests.test_master_store -*-
"""The master's SQLite store on real files: rows and settings round trip,
durability settings, migrations, damaged files and the backup."""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.internet import reactor
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial import unittest

from tunnelpass.master import store as storemod
from tunnelpass.master.store import Store, StoreError


def row(id="0123abcd", **changes) -> dict:
    base = {"id": id, "alias": "web", "url": "server://key@:10101/127.0.0.1:8080?tls=1", "restart": True,
            "desired": "running", "meta": {"peer": {"sid": "s1", "type": "0", "alias": "peer"}, "tags": {"env": "a"}},
            "counters": {"tcprx": 1, "tcptx": 2, "udprx": 3, "udptx": 2 ** 62}, "created": 1700000000.5}
    base.update(changes)
    return base


def query(path: str, sql: str):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


class StoreTestBase(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.join(self.mktemp(), "state")
        self.path = os.path.join(self.dir, "state.db")
        self.backup_path = self.path + ".backup"

    async def opened(self, directory=None) -> Store:
        store = Store(directory or self.dir, reactor)
        self.description = await store.open()
        self.addCleanup(store.close)
        return store

    async def populated(self) -> Store:
        """A store with 40 instances (enough pages that truncation hurts) and
        a setting, backed up, then closed (the WAL checkpointed into the file)."""
        store = await self.opened()
        for i in range(40):
            await store.save_instance(row(f"{i:08x}", alias="x" * 200, created=float(i)))
        await store.set_setting("master_id", "m1")
        await store.backup()
        await store.close()
        return store


class RoundTripTests(StoreTestBase):
    async def test_new_database_is_private_and_described(self):
        store = await self.opened()
        self.assertEqual(self.description, f"state: new database {self.path}")
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(await store.load_instances(), [])

    async def test_rows_round_trip_and_reopen_sees_everything(self):
        store = await self.opened()
        first, second = row("0000000a", created=2.0), row("0000000b", restart=False, desired="stopped",
                                                           meta={"tags": {}}, created=1.0)
        await store.save_instance(first)
        await store.save_instance(second)
        await store.set_setting("api_key_hash", "ab" * 32)
        self.assertEqual(await store.load_instances(), [second, first])  # oldest first
        await store.close()
        again = await self.opened()
        self.assertEqual(self.description, f"state: 2 instances in {self.path}")
        self.assertEqual(await again.load_instances(), [second, first])
        self.assertEqual(await again.get_setting("api_key_hash"), "ab" * 32)
        self.assertIsNone(await again.get_setting("master_alias"))

    async def test_save_is_an_upsert(self):
        store = await self.opened()
        await store.save_instance(row(alias="old"))
        await store.save_instance(row(alias="new", url="client://k@127.0.0.1:1/127.0.0.1:2", restart=False))
        rows = await store.load_instances()
        self.assertEqual(rows, [row(alias="new", url="client://k@127.0.0.1:1/127.0.0.1:2", restart=False)])

    async def test_delete(self):
        store = await self.opened()
        await store.save_instance(row("0000000a"))
        await store.save_instance(row("0000000b"))
        self.assertTrue(await store.delete_instance("0000000a"))
        self.assertFalse(await store.delete_instance("0000000a"))
        self.assertEqual([r["id"] for r in await store.load_instances()], ["0000000b"])

    async def test_settings_overwrite(self):
        store = await self.opened()
        await store.set_setting("master_alias", "one")
        await store.set_setting("master_alias", "two")
        self.assertEqual(await store.get_setting("master_alias"), "two")

    async def test_counters_batch_in_one_call_ignores_unknown_ids(self):
        store = await self.opened()
        await store.save_instance(row("0000000a"))
        await store.save_instance(row("0000000b"))
        zero = {"tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}
        updated = await store.save_counters({"0000000a": dict(zero, tcprx=10), "0000000b": dict(zero, udptx=7),
                                             "0000000c": dict(zero, tcptx=5)})
        self.assertEqual(updated, 2)
        counters = {r["id"]: r["counters"] for r in await store.load_instances()}
        self.assertEqual(counters, {"0000000a": dict(zero, tcprx=10), "0000000b": dict(zero, udptx=7)})

    async def test_a_bad_counter_in_a_batch_writes_nothing(self):
        store = await self.opened()
        await store.save_instance(row("0000000a"))
        zero = {"tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}
        with self.assertRaises(ValueError):
            await store.save_counters({"0000000a": zero, "0000000b": dict(zero, tcprx=-1)})
        self.assertEqual((await store.load_instances())[0]["counters"], row()["counters"])

    async def test_durability_pragmas(self):
        """WAL and synchronous=FULL whatever the build's defaults: here every
        new connection starts with synchronous=OFF."""
        connect = sqlite3.connect

        def careless(*args, **kwargs):
            db = connect(*args, **kwargs)
            db.execute("PRAGMA synchronous=OFF")
            return db
        self.patch(sqlite3, "connect", careless)
        store = await self.opened()
        await store.save_instance(row())
        self.assertEqual(query(self.path, "PRAGMA journal_mode"), [("wal",)])
        # synchronous is per connection: ask the store's own, on its thread.
        sync = await store._call(lambda: store._db.execute("PRAGMA synchronous").fetchone()[0])
        self.assertEqual(sync, 2)  # FULL
        self.assertFalse(await store._call(lambda: store._db.in_transaction))

    async def test_write_is_committed_when_the_deferred_fires(self):
        """Another connection sees the row as soon as save_instance fires."""
        store = await self.opened()
        await store.save_instance(row())
        self.assertEqual(query(self.path, "SELECT id FROM instances"), [("0123abcd",)])

    async def test_closed_store_refuses_calls(self):
        store = await self.opened()
        await store.close()
        with self.assertRaises(StoreError):
            await store.load_instances()
        self.assertFalse(store._pool.started or any(t.is_alive() for t in store._pool.threads))


class TriggerReactor:
    """The real reactor, with its system event triggers recorded instead."""

    def __init__(self):
        self.triggers = {}

    def __getattr__(self, name):
        return getattr(reactor, name)

    def addSystemEventTrigger(self, phase, event, f, *args):
        key = object()
        self.triggers[key] = (phase, event, f)
        return key

    def removeSystemEventTrigger(self, key):
        del self.triggers[key]


class ShutdownTests(StoreTestBase):
    async def test_close_removes_the_shutdown_trigger(self):
        fake = TriggerReactor()
        store = Store(self.dir, fake)
        await store.open()
        self.assertEqual([t[:2] for t in fake.triggers.values()], [("during", "shutdown")])
        await store.close()
        self.assertEqual(fake.triggers, {})

    async def test_reactor_shutdown_stops_an_unclosed_store_thread(self):
        """A thread left running would keep the process from exiting."""
        fake = TriggerReactor()
        store = Store(self.dir, fake)
        await store.open()
        pending = store.save_instance(row())
        [(_, _, trigger)] = fake.triggers.values()
        trigger()
        self.assertFalse(store._pool.started or any(t.is_alive() for t in store._pool.threads))
        await pending  # queued before: it ran
        self.assertEqual(query(self.path, "SELECT id FROM instances"), [("0123abcd",)])
        with self.assertRaises(StoreError):
            await store.get_setting("master_id")
        await store.close()


class ValidationTests(StoreTestBase):
    async def test_bad_rows_are_refused_before_any_write(self):
        store = await self.opened()
        bad = [
            row(id="0123ABCD"), row(id="0123abc"), row(id="0123abcd\n"), row(id=1234), row(alias=None),
            row(url=b"server://"), row(restart=1), row(desired="paused"), row(meta=[]),
            row(meta={"peer": {"sid": 1}}), row(meta={"tags": {"a": ["b"]}}), row(meta={"other": {}}),
            row(counters={"tcprx": 1}), row(counters={"tcprx": 1, "tcptx": 1, "udprx": 1, "udptx": 1.5}),
            row(counters={"tcprx": True, "tcptx": 1, "udprx": 1, "udptx": 1}), row(created="now"),
            row(created=float("nan")), dict(row(), status="running"), "not a row",
        ]
        missing = row()
        del missing["desired"]
        for value in bad + [missing]:
            with self.assertRaises(ValueError, msg=repr(value)):
                await store.save_instance(value)
        for id in ("", "../../etc", None, "0123abcd0"):
            with self.assertRaises(ValueError):
                await store.delete_instance(id)
        for name, value in (("", "v"), ("Name", "v"), ("a" * 65, "v"), ("ok", 5), (None, "v")):
            with self.assertRaises(ValueError):
                await store.set_setting(name, value)
        with self.assertRaises(ValueError):
            await store.save_counters([])
        self.assertEqual(await store.load_instances(), [])

    async def test_an_invalid_stored_row_is_left_out_and_logged(self):
        """Rows edited by hand (bad JSON, wrong types, a bad id) do not stop
        the sound ones loading."""
        store = await self.opened()
        damages = ["meta = '{not json'", "meta = '[1, 2]'", "counters = '{\"tcprx\": -1}'", "counters = X'00ff'",
                   "restart = 5", "desired = 'paused'", "created = 'yesterday'", "id = 'NOT-HEX!'",
                   "meta = '" + "[" * 100000 + "'"]
        ids = [f"{i:08x}" for i in range(len(damages))]
        await store.save_instance(row("ffffffff"))
        for id in ids:
            await store.save_instance(row(id))
        db = sqlite3.connect(self.path)
        for id, damage in zip(ids, damages):
            db.execute(f"UPDATE instances SET {damage} WHERE id = ?", (id,))
        db.commit()
        db.close()
        with capturedLogs() as events:
            rows = await store.load_instances()
        self.assertEqual([r["id"] for r in rows], ["ffffffff"])
        invalid = [e for e in events if e.get("event") == "state_row_invalid"]
        self.assertEqual(len(invalid), len(damages))
        self.assertEqual({e["log_level"] for e in invalid}, {LogLevel.error})
        self.assertIn("00000000", formatEvent(invalid[0]))


class MigrationTests(StoreTestBase):
    async def test_empty_database_is_migrated_to_the_current_version(self):
        os.makedirs(self.dir)
        sqlite3.connect(self.path).close()  # an existing, empty database (user_version 0)
        store = await self.opened()
        self.assertEqual(query(self.path, "PRAGMA user_version"), [(len(storemod.MIGRATIONS),)])
        await store.save_instance(row())
        self.assertEqual(len(await store.load_instances()), 1)

    async def test_migrations_run_in_order_from_the_stored_version(self):
        ran = []
        self.patch(storemod, "MIGRATIONS", storemod.MIGRATIONS + (
            lambda db: ran.append(2) or db.execute("CREATE TABLE extra (x)"),
            lambda db: ran.append(3) or db.execute("INSERT INTO extra VALUES (1)")))
        store = await self.opened()
        self.assertEqual(ran, [2, 3])
        await store.close()
        self.assertEqual(query(self.path, "PRAGMA user_version"), [(3,)])
        self.assertEqual(query(self.path, "SELECT x FROM extra"), [(1,)])
        await self.opened()
        self.assertEqual(ran, [2, 3])  # not again

    async def test_a_failed_migration_leaves_the_old_version(self):
        def broken(db):
            db.execute("CREATE TABLE half (x)")
            raise RuntimeError("boom")
        self.patch(storemod, "MIGRATIONS", storemod.MIGRATIONS + (broken,))
        with self.assertRaises(RuntimeError):
            await Store(self.dir, reactor).open()
        self.assertEqual(query(self.path, "PRAGMA user_version"), [(1,)])
        self.assertEqual(query(self.path, "SELECT name FROM sqlite_master WHERE name = 'half'"), [])

    async def test_a_newer_schema_is_refused_and_left_alone(self):
        os.makedirs(self.dir)
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        store = Store(self.dir, reactor)
        with self.assertRaises(StoreError) as caught:
            await store.open()
        self.assertIn("schema version 99", str(caught.exception))
        self.assertEqual(query(self.path, "PRAGMA user_version"), [(99,)])
        # the thread does not outlive a failed open
        self.assertFalse(store._pool.started or any(t.is_alive() for t in store._pool.threads))
        self.assertEqual(sorted(os.listdir(self.dir)), ["state.db"])


class DamageTests(StoreTestBase):
    def damage_events(self, events, name):
        found = [e for e in events if e.get("event") == name]
        self.assertEqual(len(found), 1, [formatEvent(e) for e in events])
        return found[0]

    async def assert_restored(self, damage):
        await self.populated()
        damage()
        with capturedLogs() as events:
            store = await self.opened()
        self.assertEqual(self.description,
                         f"state: restored from backup {self.backup_path}: 40 instances in {self.path}")
        event = self.damage_events(events, "state_restored")
        self.assertEqual(event["log_level"], LogLevel.warn)
        text = formatEvent(event)
        [aside] = [n for n in os.listdir(self.dir) if n.startswith("state.db.corrupt-") and n[-4:] not in SIDES]
        self.assertIn(os.path.join(self.dir, aside), text)
        self.assertIn(self.backup_path, text)
        self.assertEqual(len(await store.load_instances()), 40)
        self.assertEqual(await store.get_setting("master_id"), "m1")
        return aside

    async def test_garbage_file_is_moved_aside_and_the_backup_used(self):
        garbage = os.urandom(8192)

        def damage():
            with open(self.path, "wb") as f:
                f.write(garbage)
        aside = await self.assert_restored(damage)
        with open(os.path.join(self.dir, aside), "rb") as f:
            self.assertEqual(f.read(), garbage)  # kept as it was, for a post-mortem
        self.assertRegex(aside, r"^state\.db\.corrupt-\d{8}T\d{6}Z$")

    async def test_truncated_file_is_moved_aside_and_the_backup_used(self):
        def damage():
            os.truncate(self.path, os.path.getsize(self.path) // 2)
        await self.assert_restored(damage)

    async def test_file_emptied_while_a_backup_exists_is_restored(self):
        await self.assert_restored(lambda: os.truncate(self.path, 0))

    async def test_wal_files_move_aside_with_the_database(self):
        def damage():
            with open(self.path, "r+b") as f:
                f.write(b"\0" * 100)  # the header
            for suffix in ("-wal", "-shm"):
                with open(self.path + suffix, "wb") as f:
                    f.write(b"w" * 10)
        aside = await self.assert_restored(damage)
        for suffix in ("-wal", "-shm"):
            self.assertTrue(os.path.exists(os.path.join(self.dir, aside + suffix)))

    async def test_backup_is_never_modified_by_a_restore(self):
        await self.populated()
        with open(self.backup_path, "rb") as f:
            before = f.read()
        with open(self.path, "wb") as f:
            f.write(b"junk" * 100)
        store = await self.opened()
        await store.save_instance(row("ffffffff"))
        with open(self.backup_path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertFalse(os.path.exists(self.backup_path + "-wal"))

    async def test_damaged_and_no_backup_starts_empty_with_an_error(self):
        os.makedirs(self.dir)
        with open(self.path, "wb") as f:
            f.write(b"SQLite format 3\0" + os.urandom(4000))
        with capturedLogs() as events:
            store = await self.opened()
        self.assertEqual(self.description, f"state: damaged and no usable backup, new database {self.path}")
        event = self.damage_events(events, "state_lost")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertIn("no backup file", formatEvent(event))
        self.assertEqual(await store.load_instances(), [])
        await store.save_instance(row())
        self.assertEqual(len(await store.load_instances()), 1)

    async def test_damaged_backup_is_not_used(self):
        await self.populated()
        for path in (self.path, self.backup_path):
            with open(path, "wb") as f:
                f.write(os.urandom(4096))
        with capturedLogs() as events:
            store = await self.opened()
        event = self.damage_events(events, "state_lost")
        self.assertIn(self.backup_path, formatEvent(event))
        self.assertEqual(await store.load_instances(), [])
        self.assertEqual([n for n in os.listdir(self.dir) if ".tmp" in n], [])

    async def test_sound_database_is_not_touched(self):
        await self.populated()
        with capturedLogs() as events:
            await self.opened()
        self.assertEqual(self.description, f"state: 40 instances in {self.path}")
        self.assertEqual([e for e in events if e.get("event")], [])
        self.assertFalse([n for n in os.listdir(self.dir) if "corrupt" in n])


SIDES = ("-wal", "-shm")


class BackupTests(StoreTestBase):
    async def test_backup_is_a_valid_database_with_the_same_content(self):
        store = await self.opened()
        await store.save_instance(row("0000000a"))
        await store.set_setting("master_id", "m1")
        self.assertEqual(await store.backup(), self.backup_path)
        self.assertEqual(stat.S_IMODE(os.stat(self.backup_path).st_mode), 0o600)
        self.assertFalse(os.path.exists(self.backup_path + ".tmp"))
        copy = os.path.join(self.mktemp())
        os.makedirs(copy)
        with open(self.backup_path, "rb") as src, open(os.path.join(copy, "state.db"), "wb") as dst:
            dst.write(src.read())
        self.assertEqual(query(os.path.join(copy, "state.db"), "PRAGMA integrity_check"), [("ok",)])
        other = await self.opened(copy)
        self.assertEqual(await other.load_instances(), await store.load_instances())
        self.assertEqual(await other.get_setting("master_id"), "m1")

    async def test_backup_interleaved_with_writes(self):
        """Writes queued around a backup all land; the backup holds exactly
        those queued before it (one thread: the order of the calls)."""
        store = await self.opened()
        pending = [store.save_instance(row(f"{i:08x}")) for i in range(20)]
        pending.append(store.backup())
        pending += [store.save_instance(row(f"{i:08x}")) for i in range(20, 30)]
        for d in pending:
            await d
        self.assertEqual(len(await store.load_instances()), 30)
        self.assertEqual(query(self.backup_path, "SELECT count(*) FROM instances"), [(20,)])

    async def test_a_stale_temp_file_does_not_block_a_backup(self):
        store = await self.opened()
        with open(self.backup_path + ".tmp", "wb") as f:
            f.write(b"left by a crash")
        await store.backup()
        self.assertEqual(query(self.backup_path, "PRAGMA integrity_check"), [("ok",)])
