# -*- test-case-name: tests.test_master_hosting -*-
"""Many tunnel instances in one reactor: :class:`InstanceHost`.

A worker process (:mod:`tunnelpass.master.worker`) hosts the master's
instances here, each a tunnel server or client built exactly as the CLI
builds it (:func:`tunnelpass.config.options.parse_tunnel_url`,
:func:`tunnelpass.tap.tunnel_service`).  What the host owes the master:

* a failed start (a bad URL, a busy port, anything raised) is that
  instance's ``error`` status with one line, never the end of the process;
* ``running`` once started, ``stopped`` once a stop has drained (bounded
  by the stop's timeout: what is left is then reset), right after a last
  ``stats`` so the bytes of the run's end are counted;
* ``stats`` every report interval for each running instance (see
  :func:`instance_stats` for what each number means);
* ``log`` events: every log event of the process is attributed to the
  instance it came from (:class:`LogRouter`), filtered by that instance's
  level and at most :data:`LOG_RATE` lines a second; the rest go to the
  host's *fallback* observer.

Events leave through ``on_event(id, kind, data)``; the worker turns them
into wire lines.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, eventAsText
from twisted.python.usage import UsageError

from tunnelpass.master.workerwire import LOG_TEXT, LineBudget
from tunnelpass.ops import connlog
from tunnelpass.ops.starterror import StartupError
from tunnelpass.ops.startup import describe

#: Log lines a second forwarded per instance (then one "N lines suppressed").
LOG_RATE = 100

#: Attributes followed from a log source (or a frame's ``self``) towards
#: the instance's service: a protocol's factory, a factory's server ...
_LINKS = ("server", "client", "end", "factory", "service", "owner", "handler", "parent", "protocol",
          "wrappedFactory", "wrappedProtocol")
_WALK_DEPTH = 6
_STACK_DEPTH = 48

#: Parts of a tunnel end registered as the instance's own (log sources
#: that do not link back to the service).
_PARTS = ("target_factory", "local_factory", "udp_egress", "udp_ingress", "acceptor", "carriers", "reach",
          "guard", "descriptors", "service", "probe")

#: Twisted's level -> (rank, the wire's name); an instance's level -> rank.
_NAMES = {LogLevel.debug: (0, "debug"), LogLevel.info: (1, "info"), LogLevel.warn: (2, "warn"),
          LogLevel.error: (3, "error"), LogLevel.critical: (4, "error")}
_ORDER = {"debug": 0, "info": 1, "warn": 2, "error": 3, "fatal": 4}


def instance_stats(service) -> dict:
    """One ``stats`` report of a tunnel end, counters since it started.

    * ``tcps``: tunnelled TCP connections now; ``udps``: UDP sessions now.
    * ``pool``: idle pool connections, or carrier connections up (``type=3``).
    * ``ping``: control channel round trip in ms (a server's heartbeat),
      else the fastest carrier's; 0 when unknown (a TCP-pool client).
    * ``tcprx``/``udprx``: bytes the instance received on the accepting
      leg of each relayed connection or session (where it listens, from
      the users; where it dials the target, from the tunnel) and relayed
      on; ``tcptx``/``udptx``: bytes it sent back on that leg.  These are
      the ends' ``bytes_in``/``bytes_out`` (:class:`~tunnelpass.ops.stats.ListenerStats`).
    """
    session = getattr(service, "session", None)
    pool = getattr(session, "pool", None) or getattr(service, "pool", None)
    carriers = getattr(service, "carriers", None)
    if carriers is not None and len(carriers):
        pool_count = len(carriers)
    else:
        pool_count = len(pool.idle) if pool is not None else 0
    rtt = getattr(getattr(session, "control", None), "rtt", None)
    if rtt is None and carriers is not None:
        rtts = [c.rtt for c in carriers.connections if getattr(c, "rtt", None) is not None]
        rtt = min(rtts) if rtts else None
    tcp, udp = service.stats, service.udp_stats
    return {"tcps": tcp.active, "udps": udp.udp_sessions, "pool": pool_count,
            "ping": round(rtt * 1000, 3) if rtt is not None else 0,
            "tcprx": tcp.bytes_in, "tcptx": tcp.bytes_out, "udprx": udp.bytes_in, "udptx": udp.bytes_out}


class _Instance:
    def __init__(self, id: str, level: str, clock):
        self.id = id
        self.level = level
        self.service = None
        self.state = "starting"  # starting -> running -> stopping -> gone
        self.budget = LineBudget(clock, LOG_RATE)
        self.stopped: Deferred | None = None
        self.next_start = None  # (url, dir, log) asked for while stopping


class InstanceHost:
    """Starts, stops, reports and attributes the logs of the instances of
    one reactor.  *fallback*: an observer for log events no instance owns."""

    log = Logger(namespace="tunnelpass.master.hosting")

    def __init__(self, reactor, on_event, report_interval: float, clock=None, fallback=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.on_event = on_event
        self.report_interval = report_interval
        self.fallback = fallback
        self.instances: dict[str, _Instance] = {}
        self._owners: dict[int, tuple] = {}  # id(object) -> (object, instance)
        self._reporting = LoopingCall(self.report)
        self._reporting.clock = self.clock

    def start_reports(self) -> None:
        if not self._reporting.running:
            self._reporting.start(self.report_interval, now=False)

    def stop_reports(self) -> None:
        if self._reporting.running:
            self._reporting.stop()

    # Start

    def start(self, id: str, url: str, dir: str, log: str) -> None:
        current = self.instances.get(id)
        if current is not None:
            if current.state == "stopping":
                current.next_start = (url, dir, log)
            else:
                self._status(id, current.state if current.state == "running" else "running")
            return
        try:
            service, level = self._build(url, dir, log)
        except (UsageError, StartupError, ValueError, OSError) as e:
            self._status(id, "error", str(e) if not isinstance(e, OSError) else describe(e))
            return
        except Exception as e:
            self.log.failure("instance {id}: cannot build it", id=id)
            self._status(id, "error", describe(e))
            return
        instance = _Instance(id, level, self.clock)
        instance.service = service
        self.instances[id] = instance
        self._own(service, instance)
        try:
            service.privilegedStartService()
            service.startService()
        except Exception as e:
            if not isinstance(e, StartupError):
                self.log.failure("instance {id}: start failed", id=id, instance_id=id)
            self._release(instance)
            self._status(id, "error", str(e) if isinstance(e, StartupError) else describe(e))
            return
        for part in _PARTS:
            value = getattr(service, part, None)
            if value is not None:
                self._own(value, instance)
        instance.state = "running"
        if level == "debug":
            connlog.TRACING.enabled = True  # per-connection traces: one switch for the process
        self._status(id, "running")

    def _build(self, url: str, dir: str, log: str):
        from tunnelpass.config.options import parse_tunnel_url
        from tunnelpass.config.urls import parse_url
        from tunnelpass.ops.startup import check_files
        from tunnelpass.tap import tunnel_service

        options = parse_tunnel_url(url)
        if "log" not in parse_url(url):
            options["log"] = log
        if options["mode"] == "server" and options["tls"] == 1 and not options["state-dir"]:
            os.makedirs(dir, mode=0o700, exist_ok=True)
            os.chmod(dir, 0o700)
            options["state-dir"] = dir
        check_files(options)
        return tunnel_service(options, self.reactor), options["log"]

    def _release(self, instance: _Instance) -> None:
        """A start failed half way: let go of what it bound."""
        service = instance.service
        for port in getattr(service, "listening_ports", lambda: [])():
            if port is not None:
                try:
                    port.stopListening()
                except Exception:
                    pass
        self._forget(instance)

    # Stop

    def stop(self, id: str, timeout: float) -> Deferred:
        """Drain *id* like SIGTERM for at most *timeout* seconds (then reset
        what is left); ``stopped`` is reported (also for an unknown id)."""
        instance = self.instances.get(id)
        if instance is None:
            self._status(id, "stopped")
            return succeed(None)
        instance.next_start = None
        if instance.state == "stopping":
            return _follow(instance.stopped)
        instance.state = "stopping"
        service = instance.service
        service.settings = dataclasses.replace(service.settings, shutdown_timeout=timeout)
        done = instance.stopped = Deferred()
        try:
            d = service.stopService()
        except Exception:
            self.log.failure("instance {id}: stop failed", id=id, instance_id=id)
            d = succeed(None)
        d.addErrback(lambda f: self.log.failure("instance {id}: stop failed", f, id=id, instance_id=id))
        # A drain fires at most its grace after the timeout; never wait much longer.
        d.addTimeout(timeout + 3.0, self.clock, onTimeoutCancel=lambda result, t: None)
        d.addBoth(lambda _: self._stopped(instance))
        return _follow(done)

    def _stopped(self, instance: _Instance) -> None:
        self._report(instance)  # the run's last bytes count too
        self._release(instance)
        self._status(instance.id, "stopped")
        instance.state = "gone"
        instance.stopped.callback(None)
        if instance.next_start is not None:
            self.start(instance.id, *instance.next_start)

    def stop_all(self, timeout: float | None = None) -> Deferred:
        """Stop every instance (each bounded by its own --shutdown-timeout
        unless *timeout*); fires when all have stopped."""
        self.stop_reports()
        waits = []
        for instance in list(self.instances.values()):
            limit = timeout if timeout is not None else instance.service.settings.shutdown_timeout
            waits.append(self.stop(instance.id, limit))
        return DeferredList(waits)

    # Reports

    def report(self) -> None:
        for instance in list(self.instances.values()):
            if instance.state == "running":
                self._report(instance)

    def _report(self, instance: _Instance) -> None:
        try:
            stats = instance_stats(instance.service)
        except Exception:
            self.log.failure("instance {id}: stats failed", id=instance.id, instance_id=instance.id)
            return
        self.on_event(instance.id, "stats", stats)

    def _status(self, id: str, status: str, error: str = "") -> None:
        self.on_event(id, "status", {"status": status, "error": " ".join(error.split())[:LOG_TEXT]})

    # Logs

    def _own(self, value, instance: _Instance) -> None:
        self._owners[id(value)] = (value, instance)

    def _forget(self, instance: _Instance) -> None:
        self.instances.pop(instance.id, None)
        for key in [key for key, (_, owner) in self._owners.items() if owner is instance]:
            del self._owners[key]

    def owner(self, value) -> _Instance | None:
        """The instance *value* belongs to: itself registered, or reached
        through its links (a protocol's ``factory``, a factory's ``server``)."""
        level, seen = [value], set()
        for _ in range(_WALK_DEPTH):  # breadth first: every link, not only the first one set
            following = []
            for item in level:
                if item is None or isinstance(item, (str, bytes, int, float)) or id(item) in seen:
                    continue
                seen.add(id(item))
                found = self._owners.get(id(item))
                if found is not None and found[0] is item:
                    return found[1]
                following.extend(getattr(item, link, None) for link in _LINKS)
            if not following or len(seen) > 64:
                break
            level = following
        return None

    def attribute(self, event) -> _Instance | None:
        """The instance a log event comes from: an ``instance_id`` field,
        the event's ``log_source``, for a failure the innermost frame of
        its traceback whose ``self`` belongs to an instance, else the
        nearest such frame of the code logging now."""
        named = event.get("instance_id")
        if named is not None and named in self.instances:
            return self.instances[named]
        instance = self.owner(event.get("log_source"))
        if instance is not None:
            return instance
        failure = event.get("log_failure") or event.get("failure")  # the latter: legacy log.err
        tb = getattr(failure, "tb", None)
        frames = []
        while tb is not None and len(frames) < 64:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            instance = self.owner(frame.f_locals.get("self"))
            if instance is not None:
                return instance
        # Logged from inside an instance's code (a module-level Logger,
        # Twisted's own "starting on" lines): whose ``self`` is on the stack.
        frame = sys._getframe(1)
        for _ in range(_STACK_DEPTH):
            if frame is None:
                break
            instance = self.owner(frame.f_locals.get("self"))
            if instance is not None:
                return instance
            frame = frame.f_back
        return None

    def __call__(self, event) -> None:
        """The process's log observer."""
        try:
            instance = self.attribute(event)
        except Exception:
            instance = None
        if instance is None:
            if self.fallback is not None:
                self.fallback(event)
            return
        rank, level = _NAMES.get(event.get("log_level"), (1, "info"))
        if rank < _ORDER.get(instance.level, 1):
            return
        if not instance.budget.take():
            return
        now = event.get("log_time") or self.clock.seconds()
        dropped = instance.budget.take_dropped()
        if dropped:
            self.on_event(instance.id, "log", {"level": "warn", "text": f"{dropped} lines suppressed",
                                               "time": now})
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        self.on_event(instance.id, "log", {"level": level, "text": text[:LOG_TEXT], "time": now})


def _follow(d: Deferred) -> Deferred:
    """A new Deferred firing when *d* has (callers cannot disturb *d*)."""
    out = Deferred()
    if d.called:
        out.callback(None)
    else:
        d.addBoth(lambda result: (out.callback(None), result)[1])
    return out
