# -*- test-case-name: tests.test_master_store -*-
"""The rows the master's store keeps, checked on the way in and on load:
a bug elsewhere cannot persist a row the next start would choke on, and a
row damaged by hand is left out rather than misread."""

from __future__ import annotations

import math
import re

_ID = re.compile(r"[0-9a-f]{8}")
_SETTING = re.compile(r"[a-z][a-z0-9_]{0,63}")
COUNTERS = ("tcprx", "tcptx", "udprx", "udptx")
DESIRED = ("running", "stopped")
ROW_FIELDS = ("id", "alias", "url", "restart", "desired", "meta", "counters", "created")

def check_id(value) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"instance id must be 8 lowercase hex digits, not {value!r:.40}")
    return value


def _check_str(field: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, not {type(value).__name__}")
    return value


def check_meta(meta) -> dict:
    """``{"peer": {str: str}, "tags": {str: str}}`` (either part may be absent)."""
    if not isinstance(meta, dict) or not set(meta) <= {"peer", "tags"}:
        raise ValueError("meta must be an object with at most the fields peer and tags")
    for part, value in meta.items():
        if not isinstance(value, dict) or not all(isinstance(x, str) for item in value.items() for x in item):
            raise ValueError(f"meta.{part} must be an object of strings")
    return meta


def check_counters(counters) -> dict:
    """Exactly the four byte counters, each a non-negative int."""
    if not isinstance(counters, dict) or set(counters) != set(COUNTERS):
        raise ValueError(f"counters must be an object with exactly {', '.join(COUNTERS)}")
    for name in COUNTERS:
        value = counters[name]
        if type(value) is not int or value < 0:
            raise ValueError(f"counters.{name} must be a non-negative integer, not {value!r:.40}")
    return counters


def check_setting(name, value) -> tuple[str, str]:
    if not isinstance(name, str) or not _SETTING.fullmatch(name):
        raise ValueError(f"setting name must match {_SETTING.pattern}, not {name!r:.40}")
    return name, _check_str("setting value", value)


def check_row(row) -> dict:
    """Raise ValueError unless *row* is a complete, well-typed InstanceRow."""
    if not isinstance(row, dict):
        raise ValueError(f"an instance row must be a dict, not {type(row).__name__}")
    missing = [f for f in ROW_FIELDS if f not in row]
    extra = sorted(map(str, set(row) - set(ROW_FIELDS)))
    if missing or extra:
        raise ValueError(f"instance row: missing {missing}, unknown {extra}")
    check_id(row["id"])
    _check_str("alias", row["alias"])
    _check_str("url", row["url"])
    if not isinstance(row["restart"], bool):
        raise ValueError("restart must be a boolean")
    if row["desired"] not in DESIRED:
        raise ValueError(f"desired must be 'running' or 'stopped', not {row['desired']!r:.40}")
    check_meta(row["meta"])
    check_counters(row["counters"])
    created = row["created"]
    if type(created) not in (int, float) or not math.isfinite(created):
        raise ValueError(f"created must be a finite number, not {created!r:.40}")
    return row
