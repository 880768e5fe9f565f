# -*- test-case-name: tests.test_startup -*-
"""Startup errors: checked before anything starts, reported in one line, exit non-zero.

A service under twistd that fails to start must end the process with a
non-zero status (so systemd's ``Restart=on-failure`` fires) and one line
that names the option, the file and the reason -- never a traceback, and
never a process that keeps running, disconnected.  Three layers:

* :func:`check_files` reads every file the options name (``--ca``,
  ``--cert``/``--private-key``, ``--state-dir``; ``--config`` is read by the
  forwarder's loader) in ``makeService``, before twistd has started
  logging, so a :class:`StartupError` reaches the terminal (or the journal)
  as a plain line;
* :func:`guard_start` wraps the root service's ``privilegedStartService``
  and ``startService``: a :class:`~tunnelpass.ops.starterror.StartupError`
  raised there (a port in use) becomes one critical ``startup_failed`` log line and exit
  status 1; any other exception becomes the same, its traceback at debug;
* :class:`StartupWatch` covers what runs once the reactor starts
  (``callWhenRunning``): Twisted logs an exception there and carries on, so
  the watch sees that failure and stops the process with status 1.

Sans-IO where it can be: the checks take paths and return parsed objects,
the watch takes its log publisher, reactor and exit action.
"""

from __future__ import annotations

import atexit
import errno
import os
import stat
import tempfile

from twisted.logger import Logger, LogLevel, globalLogPublisher

from tunnelpass.ops.signals import exit_now
from tunnelpass.ops.starterror import StartupError

log = Logger(namespace="tunnelpass.startup")

#: Largest PEM file read (a CA bundle of a few hundred roots is ~250 KiB).
MAX_PEM_BYTES = 1 << 20

#: Exit status of a failed startup (option errors exit 2, as usage errors do).
STARTUP_FAILED = 1


class FileError(StartupError):
    """A file named by an option cannot be used; ``str()`` is the one line
    shown to the operator: ``--ca /x/ca.pem: No such file or directory``."""

    def __init__(self, option: str, path: str, reason: str):
        self.option, self.path, self.reason = option, path, reason
        super().__init__(f"{option} {show_path(path)}: {reason}")


def show_path(path: str) -> str:
    """*path* as typed, unless it holds characters that would break the one
    line (newlines, escapes, undecodable bytes): then its repr."""
    return path if path.isprintable() and not any(0xD800 <= ord(c) <= 0xDFFF for c in path) else repr(path)


def os_reason(error: OSError) -> str:
    """The text of an OS error without the repr noise of ``str(error)``:
    ``No such file or directory`` (the errno's own words)."""
    if error.errno is not None:
        return os.strerror(error.errno)
    return error.strerror or type(error).__name__


