# -*- test-case-name: tests.test_rules -*-
"""The limits one relay runs under: connection and session caps, timeouts,
the PROXY header it sends, the rate budget and dialer it shares.

The forwarder resolves them per rule (:meth:`tunnelpass.config.rules.RuleOptions.resolve`:
rule options over the global flags); the tunnel ends build one set from
their options.  Frozen, so a relay can keep the object it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """The limits of one relay (for a rule: the global flags overridden by its options)."""

    max_conns: int = 1000
    connect_timeout: float = 5.0
    idle: float = 600.0
    udp_idle: float = 60.0
    max_sessions: int = 1000
    proxy: str = "off"  # PROXY protocol header sent to the remote: off | v1 | v2
    accept_proxy: tuple = ()  # networks whose PROXY headers a TCP listener reads (--accept-proxy)
    limiter: object = field(default=None, compare=False)  # the instance's --rate budget, shared
    #: The instance's :class:`~tunnelpass.relay.dialsource.Dialer` (--dial, --dns); None: the
    #: kernel's source address and a fresh lookup per connection.
    dialer: object = field(default=None, compare=False)
    block: str = ""  # --block: digits of the first bytes refused at accept (tunnelpass.relay.block)
    lbs: int = 0  # --lbs: a target group's strategy (tunnelpass.relay.targets)
    fallback: float = 300.0  # --fallback-interval: lbs=2's time on a backup before trying the primary
