"""Tests for tunnelpass.urls: NodePass-style URLs, tokens, keys."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.urls import (
    MIN_KEY_LENGTH,
    check_key,
    generate_key,
    make_token,
    parse_address,
    parse_token,
    parse_url,
)


class URLTests(unittest.TestCase):
    def test_server_url(self):
        self.assertEqual(
            parse_url("server://SECRET@0.0.0.0:10101/0.0.0.0:8080?tls=1&log=debug&max=512"),
            {"mode": "server", "key": "SECRET", "tunnel": "0.0.0.0:10101", "target": "0.0.0.0:8080",
             "tls": "1", "log": "debug", "max-pool": "512"},
        )

    def test_client_url_and_mapping(self):
        options = parse_url("client://k%40y@[::1]:10101/[::1]:8080?min=32&mode=1&notcp=true&proxy=1"
                            "&crt=/c.pem&key=/k.pem&read=30s&slot=9&noudp=0")
        self.assertEqual(options["key"], "k@y")
        self.assertEqual((options["tunnel"], options["target"]), ("[::1]:10101", "[::1]:8080"))
        self.assertEqual((options["flow"], options["no-tcp"], options["no-udp"]), ("local", "1", "0"))
        self.assertEqual((options["proxy-protocol"], options["cert"], options["private-key"]), ("v1", "/c.pem", "/k.pem"))
        self.assertEqual((options["min-pool"], options["read"], options["slot"]), ("32", "30s", "9"))

    def test_server_modes(self):
        self.assertEqual(parse_url("server://k@h:1/h:2?mode=2")["flow"], "send")
        self.assertEqual(parse_url("server://k@h:1/h:2?mode=0")["flow"], "auto")

    def test_key_is_optional_in_the_url(self):
        self.assertNotIn("key", parse_url("server://0.0.0.0:10101/0.0.0.0:8080"))

    def assertBad(self, url, fragment):
        with self.assertRaises(ValueError) as cm:
            parse_url(url)
        self.assertIn(fragment, str(cm.exception))
        self.assertLess(len(str(cm.exception)), 300)

    def test_refusals(self):
        self.assertBad("http://k@h:1/h:2", "use server:// or client://")
        self.assertBad("server://k@h:1/h:2?bogus=1", "unknown URL query key 'bogus'")
        self.assertBad("server://k@h:1/h:2?tls=1&tls=2", "given twice")
        self.assertBad("server://k@h/h:2", "tunnel address")
        self.assertBad("server://k@h:99999/h:2", "malformed URL")
        self.assertBad("server://k@h:1", "target address")
        self.assertBad("server://k@h:1/h", "HOST:PORT")
        self.assertBad("server://k@h:1/h:0", "1..65535")
        self.assertBad("server://k:x@h:1/h:2", "only the key")
        self.assertBad("server://k@h:1/h:2?mode=7", "mode='7': use one of 0, 1, 2")
        self.assertBad("server://k@h:1/h:2#frag", "fragment")
        self.assertBad("server://k@h:1/h:2?min=", "needs a value")
        self.assertBad("server://k@h:1/h:2?a", "malformed URL")
        self.assertBad("server://k @h:1/h:2", "spaces")
        self.assertBad("server://k@h:1/" + "a" * 3000 + ":2", "longer than")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_any_text_parses_or_raises_valueerror(self, text):
        try:
            parse_url("server://" + text)
        except ValueError:
            pass

    def test_addresses(self):
        self.assertEqual(parse_address("example.com:80"), "example.com:80")
        for bad in ["example.com", "::1:80", "[::1]80", ":80", "a/b:1"]:
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

    def test_token_round_trip(self):
        key = generate_key()
        token = make_token("tunnel.example.com", 10101, key, pin=bytes(range(32)))
        self.assertEqual(parse_token(token),
                         {"host": "tunnel.example.com", "port": 10101, "key": key, "pin": bytes(range(32))})
        self.assertIsNone(parse_token(make_token("::1", 1, key))["pin"])
        self.assertNotIn("=", token)

    def test_damaged_tokens(self):
        good = make_token("h", 1, generate_key())
        for bad in ["", "tp2." + good[4:], good[:-5], good + "!!", "tp1." + "A" * 2000,
                    make_token("h", 0, generate_key()), make_token("h", 1, "weak"),
                    "tp1.eyJoIjoiaCJ9", "tp1.W10"]:
            self.assertRaises(ValueError, parse_token, bad)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_any_token_parses_or_raises_valueerror(self, text):
        try:
            parse_token("tp1." + text)
        except ValueError:
            pass
