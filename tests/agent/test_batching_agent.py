"""The agent's [batching] settings: applied live from desired config, visible in /metrics, and the
shutdown deadline ending queued requests as well as running ones."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent.config import BatchingSettings, HttpSettings, SamplingSettings, load_config
from agent.daemon import Agent
from agent.http_api import ApiServer
from agent.model import load_model
from agent.topics import DesiredConfig
from runtime.generate import SamplingParams, generate

PROMPTS = ["def main(argv=None):\n", "import os\n", "class Parser:\n", "def test_"]


def post(port: int, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def batch_sizes(port: int) -> dict[str, float]:
    """The edgeglm_batch_size histogram's samples from /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("edgeglm_batch_size") or line.startswith("edgeglm_inference_")}


@pytest.fixture(scope="module")
def agent(int8_bundle, tmp_path_factory):
    cfg = load_config(None, {"model.bundle": str(int8_bundle), "http.port": 0, "ota.require_signature": False,
                             "model.slots_dir": str(tmp_path_factory.mktemp("slots")), "batching.max_batch": 1})
    agent = Agent(cfg)
    agent.start()
    yield agent
    agent.shutdown(deadline=5.0)


def concurrent_completions(port: int, max_tokens: int) -> list[str]:
    def ask(prompt):
        status, body = post(port, {"prompt": prompt, "max_tokens": max_tokens})
        assert status == 200, body
        return json.loads(body)["choices"][0]["text"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(ask, PROMPTS))


def test_batching_limits_apply_live_from_desired_config(agent):
    model, port = agent.model, agent.http.port
    expected = [model.tokenizer.decode(list(generate(model.engine, model.tokenizer.encode(p).ids,
                                                     SamplingParams(max_tokens=16))), skip_special_tokens=True)
                for p in PROMPTS]

    assert concurrent_completions(port, 16) == expected  # max_batch = 1: one at a time
    one = batch_sizes(port)
    assert one["edgeglm_batch_size_count"] > 0 and one['edgeglm_batch_size_bucket{le="1"}'] == one[
        "edgeglm_batch_size_count"]

    # live: a batch of 4, and an idle engine waits (up to 5 s) for the queue to fill it
    agent._apply_desired(DesiredConfig(version=7, settings={"batching": {"max_batch": 4, "window_ms": 5000,
                                                                          "prefill_chunk": 32}}))
    assert agent.applied_config_version == 7 and agent.last_config_error is None
    assert agent.http.batching == BatchingSettings(max_batch=4, window_ms=5000, prefill_chunk=32)
    assert agent.http._scheduler.prefill_chunk == 32  # the serving scheduler took it live
    assert concurrent_completions(port, 16) == expected
    four = batch_sizes(port)
    assert four['edgeglm_batch_size_bucket{le="3"}'] < four['edgeglm_batch_size_bucket{le="4"}']  # steps of 4 rows
    assert four['edgeglm_batch_size_bucket{le="4"}'] == four["edgeglm_batch_size_count"]  # never more
    # the gauges follow the scheduler's boundary after the last step, which can come just after the last
    # response reached its client: wait for them to settle (idle means 0, not "whatever was read first")
    deadline = time.monotonic() + 10
    while (four["edgeglm_inference_in_flight"], four["edgeglm_inference_queue_depth"]) != (0, 0) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        four = batch_sizes(port)
    assert four["edgeglm_inference_in_flight"] == 0 and four["edgeglm_inference_queue_depth"] == 0

    agent._apply_desired(DesiredConfig(version=8, settings={"batching": {"max_batch": 0}}))
    assert agent.applied_config_version == 7 and "batching.max_batch = 0" in agent.last_config_error
    assert agent.http.batching.max_batch == 4

    # the KV bound: "auto" (the box's default) was measured when the model was set; the fleet may set a number
    # (a box left at "auto" has no limit of its own), and requests over it wait for the running ones
    assert agent.http._kv_auto and agent.http._scheduler.max_kv_bytes == agent.http._kv_auto
    # (a window: the idle engine takes the requests together, so that some wait however they arrive)
    agent._apply_desired(DesiredConfig(version=9, settings={"batching": {"max_batch": 4, "max_kv_mb": 0.001,
                                                                         "window_ms": 10000}}))
    assert agent.applied_config_version == 9 and agent.last_config_error is None
    assert agent.http._scheduler.max_kv_bytes == 1048
    before = batch_sizes(port)
    assert concurrent_completions(port, 16) == expected
    after = batch_sizes(port)
    assert after["edgeglm_inference_kv_waits_total"] > before["edgeglm_inference_kv_waits_total"]
    assert after['edgeglm_batch_size_bucket{le="1"}'] - before['edgeglm_batch_size_bucket{le="1"}'] == \
        after["edgeglm_batch_size_count"] - before["edgeglm_batch_size_count"]  # one row at a time


def test_shutdown_deadline_ends_queued_requests_with_503(int8_bundle):
    """A request still queued at the deadline has no token at which to be cut: it gets 503 at once."""
    model = load_model(int8_bundle, "onnxruntime")
    # an idle engine waits up to 10 s for a batch of 2: one request stays queued that long
    srv = ApiServer(HttpSettings(port=0), SamplingSettings(), batching=BatchingSettings(max_batch=2, window_ms=10_000))
    srv.start()
    srv.set_model(model, model.golden_check())
    results: dict[str, tuple[int, bytes]] = {}
    queued = threading.Thread(target=lambda: results.update(q=post(srv.port, {"prompt": PROMPTS[1], "max_tokens": 8})))
    queued.start()
    for _ in range(600):  # until it waits in the scheduler's queue
        if srv.metrics.queued.value() == 1:
            break
        queued.join(0.05)
    assert srv.metrics.queued.value() == 1 and srv.metrics.in_flight.value() == 0
    srv.shutdown(deadline=0.5)
    queued.join(30)
    status, body = results["q"]
    assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
    assert srv.metrics.queued.value() == 0


def test_a_request_during_shutdown_gets_503_even_with_every_place_taken(int8_bundle):
    """With `http.max_concurrent` places all taken while the agent stops, a request on a kept-alive connection (or
    over MQTT) got 429 "retry later" from a box going away: it gets the 503 of a stopping agent."""
    from agent.openai_compat import ApiError

    model = load_model(int8_bundle, "onnxruntime")
    srv = ApiServer(HttpSettings(port=0, max_concurrent=1), SamplingSettings())
    srv.start()
    srv.set_model(model, model.golden_check())
    with srv.engine_slot():  # the one place is taken
        with pytest.raises(ApiError) as full:
            with srv.engine_slot():
                pass
        assert full.value.status == 429
        srv.shutdown(deadline=0.1)
        with pytest.raises(ApiError) as stopping:
            with srv.engine_slot():
                pass
    assert stopping.value.status == 503 and "shutting down" in stopping.value.message, stopping.value
