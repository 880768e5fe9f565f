# -*- test-case-name: tests.test_master_dashboard -*-
"""The master's built-in dashboard: static files shipped in the package
(``tunnelpass/master/dashboard/``), served under the API's prefix.

``{prefix}/`` is ``index.html``; its scripts, style and icon are
``{prefix}/ui/NAME`` for the names of :data:`FILES` only (an allow-list: no
path is ever joined to a directory, so no ``..`` or encoded trick reaches a
file); ``/`` redirects to ``{prefix}/``.  The files are public: everything
the dashboard shows comes from the API with the ``X-API-Key`` header, which
the page keeps in ``sessionStorage`` (never in a URL or a cookie).

Every dashboard response, 404s and refusals included, carries
:data:`HEADERS`: a Content-Security-Policy with no inline script or style
and ``connect-src 'self'``, no framing, no sniffing, no referrer.  The
``Host`` check of :mod:`tunnelpass.master.api` runs before any of this, so
a DNS-rebinding page cannot load the dashboard either.
"""

from __future__ import annotations

import os

DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")

_JS = b"text/javascript; charset=utf-8"

#: name -> Content-Type: every file the dashboard may serve.
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "icon.svg": b"image/svg+xml",
    "app.js": _JS,
    "api.js": _JS,
    "store.js": _JS,
    "actions.js": _JS,
    "dom.js": _JS,
    "format.js": _JS,
    "instances.js": _JS,
    "form.js": _JS,
    "detail.js": _JS,
    "chart.js": _JS,
    "info.js": _JS,
}

CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = ((b"Content-Security-Policy", CSP),
           (b"X-Content-Type-Options", b"nosniff"),
           (b"Referrer-Policy", b"no-referrer"),
           (b"X-Frame-Options", b"DENY"),
           (b"Cache-Control", b"no-cache"))


def load_files(directory: str = DIRECTORY, names=FILES) -> dict[str, bytes]:
    """Every allowed file's bytes (*names* in *directory*: the dashboard's
    by default, the ``/docs`` page's for the API), read once: a missing one
    is a packaging error, raised at start rather than found by the first
    visitor."""
    files = {}
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    return files


class Dashboard:
    """Which paths are the dashboard's, and their answers.

    :meth:`answer` is sans-IO: a path in, ``(status, headers, body)`` out,
    where ``body`` is bytes, or ``None`` for "not found" (the API writes its
    JSON 404)."""

    def __init__(self, prefix: str, files: dict[str, bytes] | None = None):
        self.root = prefix.rstrip("/")          # "/api"
        self.index = self.root + "/"            # "/api/"
        self.assets = self.root + "/ui/"        # "/api/ui/"
        self.files = load_files() if files is None else files

    def owns(self, path: str) -> bool:
        """Whether *path* is the dashboard's (so it gets :data:`HEADERS`)."""
        return path in ("/", self.root, self.index) or path.startswith(self.assets)

    def answer(self, path: str):
        """``(status, [(header, value)], body or None)`` for a GET of *path*."""
        if path in ("/", self.root) and path != self.index:
            return 302, [(b"Location", self.index.encode("ascii")),
                         (b"Content-Type", b"text/plain; charset=utf-8")], b""
        if path == self.index:
            name = "index.html"
        else:
            name = path[len(self.assets):]
        if name not in FILES or name not in self.files:
            return 404, [], None
        return 200, [(b"Content-Type", FILES[name])], self.files[name]
