# -*- test-case-name: tests.browser.test_dashboard_browser -*-
"""Headless Chromium against a real master, for the dashboard's browser tests.

Playwright's sync API drives the distribution's Chromium (``/usr/bin/chromium``,
passed as ``executable_path``; ``playwright install`` is never needed).  The
sync API runs its own event loop on a greenlet of the calling thread, so the
tests call it from plain blocking test methods, like the e2e tests that wait
on subprocesses: nothing here touches the Twisted reactor.

Start-up costs are paid once: one browser per test process
(:func:`browser`), one master per test class (:func:`class_master`), both
ended when the process exits.  Each test gets a fresh browser context (its
own ``sessionStorage``) through :class:`DashboardPage`.

Without Playwright or without the browser, :func:`require_browser` raises
``SkipTest`` with the reason, so the suite still runs on a machine without
them (``.ci/run`` installs both).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import tempfile
import time

from twisted.trial.unittest import SkipTest

from tests.e2e.harness import ROOT, wait_until
from tests.e2e.master_harness import Master

#: The system browser (Debian's ``chromium`` package); ``TP_CHROMIUM``
#: names another executable.
CHROMIUM = os.environ.get("TP_CHROMIUM", "/usr/bin/chromium")

#: Set (e.g. ``TP_SCREENSHOTS=docs``) to write the documentation's
#: screenshots into that directory (relative to the checkout); unset, they
#: go under the test's temporary directory only.
SCREENSHOTS_VARIABLE = "TP_SCREENSHOTS"

#: Milliseconds a Playwright wait (a locator action, an ``expect``) lasts.
TIMEOUT_MS = 15_000

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 800}

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; it is in the [test] extras)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    return None


def require_browser() -> None:
    reason = unavailable()
    if reason:
        raise SkipTest(reason)


class _Process:
    """Fixtures that live as long as the test process: the Playwright
    driver, the browser, the class masters.  Ended in reverse order at
    exit."""

    playwright = None
    browser = None
    masters: dict = {}
    cleanups: list = []

    @classmethod
    def close(cls) -> None:
        while cls.cleanups:
            try:
                cls.cleanups.pop()()
            except Exception:
                pass


atexit.register(_Process.close)


def browser():
    """The process's headless Chromium, launched on first use."""
    require_browser()
    if _Process.browser is None:
        from playwright.sync_api import sync_playwright

        _Process.playwright = sync_playwright().start()
        _Process.cleanups.append(_Process.playwright.stop)
        _Process.browser = _Process.playwright.chromium.launch(headless=True, executable_path=CHROMIUM)
        _Process.cleanups.append(_Process.browser.close)
    return _Process.browser


class _Keeper:
    """Stands in for a test case where a fixture must outlive one test:
    ``mktemp`` under the current (trial temp) directory, ``addCleanup``
    run at process exit."""

    def __init__(self, name: str):
        self.base = os.path.abspath(os.path.join("browser-fixtures", name))
        os.makedirs(self.base, exist_ok=True)

    def mktemp(self) -> str:
        return tempfile.mkdtemp(dir=self.base)

    def addCleanup(self, function, *args, **kwargs) -> None:
        _Process.cleanups.append(lambda: function(*args, **kwargs))


def class_master(testcase, *args: str) -> Master:
    """The master shared by the tests of *testcase*'s class in this process
    (started by the first of them; its log is in ``browser-fixtures/``).
    Tests share it, so each one looks only at the instances it made."""
    require_browser()
    name = type(testcase).__name__
    master = _Process.masters.get(name)
    if master is None or master.process.poll() is not None:
        master = Master(_Keeper(name), "--report-interval", "1s", *args)
        _Process.masters[name] = master
    return master


def parse_bytes(text: str) -> float | None:
    """``"1.5 KiB"`` / ``"2 MB"`` / ``"300 B"`` -> bytes (binary units either
    way: the tests compare against lower bounds), None when *text* holds no
    amount."""
    found = re.search(r"([\d.]+)\s*([KMGT]?)i?B\b", text or "")
    if not found:
        return None
    return float(found.group(1)) * _UNITS[found.group(2)]


def screenshot_path(testcase, name: str) -> str:
    """Where the screenshot *name* goes: the directory ``TP_SCREENSHOTS``
    names (relative to the checkout), else the test's temp directory."""
    target = os.environ.get(SCREENSHOTS_VARIABLE)
    directory = os.path.join(ROOT, target) if target else os.path.abspath(testcase.mktemp())
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)


