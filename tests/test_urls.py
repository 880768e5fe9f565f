"""Tests for tunnelpass.config.urls: NodePass-style URLs, tokens, keys."""

import base64
import os
import secrets

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.config.urls import (
    MIN_BITS,
    MIN_KEY_LENGTH,
    check_key,
    estimated_bits,
    generate_key,
    key_weakness,
    make_token,
    parse_address,
    parse_targets,
    parse_token,
    parse_url,
)

K = "correct-horse-battery"  # a key long enough to pass check_key


def raw_token(body: bytes) -> str:
    return "tp1." + base64.urlsafe_b64encode(body).rstrip(b"=").decode()


class URLTests(unittest.TestCase):
    def test_server_url(self):
        self.assertEqual(
            parse_url(f"server://{K}@0.0.0.0:10101/0.0.0.0:8080?tls=1&log=debug&max=512"),
            {"mode": "server", "key": K, "tunnel": "0.0.0.0:10101", "target": "0.0.0.0:8080",
             "tls": "1", "log": "debug", "max-pool": "512"},
        )

    def test_client_url_and_mapping(self):
        options = parse_url(f"client://{K}%40y@[::1]:10101/[::1]:8080?min=32&mode=1&notcp=true&proxy=1"
                            "&crt=/c.pem&key=/k.pem&read=30s&slot=9&noudp=0")
        self.assertEqual(options["key"], K + "@y")
        self.assertEqual((options["tunnel"], options["target"]), ("[::1]:10101", "[::1]:8080"))
        self.assertEqual((options["flow"], options["no-tcp"], options["no-udp"]), ("local", "1", "0"))
        self.assertEqual((options["proxy-protocol"], options["cert"], options["private-key"]), ("v1", "/c.pem", "/k.pem"))
        self.assertEqual((options["min-pool"], options["read"], options["slot"]), ("32", "30s", "9"))

    def test_server_modes(self):
        self.assertEqual(parse_url(f"server://{K}@h:1/h:2?mode=2")["flow"], "send")
        self.assertEqual(parse_url(f"server://{K}@h:1/h:2?mode=0")["flow"], "auto")

    def test_key_is_optional_in_the_url(self):
        self.assertNotIn("key", parse_url("server://0.0.0.0:10101/0.0.0.0:8080"))

    def assertBad(self, url, fragment):
        with self.assertRaises(ValueError) as cm:
            parse_url(url)
        self.assertIn(fragment, str(cm.exception))
        self.assertLess(len(str(cm.exception)), 300)

    def test_refusals(self):
        self.assertBad(f"http://{K}@h:1/h:2", "use server:// or client://")
        self.assertBad(f"server://{K}@h:1/h:2?bogus=1", "unknown URL query key 'bogus'")
        self.assertBad(f"server://{K}@h:1/h:2?tls=1&tls=2", "given twice")
        self.assertBad(f"server://{K}@h/h:2", "tunnel address")
        self.assertBad(f"server://{K}@h:99999/h:2", "malformed URL")
        self.assertBad(f"server://{K}@h:1", "target address")
        self.assertBad(f"server://{K}@h:1/h", "HOST:PORT")
        self.assertBad(f"server://{K}@h:1/h:0", "1..65535")
        self.assertBad(f"server://{K}:x@h:1/h:2", "only the key")
        self.assertBad(f"server://{K}@h:1/h:2?mode=7", "mode='7': use one of 0, 1, 2")
        self.assertBad(f"server://{K}@h:1/h:2#frag", "fragment")
        self.assertBad(f"server://{K}@h:1/h:2?min=", "needs a value")
        self.assertBad(f"server://{K}@h:1/h:2?a", "malformed URL")
        self.assertBad(f"server://{K} @h:1/h:2", "spaces")
        self.assertBad(f"server://{K}@h:1/" + "a" * 3000 + ":2", "longer than")

    def test_refusals_after_decoding(self):
        self.assertBad(f"server://{K}@h:1/evil%0ahost:2", "control characters")
        self.assertBad(f"server://{K}%00@h:1/h:2", "control characters")
        self.assertBad(f"server://{K}@h:1/h:2?tls=%00", "control characters")
        self.assertBad(f"server://{K}@h:1/[a]:2", "not an IPv6 address")
        self.assertBad(f"server://{K}@h:1/[]]:2", "not an IPv6 address")
        self.assertBad(f"server://{K}@h:1/bad_ho%20st:2", "spaces")
        self.assertBad(f"server://{K}@h:1/\u2603.example:2", "neither an IP address nor a host name")
        self.assertBad("server://@h:1/h:2", "key is empty")
        self.assertBad("server://short@h:1/h:2", "shorter than")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_any_text_parses_or_raises_valueerror(self, text):
        try:
            parse_url("server://" + text)
        except ValueError:
            pass

    def test_empty_host_means_all_interfaces(self):
        # NodePass's server://:10101/... (Go's ":port"): listened on, every interface.
        self.assertEqual(parse_url("server://:10101/:8080"),
                         {"mode": "server", "tunnel": "0.0.0.0:10101", "target": "0.0.0.0:8080"})
        self.assertEqual(parse_url(f"client://{K}@:10101/127.0.0.1:8080")["tunnel"], "0.0.0.0:10101")
        self.assertEqual(parse_url(f"server://{K}@[::]:10101/[::]:8080")["tunnel"], "[::]:10101")
        self.assertBad("server://:/h:2", "tunnel address")
        self.assertBad("server:///h:2", "tunnel address")
        self.assertBad("server://[]:10101/h:2", "")
        self.assertBad("server://:10101/:", "expected 1..65535")

    def test_target_group_in_the_path(self):
        self.assertEqual(parse_url(f"server://{K}@:1/a.example:1,:2,[::1]:3")["target"],
                         "a.example:1,0.0.0.0:2,[::1]:3")
        self.assertBad(f"server://{K}@:1/h:1,h:1", "listed twice")
        self.assertBad(f"server://{K}@:1/" + ",".join(f"h:{p}" for p in range(1, 70)), "at most 64")
        self.assertBad(f"server://{K}@:1/h:1,,h:2", "HOST:PORT")
        self.assertRaises(ValueError, parse_targets, ":80")  # a flag still needs a host

    def test_nodepass_keys(self):
        self.assertEqual(parse_url(f"server://{K}@h:1/h:2?rate=100")["rate"], "100")
        self.assertEqual(parse_url(f"server://{K}@h:1/h:2?log=none")["log"], "none")  # tap: fatal
        self.assertNotIn("type", parse_url(f"server://{K}@h:1/h:2"))  # absent: the option's default
        for scheme in ("server", "client"):
            self.assertEqual(parse_url(f"{scheme}://{K}@h:1/h:2?type=0")["type"], "0")
            self.assertEqual(parse_url(f"{scheme}://{K}@h:1/h:2?type=3")["type"], "3")
        for number, name in (("1", "QUIC"), ("2", "WebSocket")):
            self.assertBad(f"server://{K}@h:1/h:2?type={number}",
                           f"URL query type={number} ({name}) is not available in this version; "
                           "use 0 (TCP pool) or 3 (HTTP/2 multiplexed)")
        for bad in ("4", "x", "-1", "", "30"):
            self.assertBad(f"client://{K}@h:1/h:2?type={bad}",
                           f"URL query type='{bad}': choose 0 (TCP pool) or 3 (HTTP/2 multiplexed)")
        self.assertBad(f"server://{K}@h:1/h:2?type=3&type=0", "given twice")
        self.assertBad(f"server://{K}@h:1/h:2?type=" + "9" * 5000, "longer than")
        self.assertBad(f"server://{K}@h:1/h:2?type=" + "9" * 100, "'99999")
        # A tunnel URL is server:// or client://; master:// has its own parser (config.masterurl).
        self.assertBad(f"master://{K}@:9090/api?log=info", "URL scheme 'master': use server:// or client://")

    def test_non_utf8_argument(self):
        # argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape).
        for url in ("server://:1/h\udcff:2", "server://k\udcffkkkkkkkkkkkkkkkkk@:1/h:2",
                    "server://:1/h:2?log=\udcff", "server://\udcff:1/h:2"):
            with self.assertRaises(ValueError) as cm:
                parse_url(url)
            self.assertLess(len(str(cm.exception)), 300)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=100), st.text(max_size=100))
    def test_any_path_and_query_parse_or_raise_valueerror(self, path, query):
        for url in (f"server://:10101/{path}", f"client://{K}@:1/h:2?{query}", f"server://:1/{path}?type={query}"):
            try:
                parse_url(url)
            except ValueError:
                pass

    def test_addresses(self):
        self.assertEqual(parse_address("example.com:80"), "example.com:80")
        self.assertEqual(parse_address("[::1]:80"), "[::1]:80")
        for bad in ["example.com", "::1:80", "[::1]80", ":80", "a/b:1", "[x]:1", "h\r\nX:1"]:
            self.assertRaises(ValueError, parse_address, bad)


