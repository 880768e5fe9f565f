# -*- test-case-name: tests.test_startup -*-
"""The one exception a service raises when it cannot start.

Services never end the process nor install signal handlers: they raise
:class:`StartupError` from ``privilegedStartService``/``startService``, and
the root of the service tree (:class:`tunnelpass.tap.TunnelpassService`,
through :func:`tunnelpass.ops.startup.guard_start`) turns it into one critical
``startup_failed`` line and exit status 1.  That keeps several services
able to share one process: only the root decides what a failure means.
"""

from __future__ import annotations


class StartupError(Exception):
    """A service cannot start; ``str()`` is the one line shown to the
    operator, naming the option and the reason (``--tunnel: cannot listen
    on 127.0.0.1:1: Address already in use``), without a ``tunnelpass:``
    prefix."""
