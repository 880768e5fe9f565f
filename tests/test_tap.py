"""Tests for tunnelpass.tap (options, environment) and the twistd dropin."""

import os
import subprocess
import sys
import tempfile
import zipfile

from twisted.application.service import IServiceMaker
from twisted.logger import formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from tunnelpass import tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(args, environ=None):
    options = tap.Options()
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(environ or {})
    try:
        options.parseOptions(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return options


class OptionTests(unittest.TestCase):
    def test_defaults(self):
        options = parse(["--mode", "forward"])
        self.assertEqual(options["config"], "etc/tunnelpass.conf")
        self.assertEqual(options["max-conns"], 1000)
        self.assertEqual(options["connect-timeout"], 5)
        self.assertEqual(options["idle"], 600)
        self.assertEqual(options["udp-idle"], 60)
        self.assertEqual(options["reload-interval"], 0)
        self.assertEqual(options["shutdown-timeout"], 5)
        self.assertEqual(options["report-interval"], 60)
        self.assertEqual((options["log"], options["log-format"]), ("info", "text"))

    def test_durations_and_counts(self):
        options = parse(["-m", "forward", "--idle", "2m", "--connect-timeout=500ms", "--max-conns", "7"])
        self.assertEqual((options["idle"], options["connect-timeout"], options["max-conns"]), (120, 0.5, 7))

    def test_environment(self):
        options = parse(["-m", "forward"], {"TUNNELPASS_MAX_CONNS": "200", "TUNNELPASS_LOG_FORMAT": "json"})
        self.assertEqual((options["max-conns"], options["log-format"]), (200, "json"))

    def test_mode_from_environment(self):
        self.assertEqual(parse([], {"TUNNELPASS_MODE": "forward"})["mode"], "forward")

    def test_flags_win_over_environment(self):
        options = parse(["-m", "forward", "--max-conns", "5"], {"TUNNELPASS_MAX_CONNS": "200"})
        self.assertEqual(options["max-conns"], 5)

    def assertUsageError(self, args, *fragments, environ=None):
        with self.assertRaises(usage.UsageError) as cm:
            parse(args, environ)
        for fragment in fragments:
            self.assertIn(fragment, str(cm.exception))

    def test_bad_environment(self):
        self.assertUsageError(["-m", "forward"], "TUNNELPASS_MAX_CONNS", "invalid number",
                              environ={"TUNNELPASS_MAX_CONNS": "lots"})
        self.assertUsageError(["-m", "forward"], "unknown environment variable TUNNELPASS_MAXCONNS",
                              environ={"TUNNELPASS_MAXCONNS": "5"})

    def test_bad_values(self):
        self.assertUsageError(["-m", "forward", "--idle", "soon"], "--idle", "invalid duration")
        self.assertUsageError(["-m", "forward", "--max-conns", "0"], "--max-conns")
        self.assertUsageError(["-m", "forward", "--udp-idle", "0"], "--udp-idle", "greater than zero")
        self.assertUsageError(["-m", "forward", "--log", "loud"], "--log", "debug, info, warn, error, fatal")
        self.assertUsageError(["-m", "forward", "--log-format", "xml"], "--log-format")
        self.assertUsageError(["-m", "teleport"], "--mode", "server, client, forward, master")

    def test_unknown_option_and_argument(self):
        self.assertUsageError(["-m", "forward", "--frobnicate"], "frobnicate")
        self.assertUsageError(["-m", "forward", "stray"], "unexpected argument 'stray'")

    def test_mode_required(self):
        self.assertUsageError([], "choose a mode with --mode")

    def test_master_mode_defaults_to_loopback(self):
        options = parse(["--mode", "master"])
        self.assertEqual((options["api"], options["api-prefix"], options["report-interval"]),
                         ("127.0.0.1:9090", "/api", 5.0))

    def test_help_lists_modes_and_options(self):
        text = str(tap.Options())
        for word in ("server", "client", "forward", "master", "--max-conns", "--connect-timeout",
                     "--idle", "--udp-idle", "--reload-interval", "--shutdown-timeout",
                     "--report-interval", "--log", "--log-format", "TUNNELPASS_"):
            self.assertIn(word, text)


class PluginTests(unittest.TestCase):
    def test_discoverable_by_twistd(self):
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("tunnelpass", makers)
        self.assertIs(makers["tunnelpass"].options, tap.Options)

    def test_regular_install_is_discoverable(self):
        """A regular (wheel) install carries twisted/plugins/tunnelpass_plugin.py,
        no __init__.py that would shadow Twisted's own plugins package, and
        twistd's plugin discovery finds it there."""
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-q", "-w", out, ROOT],
                check=True, capture_output=True, timeout=300,
            )
            (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
            names = zipfile.ZipFile(os.path.join(out, wheel)).namelist()
            self.assertIn("twisted/plugins/tunnelpass_plugin.py", names)
            self.assertIn("tunnelpass/relay/relay.py", names)
            self.assertNotIn("twisted/__init__.py", names)
            self.assertNotIn("twisted/plugins/__init__.py", names)

            target = os.path.join(out, "site")
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target,
                 os.path.join(out, wheel)],
                check=True, capture_output=True, timeout=300,
            )
            probe = (
                "import sys, tunnelpass\n"
                "from twisted.plugin import getPlugins\n"
                "from twisted.application.service import IServiceMaker\n"
                "maker = [p for p in getPlugins(IServiceMaker) if p.tapname == 'tunnelpass']\n"
                "print(len(maker), sys.modules['twisted.plugins.tunnelpass_plugin'].__file__, tunnelpass.__file__)\n"
            )
            result = subprocess.run(
                [sys.executable, "-c", probe], cwd=target, capture_output=True, text=True,
                timeout=120, env={**os.environ, "PYTHONPATH": target},
            )
            count, dropin, package = result.stdout.split()
            self.assertEqual(count, "1", result.stderr)
            self.assertTrue(dropin.startswith(target), dropin)
            self.assertTrue(package.startswith(target), package)


