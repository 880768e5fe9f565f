# -*- test-case-name: tests.e2e.test_master_store_crash_e2e -*-
"""A store under a stream of mutations, to be SIGKILLed at any moment.

Opens a :class:`tunnelpass.master.store.Store` in DIR, then runs COUNT
seeded random mutations one after another; after each one's Deferred fires
(its COMMIT is done) it prints ``ACK <n> <op> <id>`` and flushes.  Every
BACKUP_EVERY mutations a backup is started alongside the next mutation (not
waited for), so backups run while writes continue.

    python -m tests.e2e.store_crash DIR SEED START COUNT

:func:`mutations` is the same sequence for the test that replays the ACKs:
mutation *n*'s values are derived from *n*, so the test knows what each
ACKed mutation wrote.
"""

from __future__ import annotations

import random
import sys

IDS = [f"{i:08x}" for i in range(0xA0, 0xA0 + 12)]
SETTINGS = ("api_key_hash", "master_id", "master_alias")
BACKUP_EVERY = 25


def instance_row(n: int, id: str) -> dict:
    """What mutation *n* saves for *id*."""
    return {"id": id, "alias": f"alias-{n}", "url": f"server://k{n}@:{10000 + n % 5000}/127.0.0.1:{n % 60000 + 1}",
            "restart": n % 2 == 0, "desired": ("running", "stopped")[n % 3 == 0],
            "meta": {"peer": {"sid": str(n), "type": "0", "alias": ""}, "tags": {"n": str(n)}},
            "counters": {"tcprx": n, "tcptx": 2 * n, "udprx": 3 * n, "udptx": n * n}, "created": float(n)}


def setting_value(n: int) -> str:
    return f"value-{n}"


def mutations(seed: int, start: int, count: int):
    """``(n, op, key)`` for n in [start, start + count): op is ``save``,
    ``delete`` or ``setting`` (key: an instance id or a setting name)."""
    rng = random.Random(seed)
    for n in range(start, start + count):
        roll = rng.random()
        if roll < 0.6:
            yield n, "save", rng.choice(IDS)
        elif roll < 0.8:
            yield n, "delete", rng.choice(IDS)
        else:
            yield n, "setting", rng.choice(SETTINGS)


async def run(reactor, directory: str, seed: int, start: int, count: int) -> None:
    from tunnelpass.master.store import Store

    store = Store(directory, reactor)
    print("OPEN", await store.open(), flush=True)
    backups = []
    for n, op, key in mutations(seed, start, count):
        if n % BACKUP_EVERY == 0:
            backups.append(store.backup())
        if op == "save":
            await store.save_instance(instance_row(n, key))
        elif op == "delete":
            await store.delete_instance(key)
        else:
            await store.set_setting(key, setting_value(n))
        sys.stdout.write(f"ACK {n} {op} {key}\n")
        sys.stdout.flush()
    for d in backups:
        await d
    await store.close()
    print("DONE", flush=True)


def main(argv) -> None:
    from twisted.internet import defer, task

    directory, seed, start, count = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, directory, seed, start, count)))


if __name__ == "__main__":
    main(sys.argv)
