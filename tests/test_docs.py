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

        for name in ("README.rst", "docs/operations.rst", "docs/protocol.rst"):
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
