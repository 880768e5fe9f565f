"""The systemd units in etc/: hardened (systemd-analyze security scores each
one, and each with the low-port drop-in, "OK": 3.0 or lower), valid
(systemd-analyze verify), running the command the docs describe, and
MemoryDenyWriteExecute= set to what the process actually survives."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from twisted.trial import unittest

from tests.e2e.harness import Forwarder, TCPServer, free_port, scrape, tcp_round_trip, wait_until
from tests.test_tap import parse
from tests import wxfilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")
UNITS = sorted(name for name in os.listdir(ETC) if name.endswith(".service"))
DROP_IN = os.path.join(ETC, "tunnelpass-low-port.conf")
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 3.0
VENV_BIN = os.path.dirname(sys.executable)

#: What each unit's EnvironmentFile is documented to hold (a sample).
SAMPLE_ENV = {
    "tunnelpass-server.service": {"TUNNELPASS_KEY": "9f1c2a7be04d3385c6e1f0a2b4d6e8f1"},
    "tunnelpass-client.service": {"TUNNELPASS_TUNNEL": "server.example.com:10101",
                                  "TUNNELPASS_KEY": "9f1c2a7be04d3385c6e1f0a2b4d6e8f1"},
    "tunnelpass-forward.service": {},
    "tunnelpass-master.service": {},
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def service_settings(text):
    """key -> list of values in the [Service] section (comments dropped)."""
    settings, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def with_drop_in(unit_text, drop_in_text):
    """The unit as systemd sees it with the drop-in: its [Service] lines are
    parsed after the unit's, the same as appending them to the section."""
    body = drop_in_text.split("[Service]", 1)[1]
    head, sep, tail = unit_text.partition("\n[Install]")
    return head.rstrip("\n") + "\n" + body.strip("\n") + "\n" + sep + tail


def exposure(path):
    result = subprocess.run([ANALYZE, "security", "--offline=yes", path],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        raise AssertionError(f"no score from systemd-analyze:\n{result.stdout}{result.stderr}")
    return float(match.group(1)), result.stdout


class UnitTests(unittest.TestCase):
    def test_units_exist(self):
        self.assertEqual(UNITS, ["tunnelpass-client.service", "tunnelpass-forward.service",
                                 "tunnelpass-master.service", "tunnelpass-server.service"])

    def test_exec_start_is_the_documented_command_and_parses(self):
        for name in UNITS:
            settings = service_settings(read(os.path.join(ETC, name)))
            (command,) = settings["ExecStart"]
            argv = shlex.split(command.replace("%S", "/var/lib"))
            self.assertEqual(argv[:4], ["/opt/tunnelpass/bin/twistd", "-n", "--pidfile=", "tunnelpass"], name)
            options = parse(argv[4:], SAMPLE_ENV[name])
            self.assertEqual(options["mode"], name.split("-")[1].split(".")[0], name)
            self.assertEqual(settings["ExecReload"], ["/bin/kill -HUP $MAINPID"], name)
            self.assertEqual(settings["Restart"], ["on-failure"], name)
            self.assertEqual(settings["DynamicUser"], ["yes"], name)
            self.assertEqual(settings["CapabilityBoundingSet"], [""], name)
        server = service_settings(read(os.path.join(ETC, "tunnelpass-server.service")))
        self.assertEqual(server["StateDirectory"], ["tunnelpass"])
        self.assertIn("--state-dir %S/tunnelpass", server["ExecStart"][0])
        master = service_settings(read(os.path.join(ETC, "tunnelpass-master.service")))
        self.assertEqual(master["StateDirectory"], ["tunnelpass-master"])
        self.assertIn("--state-dir %S/tunnelpass-master", master["ExecStart"][0])
        # SIGTERM to the master alone: it drains the instances in its workers.
        self.assertEqual(master["KillMode"], ["mixed"])

    def test_security_exposure_is_ok(self):
        if ANALYZE is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        drop_in = read(DROP_IN)
        for name in UNITS:
            path = os.path.join(ETC, name)
            score, report = exposure(path)
            self.assertLessEqual(score, MAX_EXPOSURE, f"{name}:\n{report}")
            merged = os.path.join(self.mktemp() + "-" + name)
            with open(merged, "w") as f:
                f.write(with_drop_in(read(path), drop_in))
            score, report = exposure(merged)
            self.assertLessEqual(score, MAX_EXPOSURE, f"{name} + low-port drop-in:\n{report}")
            self.assertIn("CAP_NET_BIND_SERVICE", service_settings(read(merged))["CapabilityBoundingSet"])

    def test_verify(self):
        # verify checks that ExecStart's program exists: point it at this venv.
        if ANALYZE is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        directory = self.mktemp()
        os.makedirs(directory)
        for name in UNITS:
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(read(os.path.join(ETC, name)).replace("/opt/tunnelpass/bin", VENV_BIN))
            result = subprocess.run([ANALYZE, "verify", "--man=no", "./" + name], capture_output=True, text=True,
                                    timeout=60, cwd=directory)
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), name)


class WriteExecuteTests(unittest.TestCase):
    """MemoryDenyWriteExecute=yes where the process survives it, no where it
    cannot: measured under the same seccomp rules systemd installs."""

    def setUp(self):
        if not wxfilter.supported():
            raise unittest.SkipTest("the W^X filter is written for Linux x86-64")

    def memory_deny_write_execute(self, name):
        return service_settings(read(os.path.join(ETC, name)))["MemoryDenyWriteExecute"]

    def test_forwarder_serves_under_the_filter(self):
        self.assertEqual(self.memory_deny_write_execute("tunnelpass-forward.service"), ["yes"])
        backend, port, metrics = TCPServer(self), free_port(), free_port()
        Forwarder(self, f"127.0.0.1:{port} | 127.0.0.1 | {backend.port}\n", "--metrics", str(metrics),
                  prefix=(sys.executable, wxfilter.__file__))
        payload = os.urandom(256 * 1024)
        self.assertEqual(tcp_round_trip(port, payload), payload)
        key = ("tunnelpass_bytes_in_total", (("listener", f"127.0.0.1:{port}/tcp"),
                                             ("remote", f"127.0.0.1:{backend.port}")))
        wait_until(lambda: scrape(metrics).get(key) == len(payload), what="bytes_in counted")

    def test_tls_needs_write_execute_memory(self):
        for name in ("tunnelpass-server.service", "tunnelpass-client.service"):
            self.assertEqual(self.memory_deny_write_execute(name), ["no"], name)
        child = ("import mmap, sys\n"
                 "from tests import wxfilter\n"
                 "wxfilter.deny_write_execute()\n"
                 "try:\n"
                 "    mmap.mmap(-1, 4096, prot=7)\n"
                 "    sys.exit('the filter let a write+execute mapping through')\n"
                 "except PermissionError:\n"
                 "    pass\n"
                 "from tunnelpass.carriers import tls\n"
                 "try:\n"
                 "    tls.PinnedClientCreator(b'x' * 32)\n"
                 "except MemoryError as e:\n"
                 "    print('MemoryError:', e)\n")
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, cwd=ROOT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Cannot allocate write+execute memory for ffi.callback()", result.stdout,
                      "TLS contexts no longer need W+X memory: set MemoryDenyWriteExecute=yes in the "
                      f"server and client units\n{result.stdout}{result.stderr}")
