"""Tests for tunnelpass.carriers.muxheaders: what a multiplexed stream says
when it opens, and every way a peer's opening HEADERS are refused."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.carriers.muxheaders import (
    ADDRESSES,
    MAX_VALUE,
    METHOD,
    OK,
    PROTOCOL,
    StreamRefused,
    decode_open,
    encode_open,
)

V4 = (("192.0.2.1", 40000), ("198.51.100.7", 443))
V6 = (("2001:db8::1", 1), ("::1", 65535))


class RoundTripTests(unittest.TestCase):
    def test_tcp_and_udp_with_ipv4(self):
        for kind in ("tcp", "udp"):
            headers = encode_open(kind, V4)
            self.assertEqual(headers[:2], [(METHOD, b"CONNECT"), (PROTOCOL, kind.encode())])
            self.assertEqual(dict(headers)[ADDRESSES], b"192.0.2.1 40000 198.51.100.7 443")
            self.assertEqual(decode_open(headers), (kind, V4))

    def test_ipv6(self):
        self.assertEqual(decode_open(encode_open("tcp", V6)), ("tcp", V6))

    def test_ipv6_written_in_its_long_form_comes_back_canonical(self):
        addresses = (("2001:0db8:0000::0001", 5), ("0:0:0:0:0:0:0:1", 6))
        self.assertEqual(decode_open(encode_open("udp", addresses)), ("udp", (("2001:db8::1", 5), ("::1", 6))))

    def test_no_addresses(self):
        headers = encode_open("tcp")
        self.assertNotIn(ADDRESSES, dict(headers))
        self.assertEqual(decode_open(headers), ("tcp", None))

    def test_addresses_that_are_not_ip_are_sent_as_unknown(self):
        for addresses in ((("/run/user.sock", 0), ("/run/listen.sock", 0)),
                          (("localhost", 1), ("127.0.0.1", 2)), ((None, 1), ("127.0.0.1", 2))):
            headers = encode_open("tcp", addresses)
            self.assertNotIn(ADDRESSES, dict(headers))
            self.assertEqual(decode_open(headers), ("tcp", None))

    def test_header_order_does_not_matter(self):
        headers = list(reversed(encode_open("udp", V4)))
        self.assertEqual(decode_open(headers), ("udp", V4))

    def test_unknown_kind_is_not_encoded(self):
        self.assertRaises(ValueError, encode_open, "sctp")


def refused(headers) -> str:
    """The reason decode_open refuses *headers* with."""
    try:
        decode_open(headers)
    except StreamRefused as e:
        return str(e)
    raise AssertionError(f"{headers!r} was accepted")


GOOD = [(METHOD, b"CONNECT"), (PROTOCOL, b"tcp")]


class RefusalTests(unittest.TestCase):
    def test_unknown_name(self):
        self.assertIn("unknown header", refused(GOOD + [(b"x-extra", b"1")]))
        self.assertIn("unknown header", refused(GOOD + [(b":path", b"/")]))

    def test_upper_case_name_is_unknown(self):
        self.assertIn("unknown header", refused(GOOD + [(b"TP-ADDR", b"192.0.2.1 1 192.0.2.2 2")]))
        self.assertIn("unknown header", refused([(b":METHOD", b"CONNECT"), (PROTOCOL, b"tcp")]))

    def test_repeated_name(self):
        self.assertIn("repeated", refused(GOOD + [(PROTOCOL, b"tcp")]))
        self.assertIn("repeated", refused(GOOD + [(ADDRESSES, b"192.0.2.1 1 192.0.2.2 2")] * 2))

    def test_oversize_value(self):
        self.assertIn("over 128 bytes", refused([(METHOD, b"CONNECT"), (PROTOCOL, b"t" * (MAX_VALUE + 1))]))
        # exactly MAX_VALUE passes the size check (and fails as a malformed address instead)
        self.assertNotIn("bytes", refused(GOOD + [(ADDRESSES, b"1" * MAX_VALUE)]))

    def test_method_missing_or_other(self):
        for headers in ([(PROTOCOL, b"tcp")], [(METHOD, b"GET"), (PROTOCOL, b"tcp")],
                        [(METHOD, b"connect"), (PROTOCOL, b"tcp")]):
            self.assertIn(":method CONNECT", refused(headers))

    def test_kind_unknown_or_missing(self):
        self.assertIn("unknown stream kind", refused([(METHOD, b"CONNECT"), (PROTOCOL, b"sctp")]))
        self.assertIn("unknown stream kind", refused([(METHOD, b"CONNECT"), (PROTOCOL, b"TCP")]))
        self.assertIn("unknown stream kind", refused([(METHOD, b"CONNECT")]))
        self.assertIn(":method CONNECT", refused([]))

    def test_malformed_addresses(self):
        for raw in (b"", b"192.0.2.1 1 192.0.2.2", b"192.0.2.1 1 192.0.2.2 2 3", b"192.0.2.1  1 192.0.2.2 2",
                    b"192.0.2.1\t1 192.0.2.2 2"):
            self.assertIn("tp-addr must be", refused(GOOD + [(ADDRESSES, raw)]), raw)
        for raw in (b"192.0.2.256 1 192.0.2.2 2", b"host 1 192.0.2.2 2", b"\xff\xfe 1 192.0.2.2 2",
                    b"fe80::1%eth0 1 fe80::2 2", b"::1 1 ::1%\r\nX-Injected:1 2"):
            self.assertIn("malformed IP address", refused(GOOD + [(ADDRESSES, raw)]), raw)

    def test_scope_ids_are_not_sent(self):
        """A link-local user's scope id names an interface of this host only
        (and the far side refuses any): the addresses go without it."""
        headers = encode_open("tcp", (("fe80::1%eth0", 1), ("fe80::2%2", 2)))
        self.assertEqual(dict(headers)[ADDRESSES], b"fe80::1 1 fe80::2 2")
        self.assertEqual(decode_open(headers), ("tcp", (("fe80::1", 1), ("fe80::2", 2))))

    def test_malformed_ports(self):
        for port in (b"65536", b"-1", b"+1", b"1.0", b"", b"0x10", b"000001", b"99999", b"\xd9\xa1"):
            raw = b"192.0.2.1 " + port + b" 192.0.2.2 2"
            self.assertIn("malformed port", refused(GOOD + [(ADDRESSES, raw)]), raw)
            raw = b"192.0.2.1 1 192.0.2.2 " + port
            self.assertIn("malformed port", refused(GOOD + [(ADDRESSES, raw)]), raw)

    def test_mixed_families(self):
        self.assertIn("mixes IPv4 and IPv6", refused(GOOD + [(ADDRESSES, b"192.0.2.1 1 ::1 2")]))
        self.assertIn("mixes IPv4 and IPv6", refused(GOOD + [(ADDRESSES, b"::1 1 192.0.2.1 2")]))

    def test_reason_shows_only_printable_ascii(self):
        reason = refused(GOOD + [(b"x-\x00\x1b[31m\xff" + b"a" * 100, b"")])
        self.assertNotIn("\x00", reason)
        self.assertNotIn("\x1b", reason)
        self.assertLess(len(reason), 80)


_names = st.sampled_from([METHOD, PROTOCOL, ADDRESSES, b":status", b"TP-ADDR", b""]) | st.binary(max_size=12)
_values = st.sampled_from([b"CONNECT", b"tcp", b"udp", b"192.0.2.1 1 192.0.2.2 2", b"::1 1 ::2 2",
                           b"1.2.3.4 99999 1.2.3.4 1"]) | st.binary(max_size=140)


class HostileHeaderTests(unittest.TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(_names, _values), max_size=5))
    def test_decode_raises_only_stream_refused(self, headers):
        try:
            kind, addresses = decode_open(headers)
        except StreamRefused:
            return
        self.assertIn(kind, ("tcp", "udp"))
        if addresses is not None:
            for host, port in addresses:
                self.assertIsInstance(host, str)
                self.assertNotIn("%", host)
                self.assertTrue(0 <= port <= 65535)


class LiteralEncoderTests(unittest.TestCase):
    """The carrier's HPACK encoder: literals only, readable by any decoder."""

    def test_any_decoder_reads_it_and_the_table_stays_empty(self):
        from hpack import Decoder

        from tunnelpass.carriers.muxheaders import LiteralEncoder

        encoder, decoder = LiteralEncoder(), Decoder()
        for source_port in (40000, 40001, 40002):
            headers = encode_open("tcp", (("192.0.2.1", source_port), ("198.51.100.7", 443)))
            self.assertEqual(decoder.decode(encoder.encode(headers), raw=True), headers)
        self.assertEqual(len(decoder.header_table.dynamic_entries), 0)
        self.assertEqual(decoder.decode(encoder.encode(OK), raw=True), OK)

    def test_a_resized_table_is_announced_first(self):
        from hpack import Decoder

        from tunnelpass.carriers.muxheaders import LiteralEncoder

        encoder, decoder = LiteralEncoder(), Decoder()
        decoder.max_allowed_table_size = 4096
        encoder.header_table_size = 1024  # the peer's SETTINGS_HEADER_TABLE_SIZE
        block = encoder.encode(encode_open("udp"))
        self.assertEqual(block[0] & 0xE0, 0x20)  # a dynamic table size update comes first
        self.assertEqual(decoder.decode(block, raw=True), encode_open("udp"))
        self.assertEqual(decoder.header_table.maxsize, 1024)

