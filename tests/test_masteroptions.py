"""--mode master's options and its master:// URL (config.masterurl, config.options)."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from tunnelpass.config.masterurl import parse_master_url, parse_origins, parse_prefix
from tunnelpass.config.options import Options


def parse(args):
    options = Options()
    options.environ = {}
    options.parseOptions(args)
    return options


class MasterURLTests(unittest.TestCase):
    def test_nodepass_forms(self):
        self.assertEqual(parse_master_url("master://0.0.0.0:9090?log=info"),
                         {"mode": "master", "api": "0.0.0.0:9090", "log": "info"})
        self.assertEqual(parse_master_url("master://0.0.0.0:9090/admin?log=info&tls=1"),
                         {"mode": "master", "api": "0.0.0.0:9090", "api-prefix": "/admin", "log": "info", "tls": "1"})
        self.assertEqual(parse_master_url("master://:9090")["api"], "0.0.0.0:9090")
        self.assertEqual(parse_master_url("master://[::1]:9090/api/")["api-prefix"], "/api")
        self.assertEqual(parse_master_url("master://h:1?crt=/c.pem&key=/k.pem&tls=2")["private-key"], "/k.pem")

    def test_hostile_urls(self):
        for text, fragment in [
            ("master://KEY@h:9090", "carries no key"),
            ("master://h", "needs the API address"),
            ("master://h:99999", "malformed URL"),
            ("master://h:1/../etc", "segment '..'"),
            ("master://h:1/a/b/c/d/e", "1 to 4 path segments"),
            ("master://h:1/" + "a" * 40, "32 at most"),
            ("master://h:1/a%2fb", "segment"),
            ("master://h:1?cors=x", "unknown master URL query key"),
            ("master://h:1?log=info&log=debug", "given twice"),
            ("master://h:1?log=", "needs a value"),
            ("master://h:1#x", "fragment"),
            ("master://h:1/a b", "spaces or control"),
            ("master://h:1?" + "x" * 3000, "longer than"),
            ("server://h:1/h:2", "expected master://"),
        ]:
            with self.assertRaises(ValueError, msg=text) as cm:
                parse_master_url(text)
            self.assertIn(fragment, str(cm.exception), text)

    def test_prefix_and_origins(self):
        self.assertEqual(parse_prefix("/admin/np/"), "/admin/np")
        for bad in ("api", "/", "//", "/a/./b" if False else "/.."):
            self.assertRaises(ValueError, parse_prefix, bad)
        self.assertEqual(parse_origins("https://Dash.example.com, http://127.0.0.1:3000,https://dash.example.com"),
                         ("https://dash.example.com", "http://127.0.0.1:3000"))
        for bad in ("*", "https://a.example.com/path", "ftp://a", "https://a.example.com,*", "", ",".join(
                f"https://h{i}.example" for i in range(17)), "javascript:alert(1)"):
            self.assertRaises(ValueError, parse_origins, bad)


class MasterOptionTests(unittest.TestCase):
    def test_defaults(self):
        options = parse(["--mode", "master"])
        self.assertEqual((options["api"], options["api-prefix"], options["tls"], options["report-interval"]),
                         ("127.0.0.1:9090", "/api", None, 5.0))

    def test_url_values_win_and_flags_combine(self):
        options = parse(["--workers", "3", "--cors", "https://d.example", "master://127.0.0.2:9191/np?tls=1"])
        self.assertEqual((options["api"], options["api-prefix"], options["tls"], options["workers"], options["cors"]),
                         ("127.0.0.2:9191", "/np", 1, 3, ("https://d.example",)))

    def test_refusals(self):
        for args, fragment in [
            (["--mode", "master", "--target", "127.0.0.1:1"], "--target is for --mode server/client"),
            (["--mode", "master", "--key", "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"], "--key is for"),
            (["--mode", "master", "--tls", "2"], "needs --cert and --private-key"),
            (["--mode", "master", "--cert", "/x"], "are for --tls 2"),
            (["--mode", "master", "--workers", "0"], "--workers"),
            (["--mode", "master", "--workers", "65"], "--workers"),
            (["--mode", "master", "--report-interval", "0"], "more than 0"),
            (["--mode", "forward", "--api", "127.0.0.1:1"], "--api is for --mode master"),
            (["--mode", "server", "--cors", "https://a.example", "--tunnel", "127.0.0.1:1", "--target",
              "127.0.0.1:2"], "--cors is for --mode master"),
        ]:
            with self.assertRaises(usage.UsageError, msg=args) as cm:
                parse(args)
            self.assertIn(fragment, str(cm.exception), args)