def describe(error: BaseException) -> str:
    """One line for an unexpected exception (type and message, no repr)."""
    if isinstance(error, OSError):
        return os_reason(error)
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_file(option: str, path: str, limit: int = MAX_PEM_BYTES) -> bytes:
    """The bytes of a regular file, or :class:`StartupError`.

    Opened non-blocking and checked with ``fstat`` before reading, so a FIFO
    or a device given by mistake is refused instead of hanging startup."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FileError(option, path, os_reason(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileError(option, path, "is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise FileError(option, path, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileError(option, path, os_reason(e)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileError(option, path, f"larger than {limit} bytes")
    return data


def load_certificates(option: str, path: str, what: str = "certificate") -> list:
    """Every certificate of a PEM file (a chain or a CA bundle)."""
    from cryptography import x509

    data = read_file(option, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        hint = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
        raise FileError(option, path, f"not a PEM {what}{hint}") from None


def load_private_key(option: str, path: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_file(option, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise FileError(option, path, "the private key is encrypted; give an unencrypted key "
                                         "(openssl pkey -in KEY -out KEY.plain)") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it holds a certificate)" if b"BEGIN CERTIFICATE" in data else ""
        raise FileError(option, path, f"not a PEM private key{hint}") from None


def _public_der(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(cert_path: str, key_path: str, cert_option: str = "--cert", key_option: str = "--private-key"):
    """A certificate chain and the private key of its first certificate."""
    chain = load_certificates(cert_option, cert_path)
    key = load_private_key(key_option, key_path)
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise FileError(key_option, key_path, f"is not the private key of the certificate in {cert_option} "
                                                 f"{show_path(cert_path)}")
    return key, chain


def check_state_dir(path: str, name: str = "tunnelpass") -> None:
    """``--state-dir``: a readable, writable directory (or one that can be
    created: its nearest existing ancestor is a writable directory), whose
    saved certificate, if any, loads (the ``.bak`` pair counts, as it does
    for the server's own loader)."""
    option = "--state-dir"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        _check_creatable(path)
        _try_writing(path, create=True)
        return
    except OSError as e:
        raise FileError(option, path, os_reason(e)) from None
    if not stat.S_ISDIR(mode):
        raise FileError(option, path, "not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise FileError(option, path, "not readable (" + os.strerror(errno.EACCES) + ")")
    if not os.access(path, os.W_OK):
        raise FileError(option, path, "not writable (" + os.strerror(errno.EACCES) + ")")
    _try_writing(path)
    cert, key = os.path.join(path, name + ".crt"), os.path.join(path, name + ".key")
    if not (os.path.lexists(cert) or os.path.lexists(cert + ".bak")):
        return
    try:
        check_pair(cert, key, "certificate", "key")
    except FileError as first:
        try:
            check_pair(cert + ".bak", key + ".bak", "certificate", "key")
        except FileError:
            reason = f"saved {first.option} {os.path.basename(first.path)}: {first.reason}"
            raise FileError(option, path, reason.replace(os.path.dirname(first.path) + os.sep, "")
                               + "; no usable .bak either (move the files away to generate a new "
                                 "certificate: its pin changes)") from None


def _try_writing(path: str, create: bool = False) -> None:
    """Create (if asked) and write a file in the state directory for real:
    ``os.access`` says yes to root on a read-only filesystem or in /proc,
    and the certificate would then fail to save after startup."""
    try:
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise FileError("--state-dir", path, ("cannot be created: " if create else "not writable: ")
                           + os_reason(e)) from None


def _check_creatable(path: str) -> None:
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise FileError("--state-dir", path, f"cannot be created: {show_path(ancestor)} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FileError("--state-dir", path, f"cannot be created: {show_path(ancestor)} is not writable")


def check_files(options) -> None:
    """Every file the options name, checked for what this mode will use."""
    mode = options.get("mode")
    if mode == "client" and options.get("ca") and options.get("flow") != "local":
        load_certificates("--ca", options["ca"], "CA certificate")
    if mode == "server":
        if options.get("tls") == 2:
            check_pair(options["cert"], options["private-key"])
        elif options.get("tls") == 1 and options.get("state-dir"):
            check_state_dir(options["state-dir"])


# Failures once the services run


def exit_after_stop(reactor, status: int = STARTUP_FAILED) -> None:
    """Stop the reactor (services stop in order, twistd removes its pid
    file and closes the log) and make the process exit with *status*:
    twistd itself would exit 0 after a plain ``reactor.stop()``."""
    atexit.register(exit_now, status)
    reactor.stop()


class StartupWatch:
    """Ends the process if a startup callback failed.

    Twisted runs ``callWhenRunning`` callbacks as system event triggers:
    an exception there is logged ("While calling system event trigger
    handler") and ignored, and the process runs on without the part that
    failed.  From :meth:`start` (the root's ``startService``) until the
    reactor has run every startup callback, the watch notes such failures;
    its own callback, registered last, then logs one critical
    ``startup_failed`` line and calls *fail* (default:
    :func:`exit_after_stop`, exit status 1)."""

    #: Twisted's logger for failures in system event triggers.
    NAMESPACE = "twisted.internet.base"

    def __init__(self, reactor, publisher=globalLogPublisher, fail=None):
        self.reactor = reactor
        self.publisher = publisher
        self.fail = fail or (lambda: exit_after_stop(reactor))
        self.failure = None

    def start(self) -> None:
        self.publisher.addObserver(self._observe)
        self.reactor.callWhenRunning(self._check)

    def _observe(self, event) -> None:
        if self.failure is None and event.get("log_failure") is not None \
                and event.get("log_namespace") == self.NAMESPACE:
            self.failure = event["log_failure"]

    def _check(self) -> None:
        self.publisher.removeObserver(self._observe)
        if self.failure is None:
            return
        log.critical("tunnelpass: startup failed: {reason}", reason=describe(self.failure.value),
                     event="startup_failed")
        self.fail()


class Launcher:
    """The ``twistd`` that forked this daemon (no ``-n``) waits on a status
    pipe until its child reports: it exits 0 on ``"0"``, 1 with the message
    otherwise, and waits forever if nothing comes (it keeps the pipe's
    write end).  twistd reports only for an ``Exception`` out of the start;
    a failed start ends with ``SystemExit``, so it is reported here, and the
    pid file twistd would have removed goes too.  *config*: twistd's options
    (``statusPipe`` appears there once it has forked), or None."""

    def __init__(self, config=None):
        self.config = config

    def failed(self, message: str) -> None:
        config = self.config
        if config is None:
            return
        pipe = config.get("statusPipe")
        if pipe is not None:
            config["statusPipe"] = None
            try:
                # twistd's own format: "1 " and the message, 100 bytes at most.
                os.write(pipe, b"1 " + message.encode("utf-8", "replace")[:98])
                os.close(pipe)
            except OSError:
                pass
        pidfile = config.get("pidfile")
        if pipe is not None and pidfile:
            try:
                os.remove(pidfile)
            except OSError:
                pass


def guard_start(start, what: str, launcher: Launcher | None = None) -> None:
    """Run a root service's *start* step; a failure becomes one critical
    ``startup_failed`` line and ``SystemExit(1)`` (twistd lets a
    SystemExit end the process quietly; anything else prints a traceback).

    A :class:`~tunnelpass.ops.starterror.StartupError` (``--tunnel: cannot
    listen on ...``), or a ``SystemExit`` with a ``"tunnelpass: ..."``
    message, is logged as that line; any other exception as
    ``tunnelpass: startup failed: TYPE: message``, with the traceback at
    debug level for a bug report.  *launcher*: the twistd waiting for this
    daemon's start, told of the failure (:class:`Launcher`)."""
    launcher = launcher or Launcher()
    try:
        start()
    except StartupError as e:
        log.critical("tunnelpass: {reason}", reason=str(e), event="startup_failed", stage=what)
        launcher.failed(f"tunnelpass: {e}")
        raise SystemExit(STARTUP_FAILED) from None
    except SystemExit as e:
        if isinstance(e.code, str):
            reason = e.code[len("tunnelpass: "):] if e.code.startswith("tunnelpass: ") else e.code
            log.critical("tunnelpass: {reason}", reason=reason, event="startup_failed", stage=what)
            launcher.failed(f"tunnelpass: {reason}")
            raise SystemExit(STARTUP_FAILED) from None
        launcher.failed(f"tunnelpass: startup failed (exit status {e.code})")
        raise
    except Exception as e:
        log.failure("startup failed in {stage}", level=LogLevel.debug, stage=what)
        log.critical("tunnelpass: startup failed: {reason}", reason=describe(e), event="startup_failed",
                     stage=what)
        launcher.failed(f"tunnelpass: startup failed: {describe(e)}")
        raise SystemExit(STARTUP_FAILED) from None
