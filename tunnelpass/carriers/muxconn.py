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
at most :data:`MAX_HEADER_LIST` bytes (:mod:`tunnelpass.carriers.h2conn`
sets ``h2`` up; :mod:`tunnelpass.carriers.muxguard` bounds what HTTP/2
leaves open).  Anything ``h2`` calls a protocol error -- and a stream the
peer opens on the wrong side -- ends this carrier connection only: its
streams are reset, the relays behind them end abnormally.  A GOAWAY either
way ends it too (``h2`` sends nothing after one), but a stream complete on
the wire -- END_STREAM both ways -- is not cut: it delivers what it holds
to its user, then ends cleanly.  One stream's failure in the relay behind
it aborts that stream only.

Fairness: a stream's data goes out only within its window, and while the
carrier's own write buffer is full every stream waits in its queue; when
the carrier drains, waiting streams are served in turn (each sends what
its window allows), the one the carrier stopped going to the back.  A
bulk transfer therefore holds about one window of data ahead of another
stream's bytes.

Liveness: each side sends a PING every *heartbeat* seconds; a carrier
that has heard nothing for three heartbeats is dead and is aborted.
"""

from __future__ import annotations

import os

from h2 import events as h2events
from h2.exceptions import H2Error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from tunnelpass.carriers.h2conn import new_h2
from tunnelpass.carriers.muxguard import ENHANCE_YOUR_CALM, MAX_UNREAD, RESET_BURST, RESET_RATE, CarrierGuard
from tunnelpass.carriers.muxheaders import STATUS, StreamRefused, decode_open, encode_open
from tunnelpass.carriers.muxsend import CarrierSending
from tunnelpass.carriers.muxstream import NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, MuxStream
from tunnelpass.carriers.stream import IStream, write_now

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
#: A connection with fewer stream ids left opens no more (it retires and
#: the client dials a fresh one).
IDS_RESERVE = 1024


@implementer(IPushProducer)
class MuxConnection(CarrierSending, Protocol):
    """HTTP/2 on an authenticated carrier connection.

    *opener*: this side opens the streams (the HTTP/2 client).  *acceptor*
    is told of each stream the peer opens (the other side).  *on_lost(self,
    why)* runs once when the connection ends.  The counters
    (:attr:`opened`, :attr:`refused`, ``len(streams)``) feed the metrics."""

    log = Logger(namespace="tunnelpass.mux")

    @staticmethod
    def held_limit() -> int:
        return HELD_LIMIT

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
        self.guard = CarrierGuard(clock, RESET_BURST, RESET_RATE, MAX_UNREAD)
        self.goaway = False  # a GOAWAY went either way: h2 sends and takes nothing more
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
        self.h2 = new_h2(self.opener, max_streams=MAX_STREAMS, stream_window=STREAM_WINDOW,
                         connection_window=CONNECTION_WINDOW, max_frame=MAX_FRAME, max_header_list=MAX_HEADER_LIST)
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
        streams, self.streams = self.streams, {}
        for stream in list(streams.values()):
            if not (stream.read_ended and stream.write_ended):  # complete ones deliver what they hold
                stream.reset_received(None)
        self._waiting.clear()
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self, reason)

    @property
    def usable(self) -> bool:
        """Whether a new stream may be opened here now."""
        h2 = self.h2
        return (not self.closed and not self.retiring and not self.goaway and h2 is not None
                and len(self.streams) < h2.remote_settings.max_concurrent_streams and h2.ids_left() > IDS_RESERVE)

    def retire(self) -> None:
        """No new streams here; close the connection once the last one ends."""
        self.retiring = True
        if not self.streams:
            self.close()

    def close(self, code: int = NO_ERROR) -> None:
        """GOAWAY, then close after what is buffered."""
        if self.closed or self.transport is None:
            return
        self.retiring = True
        if not self.goaway:
            self.goaway = True
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
        if h2.ids_left() < IDS_RESERVE and not self.retiring:
            self.log.info("{name}: stream ids nearly used up; retiring it (a fresh one replaces it)",
                          name=self.name, event="carrier_retired")
            self.retiring = True  # closes once its last stream ends; the client dials another
        self._flush()
        return stream

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
        if self.goaway:
            return  # our GOAWAY crossed what the peer sent (a PING, a window update): nothing more to do
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
                    try:
                        handler(self, event)
                    except Exception:
                        self._stream_failed(event)
                if self.closed or self.goaway:
                    break
        finally:
            self._batching = False
            releasing, self._releasing = self._releasing, 0
        if self.closed or (self.goaway and not self.transport.connected):
            return
        if releasing and not self.goaway:
            self.h2.increment_flow_control_window(releasing)
        self._flush(answering=True)

    def _stream_failed(self, event) -> None:
        """The protocol behind one stream raised: that stream ends
        abnormally, the carrier and its other streams go on."""
        self.log.failure("{name}: handling {event} failed; resetting that stream", name=self.name,
                         event=type(event).__name__)
        stream = self.streams.get(getattr(event, "stream_id", None))
        if stream is not None:
            stream.abortConnection()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _request(self, event) -> None:
        stream_id = event.stream_id
        if self.opener:
            self._violation("a stream opened by the side that opens streams")  # h2 refuses pushes itself
            return
        if self.retiring or self.guard.refusing():
            self._refuse(stream_id)
            return
        try:
            kind, addresses = decode_open(event.headers)
        except StreamRefused as e:
            self.log.debug("{name}: stream refused: {why}", name=self.name, why=str(e))
            self._refuse(stream_id)
            return
        stream = self.streams[stream_id] = MuxStream(self, stream_id, opener=False)
        self.opened += 1
        if not self.acceptor.stream_accepted(kind, addresses, stream, b""):
            self.refused += 1

    def _refuse(self, stream_id: int) -> None:
        self.refused += 1
        try:
            self.h2.reset_stream(stream_id, REFUSED_STREAM)
        except H2Error:
            pass

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
            try:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except H2Error:
                pass
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
            if not self.opener and not stream.carried and self.guard.reset_before_data():
                self.log.warn("{name}: the peer resets streams before they carry anything faster than "
                              "{rate:g} a second (rapid reset, or users that connect and reset); refusing "
                              "new streams until that slows", name=self.name, rate=self.guard.rate,
                              event="carrier_abuse")

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
        self.retiring = self.goaway = True
        self.transport.loseConnection()  # h2 sends nothing after a GOAWAY: open streams cannot go on

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
        h2events.RemoteSettingsChanged: lambda self, event: self._serve_waiting(),  # new windows
    }

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
