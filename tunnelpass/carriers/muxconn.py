# -*- test-case-name: tests.test_muxconn -*-
"""One multiplexed carrier connection (``--type 3``): HTTP/2 through ``h2``.

After the carrier connection authenticated itself (MUX_AUTH / MUX_OK,
:mod:`tunnelpass.tunnel.muxdial` and the server's gate), both sides speak
HTTP/2 on it -- inside TLS with ALPN ``h2`` at ``--tls 1``/``2``, with
prior knowledge at ``--tls 0``.  The side that listens for users (the
server in the receive flow, the client in the send flow) is the HTTP/2
client: it opens one stream per user connection or UDP session
(:mod:`tunnelpass.carriers.muxheaders` says what the HEADERS carry); the
other side is the HTTP/2 server and hands each stream to its
:class:`~tunnelpass.carriers.stream.IStreamAcceptor`.

``h2`` does the framing, the stream states and the flow control; this
module feeds it the carrier's bytes, turns its events into calls on the
streams (:class:`~tunnelpass.carriers.muxstream.MuxStream`) and writes
what it has to send.  Bounds, each enforced by ``h2`` from our SETTINGS:
:data:`MAX_STREAMS` concurrent streams opened by the peer,
:data:`STREAM_WINDOW` bytes in flight per stream, :data:`CONNECTION_WINDOW`
per connection, frames of at most :data:`MAX_FRAME` bytes, header lists of
at most :data:`MAX_HEADER_LIST` bytes.  Anything ``h2`` calls a protocol
error -- and a stream the peer opens on the wrong side, a GOAWAY -- ends
this carrier connection only: its streams are reset, the relays behind
them end abnormally.

Fairness: a stream's data goes out only within its window, and while the
carrier's own write buffer is full every stream waits in its queue; when
the carrier drains, waiting streams are served in turn, the one served
last going to the back.  A bulk transfer therefore holds at most one
window of data ahead of another stream's bytes.

Liveness: each side sends a PING every *heartbeat* seconds; a carrier
that has heard nothing for three heartbeats is dead and is aborted.
"""

from __future__ import annotations

import os

import hyperframe.frame
from h2 import events as h2events
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tunnelpass.carriers.muxheaders import OK, STATUS, LiteralEncoder, StreamRefused, decode_open, encode_open
from tunnelpass.carriers.muxstream import NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, MuxStream
from tunnelpass.carriers.stream import IStream, write_now

def _hex_prefix(data, _full=hyperframe.frame._raw_data_repr):
    """hyperframe's repr of a frame's payload, from its first bytes only.

    h2 builds ``repr(frame)`` for every frame it receives (for a trace log
    line it then drops), and hyperframe hex-encodes the whole payload
    before keeping 20 digits of it: a fifth of the CPU of a bulk transfer
    on a carrier.  Eleven bytes give the same 20 digits and the "...", so
    the text is unchanged."""
    return _full(data[:11] if data and len(data) > 11 else data)


hyperframe.frame._raw_data_repr = _hex_prefix

class _H2Connection(H2Connection):
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


#: Concurrent streams the peer may open on one carrier connection.
MAX_STREAMS = 10_000
#: Flow-control window per stream: bytes a sender may have in flight.
STREAM_WINDOW = 256 * 1024
#: Flow-control window of the whole connection.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Largest DATA frame accepted.
MAX_FRAME = 64 * 1024
#: Largest header list accepted (a stream's opening HEADERS are ~100 bytes).
MAX_HEADER_LIST = 1024
#: Bytes the paused streams of one connection may hold beyond the
#: connection window (see :meth:`MuxConnection.release`).
HELD_LIMIT = 16 * 1024 * 1024
#: Missed heartbeats before a silent carrier is declared dead.
DEAD_AFTER = 3
#: Streams the peer may reset before sending any DATA on them ("rapid
#: reset", CVE-2023-44487: each costs a target dial, none counts against
#: MAX_STREAMS): a burst of RESET_BURST, then RESET_RATE a second; beyond,
#: the carrier is closed with ENHANCE_YOUR_CALM.
RESET_BURST, RESET_RATE = 1000, 100.0
#: Bytes written while the carrier's buffer is full (the peer does not
#: read): only answers the peer asked for (PING and SETTINGS acks, resets,
#: window updates) -- streams wait.  Beyond this the peer is dropped.
MAX_UNREAD = 1024 * 1024
ENHANCE_YOUR_CALM = 11


