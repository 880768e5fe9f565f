# -*- test-case-name: tests.browser.test_dashboard_browser -*-
"""The master's dashboard in a real headless Chromium against a real master
process, with real tunnels through it.

Every element is found by its ``data-testid`` (the DOM contract of the
dashboard).  What each test proves:

* sign-in: a wrong key is refused on screen, the right key opens the table,
  the key lives in ``sessionStorage`` only (no cookie, not in the URL), sign
  out forgets it;
* the dashboard's response headers (CSP and friends) as the browser got them;
* the create form builds a server and a client URL (the preview shows it),
  both instances appear and reach running, bytes sent through the tunnel
  move the rx/tx cells, the detail page's counters and chart, all without a
  reload (the documentation's screenshots are taken here);
* stop from the table, and a start made elsewhere, show up live;
* the log tail shows an instance's log line, and the level filter hides it;
* a hostile alias renders as text and runs nothing;
* the API's validation message lands next to the field it names;
* 375 px wide: the table fits without a horizontal page scroll;
* rotating the API key from the info page signs out; the old key is refused.

``TP_SCREENSHOTS=docs`` writes ``docs/dashboard-instances.png`` and
``docs/dashboard-detail.png``.
"""

from __future__ import annotations

import re

from twisted.trial import unittest

import tunnelpass
from tests.browser.harness import DESKTOP, PHONE, DashboardPage, class_master, parse_bytes, require_browser
from tests.e2e.harness import echo_backends, free_port, tcp_round_trip, wait_until
from tests.e2e.master_harness import STRONG

HOSTILE = "<img src=x onerror=alert(1)>"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

DASHBOARD_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


def through(port: int, payload: bytes, timeout: float = 15.0) -> None:
    """*payload* echoed through the tunnel entry *port* (retried while the
    client end is still connecting its pool)."""
    def echoed():
        try:
            return tcp_round_trip(port, payload) == payload
        except OSError:
            return False

    wait_until(echoed, timeout, interval=0.2, what=f"an echo through port {port}")


def server_instance(master, alias: str = "web") -> dict:
    """A running tls=0 server instance made through the API (no client:
    its listeners are up without one)."""
    made = master.ok("POST", "/instances", {
        "alias": alias, "url": f"server://{STRONG}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?tls=0"},
        expect=201)
    master.wait_status(made["id"], "running")
    return made


