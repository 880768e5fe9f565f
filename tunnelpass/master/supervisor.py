# -*- test-case-name: tests.test_master_supervisor -*-
"""The master's side of its worker processes: :class:`Supervisor`.

It keeps *workers* processes of :mod:`tunnelpass.master.worker` alive,
places each instance on the least loaded one, sends it commands (stdin)
and reads its events (fd 3) through :mod:`tunnelpass.master.workerwire`,
and tells the registry what happened through ``on_event(id, kind, data)``
(``status``, ``stats``, ``log``; see the design in the package docs).

* A worker that dies takes its instances with it: each gets ``status``
  ``error`` ("worker exited: signal 9"), and the worker is respawned after
  a backoff (:func:`twisted.application.internet.backoffPolicy`).  The
  supervisor never restarts instances itself: the registry decides.
* A worker that writes a malformed or oversized line on fd 3 is killed
  (SIGKILL) and respawned: after one bad line nothing it says can be
  trusted.  Its stdout/stderr lines are logged as its own, throttled.
* A running instance with no stats for three report intervals gets
  ``status`` ``error`` ("no report for N s").
* Stopping the service stops every instance (bounded), closes the
  workers' stdin (they exit at once) and kills any left after
  :data:`REAP_GRACE` seconds.
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tunnelpass.master.workerwire import EventDecoder, LineBudget, LineReader, WireError, encode

#: Seconds past a stop's timeout before its worker is killed, and past
#: closing the workers' stdin before they are.
REAP_GRACE = 5.0

#: A worker that lived this long starts its respawn backoff over.
STABLE_AFTER = 30.0

#: Lines a second of a worker's stdout/stderr logged by the master.
CHATTER_RATE = 20

SILENCE_REPORTS = 3


def exit_text(reason) -> str:
    """``worker exited: signal 9`` / ``worker exited: status 1``."""
    value = getattr(reason, "value", reason)
    sig = getattr(value, "signal", None)
    if sig is not None:
        return f"worker exited: signal {sig}"
    return f"worker exited: status {getattr(value, 'exitCode', None)}"


class _Worker(protocol.ProcessProtocol):
    """One worker process: its pipes and the instances placed on it."""

    def __init__(self, supervisor: "Supervisor", slot: int):
        self.supervisor = supervisor
        self.slot = slot
        self.decoder = EventDecoder()
        self.chatter = {1: LineReader(), 2: LineReader()}
        self.budget = LineBudget(supervisor.clock, CHATTER_RATE)
        self.instances: set[str] = set()
        self.pid: int | None = None
        self.alive = False
        self.broken = False
        self.started = supervisor.clock.seconds()
        self.ended = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.alive = True

    def send(self, message: dict) -> None:
        if self.alive:
            self.transport.writeToChild(0, encode(message))

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if self.broken:
            return
        if fd == 3:
            try:
                events = self.decoder.feed(data)
            except WireError as e:
                self.supervisor.misbehaved(self, str(e))
                return
            for event in events:
                self.supervisor.worker_event(self, event)
            return
        reader = self.chatter.get(fd)
        if reader is None:
            return
        try:
            lines = reader.feed(data)
        except WireError:
            lines, reader._buffer = [reader._buffer[:200] + b"...(cut)"], b""
        for line in lines:
            self.supervisor.chatter(self, line.decode("utf-8", "replace"))

    def kill(self) -> None:
        if self.alive:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass

    def processEnded(self, reason) -> None:
        self.alive = False
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class Supervisor(Service):
    """Worker processes and the instances on them (see the module doc).

    *backoff*: attempt -> seconds before a respawn (default
    ``backoffPolicy()``); *python*/*environ*: how workers are spawned;
    *shutdown_timeout*: each instance's drain when the service stops."""

    log = Logger(namespace="tunnelpass.master.supervisor")

    def __init__(self, reactor, workers: int, state_dir: str, report_interval: float, on_event,
                 log_level: str = "info", backoff=None, shutdown_timeout: float = 5.0, python: str | None = None,
                 environ: dict | None = None, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.count = max(1, workers)
        self.state_dir = state_dir
        self.report_interval = report_interval
        self.on_event = on_event
        self.log_level = log_level
        self.backoff = backoff or backoffPolicy()
        self.shutdown_timeout = shutdown_timeout
        self.python = python or sys.executable
        self.environ = environ
        self.workers: dict[int, _Worker] = {}  # slot -> current process
        self.attempts: dict[int, int] = {}
        self._respawns: dict[int, object] = {}
        self.placed: dict[str, _Worker] = {}  # instance -> its worker
        self.queued: dict[str, tuple] = {}  # instance -> (url, log) while no worker is up
        self.status: dict[str, str] = {}
        self.last_report: dict[str, float] = {}
        self.silenced: set[str] = set()
        self.stops: dict[str, list] = {}  # instance -> Deferreds waiting for "stopped"
        self._watch = LoopingCall(self._check_silence)
        self._watch.clock = self.clock
        self._stopping = False

    # Service

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for slot in range(self.count):
            self._spawn(slot)
        self._watch.start(self.report_interval, now=False)

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._watch.running:
            self._watch.stop()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        for id in list(self.queued):
            self._stop_queued(id)
        stops = [self.stop_instance(id, self.shutdown_timeout) for id in list(self.placed)]
        d = DeferredList(stops)
        d.addCallback(lambda _: self._reap())
        return d

    def _reap(self) -> Deferred:
        workers = [w for w in self.workers.values() if w.alive]
        for worker in workers:
            try:
                worker.transport.closeStdin()
            except Exception:
                pass
        if not workers:
            return succeed(None)
        waiting = DeferredList([w.ended for w in workers])
        timer = self.clock.callLater(REAP_GRACE, self._kill_left, workers)
        waiting.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return waiting

    def _kill_left(self, workers) -> None:
        for worker in workers:
            if worker.alive:
                self.log.warn("worker {pid} still running {grace:g} s after its stdin closed: killed",
                              pid=worker.pid, grace=REAP_GRACE, event="worker_killed")
                worker.kill()

    # Workers

    def _spawn(self, slot: int) -> None:
        self._respawns.pop(slot, None)
        if self._stopping:
            return
        worker = _Worker(self, slot)
        args = [self.python, "-m", "tunnelpass.master.worker", "--report-interval", repr(self.report_interval),
                "--log", self.log_level, "--parent", str(os.getpid())]
        environ = dict(os.environ if self.environ is None else self.environ)
        try:
            self.reactor.spawnProcess(worker, self.python, args, env=environ,
                                      childFDs={0: "w", 1: "r", 2: "r", 3: "r"})
        except Exception:
            self.log.failure("cannot start worker {slot}", slot=slot)
            self._schedule_respawn(slot)
            return
        self.workers[slot] = worker
        self.log.info("worker {slot} started (pid {pid})", slot=slot, pid=worker.pid, event="worker_started")
        for id, (url, level) in list(self.queued.items()):
            del self.queued[id]
            self._place(id, url, level)

    def _schedule_respawn(self, slot: int) -> None:
        if self._stopping:
            return
        attempt = self.attempts.get(slot, 0)
        self.attempts[slot] = attempt + 1
        delay = self.backoff(attempt)
        self._respawns[slot] = self.clock.callLater(delay, self._spawn, slot)

    def worker_ended(self, worker: _Worker, reason) -> None:
        text = exit_text(reason)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self.clock.seconds() - worker.started >= STABLE_AFTER:
            self.attempts[worker.slot] = 0
        if not self._stopping:
            self.log.warn("worker {slot} (pid {pid}) ended: {reason}; {count} instance(s) lost",
                          slot=worker.slot, pid=worker.pid, reason=text, count=len(worker.instances),
                          event="worker_exited")
        for id in sorted(worker.instances):
            if self.placed.get(id) is worker:
                del self.placed[id]
                if id in self.stops:
                    self._set_status(id, "stopped", "")
                else:
                    self._set_status(id, "error", text)
            self._release_stops(id)
        worker.instances.clear()
        self._schedule_respawn(worker.slot)

    def misbehaved(self, worker: _Worker, why: str) -> None:
        """A bad line on fd 3: kill the worker (processEnded respawns it)."""
        worker.broken = True
        self.log.error("worker {pid} sent a bad event line ({why}): killing it", pid=worker.pid, why=why,
                       event="worker_protocol_error")
        worker.kill()

    def chatter(self, worker: _Worker, line: str) -> None:
        if not worker.budget.take():
            return
        dropped = worker.budget.take_dropped()
        if dropped:
            self.log.warn("worker {pid}: {count} lines suppressed", pid=worker.pid, count=dropped)
        self.log.info("worker {pid}: {line}", pid=worker.pid, line=line[:2000], event="worker_output")

    # Instances

    def start_instance(self, id: str, url: str, log_level: str) -> None:
        """Start *id* on the least loaded live worker (queued while none is)."""
        worker = self.placed.get(id)
        if worker is not None and worker.alive:
            self._send_start(worker, id, url, log_level)
            return
        self._place(id, url, log_level)

    def _place(self, id: str, url: str, log_level: str) -> None:
        live = [w for w in self.workers.values() if w.alive and not w.broken]
        if not live:
            self.queued[id] = (url, log_level)
            return
        worker = min(live, key=lambda w: (len(w.instances), w.slot))
        self._send_start(worker, id, url, log_level)

    def _send_start(self, worker: _Worker, id: str, url: str, log_level: str) -> None:
        worker.instances.add(id)
        self.placed[id] = worker
        directory = os.path.join(self.state_dir, "instances", id)
        try:
            worker.send({"op": "start", "id": id, "url": url, "dir": directory, "log": log_level})
        except WireError as e:
            worker.instances.discard(id)
            del self.placed[id]
            self._set_status(id, "error", str(e))

    def stop_instance(self, id: str, timeout: float) -> Deferred:
        """Fires (never errbacks) once *id* has stopped: drained within
        *timeout*, or its worker died, or *timeout* + REAP_GRACE passed
        (then the worker is killed, as a last resort)."""
        if id in self.queued:
            self._stop_queued(id)
            return succeed(None)
        worker = self.placed.get(id)
        if worker is None or not worker.alive:
            return succeed(None)
        d = Deferred()
        waiting = self.stops.setdefault(id, [])
        first = not waiting
        waiting.append(d)
        if first:
            worker.send({"op": "stop", "id": id, "timeout": float(timeout)})
            timer = self.clock.callLater(timeout + REAP_GRACE, self._stop_overdue, id, worker, timeout)
            waiting.append(timer)
        return d

    def _stop_queued(self, id: str) -> None:
        del self.queued[id]
        self._set_status(id, "stopped", "")

    def _stop_overdue(self, id: str, worker: _Worker, timeout: float) -> None:
        if self.placed.get(id) is worker and worker.alive:
            self.log.error("instance {id} did not stop within {timeout:g} s: killing worker {pid} "
                           "(and its other instances)", id=id, timeout=timeout + REAP_GRACE, pid=worker.pid,
                           event="worker_killed")
            worker.kill()

    def _release_stops(self, id: str) -> None:
        for item in self.stops.pop(id, []):
            if isinstance(item, Deferred):
                item.callback(None)
            elif item.active():
                item.cancel()

    def worker_pids(self) -> list[int]:
        return [w.pid for _, w in sorted(self.workers.items()) if w.alive]

    def instance_pid(self, id: str) -> int | None:
        worker = self.placed.get(id)
        return worker.pid if worker is not None and worker.alive else None

    # Events

    def worker_event(self, worker: _Worker, event: dict) -> None:
        kind = event.pop("ev")
        if kind == "hello":
            return
        id = event.pop("id")
        if self.placed.get(id) is not worker:
            return  # not (or no longer) this worker's: a late line
        if kind == "status":
            status, error = event["status"], event["error"]
            if status == "stopped" and id not in self.stops:
                # Nobody asked (the worker was told to stop by someone else,
                # e.g. a SIGTERM to it): the instance did not end by the
                # operator's will, so the registry's restart policy applies.
                status, error = "error", "stopped by its worker, not by the master"
            if status in ("stopped", "error"):
                worker.instances.discard(id)
                del self.placed[id]
            self._set_status(id, status, error if status == "error" else "")
            if status != "running":
                self._release_stops(id)
        elif kind == "stats":
            self.last_report[id] = self.clock.seconds()
            if id in self.silenced:
                self.silenced.discard(id)
                self._set_status(id, "running", "")
            self.on_event(id, "stats", event)
        else:
            self.on_event(id, "log", event)

    def _set_status(self, id: str, status: str, error: str) -> None:
        self.status[id] = status
        self.silenced.discard(id)
        if status == "running":
            self.last_report[id] = self.clock.seconds()
        else:
            self.last_report.pop(id, None)
            if status == "stopped" or id not in self.placed:
                self.status.pop(id, None)
        self.on_event(id, "status", {"status": status, "error": error})

    def _check_silence(self) -> None:
        now = self.clock.seconds()
        limit = SILENCE_REPORTS * self.report_interval
        for id, last in list(self.last_report.items()):
            if id in self.silenced or self.status.get(id) != "running" or id in self.stops:
                continue
            if now - last >= limit:
                self.silenced.add(id)
                self.status[id] = "error"
                self.on_event(id, "status", {"status": "error", "error": f"no report for {now - last:.0f} s"})
