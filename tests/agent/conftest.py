"""Fixtures of the agent tests: a real Mosquitto broker per test (tests/broker.py)."""

from __future__ import annotations

import pytest

from broker import Mosquitto, find_mosquitto


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin (apt-get install mosquitto)")


@pytest.fixture
def mosquitto(tmp_path):
    """A running Mosquitto on a free loopback port: .host, .port, .restart(), .stop()."""
    _need_mosquitto()
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def make_mosquitto(tmp_path):
    """Start brokers with options (`users=`, `tls=`); all are stopped after the test."""
    _need_mosquitto()
    brokers: list[Mosquitto] = []

    def make(**options) -> Mosquitto:
        brokers.append(Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **options).start())
        return brokers[-1]

    yield make
    for broker in brokers:
        broker.stop()
