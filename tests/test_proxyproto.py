"""PROXY protocol v1/v2: round trips, incremental parsing, hostile input."""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from tunnelpass.wire.proxyproto import (
    V1_MAX,
    ProxyError,
    ProxyHeader,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


def parse_sliced(data: bytes, step: int):
    """Feed growing prefixes, as reads arrive; the first complete result."""
    for end in range(step, len(data) + step, step):
        result = parse(data[:end])
        if result is not None:
            return result
    return None


class RoundTripTests(unittest.TestCase):
    @given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), port, port, st.integers(1, 40),
           st.binary(max_size=20))
    def test_v1_round_trip_in_any_slicing(self, hosts, sport, dport, step, rest):
        header = encode_v1((hosts[0], sport), (hosts[1], dport))
        self.assertLessEqual(len(header), V1_MAX)
        parsed, used = parse_sliced(header + rest, step)
        self.assertEqual(used, len(header))
        self.assertEqual(parsed, ProxyHeader("tcp", (hosts[0], sport), (hosts[1], dport)))

    @given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), port, port, st.sampled_from(["tcp", "udp"]),
           st.integers(1, 40), st.binary(max_size=20))
    def test_v2_round_trip_in_any_slicing(self, hosts, sport, dport, protocol, step, rest):
        header = encode_v2((hosts[0], sport), (hosts[1], dport), protocol)
        parsed, used = parse_sliced(header + rest, step)
        self.assertEqual(used, len(header))
        self.assertEqual(parsed, ProxyHeader(protocol, (hosts[0], sport), (hosts[1], dport)))

    def test_known_bytes(self):
        self.assertEqual(encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)),
                         b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")
        self.assertEqual(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)).hex(),
                         "0d0a0d0a000d0a515549540a" "21" "11" "000c" "c0000201" "c0000202" "0001" "0002")

    def test_local_and_unknown_mean_no_address(self):
        self.assertEqual(parse(encode_v2_local() + b"x"), (ProxyHeader(), 16))
        self.assertEqual(parse(b"PROXY UNKNOWN\r\nGET /"), (ProxyHeader(), 15))
        self.assertEqual(parse(b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n")[0], ProxyHeader())

    def test_v2_tlvs_are_skipped(self):
        header = bytearray(encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)))
        header[14:16] = (12 + 5).to_bytes(2, "big")
        tlv = b"\x04\x00\x02ok"
        parsed, used = parse(bytes(header) + tlv + b"data")
        self.assertEqual((parsed.source, used), (("192.0.2.1", 1), len(header) + len(tlv)))

    def test_encoders_refuse_bad_input(self):
        for args in [(("192.0.2.1", 1), ("::1", 2)), (("name", 1), ("192.0.2.1", 2))]:
            self.assertRaises(ValueError, encode_v1, *args)
            self.assertRaises(ValueError, encode_v2, *args)
        self.assertRaises(ValueError, encode_v2, ("192.0.2.1", 1), ("192.0.2.2", 2), "sctp")


class HostileInputTests(unittest.TestCase):
    def assertRefused(self, data, **kw):
        self.assertRaises(ProxyError, parse, data, **kw)

    def test_incomplete_is_not_an_error(self):
        for data in (b"", b"PRO", b"PROXY TCP4 1.2.3.4", b"\r\n\r\n\x00", encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))[:20]):
            self.assertIsNone(parse(data))

    def test_malformed_v1(self):
        for data in [
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
            b"PROXY " + b"A" * 200,
        ]:
            self.assertRefused(data)

    def test_malformed_v2(self):
        good = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
        for patch in [(12, 0x31), (12, 0x2F), (13, 0x31), (13, 0x13)]:
            data = bytearray(good)
            data[patch[0]] = patch[1]
            self.assertRefused(bytes(data))
        short = bytearray(good)
        short[14:16] = (4).to_bytes(2, "big")
        self.assertRefused(bytes(short))
        self.assertRefused(b"\r\n\r\n\x00\r\nQUIX\n" + good[12:])
        huge = bytearray(good)
        huge[14:16] = (60000).to_bytes(2, "big")
        self.assertRefused(bytes(huge), max_v2=4112)

    @given(st.binary(max_size=300))
    def test_garbage_never_crashes(self, data):
        try:
            result = parse(data)
        except ProxyError:
            return
        if result is not None:
            header, used = result
            self.assertLessEqual(used, len(data))
            self.assertIsInstance(header, ProxyHeader)
