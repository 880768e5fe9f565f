"""End-to-end: a real ``twistd tunnelpass`` refuses a weak key at startup
(a one-line usage error, non-zero exit) and runs with it only under
``--weak-key``, saying so in its log."""

import os
import subprocess

from twisted.trial import unittest

from tests.e2e.harness import ROOT, TWISTD, Twistd, free_port

WEAK = "a" * 16


def _environment(extra):
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("TUNNELPASS_") and not k.startswith("NP_")}
    environment.update(extra)
    return environment


class WeakKeyTests(unittest.TestCase):
    def run_tool(self, tool, args, env=None):
        twist = os.path.join(os.path.dirname(TWISTD), "twist")
        command = [TWISTD, "-n", "--pidfile="] if tool == "twistd" else [twist]
        return subprocess.run([*command, "tunnelpass", *args], capture_output=True, text=True, timeout=20,
                              cwd=ROOT, env=_environment(env or {}))

    def assertRefusedInOneLine(self, result, tool):
        """A usage error is one line on stderr and exit status 2 under both
        runners (tunnelpass.tap.Options.parseOptions; without it twistd
        prints its whole usage text first and twist after the error)."""
        self.assertEqual((result.returncode, result.stdout), (2, ""), result.stderr)
        (line,) = result.stderr.splitlines()
        self.assertTrue(line.startswith("tunnelpass: the tunnel key is weak: "), line)
        hint = "twistd -n --pidfile= tunnelpass --help" if tool == "twistd" else "twist tunnelpass --help"
        self.assertTrue(line.endswith(f"(see: {hint})"), line)
        self.assertIn("it has only 1 different character", line)
        self.assertIn("8+ different ones and an estimated 64+ bits", line)
        self.assertIn("openssl rand -hex 32", line)

    def test_weak_key_refused_at_startup(self):
        tunnel, target = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        args = ["--mode", "server", "--key", WEAK, "--tunnel", tunnel, "--target", target]
        self.assertRefusedInOneLine(self.run_tool("twistd", args), "twistd")
        self.assertRefusedInOneLine(self.run_tool("twist", args), "twist")
        self.assertRefusedInOneLine(self.run_tool("twistd", [f"client://{WEAK}@{tunnel}/{target}"]), "twistd")

    def test_weak_key_flag_runs_and_warns(self):
        server = Twistd(self, ["--mode", "server", "--tunnel", f"127.0.0.1:{free_port()}",
                               "--target", f"127.0.0.1:{free_port()}", "--flow", "send"],
                        env={"TUNNELPASS_KEY": WEAK, "TUNNELPASS_WEAK_KEY": "1"})
        server.wait_for_log("server running")
        server.wait_for_log("--weak-key: running with a weak tunnel key (it has only 1 different character)")
        self.assertIsNone(server.process.poll())