class FormAndTrafficTests(unittest.TestCase):
    """A server and its client made through the form; traffic through them
    seen live.  A master of its own, so the screenshots show exactly this
    pair."""

    def setUp(self):
        require_browser()
        self.master = class_master(self)
        self.ui = DashboardPage(self, self.master)

    def fill_form(self, kind: str, alias: str, tunnel: int, target: int, key: str | None = None) -> str:
        """Fill the create form (a generated key when *key* is None); the key used."""
        ui = self.ui
        ui.goto("new")
        ui.by("form-type").select_option(kind)
        ui.by("form-alias").fill(alias)
        if key is None:
            ui.by("generate-key").click()
            key = ui.by("form-key").input_value()
            self.assertRegex(key, r"^[0-9a-f]{64}$")  # 32 random bytes in hex
        else:
            ui.by("form-key").fill(key)
        ui.by("form-tunnel").fill(f"127.0.0.1:{tunnel}")
        ui.by("form-target").fill(f"127.0.0.1:{target}")
        ui.by("form-tls").select_option("0")
        return key

    def submit(self) -> str:
        """Submit the form; the id of the instance it made (the dashboard
        opens its detail page)."""
        self.ui.by("form-submit").click()
        self.ui.page.wait_for_url(re.compile(r"#/i/"))
        detail = self.ui.by("detail")
        detail.wait_for(state="visible")
        return detail.get_attribute("data-id")

    def test_form_creates_a_pair_and_traffic_moves_the_page_live(self):
        ui, master = self.ui, self.master
        backend = echo_backends(self)
        tunnel, entry = free_port(), free_port()
        ui.signed_in()
        ui.mark()

        key = self.fill_form("server", "edge", tunnel, entry)
        preview = ui.by("form-url-preview")
        ui.wait_text(preview, lambda t: f"server://{key}@127.0.0.1:{tunnel}/127.0.0.1:{entry}" in t,
                     what="the server URL preview")
        ui.by("form-tls").select_option("1")
        ui.wait_text(preview, lambda t: "tls=1" in t, what="the preview following the TLS level")
        ui.by("form-tls").select_option("0")
        server_id = self.submit()

        self.fill_form("client", "inside", tunnel, backend.port, key=key)
        ui.wait_text(ui.by("form-url-preview"),
                     lambda t: f"client://{key}@127.0.0.1:{tunnel}/127.0.0.1:{backend.port}" in t,
                     what="the client URL preview")
        client_id = self.submit()
        ui.goto("instances")
        self.assertEqual(ui.row_id("edge"), server_id)
        self.assertEqual(ui.row_id("inside"), client_id)

        # What the form sent is what the API holds.
        server = master.instance(server_id)
        self.assertEqual((server["alias"], server["type"]), ("edge", "server"))
        self.assertIn(f"{key}@127.0.0.1:{tunnel}/127.0.0.1:{entry}", server["url"])
        self.assertEqual(master.instance(client_id)["type"], "client")
        for id in (server_id, client_id):
            ui.wait_text(ui.cell(id, "status"), lambda t: "running" in t.lower(), what=f"{id} running")
        self.assertEqual(ui.text(ui.cell(server_id, "type")).lower(), "server")
        self.assertNotIn(key, ui.text(ui.cell(server_id, "url")))  # masked in the table

        # Bytes through the tunnel move the server row's totals.
        payload = b"x" * 300_000
        through(entry, payload)
        for name in ("rx", "tx"):
            ui.wait_text(ui.cell(server_id, name), lambda t: (parse_bytes(t) or 0) >= 0.9 * len(payload),
                         what=f"the server row's {name} total")
        table = ui.by("instances-table").bounding_box()
        ui.screenshot("dashboard-instances.png",
                      clip={"x": 0, "y": 0, "width": DESKTOP["width"], "height": table["y"] + table["height"] + 16})

        # The detail page: counters and the chart follow further traffic.
        ui.open_detail(server_id)
        chart = ui.by("detail-chart")
        points = int(chart.get_attribute("data-points") or 0)
        rx_before = parse_bytes(ui.text(ui.by("detail-rx"))) or 0
        self.assertGreaterEqual(rx_before, 0.9 * len(payload))
        for _ in range(3):
            through(entry, payload)
        ui.wait_text(ui.by("detail-rx"), lambda t: (parse_bytes(t) or 0) >= rx_before + 2 * len(payload),
                     what="the detail page's rx total")
        wait_until(lambda: int(chart.get_attribute("data-points") or 0) > points, 15, interval=0.1,
                   what="the chart plotting new samples")
        ui.assert_not_reloaded()
        self.assertEqual(ui.dialogs, [])
        self.assertEqual(ui.errors, [])
        ui.page.evaluate("window.scrollTo(0, 0)")
        ui.screenshot("dashboard-detail.png")