class KeyAndTokenTests(unittest.TestCase):
    def test_generated_keys_are_strong_and_distinct(self):
        keys = {generate_key() for _ in range(100)}
        self.assertEqual(len(keys), 100)
        for key in keys:
            self.assertEqual(check_key(key), key)
            self.assertGreaterEqual(len(key), 43)

    def test_weak_keys_refused(self):
        for key in ["", "short", "x" * (MIN_KEY_LENGTH - 1), "x" * 257]:
            self.assertRaises(ValueError, check_key, key)

    def test_parsers_leave_strength_to_the_caller(self):
        # One strength check, where --weak-key is known (tap); URL and token
        # parsers refuse only what no opt-out allows (empty, short, long).
        self.assertEqual(parse_url("server://aaaaaaaaaaaaaaaa@h:1/h:2?weakkey=1")["key"], "a" * 16)
        self.assertEqual(parse_url("server://aaaaaaaaaaaaaaaa@h:1/h:2?weakkey=true")["weak-key"], "1")
        self.assertEqual(parse_token(raw_token(b'{"h":"h","p":1,"k":"%s"}' % (b"a" * 16)))["key"], "a" * 16)
        self.assertRaises(ValueError, parse_url, "server://aaaaaaa@h:1/h:2")
        self.assertRaises(ValueError, parse_url, "server://" + K + "@h:1/h:2?weakkey=maybe")

    def test_token_round_trip(self):
        key = generate_key()
        token = make_token("tunnel.example.com", 10101, key, pin=bytes(range(32)), tls=1)
        self.assertEqual(parse_token(token), {"host": "tunnel.example.com", "port": 10101, "key": key,
                                              "pin": bytes(range(32)), "tls": 1})
        self.assertIsNone(parse_token(make_token("::1", 1, key))["pin"])
        self.assertIsNone(parse_token(make_token("::1", 1, key))["tls"], "tokens without a level still parse")
        self.assertEqual(parse_token(make_token("::1", 1, key, tls=2))["tls"], 2)
        self.assertNotIn("=", token)

    def test_token_tls_level_validated(self):
        for body in [b'{"h":"h","p":1,"k":"%s","t":3}', b'{"h":"h","p":1,"k":"%s","t":"1"}',
                     b'{"h":"h","p":1,"k":"%s","t":true}',
                     b'{"h":"h","p":1,"k":"%s","t":2,"f":"' + b"00" * 32 + b'"}']:
            self.assertRaises(ValueError, parse_token, raw_token(body % K.encode()))
        self.assertRaises(ValueError, make_token, "h", 1, K, bytes(32), tls=2)
        self.assertRaises(ValueError, make_token, "h", 1, K, tls=5)

    def test_damaged_tokens(self):
        good = make_token("h", 1, generate_key())
        for bad in ["", "tp2." + good[4:], good[:-5], good + "!!", "tp1." + "A" * 2000,
                    raw_token(b'{"h":"h","p":0,"k":"%s"}' % K.encode()),
                    raw_token(b'{"h":"h","p":true,"k":"%s"}' % K.encode()),
                    raw_token(b'{"h":"h\\r\\nX","p":1,"k":"%s"}' % K.encode()),
                    raw_token(b'{"h":"h","p":1,"k":"weak"}'),
                    raw_token(b'{"h":"h","p":1,"p":2,"k":"%s"}' % K.encode()),
                    raw_token(b'{"h":"h","p":1,"k":"\\ud800%s"}' % K.encode()),
                    raw_token(('{"h":"h","p":1,"k":"%s"}' % K).encode("utf-16")),
                    "tp1.eyJoIjoiaCJ9", "tp1.W10"]:
            self.assertRaises(ValueError, parse_token, bad)

    def test_token_has_no_carrier_type(self):
        """The client learns --type from the authenticated session, never from a token."""
        self.assertRaises(TypeError, make_token, "h", 1, K, carrier_type=3)
        self.assertNotIn("type", parse_token(make_token("h", 1, K, tls=0)))
        for field in (b'"y":3', b'"type":3'):
            with self.assertRaises(ValueError) as cm:
                parse_token(raw_token(b'{"h":"h","p":1,"k":"%s",%s}' % (K.encode(), field)))
            self.assertIn("unexpected contents", str(cm.exception))

    def test_make_token_validates(self):
        for args in [("h", 0, K), ("h", True, K), ("h", 1, "weak"), ("bad host", 1, K)]:
            self.assertRaises(ValueError, make_token, *args)
        self.assertRaises(ValueError, make_token, "h", 1, K, pin="00" * 32)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_any_token_parses_or_raises_valueerror(self, text):
        try:
            parse_token("tp1." + text)
        except ValueError:
            pass


