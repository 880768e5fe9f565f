"""The address a server's logged token carries (``--public-address``, the
host's addresses for a wildcard bind) and the command it logs."""

from __future__ import annotations

import os

from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial import unittest

from tunnelpass.relay.hostaddrs import (
    _ipv4_ifconf,
    _ipv4_per_interface,
    choose_public,
    host_addresses,
    parse_if_inet6,
    parse_public_address,
)
from tunnelpass.tunnel.server import ServerSettings, TunnelServer
from tunnelpass.tap import Options
from tunnelpass.config.urls import parse_token

KEY = "hostaddrs-test-key-0123456789abcdef"
#: Addresses as a host lists them: loopback, a private LAN, a global one,
#: link-local and ULA IPv6, a global IPv6 (text only: nothing is dialled).
HOST = ["127.0.0.1", "10.1.2.3", "93.184.216.34", "::1", "fe80::1%eth0", "fd00::2", "2001:4860::8888"]


class ChooseTests(unittest.TestCase):
    def test_ipv4_wildcard_takes_the_first_global_ipv4_and_lists_the_rest(self):
        choice = choose_public("0.0.0.0", 10101, HOST)
        self.assertEqual((choice.host, choice.port), ("93.184.216.34", 10101))
        self.assertEqual(choice.others, ("10.1.2.3",), "IPv6 cannot reach an IPv4 wildcard; loopback never")
        self.assertFalse(choice.loopback_only)

    def test_ipv6_wildcard_ranks_global_first_ipv4_before_ipv6_and_skips_link_local(self):
        choice = choose_public("::", 10101, HOST)
        self.assertEqual(choice.host, "93.184.216.34")
        self.assertEqual(choice.others, ("2001:4860::8888", "10.1.2.3", "fd00::2"))

    def test_private_addresses_when_there_is_no_global_one(self):
        choice = choose_public("", 10101, ["127.0.0.1", "192.168.7.9", "10.0.0.1", "192.168.7.9"])
        self.assertEqual(choice.host, "192.168.7.9")
        self.assertEqual(choice.others, ("10.0.0.1",), "listed once")
        self.assertIn("non-loopback", choice.why)

    def test_loopback_only_when_the_host_has_nothing_else(self):
        choice = choose_public("0.0.0.0", 10101, ["127.0.0.1", "::1", "fe80::1"])
        self.assertEqual(choice.host, "127.0.0.1")
        self.assertTrue(choice.loopback_only)
        self.assertEqual(choose_public("::", 1, ["::1"]).host, "::1")

    def test_public_address_wins_and_its_port_defaults_to_the_bound_one(self):
        self.assertEqual(choose_public("0.0.0.0", 10101, HOST, ("tunnel.example.net", None)).host,
                         "tunnel.example.net")
        self.assertEqual(choose_public("0.0.0.0", 10101, HOST, ("tunnel.example.net", None)).port, 10101)
        self.assertEqual(choose_public("127.0.0.2", 10101, HOST, ("198.51.100.4", 443)).port, 443)

    def test_a_specific_bind_is_what_the_token_carries(self):
        choice = choose_public("127.0.0.2", 10101, HOST)
        self.assertEqual((choice.host, choice.others, choice.loopback_only), ("127.0.0.2", (), False))


class ReadTests(unittest.TestCase):
    def test_if_inet6_lines(self):
        lines = ["fd000000000000000000000000000002 04 40 00 82     eth0",
                 "00000000000000000000000000000001 01 80 10 80       lo", "garbage"]
        self.assertEqual(parse_if_inet6(lines), ["::1", "fd00::2"], "interface order, bad lines skipped")

    def test_ipv4_without_netlink_matches_per_interface(self):
        """SIOCGIFCONF (no netlink socket: works under systemd's
        RestrictAddressFamilies) finds what if_nameindex + SIOCGIFADDR finds."""
        found = _ipv4_ifconf()
        self.assertIn("127.0.0.1", found)
        self.assertLessEqual(set(_ipv4_per_interface()), set(found))

    def test_this_hosts_addresses_include_loopback(self):
        addresses = host_addresses()
        self.assertIn("127.0.0.1", addresses, "IPv4 from SIOCGIFADDR on lo")
        if os.path.exists("/proc/net/if_inet6"):
            with open("/proc/net/if_inet6") as f:
                if "0" * 31 + "1 " in f.read():
                    self.assertIn("::1", addresses, "IPv6 from /proc/net/if_inet6")


