# -*- test-case-name: tests.test_master_registry -*-
"""How the registry runs its instances: starting and stopping them through
the supervisor, what the supervisor reports (status, stats, log lines), and
automatic restarts.

The supervisor never restarts an instance; here an ``error`` on an
instance with ``restart`` on and wanted running is retried after a
jittered, doubling delay (1 s .. 60 s, back to 1 s after a minute up).
A mixin of :class:`~tunnelpass.master.registry.Registry`, which owns the
state it reads (instances, locks, the restart timers).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from tunnelpass.master.instances import Instance

RESTART_FIRST, RESTART_MAX, RESTART_STABLE = 1.0, 60.0, 60.0
#: The levels a worker's log events carry.
LOG_LEVELS = ("debug", "info", "warn", "error")


def restart_delay(failures: int, rand: float) -> float:
    """Seconds before the next automatic restart: 1, 2, 4 ... capped at 60,
    times 0.8..1.2 (*rand* in [0, 1)) so instances that failed together do
    not restart together."""
    return min(RESTART_MAX, RESTART_FIRST * 2 ** min(failures, 16) * (0.8 + 0.4 * rand))



class InstanceLifecycle:
    # supervisor events

    def on_supervisor_event(self, id: str, kind: str, data: dict) -> None:
        instance = self.instances.get(id)
        if instance is None or not isinstance(data, dict):
            return
        if kind == "status":
            self._on_status(instance, data.get("status"), data.get("error"))
        elif kind == "stats":
            instance.apply_stats(data)
            self.dirty.add(id)
            if instance.status == "error" and instance.desired == "running" and not self.stopping:
                # It reports again (it was only silent): running, as NodePass does.
                self._cancel_restart(id)
                instance.status = "running"
            if instance.status == "stopped":
                instance.idle()
            self._publish("update", instance)
        elif kind == "log" and isinstance(data.get("text"), str):
            # The level leads the line ("[warn] ..."), as readers of the
            # text log expect it, so SSE consumers can filter on it.
            level = data.get("level") if data.get("level") in LOG_LEVELS else "info"
            self._publish("log", instance, instance.add_log(f"[{level}] {data['text']}"))

    def _on_status(self, instance: Instance, status, error) -> None:
        if status == "running":
            instance.status, instance.error = "running", ""
            self.running_since[instance.id] = self.reactor.seconds()
        elif status in ("stopped", "error"):
            self._ended(instance, status)
            if status == "error":
                instance.error = error if isinstance(error, str) else "unknown error"
                self.log.warn("instance {id} failed: {error}", id=instance.id, error=instance.error[:512],
                              event="instance_error")
                self._publish("log", instance, instance.add_log(f"[error] {instance.error}"))
                self._schedule_restart(instance)
        else:
            return
        self._publish("update", instance)

    # helpers

    def _start(self, instance: Instance) -> None:
        """Ask the supervisor to run *instance*.  Its status reads
        ``running`` from here on (as NodePass answers a create) until the
        supervisor reports otherwise."""
        self._cancel_restart(instance.id)
        if self.stopping or instance.options is None:
            return
        instance.new_run()
        instance.status, instance.error = "running", ""
        self.running_since[instance.id] = self.reactor.seconds()
        self.supervisor.start_instance(instance.id, instance.url, self.settings.log)

    async def _stop(self, instance: Instance) -> None:
        self._cancel_restart(instance.id)
        if instance.status != "stopped":
            await self.supervisor.stop_instance(instance.id, self.settings.shutdown_timeout)
            self._ended(instance, "stopped")

    def _ended(self, instance: Instance, status: str) -> None:
        instance.fold()
        instance.idle()
        instance.status = status
        self.dirty.add(instance.id)

    def _schedule_restart(self, instance: Instance, holding: bool = False) -> None:
        """*holding*: the caller holds the instance's lock (else a held lock
        means an operation in progress decides what comes next)."""
        id = instance.id
        if (self.stopping or not instance.restart or instance.desired != "running" or instance.options is None
                or id in self.restarts or (self._lock(id).locked and not holding)):
            return
        since = self.running_since.pop(id, None)
        if since is not None and self.reactor.seconds() - since >= RESTART_STABLE:
            self.failures[id] = 0
        failures = self.failures.get(id, 0)
        delay = restart_delay(failures, self.random())
        self.failures[id] = failures + 1
        self.restarts[id] = self.reactor.callLater(delay, self._restart_due, id)
        self.log.info("instance {id} restarts in {delay:.1f} s (attempt {attempt})", id=id, delay=delay,
                      attempt=failures + 1, event="instance_restart_scheduled")

    def _restart_due(self, id: str) -> None:
        self.restarts.pop(id, None)
        Deferred.fromCoroutine(self._auto_restart(id)).addErrback(
            lambda f: self.log.failure("automatic restart of {id} failed", f, id=id, event="instance_restart_failed"))

    async def _auto_restart(self, id: str) -> None:
        if id not in self.instances:
            return
        async with self._lock(id):
            instance = self.instances.get(id)
            if (instance is None or self.stopping or instance.status != "error" or not instance.restart
                    or instance.desired != "running"):
                return
            await self.supervisor.stop_instance(id, self.settings.shutdown_timeout)
            self._start(instance)
            self._publish("update", instance)

    def _cancel_restart(self, id: str) -> None:
        call = self.restarts.pop(id, None)
        if call is not None and call.active():
            call.cancel()
