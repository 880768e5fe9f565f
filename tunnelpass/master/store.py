# -*- test-case-name: tests.test_master_store -*-
"""The master's durable state: instances and settings in one SQLite file.

``state.db`` runs in WAL mode with ``synchronous=FULL`` and explicit
transactions, so every Deferred a mutation returns fires only after its
COMMIT reached the disk: an API answer sent after it survives a crash.
All SQLite work happens on one thread the store owns (one connection,
created on that thread and used only there), so the reactor never blocks on
the disk and the operations are serialised in call order.

On open a damaged file (fails ``PRAGMA integrity_check`` or is not a
database at all) is moved aside, never deleted, and ``state.db.backup``
(written by :meth:`Store.backup` with SQLite's online backup API) takes its
place when it passes its own check.  The schema is versioned with
``PRAGMA user_version`` and an ordered list of migrations; a database
written by a newer tunnelpass is refused rather than misread.
"""

from __future__ import annotations

import json
import os
import sqlite3

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from tunnelpass.master.rows import check_counters, check_id, check_row, check_setting
from tunnelpass.master.storefiles import damage, fsync_path, move_aside, restore

DB_NAME = "state.db"
BACKUP_NAME = DB_NAME + ".backup"



class StoreError(Exception):
    """The state cannot be used as it is (a newer schema, a closed store):
    the master must not start on it."""


# Migrations: migration i (0-based) takes user_version i to i + 1, inside
# the transaction that also sets the new user_version.

def _v1(db: sqlite3.Connection) -> None:
    # meta and counters hold JSON: {"peer": {...}, "tags": {...}} and {"tcprx": n, ...}.
    db.execute("CREATE TABLE instances (id TEXT PRIMARY KEY NOT NULL, alias TEXT NOT NULL, url TEXT NOT NULL,"
               " restart INTEGER NOT NULL, desired TEXT NOT NULL, meta TEXT NOT NULL, counters TEXT NOT NULL,"
               " created REAL NOT NULL)")
    db.execute("CREATE TABLE settings (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)")


MIGRATIONS = (_v1,)


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _row_from_db(record) -> dict:
    id_, alias, url, restart, desired, meta, counters, created = record
    row = {"id": id_, "alias": alias, "url": url, "restart": {0: False, 1: True}.get(restart, restart),
           "desired": desired, "meta": json.loads(meta), "counters": json.loads(counters), "created": created}
    return check_row(row)