class InstancesPageTests(unittest.TestCase):
    """Sign-in, headers, live status and logs, hostile text, validation,
    phone width: one master shared by the class (each test looks only at
    the instances it made)."""

    def setUp(self):
        require_browser()
        self.master = class_master(self)
        self.ui = DashboardPage(self, self.master)

    def test_sign_in_wrong_key_then_right_key_then_sign_out(self):
        ui = self.ui
        ui.open()
        ui.sign_in("0" * 64)
        ui.wait_text(ui.by("sign-in-error"), lambda t: "wrong" in t.lower(), what="the wrong-key message")
        self.assertFalse(ui.by("instances-table").is_visible())
        ui.sign_in(self.master.key)
        ui.by("instances-table").wait_for(state="visible")
        ui.by("sign-out").wait_for(state="visible")
        self.assertNotIn(self.master.key, ui.page.url)
        self.assertEqual(ui.context.cookies(), [])
        stored = ui.page.evaluate("Object.values(sessionStorage)")
        self.assertIn(self.master.key, stored)
        self.assertFalse(any(self.master.key in url for url in ui.requests))
        ui.by("sign-out").click()
        ui.by("key-input").wait_for(state="visible")
        self.assertNotIn(self.master.key, ui.page.evaluate("Object.values(sessionStorage)"))

    def test_dashboard_responses_carry_the_security_headers(self):
        ui = self.ui
        document = ui.open()
        ui.page.wait_for_load_state("load")
        self.assertEqual(document.status, 200)
        self.assertTrue(document.headers["content-type"].startswith("text/html"))
        assets = [r for r in ui.responses if "/api/ui/" in r.url]
        self.assertTrue(any(r.url.endswith(".js") for r in assets), [r.url for r in ui.responses])
        self.assertTrue(any(r.url.endswith(".css") for r in assets), [r.url for r in ui.responses])
        for response in [document, *assets]:
            headers = response.headers
            for name, value in DASHBOARD_HEADERS.items():
                self.assertEqual(headers.get(name), value, f"{name} of {response.url}")
        # / sends the browser to the dashboard.
        redirected = ui.page.goto(f"http://127.0.0.1:{self.master.port}/")
        self.assertEqual(redirected.url, ui.url)
        self.assertEqual(redirected.request.redirected_from.response().status, 302)
        self.assertEqual(ui.csp_reports(), [])
        self.assertEqual(ui.errors, [])

    def test_stop_and_a_start_from_elsewhere_show_live(self):
        ui, master = self.ui, self.master
        made = server_instance(master, "stoppable")
        ui.signed_in()
        ui.mark()
        status = ui.cell(made["id"], "status")
        ui.wait_text(status, lambda t: "running" in t.lower(), what="running")
        ui.row(made["id"]).get_by_test_id("action-stop").click()
        ui.confirm_if_asked()
        ui.wait_text(status, lambda t: "stopped" in t.lower(), what="stopped after the stop button")
        self.assertEqual(master.instance(made["id"])["status"], "stopped")
        # Started through the API, not the page: the page learns it from the event stream.
        master.ok("PATCH", f"/instances/{made['id']}", {"action": "start"})
        ui.wait_text(status, lambda t: "running" in t.lower(), what="running after a start elsewhere")
        ui.assert_not_reloaded()

    def test_log_tail_shows_the_instance_log_and_filters_by_level(self):
        ui, master = self.ui, self.master
        made = server_instance(master, "chatty")
        ui.signed_in()
        ui.open_detail(made["id"])
        # A restart logs "server running" again, live, while the page is open.
        master.ok("PATCH", f"/instances/{made['id']}", {"action": "restart"})
        line = ui.by("log-tail").get_by_test_id("log-line").filter(has_text="server running").last
        line.wait_for(state="visible")
        self.assertEqual(line.get_attribute("data-level"), "info")
        ui.by("log-level").select_option("error")
        line.wait_for(state="hidden")
        for shown in ui.by("log-tail").get_by_test_id("log-line").all():
            if shown.is_visible():
                self.assertEqual(shown.get_attribute("data-level"), "error")
        ui.by("log-level").select_option("info")
        line.wait_for(state="visible")

    def test_hostile_alias_renders_as_text(self):
        ui, master = self.ui, self.master
        made = server_instance(master, HOSTILE)
        ui.signed_in()
        alias = ui.cell(made["id"], "alias")
        alias.wait_for(state="visible")
        self.assertEqual(alias.text_content().strip(), HOSTILE)
        self.assertEqual(ui.row(made["id"]).locator("img").count(), 0)
        ui.open_detail(made["id"])
        self.assertEqual(ui.by("edit-alias").input_value(), HOSTILE)
        self.assertEqual(ui.by("detail").locator("img").count(), 0)
        ui.page.wait_for_timeout(300)  # an injected image's error handler would have run by now
        self.assertEqual(ui.dialogs, [])
        self.assertEqual(ui.csp_reports(), [])
        self.assertEqual(ui.errors, [])
        self.assertFalse(any(url.rstrip("/").endswith("/x") for url in ui.requests), ui.requests)

    def test_api_validation_message_appears_next_to_its_field(self):
        ui, master = self.ui, self.master
        ui.signed_in()
        ui.goto("new")
        ui.by("form-type").select_option("server")
        ui.by("form-alias").fill("refused")
        ui.by("form-key").fill("short")
        ui.by("form-tunnel").fill(f"127.0.0.1:{free_port()}")
        ui.by("form-target").fill(f"127.0.0.1:{free_port()}")
        ui.by("form-submit").click()
        # The API's own words ("the tunnel key is shorter than 16 characters").
        ui.wait_text(ui.by("error-key"), lambda t: "shorter than 16" in t, what="the key field's error")
        self.assertFalse(any(i["alias"] == "refused" for i in master.ok("GET", "/instances")))

    def test_editing_keeps_what_the_form_does_not_change(self):
        """An instance a script made (its query in another order) gets a new
        alias through the edit form, and tags holding , = and quotes survive
        a save: nothing the operator did not touch changes."""
        ui, master = self.ui, self.master
        url = f"server://{STRONG}@127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?log=debug&dns=5m&tls=0"
        made = master.ok("POST", "/instances", {"alias": "scripted", "url": url}, expect=201)
        tags = {"owner": "ops,dev", "a=b": "c", 'q"': "x"}
        master.ok("PATCH", f"/instances/{made['id']}", {"meta": {"tags": tags}})
        ui.signed_in()
        ui.row(made["id"]).wait_for(state="attached")
        ui.open_detail(made["id"])
        ui.by("action-edit").click()
        ui.by("form-alias").fill("renamed")
        ui.by("form-submit").click()
        ui.by("detail").wait_for(state="visible")
        wait_until(lambda: master.instance(made["id"])["alias"] == "renamed", 10, what="the new alias")
        self.assertEqual(master.instance(made["id"])["url"], url)  # no PUT: the same URL, spelled otherwise
        ui.by("save-tags").click()
        ui.by("edit-tags").fill(ui.by("edit-tags").input_value() + ", added=1")
        ui.by("save-tags").click()
        wait_until(lambda: master.instance(made["id"])["meta"]["tags"] == dict(tags, added="1"), 10,
                   what="the tags, hostile ones kept")

    def test_phone_width_shows_the_table_without_page_overflow(self):
        master = self.master
        made = server_instance(master, "a-rather-long-instance-alias-for-a-phone")
        ui = DashboardPage(self, master, viewport=PHONE)
        ui.signed_in()
        ui.row(made["id"]).wait_for(state="attached")
        table = ui.by("instances-table")
        self.assertTrue(table.is_visible())
        overflow = ui.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        self.assertLessEqual(overflow, 0, "the page scrolls sideways at 375 px")
        # Nor does the table hide its columns behind a scroll of its own.
        for element in (table, ui.cell(made["id"], "status"), ui.cell(made["id"], "rx")):
            box = element.bounding_box()
            self.assertIsNotNone(box)
            self.assertGreaterEqual(box["x"], 0)
            self.assertLessEqual(box["x"] + box["width"], PHONE["width"] + 0.5)