class OptionTests(unittest.TestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_public_address_forms(self):
        self.assertEqual(parse_public_address("203.0.113.5"), ("203.0.113.5", None))
        self.assertEqual(parse_public_address("tunnel.example.net:443"), ("tunnel.example.net", 443))
        self.assertEqual(parse_public_address("[2001:db8::1]:10101"), ("2001:db8::1", 10101))
        self.assertEqual(parse_public_address("2001:db8::1"), ("2001:db8::1", None))
        for bad in ("", "host:0", "[::1", "bad host", "1.2.3.4:x"):
            self.assertRaises(ValueError, parse_public_address, bad)

    def test_flag_and_url_key(self):
        options = self.parse("--mode", "server", "--tunnel", "0.0.0.0:10101", "--target", "127.0.0.1:8080",
                             "--public-address", "198.51.100.4:443")
        self.assertEqual(options["public-address"], ("198.51.100.4", 443))
        options = self.parse("server://0.0.0.0:10101/127.0.0.1:8080?public=tunnel.example.net")
        self.assertEqual(options["public-address"], ("tunnel.example.net", None))

    def test_client_refuses_it(self):
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--mode", "client", "--tunnel", "127.0.0.1:1", "--target", "127.0.0.1:2", "--key", KEY,
                       "--public-address", "198.51.100.4")
        self.assertIn("--public-address is for --mode server", str(e.exception))


class LoggedCommandTests(unittest.TestCase):
    def command(self, bind: str, addresses, public=None, generated=True):
        reactor = MemoryReactorClock()
        server = TunnelServer(ServerSettings(bind, 10101, "127.0.0.1", 8080, KEY, key_generated=generated,
                                             public_address=public), reactor)
        server.tunnel_port = reactor.listenTCP(10101, Factory(), interface=bind)
        with capturedLogs() as events:
            server._log_client_command(addresses)
        return [(event["log_level"], formatEvent(event), event) for event in events]

    def token_of(self, lines):
        text = lines[0][1]
        return parse_token(text.split("--token ", 1)[1].split()[0])

    def test_wildcard_bind_token_carries_a_non_loopback_address_and_the_others_are_listed(self):
        lines = self.command("0.0.0.0", ["127.0.0.1", "10.1.2.3", "10.9.9.9"])
        level, text, event = lines[0]
        self.assertEqual(level, LogLevel.warn)
        self.assertIn("twistd -n --pidfile= tunnelpass --mode client --token tp1.", text)
        self.assertTrue(text.endswith("--target HOST:PORT"))
        token = self.token_of(lines)
        self.assertEqual((token["host"], token["port"], token["key"]), ("10.1.2.3", 10101, KEY))
        self.assertEqual(lines[1][2]["event"], "token_address")
        self.assertIn("10.9.9.9", lines[1][1])
        self.assertIn("--public-address", lines[1][1])

    def test_public_address_goes_in_the_token(self):
        lines = self.command("0.0.0.0", ["127.0.0.1", "10.1.2.3"], ("127.0.0.2", 20202))
        token = self.token_of(lines)
        self.assertEqual((token["host"], token["port"]), ("127.0.0.2", 20202))
        self.assertEqual(len(lines), 1, "nothing more to say")

    def test_a_chosen_key_stays_out_of_the_log(self):
        """A server given --key logs the client command with the address
        (and, at tls=1, the pin) but never the key, nor a token."""
        lines = self.command("0.0.0.0", ["127.0.0.1", "10.1.2.3"], generated=False)
        level, text, event = lines[0]
        self.assertEqual((level, event["event"]), (LogLevel.info, "client_command"))
        self.assertIn("--mode client --tunnel 10.1.2.3:10101 --key \"$KEY\" --target HOST:PORT", text)
        self.assertTrue(all(KEY not in line and "tp1." not in line for _, line, _ in lines), lines)
        self.assertIn("the client command carries 10.1.2.3", lines[1][1])

    def test_loopback_only_host_says_so_at_warn(self):
        lines = self.command("0.0.0.0", ["127.0.0.1"])
        self.assertEqual(self.token_of(lines)["host"], "127.0.0.1")
        self.assertEqual(lines[1][0], LogLevel.warn)
        self.assertIn("only loopback addresses", lines[1][1])
