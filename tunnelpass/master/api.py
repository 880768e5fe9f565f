# -*- test-case-name: tests.test_master_api -*-
"""The master's REST API (NodePass's routes, status codes and JSON names):
routing from the OpenAPI document, the loopback ``Host`` check, the API
key, CORS, strict JSON bodies, and dispatch to the registry.

Order of checks for every request: ``Host`` (403), the route (404, 405),
the source's failed-key limit (429), the key (401), the path id (400), the
body (415, 413, 400); then the handler, whose :class:`ApiError` becomes
``{"error": message}`` with its status.  Handlers may answer with a
Deferred; the response is written when it fires, unless the client left.
The dashboard's paths (``{prefix}/``, ``{prefix}/ui/*``, ``/``) are answered
by :mod:`tunnelpass.master.dashboard` right after the ``Host`` check.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tunnelpass import __version__
from tunnelpass.master import httpguard
from tunnelpass.master.auth import FailureLimiter
from tunnelpass.master.dashboard import HEADERS as DASHBOARD_HEADERS, Dashboard, load_files
from tunnelpass.master.errors import ApiError
from tunnelpass.master.openapi import STRING, build_document, check_body, routes

API_KEY_ID = "********"
MAX_DEPTH = 32
_ID = re.compile(r"^([0-9a-f]{8}|\*{8})$")
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_ASSETS = {"docs.js": b"text/javascript; charset=utf-8",
           "docs.css": b"text/css; charset=utf-8"}
_CSP = b"default-src 'self'"
_STREAMING = object()   # a handler that answers the request itself (events)


def dumps(value) -> bytes:
    """Compact UTF-8 JSON (``\\u`` escapes only if a string cannot be UTF-8)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _reject_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in *text* (strings and
    their escapes skipped), found without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_body(raw: bytes):
    """A request body as JSON, strictly: UTF-8, no duplicate keys, no
    NaN/Infinity, nesting at most ``MAX_DEPTH``, no lone surrogates.
    Raises ``ApiError(400)``."""
    try:
        text = raw.decode("utf-8")
        if json_depth(text) > MAX_DEPTH:
            raise ValueError("nested too deeply")
        value = json.loads(text, object_pairs_hook=_reject_duplicates,
                           parse_constant=_reject_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError):
        raise ApiError(400, "Invalid request body") from None
    return value


#: Body types read as JSON.  ``curl -d '{...}'`` without ``-H Content-Type``
#: sends the form type, and NodePass's own documented API examples do just
#: that, so it is accepted when the body is a JSON object (it still must
#: parse as one).  Accepting it opens no cross-site hole: a browser form can
#: send that type without a CORS preflight, but never the ``X-API-Key``
#: header every body-carrying route requires.
JSON_BODY_TYPES = (b"application/json", b"application/x-www-form-urlencoded")


