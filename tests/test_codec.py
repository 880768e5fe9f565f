"""Tests for tunnelpass.wire.codec: framing with hard size limits, hostile input."""

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from tunnelpass.wire.codec import (
    HEADER,
    LARGEST_FRAME,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    ProtocolError,
    Type,
    decode_text,
    encode,
    encode_text,
)

valid_frames = st.sampled_from(list(Type)).flatmap(
    lambda t: st.binary(max_size=MAX_PAYLOAD[t]).map(lambda p: Frame(t, p))
)


class CodecTests(unittest.TestCase):
    def test_round_trip(self):
        wire = encode(Type.PING, b"12345678") + encode(Type.FLUSH)
        self.assertEqual(FrameDecoder().feed(wire), [Frame(Type.PING, b"12345678"), Frame(Type.FLUSH, b"")])

    def test_encode_refuses_oversized(self):
        self.assertRaises(ValueError, encode, Type.TCP, b"x" * 17)

    def test_partial_frames_wait(self):
        decoder = FrameDecoder()
        wire = encode(Type.TCP, b"i" * 16)
        self.assertEqual(decoder.feed(wire[:3]), [])
        self.assertEqual(decoder.feed(wire[3:10]), [])
        self.assertEqual(decoder.feed(wire[10:]), [Frame(Type.TCP, b"i" * 16)])
        self.assertEqual(decoder.buffered, 0)

    def test_unknown_type_poisons(self):
        decoder = FrameDecoder()
        with self.assertRaises(ProtocolError) as cm:
            decoder.feed(HEADER.pack(99, 0, 0))
        self.assertIn("unknown frame type 99", str(cm.exception))
        self.assertRaises(ProtocolError, decoder.feed, encode(Type.PING))

    def test_oversized_length_rejected_from_header_alone(self):
        decoder = FrameDecoder()
        with self.assertRaises(ProtocolError) as cm:
            decoder.feed(HEADER.pack(Type.TCP, 0, 65535))
        self.assertIn("exceeds 16", str(cm.exception))
        self.assertEqual(decoder.buffered, 0)

    def test_flags_must_be_zero(self):
        self.assertRaises(ProtocolError, FrameDecoder().feed, HEADER.pack(Type.PING, 1, 0))

    def test_allowed_types(self):
        decoder = FrameDecoder(allowed=frozenset({Type.HELLO}))
        self.assertRaises(ProtocolError, decoder.feed, encode(Type.TCP, b"x" * 16))

    def test_text_payload(self):
        self.assertEqual(decode_text(encode_text(7, "bye ✓")), (7, "bye ✓"))
        self.assertEqual(len(encode_text(1, "x" * 1000)), 258)
        self.assertRaises(ProtocolError, decode_text, b"\x00")
        self.assertEqual(decode_text(b"\x00\x01\xff\xfe")[0], 1)
        self.assertEqual(decode_text(b"\x00\x02evil\nforged log line\x1b[0m")[1], "evil?forged log line?[0m")

    def test_take_rest(self):
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(encode(Type.PONG, b"p") + b"relay bytes", max_frames=1),
                         [Frame(Type.PONG, b"p")])
        self.assertEqual(decoder.take_rest(), b"relay bytes")


class CodecPropertyTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(valid_frames, max_size=10), st.lists(st.integers(1, 50), max_size=30))
    def test_any_slicing_decodes_the_same(self, frames, cuts):
        wire = b"".join(encode(f.type, f.payload) for f in frames)
        decoder, got, position = FrameDecoder(), [], 0
        for cut in cuts:
            got += decoder.feed(wire[position:position + cut])
            position += cut
        got += decoder.feed(wire[position:])
        self.assertEqual(got, frames)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2000))
    def test_garbage_never_crashes_or_hoards(self, junk):
        decoder = FrameDecoder()
        try:
            decoder.feed(junk)
        except ProtocolError:
            return
        self.assertLess(decoder.buffered, LARGEST_FRAME)

    @settings(max_examples=200, deadline=None)
    @given(valid_frames, st.integers(0, 3), st.integers(0, 255))
    def test_corrupted_header_is_an_error_or_a_frame(self, frame, index, value):
        wire = bytearray(encode(frame.type, frame.payload))
        wire[index] = value
        try:
            FrameDecoder().feed(bytes(wire))
        except ProtocolError:
            pass


class OpenFrameTests(unittest.TestCase):
    def test_open_udp_carries_the_same_addresses(self):
        from tunnelpass.wire.codec import decode_open, encode_open

        for frame_type in (Type.OPEN, Type.OPEN_UDP):
            raw = encode_open(b"i" * 16, ("2001:db8::1", 53000), ("10.0.0.1", 53), frame_type)
            (frame,) = FrameDecoder().feed(raw)
            self.assertEqual(frame.type, frame_type)
            self.assertEqual(decode_open(frame.payload),
                             (b"i" * 16, (("2001:db8::1", 53000), ("::ffff:a00:1", 53))))
        self.assertRaises(ValueError, encode_open, b"i" * 16, None, None, Type.TCP)
