"""Tests for tunnelpass.ops.startup: file checks, one-line startup errors, exit status."""

import os
import tempfile

from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, LogPublisher, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.certs import ca_signed, write_pem
from tunnelpass.ops import startup
from tunnelpass.carriers import tls
from tunnelpass.ops.startup import (
    StartupError,
    StartupWatch,
    check_files,
    check_pair,
    check_state_dir,
    guard_start,
    load_certificates,
    load_private_key,
    read_file,
    show_path,
)


class FileTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca, self.cert, self.key = write_pem(self.dir, *ca_signed())

    def path(self, name, data=None):
        path = os.path.join(self.dir, name)
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        return path

    def assertStartupError(self, line, function, *args):
        with self.assertRaises(StartupError) as cm:
            function(*args)
        self.assertEqual(str(cm.exception), line)
        self.assertNotIn("\n", str(cm.exception))
        return cm.exception

    def test_missing_directory_and_special_files(self):
        missing = self.path("nope.pem")
        self.assertStartupError(f"--ca {missing}: No such file or directory", load_certificates, "--ca", missing)
        self.assertStartupError(f"--ca {self.dir}: is a directory, not a file", read_file, "--ca", self.dir)
        fifo = self.path("fifo")
        os.mkfifo(fifo)  # a FIFO with no writer: read_file must not block on it
        self.assertStartupError(f"--ca {fifo}: not a regular file", read_file, "--ca", fifo)
        under_file = os.path.join(self.ca, "x")
        self.assertStartupError(f"--ca {under_file}: Not a directory", read_file, "--ca", under_file)

    def test_contents(self):
        self.assertEqual(len(load_certificates("--ca", self.ca)), 1)
        junk = self.path("junk", b"hello\n")
        self.assertStartupError(f"--ca {junk}: not a PEM CA certificate", load_certificates, "--ca", junk,
                                "CA certificate")
        self.assertStartupError(f"--cert {self.key}: not a PEM certificate (it holds a private key)",
                                load_certificates, "--cert", self.key)
        self.assertStartupError(f"--private-key {self.cert}: not a PEM private key (it holds a certificate)",
                                load_private_key, "--private-key", self.cert)
        self.assertStartupError(f"--private-key {junk}: not a PEM private key", load_private_key,
                                "--private-key", junk)

    def test_encrypted_key(self):
        from cryptography.hazmat.primitives import serialization

        key = load_private_key("--private-key", self.key)
        locked = self.path("locked.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        error = self.assertStartupError(
            f"--private-key {locked}: the private key is encrypted; give an unencrypted key "
            "(openssl pkey -in KEY -out KEY.plain)", load_private_key, "--private-key", locked)
        self.assertEqual(error.option, "--private-key")

    def test_oversized_file(self):
        big = self.path("big.pem", b"-" * (startup.MAX_PEM_BYTES + 1))
        self.assertStartupError(f"--ca {big}: larger than {startup.MAX_PEM_BYTES} bytes",
                                load_certificates, "--ca", big)

    def test_pair_must_match(self):
        key, chain = check_pair(self.cert, self.key)
        self.assertEqual(len(chain), 1)
        _, other_key, other_cert = ca_signed()
        other = self.mktemp()
        os.makedirs(other)
        _, _, wrong_key = write_pem(other, _, other_key, other_cert)
        self.assertStartupError(
            f"--private-key {wrong_key}: is not the private key of the certificate in --cert {self.cert}",
            check_pair, self.cert, wrong_key)

    def test_hostile_path_names_stay_one_line(self):
        evil = os.path.join(self.dir, "a\nb\udcff")
        error = self.assertStartupError(f"--ca {evil!r}: No such file or directory", read_file, "--ca", evil)
        self.assertEqual(error.path, evil)
        self.assertEqual(show_path("/etc/ssl/ca.pem"), "/etc/ssl/ca.pem")


