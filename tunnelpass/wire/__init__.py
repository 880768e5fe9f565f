"""The wire format, sans-IO: frames, the authenticating handshake, datagram
framing and the PROXY protocol -- bytes in, events and bytes out (see
docs/protocol.rst)."""
