# -*- test-case-name: tests.test_master_api -*-
"""The master API's OpenAPI 3.1 document: the single source of truth for
its routes.

The router (:mod:`tunnelpass.master.api`) serves exactly the operations of
this document, finds each handler by ``operationId``, and checks request
bodies against the document's own request schemas (:func:`check_body`), so
what the document promises and what the server accepts cannot drift.
Paths are relative to ``servers[0].url`` (``settings.base``).
"""

from __future__ import annotations

import copy
import re

STRING = 256        # every string field, NodePass's maxValueLen
URL = 2048          # the url field

_ERR = {"$ref": "#/components/schemas/Error"}
_REASONS = {
    "400": "Malformed request: body, field, id or parameter",
    "401": "Unauthorized: API key required, or invalid API key",
    "403": "Forbidden (Host header does not name loopback on a loopback API, or the API key entry)",
    "404": "Instance not found",
    "409": "Conflict",
    "413": "Request body larger than 64 KiB",
    "415": "Request body is not JSON (application/json; curl's default form type is read as JSON too)",
    "429": "Too many failed API keys from this source, or too many tcping at once",
}


def _errors(*codes: str) -> dict:
    return {c: {"description": _REASONS[c],
                "content": {"application/json": {"schema": _ERR}}} for c in codes}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _str(limit: int = STRING) -> dict:
    return {"type": "string", "maxLength": limit}


_PEER = {"type": "object", "additionalProperties": False,
         "properties": {"sid": _str(), "type": _str(), "alias": _str()}}
_TAGS = {"type": "object", "propertyNames": {"maxLength": STRING},
         "additionalProperties": _str()}
_META = {"type": "object", "additionalProperties": False,
         "properties": {"peer": _PEER, "tags": _TAGS}}

_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "Instance": {
        "type": "object",
        "required": ["id", "type", "status", "url"],
        "properties": {
            "id": {"type": "string"}, "alias": {"type": "string"},
            "type": {"type": "string", "enum": ["server", "client", ""],
                     "description": "empty for the ******** API key entry"},
            "status": {"type": "string", "enum": ["running", "stopped", "error"]},
            "url": {"type": "string"}, "config": {"type": "string"},
            "restart": {"type": "boolean"},
            "meta": {"type": "object", "properties": {
                "peer": {"type": "object"}, "tags": {"type": "object"}}},
            "mode": {"type": "integer"}, "ping": {"type": "number"},
            "pool": {"type": "integer"}, "tcps": {"type": "integer"},
            "udps": {"type": "integer"}, "tcprx": {"type": "integer"},
            "tcptx": {"type": "integer"}, "udprx": {"type": "integer"},
            "udptx": {"type": "integer"},
            "client": {"type": "object", "required": ["command"],
                       "description": "server instances, GET of one instance only: the client "
                                      "command and token (no token until a tls=1 server saved its certificate)",
                       "properties": {"command": {"type": "string"}, "token": {"type": "string"}}},
        },
    },
    "Info": {
        "type": "object",
        "properties": {"mid": {"type": "string"}, "alias": {"type": "string"},
                       "ver": {"type": "string"}, "os": {"type": "string"},
                       "arch": {"type": "string"}, "log": {"type": "string"},
                       "tls": {"type": "string"}},
    },
    "TcpingResult": {
        "type": "object", "required": ["target", "connected", "latency"],
        "properties": {"target": {"type": "string"}, "connected": {"type": "boolean"},
                       "latency": {"type": "number"},
                       "error": {"type": ["string", "null"]}},
    },
    "Event": {
        "type": "object", "required": ["type", "time"],
        "description": "The data of one `event: instance` frame of /events.",
        "properties": {
            "type": {"type": "string", "enum": ["initial", "create", "update", "delete",
                                                "shutdown", "log"]},
            "time": {"type": "string", "format": "date-time"},
            "instance": {"oneOf": [{"$ref": "#/components/schemas/Instance"},
                                   {"type": "null"}]},
            "logs": {"type": "string"},
        },
    },
    "CreateInstance": {"type": "object", "additionalProperties": False, "required": ["url"],
                       "properties": {"alias": _str(), "url": _str(URL)}},
    "PutInstance": {"type": "object", "additionalProperties": False, "required": ["url"],
                    "properties": {"url": _str(URL)}},
    "PatchInstance": {"type": "object", "additionalProperties": False, "properties": {
        "alias": _str(),
        "action": {"type": "string", "enum": ["start", "stop", "restart", "reset"]},
        "restart": {"type": "boolean"}, "meta": _META}},
    "SetAlias": {"type": "object", "additionalProperties": False,
                 "properties": {"alias": _str()}},
}

_ID = {"name": "id", "in": "path", "required": True,
       "description": "Eight lowercase hex digits, or `********` for the API key entry",
       "schema": {"type": "string", "pattern": r"^([0-9a-f]{8}|\*{8})$"}}
_INSTANCE = _json({"$ref": "#/components/schemas/Instance"}, "The instance")
_INFO = _json({"$ref": "#/components/schemas/Info"}, "The master")
_AUTH = ("401", "403", "429")
_BODY = ("400", "413", "415")
_PUBLIC = {"security": []}


def _op(op_id: str, summary: str, responses: dict, **extra) -> dict:
    return {"operationId": op_id, "summary": summary, "responses": responses, **extra}


