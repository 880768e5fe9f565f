"""The README is the front door: it must render, open with the two commands,
and document every option the program has."""

import io
import os

from twisted.trial import unittest

from tunnelpass.tap import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


class DocsTests(unittest.TestCase):
    def test_rst_renders_without_warnings(self):
        from docutils.core import publish_doctree

        for name in ("README.rst", "docs/operations.rst", "docs/protocol.rst", "docs/master.rst"):
            errors = io.StringIO()
            publish_doctree(read(name), source_path=name,
                            settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": errors})
            self.assertEqual(errors.getvalue(), "", name)

    def test_readme_opens_with_demo_and_test(self):
        commands = [line.split("#")[0].strip() for line in read("README.rst").splitlines()[:8]
                    if line.startswith("    make")]
        self.assertEqual(commands, ["make demo", "make test"])

    def test_every_option_documented(self):
        readme = read("README.rst")
        for long_name, *_ in Options.optParameters + Options.optFlags:
            self.assertIn(f"--{long_name}", readme)

    def test_every_twistd_command_runs_twice_in_one_directory(self):
        """``twistd`` writes ``twistd.pid`` in the working directory and will
        not start a second instance there: every printed command that starts
        tunnelpass under twistd says ``--pidfile`` (or uses ``twist``)."""
        import glob
        import re

        names = ["README.rst", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.rst"))),
                 *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "etc", "*.service")))]
        command = re.compile(r"\btwistd((?:\s+-[^\s`']*)*)\s+tunnelpass\b")
        found = 0
        for name in names:
            for number, line in enumerate(read(name).splitlines(), 1):
                for match in command.finditer(line):
                    found += 1
                    self.assertIn("--pidfile", match.group(1), f"{name}:{number}: {line.strip()}")
        self.assertGreater(found, 10)
        from tunnelpass.tunnel import server

        with open(server.__file__, encoding="utf-8") as f:
            logged = [m.group(1) for m in command.finditer(f.read())]
        self.assertTrue(logged and all("--pidfile" in options for options in logged), "the server's client command")
