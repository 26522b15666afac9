"""The OTA self-test's decisions on real models: golden check and latency budget.

No test here depends on how fast this machine is: tests that are not about the latency budget give it
room (NO_BUDGET); the budget's decisions are tested with budgets no timing can meet or miss."""

from __future__ import annotations

import os

import pytest

from agent.model import load_model
from agent.selftest import SelfTestConfig, run_self_test
from ota.bundle import open_bundle

NO_BUDGET = 100.0  # max_latency_ratio where a test is about something else than the latency budget


def test_self_test_passes_a_good_model_and_reports_its_latency(int8_bundle):
    serving = load_model(int8_bundle)
    cfg = SelfTestConfig(steps=4, max_latency_ratio=NO_BUDGET)
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving)
    assert result.passed, result.reason
    assert result.details["decode_ms_per_token"] > 0 and result.details["serving_ms_per_token"] > 0
    assert "32/32" in result.details["golden"]


def test_latency_over_the_budget_relative_to_the_serving_model_fails(int8_bundle):
    serving = load_model(int8_bundle)
    # a budget no model can meet: any decode time is over 0.001x the serving model's, by more than -inf ms
    cfg = SelfTestConfig(steps=4, max_latency_ratio=0.001, min_delta_ms=-1e9)
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving)
    assert not result.passed and "over 0.001x the serving model's" in result.reason
    assert result.reason.endswith("(measured twice)") and "remeasured" in result.details


def test_one_slow_measurement_is_measured_again_before_it_fails_the_update(int8_bundle):
    """A box's load comes and goes: an over-budget first measurement is retaken (serving model first)
    and only a second one over the budget fails. Here the serving model's first timing is made to look
    a million times faster than it is (a noisy moment) and its retake ten times slower (the new model,
    the same one, is then surely within 1.5x of it, whatever this box's noise): the verdict follows the
    retake, so the update passes, where the first comparison alone would have failed it."""
    serving = load_model(int8_bundle)
    calls = []

    def on_engine(model, fn):
        calls.append(model)
        measured = fn()
        return measured * 1e-6 if len(calls) == 1 else measured * 10

    cfg = SelfTestConfig(steps=4, max_latency_ratio=1.5, min_delta_ms=0.0)
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving, on_engine)
    assert len(calls) == 2 and all(m is serving for m in calls)
    assert result.details["serving_ms_per_token"] < result.details["decode_ms_per_token"] * 1e-3
    assert set(result.details["remeasured"]) == {"decode_ms_per_token", "serving_ms_per_token"}
    assert result.passed, result.reason


def test_jitter_below_the_absolute_floor_is_not_a_regression(int8_bundle):
    serving = load_model(int8_bundle)
    cfg = SelfTestConfig(steps=4, max_latency_ratio=0.001, min_delta_ms=1e9)
    assert run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving).passed


def test_absolute_limit_without_a_serving_model(int8_bundle):
    cfg = SelfTestConfig(steps=4, max_ms_per_token=1e-9)
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, None)
    assert not result.passed and "over the limit" in result.reason


def test_the_new_model_is_loaded_on_the_configured_device(int8_bundle):
    """model.device reaches the self-test: the candidate runs where the agent will serve it, and a device
    the box lacks fails the test with the devices it has (nothing is activated)."""
    manifest = open_bundle(int8_bundle).manifest
    ok = run_self_test(int8_bundle, manifest, SelfTestConfig(backend="openvino", device="CPU", steps=2,
                                                             max_latency_ratio=NO_BUDGET), None)
    assert ok.passed and ok.details["backend"] == "openvino"
    import onnxruntime as ort

    lacking = [(d, p) for d, p in (("cuda", "CUDAExecutionProvider"), ("openvino", "OpenVINOExecutionProvider"))
               if p not in ort.get_available_providers()]  # (a GPU box has CUDA)
    device, provider = lacking[0]
    absent = run_self_test(int8_bundle, manifest, SelfTestConfig(backend="onnxruntime", device=device, steps=2), None)
    assert not absent.passed
    assert absent.reason.startswith(f"could not load the model: ONNX Runtime execution provider {provider!r} is not "
                                    "available; found: ")


