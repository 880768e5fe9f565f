# -*- test-case-name: tests.test_splice -*-
"""Kernel pipes for the zero-copy relay (:mod:`tunnelpass.relay.splice`): a small
shared pool, so that a direction borrows a pipe only while it moves data
and idle connections hold none."""

from __future__ import annotations

import fcntl
import os

#: Bytes one pipe holds: the most one direction buffers in the kernel.
PIPE_SIZE = 256 * 1024
#: Idle pipes kept for reuse (each is two fds).
POOL_LIMIT = 32

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class PipePool:
    """Reusable non-blocking pipes, ``(read_fd, write_fd)``."""

    def __init__(self, limit: int = POOL_LIMIT):
        self.limit = limit
        self.idle: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int, int]:
        """``(read_fd, write_fd, capacity)``; the capacity is what the kernel
        granted, which may be less than PIPE_SIZE (pipe-user-pages-soft)."""
        if self.idle:
            return self.idle.pop()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe works, a little slower
        try:
            capacity = fcntl.fcntl(write_fd, _F_GETPIPE_SZ)
        except OSError:
            capacity = 4096  # the smallest pipe Linux hands out
        return read_fd, write_fd, capacity

    def give(self, pipe: tuple[int, int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self.idle) < self.limit:
            self.idle.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])


PIPES = PipePool()
