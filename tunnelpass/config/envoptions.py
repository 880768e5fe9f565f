# -*- test-case-name: tests.test_tap -*-
"""Options from the environment: ``TUNNELPASS_<OPTION>`` for every option
(``--max-conns`` -> ``TUNNELPASS_MAX_CONNS``) and NodePass's ``NP_*``
names for the ones NodePass has, so a NodePass deployment keeps its
environment.  An unknown ``TUNNELPASS_`` variable is an error (a typo would
otherwise be silently ignored); other variables are none of ours.
"""

from __future__ import annotations

from twisted.python import usage

ENV_PREFIX = "TUNNELPASS_"

#: Values a flag (an option without a value) may take: TUNNELPASS_WEAK_KEY=1.
_FLAG_VALUES = {"0": False, "1": True, "false": False, "true": True}

#: NodePass environment variables -> options (NodePass users keep their setup).
NP_ALIASES = {
    "NP_SEMAPHORE_LIMIT": "slot",
    "NP_POOL_GET_TIMEOUT": "pool-timeout",
    "NP_REPORT_INTERVAL": "report-interval",
    "NP_SHUTDOWN_TIMEOUT": "shutdown-timeout",
    "NP_RELOAD_INTERVAL": "reload-interval",
    "NP_TCP_DIAL_TIMEOUT": "connect-timeout",
    "NP_HANDSHAKE_TIMEOUT": "handshake-timeout",
    "NP_FALLBACK_INTERVAL": "fallback-interval",
}


def environment_arguments(environ, parsers: dict, flags: tuple) -> list[str]:
    """``TUNNELPASS_*`` and NodePass ``NP_*`` variables as command-line
    arguments (placed first, so flags given on the command line override
    them).  *parsers*: option -> parser (each value is checked, so a bad
    variable is named in the error); *flags*: options without a value."""
    known = {ENV_PREFIX + name.upper().replace("-", "_"): name for name in (*parsers, *flags)}
    arguments = []
    for variable in sorted(environ):
        if variable in NP_ALIASES:
            name = NP_ALIASES[variable]
            value = environ[variable]
            try:
                parsers[name](value)
            except ValueError as e:
                raise usage.UsageError(f"environment variable {variable} (--{name}): {e}") from None
            arguments.append(f"--{name}={value}")
            continue
        if not variable.startswith(ENV_PREFIX):
            continue
        name = known.get(variable)
        if name is None:
            raise usage.UsageError(
                f"unknown environment variable {variable}; known: {', '.join(sorted(known))}"
            )
        value = environ[variable]
        if name in flags:
            if value.lower() not in _FLAG_VALUES:
                raise usage.UsageError(f"environment variable {variable}: use 1 or 0")
            arguments += [f"--{name}"] if _FLAG_VALUES[value.lower()] else []
            continue
        try:
            parsers[name](value)
        except ValueError as e:
            raise usage.UsageError(f"environment variable {variable}: {e}") from None
        arguments.append(f"--{name}={value}")
    return arguments
