# -*- test-case-name: tests.test_muxconn -*-
"""What a carrier connection sends: the outgoing half of
:class:`~tunnelpass.carriers.muxconn.MuxConnection`.

Streams hand their bytes here (:meth:`CarrierSending.send`): DATA frames
within the stream's flow-control window, nothing while the carrier's own
write buffer is full -- then the stream waits in turn, and
:meth:`CarrierSending._serve_waiting` lets the waiting streams send one
after another when it drains.  Received data is acknowledged here
(WINDOW_UPDATE), including the connection's share of what paused streams
hold (:meth:`CarrierSending.release`).  Everything ``h2`` has to send
leaves through :meth:`CarrierSending._flush`, straight to the socket when
nothing is buffered before it.
"""

from __future__ import annotations

from h2.exceptions import H2Error, StreamClosedError

from tunnelpass.carriers.muxheaders import OK
from tunnelpass.carriers.muxstream import MuxStream
from tunnelpass.carriers.stream import write_now


class CarrierSending:
    """The sending half of a carrier connection (a mixin of
    :class:`~tunnelpass.carriers.muxconn.MuxConnection`, whose state it
    uses: ``h2``, ``stream``, ``closed``, ``goaway``, ``carrier_paused``,
    ``held``, ``guard``).  *held_limit()* is the bound on what paused
    streams may hold beyond the connection window."""

    def send(self, stream: MuxStream, data: bytes) -> int:
        """DATA for *stream*, as much as its window and the carrier take
        now; the count taken (the rest waits in the stream's queue)."""
        if self.closed or self.goaway:
            return 0  # (it waits in the stream's queue until the carrier's end resets the stream)
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
        except H2Error:
            return 0  # the connection is ending: its end ends the stream
        if count < len(data):
            self._waiting[stream] = None
        self._flush()
        return count

    def end_stream(self, stream: MuxStream) -> None:
        if self.closed or self.goaway:
            return
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
        if self.closed or self.goaway:
            return
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except (StreamClosedError, H2Error):
            return
        self._flush()

    def acknowledge(self, stream: MuxStream, count: int) -> None:
        if self.closed or self.goaway:
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
        ``held_limit()`` that way).  Held until the stream resumed, the
        connection's window would be all held by CONNECTION_WINDOW /
        STREAM_WINDOW slow streams and every other stream would stall; the
        limit keeps what stalled streams hold bounded per connection too.
        (The stream's later acknowledgement cannot hand it back twice: h2
        caps the window at its size.)  Only ever called while the carrier's
        bytes are being handled: one WINDOW_UPDATE for the whole batch goes
        out with it (one per DATA frame would be a frame per datagram of a
        UDP stream)."""
        if not count or self.closed or self.goaway or self.held + count > self.held_limit():  # (END_STREAM: 0)
            return 0
        self.held += count
        self._releasing += count
        return count

    def unhold(self, count: int) -> None:
        """Data released early (:meth:`release`) was taken, or its stream ended."""
        self.held -= count

    # Bytes to the carrier

    def _flush(self, answering: bool = False) -> None:
        """Write what h2 has to send: straight to the socket when nothing is
        buffered before it (no reactor turn, no poller changes), the rest
        through the transport.  Inside :meth:`dataReceived`, once at its
        end (*answering*: what the peer's bytes made us send, counted
        against what it may leave unread while the carrier is full)."""
        if self._batching or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            if answering and self.carrier_paused and self.guard.answered(len(data)):
                self._calm(f"the peer made it answer {self.guard.unread} bytes it does not read")
                return
            write_now(self.stream, data)

    def pauseProducing(self) -> None:
        self.carrier_paused = True

    def resumeProducing(self) -> None:
        self.carrier_paused = False
        self.guard.drained()
        self._serve_waiting()

    def stopProducing(self) -> None:
        pass  # the carrier's end arrives as connectionLost

    def _serve_waiting(self) -> None:
        """Let each waiting stream send what it may, in turn; one the
        carrier stopped in the middle goes to the back."""
        waiting = self._waiting
        for stream in list(waiting):
            if self.carrier_paused or self.closed or self.goaway:
                return
            waiting.pop(stream, None)
            if not stream.flush_queue() and stream.connected:
                waiting[stream] = None