def _schema_ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_PATHS = {
    "/instances": {
        "get": _op("listInstances", "All instances (each URL's key shown as ********)",
                   {"200": _json({"type": "array", "items": _schema_ref("Instance")},
                                 "The instances"), **_errors(*_AUTH)}),
        "post": _op("createInstance", "Create and start an instance from a server:// or client:// URL",
                    {"201": _json(_schema_ref("Instance"), "Created"),
                     **_errors(*_AUTH, *_BODY, "409")},
                    requestBody=_body(_schema_ref("CreateInstance"))),
    },
    "/instances/{id}": {
        "parameters": [_ID],
        "get": _op("getInstance", "One instance (URL with its key)",
                   {"200": _INSTANCE, **_errors(*_AUTH, "400", "404")}),
        "patch": _op("patchInstance", "Alias, action (start/stop/restart/reset), restart, meta; "
                     "`********` with action restart rotates the API key",
                     {"200": _INSTANCE, **_errors(*_AUTH, *_BODY, "404", "409")},
                     requestBody=_body(_schema_ref("PatchInstance"))),
        "put": _op("putInstance", "Replace the URL and restart",
                   {"200": _INSTANCE, **_errors(*_AUTH, *_BODY, "404", "409")},
                   requestBody=_body(_schema_ref("PutInstance"))),
        "delete": _op("deleteInstance", "Stop (if running) and delete",
                      {"204": {"description": "Deleted"},
                       **_errors(*_AUTH, "400", "404", "409")}),
    },
    "/events": {
        "get": _op("streamEvents", "Server-Sent Events: `retry:`, one `initial` frame per "
                   "instance, then live `event: instance` frames (data: Event)",
                   {"200": {"description": "An endless text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(*_AUTH)}),
    },
    "/info": {
        "get": _op("getInfo", "The master: version, host figures, settings",
                   {"200": _INFO, **_errors(*_AUTH)}),
        "post": _op("setInfo", "Set the master's alias",
                    {"200": _INFO, **_errors(*_AUTH, *_BODY)},
                    requestBody=_body(_schema_ref("SetAlias"))),
    },
    "/tcping": {
        "get": _op("tcping", "TCP connect latency to HOST:PORT",
                   {"200": _json(_schema_ref("TcpingResult"), "The result"),
                    **_errors(*_AUTH, "400")},
                   parameters=[{"name": "target", "in": "query", "required": True,
                                "schema": {"type": "string", "minLength": 1,
                                           "maxLength": STRING}}]),
    },
    "/openapi.json": {
        "get": _op("getOpenApi", "This document",
                   {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors("403")},
                   **_PUBLIC),
    },
    "/docs": {
        "get": _op("getDocs", "This document as a readable page",
                   {"200": {"description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}}},
                    **_errors("403")},
                   **_PUBLIC),
    },
    "/docs/{asset}": {
        "get": _op("getDocsAsset", "The docs page's script and style",
                   {"200": {"description": "The file", "content": {
                       "text/javascript": {"schema": {"type": "string"}},
                       "text/css": {"schema": {"type": "string"}}}},
                    **_errors("403", "404")},
                   parameters=[{"name": "asset", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                   **_PUBLIC),
    },
}

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def build_document(base: str, version: str) -> dict:
    """The OpenAPI 3.1 document of the API served under *base*."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "tunnelpass master API", "version": version,
                 "description": "NodePass-compatible master API: tunnel instances, "
                                "events, master information."},
        "servers": [{"url": base}],
        "security": [{"ApiKey": []}],
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header",
                                           "name": "X-API-Key"}},
        },
    }


class Route:
    """One path template of the document: its regex and its operations."""

    def __init__(self, template: str, item: dict, document: dict):
        self.template = template
        names = re.findall(r"\{(\w+)\}", template)
        pattern = re.escape(template)
        for name in names:
            pattern = pattern.replace(re.escape("{%s}" % name), f"(?P<{name}>[^/]+)")
        self.regex = re.compile(f"^{pattern}$")
        self.operations = {}
        for method in METHODS:
            if method in item:
                op = item[method]
                public = op.get("security", document.get("security")) == []
                body = op.get("requestBody", {}).get("content", {}).get(
                    "application/json", {}).get("schema")
                self.operations[method.upper()] = (op["operationId"], public,
                                                   resolve(document, body))

    def match(self, path: str) -> dict | None:
        m = self.regex.match(path)
        return m.groupdict() if m else None


def routes(document: dict) -> list[Route]:
    """The document's paths as routes, in document order."""
    return [Route(t, item, document) for t, item in document["paths"].items()]


def resolve(document: dict, schema):
    """*schema* with its top-level ``$ref`` followed (request bodies are
    one reference to ``components``)."""
    while isinstance(schema, dict) and "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    return schema


_TYPES = {"object": dict, "string": str, "boolean": bool}


def check_body(schema: dict, value, where: str = "") -> str | None:
    """The first way *value* breaks *schema* (the subset the request
    schemas above use: type, properties, required, additionalProperties,
    propertyNames.maxLength, maxLength, enum), as a message naming the
    field, or ``None`` when it conforms."""
    label = where or "request body"
    kind = schema.get("type")
    if kind and not isinstance(value, _TYPES[kind]):
        return f"{label} must be {'an' if kind == 'object' else 'a'} {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"Invalid {label}: {value}"
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{label} exceeds maximum length {schema['maxLength']}"
    if kind != "object":
        return None
    for name in schema.get("required", ()):
        if name not in value:
            return f"{_join(where, name)} is required"
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    key_limit = schema.get("propertyNames", {}).get("maxLength")
    for name, item in value.items():
        if key_limit is not None and len(name) > key_limit:
            return f"{_join(where, 'key')} exceeds maximum length {key_limit}"
        sub = props.get(name, extra)
        if sub is False:
            return f"Unknown field: {_join(where, name)}"
        if isinstance(sub, dict):
            problem = check_body(sub, item, _join(where, name))
            if problem:
                return problem
    return None


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