class ApiResource(Resource):
    """The whole site: the API under ``settings.base``, JSON 404 elsewhere."""

    isLeaf = True
    log = Logger()

    def __init__(self, registry, hub, keys, settings, clock):
        super().__init__()
        self.registry, self.hub, self.keys = registry, hub, keys
        self.settings, self.clock = settings, clock
        self.base = settings.base
        self.document = build_document(self.base, __version__)
        self._document_json = dumps(self.document)
        self.routes = routes(self.document)
        self.limiter = FailureLimiter(clock)
        self.dashboard = Dashboard(settings.prefix)
        self._static = load_files(_STATIC, ("docs.html", *_ASSETS))

    def handler(self, operation_id: str):
        """The method answering *operation_id* (``op_<operationId>``)."""
        return getattr(self, "op_" + operation_id, None)

    # -- the request path ---------------------------------------------------

    def render(self, request):
        for name, value in httpguard.SECURITY_HEADERS:
            request.setHeader(name, value)
        path = request.path.decode("utf-8", "replace")
        dashboard = self.dashboard.owns(path)
        if dashboard:
            for name, value in DASHBOARD_HEADERS:
                request.setHeader(name, value)
        try:
            body = self._route(request, path, dashboard)
        except ApiError as e:
            body = self._error(request, e.status, e.message)
        if not getattr(request, "authenticated", False):
            _close_after(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            request.setHeader(b"Content-Length", str(len(body)).encode())
            return b""  # HEAD: the headers of GET, no body
        return body

    def _route(self, request, path: str, dashboard: bool):
        if self.settings.loopback and not httpguard.host_is_loopback(request.getHeader(b"host")):
            raise ApiError(403, "Forbidden: Host must name a loopback address")
        if dashboard:
            return self._dashboard(request, path)
        cors = self._cors(request)
        if not path.startswith(self.base + "/"):
            raise ApiError(404, "Not found")
        rest = path[len(self.base):]
        for route in self.routes:
            params = route.match(rest)
            if params is not None:
                break
        else:
            raise ApiError(404, "Not found")
        method = request.method.decode("ascii", "replace")
        allowed = ", ".join(route.operations)
        if method == "OPTIONS" and cors:
            return self._preflight(request, allowed)
        if method not in route.operations:
            request.setHeader(b"Allow", allowed.encode())
            raise ApiError(405, "Method not allowed")
        operation_id, public, body_schema = route.operations[method]
        if not public:
            self._authenticate(request)
        params = {name: unquote(value) for name, value in params.items()}
        if "id" in params and not _ID.match(params["id"]):
            raise ApiError(400, "Invalid instance id")
        body = self._body(request, body_schema) if body_schema is not None else None
        return self._dispatch(request, self.handler(operation_id), params, body)

    def _dashboard(self, request, path: str) -> bytes:
        """A dashboard file, or the redirect to it (after the Host check)."""
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            raise ApiError(405, "Method not allowed")
        status, headers, body = self.dashboard.answer(path)
        if body is None:
            raise ApiError(404, "Not found")
        request.setResponseCode(status)
        for name, value in headers:
            request.setHeader(name, value)
        return body

    def _cors(self, request) -> bool:
        """CORS headers when the Origin is one of ``settings.cors``."""
        if not self.settings.cors:
            return False
        request.setHeader(b"Vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is None or origin.decode("latin-1") not in self.settings.cors:
            return False
        request.setHeader(b"Access-Control-Allow-Origin", origin)
        return True

    def _preflight(self, request, allowed: str):
        request.setResponseCode(204)
        request.setHeader(b"Access-Control-Allow-Methods", allowed.encode())
        request.setHeader(b"Access-Control-Allow-Headers", b"Content-Type, X-API-Key")
        request.setHeader(b"Access-Control-Max-Age", b"600")
        return b""

    def _authenticate(self, request) -> None:
        """The right key always passes (see FailureLimiter: refusing it from
        a limited source would let anyone sharing the address lock the
        operator out); a missing key is 401; a wrong one is counted, and
        429 once its source is over the limit."""
        presented = request.getHeader(b"x-api-key")
        if presented and self.keys.check(presented.decode("latin-1")):
            request.authenticated = True
            return
        if not presented:
            raise ApiError(401, "Unauthorized: API key required")
        source = getattr(request.getClientAddress(), "host", "") or ""
        wait = self.limiter.retry_after(source)
        self.limiter.failed(source, "invalid key")
        if wait is not None:
            request.setHeader(b"Retry-After", str(wait).encode())
            raise ApiError(429, "Too many failed API keys; retry later")
        raise ApiError(401, "Unauthorized: Invalid API key")

    def _body(self, request, schema: dict):
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind not in JSON_BODY_TYPES:
            raise ApiError(415, "Content-Type must be application/json")
        request.content.seek(0)
        raw = request.content.read(httpguard.MAX_BODY + 1)
        if len(raw) > httpguard.MAX_BODY:
            raise ApiError(413, "Request body too large")
        value = parse_body(raw)
        problem = check_body(schema, value)
        if problem:
            raise ApiError(400, problem)
        return value

    def _dispatch(self, request, handler, params, body):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = maybeDeferred(handler, request, params, body)

        def answer(result):
            if result is _STREAMING or gone:
                return
            status, payload, *after = result
            self._json(request, status, payload)
            for action in after:
                action()

        def failed(failure):
            if gone:
                return
            if failure.check(ApiError):
                request.write(self._error(request, failure.value.status, failure.value.message))
                request.finish()
                return
            self.log.failure("API request {method} {path} failed", failure,
                             method=request.method.decode("ascii", "replace"),
                             path=request.path.decode("utf-8", "replace"),
                             event="api_internal_error")
            request.write(self._error(request, 500, "Internal error"))
            request.finish()

        d.addCallback(answer).addErrback(failed)
        return NOT_DONE_YET

    # -- writing ------------------------------------------------------------

    def _json(self, request, status: int, payload) -> None:
        """Write *payload* (JSON, or bytes whose type the handler set)."""
        request.setResponseCode(status)
        if status == 204:
            request.finish()
            return
        if isinstance(payload, bytes):
            data = payload
        else:
            data = dumps(payload)
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(data)).encode())
        request.write(data)
        request.finish()

    def _error(self, request, status: int, message: str) -> bytes:
        """Set *status* and the JSON type; the ``{"error": message}`` body."""
        request.setResponseCode(status, _PHRASES.get(status))
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return dumps({"error": message})

    def _file(self, request, name: str, kind: bytes):
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"Content-Security-Policy", _CSP)
        return 200, self._static[name]

    # -- operations (one per operationId of the document) -------------------

    def op_listInstances(self, request, params, body):
        return 200, self.registry.list()

    def op_createInstance(self, request, params, body):
        d = maybeDeferred(self.registry.create, body.get("alias", ""), body["url"])
        return d.addCallback(lambda instance: (201, instance))

    def op_getInstance(self, request, params, body):
        return 200, self.registry.get(params["id"])

    def op_patchInstance(self, request, params, body):
        rotate = params["id"] == API_KEY_ID and body.get("action") == "restart"
        d = maybeDeferred(self.registry.patch, params["id"], body)
        if rotate:
            # NodePass drops every event subscriber once the key changed:
            # they authenticated with the old one.
            return d.addCallback(lambda instance: (200, instance, self.hub.drop_all))
        return d.addCallback(lambda instance: (200, instance))

    def op_putInstance(self, request, params, body):
        d = maybeDeferred(self.registry.put, params["id"], body["url"])
        return d.addCallback(lambda instance: (200, instance))

    def op_deleteInstance(self, request, params, body):
        d = maybeDeferred(self.registry.delete, params["id"])
        return d.addCallback(lambda _: (204, None))

    def op_streamEvents(self, request, params, body):
        self.hub.subscribe(request, self.registry.list())
        return _STREAMING

    def op_getInfo(self, request, params, body):
        return 200, self.registry.info()

    def op_setInfo(self, request, params, body):
        d = maybeDeferred(self.registry.set_alias, body.get("alias", ""))
        return d.addCallback(lambda _: (200, self.registry.info()))

    def op_tcping(self, request, params, body):
        raw = (request.args.get(b"target") or [b""])[0]
        target = raw.decode("utf-8", "replace").strip()
        if not target:
            raise ApiError(400, "Target address required")
        if len(target) > STRING:
            raise ApiError(400, f"target exceeds maximum length {STRING}")
        return maybeDeferred(self.registry.tcping, target).addCallback(lambda r: (200, r))

    def op_getOpenApi(self, request, params, body):
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return 200, self._document_json

    def op_getDocs(self, request, params, body):
        return self._file(request, "docs.html", b"text/html; charset=utf-8")

    def op_getDocsAsset(self, request, params, body):
        kind = _ASSETS.get(params["asset"])
        if kind is None:
            raise ApiError(404, "Not found")
        return self._file(request, params["asset"], kind)


#: Reason phrases Twisted does not know.
_PHRASES = {429: b"Too Many Requests"}


def _close_after(request) -> None:
    """Close the connection once this answer is sent: only a caller that
    presented the right key keeps a connection open (past the header
    deadline, idle for up to a minute), so keyless clients cannot hold
    the connection slots."""
    request.setHeader(b"Connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


def make_site(registry, hub, keys, settings, clock):
    """The API's site: a :class:`~tunnelpass.master.httpguard.GuardedSite`
    whose every path is answered by :class:`ApiResource` (the API under
    ``settings.base``, JSON 404 elsewhere).  The caller adds TLS."""
    return httpguard.GuardedSite(ApiResource(registry, hub, keys, settings, clock), clock)