def test_the_new_model_is_timed_on_the_serving_models_path(int8_bundle):
    """Like for like: where the autotune put the serving model on another path than the rule order's (an
    accelerator on a GPU box; here OpenVINO, 1 thread), the candidate is loaded and timed on that path,
    not on ONNX Runtime's CPU default, which against a GPU-served model would always look slower."""
    serving = load_model(int8_bundle, "openvino", threads=1)
    cfg = SelfTestConfig(steps=2, max_latency_ratio=NO_BUDGET)  # the path, not the timing, is tested here
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving)
    assert result.passed, result.reason
    assert result.details["backend"] == "openvino" and result.details["path"] == serving.path.describe()
    alone = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, None)
    assert alone.details["backend"] == "onnxruntime"  # no serving model: the configured rule order


FAULT_IN_THE_SELF_TEST = """
import os, signal, time
import agent.selftest as selftest
_load, _time = selftest.load_model, selftest.decode_ms_per_token
def load_model(*args, **kwargs):
    {at_load}
    return _load(*args, **kwargs)
def decode_ms_per_token(*args, **kwargs):
    {at_timing}
    return _time(*args, **kwargs)
selftest.load_model, selftest.decode_ms_per_token = load_model, decode_ms_per_token
"""


@pytest.mark.parametrize("at_load,at_timing,reason", [
    ("os.kill(os.getpid(), signal.SIGSEGV)", "pass",
     "the self-test's process died (killed by SIGSEGV) while loading the model"),
    ("pass", "time.sleep(600)", "timing its decode took longer than 20 s: stopped")])
def test_a_new_model_that_crashes_or_hangs_fails_the_self_test_and_the_agent_serves_on(
        int8_bundle, tmp_path, monkeypatch, at_load, at_timing, reason):
    """The new model is loaded and timed in a child process: a runtime that segfaults on it (or a timing
    that never returns) fails the update with the reason, and the process that serves, here this one, is
    still there and serving. The fault is injected into the child only (a sitecustomize on its PYTHONPATH):
    a real SIGSEGV, or a decode that never returns."""
    from runtime.generate import SamplingParams, generate

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAULT_IN_THE_SELF_TEST.replace("{at_load}", at_load)
                                             .replace("{at_timing}", at_timing))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject)] + ([os.environ["PYTHONPATH"]] if os.environ.get(
        "PYTHONPATH") else [])))  # before what the box already puts there
    serving = load_model(int8_bundle)
    cfg = SelfTestConfig(steps=2, max_latency_ratio=NO_BUDGET)
    result = run_self_test(int8_bundle, open_bundle(int8_bundle).manifest, cfg, serving, timeout_s=20)
    assert not result.passed and result.reason == reason
    if at_load == "pass":  # it got as far as the golden check
        assert "32/32" in result.details["golden"]
    prompt = serving.tokenizer.encode("def main():").ids
    assert len(list(generate(serving.engine, prompt, SamplingParams(max_tokens=4)))) == 4


def test_the_self_test_in_this_process_decides_as_in_a_child(int8_bundle):
    """Where no child process can start, the new model is loaded in the agent's process; the outcome and
    what is reported are the same."""
    serving = load_model(int8_bundle)
    cfg = SelfTestConfig(steps=2, max_latency_ratio=NO_BUDGET)
    manifest = open_bundle(int8_bundle).manifest
    here = run_self_test(int8_bundle, manifest, cfg, serving, isolate=False)
    there = run_self_test(int8_bundle, manifest, cfg, serving)
    assert here.passed and there.passed
    assert {k: v for k, v in here.details.items() if "ms" not in k} == \
        {k: v for k, v in there.details.items() if "ms" not in k}
