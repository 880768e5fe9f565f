# -*- test-case-name: tests.e2e.test_master_e2e -*-
"""The master's service: the API listener and everything behind it.

Start order: the API port is bound in ``privilegedStartService`` (a busy
port is a one-line startup error) but not read from until the state is
loaded; then the store opens (integrity check, migrations, restore from
the backup), the API key is created at the first start (logged once, kept
only as a hash), the worker processes start, the registry loads the
instances and brings back those with ``restart=true``, and the port starts
accepting.  A failure on the way is one critical line and exit status 1.
Stop order is the reverse: no new requests, instances drained and stopped,
workers reaped, a last backup, the store closed.
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.master.api import make_site
from tunnelpass.master.auth import KeyHolder, hash_key, new_key
from tunnelpass.master.registry import Registry
from tunnelpass.master.sse import EventHub
from tunnelpass.master.store import Store
from tunnelpass.master.supervisor import Supervisor
from tunnelpass.ops.metrics import Sample
from tunnelpass.ops.startup import describe, exit_after_stop
from tunnelpass.ops.starterror import StartupError
from tunnelpass.tunnel.servertls import ServerCertificate


class MasterService(MultiService, ServerCertificate):
    """``--mode master``: *settings* is a
    :class:`~tunnelpass.master.settings.MasterSettings`."""

    log = Logger(namespace="tunnelpass.master")
    alpn = tlsmod.ALPN_HTTP1  # the API speaks HTTP/1.1 only (curl offers h2 first)

    def __init__(self, settings, reactor, exit_on_failure=None):
        super().__init__()
        self.settings, self.reactor = settings, reactor
        self.exit_on_failure = exit_on_failure or (lambda: exit_after_stop(reactor))
        self.tls_factory = None
        self.fingerprint = None
        self.store = Store(settings.state_dir, reactor)
        self.hub = EventHub(reactor)
        self.keys = KeyHolder("")
        self.supervisor = Supervisor(reactor, settings.workers, settings.state_dir, settings.report_interval,
                                     self._supervisor_event, log_level=settings.log,
                                     shutdown_timeout=settings.shutdown_timeout)
        self.registry = Registry(reactor, self.store, self.supervisor, self.hub, self.keys, settings)
        self.site = make_site(self.registry, self.hub, self.keys, settings, reactor)
        self.port = None
        self.ready = False
        self._backups = LoopingCall(self._backup)
        self._backups.clock = reactor

    def _supervisor_event(self, id: str, kind: str, data: dict) -> None:
        self.registry.on_supervisor_event(id, kind, data)

    # Start

    def privilegedStartService(self) -> None:
        s = self.settings
        try:
            os.makedirs(s.state_dir, mode=0o700, exist_ok=True)
            # The instances' own state (certificates): the master's alone.
            os.makedirs(os.path.join(s.state_dir, "instances"), mode=0o700, exist_ok=True)
            os.chmod(os.path.join(s.state_dir, "instances"), 0o700)
        except OSError as e:
            raise StartupError(f"--state-dir {s.state_dir}: cannot create it: {e.strerror}") from None
        self._lock_state_dir()
        self._load_tls()
        factory = self.site if not s.tls else TLSMemoryBIOFactory(self._current_options, False, self.site)
        try:
            self.port = self.reactor.listenTCP(s.api_port, factory, interface=s.api_host.strip("[]"), backlog=128)
        except CannotListenError as e:
            raise StartupError(f"--api {s.api_host}:{s.api_port}: cannot listen: {describe(e.socketError)}") \
                from None
        self.port.stopReading()  # connections wait in the backlog until the state is loaded
        super().privilegedStartService()

    def _lock_state_dir(self) -> None:
        """One master per state directory: two would both run every
        instance and write the same rows.  An exclusive lock on
        ``master.lock``, held for the process's life (the kernel drops it
        when the process dies, however it dies)."""
        import fcntl

        path = os.path.join(self.settings.state_dir, "master.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(f"--state-dir {self.settings.state_dir}: another master uses it (pid {holder})") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        self.supervisor.startService()
        d = self.store.open()
        d.addCallback(self._opened)
        d.addCallback(lambda _: self.registry.load())
        d.addCallback(self._serving)
        d.addErrback(self._start_failed)

    def _opened(self, description: str):
        self.log.info("{description}", description=description, event="state_opened")
        self._backups.start(self.settings.backup_interval, now=False)
        return self.store.get_setting("api_key_hash").addCallback(self._have_key_hash)

    def _have_key_hash(self, key_hash):
        if key_hash:
            self.keys.replace(key_hash)
            return None
        key = new_key()
        key_hash = hash_key(key)

        def stored(_):
            self.keys.replace(key_hash)
            s = self.settings
            insecure = " -k" if s.tls == 1 else ""
            # Critical: the only time the key is ever shown, whatever --log says.
            self.log.critical(
                "API key created; it is shown this once and stored only as a hash, keep it now: {key}  "
                "(try: curl{insecure} -H 'X-API-Key: {key}' {url}/instances)",
                key=key, insecure=insecure, url=self.base_url(), event="api_key_created")

        return self.store.set_setting("api_key_hash", key_hash).addCallback(stored)

    def base_url(self) -> str:
        s = self.settings
        host = s.api_host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"{s.scheme}://{host}:{self.port.getHost().port}{s.base}"

    def _serving(self, _):
        self.ready = True
        self.port.startReading()
        s = self.settings
        extra = f", certificate {tlsmod.format_pin(self.fingerprint)}" if self.fingerprint else ""
        self.log.info("master running: API {url} ({workers} worker processes, {instances} instances, state in "
                      "{state_dir}){extra}", url=self.base_url(), workers=s.workers,
                      instances=len(self.registry.list()), state_dir=s.state_dir, extra=extra, event="master_running")

    def _start_failed(self, failure):
        self.log.failure("master start failed", failure)
        self.log.critical("tunnelpass: startup failed: {reason}", reason=describe(failure.value),
                          event="startup_failed")
        self.exit_on_failure()

    # Running

    def _backup(self):
        """Every --reload-interval: an online backup of the state, and a
        tls=2 API certificate pair re-read if its files changed."""
        self.reload()
        d = self.store.backup()
        d.addErrback(lambda f: self.log.error("state backup failed: {reason}", reason=describe(f.value),
                                              event="state_backup_failed"))
        return d

    def reload(self) -> None:
        """SIGHUP: re-read a tls=2 API certificate pair if it changed."""
        if self.settings.tls == 2:
            self.reload_certificate()

    def metrics(self) -> list:
        """``--metrics``: every instance's counters (label ``instance``)
        and the master's own figures."""
        return [Sample("master_workers", "gauge", "worker processes alive", len(self.supervisor.worker_pids())),
                *self.registry.samples()]

    # Stop

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        d = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        d.addBoth(lambda _: self.registry.stop() if self.ready else None)
        d.addBoth(lambda _: self.supervisor.stopService())
        if self._backups.running:
            self._backups.stop()
            d.addBoth(lambda _: self._backup())
        d.addBoth(lambda _: self.store.close())
        d.addErrback(lambda f: self.log.failure("master stop", f))
        return d