class Store:
    """The master's instances and settings (see the module docstring).

    Every method returns a Deferred that fires in the reactor thread; the
    work itself runs on the store's own thread, one call at a time."""

    log = Logger()

    def __init__(self, directory: str, reactor):
        self.directory = directory
        self.path = os.path.join(directory, DB_NAME)
        self.backup_path = os.path.join(directory, BACKUP_NAME)
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._trigger = None
        self._db: sqlite3.Connection | None = None  # touched only on the pool's thread
        self._closed = False

    # lifecycle

    def open(self) -> defer.Deferred:
        """Open (or create, restore, migrate) ``state.db``; fires with a one-line
        description for the log.  Fails with :class:`StoreError` on a schema
        newer than this code."""
        if self._pool is not None or self._closed:
            return defer.fail(StoreError("the store was already opened"))
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="tunnelpass-store")
        self._pool.start()
        self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        d = deferToThreadPool(self._reactor, self._pool, self._open)
        d.addCallbacks(self._opened, self._open_failed)
        return d

    def _open_failed(self, failure):
        self._closed = True  # the thread does not outlive a failed open
        return self._after_close(failure)

    def close(self) -> defer.Deferred:
        """Close the connection (after every call queued before) and stop the thread."""
        if self._pool is None or self._closed:
            self._closed = True
            return defer.succeed(None)
        self._closed = True
        d = deferToThreadPool(self._reactor, self._pool, self._close)
        d.addBoth(self._after_close)
        return d

    def _after_close(self, result):
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._stop_pool()
        return result

    def _shutdown(self) -> None:
        """The reactor stops and nobody closed the store: stop the thread (after
        the calls queued), or it would keep the process alive."""
        self._trigger = None
        self._closed = True
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _call(self, f, *args) -> defer.Deferred:
        if self._pool is None or self._closed:
            return defer.fail(StoreError("the store is not open"))
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _submit(self, build) -> defer.Deferred:
        """Validate and prepare a write in the caller's thread (a bad value
        fails at once, and later changes to the caller's dicts cannot race
        the thread), then run its statements as one transaction."""
        try:
            statements = build()
        except ValueError:
            return defer.fail()
        return self._call(self._write, statements)

    # the API

    def load_instances(self) -> defer.Deferred:
        """Fires with every stored InstanceRow, oldest first.  A row that no
        longer validates is left out and logged (it cannot be run anyway)."""
        return self._call(self._load).addCallback(self._loaded)

    def save_instance(self, row: dict) -> defer.Deferred:
        """Insert or replace *row* (a complete InstanceRow); fires after COMMIT."""
        def build():
            r = check_row(row)
            return (("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET alias ="
                     " excluded.alias, url = excluded.url, restart = excluded.restart, desired = excluded.desired,"
                     " meta = excluded.meta, counters = excluded.counters, created = excluded.created",
                     (r["id"], r["alias"], r["url"], int(r["restart"]), r["desired"], _json(r["meta"]),
                      _json(r["counters"]), float(r["created"]))),)
        return self._submit(build)

    def delete_instance(self, id: str) -> defer.Deferred:
        """Delete instance *id*; fires (after COMMIT) with whether it existed."""
        return self._submit(lambda: (("DELETE FROM instances WHERE id = ?", (check_id(id),)),)).addCallback(bool)

    def save_counters(self, counters: dict) -> defer.Deferred:
        """Store ``{id: {"tcprx", "tcptx", "udprx", "udptx"}}`` in one
        transaction; ids with no row are ignored.  Fires with the rows updated."""
        def build():
            if not isinstance(counters, dict):
                raise ValueError("counters must be a dict of id -> counters")
            return tuple(("UPDATE instances SET counters = ? WHERE id = ?", (_json(check_counters(c)), check_id(i)))
                         for i, c in counters.items())
        return self._submit(build)

    def get_setting(self, name: str) -> defer.Deferred:
        """Fires with the setting's value, or None when it was never set."""
        try:
            check_setting(name, "")
        except ValueError:
            return defer.fail()
        return self._call(self._get_setting, name)

    def set_setting(self, name: str, value: str) -> defer.Deferred:
        """Set *name* to *value*; fires after COMMIT."""
        return self._submit(lambda: (("INSERT INTO settings VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET"
                                      " value = excluded.value", check_setting(name, value)),))

    def backup(self) -> defer.Deferred:
        """Write a consistent copy to ``state.db.backup`` (a temp file in the
        same directory, fsync, rename, fsync of the directory); fires with
        its path.  Writes queued meanwhile wait their turn on the thread."""
        return self._call(self._backup)

    # On the store's thread

    def _open(self) -> tuple[str, tuple]:
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        how, note = ("opened", ()) if os.path.exists(self.path) else ("new", ())
        has_backup = os.path.exists(self.backup_path)
        why = damage(self.path, allow_empty=not has_backup) if how == "opened" else None
        if why is not None:
            fields = dict(path=self.path, why=why, aside=move_aside(self.path), backup=self.backup_path)
            fields["backup_why"] = restore(self.backup_path, self.path) if has_backup else "no backup file"
            if fields["backup_why"] is None:
                how, note = "restored", ("warn", "state: {path} is damaged ({why}); moved aside to {aside} and"
                                         " restored from {backup}", dict(fields, event="state_restored"))
            else:
                how, note = "lost", ("error", "state: {path} is damaged ({why}); moved aside to {aside}; {backup}"
                                     " is not usable ({backup_why}): starting with no instances",
                                     dict(fields, event="state_lost"))
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            fsync_path(self.directory)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode})")
            db.execute("PRAGMA synchronous=FULL")
            self._migrate(db)
            count = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        except BaseException:
            db.close()
            raise
        self._db = db
        text = {"new": f"state: new database {self.path}",
                "opened": f"state: {count} instances in {self.path}",
                "restored": f"state: restored from backup {self.backup_path}: {count} instances in {self.path}",
                "lost": f"state: damaged and no usable backup, new database {self.path}"}[how]
        return text, note

    def _opened(self, result) -> str:
        text, note = result  # logged here, in the reactor thread
        if note:
            getattr(self.log, note[0])(note[1], **note[2])
        return text

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(f"{self.path} has schema version {version}, newer than this tunnelpass knows"
                             f" ({len(MIGRATIONS)}): refusing to use it (run the newer version, or move it aside)")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[target - 1](db)
                db.execute(f"PRAGMA user_version = {target:d}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _write(self, statements) -> int:
        db = self._db
        changed = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                changed += db.execute(sql, params).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return changed

    def _load(self) -> tuple[list, list]:
        rows, bad = [], []
        for record in self._db.execute("SELECT id, alias, url, restart, desired, meta, counters, created"
                                       " FROM instances ORDER BY created, id"):
            try:
                rows.append(_row_from_db(record))
            except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
                bad.append((str(record[0])[:40], str(e)))
        return rows, bad

    def _loaded(self, result) -> list:
        rows, bad = result
        for id_, why in bad:
            self.log.error("state: instance {id} in {path} is invalid and left out: {why}",
                           id=id_, path=self.path, why=why, event="state_row_invalid")
        return rows

    def _get_setting(self, name: str):
        row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def _backup(self) -> str:
        tmp = self.backup_path + ".tmp"
        for name in (tmp, tmp + "-journal"):
            if os.path.lexists(name):
                os.unlink(name)
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        dest = sqlite3.connect(tmp, isolation_level=None)
        try:
            self._db.backup(dest)
        finally:
            dest.close()
        fsync_path(tmp)
        os.replace(tmp, self.backup_path)
        fsync_path(self.directory)
        return self.backup_path
