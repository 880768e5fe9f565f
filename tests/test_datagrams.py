"""Datagram framing over a tunnel stream: boundaries survive any slicing
of the stream, every size UDP can carry fits, nothing else does."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.wire.datagrams import MAX_DATAGRAM, DatagramDecoder, frame


def sliced(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


class DatagramFramingTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=3000), max_size=20), st.lists(st.integers(0, 70000), max_size=30))
    def test_any_datagrams_any_slicing(self, datagrams, cuts):
        stream = b"".join(frame(d) for d in datagrams)
        decoder = DatagramDecoder()
        out = []
        for piece in sliced(stream, cuts):
            out += decoder.feed(piece)
        self.assertEqual(out, datagrams)
        self.assertEqual(decoder.buffered, 0)

    def test_empty_and_largest_datagrams(self):
        decoder = DatagramDecoder()
        largest = bytes(range(256)) * 255 + bytes(range(255))
        self.assertEqual(len(largest), MAX_DATAGRAM)
        self.assertEqual(decoder.feed(frame(b"") + frame(largest) + frame(b"x")), [b"", largest, b"x"])

    def test_oversized_refused(self):
        self.assertRaises(ValueError, frame, b"x" * (MAX_DATAGRAM + 1))

    def test_partial_frame_is_held_and_bounded(self):
        decoder = DatagramDecoder()
        data = frame(b"y" * 60000)
        for i in range(0, len(data) - 1, 1000):
            self.assertEqual(decoder.feed(data[i:min(i + 1000, len(data) - 1)]), [])
        self.assertEqual(decoder.buffered, len(data) - 1)
        self.assertLessEqual(decoder.buffered, 2 + MAX_DATAGRAM)
        self.assertEqual(decoder.feed(data[-1:]), [b"y" * 60000])

    def test_hostile_lengths_only_wait(self):
        # Every 16-bit length is valid: a peer claiming 65535 bytes and
        # sending 3 leaves the decoder waiting with 5 bytes, never more
        # than one frame.
        decoder = DatagramDecoder()
        self.assertEqual(decoder.feed(b"\xff\xffabc"), [])
        self.assertEqual(decoder.buffered, 5)
