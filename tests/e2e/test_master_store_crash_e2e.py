# -*- test-case-name: tests.e2e.test_master_store_crash_e2e -*-
"""End-to-end: the store loses no acknowledged mutation to a SIGKILL.

``tests/e2e/store_crash.py`` runs as a real process writing seeded random
mutations and printing ``ACK`` after each one's Deferred fired; the test
SIGKILLs it at seeded random moments (during start-up and open, and after a
random number of ACKs plus a random delay), then opens the database itself:
it must pass ``integrity_check`` and hold every ACKed mutation (last write
wins), plus at most the one mutation that was in flight.  The next round
continues on the same files, so recovery after a kill is exercised too.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.e2e.harness import ROOT
from tests.e2e.store_crash import instance_row, mutations, setting_value

SEED = 1313
ROUNDS = 10


def read_state(path: str, scratch: str) -> tuple[dict, dict]:
    """``(instances by id, settings by name)`` as the next process will see
    them.  Read from a copy of the database and its WAL in *scratch*: opening
    the files themselves would checkpoint the WAL, and the next round must
    recover from exactly what the kill left."""
    if not os.path.exists(path):
        return {}, {}
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    copy = os.path.join(scratch, "state.db")
    shutil.copyfile(path, copy)
    if os.path.exists(path + "-wal"):
        shutil.copyfile(path + "-wal", copy + "-wal")
    db = sqlite3.connect(copy)
    try:
        check = db.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            raise unittest.FailTest(f"{path}: integrity_check says {check}")
        if db.execute("PRAGMA user_version").fetchone()[0] == 0:
            return {}, {}  # killed before the first migration committed
        instances = {r[0]: r for r in db.execute(
            "SELECT id, alias, url, restart, desired, meta, counters, created FROM instances")}
        settings = dict(db.execute("SELECT name, value FROM settings"))
        return instances, settings
    finally:
        db.close()


def expected_state(model_instances: dict, model_settings: dict) -> tuple[dict, dict]:
    """The rows a model (id -> n of the last save, name -> n) stands for."""
    import json

    def dump(value):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    instances = {}
    for id, n in model_instances.items():
        r = instance_row(n, id)
        instances[id] = (id, r["alias"], r["url"], int(r["restart"]), r["desired"], dump(r["meta"]),
                         dump(r["counters"]), r["created"])
    return instances, {name: setting_value(n) for name, n in model_settings.items()}


def apply(model: tuple[dict, dict], mutation) -> tuple[dict, dict]:
    instances, settings = dict(model[0]), dict(model[1])
    n, op, key = mutation
    if op == "save":
        instances[key] = n
    elif op == "delete":
        instances.pop(key, None)
    else:
        settings[key] = n
    return instances, settings


class StoreCrashTests(unittest.TestCase):
    def run_round(self, directory, seed, start, count, kill_after, delay, log) -> tuple[list, bool]:
        """Run the writer; SIGKILL it *delay* s after its *kill_after*-th ACK
        (or after start-up when kill_after is 0; never when None).
        Returns the ACKed mutations and whether it finished on its own."""
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.store_crash", directory, str(seed), str(start), str(count)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        acks, buffer, killed = [], b"", False
        started = time.monotonic()
        deadline = started + 20
        if kill_after == 0:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            killed = True
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if not ready:
                continue
            data = os.read(process.stdout.fileno(), 65536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.decode().split()
                if words[0] == "ACK":
                    acks.append((int(words[1]), words[2], words[3]))
            if not killed and kill_after is not None and len(acks) >= kill_after:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                killed = True
        else:
            self.fail("the writer neither finished nor died within 20 s")
        code = process.wait(10)
        finished = not killed or code == 0
        self.assertEqual(code, 0 if finished else -signal.SIGKILL)
        return acks, finished

    def test_every_acked_mutation_survives_sigkill(self):
        rng = random.Random(SEED)
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "state.db")
        log_path = directory + ".stderr"
        scratch = directory + ".check"
        model = ({}, {})
        start, total, kills = 0, 0, 0
        with open(log_path, "wb") as log:
            for round in range(ROUNDS):
                last = round == ROUNDS - 1
                count = 20 if last else 200
                kill_after = None if last else (0 if round in (0, 4) else rng.randint(10, 80))
                delay = rng.choice((0.0, 0.0005, 0.002, 0.01)) if kill_after else rng.uniform(0.05, 0.6)
                seed = rng.randrange(1 << 30)
                acks, finished = self.run_round(directory, seed, start, count, kill_after, delay, log)
                planned = list(mutations(seed, start, count))
                self.assertEqual(acks, planned[:len(acks)], "ACKs are the planned mutations, in order")
                for mutation in acks:
                    model = apply(model, mutation)
                candidates = [model]
                if not finished and len(acks) < count:
                    candidates.append(apply(model, planned[len(acks)]))  # in flight when killed
                with open(log_path, "rb") as f:
                    stderr = f.read().decode(errors="replace")[-3000:]
                actual = read_state(path, scratch)
                matches = [c for c in candidates if expected_state(*c) == actual]
                self.assertTrue(matches, f"round {round}: state after kill matches no ACKed prefix "
                                         f"({len(acks)} ACKs); writer stderr:\n{stderr}")
                model = matches[-1]
                if os.path.exists(path + ".backup"):
                    read_state(path + ".backup", scratch)  # a sound database (integrity_check ok)
                total += len(acks)
                kills += not finished
                start += count
        self.assertTrue(finished, "the last round runs to the end")
        self.assertGreaterEqual(total, 150)
        self.assertGreaterEqual(kills, ROUNDS - 1)
