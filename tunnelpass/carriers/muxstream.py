# -*- test-case-name: tests.test_muxconn -*-
"""One stream of a multiplexed carrier connection, as an :class:`IStream`.

The relay, the pool dialer and the UDP sessions use it like any other
stream (:mod:`tunnelpass.carriers.stream`); what it maps to in HTTP/2:

* ``write`` -> DATA frames, within the stream's flow-control window.  What
  the window or a full carrier does not take waits here, and above
  :data:`HIGH_WATER` bytes the registered producer (the other leg of the
  relay) is paused: memory per stream is bounded on the sending side.
* ``pauseProducing`` -> received data is held and *not acknowledged*, so no
  WINDOW_UPDATE goes out and the peer's sender on this stream stops once
  the window (:data:`tunnelpass.carriers.muxconn.STREAM_WINDOW`) is used:
  a slow consumer stops only its own stream.
* ``loseWriteConnection`` -> END_STREAM after what is queued (a half-close:
  the other direction goes on); the peer's END_STREAM -> ``readConnectionLost``.
* ``abortConnection`` -> RST_STREAM(CANCEL): the far side ends its leg
  abnormally, never as a complete stream; the peer's RST_STREAM ->
  ``connectionLost`` with ``ConnectionLost``.
* ``loseConnection`` -> END_STREAM after the queue, then RST_STREAM(CANCEL)
  if the peer is still sending (as a closed TCP socket answers late data
  with an RST).

The stream has no socket of its own, so ``native_end()`` is None and the
relay joins it through Twisted's producer/consumer interfaces.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnelpass.carriers.stream import IStream, attach

#: Bytes queued in a stream (beyond what its window lets out) before its
#: producer is paused.
HIGH_WATER = 64 * 1024

# RST_STREAM codes (RFC 9113 section 7)
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 0, 1, 7, 8


@implementer(IStream)
class MuxStream:
    """A stream of *connection* (:class:`~tunnelpass.carriers.muxconn.MuxConnection`)
    with HTTP/2 id *stream_id*.  *opener*: this side opened it (and sends
    the request headers); else it answers with ``:status 200`` before its
    first DATA or END_STREAM."""

    half_closes = True
    #: Thousands of streams may be open at once: no per-instance dict.
    __slots__ = ("connection", "stream_id", "connected", "disconnecting", "carried", "protocol", "producer",
                 "_headers_sent", "_queue", "queued", "_end_after_queue", "_close_after_queue", "write_ended",
                 "read_ended", "paused", "_held", "_unacked", "_released", "producer_paused")

    def __init__(self, connection, stream_id: int, opener: bool):
        self.disconnecting = False
        self.carried = False  # the peer sent DATA on it (see MuxConnection's rapid-reset budget)
        self.protocol = None
        self.producer = None
        self.connection = connection
        self.stream_id = stream_id
        self.connected = True
        self._headers_sent = opener
        self._queue: list[bytes] = []  # data the window or the carrier did not take yet
        self.queued = 0
        self._end_after_queue = False  # loseWriteConnection / loseConnection asked for END_STREAM
        self._close_after_queue = False  # loseConnection: then the whole stream
        self.write_ended = False  # END_STREAM sent
        self.read_ended = False  # the peer's END_STREAM received
        self.paused = False  # our consumer paused us: hold received data
        self._held: list[bytes] = []
        self._unacked = 0  # received and delivered-or-held, not yet acknowledged
        self._released = 0  # of which the connection's window went back early
        self.producer_paused = False  # we paused our registered producer (queue over HIGH_WATER)

    # Twisted's transport interfaces

    def attach(self, protocol, data: bytes = b"") -> None:
        self.protocol = protocol
        attach(self, protocol, data)

    def write(self, data: bytes) -> None:
        if not data or self.write_ended or self._end_after_queue or not self.connected:
            return
        if self._queue:
            self._queue.append(data)
            self.queued += len(data)
        else:
            taken = self.connection.send(self, data)
            if taken < len(data):
                rest = data[taken:] if taken else data
                self._queue.append(rest)
                self.queued += len(rest)
        if self.queued > HIGH_WATER and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def flush_queue(self) -> bool:
        """Send what the window and the carrier take now (the connection
        calls this when either opens); True when the queue is empty."""
        queue = self._queue
        while queue:
            chunk = queue[0]
            taken = self.connection.send(self, chunk)
            self.queued -= taken
            if taken < len(chunk):
                queue[0] = chunk[taken:]
                break
            queue.pop(0)
        if self.producer_paused and self.queued <= HIGH_WATER // 2 and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        if not queue and self._end_after_queue:
            self._finish_writing()
        return not queue

    def _finish_writing(self) -> None:
        if self.write_ended or not self.connected:
            return
        self.write_ended = True
        self.connection.end_stream(self)
        if self._close_after_queue:
            if not self.read_ended:
                self.connection.reset_stream(self, CANCEL)  # the peer is still sending: as TCP's RST
            self.lost(error.ConnectionDone())
            return
        protocol = self.protocol
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.writeConnectionLost()

    def loseWriteConnection(self) -> None:
        if self.write_ended or self._end_after_queue or not self.connected:
            return
        self._end_after_queue = True
        if not self._queue:
            self._finish_writing()

    def loseConnection(self) -> None:
        if not self.connected or self._close_after_queue:
            return
        self.disconnecting = True
        self._close_after_queue = True
        if self.write_ended:
            if not self.read_ended:
                self.connection.reset_stream(self, CANCEL)
            self.lost(error.ConnectionDone())
            return
        self._end_after_queue = True
        if not self._queue:
            self._finish_writing()

    def abortConnection(self) -> None:
        if not self.connected:
            return
        self._queue.clear()
        self.queued = 0
        self.connection.reset_stream(self, CANCEL)
        self.lost(error.ConnectionAborted())

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        held, self._held = self._held, []
        for index, data in enumerate(held):
            if not self.connected:
                return  # ended by its protocol meanwhile: nothing more is delivered
            if self.paused:
                self._held = held[index:] + self._held
                break
            self.protocol.dataReceived(data)
        self._acknowledge()
        if not self.paused and self.read_ended and not self._held and self.connected:
            self._deliver_end()

    def stopProducing(self) -> None:
        self.abortConnection()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        if self.producer_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    def getPeer(self):
        return self.connection.transport.getPeer()

    def getHost(self):
        return self.connection.transport.getHost()

    def setTcpNoDelay(self, enabled) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return True

    # What a relay asks of a stream (IStream)

    @property
    def secured(self):
        return self.connection.stream.secured

    def consumer_paused(self) -> bool:
        return self.producer_paused

    def unsent(self) -> int:
        return self.queued

    def native_end(self):
        return None  # no socket of its own: the relay joins it through Twisted

    def set_write_buffer(self, size: int) -> None:
        pass  # the window and HIGH_WATER bound it; a datagram burst waits in the queue

    def local_fingerprint(self) -> bytes:
        return self.connection.stream.local_fingerprint()

    def peer_fingerprint(self) -> bytes:
        return self.connection.stream.peer_fingerprint()

    def peer_certificates(self) -> list:
        return self.connection.stream.peer_certificates()

    # Events from the connection

    def data_received(self, data: bytes, counted: int) -> None:
        """*data* arrived; *counted* bytes of window it used (padding included)."""
        if not self.connected or self.read_ended or self.protocol is None:
            self.connection.acknowledge(self, counted)
            return
        self._unacked += counted
        if self.paused:
            self._held.append(data)
            self._released += self.connection.release(counted)  # the other streams go on
            return
        self.protocol.dataReceived(data)
        self._acknowledge()

    def _acknowledge(self) -> None:
        if self._unacked and not self.paused and self.connected:
            count, self._unacked = self._unacked, 0
            self.connection.acknowledge(self, count)
            if self._released:
                self.connection.unhold(self._released)
                self._released = 0

    def end_received(self) -> None:
        self.read_ended = True
        if not self.paused and not self._held:
            self._deliver_end()

    def _deliver_end(self) -> None:
        protocol = self.protocol
        if self.write_ended and self._close_after_queue:
            return
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.readConnectionLost()
        else:
            self.loseConnection()

    def reset_received(self, code: int) -> None:
        """The peer reset the stream (or the carrier died: *code* None)."""
        if code == NO_ERROR and self.read_ended and self.write_ended:
            self.lost(error.ConnectionDone())
            return
        why = "carrier connection lost" if code is None else f"stream reset by the peer (HTTP/2 code {code})"
        self.lost(error.ConnectionLost(why))

    def lost(self, reason) -> None:
        """The stream is over for its protocol (once)."""
        if not self.connected:
            return
        self.connected = False
        self.disconnecting = False
        self._queue.clear()
        self._held.clear()
        if self._released:
            self.connection.unhold(self._released)
            self._released = 0
        self.queued = 0
        self.connection.forget(self)
        producer, self.producer = self.producer, None
        protocol, self.protocol = self.protocol, None
        if producer is not None:
            producer.stopProducing()
        if protocol is not None:
            protocol.connectionLost(Failure(reason))
