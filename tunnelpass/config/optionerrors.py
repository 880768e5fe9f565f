# -*- test-case-name: tests.test_tap -*-
"""What an option error says: one line, and where to go from there.

twistd answers a :class:`~twisted.python.usage.UsageError` with its whole
usage text and exit status 1; :meth:`tunnelpass.tap.Options.parseOptions`
prints :func:`usage_line` instead and exits :data:`USAGE_ERROR`.  A
traffic-forwarder flag gets the line that names tunnelpass's own
(:func:`traffic_forwarder_hint`).  Pure functions: text in, text out.
"""

from __future__ import annotations

import os

from twisted.python import usage

#: Exit status of an option error (as argparse and getopt tools use).
USAGE_ERROR = 2


def usage_line(error: usage.UsageError) -> str:
    """The one line an option error prints: the error and where help is."""
    import sys

    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    program = "twist" if program == "twist" else "twistd -n --pidfile="  # runs as given, as printed commands do
    text = " ".join(str(error).split())  # one line, whatever the message held
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # no terminal escapes, no surrogates
    return f"tunnelpass: {text} (see: {program} tunnelpass --help)"


def keyless_client_message(tunnel: str, target: str, url: str | None) -> str:
    """Why a client without a key is refused, and how to get a key.

    NodePass derives a missing key from the port, which anyone can guess;
    tunnelpass never does.  The fix is a server started without a key: it
    generates a strong one and logs a token for the client."""
    port = tunnel.rpartition(":")[2]
    server = (f"twistd -n --pidfile= tunnelpass --mode server --tunnel 0.0.0.0:{port} --target HOST:PORT"
              if url is None else f"twistd -n --pidfile= tunnelpass server://0.0.0.0:{port}/HOST:PORT")
    what = f"client://{tunnel}/{target} has no key" if url is not None else \
        "--mode client needs the server's key (--token, or --key)"
    return (f"{what}: NodePass would derive one from the port, which anyone can guess, so "
            f"tunnelpass does not. Start the server without a key ({server}): it generates a strong key and "
            f"logs a token to paste here: twistd -n --pidfile= tunnelpass --mode client --token TOKEN "
            f"--target {target}")


#: traffic-forwarder's flags (Go's flag package takes them with one dash or
#: two) -> the line that tells its users what to write here instead.  Caught
#: before getopt, which reads ``-conf`` as ``-c onf`` (--config onf) and
#: ``-max-conns`` as ``-m ax-conns`` (--mode ax-conns).
TRAFFIC_FORWARDER_HINTS = {
    "-conf": "-conf is traffic-forwarder's flag: use --config FILE "
             "(the same 'local_port | remote_host | remote_port' file works)",
    "-timeout": "-timeout is traffic-forwarder's flag: use --connect-timeout DURATION (time to reach the remote) "
                "and --idle DURATION (close connections quiet that long)",
    "--timeout": "--timeout is traffic-forwarder's flag: use --connect-timeout DURATION (time to reach the remote) "
                 "and --idle DURATION (close connections quiet that long)",
    "-max-conns": "-max-conns is traffic-forwarder's flag: use --max-conns N (concurrent connections per rule)",
}


def traffic_forwarder_hint(argv) -> str | None:
    """The hint for the first traffic-forwarder flag in *argv* (``-conf FILE``
    or ``-conf=FILE``), if any; arguments after ``--`` are not options."""
    for argument in argv:
        if argument == "--":
            break
        hint = TRAFFIC_FORWARDER_HINTS.get(argument.split("=", 1)[0])
        if hint:
            return hint
    return None
