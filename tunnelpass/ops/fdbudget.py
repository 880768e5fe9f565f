# -*- test-case-name: tests.test_fdbudget -*-
"""The open-files budget: how many descriptors the idle pool may hold, when
to stop dialling pool connections, and what running out has cost.

Every tunnelled user costs two descriptors on each side (its own socket and
a pool connection on one, the pool connection and the target leg on the
other), a forwarded one two.  A pool allowed to grow to ``--max-pool``
(1,024 by default) on a process limited to the common 1,024 open files
would leave users nothing, so:

* the idle pool is bounded by :func:`pool_bound` -- a quarter of
  ``RLIMIT_NOFILE`` -- as well as by ``--max-pool``;
* the client dials a pool connection only while :func:`dial_allowance`
  says the process has room for it *and* for the leg it will need once a
  user takes it;
* a listener refuses a connection whose descriptor would eat into the last
  :func:`reserve_for` descriptors, kept for work already admitted (its
  dials, splice pipes, UDP sockets) -- see :mod:`tunnelpass.ops.fdport`;
* whatever still runs out (``EMFILE``/``ENFILE`` on accept, on a dial, on a
  UDP socket) is counted per place in :class:`Descriptors`, the connections
  it cost are counted as refused by their listener, and a throttled warning
  names the limit and what to change.

The functions are pure; :class:`Descriptors` takes an injected clock and an
injected way to count open descriptors.
"""

from __future__ import annotations

import errno
import os
import resource

from twisted.logger import Logger

from tunnelpass.ops.logs import Throttle
from tunnelpass.ops.metrics import Sample

#: The idle pool may hold at most this share of RLIMIT_NOFILE.
POOL_SHARE = 4  # a quarter
#: Where a descriptor can fail to come (the ``where`` label of fd_exhausted).
PLACES = ("accept", "dial", "udp")
#: errno values that mean "no descriptor (or no memory for one) now".
RAN_OUT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds between two warnings about running out.
WARN_INTERVAL = 10.0
#: How old a count of open descriptors may be when plenty are free / few are.
RELAXED_AGE, TIGHT_AGE = 1.0, 0.05

log = Logger(namespace="tunnelpass.fd")


