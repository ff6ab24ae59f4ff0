"""Deadline-bounded waits: poll a condition, fail with what did not happen (no fixed sleeps in the tests)."""

from __future__ import annotations

import time

import pytest


def wait_for(condition, timeout: float, what: str, period: float = 0.05):
    """Poll condition() until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)  # polling period of a deadline-bounded wait
