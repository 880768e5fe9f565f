"""Crash consistency of the master's state, over its API: SIGKILL the
master at random moments during 1,000 mutations; after every restart the
database opens and every mutation that was answered 2xx is there."""

from __future__ import annotations

import random
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import free_port
from tests.e2e.master_harness import STRONG, Master

MUTATIONS = 1000
KILLS = 6
SEED = 1313


class Field:
    """One value the master stores: the last value a 2xx answer confirmed,
    and values sent since whose answer never came (the kill may have landed
    before or after their commit)."""

    def __init__(self, value):
        self.acked, self.pending = value, []

    def possible(self) -> list:
        return [self.acked, *self.pending]


class CrashConsistencyTests(unittest.TestCase):
    def test_answered_mutations_survive_sigkill(self):
        rng = random.Random(SEED)
        master = Master(self)
        port, state_dir, key = master.port, master.state_dir, master.key
        instances: dict[str, dict] = {}  # id -> {"alias": Field, "tags": Field, "exists": Field}
        info_alias = Field("")
        done = answered = kills = 0
        # The kills land at random mutations, a random 0-30 ms into the request
        # (before, during or after its commit).
        kill_at = set(rng.sample(range(20, MUTATIONS), KILLS))
        current = master
        while done < MUTATIONS:
            done += 1
            if done in kill_at:
                threading.Timer(rng.uniform(0, 0.03), current.sigkill).start()
            live = [i for i, f in instances.items() if f["exists"].acked]
            choice = rng.random()
            try:
                if choice < 0.12 or len(live) < 2:
                    tunnel, target = free_port(), free_port()
                    url = f"server://{STRONG}@127.0.0.1:{tunnel}/127.0.0.1:{target}"
                    status, _, body = current.call("POST", "/instances", {"alias": f"a{done}", "url": url},
                                                   timeout=5)
                    if status == 201:
                        instances[body["id"]] = {"alias": Field(f"a{done}"), "tags": Field({}),
                                                 "exists": Field(True)}
                elif choice < 0.25 and len(live) > 3:
                    victim = rng.choice(live)
                    instances[victim]["exists"].pending.append(False)
                    status, _, _ = current.call("DELETE", f"/instances/{victim}", timeout=5)
                    if status == 204:
                        instances[victim]["exists"] = Field(False)
                elif choice < 0.35:
                    alias = f"m{done}"
                    info_alias.pending.append(alias)
                    status, _, _ = current.call("POST", "/info", {"alias": alias}, timeout=5)
                    if status == 200:
                        info_alias = Field(alias)
                else:
                    target = rng.choice(live)
                    if rng.random() < 0.5:
                        alias = f"p{done}"
                        instances[target]["alias"].pending.append(alias)
                        status, _, _ = current.call("PATCH", f"/instances/{target}", {"alias": alias}, timeout=5)
                        if status == 200:
                            instances[target]["alias"] = Field(alias)
                    else:
                        tags = {"n": str(done)}
                        instances[target]["tags"].pending.append(tags)
                        status, _, _ = current.call("PATCH", f"/instances/{target}", {"meta": {"tags": tags}},
                                                    timeout=5)
                        if status == 200:
                            instances[target]["tags"] = Field(tags)
                answered += 1
            except OSError:
                try:
                    current.process.wait(5)  # the killer's SIGKILL: the answer is lost, not refused
                except Exception:
                    raise AssertionError(f"request failed while the master lives:\n{current.log()[-3000:]}")
                kills += 1
                current = self.restart_and_check(port, state_dir, key, instances, info_alias)
                info_alias = Field(current.ok("GET", "/info")["alias"])
        current.sigkill()
        kills += 1
        self.restart_and_check(port, state_dir, key, instances, info_alias)
        print(f"{MUTATIONS} mutations, {answered} answered, {kills} SIGKILLs")
        self.assertGreaterEqual(kills, KILLS // 2)

    def restart_and_check(self, port, state_dir, key, instances, info_alias) -> Master:
        for _ in range(50):  # the killed master's port may linger for a moment
            try:
                master = Master(self, state_dir=state_dir, port=port, key=key)
                break
            except AssertionError as e:
                if "cannot listen" not in str(e):
                    raise
                time.sleep(0.1)
        listed = {i["id"]: i for i in master.ok("GET", "/instances")}
        for id, fields in instances.items():
            exists = id in listed
            self.assertIn(exists, fields["exists"].possible(), f"instance {id} existence")
            fields["exists"] = Field(exists)
            if exists:
                got = listed[id]
                self.assertIn(got["alias"], fields["alias"].possible(), f"instance {id} alias")
                self.assertIn(got["meta"]["tags"], fields["tags"].possible(), f"instance {id} tags")
                fields["alias"], fields["tags"] = Field(got["alias"]), Field(got["meta"]["tags"])
        unknown = set(listed) - set(instances)
        self.assertEqual(unknown - set(), unknown)  # created but unanswered: allowed, adopted below
        for id in unknown:
            instances[id] = {"alias": Field(listed[id]["alias"]), "tags": Field(listed[id]["meta"]["tags"]),
                             "exists": Field(True)}
        self.assertIn(master.ok("GET", "/info")["alias"], info_alias.possible(), "master alias")
        return master
