"""The agent's prefix cache ([cache] settings): a second request sharing a long prefix is a hit on
/metrics with the output of a plain run, the size applies live from desired config, the cache
follows the model served (OTA activation) and finds the previous model's prefixes again after a rollback, and
persisted prefixes survive an agent restart."""

from __future__ import annotations

import dataclasses
import http.client
import json

import pytest

from agent.config import load_config
from agent.daemon import Agent
from agent.topics import DesiredConfig
from runtime.generate import SamplingParams, generate

SYSTEM = ("You are the assistant of a small edge box. Answer in one short line of Python, and never "
          "import anything that is not in the standard library.\n" * 3)
SUFFIXES = ["def main(argv=None):\n", "class Parser:\n", "import os\n"]
BLOCK = 16


def post(port: int, prompt: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 12}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    return json.loads(body)["choices"][0]["text"]


def cache_metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("edgeglm_prefix_cache_")}


def plain(model, prompt: str) -> str:
    """The completion without any prefix cache (the agent is idle: its engine is free)."""
    ids = model.tokenizer.encode(prompt).ids
    return model.tokenizer.decode(list(generate(model.engine, ids, SamplingParams(max_tokens=12))),
                                  skip_special_tokens=True)


def reusable(model, first: str, second: str) -> int:
    """Prompt tokens of `second` that blocks stored by `first` can serve."""
    a, b = model.tokenizer.encode(first).ids, model.tokenizer.encode(second).ids
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(common // BLOCK, (len(b) - 1) // BLOCK) * BLOCK


@pytest.fixture
def config(int8_bundle, tmp_path):
    return load_config(None, {"model.bundle": str(int8_bundle), "http.port": 0, "ota.require_signature": False,
                              "model.slots_dir": str(tmp_path / "state"), "cache.block_tokens": BLOCK})


def test_a_shared_prefix_is_a_hit_with_identical_output_and_the_size_applies_live(config, fp32_bundle):
    agent = Agent(config)
    agent.start()
    try:
        model, port = agent.model, agent.http.port
        first, second = SYSTEM + SUFFIXES[0], SYSTEM + SUFFIXES[1]
        expected = plain(model, second)
        assert post(port, first) == plain(model, first)
        assert cache_metrics(port)["edgeglm_prefix_cache_hits_total"] == 0
        assert post(port, second) == expected
        m = cache_metrics(port)
        assert m["edgeglm_prefix_cache_hits_total"] == 1 and m["edgeglm_prefix_cache_lookups_total"] == 2
        assert m["edgeglm_prefix_cache_hit_tokens_total"] == reusable(model, first, second) >= 3 * BLOCK
        assert m["edgeglm_prefix_cache_bytes"] > 0

        agent._apply_desired(DesiredConfig(version=2, settings={"cache": {"max_mb": 0}}))  # live: off
        assert agent.last_config_error is None and cache_metrics(port)["edgeglm_prefix_cache_bytes"] == 0
        assert post(port, second) == expected
        assert cache_metrics(port)["edgeglm_prefix_cache_hits_total"] == 1

        agent._apply_desired(DesiredConfig(version=3, settings={"cache": {"max_mb": 16}}))  # on again
        post(port, first)
        assert post(port, second) == expected and cache_metrics(port)["edgeglm_prefix_cache_hits_total"] == 2

        agent.activate(fp32_bundle)  # what OTA does: another model, so nothing cached may serve it
        other = agent.model
        assert post(agent.http.port, second) == plain(other, second)
        m = cache_metrics(port)
        assert m["edgeglm_prefix_cache_hits_total"] == 2 and m["edgeglm_prefix_cache_lookups_total"] == 5

        agent.activate(config.model.bundle)  # a rollback to the model before: its prefixes come back from disk
        back, third = agent.model, SYSTEM + SUFFIXES[2]
        expected = plain(back, third)
        assert post(port, third) == expected
        m = cache_metrics(port)
        assert m["edgeglm_prefix_cache_hits_total"] == 3
        assert m["edgeglm_prefix_cache_hit_tokens_total"] == 2 * reusable(model, first, second) + reusable(back, second, third)
    finally:
        agent.shutdown(deadline=5.0)


def test_a_persisted_prefix_serves_the_agent_after_a_restart(config):
    agent = Agent(config)
    agent.start()
    try:
        post(agent.http.port, SYSTEM + SUFFIXES[0])
        post(agent.http.port, SYSTEM + SUFFIXES[1])  # the reused blocks are written to disk
    finally:
        agent.shutdown(deadline=5.0)
    assert list((config.model.slots_dir / "prefix-cache").glob("*/*.kvb"))
    restarted = Agent(config)
    restarted.start()
    try:
        prompt = SYSTEM + SUFFIXES[2]
        assert post(restarted.http.port, prompt) == plain(restarted.model, prompt)
        m = cache_metrics(restarted.http.port)
        assert m["edgeglm_prefix_cache_hits_total"] == 1 and m["edgeglm_prefix_cache_hit_tokens_total"] >= 3 * BLOCK
    finally:
        restarted.shutdown(deadline=5.0)


def test_the_prefix_cache_key_names_the_graph_that_runs_prompts(int8_bundle):
    """KV of the W8A8 prefill graph differs from the decode graph's: a bundle served with
    model.prefill_graph on and then off (a config change, a rollback to the same bundle) must not reuse it."""
    from agent.http_api import prefix_cache_key
    from agent.model import load_model

    on, off = load_model(int8_bundle, "onnxruntime", prefill_graph="on"), load_model(int8_bundle, "onnxruntime",
                                                                                     prefill_graph="off")
    assert on.engine.prefill_graph and not off.engine.prefill_graph
    assert prefix_cache_key(on) != prefix_cache_key(off)
    assert prefix_cache_key(on) == prefix_cache_key(load_model(int8_bundle, "onnxruntime", prefill_graph="on"))


def test_the_prefix_cache_key_changes_with_the_runtime_and_the_cpu(fp32_bundle, monkeypatch):
    """Blocks written by another ONNX Runtime, another edgeglm or on another CPU (a disk image cloned onto
    other boxes) were resumed from after an upgrade: the key held only the bundle and the path."""
    import onnxruntime

    import agent.http_api as api
    import runtime.probe as probe
    from agent.http_api import prefix_cache_key
    from agent.model import load_model

    model = load_model(fp32_bundle, "onnxruntime")
    key = prefix_cache_key(model)
    assert key == prefix_cache_key(load_model(fp32_bundle, "onnxruntime"))  # a restart on the same box
    assert key.startswith(f"{model.bundle.sha256}-onnxruntime-")
    monkeypatch.setattr(onnxruntime, "__version__", "1.31.0")
    assert prefix_cache_key(model) != key
    monkeypatch.undo()
    assert prefix_cache_key(model) == key
    monkeypatch.setattr(api, "__version__", "0.1.9")
    assert prefix_cache_key(model) != key
    monkeypatch.undo()
    real = probe.probe_cpu()
    monkeypatch.setattr(probe, "probe_cpu", lambda: dataclasses.replace(
        real, features=tuple(f for f in real.features if f != "avx2") if "avx2" in real.features
        else (*real.features, "avx2")))
    assert prefix_cache_key(model) != key