class StateDirTests(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def test_new_or_creatable_directory_is_fine(self):
        check_state_dir(self.dir)
        check_state_dir(os.path.join(self.dir, "a", "b"))  # created at startup

    def test_a_place_nothing_can_be_written_to(self):
        """os.access says yes to root in /proc: the check writes for real."""
        for path in ("/proc/tunnelpass-state", "/proc/self"):
            with self.assertRaises(StartupError) as cm:
                check_state_dir(path)
            self.assertEqual(cm.exception.option, "--state-dir")
            self.assertRegex(str(cm.exception), r"(cannot be created|not writable)")

    def test_not_a_directory(self):
        path = os.path.join(self.dir, "file")
        open(path, "w").close()
        with self.assertRaises(StartupError) as cm:
            check_state_dir(path)
        self.assertEqual(str(cm.exception), f"--state-dir {path}: not a directory")
        with self.assertRaises(StartupError) as cm:
            check_state_dir(os.path.join(path, "sub"))
        self.assertEqual(str(cm.exception), f"--state-dir {path}/sub: Not a directory")

    def test_not_writable(self):
        if os.geteuid() == 0:
            raise unittest.SkipTest("root may write anywhere")
        os.chmod(self.dir, 0o500)
        self.addCleanup(os.chmod, self.dir, 0o700)
        with self.assertRaises(StartupError) as cm:
            check_state_dir(self.dir)
        self.assertIn("not writable", str(cm.exception))

    def test_saved_certificate(self):
        key, certificate = tls.self_signed()
        tls.save_pair(self.dir, key, certificate)
        check_state_dir(self.dir)
        crt = os.path.join(self.dir, "tunnelpass.crt")
        with open(crt, "wb") as f:
            f.write(b"garbage")
        with self.assertRaises(StartupError) as cm:
            check_state_dir(self.dir)
        self.assertEqual(str(cm.exception),
                         f"--state-dir {self.dir}: saved certificate tunnelpass.crt: not a PEM certificate; "
                         "no usable .bak either (move the files away to generate a new certificate: its pin changes)")

    def test_damaged_certificate_with_good_backup_loads(self):
        # The server's loader falls back to the .bak pair (tls.load_saved_pair): so does the check.
        for _ in range(2):  # the second save leaves the first pair as .bak
            tls.save_pair(self.dir, *tls.self_signed())
        with open(os.path.join(self.dir, "tunnelpass.key"), "wb") as f:
            f.write(b"garbage")
        check_state_dir(self.dir)
        tls.load_saved_pair(self.dir)


class CheckFilesTests(unittest.TestCase):
    def test_what_each_mode_reads(self):
        missing = os.path.join(tempfile.gettempdir(), "tunnelpass-no-such-file.pem")
        check_files({"mode": "client", "ca": missing, "flow": "local"})  # local flow: no server, no CA
        check_files({"mode": "server", "tls": 0, "state-dir": "/proc/version"})  # tls 0: no state
        with self.assertRaises(StartupError) as cm:
            check_files({"mode": "client", "ca": missing, "flow": "auto"})
        self.assertEqual(cm.exception.option, "--ca")
        with self.assertRaises(StartupError) as cm:
            check_files({"mode": "server", "tls": 2, "cert": missing, "private-key": missing})
        self.assertEqual(cm.exception.option, "--cert")
        with self.assertRaises(StartupError) as cm:
            check_files({"mode": "server", "tls": 1, "state-dir": "/proc/version"})
        self.assertEqual(str(cm.exception), "--state-dir /proc/version: not a directory")


class _Failing(Service):
    def __init__(self, error):
        self.error = error

    def privilegedStartService(self):
        raise self.error


class GuardTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.patch(startup, "log", Logger(namespace="tunnelpass.startup", observer=self.events.append))

    def critical(self):
        return [e for e in self.events if e["log_level"] == LogLevel.critical]

    def test_a_message_becomes_one_critical_line_and_status_1(self):
        def start():
            raise SystemExit("tunnelpass: --tunnel: cannot listen on 127.0.0.1:1: Address already in use")

        with self.assertRaises(SystemExit) as cm:
            guard_start(start, "privilegedStartService")
        self.assertEqual(cm.exception.code, 1)
        (event,) = self.critical()
        self.assertEqual((event["event"], event["reason"]),
                         ("startup_failed", "--tunnel: cannot listen on 127.0.0.1:1: Address already in use"))
        self.assertEqual(formatEvent(event),
                         "tunnelpass: --tunnel: cannot listen on 127.0.0.1:1: Address already in use")

    def test_any_exception_becomes_one_line_not_a_traceback(self):
        with self.assertRaises(SystemExit) as cm:
            guard_start(_Failing(PermissionError(13, "Permission denied")).privilegedStartService, "x")
        self.assertEqual(cm.exception.code, 1)
        with self.assertRaises(SystemExit):
            guard_start(_Failing(KeyError("surprise\nsecond line")).privilegedStartService, "x")
        first, second = self.critical()
        self.assertEqual(first["reason"], "Permission denied")
        self.assertEqual(second["reason"], "KeyError: 'surprise\\nsecond line'")
        self.assertTrue(any(e.get("log_failure") and e["log_level"] == LogLevel.debug for e in self.events))

    def test_a_clean_start_passes(self):
        guard_start(lambda: None, "startService")
        self.assertEqual(self.events, [])

    def test_the_root_service_guards_its_children(self):
        from tunnelpass.tap import TunnelpassService

        root = TunnelpassService(lambda event: None)
        _Failing(OSError(98, "Address already in use")).setServiceParent(root)
        with self.assertRaises(SystemExit) as cm:
            root.privilegedStartService()
        self.assertEqual(cm.exception.code, 1)
        self.assertEqual(self.critical()[0]["reason"], "Address already in use")


class _Recording(Service):
    def __init__(self, calls):
        self.calls = calls

    def privilegedStartService(self):
        self.calls.append("privileged")
        super().privilegedStartService()

    def startService(self):
        self.calls.append("start")
        super().startService()


class RunnerTests(unittest.TestCase):
    """twistd calls privilegedStartService then startService; twist only
    startService: the services bind in the first, so the root runs it."""

    def started(self, privileged_first):
        from tunnelpass.tap import TunnelpassService

        calls = []
        root = TunnelpassService(lambda event: None)
        _Recording(calls).setServiceParent(root)
        if privileged_first:
            root.privilegedStartService()
        root.startService()
        return calls

    def test_twistd(self):
        self.assertEqual(self.started(privileged_first=True), ["privileged", "start"])

    def test_twist(self):
        self.assertEqual(self.started(privileged_first=False), ["privileged", "start"])


class WatchTests(unittest.TestCase):
    """What runs once the reactor starts (callWhenRunning) and fails would
    be logged by Twisted and ignored: the watch ends the process."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.publisher = LogPublisher()
        self.failed = []
        self.watch = StartupWatch(self.reactor, self.publisher, fail=lambda: self.failed.append(True))
        self.events = []
        self.patch(startup, "log", Logger(namespace="tunnelpass.startup", observer=self.events.append))

    def run_startup_hooks(self):
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)

    def trigger_failure(self, namespace=StartupWatch.NAMESPACE):
        try:
            raise ValueError("cannot verify a certificate for 'x'")
        except ValueError:
            Logger(namespace=namespace, observer=self.publisher).failure(
                "While calling system event trigger handler")

    def test_failed_startup_callback_ends_the_process(self):
        self.watch.start()
        self.trigger_failure()
        self.run_startup_hooks()
        self.assertEqual(self.failed, [True])
        (event,) = self.events
        self.assertEqual((event["event"], event["log_level"]), ("startup_failed", LogLevel.critical))
        self.assertEqual(event["reason"], "ValueError: cannot verify a certificate for 'x'")

    def test_clean_startup_and_other_failures_do_not(self):
        self.watch.start()
        self.trigger_failure(namespace="tunnelpass.server")  # a failure some service logged itself
        self.run_startup_hooks()
        self.assertEqual((self.failed, self.events), ([], []))
        self.trigger_failure()  # after startup: the watch is gone
        self.assertEqual(self.failed, [])
        self.assertEqual(self.publisher._observers, [])

    def test_default_action_stops_with_status_1(self):
        registered = []
        self.patch(startup.atexit, "register", lambda *a: registered.append(a))
        self.reactor.running = True
        startup.exit_after_stop(self.reactor)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(registered, [(startup.exit_now, 1)])


class FailureDescriptionTests(unittest.TestCase):
    def test_describe(self):
        self.assertEqual(startup.describe(FileNotFoundError(2, "x", "/a")), "No such file or directory")
        self.assertEqual(startup.describe(RuntimeError()), "RuntimeError")
        self.assertEqual(startup.describe(Failure(ValueError("a\nb")).value), "ValueError: a b")
