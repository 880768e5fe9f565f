# -*- test-case-name: tests.test_master_sse -*-
"""``GET /events``: frames, initial state, live publish, keep-alive, the
bounded queue of a slow subscriber, drop_all; over real loopback sockets
and over a StringTransport whose push-back the test controls."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tunnelpass.master import api, sse
from tunnelpass.master.auth import KeyHolder, hash_key
from tunnelpass.master.settings import MasterSettings
from tests.test_master_api import KEY, ApiServer, FakeRegistry

GET_EVENTS = (b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
              + KEY.encode() + b"\r\n\r\n")


def frames(raw: bytes) -> list[dict]:
    """The JSON data of every ``event: instance`` frame in *raw*."""
    out = []
    for block in raw.split(b"\n\n"):
        lines = block.split(b"\n")
        if b"event: instance" in lines:
            data = [line for line in lines if line.startswith(b"data: ")][0]
            out.append(json.loads(data[6:]))
    return out


async def until(predicate, what: str):
    for _ in range(300):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class FrameTests(SynchronousTestCase):
    def test_frame_layout(self):
        data = sse.frame("update", 0.5, {"id": "0123abcd", "alias": "é"})
        self.assertTrue(data.startswith(b"event: instance\ndata: {"))
        self.assertTrue(data.endswith(b"}\n\n"))
        self.assertEqual(data.count(b"\n"), 3)
        self.assertEqual(json.loads(data.split(b"data: ")[1]),
                         {"type": "update", "time": "1970-01-01T00:00:00.500Z",
                          "instance": {"id": "0123abcd", "alias": "é"}})

    def test_logs_only_for_log_events(self):
        body = json.loads(sse.frame("log", 0, {"id": "x"}, "line\nnext").split(b"data: ")[1])
        self.assertEqual(body["logs"], "line\nnext")
        self.assertNotIn(b"\nnext", sse.frame("log", 0, None, "line\nnext"))
        self.assertEqual(json.loads(sse.frame("log", 0, None).split(b"data: ")[1])["logs"], "")


class LiveTests(ApiServer, TestCase):
    """A subscriber over a real socket."""

    def setUp(self):
        self.start_server()
        self.registry.instances["0123abcd"] = {"id": "0123abcd", "url": "secret"}
        self.registry.instances["0123abce"] = {"id": "0123abce", "url": "secret"}

    async def subscribe(self):
        client = await self.connect()
        client.transport.write(GET_EVENTS)
        await until(lambda: len(frames(client.data)) == 2, "initial frames")
        return client

    async def test_stream_head_initial_frames_and_live_events(self):
        client = await self.subscribe()
        head, _, body = client.data.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: text/event-stream", head)
        self.assertIn(b"Cache-Control: no-cache", head)
        self.assertIn(b"retry: 1000\n\n", body)
        self.assertLess(body.index(b"retry: 1000"), body.index(b"event: instance"))
        initial = frames(client.data)
        self.assertEqual([f["type"] for f in initial], ["initial", "initial"])
        self.assertEqual({f["instance"]["id"] for f in initial}, {"0123abcd", "0123abce"})
        self.assertEqual({f["instance"]["url"] for f in initial}, {"masked"})
        self.assertEqual(len(self.hub), 1)

        self.hub.publish("update", {"id": "0123abcd", "status": "running"})
        self.hub.publish("log", {"id": "0123abcd"}, "hello")
        await until(lambda: len(frames(client.data)) == 4, "live frames")
        live = frames(client.data)[2:]
        self.assertEqual([f["type"] for f in live], ["update", "log"])
        self.assertEqual(live[1]["logs"], "hello")

        self.clock.advance(15)
        await until(lambda: b": keep-alive\n\n" in client.data, "keep-alive")

        client.transport.loseConnection()
        await client.closed
        await until(lambda: len(self.hub) == 0, "unsubscribe on close")
        self.assertEqual(self.clock.getDelayedCalls(), [])   # keep-alive stopped

    async def test_drop_all_sends_shutdown_then_closes(self):
        first, second = await self.subscribe(), await self.subscribe()
        self.assertEqual(len(self.hub), 2)
        self.hub.drop_all()
        for client in (first, second):
            await client.closed
            last = frames(client.data)[-1]
            self.assertEqual((last["type"], last["instance"]), ("shutdown", None))
        self.assertEqual(len(self.hub), 0)

    async def test_key_rotation_drops_subscribers(self):
        client = await self.subscribe()
        status, _, _ = await self.call("PATCH", "/instances/********", {"action": "restart"})
        self.assertEqual(status, 200)
        await client.closed
        self.assertEqual(frames(client.data)[-1]["type"], "shutdown")


class SlowSubscriberTests(SynchronousTestCase):
    """The transport's push-back is driven by hand: ``pauseProducing`` on
    the channel is what a full socket buffer does."""

    def setUp(self):
        self.clock = Clock()
        self.hub = sse.EventHub(self.clock, max_pending=1000)
        self.events = []
        self.hub.log = Logger(observer=self.events.append)
        keys = KeyHolder(hash_key(KEY))
        self.registry = FakeRegistry(keys)
        self.site = api.make_site(self.registry, self.hub, keys,
                                  MasterSettings(api_host="127.0.0.1"), self.clock)

    def subscriber(self):
        address = IPv4Address("TCP", "127.0.0.1", 5000 + len(self.hub))
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(GET_EVENTS)
        self.assertIn(b"retry: 1000", transport.value())
        return channel, transport

    def test_paused_subscriber_queues_then_flushes_in_order(self):
        channel, transport = self.subscriber()
        transport.clear()
        channel.pauseProducing()
        for n in range(5):
            self.hub.publish("update", {"n": n})
        self.assertEqual(transport.value(), b"")
        channel.resumeProducing()
        self.assertEqual([f["instance"]["n"] for f in frames(transport.value())], [0, 1, 2, 3, 4])
        self.assertFalse(transport.disconnected)

    def test_subscriber_over_max_pending_is_dropped_others_are_not(self):
        slow, slow_transport = self.subscriber()
        fast, fast_transport = self.subscriber()
        slow.pauseProducing()
        big = {"pad": "x" * 300}
        self.hub.max_pending = 3 * len(sse.frame("update", 0, big)) + 10
        for _ in range(3):
            self.hub.publish("update", big)
        self.assertFalse(slow_transport.disconnected)
        self.hub.publish("update", big)
        self.assertTrue(slow_transport.disconnected)
        self.assertEqual(len(self.hub), 1)
        self.assertEqual(self.events[0]["event"], "sse_subscriber_dropped")
        self.hub.publish("update", {"after": 1})
        self.assertEqual(len(frames(fast_transport.value())), 5)
        self.assertFalse(fast_transport.disconnected)

    def test_keepalive_stops_when_nobody_listens(self):
        channel, transport = self.subscriber()
        self.clock.advance(15)
        self.assertIn(b": keep-alive\n\n", transport.value())
        self.hub.drop_all()
        self.assertEqual([c for c in self.clock.getDelayedCalls()
                          if c.func == self.hub._tick], [])
        self.assertTrue(transport.disconnecting)
