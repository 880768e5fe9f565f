# -*- test-case-name: tests.test_targets -*-
"""Target groups: ``--target a:1,b:2``, round robin with failover (issue 4, part).

Sans-IO: :meth:`TargetGroup.order` says which targets to try, in order, for
one new connection -- starting one further round the group each time,
healthy targets first; :meth:`TargetGroup.failed` puts a target in a
cool-down during which it is only tried after every healthy one (so a group
whose targets are all down still gets tried, never refused outright).
"""

from __future__ import annotations

COOL_DOWN = 30.0


class TargetGroup:
    def __init__(self, targets: list[tuple[str, int]], clock, cool_down: float = COOL_DOWN):
        if not targets:
            raise ValueError("a target group needs at least one target")
        self.targets = list(targets)
        self.clock = clock
        self.cool_down = cool_down
        self._next = 0
        self._unhealthy_until = [0.0] * len(self.targets)

    def order(self) -> list[int]:
        """Indices to try for one connection."""
        count = len(self.targets)
        start = self._next
        self._next = (self._next + 1) % count
        rotation = [(start + i) % count for i in range(count)]
        now = self.clock.seconds()
        healthy = [i for i in rotation if self._unhealthy_until[i] <= now]
        return healthy + [i for i in rotation if self._unhealthy_until[i] > now]

    def failed(self, index: int) -> None:
        self._unhealthy_until[index] = self.clock.seconds() + self.cool_down

    def succeeded(self, index: int) -> None:
        self._unhealthy_until[index] = 0.0

    def healthy(self, index: int) -> bool:
        return self._unhealthy_until[index] <= self.clock.seconds()