class DashboardPage:
    """One browser context and page on *master*'s dashboard, with what the
    page did recorded: JavaScript dialogs (dismissed), console messages,
    uncaught page errors, every response and every request URL."""

    def __init__(self, testcase, master: Master, viewport: dict | None = None):
        self.master = master
        self.url = f"http://127.0.0.1:{master.port}/api/"
        self.context = browser().new_context(viewport=viewport or DESKTOP)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.responses: list = []
        self.requests: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("console", lambda message: self.console.append((message.type, message.text)))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", lambda response: self.responses.append(response))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.testcase = testcase
        testcase.addCleanup(self._close)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _close(self) -> None:
        """Keep the page's last state (a screenshot, the console) in the
        test's temp directory, then close the context."""
        try:
            directory = os.path.abspath(self.testcase.mktemp())
            os.makedirs(directory, exist_ok=True)
            self.page.screenshot(path=os.path.join(directory, "last.png"), timeout=5_000)
            with open(os.path.join(directory, "console.txt"), "w") as f:
                for kind, text in self.console:
                    f.write(f"{kind}: {text}\n")
                for text in self.errors:
                    f.write(f"pageerror: {text}\n")
        except Exception:
            pass
        self.context.close()

    # -- navigation -------------------------------------------------------

    def open(self):
        """Load the dashboard; the main document's response."""
        return self.page.goto(self.url)

    def by(self, testid: str):
        return self.page.get_by_test_id(testid)

    def sign_in(self, key: str) -> None:
        self.by("key-input").fill(key)
        self.by("sign-in").click()

    def signed_in(self, key: str | None = None) -> None:
        """Open the dashboard and sign in; back on the instances table once
        it holds a row for every instance the master has (rows arrive one
        event at a time and move as they sort: a click before then can land
        on a row that is moving)."""
        self.open()
        self.sign_in(key or self.master.key)
        self.by("instances-table").wait_for(state="visible")
        expected = len(self.master.ok("GET", "/instances"))
        rows = self.page.get_by_test_id("instance-row")
        wait_until(lambda: rows.count() == expected, TIMEOUT_MS / 1000, interval=0.05,
                   what=f"{expected} rows in the instances table")

    def goto(self, section: str) -> None:
        """``instances``, ``info`` or ``new`` through the navigation bar."""
        self.by(f"nav-{section}").click()

    def mark(self) -> None:
        """Tag the window: :meth:`assert_not_reloaded` fails if the page was
        reloaded (or navigated away) since."""
        self.page.evaluate("window.__tpMark = 'kept'")

    def assert_not_reloaded(self) -> None:
        assert self.page.evaluate("window.__tpMark") == "kept", "the page was reloaded"

    # -- the instances table ------------------------------------------------

    def row(self, id: str):
        return self.page.locator(f'[data-testid="instance-row"][data-id="{id}"]')

    def cell(self, id: str, name: str):
        return self.row(id).get_by_test_id(f"cell-{name}")

    def open_detail(self, id: str) -> None:
        """Click the alias of *id*'s row (the link or button in the cell, or
        the cell itself when it is the link); wait for the detail page."""
        cell = self.cell(id, "alias")
        link = cell.locator("a, button")
        (link.first if link.count() else cell).click()
        detail = self.by("detail")
        detail.wait_for(state="visible")
        assert detail.get_attribute("data-id") == id, detail.get_attribute("data-id")

    def row_id(self, alias: str, timeout: float = 15.0) -> str:
        """The ``data-id`` of the row whose alias cell reads *alias*."""
        rows = self.page.get_by_test_id("instance-row").filter(
            has=self.page.get_by_test_id("cell-alias").get_by_text(alias, exact=True))
        rows.first.wait_for(state="attached", timeout=timeout * 1000)
        return rows.first.get_attribute("data-id")

    def text(self, locator) -> str:
        return (locator.text_content() or "").strip()

    def wait_text(self, locator, predicate, timeout: float = 15.0, what: str = "text") -> str:
        """Poll *locator*'s text until *predicate* holds; that text."""
        seen = {}

        def holds():
            seen["text"] = self.text(locator)
            return predicate(seen["text"])

        try:
            wait_until(holds, timeout, interval=0.1, what=what)
        except AssertionError:
            raise AssertionError(f"{what}: last text {seen.get('text')!r}\nconsole: {self.console[-10:]}") from None
        return seen["text"]

    def confirm_if_asked(self) -> None:
        """Answer yes if the confirmation dialog opened (for actions the
        dashboard may or may not confirm)."""
        dialog = self.by("confirm-dialog")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if dialog.is_visible():
                self.by("confirm-yes").click()
                return
            time.sleep(0.05)

    def csp_reports(self) -> list[str]:
        """Console lines where the browser refused something under the
        Content-Security-Policy (an inline handler, an inline script)."""
        return [text for _, text in self.console if "Content Security Policy" in text]

    def screenshot(self, name: str, **options) -> str:
        path = screenshot_path(self.testcase, name)
        self.page.screenshot(path=path, **options)
        return path
