# -*- test-case-name: tests.test_master_api -*-
"""The master's REST API over real loopback HTTP, with a small in-memory
registry standing in for tunnelpass.master.registry."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tunnelpass import __version__
from tunnelpass.master import api, openapi
from tunnelpass.master.auth import FailureLimiter, KeyHolder, hash_key, new_key
from tunnelpass.master.errors import ApiError
from tunnelpass.master.settings import MasterSettings
from tunnelpass.master.sse import EventHub

KEY = "k" * 64
STATIC = os.path.join(os.path.dirname(api.__file__), "static")


class FakeRegistry:
    """The design's Registry methods the API calls, in memory."""

    def __init__(self, keys: KeyHolder):
        self.keys = keys
        self.instances: dict[str, dict] = {}
        self.alias = ""
        self.next = 0x1a2b3c00
        self.hold: Deferred | None = None   # when set, create() answers with it

    def _new(self, alias, url):
        self.next += 1
        id = f"{self.next:08x}"
        self.instances[id] = {"id": id, "alias": alias, "type": url.split(":")[0],
                              "status": "running", "url": url, "config": url,
                              "restart": True, "meta": {"peer": {}, "tags": {}},
                              "mode": 0, "ping": 0, "pool": 0, "tcps": 0, "udps": 0,
                              "tcprx": 0, "tcptx": 0, "udprx": 0, "udptx": 0}
        return dict(self.instances[id])

    def _find(self, id):
        if id not in self.instances:
            raise ApiError(404, "Instance not found")
        return self.instances[id]

    def list(self):
        return [dict(i, url="masked") for i in self.instances.values()]

    def get(self, id):
        if id == "********":
            return {"id": "********", "type": "", "status": "running", "url": "********"}
        return dict(self._find(id))

    def create(self, alias, url):
        if not url.startswith(("server://", "client://")):
            raise ApiError(400, "URL scheme must be server:// or client://")
        if self.hold is not None:
            return self.hold.addCallback(lambda _: self._new(alias, url))
        return succeed(self._new(alias, url))

    def patch(self, id, body):
        if id == "********" and body.get("action") == "restart":
            key = new_key()
            self.keys.replace(hash_key(key))
            return succeed({"id": id, "type": "", "status": "running", "url": key})
        if id == "********":
            return succeed(self.get(id))
        instance = self._find(id)
        if "alias" in body:
            instance["alias"] = body["alias"]
        return succeed(dict(instance))

    def put(self, id, url):
        if id == "********":
            raise ApiError(403, "Forbidden: API Key")
        instance = self._find(id)
        if instance["url"] == url:
            raise ApiError(409, "Instance URL conflict")
        instance["url"] = url
        return succeed(dict(instance))

    def delete(self, id):
        if id == "********":
            raise ApiError(403, "Forbidden: API Key")
        self._find(id)
        del self.instances[id]
        return succeed(None)

    def info(self):
        return {"mid": "m1", "alias": self.alias, "ver": __version__}

    def set_alias(self, alias):
        self.alias = alias
        return succeed(None)

    def tcping(self, target):
        return succeed({"target": target, "connected": True, "latency": 3, "error": None})


class RawClient(Protocol):
    """Bytes in, kept; ``closed`` fires with all of them."""

    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(self.data)


