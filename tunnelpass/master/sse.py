# -*- test-case-name: tests.test_master_sse -*-
"""``GET /events``: Server-Sent Events to each subscriber, bounded.

Each subscriber is a streaming producer on its own connection: while the
socket accepts bytes, frames are written straight through; when it pushes
back (the transport pauses its producer), frames queue here, and once the
queue exceeds *max_pending* bytes the subscriber is dropped (connection
aborted).  One slow dashboard therefore costs at most *max_pending* bytes
plus the transport's own buffer, and never slows the master or the other
subscribers.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

RETRY = b"retry: 1000\n\n"
KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_INTERVAL = 15.0


def rfc3339(seconds: float) -> str:
    """*seconds* (epoch) as RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def frame(type: str, time: float, instance: dict | None, logs: str | None = None) -> bytes:
    """One ``event: instance`` frame; ``logs`` only for type ``log``."""
    data = {"type": type, "time": rfc3339(time), "instance": instance}
    if type == "log":
        data["logs"] = logs if logs is not None else ""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return b"event: instance\ndata: " + text.encode("utf-8") + b"\n\n"


@implementer(IPushProducer)
class _Subscriber:
    """One event-stream response and its queue of unsent frames."""

    def __init__(self, hub: "EventHub", request):
        self.hub, self.request = hub, request
        self.channel = request.channel   # the request lets go of it when finished
        self.paused = False
        self.queue: list[bytes] = []
        self.pending = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.paused or self.queue:
            self.queue.append(data)
            self.pending += len(data)
            if self.pending > self.hub.max_pending:
                self.hub._drop(self)
            return
        self.request.write(data)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            data = self.queue.pop(0)
            self.pending -= len(data)
            self.request.write(data)

    def stopProducing(self):
        self.hub._forget(self)


class EventHub:
    """The subscribers of ``/events`` and what is published to them."""

    log = Logger()

    def __init__(self, clock, max_pending: int = 1 << 20):
        self.clock, self.max_pending = clock, max_pending
        self._subscribers: list[_Subscriber] = []
        self._keepalive = None

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, request, instances: list[dict]) -> None:
        """Answer *request* with an event stream: ``retry``, one
        ``initial`` frame per instance, then every published frame until
        the client leaves or :meth:`drop_all`."""
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store")
        sub = _Subscriber(self, request)
        request.registerProducer(sub, True)
        self._subscribers.append(sub)
        request.notifyFinish().addBoth(lambda _: self._forget(sub))
        now = self.clock.seconds()
        sub.send(RETRY + b"".join(frame("initial", now, item) for item in instances))
        if self._keepalive is None:
            self._keepalive = self.clock.callLater(KEEPALIVE_INTERVAL, self._tick)

    def publish(self, type: str, instance: dict | None, logs: str | None = None) -> None:
        """Send one frame to every subscriber."""
        if not self._subscribers:
            return
        data = frame(type, self.clock.seconds(), instance, logs)
        for sub in list(self._subscribers):
            sub.send(data)

    def drop_all(self) -> None:
        """Send each subscriber a ``shutdown`` frame, then end its stream
        and close its connection (key rotation, master shutdown)."""
        data = frame("shutdown", self.clock.seconds(), None)
        for sub in list(self._subscribers):
            queued = sub.queue
            self._forget(sub)
            request = sub.request
            try:
                request.unregisterProducer()
                for chunk in queued + [data]:
                    request.write(chunk)
                request.finish()
            finally:
                sub.channel.loseConnection()
        self._stop_keepalive()

    def _tick(self) -> None:
        self._keepalive = None
        for sub in list(self._subscribers):
            sub.send(KEEPALIVE)
        if self._subscribers:
            self._keepalive = self.clock.callLater(KEEPALIVE_INTERVAL, self._tick)

    def _drop(self, sub: _Subscriber) -> None:
        """A subscriber that cannot keep up: abort its connection."""
        self.log.warn("Event subscriber {peer} dropped: {pending} bytes unsent",
                      event="sse_subscriber_dropped", peer=str(sub.request.getClientAddress()),
                      pending=sub.pending)
        self._forget(sub)
        sub.channel.transport.abortConnection()

    def _forget(self, sub: _Subscriber) -> None:
        if sub.closed:
            return
        sub.closed = True
        sub.queue, sub.pending = [], 0
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        if not self._subscribers:
            self._stop_keepalive()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
