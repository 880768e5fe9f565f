# -*- test-case-name: tests.test_master_store -*-
"""The store's files on disk: whether a database is damaged (checked on a
private copy), moving a damaged set aside, restoring the backup, fsync.
Everything here runs on the store's own thread."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time

SIDE_FILES = ("-wal", "-shm")


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(path: str, allow_empty: bool = True) -> str | None:
    """Why the database at *path* (with its WAL, if any) is unusable, or None.
    The check runs on a private copy: opening a database can checkpoint or
    drop its WAL, and a damaged set must be kept exactly as it was found."""
    tmp = path + ".check.tmp"
    try:
        copy(path, tmp)
        if os.path.exists(path + "-wal"):
            copy(path + "-wal", tmp + "-wal")
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            version = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    finally:
        remove_set(tmp)
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:3])
    if version == 0 and not allow_empty:
        return "an empty database"
    return None


def copy(source: str, target: str) -> None:
    remove_set(target)
    shutil.copyfile(source, target)
    os.chmod(target, 0o600)


def remove_set(path: str) -> None:
    for name in (path, *(path + s for s in SIDE_FILES + ("-journal",))):
        if os.path.lexists(name):
            os.unlink(name)


def move_aside(path: str) -> str:
    """Rename the database and its WAL files to ``NAME.corrupt-<UTC time>``
    (they stay a consistent set for a post-mortem)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = f"{path}.corrupt-{stamp}", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{path}.corrupt-{stamp}.{n}"
    os.replace(path, aside)
    for suffix in SIDE_FILES:
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    fsync_path(os.path.dirname(path) or ".")
    return aside


def restore(backup: str, path: str) -> str | None:
    """Put a copy of *backup* at *path* if it is sound; return why not, else
    None.  The backup itself is never opened (opening would give it a WAL)."""
    try:
        why = damage(backup, allow_empty=False)
        if why is None:
            tmp = path + ".restore.tmp"
            copy(backup, tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(os.path.dirname(path) or ".")
        return why
    except OSError as e:
        return str(e)
