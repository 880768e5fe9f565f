# -*- test-case-name: tests.test_master_api -*-
"""The one exception the master's layers use to answer an API request
with an error: an HTTP status and NodePass's ``{"error": message}`` body."""

from __future__ import annotations


class ApiError(Exception):
    """Answer the request with *status* and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
