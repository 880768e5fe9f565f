"""Tests for tunnelpass.config.rules: the forwarder's rules-file parser."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.config.rules import (
    MAX_FILE_BYTES,
    MAX_LINE_CHARS,
    MAX_RULES,
    Endpoint,
    Limits,
    RuleOptions,
    RulesError,
    _PortUsage,
    parse_rules,
)

EXAMPLE = """\
# listen | remote_host | remote_port [| options]
18080 | 127.0.0.1 | 8080
127.0.0.1:15353/udp | 10.0.0.53 | 53

[::1]:18443/tcp+udp | backend.internal | 443 | max-conns=200, idle=2m   # trailing comment
"""


class ValidRulesTests(unittest.TestCase):
    def test_example_file(self):
        rules = parse_rules(EXAMPLE, "x.conf")
        self.assertEqual(len(rules), 3)
        first, second, third = rules
        self.assertEqual(first.listen, (Endpoint("0.0.0.0", 18080, "tcp"),))
        self.assertEqual((first.remote_host, first.remote_port, first.line), ("127.0.0.1", 8080, 2))
        self.assertEqual(second.listen, (Endpoint("127.0.0.1", 15353, "udp"),))
        self.assertEqual(second.remote, "10.0.0.53:53")
        self.assertEqual(
            third.listen, (Endpoint("::1", 18443, "tcp"), Endpoint("::1", 18443, "udp"))
        )
        self.assertEqual(third.remote, "backend.internal:443")
        self.assertEqual(third.options, RuleOptions(max_conns=200, idle=120.0))
        self.assertEqual(third.line, 5)

    def test_options_override_defaults(self):
        (rule,) = parse_rules("1 | h | 2 | connect-timeout=500ms, udp-idle=5s, max-sessions=7")
        limits = rule.options.resolve(Limits(max_conns=10))
        self.assertEqual(limits, Limits(max_conns=10, connect_timeout=0.5, idle=600, udp_idle=5, max_sessions=7))

    def test_accepted_spellings(self):
        rules = parse_rules(
            "localhost:1 | [2001:db8::1] | 2\n"
            "[::]:3/UDP+TCP | host-name.example. | 4\n"
            "\t5\t|\t::ffff:1.2.3.4\t|\t6\t|\n"
            "  # only a comment\n"
            "\r\n"
        )
        self.assertEqual(rules[0].listen[0].host, "127.0.0.1")
        self.assertEqual(rules[0].remote_host, "2001:db8::1")
        self.assertEqual(rules[0].remote, "[2001:db8::1]:2")
        self.assertEqual([e.protocol for e in rules[1].listen], ["tcp", "udp"])
        self.assertEqual(rules[1].remote_host, "host-name.example")
        self.assertEqual(rules[2].remote_host, "::ffff:102:304")
        self.assertEqual(rules[2].options, RuleOptions())

    def test_empty_file(self):
        self.assertEqual(parse_rules(""), [])
        self.assertEqual(parse_rules(b"# nothing\n\n"), [])

    def test_windows_line_endings(self):
        self.assertEqual(len(parse_rules(b"1 | a | 2\r\n3 | b | 4\r\n")), 2)

    def test_ipv4_wildcard_and_ipv6_address_can_share_a_port(self):
        self.assertEqual(len(parse_rules("5 | a | 1\n[::1]:5 | b | 2")), 2)

    def test_same_port_different_protocols_is_fine(self):
        self.assertEqual(len(parse_rules("127.0.0.1:53/udp | a | 53\n127.0.0.1:53/tcp | a | 53")), 2)


class InvalidRulesTests(unittest.TestCase):
    def assertRuleError(self, text, line, *fragments):
        with self.assertRaises(RulesError) as cm:
            parse_rules(text, "rules.conf")
        error = cm.exception
        self.assertEqual(error.line, line)
        self.assertTrue(str(error).startswith(f"rules.conf:{line}: "), str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        self.assertLess(len(str(error)), 400)
        return error

    def test_wrong_field_count(self):
        self.assertRuleError("1 | a\n", 1, "expected 'listen | remote_host | remote_port")
        self.assertRuleError("# c\n1 | a | 2 | x=1 | extra\n", 2, "5 field(s)")

    def test_bad_ports(self):
        self.assertRuleError("0 | a | 1", 1, "listen port", "1..65535")
        self.assertRuleError("1 | a | 70000", 1, "remote port", "1..65535")
        self.assertRuleError("x:1 | a | 1", 1, "listen host", "not an IP address")
        self.assertRuleError("1 | a | http", 1, "remote port")
        self.assertRuleError("127.0.0.1: | a | 1", 1, "listen port")

    def test_bad_listen_forms(self):
        self.assertRuleError("1/sctp | a | 1", 1, "use /tcp, /udp or /tcp+udp")
        self.assertRuleError("::1:80 | a | 1", 1, "brackets")
        self.assertRuleError("[::1:80 | a | 1", 1, "[IPV6]:PORT")
        self.assertRuleError("[127.0.0.1]:80 | a | 1", 1, "not an IPv6 address")
        self.assertRuleError("/tcp | a | 1", 1, "listen address is empty")

    def test_bad_remote_hosts(self):
        for host in ["bad host", "-lead.example", "a..b", "x" * 64 + ".com", "1.2.3.999", "[nope]", "ex%ample"]:
            self.assertRuleError(f"1 | {host} | 1", 1, "remote host")

    def test_bad_options(self):
        self.assertRuleError("1 | a | 1 | bogus=1", 1, "unknown option 'bogus'", "max-conns")
        self.assertRuleError("1 | a | 1 | idle", 1, "expected key=value")
        self.assertRuleError("1 | a | 1 | idle=forever", 1, "option idle", "invalid duration")
        self.assertRuleError("1 | a | 1 | max-conns=0", 1, "option max-conns")
        self.assertRuleError("1 | a | 1 | idle=1s, idle=2s", 1, "given twice")
        self.assertRuleError("1 | a | 1 | udp-idle=0", 1, "option udp-idle", "greater than zero")
        self.assertRuleError("1 | a | 1 | connect-timeout=0s", 1, "option connect-timeout")

    def test_duplicate_listen_addresses(self):
        self.assertRuleError("1 | a | 1\n# x\n1 | b | 2", 3, "0.0.0.0:1/tcp overlaps 0.0.0.0:1/tcp on line 1")
        self.assertRuleError("127.0.0.1:5 | a | 1\n5 | b | 2", 2, "overlaps 127.0.0.1:5/tcp on line 1")
        self.assertRuleError("[::]:5/udp | a | 1\n127.0.0.1:5/tcp+udp | b | 2", 2, "127.0.0.1:5/udp overlaps [::]:5/udp")
        self.assertRuleError("[::1]:5 | a | 1\n[::]:5 | b | 2", 2, "[::]:5/tcp overlaps [::1]:5/tcp")

    def test_binary_junk(self):
        error = self.assertRuleError(b"1 | a | 2\n\xff\xfe\x00garbage\n", 2, "not UTF-8")
        self.assertEqual(error.source, "rules.conf")
        self.assertRuleError("1 | a\x00 | 2\n", 1, "control characters")
        self.assertRuleError("\x1b[31m1 | a | 2\n", 1, "control characters")

    def test_huge_line(self):
        self.assertRuleError("1 | " + "a" * (MAX_LINE_CHARS + 10) + " | 2", 1, "longer than")

    def test_huge_file(self):
        with self.assertRaises(RulesError) as cm:
            parse_rules(b"#" * (MAX_FILE_BYTES + 1), "big.conf")
        self.assertIn("larger than", str(cm.exception))

    def test_overlap_rule_for_every_pair_of_hosts(self):
        def binds_together(a, b):
            """Linux: the same address clashes, "::" (dual-stack) clashes with
            everything, 0.0.0.0 with every IPv4 address."""
            hosts = {a, b}
            if len(hosts) == 1 or "::" in hosts:
                return False
            return not ("0.0.0.0" in hosts and all(":" not in h for h in hosts))

        hosts = ["0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "::1", "fe80::1"]
        for first in hosts:
            for second in hosts:
                a, b = Endpoint(first, 5, "tcp"), Endpoint(second, 5, "tcp")
                text = f"{a.__str__().rsplit('/', 1)[0]} | x | 1\n{b.__str__().rsplit('/', 1)[0]} | y | 2\n"
                if binds_together(first, second):
                    self.assertEqual(len(parse_rules(text)), 2, (first, second))
                else:
                    self.assertRuleError(text, 2, "overlaps")

    def test_many_rules_on_one_port_without_pairwise_checks(self):
        calls = []
        original = _PortUsage.clash
        self.patch(_PortUsage, "clash", lambda usage, e: calls.append(1) or original(usage, e))
        text = "".join(f"127.{i // 250}.{i % 250}.1:1000/tcp+udp | a | 1\n" for i in range(5_000))
        self.assertEqual(len(parse_rules(text)), 5_000)
        self.assertEqual(len(calls), 10_000, "one constant-time check per endpoint, none pairwise")
        self.assertRuleError(text + "0.0.0.0:1000/udp | a | 1\n", 5_001, "0.0.0.0:1000/udp overlaps 127.0.0.1:1000/udp on line 1")

    def test_too_many_rules(self):
        text = "".join(f"127.0.0.1:{1000 + i} | a | 1\n" for i in range(MAX_RULES + 1))
        self.assertRuleError(text, MAX_RULES + 1, f"more than {MAX_RULES} rules")

    def test_huge_repr_is_cut(self):
        error = self.assertRuleError("1/" + "u" * 3000 + " | a | 1", 1, "...")
        self.assertLess(len(str(error)), 200)


rule_lines = st.builds(
    lambda host, port, proto, rhost, rport, opts: f"{host}{port}{proto} | {rhost} | {rport}{opts}",
    st.sampled_from(["", "127.0.0.1:", "[::1]:", "0.0.0.0:"]),
    st.integers(1, 65535),
    st.sampled_from(["", "/tcp", "/udp", "/tcp+udp"]),
    st.sampled_from(["127.0.0.1", "::1", "example.com", "a-b.c_d.internal"]),
    st.integers(1, 65535),
    st.sampled_from(["", " | idle=30s", " | max-conns=5, connect-timeout=1s", " |"]),
)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
    def test_any_input_parses_or_raises_rules_error(self, data):
        try:
            rules = parse_rules(data, "fuzz")
        except RulesError as e:
            self.assertTrue(str(e).startswith("fuzz"))
            self.assertLess(len(str(e)), 400)
        else:
            for rule in rules:
                self.assertTrue(rule.listen)

    @settings(max_examples=200, deadline=None)
    @given(rule_lines)
    def test_generated_valid_lines_parse(self, line):
        (rule,) = parse_rules(line)
        self.assertEqual(rule.line, 1)
        self.assertTrue(1 <= rule.remote_port <= 65535)

    @settings(max_examples=200, deadline=None)
    @given(rule_lines, st.integers(0, 40), st.sampled_from(["|", ":", "/", "=", ",", "[", "\x00", "é"]))
    def test_mutated_lines_never_crash(self, line, position, junk):
        mutated = line[:position] + junk + line[position:]
        try:
            parse_rules(mutated, "m")
        except RulesError:
            pass


class ProxyOptionTests(unittest.TestCase):
    def test_proxy_option(self):
        rules = parse_rules(b"8080 | 127.0.0.1 | 80 | proxy=v2\n9090/udp | 127.0.0.1 | 53 | proxy=v2\n", "t")
        self.assertEqual([r.options.proxy for r in rules], ["v2", "v2"])
        self.assertEqual(rules[0].options.resolve(Limits()).proxy, "v2")
        self.assertEqual(parse_rules(b"8080 | h | 80\n", "t")[0].options.resolve(Limits()).proxy, "off")
        for line, fragment in [(b"8080 | h | 80 | proxy=v3", "proxy"),
                               (b"8080/udp | h | 80 | proxy=v1", "proxy=v1 carries TCP only"),
                               (b"8080 | h | 80 | proxy=v1, proxy=v2", "given twice")]:
            with self.assertRaises(RulesError) as cm:
                parse_rules(line + b"\n", "t")
            self.assertIn(fragment, str(cm.exception))


class EmptyMarkerTests(unittest.TestCase):
    """``# tunnelpass: empty`` says a file without rules is meant (see forward.py)."""

    def test_marker_is_found_in_its_forms(self):
        for text in ("# tunnelpass: empty\n", "#tunnelpass:empty", "  #  TunnelPass :  EMPTY  \r\n",
                     b"# comment\n\n# tunnelpass: empty\n"):
            rules = parse_rules(text, "t")
            self.assertEqual((list(rules), rules.meant_empty), ([], True), repr(text))

    def test_other_files_are_not_marked(self):
        for text in ("", "\n\n", "# nothing yet\n", "# tunnelpass: empty for now\n", "# tunnelpass: not empty\n",
                     "1 | a | 2  # tunnelpass: empty\n"):
            self.assertFalse(parse_rules(text, "t").meant_empty, repr(text))

    def test_marker_beside_rules_changes_nothing(self):
        rules = parse_rules("# tunnelpass: empty\n1 | a | 2\n", "t")
        self.assertEqual(len(rules), 1)
