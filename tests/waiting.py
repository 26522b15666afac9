"""Polling helper for tests that wait on another process or thread (broker, agent, controller)."""

from __future__ import annotations

import time


def until(condition, timeout: float = 30.0) -> None:
    """Poll `condition()` every 50 ms; fail the test if it is not true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