KEY = "tap-test-key-0123456789abcdef"
WEAK = "a" * 16  # long enough, one character: weak


def _token_body(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


class TunnelOptionTests(unittest.TestCase):
    assertUsageError = OptionTests.assertUsageError

    def test_server_flags(self):
        options = parse(["--mode", "server", "--tunnel", "0.0.0.0:10101", "--target", "[::]:8080",
                         "--key", KEY, "--tls", "1", "--flow", "receive", "--max-pool", "512"])
        self.assertEqual((options["tunnel"], options["target"], options["tls"]), ("0.0.0.0:10101", "[::]:8080", 1))
        # Health lines every 60 s in every mode; the heartbeat is its own setting.
        self.assertEqual((options["flow"], options["max-pool"], options["report-interval"], options["heartbeat"]),
                         ("receive", 512, 60.0, 5.0))
        self.assertEqual(parse(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--heartbeat", "500ms",
                                "--report-interval", "0"])["heartbeat"], 0.5)
        self.assertUsageError(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--heartbeat", "50ms"],
                              "--heartbeat", "100ms to 10m")

    def test_url_maps_to_options(self):
        options = parse([f"server://{KEY}@0.0.0.0:10101/0.0.0.0:8080?tls=1&log=debug&max=512&mode=2"])
        self.assertEqual((options["mode"], options["key"], options["tls"], options["max-pool"]),
                         ("server", KEY, 1, 512))
        self.assertEqual((options["flow"], options["log"]), ("send", "debug"))
        client = parse([f"client://{KEY}@server.example.com:10101/127.0.0.1:8080?min=32"])
        self.assertEqual((client["tunnel"], client["min-pool"]), ("server.example.com:10101", 32))

    def test_bad_urls(self):
        for url, fragment in [
            (f"server://{KEY}@0.0.0.0:10101/0.0.0.0:8080?bogus=1", "unknown URL query key"),
            (f"server://{KEY}@0.0.0.0:10101/0.0.0.0:8080?tls=1&tls=2", "given twice"),
            ("server://short@0.0.0.0:10101/0.0.0.0:8080", "shorter than 16"),
            (f"ftp://{KEY}@0.0.0.0:10101/0.0.0.0:8080", "scheme"),
            (f"server://{KEY}@0.0.0.0:10101/0.0.0.0:8080?tls=9", "--tls"),
            ("server://" + "a" * 3000, "longer than"),
            ("stray", "options start with --"),
        ]:
            self.assertUsageError([url], fragment)

    def test_token(self):
        from tunnelpass.config.urls import make_token

        token = make_token("tunnel.example.com", 10101, KEY, b"\x01" * 32)
        options = parse(["--mode", "client", "--token", token, "--target", "127.0.0.1:80"])
        self.assertEqual((options["tunnel"], options["key"], options["pin"]),
                         ("tunnel.example.com:10101", KEY, b"\x01" * 32))
        self.assertUsageError(["--mode", "client", "--token", token, "--key", KEY, "--target", "127.0.0.1:80"],
                              "not both")
        self.assertUsageError(["--mode", "client", "--token", "tp1.!!!", "--target", "127.0.0.1:80"], "token")

    def test_required_and_conflicting(self):
        self.assertUsageError(["--mode", "server", "--target", "127.0.0.1:1"], "needs --tunnel")
        self.assertUsageError(["--mode", "client", "--tunnel", "h:1", "--target", "127.0.0.1:1"],
                              "needs the server's key (--token, or --key)")
        self.assertUsageError(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--key", ""], "empty")
        self.assertUsageError(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--tls", "2"],
                              "--cert and --private-key")
        self.assertUsageError(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--flow", "local"],
                              "not a server flow")
        self.assertUsageError(["--mode", "client", "--tunnel", "h:1", "--target", "h:2", "--key", KEY,
                               "--pin", "sha256:" + "00" * 32, "--ca", "ca.pem"], "give one kind")
        self.assertUsageError(["--mode", "server", "--tunnel", "h:99999", "--target", "h:2"], "--tunnel")
        self.assertUsageError(["--mode", "client", "--tunnel", "h:1", "--target", "h:2", "--key", KEY,
                               "--pin", "md5:00"], "--pin")

    def test_local_flow_needs_no_key(self):
        options = parse(["--mode", "client", "--flow", "local", "--tunnel", "127.0.0.1:1", "--target", "h:2"])
        self.assertEqual(options["flow"], "local")

    def test_nodepass_environment_aliases(self):
        options = parse(["--mode", "server", "--tunnel", "h:1", "--target", "h:2"],
                        {"NP_SEMAPHORE_LIMIT": "77", "NP_POOL_GET_TIMEOUT": "2s", "NP_REPORT_INTERVAL": "9s",
                         "NP_TCP_DIAL_TIMEOUT": "3s", "NP_SOMETHING_ELSE": "ignored"})
        self.assertEqual((options["slot"], options["pool-timeout"], options["report-interval"],
                          options["connect-timeout"]), (77, 2, 9, 3))
        self.assertUsageError(["--mode", "forward"], "NP_POOL_GET_TIMEOUT", environ={"NP_POOL_GET_TIMEOUT": "soon"})

    def test_weak_key_refused_from_every_source(self):
        base = ["--tunnel", "h:1", "--target", "h:2"]
        rule = "8+ different ones and an estimated 64+ bits"
        for mode in ("server", "client"):
            self.assertUsageError(["--mode", mode, *base, "--key", WEAK], "the tunnel key is weak", rule,
                                  "openssl rand -hex 32")
            self.assertUsageError(["--mode", mode, *base, "-k", "passwordpassword"], "7 different characters")
            self.assertUsageError(["--mode", mode, *base], rule, environ={"TUNNELPASS_KEY": WEAK})
            self.assertUsageError([f"{mode}://{WEAK}@h:1/h:2"], rule)
            self.assertUsageError([f"{mode}://{WEAK}@h:1/h:2?weakkey=0"], rule)
        token = "tp1." + _token_body('{"h":"h","p":1,"k":"%s"}' % WEAK)  # make_token refuses a weak key
        self.assertUsageError(["--mode", "client", "--token", token, "--target", "h:2"], rule)
        self.assertEqual(parse(["--mode", "client", "--token", token, "--target", "h:2", "--weak-key"])["key"], WEAK)

    def test_weak_key_flag_is_the_opt_out(self):
        base = ["--tunnel", "h:1", "--target", "h:2"]
        for mode in ("server", "client"):
            options = parse(["--mode", mode, *base, "--key", WEAK, "--weak-key"])
            self.assertEqual((options["key"], options["weak-key"]), (WEAK, True))
            options = parse(["--mode", mode, *base], {"TUNNELPASS_KEY": WEAK, "TUNNELPASS_WEAK_KEY": "1"})
            self.assertEqual((options["key"], options["weak-key"]), (WEAK, True))
            options = parse([f"{mode}://{WEAK}@h:1/h:2?weakkey=1"])
            self.assertEqual((options["key"], options["weak-key"]), (WEAK, True))
            self.assertUsageError(["--mode", mode, "--weak-key", f"{mode}://{WEAK}@h:1/h:2?weakkey=0"], "weak")
            self.assertUsageError(["--mode", mode, *base, "--key", WEAK], "weak", environ={"TUNNELPASS_WEAK_KEY": "0"})
        # Never for what was refused before --weak-key existed.
        self.assertUsageError(["--mode", "server", *base, "--key", "short", "--weak-key"], "shorter than 16")
        self.assertUsageError(["--mode", "server", *base, "--key", "", "--weak-key"], "empty")
        self.assertUsageError(["--mode", "server", *base], "TUNNELPASS_WEAK_KEY", "1 or 0",
                              environ={"TUNNELPASS_WEAK_KEY": "yes please"})
        self.assertFalse(parse(["--mode", "server", *base, "--key", KEY])["weak-key"])

    def test_weak_key_warned_at_startup(self):
        """makeService adds a child that warns when the tree starts (the
        e2e test sees the line in a real twistd log)."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import globalLogPublisher

        def warnings(args):
            root = tap.makeService(parse(args), MemoryReactorClock())
            return [child for child in root if isinstance(child, tap._StartupWarning)]

        base = ["--tunnel", "127.0.0.1:10101", "--target", "127.0.0.1:8080"]
        for args in (["--mode", "server", *base, "--key", KEY, "--weak-key"],
                     ["--mode", "server", *base, "--weak-key"], ["--mode", "client", *base, "--key", KEY]):
            self.assertEqual(warnings(args), [], args)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for mode in ("server", "client"):
            (warning,) = warnings(["--mode", mode, *base, "--key", WEAK, "--weak-key"])
            self.assertEqual([e for e in events if e.get("event") == "weak_key"], [])  # not before startup
            warning.startService()
            (event,) = [e for e in events if e.get("event") == "weak_key"]
            self.assertEqual(event["log_level"].name, "warn")
            self.assertIn("running with a weak tunnel key (it has only 1 different character)", formatEvent(event))
            self.assertIn("openssl rand -hex 32", formatEvent(event))
            events.clear()

    def test_help_states_the_key_rule(self):
        text = str(tap.Options())
        self.assertIn("--weak-key", text)
        self.assertIn("8+ different ones and an estimated 64+ bits", " ".join(text.split()))

    def test_what_the_tunnel_carries(self):
        base = ["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--key", KEY]
        options = parse(base)
        self.assertEqual((options["no-tcp"], options["no-udp"], options["udp-buffer"]), (False, False, 65535))
        options = parse(base + ["--no-tcp", "1", "--udp-buffer", "1400", "--udp-idle", "5s", "--max-sessions", "9"])
        self.assertEqual((options["no-tcp"], options["udp-buffer"], options["udp-idle"], options["max-sessions"]),
                         (True, 1400, 5.0, 9))
        self.assertTrue(parse([f"server://{KEY}@h:1/h:2?noudp=1"])["no-udp"])
        self.assertUsageError(base + ["--no-tcp", "1", "--no-udp", "1"], "nothing to tunnel")
        self.assertUsageError([f"server://{KEY}@h:1/h:2?notcp=1&noudp=1"], "nothing to tunnel")
        for bad in ("0", "65536", "-1", "1e3", "lots"):
            self.assertUsageError(base + ["--udp-buffer", bad], "--udp-buffer")
        self.assertUsageError(base + ["--no-udp", "yes"], "--no-udp")


class ClientLevelAndFlowOptionTests(unittest.TestCase):
    """--tls and --flow receive|send on the client: what it knows of the server."""

    base = ["--mode", "client", "--tunnel", "h:1", "--target", "127.0.0.1:2"]

    def settings(self, *args):
        from twisted.internet.testing import MemoryReactorClock

        return tap._client_service(parse(self.base + list(args)), MemoryReactorClock()).settings

    def test_level_unknown_by_default(self):
        from tunnelpass.tunnel.clientconnect import known_level

        self.assertIsNone(known_level(self.settings("--key", KEY)))
        self.assertEqual(known_level(self.settings("--key", KEY, "--tls", "0")), 0)
        self.assertEqual(known_level(self.settings("--key", KEY, "--pin", "sha256:" + "00" * 32)), 1)
        self.assertEqual(known_level(self.settings("--key", KEY, "--sni", "example.com")), 2)

    def test_token_carries_the_level(self):
        from tunnelpass.tunnel.clientconnect import known_level
        from tunnelpass.config.urls import make_token

        token = make_token("h", 1, KEY, tls=2)
        options = parse(["--mode", "client", "--token", token, "--target", "127.0.0.1:2"])
        self.assertEqual(options["tls"], 2)
        self.assertEqual(known_level(tap._client_service(options, None).settings), 2)

    def test_contradictions(self):
        for extra in (["--tls", "2", "--pin", "sha256:" + "00" * 32], ["--tls", "1", "--ca", "ca.pem"],
                      ["--tls", "0", "--sni", "example.com"]):
            with self.assertRaises(usage.UsageError) as cm:
                parse(self.base + ["--key", KEY] + extra)
            self.assertIn("contradicts", str(cm.exception))

    def test_server_default_level_is_plain(self):
        options = parse(["--mode", "server", "--tunnel", "h:1", "--target", "h:2", "--key", KEY])
        self.assertEqual(tap._server_service(options, None).settings.tls, 0)

    def test_client_may_insist_on_a_flow(self):
        for flow in ("receive", "send"):
            self.assertEqual(self.settings("--key", KEY, "--flow", flow).flow, flow)


class NodePassHabitTests(unittest.TestCase):
    """URLs and options as NodePass users write them (issue 10, item 4)."""

    assertUsageError = OptionTests.assertUsageError

    def test_keyless_client_is_refused_with_the_way_to_a_key(self):
        for args in (["client://127.0.0.1:10101/127.0.0.1:8080"],
                     ["--mode", "client", "--tunnel", "127.0.0.1:10101", "--target", "127.0.0.1:8080"]):
            with self.assertRaises(usage.UsageError) as cm:
                parse(args)
            text = str(cm.exception)
            self.assertIn("derive one from the port, which anyone can guess", text)
            self.assertIn("twistd -n --pidfile= tunnelpass", text)  # the server command
            self.assertIn("--mode client --token TOKEN --target 127.0.0.1:8080", text)  # what to paste it into
            self.assertNotIn("\n", text)
        self.assertUsageError(["client://127.0.0.1:10101/127.0.0.1:8080"],
                              "client://127.0.0.1:10101/127.0.0.1:8080 has no key",
                              "server://0.0.0.0:10101/HOST:PORT")
        # Single-end forwarding has no server and needs no key; a keyless server generates one.
        self.assertEqual(parse(["client://127.0.0.1:10101/127.0.0.1:8080?mode=1"])["flow"], "local")
        self.assertIsNone(parse(["server://:10101/127.0.0.1:8080"])["key"])

    def test_empty_host_is_all_interfaces(self):
        options = parse([f"server://{KEY}@:10101/:8080"])
        self.assertEqual((options["tunnel"], options["target"]), ("0.0.0.0:10101", "0.0.0.0:8080"))
        self.assertEqual(parse(["server://:10101/127.0.0.1:8080"])["tunnel"], "0.0.0.0:10101")
        self.assertUsageError(["--mode", "server", "--tunnel", ":10101", "--target", "h:1"], "--tunnel")

    def test_rate_and_log_keys(self):
        options = parse([f"server://{KEY}@h:1/h:2?rate=100&log=event"])
        self.assertEqual(options["rate"], 100 * 125_000)  # Mbit/s, as NodePass (value * 125000 bytes/s)
        self.assertEqual(options["log"], "warn")
        self.assertEqual(parse([f"server://{KEY}@h:1/h:2?log=none"])["log"], "fatal")
        self.assertEqual(parse(["-m", "forward", "--log", "NONE"])["log"], "fatal")
        self.assertUsageError([f"server://{KEY}@h:1/h:2?rate=fast"], "--rate")

    def test_planned_parts_say_so(self):
        self.assertUsageError([f"server://{KEY}@h:1/h:2?type=2"], "type=2 (WebSocket) is not available in this "
                              "version")
        self.assertUsageError([f"master://{KEY}@h:1/api"], "a master:// URL carries no key")
        self.assertEqual(parse([f"server://{KEY}@h:1/h:2?type=0"])["tunnel"], "h:1")  # the TCP pool: ours


class OptionErrorOutputTests(unittest.TestCase):
    """Under twistd (``parent`` set), an option error is one line on stderr
    and exit status 2, not twistd's usage text (issue 10, item 2)."""

    def run_as_subcommand(self, args, environ=None):
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from twisted.scripts.twistd import ServerOptions

        out, err = io.StringIO(), io.StringIO()
        old = os.environ.copy()
        os.environ.clear()
        os.environ.update(environ or {})
        try:  # twistd's own option parser, as twistd's app.run calls it
            with redirect_stdout(out), redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                ServerOptions().parseOptions(["-n", "--pidfile=", "tunnelpass", *args])
        finally:
            os.environ.clear()
            os.environ.update(old)
        return cm.exception.code, out.getvalue(), err.getvalue()

    def test_one_line_and_a_hint(self):
        code, out, err = self.run_as_subcommand(["--mode", "server", "--tunnel", "h:1", "--target", "h:2",
                                                 "--tls", "3"])
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertEqual(err, "tunnelpass: --tls: invalid value '3': choose one of 0, 1, 2 "
                              "(see: twistd -n --pidfile= tunnelpass --help)\n")

    def test_hostile_arguments_stay_one_short_line(self):
        for args in (["-m", "forward", "x" * 100_000], ["-m", "forward", "a\nb"], ["-m", "forward", "\udcff"],
                     ["--mode", "forward", "--idle", "\udcff" * 1000]):
            code, out, err = self.run_as_subcommand(args)
            self.assertEqual((code, out), (2, ""))
            self.assertEqual(err.count("\n"), 1, err)
            self.assertLess(len(err), 300)
        code, _, err = self.run_as_subcommand(["-m", "forward", "--\x1b[31mred\udcff"])  # getopt echoes it raw
        self.assertEqual(code, 2)
        self.assertNotIn("\x1b", err)
        self.assertNotIn("\udcff", err)
        self.assertIn("\\x1b[31mred\\udcff", err)
        code, _, err = self.run_as_subcommand(["-m", "forward"], {"TUNNELPASS_IDLE": "\udcff" * 5000})
        self.assertEqual((code, err.count("\n")), (2, 1))
        self.assertIn("environment variable TUNNELPASS_IDLE", err)
        self.assertLess(len(err), 300)

    def test_help_still_prints_everything(self):
        code, out, err = self.run_as_subcommand(["--help"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("--max-conns", out)
        self.assertIn("--state-dir", out)

    def test_direct_callers_still_get_usage_error(self):
        self.assertRaises(usage.UsageError, parse, ["--tls", "3"])


class StartupFileTests(unittest.TestCase):
    """makeService checks the files the options name before anything runs."""

    def make(self, args):
        from twisted.internet.testing import MemoryReactorClock

        with self.assertRaises(SystemExit) as cm:
            tap.makeService(parse(args), MemoryReactorClock())
        return cm.exception.code

    def test_one_line_per_file(self):
        missing = os.path.join(self.mktemp(), "ca.pem")
        base = ["--tunnel", "127.0.0.1:10101", "--target", "127.0.0.1:8080"]
        self.assertEqual(self.make(["--mode", "client", *base, "--key", KEY, "--ca", missing]),
                         f"tunnelpass: --ca {missing}: No such file or directory")
        self.assertEqual(self.make(["--mode", "server", *base, "--tls", "2", "--cert", missing,
                                    "--private-key", missing]),
                         f"tunnelpass: --cert {missing}: No such file or directory")
        self.assertEqual(self.make(["--mode", "server", *base, "--tls", "1", "--state-dir", __file__]),
                         f"tunnelpass: --state-dir {__file__}: not a directory")
        self.assertEqual(self.make(["--mode", "forward", "--config", missing]),
                         f"tunnelpass: --config {missing}: No such file or directory")
        rules = self.mktemp()
        with open(rules, "w") as f:
            f.write("8080 | 127.0.0.1\n")
        self.assertIn(f"tunnelpass: --config {rules}:1: expected", self.make(["--mode", "forward", "--config", rules]))


class OtherModesOptionsTests(unittest.TestCase):
    """An option only another mode, flow or TLS level reads is refused, not
    silently ignored (a missing --ca must stop the process where it is read)."""

    def refused(self, args, text):
        with self.assertRaises(usage.UsageError) as cm:
            parse(args)
        self.assertIn(text, str(cm.exception))

    def test_each_side_refuses_the_others_options(self):
        server = ["--mode", "server", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2"]
        client = ["--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2",
                  "--key", "Zx8-kq2Lm9PvT4rW"]
        for option in ("--ca", "--sni"):
            self.refused(server + [option, "x"], f"{option} is for --mode client")
        self.refused(server + ["--pin", "sha256:" + "ab" * 32], "--pin is for --mode client")
        self.refused(client + ["--cert", "x"], "--cert is for --mode server")
        self.refused(client + ["--state-dir", "x"], "--state-dir is for --mode server")
        self.refused(server + ["--state-dir", "x"], "--state-dir keeps a --tls 1 server's certificate")
        self.refused(server + ["--tls", "2", "--cert", "c", "--private-key", "k", "--state-dir", "x"],
                     "this server runs --tls 2")
        self.refused(client + ["--flow", "local", "--ca", "x"], "a --flow local client talks to no server")
        self.refused(["--mode", "forward", "--ca", "x"], "--ca is for --mode server/client, not --mode forward")
        self.refused(["--mode", "forward", "--target", "127.0.0.1:2"], "--target is for --mode server/client")

    def test_what_each_side_reads_is_accepted(self):
        parse(["--mode", "server", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2", "--tls", "1",
               "--state-dir", "x"])
        parse(["--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2",
               "--key", "Zx8-kq2Lm9PvT4rW", "--ca", "x"])


class URLPlacementTests(unittest.TestCase):
    """NodePass users put flags after the URL; getopt alone would stop at it."""

    def test_options_after_the_url(self):
        url = "client://Zx8-kq2Lm9PvT4rW@127.0.0.1:10101/127.0.0.1:8080"
        options = parse([url, "--log", "debug", "-m", "client", "--read", "30s"])
        self.assertEqual((options["log"], options["read"], options["tunnel"]), ("debug", 30.0, "127.0.0.1:10101"))

    def test_a_value_that_looks_like_a_url_stays_with_its_option(self):
        options = parse(["--config", "x://y", "server://:1/:2", "--read", "30s"])
        self.assertEqual((options["config"], options["mode"], options["read"]), ("x://y", "server", 30.0))

    def test_two_urls_are_still_refused(self):
        with self.assertRaises(usage.UsageError) as cm:
            parse(["server://:1/:2", "--log", "debug", "server://:3/:4"])
        self.assertIn("one URL at most", str(cm.exception))


class NodePassSNITests(unittest.TestCase):
    def test_url_sni(self):
        options = parse(["client://Zx8-kq2Lm9PvT4rW@127.0.0.1:10101/127.0.0.1:8080?tls=2&sni=tunnel.example"])
        self.assertEqual(options["sni"], "tunnel.example")

    def test_url_errors_say_url_once(self):
        with self.assertRaises(usage.UsageError) as cm:
            parse(["server://:1/:2?type=4"])
        self.assertTrue(str(cm.exception).startswith("URL query type='4':"), str(cm.exception))


class CarrierTypeOptionTests(unittest.TestCase):
    """``--type`` (URL ``type=``, ``TUNNELPASS_TYPE``): the server's carrier,
    which the client follows or, given ``--type``, insists on (issue 12)."""

    server = ["--mode", "server", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2", "--key", KEY]
    client = ["--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2", "--key", KEY]
    refusals = {"1": "--type 1 (QUIC) is not available in this version; use 0 (TCP pool) or 3 (HTTP/2 multiplexed)",
                "2": "--type 2 (WebSocket) is not available in this version; use 0 (TCP pool) or 3 (HTTP/2 "
                     "multiplexed)"}

    def refused(self, args, text, environ=None):
        with self.assertRaises(usage.UsageError) as cm:
            parse(args, environ)
        self.assertEqual(str(cm.exception), text)

    def server_settings(self, args, environ=None):
        return tap._server_service(parse(args, environ), None).settings

    def client_settings(self, args, environ=None):
        return tap._client_service(parse(args, environ), None).settings

    def test_defaults(self):
        self.assertIsNone(parse(self.server)["type"])
        self.assertEqual(self.server_settings(self.server).carrier_type, 0)  # the TCP pool, as before
        self.assertIsNone(self.client_settings(self.client).carrier_type)  # follow the server

    def test_flag_url_and_environment(self):
        for number in (0, 3):
            self.assertEqual(self.server_settings(self.server + ["--type", str(number)]).carrier_type, number)
            self.assertEqual(self.client_settings(self.client + [f"--type={number}"]).carrier_type, number)
            self.assertEqual(self.server_settings([f"server://{KEY}@127.0.0.1:1/127.0.0.1:2?type={number}"])
                             .carrier_type, number)
            self.assertEqual(self.client_settings([f"client://{KEY}@127.0.0.1:1/127.0.0.1:2?type={number}"])
                             .carrier_type, number)
            self.assertEqual(self.server_settings(self.server, {"TUNNELPASS_TYPE": str(number)}).carrier_type,
                             number)
        # A URL's value wins over the flag, the flag over the environment.
        self.assertEqual(self.server_settings(["--type", "0", f"server://{KEY}@127.0.0.1:1/127.0.0.1:2?type=3"])
                         .carrier_type, 3)
        self.assertEqual(self.server_settings(self.server + ["--type", "0"], {"TUNNELPASS_TYPE": "3"})
                         .carrier_type, 0)
        self.assertIn("--type", str(tap.Options()))

    def test_unbuilt_types_are_refused_on_both_sides(self):
        for number, line in self.refusals.items():
            self.refused(self.server + ["--type", number], line)
            self.refused(self.client + ["--type", number], line)
            self.refused(self.server, f"environment variable TUNNELPASS_TYPE: {line}", {"TUNNELPASS_TYPE": number})
            self.refused([f"client://{KEY}@127.0.0.1:1/127.0.0.1:2?type={number}"],
                         "URL query type=" + line[len("--type "):])

    def test_other_values_name_the_accepted_ones(self):
        for bad in ("4", "x", "-1", "", "99999999999999999999", "3,0"):
            with self.assertRaises(usage.UsageError) as cm:
                parse(self.server + ["--type", bad])
            self.assertEqual(str(cm.exception), f"--type {bad!r}: choose 0 (TCP pool) or 3 (HTTP/2 multiplexed)")

    def test_not_where_no_server_is(self):
        local = ["--mode", "client", "--flow", "local", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2"]
        line = "--type is the carrier to a server; a --flow local client talks to no server"
        self.refused(local + ["--type", "0"], line)
        self.refused(["client://127.0.0.1:1/127.0.0.1:2?mode=1&type=3"], line)
        self.refused(["--mode", "forward", "--type", "3"], "--type is for --mode server/client, not --mode forward")
        self.refused(["--mode", "forward"], "--type is for --mode server/client, not --mode forward",
                     {"TUNNELPASS_TYPE": "0"})
        parse(local)  # without --type it still runs

    def test_a_token_leaves_the_type_to_the_session(self):
        from tunnelpass.config.urls import make_token

        token = make_token("127.0.0.1", 1, KEY, tls=0)
        base = ["--mode", "client", "--token", token, "--target", "127.0.0.1:2"]
        self.assertIsNone(self.client_settings(base).carrier_type)
        self.assertEqual(self.client_settings(base + ["--type", "3"]).carrier_type, 3)