def soft_limit() -> int:
    """This process's RLIMIT_NOFILE (soft); a huge number if unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def pool_bound(limit: int, max_pool: int) -> int:
    """The most idle pool connections a process with *limit* open files may
    keep: ``--max-pool``, but never more than a quarter of the limit (the
    rest is for users: each costs two descriptors per side)."""
    return max(1, min(max_pool, limit // POOL_SHARE))


def reserve_for(limit: int) -> int:
    """Descriptors a listener leaves free for connections it already took
    (their dials, splice pipes, TLS, UDP sockets): 1/256 of the limit, at
    least 4 and at most 64."""
    return max(4, min(64, limit // 256))


def dial_allowance(limit: int, open_now: int, committed: int, reserve: int) -> int:
    """How many more pool connections may be dialled now.

    *committed* pool connections (idle or being dialled) already hold one
    descriptor each and will need one more when a user takes them (the
    target leg, or the user's own socket); a new one needs both.
    """
    return max(0, (limit - reserve - open_now - committed) // 2)


def ran_out(error) -> int | None:
    """The errno if *error* (an exception, or a Twisted Failure's value) says
    the process or the system has no descriptor to give, else None.

    Twisted reports it differently per place: ``OSError`` from ``socket()``
    and ``accept()``, ``ConnectBindError(osError=EMFILE)`` from
    ``connectTCP``, ``CannotListenError(socketError=OSError)`` from
    ``listenUDP``.
    """
    error = getattr(error, "value", error)
    for candidate in (getattr(error, "errno", None), getattr(error, "osError", None),
                      getattr(getattr(error, "socketError", None), "errno", None)):
        if candidate in RAN_OUT:
            return candidate
    return None


def udp_socket_failed(owner, error) -> None:
    """*owner* (a UDP listener or egress: its ``stats``, ``name`` and the
    ``descriptors`` its service gave it) could not open a session's socket:
    if for want of a descriptor, the session is refused, and counted."""
    code = ran_out(error)
    if code is None:
        return
    owner.stats.udp_refused += 1
    descriptors = getattr(owner, "descriptors", None)
    if descriptors is not None:
        descriptors.ran_out("udp", code, lost=1, listener=owner.name)


def count_open() -> int | None:
    """Descriptors this process has open (Linux ``/proc``, BSD/macOS
    ``/dev/fd``), or None where neither exists.  O(open descriptors): call
    it at a low rate."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # listdir's own descriptor
        except OSError:
            continue
    return None


class Descriptors:
    """One process's descriptor budget and the record of running out."""

    def __init__(self, clock, limit: int | None = None, count=count_open, warn_interval: float = WARN_INTERVAL):
        self.clock = clock
        self._count = count
        self.exhausted = dict.fromkeys(PLACES, 0)
        self.refused = 0  # connections lost to it
        self._warnings = Throttle(clock, warn_interval)
        self._lost_since_warning = 0
        self._open: int | None = None
        self._sampled_at: float | None = None
        self.set_limit(limit if limit is not None else soft_limit())

    def set_limit(self, limit: int) -> None:
        """Adopt RLIMIT_NOFILE as it is now (after ``raise_fd_limit``)."""
        self.limit = limit
        self.reserve = reserve_for(limit)
        #: Accepted descriptors from this number on are in the reserve.
        self.ceiling = limit - self.reserve

    # Budget

    def pool_bound(self, max_pool: int) -> int:
        return pool_bound(self.limit, max_pool)

    def log_pool_bound(self, max_pool: int) -> None:
        """At startup: say so when the open-files limit, not ``--max-pool``,
        bounds the idle pool."""
        bound = self.pool_bound(max_pool)
        if bound < max_pool:
            log.info("idle pool bounded to {bound} connections (a quarter of the open-files limit {limit}; "
                     "--max-pool {max_pool})", bound=bound, limit=self.limit, max_pool=max_pool,
                     event="pool_fd_bound")

    def open_now(self) -> int | None:
        """Open descriptors, recounted when the last count is old: after
        :data:`RELAXED_AGE` while a quarter of the limit is free, after
        :data:`TIGHT_AGE` when fewer are."""
        now = self.clock.seconds()
        if self._open is not None:
            age = now - self._sampled_at
            tight = self.limit - self._open < self.limit // 4
            if 0 <= age < (TIGHT_AGE if tight else RELAXED_AGE):
                return self._open
        self._open, self._sampled_at = self._count(), now
        return self._open

    def spend(self, count: int = 1) -> None:
        """*count* descriptors were just opened (dials): the cached count
        includes them until the next recount."""
        if self._open is not None:
            self._open += count

    def dial_allowance(self, committed: int) -> int | None:
        """Pool connections that may be dialled now; None: no limit known."""
        open_now = self.open_now()
        if open_now is None:
            return None
        return dial_allowance(self.limit, open_now, committed, self.reserve)

    def headroom(self, committed: int) -> int | None:
        """Descriptors left once *committed* connections each get the one
        more they will need; None: no limit known."""
        open_now = self.open_now()
        if open_now is None:
            return None
        return self.limit - self.reserve - open_now - committed

    # Running out

    def ran_out(self, where: str, code: int | str = errno.EMFILE, lost: int = 0, listener: str = "") -> None:
        """A descriptor could not be had at *where* (``accept``, ``dial``,
        ``udp``), costing *lost* connections or sessions (counted refused by
        the caller's listener): count it, and warn at most every 10 s."""
        self.exhausted[where] += 1
        self.refused += lost
        self._lost_since_warning += lost
        if not self._warnings.ready():
            return
        lost, self._lost_since_warning = self._lost_since_warning, 0
        if code == "reserve":
            name = f"only the {self.reserve} kept for connections in progress were left"
        else:
            name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else code
        log.warn(
            "out of file descriptors ({error} at {where}{on}): {count} time(s), {lost} connection(s) refused "
            "since the last warning; the open-files limit is {limit}: raise it (LimitNOFILE= in the systemd "
            "unit, ulimit -n) or lower --max-pool, --slot or --max-conns",
            error=name, where=where, on=f" on {listener}" if listener else "", count=self._warnings.take_count(),
            lost=lost, limit=self.limit, event="fd_exhausted",
        )

    def samples(self, pool: int | None = None) -> list[Sample]:
        """For ``--metrics``; *pool*: the idle pool's descriptor bound."""
        samples = [Sample("fd_limit", "gauge", "the open-files limit (RLIMIT_NOFILE)", self.limit)]
        open_now = self._count()
        if open_now is not None:
            samples.append(Sample("fd_open", "gauge", "open file descriptors", open_now))
        samples += [Sample("fd_exhausted", "counter", "times a descriptor could not be had (EMFILE, ENFILE, "
                           "or the last few kept for connections already admitted), by where",
                           count, {"where": where}) for where, count in self.exhausted.items()]
        if pool is not None:
            samples.append(Sample("pool_fd_bound", "gauge",
                                  "idle pool connections the open-files limit allows", pool))
        return samples
