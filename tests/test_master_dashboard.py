# -*- test-case-name: tests.test_master_dashboard -*-
"""The master's dashboard without a browser: how its files are served
(allow-list, headers on every answer, redirect, Host check), what the files
may contain (no inline script or style, no external URL, no HTML built from
data, every data-testid of the browser tests' contract), and the ``client``
field of a server instance (command and token for tls 0/1/2 and wildcard
binds)."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tunnelpass.carriers import tls as tlsmod
from tunnelpass.config.options import parse_tunnel_url
from tunnelpass.config.urls import parse_token
from tunnelpass.master import api, openapi
from tunnelpass.master.clientcmd import client_end
from tunnelpass.master.dashboard import CSP, DIRECTORY, FILES, Dashboard
from tunnelpass.master.registry import Registry
from tunnelpass.master.settings import MasterSettings

KEY = "9f3c1a7e5b2d8f4c6a0e1b9d7c3f5a28"
HEADERS = {b"Content-Security-Policy": CSP, b"X-Content-Type-Options": b"nosniff",
           b"Referrer-Policy": b"no-referrer", b"X-Frame-Options": b"DENY", b"Cache-Control": b"no-cache"}

#: The data-testid values the browser tests rely on (the shared contract).
CONTRACT = """
key-input sign-in sign-in-error sign-out nav-instances nav-info nav-new instances-table instance-row
cell-alias cell-type cell-flow cell-status cell-url cell-tcps cell-udps cell-pool cell-ping cell-rx cell-tx
cell-rate filter-status filter-tag sort-alias sort-status sort-rx action-start action-stop action-restart
action-reset action-delete toggle-restart confirm-dialog confirm-yes confirm-no form-type form-alias form-key
generate-key form-tunnel form-target form-tls form-crt form-keyfile form-advanced form-param-min form-param-max
form-param-mode form-param-type form-param-dial form-param-dns form-param-read form-param-rate form-param-slot
form-param-proxy form-param-block form-param-notcp form-param-noudp form-param-lbs form-param-log form-param-sni
form-url-preview form-submit form-error error-tunnel error-target error-key action-edit detail detail-status
detail-chart detail-tcps detail-udps detail-pool detail-ping detail-rx detail-tx log-tail log-line log-level
client-command client-token copy-command edit-alias save-alias edit-tags save-tags info-version info-uptime
info-cpu info-memory info-network rotate-key new-key
""".split()


def read(name: str) -> str:
    with open(os.path.join(DIRECTORY, name), encoding="utf-8") as f:
        return f.read()


def resource(**settings) -> api.ApiResource:
    return api.ApiResource(None, None, None, MasterSettings(**settings), Clock())


def get(site, path: bytes, method: bytes = b"GET", host: bytes = b"127.0.0.1:9090"):
    request = DummyRequest([])
    request.path = request.uri = path
    request.method = method
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    body = site.render(request)
    return request, body


def header(request, name: bytes):
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1] if values else None


class ServingTests(SynchronousTestCase):
    def setUp(self):
        self.site = resource()

    def assertDashboardHeaders(self, request):
        for name, value in HEADERS.items():
            self.assertEqual(header(request, name), value, name)

    def test_index_at_prefix(self):
        request, body = get(self.site, b"/api/")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(body.decode(), read("index.html"))
        self.assertDashboardHeaders(request)

    def test_every_file_with_its_type(self):
        for name, kind in FILES.items():
            request, body = get(self.site, b"/api/ui/" + name.encode())
            self.assertEqual((request.responseCode, header(request, b"content-type")), (200, kind), name)
            self.assertEqual(body.decode(), read(name))
            self.assertDashboardHeaders(request)
        self.assertEqual(FILES["app.js"], b"text/javascript; charset=utf-8")
        self.assertEqual(FILES["style.css"], b"text/css; charset=utf-8")

    def test_redirects_to_the_index(self):
        for path in (b"/", b"/api"):
            request, body = get(self.site, path)
            self.assertEqual((request.responseCode, header(request, b"location"), body), (302, b"/api/", b""))
            self.assertDashboardHeaders(request)

    def test_not_in_the_allow_list(self):
        for path in (b"/api/ui/", b"/api/ui/nope.js", b"/api/ui/../dashboard.py", b"/api/ui/%2e%2e/api.py",
                     b"/api/ui/APP.JS", b"/api/ui/app.js/x", b"/api/ui//etc/passwd", b"/api/ui/app.js%00",
                     b"/api/ui/" + b"a" * 5000, b"/api/ui/\xff\xfe", b"/api/ui/index.html/../app.js"):
            request, body = get(self.site, path)
            self.assertEqual(request.responseCode, 404, path)
            self.assertEqual(json.loads(body), {"error": "Not found"})
            self.assertEqual(header(request, b"content-type"), b"application/json; charset=utf-8")
            self.assertDashboardHeaders(request)

    def test_only_get_and_head(self):
        request, body = get(self.site, b"/api/", b"HEAD")
        self.assertEqual(request.responseCode, 200)
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS"):
            request, body = get(self.site, b"/api/ui/app.js", method)
            self.assertEqual((request.responseCode, header(request, b"allow")), (405, b"GET, HEAD"), method)
            self.assertDashboardHeaders(request)

    def test_host_check_first(self):
        """A DNS-rebinding page (a foreign Host) cannot load the dashboard."""
        for host in (b"evil.example", b"evil.example:9090", None, b"127.0.0.1.evil.example"):
            for path in (b"/api/", b"/api/ui/app.js", b"/"):
                request, body = get(self.site, path, host=host)
                self.assertEqual(request.responseCode, 403, (host, path))
                self.assertIn(b"Host must name a loopback address", body)
                self.assertDashboardHeaders(request)
        request, _ = get(self.site, b"/api/", host=b"[::1]:9090")
        self.assertEqual(request.responseCode, 200)
        request, _ = get(resource(api_host="0.0.0.0"), b"/api/", host=b"master.example")
        self.assertEqual(request.responseCode, 200)

    def test_other_prefix(self):
        site = resource(prefix="/admin/np")
        request, _ = get(site, b"/admin/np/")
        self.assertEqual(request.responseCode, 200)
        request, _ = get(site, b"/")
        self.assertEqual(header(request, b"location"), b"/admin/np/")
        request, _ = get(site, b"/admin/np/ui/app.js")
        self.assertEqual(request.responseCode, 200)
        request, _ = get(site, b"/api/")
        self.assertEqual(request.responseCode, 404)

    def test_api_keeps_its_own_headers(self):
        request, _ = get(self.site, b"/api/v1/openapi.json")
        self.assertEqual(request.responseCode, 200)
        self.assertNotEqual(header(request, b"content-security-policy"), CSP)
        self.assertEqual(header(request, b"cache-control"), b"no-store")
        request, _ = get(self.site, b"/api/v1/instances")
        self.assertEqual(request.responseCode, 401)
        self.assertIsNone(header(request, b"x-frame-options"))

    def test_sans_io_answers(self):
        board = Dashboard("/api", {name: name.encode() for name in FILES})
        self.assertEqual(board.answer("/api/ui/style.css"), (200, [(b"Content-Type", FILES["style.css"])], b"style.css"))
        self.assertEqual(board.answer("/api/ui/missing.css")[2], None)
        self.assertFalse(board.owns("/api/v1/instances"))
        self.assertFalse(board.owns("/apix/"))
        self.assertTrue(board.owns("/api/ui/anything"))
        # A file of the allow-list that was not loaded is not found either.
        self.assertEqual(Dashboard("/api", {}).answer("/api/")[0], 404)


class _Tags(HTMLParser):
    """Every start tag of a document with its attributes, and text inside
    script and style elements."""

    def __init__(self):
        super().__init__()
        self.tags, self.inline, self._open = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._open = tag if tag in ("script", "style") else None

    def handle_data(self, data):
        if self._open and data.strip():
            self.inline.append((self._open, data))

    def handle_endtag(self, tag):
        self._open = None


class FileContentTests(SynchronousTestCase):
    def test_allow_list_is_the_directory(self):
        self.assertEqual(sorted(os.listdir(DIRECTORY)), sorted(FILES))

    def test_no_inline_script_or_style(self):
        parser = _Tags()
        parser.feed(read("index.html"))
        self.assertEqual(parser.inline, [])
        for tag, attrs in parser.tags:
            self.assertNotEqual(tag, "style")
            self.assertNotIn("style", attrs, tag)
            self.assertEqual([name for name in attrs if name.startswith("on")], [], tag)
            if tag == "script":
                self.assertTrue(attrs.get("src", "").startswith("ui/"), attrs)
            for value in attrs.values():
                self.assertFalse((value or "").strip().lower().startswith("javascript:"), value)
        for name in FILES:
            if name.endswith(".js"):
                text = read(name)
                # Inline handlers or style attributes set from script, code from strings.
                for pattern in (r"setAttribute\(\s*[\"'](style|on\w+)", r"\beval\(", r"new Function\(",
                                r"\bstyle\s*:", r"setTimeout\(\s*[\"'`]", r"document\.write"):
                    self.assertIsNone(re.search(pattern, text), (name, pattern))

    def test_no_html_from_data(self):
        for name in FILES:
            if name.endswith(".js"):
                text = read(name)
                for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "createContextualFragment",
                             "DOMParser", "srcdoc"):
                    self.assertNotIn(sink, text, name)

    def test_no_external_url(self):
        allowed = {"http://www.w3.org/2000/svg"}   # the SVG namespace, not a fetch
        for name in FILES:
            text = read(name)
            for url in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'`)]*", text):
                self.assertIn(url, allowed, name)
            self.assertNotIn("@import", text, name)
            self.assertIsNone(re.search(r"url\(\s*[\"']?(?!data:)", text), name)

    def test_module_sizes(self):
        for name in FILES:
            if name.endswith(".js"):
                self.assertLess(read(name).count("\n"), 400, name)

    def test_contract_test_ids_present(self):
        """Each id is in the files literally, or made by a template
        ``"prefix-${...}"`` in a file that also names the suffix."""
        texts = {name: read(name) for name in FILES}
        literal = set()
        for text in texts.values():
            literal.update(re.findall(r"data-testid=\"([\w-]+)\"", text))
            literal.update(re.findall(r"testid: \"([\w-]+)\"", text))
            literal.update(re.findall(r"\bvalue\(\"([\w-]+)\"\)", text))   # info.js: value("info-version")
        templates = [(prefix, name) for name, text in texts.items()
                     for prefix in re.findall(r"`([a-z]+(?:-[a-z]+)*-)\$\{", text)]

        def made(value, text=None) -> bool:
            if text is not None and (f'"{value}"' in text or f"{value}:" in text):
                return True
            return any(value.startswith(prefix) and made(value[len(prefix):], texts[name])
                       for prefix, name in templates)

        for testid in CONTRACT:
            self.assertTrue(testid in literal or made(testid), testid)

    def test_package_data(self):
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg")) as f:
            self.assertIn("dashboard/*", f.read())


def options(url: str):
    return parse_tunnel_url(url)


class ClientEndTests(SynchronousTestCase):
    ADDRESSES = ["127.0.0.1", "192.0.2.7", "::1", "2001:db8::7"]

    def token(self, answer) -> dict:
        self.assertIn(f"--token {answer['token']} --target HOST:PORT", answer["command"])
        self.assertTrue(answer["command"].startswith("twistd -n --pidfile= tunnelpass --mode client "))
        return parse_token(answer["token"])

    def test_tls0_bound_address(self):
        answer = client_end(options(f"server://{KEY}@127.0.0.5:10101/127.0.0.1:8080"), "/nonexistent", [])
        token = self.token(answer)
        self.assertEqual((token["host"], token["port"], token["key"], token["tls"], token["pin"]),
                         ("127.0.0.5", 10101, KEY, 0, None))

    def test_wildcard_binds(self):
        answer = client_end(options(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080"), "/x", self.ADDRESSES)
        self.assertEqual(self.token(answer)["host"], "192.0.2.7")
        answer = client_end(options(f"server://{KEY}@[::]:10101/127.0.0.1:8080"), "/x", self.ADDRESSES)
        self.assertEqual(self.token(answer)["host"], "192.0.2.7")   # IPv4 before IPv6
        answer = client_end(options(f"server://{KEY}@[::]:10101/127.0.0.1:8080"), "/x", ["::1", "2001:db8::7"])
        self.assertEqual(self.token(answer)["host"], "2001:db8::7")
        answer = client_end(options(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080"), "/x", ["127.0.0.1"])
        self.assertEqual(self.token(answer)["host"], "127.0.0.1")   # loopback only: loopback
        answer = client_end(options(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080?public=tp.example:443"),
                            "/x", self.ADDRESSES)
        self.assertEqual((self.token(answer)["host"], self.token(answer)["port"]), ("tp.example", 443))

    def test_tls2(self):
        url = f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080?tls=2&crt=/c.pem&key=/k.pem"
        token = self.token(client_end(options(url), "/x", []))
        self.assertEqual((token["tls"], token["pin"]), (2, None))

    def test_tls1_pin_once_saved(self):
        directory = self.mktemp()
        url = f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080?tls=1"
        before = client_end(options(url), directory, [])
        self.assertNotIn("token", before)
        self.assertEqual(before["command"], "twistd -n --pidfile= tunnelpass --mode client --tunnel 127.0.0.1:10101 "
                                            f"--key {KEY} --tls 1 --target HOST:PORT")
        key, certificate = tlsmod.self_signed()
        tlsmod.save_pair(directory, key, certificate)
        token = self.token(client_end(options(url), directory, []))
        self.assertEqual((token["tls"], token["pin"]), (1, tlsmod.fingerprint(certificate)))
        # A damaged certificate (and no backup) is no pin, not an error.
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        self.assertNotIn("token", client_end(options(url), directory, []))

    def test_weak_key_command_only(self):
        url = "server://aaaaaaaaaaaaaaaa@127.0.0.1:10101/127.0.0.1:8080?weakkey=1"
        answer = client_end(options(url), "/x", [])
        self.assertNotIn("token", answer)
        self.assertIn("--key aaaaaaaaaaaaaaaa --weak-key --target HOST:PORT", answer["command"])

    def test_key_is_shell_quoted(self):
        key = "a'b$c;d`e|f&g!h*1234"
        url = f"server://{key.replace('&', '%26')}@127.0.0.1:10101/127.0.0.1:8080?weakkey=1&tls=1"
        opts = options(url)
        self.assertEqual(opts["key"], key)
        answer = client_end(opts, "/x", [])   # tls=1, no pin yet: --key in the command
        import shlex
        words = shlex.split(answer.get("command"))
        self.assertEqual(words[words.index("--key") + 1], key)

    def test_no_client_end(self):
        self.assertIsNone(client_end(options(f"client://{KEY}@127.0.0.1:10101/127.0.0.1:8080"), "/x", []))
        self.assertIsNone(client_end(None, "/x", []))
        for tunnel in ("0.0.0.0:0", "0.0.0.0:x", "0.0.0.0:70000", ""):
            broken = dict(options(f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080"), tunnel=tunnel)
            self.assertIsNone(client_end(broken, "/x", []), tunnel)


class _Store:
    def save_instance(self, row):
        from twisted.internet.defer import succeed
        return succeed(None)


class _Supervisor:
    def start_instance(self, *args):
        pass


class _Hub:
    def publish(self, *args):
        pass


class RegistryClientTests(SynchronousTestCase):
    def setUp(self):
        self.state = self.mktemp()
        settings = MasterSettings(state_dir=self.state, report_interval=0)
        self.registry = Registry(Clock(), _Store(), _Supervisor(), _Hub(), None, settings)
        self.registry.addresses = lambda: ["127.0.0.1", "192.0.2.9"]

    def create(self, url):
        return self.successResultOf(self.registry.create("", url))["id"]

    def test_server_get_only(self):
        server = self.create(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080")
        client = self.create(f"client://{KEY}@127.0.0.1:10101/127.0.0.1:8080")
        view = self.registry.get(server)
        self.assertEqual(parse_token(view["client"]["token"])["host"], "192.0.2.9")
        self.assertNotIn("client", self.registry.get(client))
        self.assertEqual([item for item in self.registry.list() if "client" in item], [])

    def test_tls1_reads_the_instance_directory(self):
        server = self.create(f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080?tls=1")
        self.assertNotIn("token", self.registry.get(server)["client"])
        key, certificate = tlsmod.self_signed()
        tlsmod.save_pair(os.path.join(self.state, "instances", server), key, certificate)
        token = parse_token(self.registry.get(server)["client"]["token"])
        self.assertEqual(token["pin"], tlsmod.fingerprint(certificate))

    def test_openapi_field_optional(self):
        schema = openapi.build_document("/api/v1", "x")["components"]["schemas"]["Instance"]
        self.assertIn("client", schema["properties"])
        self.assertNotIn("client", schema["required"])
        self.assertEqual(schema["properties"]["client"]["required"], ["command"])



# The dashboard's pure JavaScript (URL building and splitting, the event
# stream parser, tags, log levels, rates) run in Node when it is installed:
# these modules touch no DOM at import.

NODE_SCRIPT = r"""
const dir = process.argv[1];
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
(async () => {
  const api = await import(`file://${dir}/api.js`);
  const form = await import(`file://${dir}/form.js`);
  const format = await import(`file://${dir}/format.js`);
  const store = await import(`file://${dir}/store.js`);
  const out = {};
  // SSE: the master's bytes, whole and cut at every position.
  const whole = api.parseFrames(input.stream);
  out.frames = whole.frames;
  out.rest = whole.rest;
  out.cuts = true;
  for (let i = 0; i < input.stream.length; i += 1) {
    const first = api.parseFrames(input.stream.slice(0, i));
    const second = api.parseFrames(first.rest + input.stream.slice(i));
    if (JSON.stringify([...first.frames, ...second.frames]) !== JSON.stringify(whole.frames)) out.cuts = i;
  }
  out.hostile = input.hostile.map((text) => api.parseFrames(text));
  out.fields = input.messages.map((m) => form.fieldOf(m));
  out.urls = input.urls.map((u) => form.buildUrl(form.fieldsFromUrl(u)));
  out.split = form.splitUrl(input.urls[0]);
  out.built = form.buildUrl({type: "client", key: "k@y/&?", tunnel: "[::1]:10101", target: "a:1,b:2",
    tls: "1", crt: "", keyfile: "", params: {min: "8", sni: "x y"}, extra: [["public", "h:1"]]});
  out.tags = input.tags.map((t) => { try { return format.parseTags(t); } catch (e) { return "error: " + e.message; } });
  out.tagText = format.formatTags(input.tagObject);
  out.tagRoundTrip = format.parseTags(out.tagText);
  out.levels = input.lines.map((l) => format.logLevel(l));
  out.masked = input.urls.map((u) => format.maskUrl(u));
  out.bytes = [0, 1023, 1536, 5 * 1024 ** 3].map(format.bytes);
  out.key = format.strongKey();
  // Rates from successive updates, then a delete; a log flood keeps 500.
  const inst = (n, status = "running") => ({id: "0123abcd", status, tcprx: n, tcptx: 2 * n, udprx: 0, udptx: 0});
  store.applyEvent({type: "initial", time: "2026-01-01T00:00:00.000Z", instance: inst(0)});
  store.applyEvent({type: "update", time: "2026-01-01T00:00:05.000Z", instance: inst(5000)});
  out.rate = store.store.rates.get("0123abcd");
  out.points = store.store.history.get("0123abcd").length;
  store.applyEvent({type: "update", time: "2026-01-01T00:00:10.000Z", instance: inst(0)});
  out.afterReset = store.store.rates.get("0123abcd");
  for (let i = 0; i < 600; i += 1) {
    store.applyEvent({type: "log", time: "2026-01-01T00:00:10.000Z", instance: inst(0), logs: `line ${i}`});
  }
  out.logs = [store.store.logs.get("0123abcd").length, store.store.logs.get("0123abcd")[0].text];
  store.applyEvent({type: "log", time: "x", instance: {id: 5}, logs: null});
  store.applyEvent({type: "shutdown", time: "x", instance: null});
  store.applyEvent({type: "delete", time: "2026-01-01T00:00:11.000Z", instance: inst(0)});
  out.deleted = [store.store.instances.size, store.store.logs.size, store.store.history.size];
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { process.stderr.write(String(e.stack)); process.exit(1); });
"""


class ScriptTests(SynchronousTestCase):
    def setUp(self):
        import shutil

        self.node = shutil.which("node")
        if self.node is None:
            raise SkipTest("node is not installed: the dashboard's pure JavaScript is not run")

    def run_node(self, data: dict) -> dict:
        import subprocess

        done = subprocess.run([self.node, "-e", NODE_SCRIPT, DIRECTORY], input=json.dumps(data),
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    def message(self, url: str) -> str:
        from tunnelpass.master.errors import ApiError
        from tunnelpass.master.instances import check_url

        try:
            check_url(url)
        except ApiError as e:
            return e.message
        raise AssertionError(f"{url} passed")

    def test_pure_modules(self):
        from tunnelpass.master.sse import RETRY, frame

        stream = (RETRY + frame("initial", 0, {"id": "0123abcd", "alias": "a\nb\u2028 <x>"})
                  + b": keep-alive\n\n" + frame("log", 1, {"id": "0123abcd"}, "line one")).decode()
        stream = stream.replace("\n", "\r\n", 2)   # CRLF line ends are read too
        messages = {
            self.message("server://127.0.0.1:10101"): "target",
            self.message("server://"): "tunnel",
            self.message("client://short@127.0.0.1:1/127.0.0.1:2"): "key",
            self.message("client://127.0.0.1:1/127.0.0.1:2"): "key",
            self.message(f"server://{KEY}@127.0.0.1:1/127.0.0.1:2?min=x"): "param-min",
            self.message(f"server://{KEY}@127.0.0.1:1/127.0.0.1:2?tls=2"): "crt",
            self.message(f"server://{KEY}@127.0.0.1:1/127.0.0.1:2?bogus=1"): None,
            self.message("x://"): None,
            "alias contains control characters": "alias",
        }
        urls = [f"server://{KEY}@[::]:10101/127.0.0.1:8080,127.0.0.1:8081?tls=1&max=512&public=h%3A1",
                f"client://{KEY}@127.0.0.1:10101/127.0.0.1:8080?tls=0", "server://0.0.0.0:1/x:2"]
        out = self.run_node({
            "stream": stream, "messages": list(messages), "urls": urls,
            "hostile": ["data: x", "\n\n\n", "event:\ndata\n\n", "retry: -5\n\nretry: 99999999999\n\n",
                        "data: " + "x" * 100000 + "\n\n", ":" * 50 + "\n\n", "\ufffd\u0000\n\n"],
            "tags": ["env=prod, team = core ", "", " , ,", "=v", "a=1,a=2", "a=b=c", "solo"],
            "lines": ["2026-11-30T16:47:08+0000 [tunnelpass.x#warn] hi", "error: boom", "server running: x",
                      "16:47:08 [debug] y", "Connection error later", "[critical] z",
                      "[warn] handshake from a peer that said sni=evil#debug]"],
            # Every tag the API can hold survives an edit in the dashboard unchanged.
            "tagObject": {"owner": "ops,dev", "a=b": "c", "__proto__": "x", " sp ": "v", 'q"': "x", "solo": "",
                          "eq": "a=b"},
        })
        self.assertTrue(out["cuts"] is True, f"frames differ when the stream is cut at {out['cuts']}")
        self.assertEqual(out["rest"], "")
        self.assertEqual([(f["event"], f["retry"]) for f in out["frames"]],
                         [("message", 1000), ("instance", None), ("instance", None)])
        self.assertEqual(json.loads(out["frames"][1]["data"])["instance"]["alias"], "a\nb\u2028 <x>")
        self.assertEqual(json.loads(out["frames"][2]["data"])["logs"], "line one")
        self.assertEqual(out["hostile"][0], {"frames": [], "rest": "data: x"})   # incomplete: kept
        self.assertEqual(out["hostile"][1]["frames"], [])
        self.assertEqual(out["hostile"][2]["frames"], [{"event": "", "data": "", "retry": None}])
        self.assertEqual([f["retry"] for f in out["hostile"][3]["frames"]], [99999999999])
        self.assertEqual(len(out["hostile"][4]["frames"][0]["data"]), 100000)
        self.assertEqual(out["fields"], list(messages.values()))
        self.assertEqual(out["urls"][0], urls[0].replace("%3A", ":"))
        self.assertEqual(out["urls"][1:], urls[1:])
        self.assertEqual(out["split"]["target"], "127.0.0.1:8080,127.0.0.1:8081")
        self.assertEqual(out["split"]["tunnel"], "[::]:10101")
        self.assertEqual(out["built"], "client://k%40y%2F%26%3F@[::1]:10101/a:1,b:2?tls=1&min=8&sni=x%20y&public=h:1")
        opts = parse_tunnel_url(out["urls"][0])
        self.assertEqual((opts["key"], opts["tls"], opts["max-pool"], opts["public-address"]), (KEY, 1, 512, ("h", 1)))
        self.assertEqual(out["tags"], [{"env": "prod", "team": "core"}, {}, {}, 'error: tag "=v" has no name (write name=value)',
                                       'error: tag "a" is given twice', {"a": "b=c"}, {"solo": ""}])
        self.assertEqual(out["levels"], ["warn", "error", "info", "debug", "info", "error", "warn"])
        self.assertEqual(out["tagRoundTrip"], {"owner": "ops,dev", "a=b": "c", "__proto__": "x", " sp ": "v",
                                               'q"': "x", "solo": "", "eq": "a=b"}, out["tagText"])
        self.assertEqual(out["masked"][0], "server://********@[::]:10101/127.0.0.1:8080,127.0.0.1:8081?tls=1&max=512&public=h%3A1")
        self.assertEqual(out["masked"][2], urls[2])
        self.assertEqual(out["bytes"], ["0 B", "1023 B", "1.50 KiB", "5.00 GiB"])
        self.assertRegex(out["key"], r"^[0-9a-f]{64}$")
        self.assertEqual(out["rate"], {"rx": 1000, "tx": 2000})
        self.assertEqual(out["points"], 1)
        self.assertEqual(out["afterReset"], {"rx": 0, "tx": 0})
        self.assertEqual(out["logs"], [500, "line 100"])
        self.assertEqual(out["deleted"], [0, 0, 0])