def parse_response(raw: bytes):
    """(status, {lower-case name: value}, body) of one HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while body:
            size, _, body = body.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, body = out + body[:n], body[n + 2:]
        body = out
    return status, headers, body


class ApiServer:
    """A mixin: the site of :func:`api.make_site` on 127.0.0.1:0 with a
    fake registry, a recording hub, and helpers to talk to it."""

    settings = MasterSettings(api_host="127.0.0.1", api_port=0)

    def start_server(self, settings=None, hub=None):
        self.clock = Clock()
        self.keys = KeyHolder(hash_key(KEY))
        self.registry = FakeRegistry(self.keys)
        self.hub = hub if hub is not None else EventHub(self.clock)
        self.site = api.make_site(self.registry, self.hub, self.keys,
                                  settings or self.settings, self.clock)
        self.resource = self.site.resource
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self._stop)

    async def _stop(self):
        await self.port.stopListening()
        for _ in range(200):
            if self.site.live == 0:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{self.site.live} server connections left open")

    async def connect(self) -> RawClient:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, client)
        return client

    async def raw(self, data: bytes) -> bytes:
        client = await self.connect()
        client.transport.write(data)
        return await client.closed

    async def http(self, method, path, body=None, key=KEY, headers=None,
                   content_type="application/json", host=b"127.0.0.1"):
        """One request with ``Connection: close``: (status, headers, body)."""
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + host,
                 b"Connection: close"]
        if key is not None:
            lines.append(b"X-API-Key: " + key.encode())
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            if content_type:
                lines.append(b"Content-Type: " + content_type.encode())
            lines.append(b"Content-Length: %d" % len(data))
        else:
            data = b""
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}".encode())
        return parse_response(await self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + data))

    async def call(self, method, path, body=None, **kw):
        """:meth:`http` under the API base; the body parsed as JSON."""
        status, headers, raw = await self.http(method, self.settings.base + path, body, **kw)
        return status, headers, (json.loads(raw) if raw else None)


class RecordingHub:
    def __init__(self):
        self.dropped = 0

    def drop_all(self):
        self.dropped += 1


class RoutesTests(ApiServer, TestCase):
    """Every route and status code, NodePass's way."""

    def setUp(self):
        self.hub = RecordingHub()
        self.start_server(hub=self.hub)

    async def test_instance_lifecycle(self):
        status, headers, body = await self.call("GET", "/instances")
        self.assertEqual((status, body), (200, []))
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertNotIn("access-control-allow-origin", headers)

        status, _, created = await self.call("POST", "/instances",
                                             {"alias": "é", "url": "server://:1/127.0.0.1:2"})
        self.assertEqual(status, 201)
        self.assertEqual(created["alias"], "é")
        id = created["id"]
        status, _, listed = await self.call("GET", "/instances")
        self.assertEqual((status, [i["id"] for i in listed]), (200, [id]))
        status, _, got = await self.call("GET", f"/instances/{id}")
        self.assertEqual((status, got["url"]), (200, "server://:1/127.0.0.1:2"))
        status, _, patched = await self.call("PATCH", f"/instances/{id}", {"alias": "b"})
        self.assertEqual((status, patched["alias"]), (200, "b"))
        status, _, put = await self.call("PUT", f"/instances/{id}", {"url": "server://:3/127.0.0.1:2"})
        self.assertEqual((status, put["url"]), (200, "server://:3/127.0.0.1:2"))
        status, _, error = await self.call("PUT", f"/instances/{id}", {"url": "server://:3/127.0.0.1:2"})
        self.assertEqual((status, error), (409, {"error": "Instance URL conflict"}))
        status, headers, raw = await self.http("DELETE", f"/api/v1/instances/{id}")
        self.assertEqual((status, raw), (204, b""))
        for method, body in (("GET", None), ("PATCH", {}), ("PUT", {"url": "client://a:1"}),
                             ("DELETE", None)):
            status, _, error = await self.call(method, f"/instances/{id}", body)
            self.assertEqual((status, error), (404, {"error": "Instance not found"}), method)

    async def test_registry_errors_keep_their_status(self):
        status, _, error = await self.call("POST", "/instances", {"url": "http://x"})
        self.assertEqual((status, error), (400, {"error": "URL scheme must be server:// or client://"}))
        status, _, error = await self.call("DELETE", "/instances/********")
        self.assertEqual((status, error), (403, {"error": "Forbidden: API Key"}))

    async def test_answer_waits_for_a_deferred(self):
        self.registry.hold = Deferred()
        request = self.call("POST", "/instances", {"url": "client://a:1/b:2"})
        pending = Deferred.fromCoroutine(request)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(pending.called)
        self.registry.hold.callback(None)
        status, _, body = await pending
        self.assertEqual((status, body["url"]), (201, "client://a:1/b:2"))

    async def test_unexpected_error_is_500_and_logged(self):
        def broken():
            raise RuntimeError("bug")
        self.registry.info = broken
        status, _, error = await self.call("GET", "/info")
        self.assertEqual((status, error), (500, {"error": "Internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_method_not_allowed(self):
        status, headers, error = await self.call("DELETE", "/instances")
        self.assertEqual((status, error), (405, {"error": "Method not allowed"}))
        self.assertEqual(headers["allow"], "GET, POST")
        status, headers, _ = await self.call("POST", "/instances/0123abcd", {})
        self.assertEqual((status, headers["allow"]), (405, "GET, PUT, DELETE, PATCH"))

    async def test_not_found(self):
        # "/" and "/api" redirect to the dashboard (tests.test_master_dashboard).
        for path in ("/api/v1", "/api/v1/", "/api/v2/instances",
                     "/api/v1/nothing", "/api/v1/instances/0123abcd/x"):
            status, headers, raw = await self.http("GET", path)
            self.assertEqual((status, json.loads(raw)), (404, {"error": "Not found"}), path)
            self.assertEqual(headers["content-type"], "application/json; charset=utf-8")

    async def test_bad_ids(self):
        for id in ("XYZ", "0123456G", "0123abc", "0123abcde", "0123ABCD", "*******", "%2e%2e"):
            status, _, error = await self.call("GET", f"/instances/{id}")
            self.assertEqual((status, error), (400, {"error": "Invalid instance id"}), id)

    async def test_malformed_bodies(self):
        cases = [
            (b"[]", "request body must be an object"),
            (b"", "Invalid request body"),
            (b"{", "Invalid request body"),
            (b'{"url": "client://a:1", "url": "client://b:1"}', "Invalid request body"),
            (b'{"url": NaN}', "Invalid request body"),
            (b'{"url": "client://a:1", "alias": Infinity}', "Invalid request body"),
            (b'{"alias": "\\ud800", "url": "client://a:1"}', "Invalid request body"),
            (b'\xff\xfe{}', "Invalid request body"),
            (b'{"a":' * 40 + b"1" + b"}" * 40, "Invalid request body"),
            (b'[' * 20000, "Invalid request body"),
            (json.dumps({"alias": "a" * 257, "url": "client://a:1"}).encode(),
             "alias exceeds maximum length 256"),
            (json.dumps({"url": "client://a:1/" + "b" * 2048}).encode(),
             "url exceeds maximum length 2048"),
            (b'{"url": "client://a:1", "extra": 1}', "Unknown field: extra"),
            (b'{"alias": "a"}', "url is required"),
            (b'{"url": 5}', "url must be a string"),
        ]
        for raw, message in cases:
            status, _, error = await self.call("POST", "/instances", raw)
            self.assertEqual((status, error), (400, {"error": message}), raw[:40])
        self.assertEqual(self.registry.instances, {})

    async def test_patch_body_checks(self):
        _, _, created = await self.call("POST", "/instances", {"url": "client://a:1/b:2"})
        path = f"/instances/{created['id']}"
        cases = [
            ({"action": "explode"}, "Invalid action: explode"),
            ({"restart": "yes"}, "restart must be a boolean"),
            ({"meta": {"peer": {"sid": "s" * 257}}}, "meta.peer.sid exceeds maximum length 256"),
            ({"meta": {"tags": {"k" * 257: "v"}}}, "meta.tags.key exceeds maximum length 256"),
            ({"meta": {"tags": {"k": "v" * 257}}}, "meta.tags.k exceeds maximum length 256"),
            ({"meta": {"tags": {"k": 1}}}, "meta.tags.k must be a string"),
            ({"meta": {"other": 1}}, "Unknown field: meta.other"),
        ]
        for body, message in cases:
            status, _, error = await self.call("PATCH", path, body)
            self.assertEqual((status, error), (400, {"error": message}), body)
        status, _, error = await self.call("POST", "/info", {"alias": "a" * 257})
        self.assertEqual((status, error), (400, {"error": "alias exceeds maximum length 256"}))

    async def test_content_type_must_be_json(self):
        for content_type in ("text/plain", "", "application/jsonx"):
            status, _, error = await self.call("POST", "/instances", b"{}",
                                               content_type=content_type)
            self.assertEqual(status, 415, content_type)
            self.assertEqual(error, {"error": "Content-Type must be application/json"})
        status, _, _ = await self.call("POST", "/info", {"alias": "x"},
                                       content_type="Application/JSON; charset=utf-8")
        self.assertEqual(status, 200)
        # curl -d without -H Content-Type (NodePass's documented examples): read as JSON, checked as JSON.
        status, _, _ = await self.call("POST", "/info", {"alias": "y"},
                                       content_type="application/x-www-form-urlencoded")
        self.assertEqual(status, 200)
        status, _, error = await self.call("POST", "/info", b"alias=y",
                                           content_type="application/x-www-form-urlencoded")
        self.assertEqual(status, 400)

    async def test_body_over_64_kib_is_413(self):
        status, headers, raw = await self.http("POST", "/api/v1/instances",
                                               b"{" + b" " * (64 * 1024) + b"}")
        self.assertEqual((status, json.loads(raw)), (413, {"error": "Request body too large"}))
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")

    async def test_body_over_64_kib_sent_slowly_in_chunks_is_413(self):
        client = await self.connect()
        client.transport.write(b"POST /api/v1/instances HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"X-API-Key: " + KEY.encode() + b"\r\nContent-Type: "
                               b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        for _ in range(5):
            if client.data:
                break
            client.transport.write(chunk)
            await deferLater(reactor, 0.02, lambda: None)
        status, _, raw = parse_response(await client.closed)
        self.assertEqual((status, json.loads(raw)), (413, {"error": "Request body too large"}))

    async def test_tcping(self):
        status, _, error = await self.call("GET", "/tcping")
        self.assertEqual((status, error), (400, {"error": "Target address required"}))
        status, _, error = await self.call("GET", "/tcping?target=")
        self.assertEqual((status, error), (400, {"error": "Target address required"}))
        status, _, error = await self.call("GET", "/tcping?target=" + "a" * 257)
        self.assertEqual((status, error), (400, {"error": "target exceeds maximum length 256"}))
        status, _, result = await self.call("GET", "/tcping?target=127.0.0.1:22")
        self.assertEqual((status, result["target"], result["connected"]), (200, "127.0.0.1:22", True))

    async def test_info(self):
        status, _, info = await self.call("GET", "/info")
        self.assertEqual((status, info["mid"]), (200, "m1"))
        status, _, info = await self.call("POST", "/info", {"alias": "edge"})
        self.assertEqual((status, info["alias"]), (200, "edge"))

    async def test_key_rotation_drops_subscribers_and_changes_the_key(self):
        status, _, other = await self.call("PATCH", "/instances/********", {"alias": "x"})
        self.assertEqual((status, self.hub.dropped), (200, 0))
        status, _, answer = await self.call("PATCH", "/instances/********", {"action": "restart"})
        self.assertEqual(status, 200)
        self.assertEqual(self.hub.dropped, 1)
        status, _, _ = await self.call("GET", "/instances")
        self.assertEqual(status, 401)
        status, _, _ = await self.call("GET", "/instances", key=answer["url"])
        self.assertEqual(status, 200)


class AuthTests(ApiServer, TestCase):
    def setUp(self):
        self.start_server()

    async def test_key_required_everywhere_but_public_routes(self):
        for method, path, body in (("GET", "/instances", None), ("POST", "/instances", {}),
                                   ("GET", "/instances/0123abcd", None),
                                   ("DELETE", "/instances/0123abcd", None),
                                   ("GET", "/events", None), ("GET", "/info", None),
                                   ("POST", "/info", {}), ("GET", "/tcping?target=a:1", None)):
            status, _, error = await self.call(method, path, body, key=None)
            self.assertEqual((status, error), (401, {"error": "Unauthorized: API key required"}), path)
            status, _, error = await self.call(method, path, body, key="wrong")
            self.assertEqual((status, error), (401, {"error": "Unauthorized: Invalid API key"}), path)
        for path in ("/openapi.json", "/docs", "/docs/docs.js", "/docs/docs.css"):
            status, _, _ = await self.http("GET", "/api/v1" + path, key=None)
            self.assertEqual(status, 200, path)

    async def test_failed_keys_are_limited_per_source_then_recover(self):
        for _ in range(10):
            status, _, _ = await self.call("GET", "/info", key="wrong")
            self.assertEqual(status, 401)
        status, headers, error = await self.call("GET", "/info", key="wrong")
        self.assertEqual((status, error), (429, {"error": "Too many failed API keys; retry later"}))
        self.assertEqual(headers["retry-after"], "60")
        # The right key is never refused: everyone on 127.0.0.1 shares the source.
        status, _, _ = await self.call("GET", "/info")
        self.assertEqual(status, 200)
        # No key at all is not a guess: 401, not 429.
        status, _, error = await self.call("GET", "/info", key=None)
        self.assertEqual((status, error), (401, {"error": "Unauthorized: API key required"}))
        self.clock.advance(59)
        status, headers, _ = await self.call("GET", "/info", key="wrong")
        self.assertEqual((status, headers["retry-after"]), (429, "1"))
        self.clock.advance(61)  # the window slid past every wrong key
        status, _, _ = await self.call("GET", "/info", key="wrong")
        self.assertEqual(status, 401)

    async def test_only_key_holders_keep_their_connection(self):
        """A keyless or wrong-key answer closes its connection (keyless
        clients cannot hold the connection slots); the right key keeps it."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for key, closes in ((None, True), ("wrong", True), (KEY, False)):
            client = await self.connect()
            lines = [b"GET /api/v1/info HTTP/1.1", b"Host: 127.0.0.1"]
            if key is not None:
                lines.append(b"X-API-Key: " + key.encode())
            client.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
            for _ in range(100):
                if client.closed.called or b"\r\n\r\n" in client.data:
                    break
                await deferLater(reactor, 0.01)
            await deferLater(reactor, 0.1)
            self.assertEqual(client.closed.called, closes, key)
            if not closes:
                client.transport.loseConnection()
                await client.closed
        _, answer, _ = await self.http("GET", "/api/v1/openapi.json", key=None)
        self.assertEqual(answer.get("connection"), "close")

    async def test_head_has_no_body(self):
        """HEAD answers carry no body (Twisted would log a warning, with the
        caller's URI, for every one that did)."""
        status, headers, raw = await self.http("HEAD", "/api/v1/openapi.json")
        self.assertEqual((status, raw), (405, b""))
        status, headers, raw = await self.http("HEAD", "/api/")
        self.assertEqual((status, raw), (200, b""))
        self.assertGreater(int(headers["content-length"]), 100)


class KeyTests(SynchronousTestCase):
    def test_new_key_and_hash(self):
        key = new_key()
        self.assertEqual(len(key), 64)
        int(key, 16)
        self.assertNotEqual(key, new_key())
        self.assertEqual(hash_key("abc"),
                         "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")

    def test_key_holder(self):
        holder = KeyHolder(hash_key("one"))
        self.assertTrue(holder.check("one"))
        for wrong in ("two", "", "one ", "\udcff"):
            self.assertFalse(holder.check(wrong))
        holder.replace(hash_key("two"))
        self.assertFalse(holder.check("one"))
        self.assertTrue(holder.check("two"))
        self.assertFalse(KeyHolder("").check(""))


class LimiterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.limiter = FailureLimiter(self.clock, limit=3, window=60, max_sources=2)
        self.limiter.log = Logger(observer=self.events.append)

    def test_window_slides(self):
        for _ in range(3):
            self.assertIsNone(self.limiter.retry_after("a"))
            self.limiter.failed("a", "invalid key")
            self.clock.advance(10)
        self.assertEqual(self.limiter.retry_after("a"), 30)
        self.assertIsNone(self.limiter.retry_after("b"))
        self.clock.advance(30)
        self.assertIsNone(self.limiter.retry_after("a"))

    def test_table_is_bounded_oldest_evicted(self):
        for source in ("a", "b", "c"):
            for _ in range(3):
                self.limiter.failed(source, "invalid key")
        self.assertEqual(len(self.limiter), 2)
        self.assertIsNone(self.limiter.retry_after("a"))
        self.assertIsNotNone(self.limiter.retry_after("c"))

    def test_log_is_throttled_with_a_count(self):
        for _ in range(5):
            self.limiter.failed("a", "invalid key")
            self.clock.advance(1)
        self.assertEqual([e["count"] for e in self.events], [1])
        self.assertEqual(self.events[0]["event"], "api_key_rejected")
        self.clock.advance(10)
        self.limiter.failed("a", "invalid key")
        self.assertEqual([e["count"] for e in self.events], [1, 5])


class LimiterSourceTests(SynchronousTestCase):
    def test_sources_are_addresses_or_ipv6_64s(self):
        from tunnelpass.master.auth import source_key

        self.assertEqual(source_key("127.0.0.1"), "127.0.0.1")
        self.assertEqual(source_key("::ffff:10.1.2.3"), "10.1.2.3")
        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        limiter = FailureLimiter(Clock(), limit=2)
        limiter.log = Logger(observer=lambda e: None)
        limiter.failed("2001:db8:1:2::1", "invalid key")
        limiter.failed("2001:db8:1:2::ffff", "invalid key")  # same /64: one source
        self.assertIsNotNone(limiter.retry_after("2001:db8:1:2::77"))
        self.assertIsNone(limiter.retry_after("2001:db8:1:3::1"))

    def test_log_lines_are_capped_for_all_sources_together(self):
        events = []
        clock = Clock()
        limiter = FailureLimiter(clock, max_lines=3)
        limiter.log = Logger(observer=events.append)
        for n in range(50):
            limiter.failed(f"10.0.0.{n}", "invalid key")
        self.assertEqual(len(events), 3)
        clock.advance(10)
        limiter.failed("10.0.0.40", "invalid key")
        self.assertEqual(events[-1]["count"], 2)  # its unlogged failure carried over


class CorsAndHostTests(ApiServer, TestCase):
    async def test_cors_off_by_default(self):
        self.start_server()
        status, headers, _ = await self.call("GET", "/info", headers={"Origin": "https://a.example"})
        self.assertEqual(status, 200)
        self.assertFalse([h for h in headers if h.startswith("access-control")])
        status, _, _ = await self.call("OPTIONS", "/info", headers={"Origin": "https://a.example"})
        self.assertEqual(status, 405)

    async def test_cors_echoes_a_configured_origin_only(self):
        self.start_server(MasterSettings(api_host="127.0.0.1", cors=("https://dash.example",)))
        status, headers, _ = await self.call("GET", "/info", headers={"Origin": "https://dash.example"})
        self.assertEqual(headers["access-control-allow-origin"], "https://dash.example")
        self.assertEqual(headers["vary"], "Origin")
        status, headers, _ = await self.call("GET", "/info", headers={"Origin": "https://evil.example"})
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertEqual(headers["vary"], "Origin")
        status, headers, raw = await self.http("OPTIONS", "/api/v1/instances/0123abcd", key=None,
                                               headers={"Origin": "https://dash.example"})
        self.assertEqual(status, 204)
        self.assertEqual(headers["access-control-allow-methods"], "GET, PUT, DELETE, PATCH")
        self.assertEqual(headers["access-control-allow-headers"], "Content-Type, X-API-Key")
        self.assertNotEqual(headers["access-control-allow-origin"], "*")

    async def test_loopback_api_checks_host(self):
        self.start_server()
        for host in (b"evil.example", b"evil.example:9090", b"127.0.0.1.evil.example",
                     b"localhost.evil", b"[::2]"):
            status, headers, raw = await self.http("GET", "/api/v1/openapi.json", host=host)
            self.assertEqual(status, 403, host)
            self.assertEqual(json.loads(raw), {"error": "Forbidden: Host must name a loopback address"})
            self.assertEqual(headers["x-content-type-options"], "nosniff")
        for host in (b"localhost", b"localhost:9090", b"127.0.0.1:1", b"127.9.8.7", b"[::1]:9090"):
            status, _, _ = await self.http("GET", "/api/v1/info", host=host)
            self.assertEqual(status, 200, host)
        status, _, _ = await self.raw_no_host()
        self.assertEqual(status, 403)

    async def raw_no_host(self):
        return parse_response(await self.raw(b"GET /api/v1/info HTTP/1.0\r\nX-API-Key: "
                                             + KEY.encode() + b"\r\n\r\n"))

    async def test_non_loopback_api_does_not_check_host(self):
        self.start_server(MasterSettings(api_host="0.0.0.0"))
        status, _, _ = await self.http("GET", "/api/v1/info", host=b"evil.example")
        self.assertEqual(status, 200)


class DocumentTests(ApiServer, TestCase):
    def setUp(self):
        self.start_server()

    async def test_served_document(self):
        status, headers, doc = await self.call("GET", "/openapi.json", key=None)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(doc["openapi"], "3.1.0")
        self.assertEqual(doc["info"]["version"], __version__)
        self.assertEqual(doc["servers"], [{"url": "/api/v1"}])
        self.assertLessEqual({"Instance", "Error", "Info", "TcpingResult", "Event"},
                             set(doc["components"]["schemas"]))
        self.assertEqual(doc["components"]["securitySchemes"]["ApiKey"],
                         {"type": "apiKey", "in": "header", "name": "X-API-Key"})

    def test_router_serves_exactly_the_document(self):
        doc = self.resource.document
        documented = {(m.upper(), path) for path, item in doc["paths"].items()
                      for m in openapi.METHODS if m in item}
        served = {(m, r.template) for r in self.resource.routes for m in r.operations}
        self.assertEqual(served, documented)
        ids = [op[0] for r in self.resource.routes for op in r.operations.values()]
        self.assertEqual(len(ids), len(set(ids)))
        for op_id in ids:
            self.assertIsNotNone(self.resource.handler(op_id), op_id)
        handlers = {name[3:] for name in dir(self.resource) if name.startswith("op_")}
        self.assertEqual(handlers, set(ids))

    def test_document_declares_bodies_limits_and_errors(self):
        doc = self.resource.document
        schemas = doc["components"]["schemas"]
        for name in ("CreateInstance", "PutInstance", "PatchInstance", "SetAlias"):
            self.assertIs(schemas[name]["additionalProperties"], False, name)
        self.assertEqual(schemas["CreateInstance"]["properties"]["url"]["maxLength"], 2048)
        self.assertEqual(schemas["CreateInstance"]["properties"]["alias"]["maxLength"], 256)
        for path, item in doc["paths"].items():
            for method in openapi.METHODS:
                op = item.get(method)
                if op is None:
                    continue
                codes = set(op["responses"])
                self.assertIn("403", codes, op["operationId"])
                if op.get("security") != []:
                    self.assertLessEqual({"401", "429"}, codes, op["operationId"])
                if "requestBody" in op:
                    self.assertLessEqual({"400", "413", "415"}, codes, op["operationId"])
                if "{id}" in path:
                    self.assertLessEqual({"400", "404"}, codes, op["operationId"])

    def test_document_follows_the_prefix(self):
        resource = api.ApiResource(None, None, None, MasterSettings(prefix="/np/"), Clock())
        self.assertEqual(resource.document["servers"], [{"url": "/np/v1"}])

    async def test_docs_page_is_local_with_csp(self):
        status, headers, page = await self.http("GET", "/api/v1/docs", key=None)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(headers["content-security-policy"], "default-src 'self'")
        self.assertIn(b'src="docs/docs.js"', page)
        for asset, kind in (("docs.js", "text/javascript; charset=utf-8"),
                            ("docs.css", "text/css; charset=utf-8")):
            status, headers, _ = await self.http("GET", "/api/v1/docs/" + asset, key=None)
            self.assertEqual((status, headers["content-type"]), (200, kind))
        for asset in ("docs.html", "..", "x.js"):
            status, _, _ = await self.http("GET", "/api/v1/docs/" + asset, key=None)
            self.assertEqual(status, 404, asset)

    def test_static_files_name_no_external_url_and_no_inline_script(self):
        for name in os.listdir(STATIC):
            with open(os.path.join(STATIC, name), encoding="utf-8") as f:
                text = f.read().lower()
            self.assertNotIn("http://", text, name)
            self.assertNotIn("https://", text, name)
            self.assertNotIn("//cdn", text, name)
        with open(os.path.join(STATIC, "docs.html"), encoding="utf-8") as f:
            page = f.read()
        self.assertNotIn("<script>", page)
        self.assertNotIn("onload=", page)


class ParserTests(SynchronousTestCase):
    def test_json_depth_skips_strings(self):
        self.assertEqual(api.json_depth('{"a": "[[[[{{", "b": [1, [2]]}'), 3)
        self.assertEqual(api.json_depth('"\\"[["'), 0)

    def test_compact_utf8_output(self):
        self.assertEqual(api.dumps({"a": "é", "b": [1]}), '{"a":"é","b":[1]}'.encode())
        self.assertEqual(api.dumps({"a": "\ud800"}), b'{"a":"\\ud800"}')