class KeyRotationTests(unittest.TestCase):
    """Rotating the API key from the info page (a master of its own: the
    key changes)."""

    def setUp(self):
        require_browser()
        self.master = class_master(self)
        self.ui = DashboardPage(self, self.master)

    def test_rotate_key_signs_out_and_the_old_key_is_refused(self):
        ui, master = self.ui, self.master
        old = master.key
        ui.signed_in()
        ui.goto("info")
        ui.wait_text(ui.by("info-version"), lambda t: tunnelpass.__version__ in t, what="the version")
        ui.by("rotate-key").click()
        ui.by("confirm-dialog").wait_for(state="visible")
        ui.by("confirm-yes").click()
        new = ui.wait_text(ui.by("new-key"), lambda t: re.search(r"[0-9a-f]{64}", t), what="the new key")
        new = re.search(r"[0-9a-f]{64}", new).group(0)
        self.assertNotEqual(new, old)
        master.key = new  # for the next test of this class in this process
        ui.by("key-input").wait_for(state="visible")  # signed out
        self.assertEqual(master.call("GET", "/instances", key=old)[0], 401)
        self.assertEqual(master.call("GET", "/instances", key=new)[0], 200)
        ui.sign_in(old)
        ui.wait_text(ui.by("sign-in-error"), lambda t: "wrong" in t.lower(), what="the old key refused")
        ui.sign_in(new)
        ui.by("instances-table").wait_for(state="visible")