#: Keys the rule refuses, each for an obvious pattern.
WEAK = [
    "a" * 16, "a" * 64,                   # one character
    "abababababababab", "passwordpassword",  # few distinct characters
    "0123456789012345",                   # 16 digits: 53 bits at best, and a run
    "1234567890123456789012",             # runs and a repeat
    "0123456789abcdef", "abcdefghijklmnopqrstuvwxyz",  # runs
    "aaaaaaaabcdefghi",                   # a run of one, a run of steps
    "Password1Password1Password1",        # a repeat
    "zyxwvutsrqponmlkjihgfedcba",         # a descending run
]
#: Keys the rule accepts: the project's own fixed keys and typed passphrases.
STRONG = [
    "e2e-tunnel-key-0123456789abcdef", "correct-horse-battery", "server-test-key-0123456789",
    "bench-key-0123456789abcdefghij", "another-key-0123456789abcdef", "Tr0ub4dor&3xyzzy",
]


class KeyStrengthTests(unittest.TestCase):
    def test_weak_keys_refused_naming_the_rule_and_a_remedy(self):
        for key in WEAK:
            with self.assertRaises(ValueError, msg=key) as caught:
                check_key(key)
            message = str(caught.exception)
            self.assertIn("the tunnel key is weak", message)
            self.assertIn("8+ different ones and an estimated 64+ bits", message)
            self.assertIn("openssl rand -hex 32", message)
            self.assertIn("--weak-key", message)
            self.assertNotIn("\n", message)
            self.assertIsNotNone(key_weakness(key), key)

    def test_reasons(self):
        self.assertEqual(key_weakness("a" * 16), "it has only 1 different character")
        self.assertEqual(key_weakness("passwordpassword"), "it has only 7 different characters")
        self.assertIn("bits by tunnelpass's estimate", key_weakness("0123456789012345"))

    def test_weak_ok_is_the_opt_out(self):
        for key in WEAK:
            self.assertEqual(check_key(key, weak_ok=True), key)
        for key in ["", "short", "x" * (MIN_KEY_LENGTH - 1), "x" * 257]:  # never allowed
            self.assertRaises(ValueError, check_key, key, weak_ok=True)

    def test_strong_keys_accepted(self):
        for key in STRONG:
            self.assertEqual(check_key(key), key)

    def test_openssl_style_random_keys_accepted(self):
        # What 'openssl rand -hex 16', 'openssl rand -hex 32' and
        # 'openssl rand -base64 24' print, drawn fresh each run.
        for _ in range(200):
            for key in (secrets.token_hex(16), secrets.token_hex(32), base64.b64encode(os.urandom(24)).decode()):
                self.assertEqual(check_key(key), key)

    def test_estimate(self):
        # 16 random-looking digits: log2(10) each, no runs or repeats.
        self.assertAlmostEqual(estimated_bits("3816059274618305"), 16 * 3.3219, places=2)
        # A character class adds its whole size to the pool (10 + 26), once.
        self.assertAlmostEqual(estimated_bits("38160592746183Q5"), 16 * 5.1699, places=2)
        self.assertLess(estimated_bits("3816059274618305"), MIN_BITS)
        # Repeats of 3+ characters and runs count nothing; the first
        # characters of a run count.
        self.assertAlmostEqual(estimated_bits("passwordpassword"), estimated_bits("password"))
        self.assertAlmostEqual(estimated_bits("ab" * 40), estimated_bits("ab"))
        self.assertAlmostEqual(estimated_bits("k" * 99), estimated_bits("k"))
        self.assertAlmostEqual(estimated_bits("qzabcdefgh"), estimated_bits("qzab"))
        self.assertEqual(estimated_bits(""), 0)

    def test_generate_key_draws_again_when_the_draw_looks_weak(self):
        draws = iter(["A" * 43, "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopq", "kX3-_9bQzR7mT2vW8yL4nP6sJ1hF5dG0cV-aE_uOiYt"])
        self.assertEqual(generate_key(lambda n: next(draws)), "kX3-_9bQzR7mT2vW8yL4nP6sJ1hF5dG0cV-aE_uOiYt")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
    def test_generated_keys_always_pass(self, first, second):
        # Any 32 random bytes (even all zeros) as the first draw: what
        # generate_key returns passes; a second, strong draw ends the loop.
        draws = iter([first, second, os.urandom(32), os.urandom(32)])
        key = generate_key(lambda n: base64.urlsafe_b64encode(next(draws)).rstrip(b"=").decode())
        self.assertEqual(check_key(key), key)

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=300))
    def test_check_never_crashes(self, text):
        weakness = key_weakness(text)
        self.assertTrue(weakness is None or isinstance(weakness, str))
        self.assertGreaterEqual(estimated_bits(text), 0)
        try:
            self.assertEqual(check_key(text), text)
        except ValueError:
            pass
        if weakness is None and MIN_KEY_LENGTH <= len(text) <= 256:
            self.assertEqual(check_key(text), text)
