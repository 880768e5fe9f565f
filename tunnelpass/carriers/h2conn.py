# -*- test-case-name: tests.test_muxconn -*-
"""The ``h2`` connection a carrier connection runs, set up for carrying streams.

:func:`new_h2` builds it: header validation off (a stream's HEADERS are
checked exactly by :mod:`tunnelpass.carriers.muxheaders`), HPACK as plain
literals (:class:`~tunnelpass.carriers.muxheaders.LiteralEncoder`), our
SETTINGS, the connection's receive window.  Two costs of ``h2`` that a
tunnel pays on every stream are taken out here:

* :class:`CarrierH2` counts open streams in amortized constant time (h2
  scans its whole stream table once per new stream);
* hyperframe's repr of a frame's payload, which h2 builds for every frame
  it receives, no longer hex-encodes the whole payload (:func:`_hex_prefix`).

Both touch ``h2``/``hyperframe`` internals; setup.cfg pins ``h2`` below 5,
and ``tests.test_muxconn.StreamCountTests`` fails if the first stops
working.
"""

from __future__ import annotations

import hyperframe.frame
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes, Settings

from tunnelpass.carriers.muxheaders import LiteralEncoder

#: Stream ids are 31 bits; a connection this close to the end opens no more.
LAST_STREAM_ID = 2**31 - 1


def _hex_prefix(data, _full=hyperframe.frame._raw_data_repr):
    """hyperframe's repr of a frame's payload, from its first bytes only.

    h2 builds ``repr(frame)`` for every frame it receives (for a trace log
    line it then drops), and hyperframe hex-encodes the whole payload
    before keeping 20 digits of it: a fifth of the CPU of a bulk transfer
    on a carrier.  Eleven bytes give the same 20 digits and the "...", so
    the text is unchanged."""
    return _full(data[:11] if data and len(data) > 11 else data)


hyperframe.frame._raw_data_repr = _hex_prefix


class CarrierH2(H2Connection):
    """h2's connection, counting open streams in amortized constant time.

    h2 counts the open streams by scanning every stream it holds, once per
    new stream (and drops the closed ones from its table as it goes): the
    n-th concurrent stream costs O(n), so 10,000 streams cost 50 million
    steps and a peer at the limit stalls the process for a minute.  Every
    stream of a carrier connection is opened by the same side, so the size
    of h2's table is an upper bound of the count; the exact scan runs only
    when that bound could reach the limit, or the table has doubled since
    the last scan (:meth:`prune` also runs it when most streams ended)."""

    _scan_at = 128

    def _open_streams(self, remainder: int) -> int:
        limit = (self.remote_settings if self.config.client_side else self.local_settings).max_concurrent_streams
        size = len(self.streams)
        if size + 1 < min(self._scan_at, limit):
            return size  # the bound: all streams have the parity asked about
        count = super()._open_streams(remainder)  # exact, and drops closed streams from the table
        self._scan_at = max(128, 2 * len(self.streams))
        return count

    def prune(self) -> None:
        """Drop closed streams from h2's table (after most streams ended)."""
        super()._open_streams(1)
        self._scan_at = max(128, 2 * len(self.streams))

    def ids_left(self) -> int:
        """Streams this side can still open (ids are odd, 31 bits)."""
        return (LAST_STREAM_ID - max(self.highest_outbound_stream_id or 0, 0)) // 2


def new_h2(opener: bool, *, max_streams: int, stream_window: int, connection_window: int, max_frame: int,
           max_header_list: int) -> CarrierH2:
    """A started ``h2`` connection (its preface and SETTINGS ready to send)
    for the side that opens streams (*opener*: the HTTP/2 client) or the
    side that accepts them."""
    config = H2Configuration(client_side=opener, header_encoding=None, validate_outbound_headers=False,
                             normalize_outbound_headers=False, validate_inbound_headers=False,
                             normalize_inbound_headers=False)
    h2 = CarrierH2(config)
    h2.encoder = LiteralEncoder()
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: stream_window, SettingCodes.MAX_FRAME_SIZE: max_frame,
                SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0 if opener else max_streams}
    if opener:
        settings[SettingCodes.ENABLE_PUSH] = 0
    else:
        settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
    # Our SETTINGS are in force here from the start, not from the peer's
    # ACK (h2's way): until then h2 held us to its defaults (100 streams,
    # 16 KiB frames), and a peer that opened its 101st stream, or sent a
    # large DATA frame, right after reading our SETTINGS -- in the same
    # flight as its ACK -- was taken for a peer in breach and the carrier
    # closed.  Accepting more than the peer may yet assume is safe; each
    # value h2 copies at start is set along with it.
    h2.local_settings = Settings(client=opener, initial_values=settings)
    h2.max_inbound_frame_size = max_frame
    h2.decoder.max_header_list_size = max_header_list
    h2.initiate_connection()  # its SETTINGS frame carries the values above
    h2.increment_flow_control_window(connection_window - h2.inbound_flow_control_window)
    return h2
