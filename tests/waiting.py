"""Polling helper for tests that wait on another process or thread (broker, agent, controller)."""

from __future__ import annotations

import time


def until(condition, timeout: float = 30.0) -> None:
    """Poll `condition()` every 50 ms; fail the test if it is not true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class StepGate:
    """An `on_step` for a batching scheduler (or the HTTP server's `_on_step`, which each scheduler it makes takes)
    that, once `arm()`ed, holds the worker in its next decode step until `release()`: "while a request decodes" is
    then a fact of the test, not a race a fast or a starved box loses (a 4000-token request ending before the test
    acted). `held` is set when the worker is held."""

    def __init__(self, then=None, at: int = 1):
        import threading

        self.then = then or (lambda n: None)  # what the step did before (metrics)
        self.at, self._steps = at, 0  # held in the at-th step after arm() (tokens before it are out)
        self._armed, self.held, self._go = False, threading.Event(), threading.Event()

    def arm(self) -> "StepGate":
        self._armed = True
        return self

    def __call__(self, batch_size: int) -> None:
        self.then(batch_size)
        if self._armed and not self._go.is_set():
            self._steps += 1
            if self._steps >= self.at:
                self.held.set()
                self._go.wait(120)

    def release(self) -> None:
        self._go.set()