@implementer(IPushProducer)
class MuxConnection(Protocol):
    """HTTP/2 on an authenticated carrier connection.

    *opener*: this side opens the streams (the HTTP/2 client).  *acceptor*
    is told of each stream the peer opens (the other side).  *on_lost(self,
    why)* runs once when the connection ends.  The counters
    (:attr:`opened`, :attr:`refused`, ``len(streams)``) feed the metrics."""

    log = Logger(namespace="tunnelpass.mux")

    def __init__(self, opener: bool, acceptor, clock, heartbeat: float, on_lost=None, name: str = "carrier"):
        self.opener = opener
        self.acceptor = acceptor
        self.clock = clock
        self.heartbeat = heartbeat
        self.on_lost = on_lost
        self.name = name
        self.streams: dict[int, MuxStream] = {}
        self.opened = 0
        self.refused = 0
        self.rtt: float | None = None
        self.retiring = False  # no new streams; closes once the last one ends
        self.closed = False
        self.carrier_paused = False
        self._batching = False  # inside dataReceived: one write for everything its events send
        self._waiting: dict[MuxStream, None] = {}  # streams with queued data, in turn order
        self._ping_sent: dict[bytes, float] = {}
        self._beat = None
        self.last_heard = clock.seconds()
        self._resets, self._resets_at = float(RESET_BURST), self.last_heard  # rapid-reset budget
        self._unread = 0  # bytes written since the carrier paused
        self.ending = False  # dropped by us: handle nothing more the peer sent
        self.held = 0  # bytes paused streams hold whose connection window went back early
        self._releasing = 0  # of which, in the batch being handled: one WINDOW_UPDATE at its end
        self.stream = None
        self.h2 = None

    # Connection lifecycle

    def connectionMade(self) -> None:
        self.stream = IStream(self.transport)
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)  # many streams' small frames: Nagle would hold one behind another's ACK
        config = H2Configuration(client_side=self.opener, header_encoding=None, validate_outbound_headers=False,
                                 normalize_outbound_headers=False, validate_inbound_headers=False,
                                 normalize_inbound_headers=False)
        h2 = self.h2 = _H2Connection(config)
        h2.encoder = LiteralEncoder()
        h2.initiate_connection()
        settings = {SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                    SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                    SettingCodes.MAX_CONCURRENT_STREAMS: 0 if self.opener else MAX_STREAMS}
        if self.opener:
            settings[SettingCodes.ENABLE_PUSH] = 0
        else:
            settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        h2.update_settings(settings)
        # h2 raises its frame-size limit on the peer's ACK of our SETTINGS,
        # but fixes the limit for a whole received batch before reading it:
        # a peer's first large DATA frame right behind that ACK, in one read,
        # was refused as overlong and the carrier closed.  Larger frames than
        # we announced stay refused.
        h2.max_inbound_frame_size = MAX_FRAME
        h2.increment_flow_control_window(CONNECTION_WINDOW - h2.inbound_flow_control_window)
        self.transport.registerProducer(self, True)
        self._flush()
        self.last_heard = self.clock.seconds()
        if self.heartbeat:
            self._beat = self.clock.callLater(self.heartbeat, self._heartbeat)

    def connectionLost(self, reason=None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
        for stream in list(self.streams.values()):
            stream.reset_received(None)
        self.streams.clear()
        self._waiting.clear()
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self, reason)

    @property
    def usable(self) -> bool:
        """Whether a new stream may be opened here now."""
        return (not self.closed and not self.retiring and self.h2 is not None
                and len(self.streams) < self.h2.remote_settings.max_concurrent_streams)

    def retire(self) -> None:
        """No new streams here; close the connection once the last one ends."""
        self.retiring = True
        if not self.streams:
            self.close()

    def close(self, code: int = NO_ERROR) -> None:
        """GOAWAY, then close after what is buffered."""
        if self.closed or self.transport is None:
            return
        try:
            self.h2.close_connection(error_code=code)
        except H2Error:
            pass
        # The GOAWAY, even from inside dataReceived; straight to the socket,
        # so that an abort right after this (a peer in breach) still sends it.
        write_now(self.stream, self.h2.data_to_send())
        self.transport.loseConnection()

    def _calm(self, why: str) -> None:
        """Drop a peer that abuses what HTTP/2 allows (bounded work and memory)."""
        self.log.warn("{name}: {why}; closing this carrier connection", name=self.name, why=why,
                      event="carrier_abuse")
        self.ending = True
        self.close(ENHANCE_YOUR_CALM)
        self.transport.abortConnection()

    def _violation(self, why: str) -> None:
        self.log.warn("{name}: the peer broke HTTP/2 ({why}); closing this carrier connection",
                      name=self.name, why=why, event="carrier_protocol_error")
        self.close(PROTOCOL_ERROR)
        self.transport.abortConnection()

    # Streams

    def open_stream(self, kind: str, addresses=None) -> MuxStream:
        """A new stream announcing *kind* for the user at *addresses*."""
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, encode_open(kind, addresses))
        stream = self.streams[stream_id] = MuxStream(self, stream_id, opener=True)
        self.opened += 1
        self._flush()
        return stream

    def send(self, stream: MuxStream, data: bytes) -> int:
        """DATA for *stream*, as much as its window and the carrier take
        now; the count taken (the rest waits in the stream's queue)."""
        if self.closed:
            return 0
        if self.carrier_paused:
            self._waiting[stream] = None
            return 0
        h2 = self.h2
        stream_id = stream.stream_id
        try:
            if not stream._headers_sent:
                stream._headers_sent = True
                h2.send_headers(stream_id, OK)
            count = min(len(data), h2.local_flow_control_window(stream_id))
            frame = h2.max_outbound_frame_size
            if count == len(data) and count <= frame:
                h2.send_data(stream_id, data)
            else:
                view = memoryview(data)
                for start in range(0, count, frame):
                    h2.send_data(stream_id, bytes(view[start:min(start + frame, count)]))
        except StreamClosedError:
            return len(data)  # reset meanwhile: its reset event ends it
        if count < len(data):
            self._waiting[stream] = None
        self._flush()
        return count

    def end_stream(self, stream: MuxStream) -> None:
        try:
            if not stream._headers_sent:
                stream._headers_sent = True
                self.h2.send_headers(stream.stream_id, OK, end_stream=True)
            else:
                self.h2.end_stream(stream.stream_id)
        except (StreamClosedError, H2Error):
            return
        self._flush()

    def reset_stream(self, stream: MuxStream, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except (StreamClosedError, H2Error):
            return
        self._flush()

    def acknowledge(self, stream: MuxStream, count: int) -> None:
        if self.closed:
            return
        try:
            self.h2.acknowledge_received_data(count, stream.stream_id)
        except H2Error:
            return
        self._flush()

    def release(self, count: int) -> int:
        """Hand *count* bytes of the connection's window back now, for data
        a paused stream holds (bounded by that stream's own window); the
        count handed back (0 once the streams of this connection hold
        :data:`HELD_LIMIT` that way).  Held until the stream resumed, the
        connection's window would be all held by CONNECTION_WINDOW /
        STREAM_WINDOW slow streams and every other stream would stall; the
        limit keeps what stalled streams hold bounded per connection too.
        (The stream's later acknowledgement cannot hand it back twice: h2
        caps the window at its size.)  Only ever called while the carrier's
        bytes are being handled: one WINDOW_UPDATE for the whole batch goes
        out with it (one per DATA frame would be a frame per datagram of a
        UDP stream)."""
        if not count or self.closed or self.held + count > HELD_LIMIT:  # (END_STREAM alone counts 0)
            return 0
        self.held += count
        self._releasing += count
        return count

    def unhold(self, count: int) -> None:
        """Data released early (:meth:`release`) was taken, or its stream ended."""
        self.held -= count

    def forget(self, stream: MuxStream) -> None:
        """*stream* is over for its user."""
        self.streams.pop(stream.stream_id, None)
        if len(self.h2.streams) >= 128 and len(self.streams) * 4 < len(self.h2.streams):
            self.h2.prune()  # a burst ended: its closed streams' state goes now, not at the next burst
        self._waiting.pop(stream, None)
        if self.retiring and not self.streams:
            self.close()

    # Bytes from the carrier

    def dataReceived(self, data: bytes) -> None:
        self.last_heard = self.clock.seconds()
        try:
            events = self.h2.receive_data(data)
        except H2Error as e:
            self._violation(str(e) or type(e).__name__)
            return
        handlers = self._handlers
        self._batching = True
        try:
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.closed or self.ending:
                    return
        finally:
            self._batching = False
            releasing, self._releasing = self._releasing, 0
        if releasing and not self.closed:
            self.h2.increment_flow_control_window(releasing)
        self._flush()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _request(self, event) -> None:
        stream_id = event.stream_id
        if self.opener:
            self._violation("a stream opened by the side that opens streams")  # h2 refuses pushes itself
            return
        if self.retiring:
            self.refused += 1
            self.h2.reset_stream(stream_id, REFUSED_STREAM)
            return
        try:
            kind, addresses = decode_open(event.headers)
        except StreamRefused as e:
            self.refused += 1
            self.log.debug("{name}: stream refused: {why}", name=self.name, why=str(e))
            self.h2.reset_stream(stream_id, REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = MuxStream(self, stream_id, opener=False)
        self.opened += 1
        if not self.acceptor.stream_accepted(kind, addresses, stream, b""):
            self.refused += 1

    def _response(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        if dict(event.headers).get(STATUS) != b"200":
            self.reset_stream(stream, PROTOCOL_ERROR)
            stream.reset_received(PROTOCOL_ERROR)

    def _data(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.carried = True
        stream.data_received(event.data, event.flow_controlled_length)

    def _ended(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.end_received()

    def _reset(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.reset_received(event.error_code)
            if not self.opener and not stream.carried:
                now = self.clock.seconds()
                self._resets = min(RESET_BURST, self._resets + (now - self._resets_at) * RESET_RATE) - 1
                self._resets_at = now
                if self._resets < 0:
                    self._calm("the peer resets streams before they carry data faster than "
                               f"{RESET_RATE:g} a second (rapid reset)")

    def _trailers(self, event) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:  # a stream carries bytes, not trailers
            self.reset_stream(stream, PROTOCOL_ERROR)
            stream.reset_received(PROTOCOL_ERROR)

    def _window(self, event) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream in self._waiting:
                self._waiting.pop(stream)
                stream.flush_queue()
        else:
            self._serve_waiting()

    def _goaway(self, event) -> None:
        if event.error_code:
            self.log.warn("{name}: the peer closed the carrier connection (HTTP/2 code {code})",
                          name=self.name, code=int(event.error_code), event="carrier_goaway")
        self.retiring = True
        self.transport.loseConnection()  # h2 sends nothing after a GOAWAY: the streams cannot go on

    def _pong(self, event) -> None:
        sent = self._ping_sent.pop(bytes(event.ping_data), None)
        if sent is not None:
            self.rtt = self.clock.seconds() - sent

    _handlers = {
        h2events.RequestReceived: _request,
        h2events.ResponseReceived: _response,
        h2events.DataReceived: _data,
        h2events.StreamEnded: _ended,
        h2events.StreamReset: _reset,
        h2events.TrailersReceived: _trailers,
        h2events.WindowUpdated: _window,
        h2events.ConnectionTerminated: _goaway,
        h2events.PingAckReceived: _pong,
    }

    # Bytes to the carrier

    def _flush(self) -> None:
        """Write what h2 has to send: straight to the socket when nothing is
        buffered before it (no reactor turn, no poller changes), the rest
        through the transport.  Inside :meth:`dataReceived`, once at its end."""
        if self._batching or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            if self.carrier_paused and not self.ending:
                self._unread += len(data)
                if self._unread > MAX_UNREAD:
                    self._calm(f"the peer made it answer {self._unread} bytes it does not read")
                    return
            write_now(self.stream, data)

    def pauseProducing(self) -> None:
        self.carrier_paused = True

    def resumeProducing(self) -> None:
        self.carrier_paused = False
        self._unread = 0
        self._serve_waiting()

    def stopProducing(self) -> None:
        pass  # the carrier's end arrives as connectionLost

    def _serve_waiting(self) -> None:
        """Let each waiting stream send what it may, in turn; one the
        carrier stopped in the middle goes to the back."""
        waiting = self._waiting
        for stream in list(waiting):
            if self.carrier_paused or self.closed:
                return
            waiting.pop(stream, None)
            if not stream.flush_queue() and stream.connected:
                waiting[stream] = None

    # Heartbeat

    def _heartbeat(self) -> None:
        self._beat = None
        if self.closed:
            return
        now = self.clock.seconds()
        if now - self.last_heard > DEAD_AFTER * self.heartbeat:
            self.log.warn("{name}: nothing heard for {silent:.1f} s; the carrier connection is dead, resetting "
                          "its {count} streams", name=self.name, silent=now - self.last_heard,
                          count=len(self.streams), event="carrier_dead")
            self.transport.abortConnection()
            return
        opaque = os.urandom(8)
        try:
            self.h2.ping(opaque)
        except H2Error:  # a GOAWAY went either way a heartbeat ago and the close has not finished
            self.transport.abortConnection()  # (a peer that does not read holds a loseConnection forever)
            return
        if len(self._ping_sent) < 8:
            self._ping_sent[opaque] = now
        self._flush()
        self._beat = self.clock.callLater(self.heartbeat, self._heartbeat)
