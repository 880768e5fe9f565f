# -*- test-case-name: tests.test_master_registry -*-
"""The master's model: every instance, what the API asks of them, what the
supervisor reports about them, what the store keeps and what SSE tells.

Rules that hold throughout:

- a mutation answers only after the store has committed it (an answered
  2xx survives SIGKILL); when the store fails, memory is put back;
- operations on one instance run one at a time (a lock per instance), so a
  stop racing a start, or a delete racing a restart, cannot interleave;
- the supervisor never restarts an instance; here an ``error`` on an
  instance with ``restart`` on and wanted running is retried after a
  jittered, doubling delay (1 s .. 60 s, back to 1 s after a minute up);
- keys: list() and SSE events mask instance keys; get and the answers of
  create/patch/put show them (the caller holds the API key, and configures
  the other end with the key).

Differences from NodePass, for safety: a ``create``/``put`` is saved before
it starts; PATCH fields are all checked before any is applied, and unknown
fields are refused; the API key rotation is never published on SSE (NodePass
sends the new key to every subscriber); a PUT of a keyless server URL keeps
the instance's key (NodePass would generate another and break its client).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelpass import __version__
from tunnelpass.master.errors import ApiError
from tunnelpass.master.info import HostFigures, os_arch
from tunnelpass.master.instances import (API_KEY_ID, Instance, api_key_entry, check_patch, check_text,
                                         check_url, config_url)
from tunnelpass.master.lifecycle import InstanceLifecycle
from tunnelpass.master.tcping import TCPing

_MASTER_ID = re.compile(r"^[0-9a-f]{16}$")


def _new_key() -> tuple[str, str]:
    from tunnelpass.master.auth import hash_key, new_key

    key = new_key()
    return key, hash_key(key)


class Registry(InstanceLifecycle):
    log = Logger(namespace="tunnelpass.master")

    def __init__(self, reactor, store, supervisor, hub, keys, settings):
        import random

        self.reactor, self.store, self.supervisor = reactor, store, supervisor
        self.hub, self.keys, self.settings = hub, keys, settings
        self.random = random.random  # restart jitter; tests replace it
        self.addresses = None  # the host's addresses for client tokens; tests replace it
        self.instances: dict[str, Instance] = {}
        self.master_id, self.alias = "", settings.alias
        self.started = reactor.seconds()
        self.figures = HostFigures()
        self.pinger = TCPing(reactor)
        self.locks: dict[str, DeferredLock] = {}
        self.restarts: dict = {}  # id -> IDelayedCall of a due automatic restart
        self.failures: dict[str, int] = {}
        self.running_since: dict[str, float] = {}
        self.dirty: set[str] = set()
        self.saving = self.stopping = False
        self.saver = LoopingCall(self._flush)
        self.saver.clock = reactor

    # start and stop of the master

    def load(self) -> Deferred:
        """Rows -> instances; ``restart`` ones wanted running are started,
        the others come back stopped.  Fires with a line for the log."""
        return Deferred.fromCoroutine(self._load())

    async def _load(self) -> str:
        master_id = await self.store.get_setting("master_id")
        if not isinstance(master_id, str) or not _MASTER_ID.match(master_id):
            master_id = secrets.token_hex(8)
            await self.store.set_setting("master_id", master_id)
        self.master_id = master_id
        alias = await self.store.get_setting("master_alias")
        if isinstance(alias, str):
            self.alias = alias
        for row in await self.store.load_instances():
            try:
                instance = Instance.from_row(row, self.settings.log)
            except Exception:
                self.log.failure("stored instance {id} skipped", id=str(row.get("id"))[:16],
                                 event="instance_unreadable")
                continue
            self.instances[instance.id] = instance
        started = 0
        for instance in self._sorted():
            if instance.options is None:
                instance.status, instance.error = "error", "the stored URL no longer passes the checks"
                self.log.error("instance {id}: {error}; fix it with PUT or delete it", id=instance.id,
                               error=instance.error, event="instance_url_invalid")
            elif instance.restart and instance.desired == "running":
                self._start(instance)
                started += 1
            elif instance.desired == "running":
                instance.desired = "stopped"
                await self.store.save_instance(instance.to_row())
        if self.settings.report_interval > 0:
            self.saver.start(self.settings.report_interval, now=False)
        return f"instances: {len(self.instances)} loaded, {started} started"

    def stop(self) -> Deferred:
        """Master shutdown: every instance stopped at once (each drained for
        at most the shutdown timeout), counters saved, SSE subscribers told.
        What the operator wanted (``desired``) is left as it was, so the
        instances come back at the next start."""
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        self.stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        if self.saver.running:
            self.saver.stop()
        live = [instance for instance in self.instances.values() if instance.status != "stopped"]
        timeout = self.settings.shutdown_timeout
        stops = [self.supervisor.stop_instance(i.id, timeout) for i in live]
        if not await _bounded(self.reactor, stops, timeout + 2.0):
            self.log.warn("instances still stopping after {timeout} s; saving counters anyway", timeout=timeout,
                          event="instances_stop_late")
        for instance in live:
            self._ended(instance, "stopped")
        self.dirty.update(self.instances)
        self.saving = False
        await self._flush()
        self.hub.drop_all()

    # reads

    def list(self) -> list:
        return [instance.to_json(masked=True) for instance in self._sorted()]

    def get(self, id: str) -> dict:
        if id == API_KEY_ID:
            return api_key_entry(self.alias, self.master_id)
        instance = self._find(id)
        view = instance.to_json(masked=False)
        client = self.client_end(instance)
        if client is not None:
            view["client"] = client
        return view

    def client_end(self, instance: Instance) -> dict | None:
        """A server instance's client command and token (the full view only)."""
        from tunnelpass.master.clientcmd import client_end
        from tunnelpass.relay.hostaddrs import host_addresses

        directory = os.path.join(self.settings.state_dir, "instances", instance.id)
        return client_end(instance.options, directory, self.addresses() if self.addresses else host_addresses())

    def recent_logs(self, id: str) -> list:
        return list(self._find(id).logs)

    def info(self) -> dict:
        os_name, arch = os_arch()
        figures = self.figures.sample()
        info = {"mid": self.master_id, "alias": self.alias, "os": os_name, "arch": arch}
        info.update(figures)
        info.update({"ver": __version__, "name": socket.gethostname(),
                     "uptime": int(max(0.0, self.reactor.seconds() - self.started)), "log": self.settings.log,
                     "tls": str(self.settings.tls), "crt": self.settings.crt or "", "key": self.settings.key or ""})
        return info

    def tcping(self, target) -> Deferred:
        return self.pinger.ping(target)

    def samples(self) -> list:
        """Per instance, labelled ``instance`` (id) and ``alias``."""
        return [sample for instance in self._sorted() for sample in instance.samples()]

    # mutations

    def create(self, alias, url) -> Deferred:
        return Deferred.fromCoroutine(self._create(alias, url))

    async def _create(self, alias, url) -> dict:
        alias = check_text("" if alias is None else alias, "alias")
        url, options = check_url(url)
        id = self._new_id()
        instance = Instance(id, alias, url, options, self.settings.log, created=self.reactor.seconds())
        await self.store.save_instance(instance.to_row())
        self.instances[id] = instance
        self.log.info("instance {id} created: {url}", id=id, url=instance.to_json(masked=True)["url"],
                      event="instance_created")
        self._start(instance)
        self._publish("create", instance)
        return instance.to_json(masked=False)

    def patch(self, id: str, body) -> Deferred:
        return Deferred.fromCoroutine(self._patch(id, body))

    async def _patch(self, id: str, body) -> dict:
        if id == API_KEY_ID:
            return await self._rotate_key(body)
        changes = check_patch(body)
        async with self._lock(self._find(id).id):
            instance = self._find(id)
            saved = instance.snapshot()
            action = changes.get("action")
            for name in ("alias", "restart"):
                if name in changes:
                    setattr(instance, name, changes[name])
            if "meta" in changes:
                peer, tags = changes["meta"]["peer"], changes["meta"]["tags"]
                instance.meta = {"peer": peer if peer is not None else instance.meta["peer"],
                                 "tags": tags if tags is not None else instance.meta["tags"]}
            if action in ("start", "restart"):
                instance.desired = "running"
            elif action == "stop":
                instance.desired = "stopped"
            elif action == "reset":
                instance.reset()
            await self._save(instance, saved)
            if action in ("start", "restart"):
                self.failures.pop(id, None)
                if action == "restart" or instance.status != "running":
                    await self._stop(instance)
                    self._start(instance)
            elif action == "stop":
                await self._stop(instance)
            if "restart" in changes and not instance.restart:
                self._cancel_restart(id)
            elif instance.status == "error":
                self._schedule_restart(instance, holding=True)
            self._publish("update", instance)
            return instance.to_json(masked=False)

    async def _rotate_key(self, body) -> dict:
        """``PATCH /instances/********`` ``{"action": "restart"}``: a new API
        key, its hash committed before the holder takes it; the answer is
        the only time the key is shown."""
        if not isinstance(body, dict) or body != {"action": "restart"}:
            raise ApiError(400, 'The API key entry takes only {"action": "restart"}')
        key, key_hash = _new_key()
        await self.store.set_setting("api_key_hash", key_hash)
        self.keys.replace(key_hash)
        self.log.warn("API key rotated; the old key no longer works", event="api_key_rotated")
        return api_key_entry(self.alias, self.master_id, key)

    def put(self, id: str, url) -> Deferred:
        return Deferred.fromCoroutine(self._put(id, url))

    async def _put(self, id: str, url) -> dict:
        if id == API_KEY_ID:
            raise ApiError(403, "Forbidden: API Key")
        async with self._lock(self._find(id).id):
            instance = self._find(id)
            url, options = check_url(url, keep_key=instance.key)
            if config_url(url, options, self.settings.log) == instance.config:
                raise ApiError(409, "Instance URL conflict")
            was_running = instance.status != "stopped"
            await self._stop(instance)
            saved = instance.snapshot()
            instance.set_url(url, options, self.settings.log)
            instance.desired = "running"
            try:
                await self._save(instance, saved)
            except BaseException:
                if was_running:  # the store refused the new URL: the old one runs on
                    self._start(instance)
                    self._publish("update", instance)
                raise
            self.failures.pop(id, None)
            self._start(instance)
            self.log.info("instance {id} URL replaced: {url}", id=id, url=instance.to_json(masked=True)["url"],
                          event="instance_replaced")
            self._publish("update", instance)
            return instance.to_json(masked=False)

    def delete(self, id: str) -> Deferred:
        return Deferred.fromCoroutine(self._delete(id))

    async def _delete(self, id: str) -> None:
        """Stops a running instance first (NodePass does), then forgets it."""
        if id == API_KEY_ID:
            raise ApiError(403, "Forbidden: API Key")
        async with self._lock(self._find(id).id):
            instance = self._find(id)
            await self._stop(instance)
            await self.store.delete_instance(id)
            del self.instances[id]
            # Its own state (a tls=1 server's certificate) goes too: a new
            # instance never inherits it.
            shutil.rmtree(os.path.join(self.settings.state_dir, "instances", id), ignore_errors=True)
            for table in (self.failures, self.running_since):
                table.pop(id, None)
            self.dirty.discard(id)
            self.log.info("instance {id} deleted", id=id, event="instance_deleted")
            self._publish("delete", instance)
        self.locks.pop(id, None)

    def set_alias(self, alias) -> Deferred:
        return Deferred.fromCoroutine(self._set_alias(alias))

    async def _set_alias(self, alias) -> dict:
        alias = check_text(alias, "alias")
        await self.store.set_setting("master_alias", alias)
        self.alias = alias
        return self.info()

    def _flush(self) -> Deferred:
        """Counters of instances that changed -> the store (never fails:
        a failed save is logged and retried at the next tick)."""
        if self.saving or not self.dirty:
            return succeed(None)
        batch = {id: self.instances[id].totals() for id in self.dirty if id in self.instances}
        self.dirty.clear()
        self.saving = True

        def failed(failure):
            self.dirty.update(id for id in batch if id in self.instances)
            self.log.failure("saving counters failed", failure, event="counters_save_failed")

        def done(_):
            self.saving = False

        return self.store.save_counters(batch).addErrback(failed).addBoth(done)

    async def _save(self, instance: Instance, saved: dict) -> None:
        try:
            await self.store.save_instance(instance.to_row())
        except BaseException:
            instance.restore(saved)
            raise

    def _publish(self, type: str, instance: Instance, logs: str | None = None) -> None:
        self.hub.publish(type, instance.to_json(masked=True), logs)

    def _find(self, id) -> Instance:
        instance = self.instances.get(id) if isinstance(id, str) else None
        if instance is None:
            raise ApiError(404, "Instance not found")
        return instance

    def _lock(self, id: str) -> DeferredLock:
        lock = self.locks.get(id)
        if lock is None:
            lock = self.locks[id] = DeferredLock()
        return lock

    def _new_id(self) -> str:
        while True:
            id = secrets.token_hex(4)
            if id not in self.instances:
                return id

    def _sorted(self) -> list:
        return sorted(self.instances.values(), key=lambda instance: (instance.created, instance.id))


def _bounded(clock, deferreds: list, seconds: float) -> Deferred:
    """Fires True once every one of *deferreds* has fired, or False after
    *seconds*; theirs are never cancelled (their owner fires them later)."""
    done, left = Deferred(), [len(deferreds)]
    timer = clock.callLater(seconds, lambda: done.called or done.callback(False))

    def one(_):
        left[0] -= 1
        if left[0] == 0 and not done.called:
            timer.cancel()
            done.callback(True)

    for d in deferreds:
        d.addBoth(one)
    if not deferreds:
        timer.cancel()
        done.callback(True)
    return done
