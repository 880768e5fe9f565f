# -*- test-case-name: tests.test_targets -*-
"""Target groups: ``--target a:1,b:2`` and the load-balancing strategy
``--lbs`` (URL ``lbs=``, NodePass's values).

Sans-IO: :meth:`TargetGroup.order` says which targets to try, in order, for
one new connection; the dialler reports each attempt back with
:meth:`~TargetGroup.failed` / :meth:`~TargetGroup.succeeded`, and the
latency probe (:mod:`tunnelpass.relay.probe`) with :meth:`~TargetGroup.probed`.
A failed target goes into a cool-down during which it is only tried after
every healthy one, so a group whose targets are all down is still tried,
never refused outright.  Strategies:

``0`` round robin (the default): each connection starts one further round
the group, healthy targets first.

``1`` lowest latency: each target's TCP-connect time is measured every
report interval (and at start); connections go to the lowest measured
latency, then to targets not measured yet, unreachable ones last.

``2`` primary/backup: the first target is used while it works; when it
fails, the next in order that connects becomes the active one.  After
:data:`FALLBACK_INTERVAL` (``--fallback-interval``, NodePass's
``NP_FALLBACK_INTERVAL``, 5 minutes) on a backup, the primary is tried
first again -- unless its latest probe failed -- and takes over once a
connection to it succeeds.
"""

from __future__ import annotations

COOL_DOWN = 30.0
#: lbs=2: seconds on a backup before the primary is tried again (NodePass: 5m).
FALLBACK_INTERVAL = 300.0
STRATEGIES = {0: "round robin", 1: "lowest latency", 2: "primary/backup"}
#: A probe that could not connect: sorts after every measured latency.
UNREACHABLE = float("inf")


class TargetGroup:
    #: lbs=2: called with (old, new) indices when the active target changes.
    on_switch = None

    def __init__(self, targets: list[tuple[str, int]], clock, cool_down: float = COOL_DOWN,
                 strategy: int = 0, fallback: float = FALLBACK_INTERVAL):
        if not targets:
            raise ValueError("a target group needs at least one target")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown load-balancing strategy {strategy!r}")
        self.targets = list(targets)
        self.clock = clock
        self.cool_down = cool_down
        self.strategy = strategy
        self.fallback = fallback
        self._next = 0
        self._unhealthy_until = [0.0] * len(self.targets)
        #: lbs=1/2: the latest probe's TCP-connect seconds (None: not measured
        #: yet, :data:`UNREACHABLE`: the probe could not connect).
        self.latency: list[float | None] = [None] * len(self.targets)
        #: lbs=2: the target in use, and since when (for the fallback interval).
        self.active = 0
        self._active_since = 0.0

    def order(self) -> list[int]:
        """Indices to try for one connection."""
        count = len(self.targets)
        if self.strategy == 1:
            rotation = sorted(range(count), key=self._latency_key)
        elif self.strategy == 2:
            first = self.active
            if first != 0 and self.clock.seconds() - self._active_since >= self.fallback \
                    and self.latency[0] != UNREACHABLE:
                first = 0  # time to try failing back
            rotation = [first] + [i for i in range(count) if i != first]
        else:
            start = self._next
            self._next = (self._next + 1) % count
            rotation = [(start + i) % count for i in range(count)]
        now = self.clock.seconds()
        healthy = [i for i in rotation if self._unhealthy_until[i] <= now]
        if self.strategy == 2 and rotation[0] != self.active:
            # The failback attempt goes first even while the primary cools down.
            healthy = [rotation[0]] + [i for i in healthy if i != rotation[0]]
        cooling = [i for i in rotation if i not in healthy]
        if self.strategy == 2:
            cooling.sort()  # by priority
        return healthy + cooling

    def _latency_key(self, index: int):
        latency = self.latency[index]
        if latency is None:
            return (1, 0.0, index)
        return (2 if latency == UNREACHABLE else 0, latency, index)

    def failed(self, index: int) -> None:
        now = self.clock.seconds()
        self._unhealthy_until[index] = now + self.cool_down
        if self.strategy == 2 and index == 0 and self.active != 0:
            self._active_since = now  # the failback failed: stay on the backup another interval

    def succeeded(self, index: int) -> None:
        self._unhealthy_until[index] = 0.0
        if self.strategy == 2 and index != self.active:
            old, self.active = self.active, index
            self._active_since = self.clock.seconds()
            if self.on_switch is not None:
                self.on_switch(old, index)

    def healthy(self, index: int) -> bool:
        return self._unhealthy_until[index] <= self.clock.seconds()

    def probed(self, index: int, latency: float | None) -> None:
        """A probe's result: connect time in seconds, or None if it failed."""
        self.latency[index] = UNREACHABLE if latency is None else latency
        if latency is not None and self.strategy == 1:
            self._unhealthy_until[index] = 0.0  # it answers again

    def to_probe(self) -> list[int]:
        """Targets a probe round should measure: all of them for lbs=1; for
        lbs=2 the primary while a backup is active (its failback gate)."""
        if len(self.targets) < 2:
            return []
        if self.strategy == 1:
            return list(range(len(self.targets)))
        if self.strategy == 2 and self.active != 0:
            return [0]
        return []

    def preferred(self) -> int:
        """The target a new connection would try first (without moving the
        round-robin position)."""
        if self.strategy == 0:
            return self._next
        return self.order()[0]
