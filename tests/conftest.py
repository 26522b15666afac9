"""Shared fixtures: tiny GLM checkpoints written by transformers and by the factory, and bundles.

Everything is built here in seconds; nothing is downloaded.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from broker import Mosquitto, find_mosquitto

torch.set_num_threads(2)

# A cached autotune result measured beside other work is measured again at a later load that finds the box
# quieter: on a developer's machine running other jobs, a test expecting a cache hit would then see a fresh
# measurement. Off for the suite (processes it starts inherit this); tests/runtime/test_autotune.py's
# contention tests turn it back on.
os.environ.setdefault("EDGEGLM_AUTOTUNE_CONTENTION_LIMIT", "inf")

# A suite started in the background (`nohup ... &` from a script) inherits SIGINT ignored, and so do the processes
# it starts: the tests that Ctrl-C a build or the HTTP entry point would wait for an interrupt that never comes.
# A terminal's test run has Python's handler; so does this one (children then start with the default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny GLM trained for a few seconds on Python stdlib text (random weights give near-ties)."""
    from models.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", train_steps=150, seed=0)


@pytest.fixture(scope="session")
def fp32_bundle(trained_checkpoint, tmp_path_factory) -> Path:
    from models.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(trained_checkpoint, out, ExportOptions(precision="fp32", name="tiny", version="1.0.0"),
                  show_progress=False)
    return out


@pytest.fixture(scope="session")
def int8_bundle(trained_checkpoint, tmp_path_factory) -> Path:
    from models.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(trained_checkpoint, out, ExportOptions(precision="int8", name="tiny", version="1.0.0"),
                  show_progress=False)
    return out


@pytest.fixture(scope="session")
def signed_bundles(int8_bundle, tmp_path_factory):
    """The int8 bundle as signed versions 1.0.0 and 1.1.0, with the key that signed them."""
    from bundles import variant
    from ota.signing import generate_keypair, load_private_key

    root = tmp_path_factory.mktemp("signed")
    pair = generate_keypair(root / "keys", "fleet")
    key = load_private_key(pair.private_path)
    v1 = variant(int8_bundle, root / "v1", key, version="1.0.0")
    v2 = variant(int8_bundle, root / "v2", key, version="1.1.0")
    return {"root": root, "key": key, "keys": root / "keys", "v1": v1, "v2": v2}


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
