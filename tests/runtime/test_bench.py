"""`edgeglm bench` on the tiny session bundles: real engines, well-formed numbers, clear flag errors.

No timing thresholds: the numbers are checked to be present, positive and consistent with each
other (p50 <= p95, counts match the options), and the timed loop to do the model's real work.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from agent.model import load_model
from runtime.bench import BenchOptions, format_report, run_bench, time_generation
from runtime.engine import cpu_has_vnni
from runtime.errors import RequestError
from runtime.generate import SamplingParams, generate


def edgeglm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_timed_loop_is_the_greedy_continuation(int8_bundle, backend):
    model = load_model(int8_bundle, backend)
    prompt = model.tokenizer.encode("def read_config(path):\n    ").ids
    timing = time_generation(model.engine, prompt, 12)
    reference = list(generate(model.engine, prompt, SamplingParams(max_tokens=12)))  # stops at EOS
    assert timing.tokens[:len(reference)] == reference
    assert len(timing.step_s) == 11 and timing.ttft_s > 0 and timing.decode_tok_s > 0


def test_a_prefix_hit_is_not_reported_for_a_path_the_cache_stays_out_of(int8_bundle):
    """OpenVINO int8 (activations quantized on the fly) is left out of the prefix cache: the bench reported
    "TTFT ... with 0 cached tokens vs ... cold (1.82x)", a speed-up of nothing but warm-up."""
    model = load_model(int8_bundle, "openvino")
    report = run_bench(model, BenchOptions(prompt_tokens=48, new_tokens=2, prefix_tokens=32, runs=1))
    assert report["prefix"] == {"prefix_tokens": 32, "not_used": model.engine.inexact_resume}
    assert "prefix hit      not measured: the prefix cache is not used on this execution path " \
           "(DYNAMIC_QUANTIZATION_GROUP_SIZE 32" in format_report(report)


def test_run_bench_single_stream_concurrency_and_prefix(int8_bundle):
    model = load_model(int8_bundle, "onnxruntime")
    opts = BenchOptions(prompt_tokens=48, new_tokens=6, concurrency=3, prefix_tokens=32, runs=2)
    report = run_bench(model, opts)
    s = report["single_stream"]
    assert len(s["ttft_ms"]["runs"]) == 2 and all(v > 0 for v in s["ttft_ms"]["runs"])
    assert s["decode_tok_s"]["min"] <= s["decode_tok_s"]["median"] <= s["decode_tok_s"]["max"]
    assert s["per_token_ms"]["steps"] == 2 * 5 and 0 < s["per_token_ms"]["p50"] <= s["per_token_ms"]["p95"]
    c = report["concurrency"]
    assert c["requests"] == 3 and 0 < c["tokens"] <= 2 * 3 * 6  # greedy requests may end at EOS
    assert c["aggregate_tok_s"]["median"] > 0 and 0 < c["ttft_ms"]["p50"] <= c["ttft_ms"]["p95"]
    gaps = c["inter_token_ms"]  # between consecutive tokens of one request, as its reader got them
    if c["tokens"] > 2 * 3:  # some request made two tokens or more (a reader may get several at once: gaps ~0; a
        # starved reader thread on a loaded CI box got all of them at once: every gap rounded to 0.0 ms)
        assert gaps["max"] is not None and 0 <= gaps["p50"] <= gaps["p95"] <= gaps["max"]
    p = report["prefix"]
    assert p["reused_tokens"] == 32  # one block of 32 tokens came from the cache on the hit
    assert p["ttft_hit_ms"]["median"] > 0 and p["ttft_miss_ms"]["median"] > 0
    assert report["peak_rss_mb"] > 10
    m = report["memory_mb"]  # the split adds up and the model's mapped weights show as file-backed
    assert 0 < m["anonymous"] <= m["rss"] <= report["peak_rss_mb"] + 1 and m["file_backed"] > 1
    assert abs(m["anonymous"] + m["file_backed"] - m["rss"]) < 0.2
    assert report["execution_path"]["backend"] == "onnxruntime" and report["execution_path"]["chosen_by"] == "configured"
    text = format_report(report)
    assert "TTFT" in text and "concurrency 3" in text and "between tokens p50" in text and "32 cached tokens" in text
    assert c["max_kv_mb"] is None and c["kv_waits"] == 0 and "KV bound" not in text
    bounded = run_bench(model, BenchOptions(prompt_tokens=48, new_tokens=6, concurrency=3, runs=1, max_kv_mb=1e-6))
    c = bounded["concurrency"]
    assert c["kv_waits"] >= 2 and c["tokens"] > 0  # one request at a time: the other two waited
    assert "KV bound        1e-06 MiB: " in format_report(bounded)
    assert "batches         row-aligned" in text


def test_bench_json_on_the_autotuned_path(int8_bundle, tmp_path):
    proc = edgeglm("bench", "--bundle", int8_bundle, "--prompt-tokens", 16, "--new-tokens", 8, "--runs", 2,
                   "--json", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bundle"] == "tiny-1.0.0"
    assert report["options"] == {"prompt_tokens": 16, "new_tokens": 8, "concurrency": 1, "prefix_tokens": 0,
                                 "runs": 2, "seed": 0, "max_kv_mb": None}
    assert report["execution_path"]["chosen_by"] == "autotune"
    assert list((tmp_path / "autotune").glob("*.json"))  # the CLI cache dir was used
    s = report["single_stream"]
    assert s["per_token_ms"]["steps"] == 14 and s["ttft_ms"]["median"] > 0 and s["decode_tok_s"]["median"] > 0
    assert report["concurrency"] is None and report["prefix"] is None and report["peak_rss_mb"] > 10
    if report["execution_path"]["backend"] == "onnxruntime":
        assert report["execution_path"]["prefill_graph"] == "prefill.onnx"


def test_bench_without_the_prefill_graph(int8_bundle, tmp_path):
    proc = edgeglm("bench", "--bundle", int8_bundle, "--backend", "onnxruntime", "--prompt-tokens", 32,
                   "--new-tokens", 4, "--runs", 1, "--json", "--no-prefill-graph", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["execution_path"]["prefill_graph"] is None
    proc = edgeglm("bench", "--bundle", int8_bundle, "--backend", "onnxruntime", "--prompt-tokens", 32,
                   "--new-tokens", 4, "--runs", 1, "--json", "--prefill-graph-only", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = json.loads(proc.stdout)["execution_path"]
    assert path["prefill_graph"] == "prefill.onnx" and path["prefill_only"] is True
    assert path["prefill_mode"] == "only (configured)"
    assert path["prefill_weights"] == ("int8 (u8 x s8, VNNI)" if cpu_has_vnni() else "uint8 (u8 x u8)")
    assert path["prefill_attention_blocks"] == 4  # the only graph's attention runs in blocks
    # the default is the agent's "auto": this box has the memory for both graphs; the report says why
    proc = edgeglm("bench", "--bundle", int8_bundle, "--backend", "onnxruntime", "--prompt-tokens", 32,
                   "--new-tokens", 4, "--runs", 1, "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"prefill graph: on \(auto: both graphs \(about [0-9.]+ MB\) fit in half of the [0-9.]+ MB "
                     r"available\); weights u?int8", proc.stdout), proc.stdout
    proc = edgeglm("bench", "--bundle", int8_bundle, "--prefill-graph", "sometimes")
    assert proc.returncode == 2 and "invalid choice: 'sometimes'" in proc.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--prompt-tokens", "0"], "--prompt-tokens 0 is invalid: must be >= 1"),
    (["--new-tokens", "1"], "--new-tokens 1 is invalid: must be >= 2"),
    (["--concurrency", "0"], "--concurrency 0 is invalid"),
    # the scheduler's largest batch: refused only after the single-stream runs before
    (["--concurrency", "300"], "--concurrency 300 is invalid: must be in [1, 256]"),
    (["--prompt-tokens", "4090", "--new-tokens", "128"], "exceed the model's context window of 4096 tokens"),
    (["--prompt-tokens", "32", "--prefix-tokens", "32"], "--prefix-tokens 32 must be below --prompt-tokens 32"),
    (["--prompt-tokens", "20", "--prefix-tokens", "10"], "--prefix-tokens 10 is below the prefix cache's block of "
                                                         "32 tokens: nothing would be cached"),
    (["--backend", "tensorrt"], "'tensorrt' is unknown"),
    (["--runs", "x"], "invalid int value: 'x'"),
    (["--max-kv-mb", "0"], "--max-kv-mb 0.0 is invalid: must be a number of MiB > 0"),
    (["--max-kv-mb", "nan"], "--max-kv-mb nan is invalid"),
    (["--max-kv-mb", "64"], "--max-kv-mb 64 bounds the KV of requests decoding together: give --concurrency 2"),
])
def test_bench_bad_flags_exit_2(int8_bundle, tmp_path, args, fragment):
    proc = edgeglm("bench", "--bundle", int8_bundle, "--cache-dir", tmp_path, "--backend", "onnxruntime", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in proc.stderr


def test_a_prompt_over_the_context_window_is_refused_before_the_autotune(int8_bundle, tmp_path):
    """It was refused only after `load_model` had autotuned (seconds, more on a large model) and cached."""
    proc = edgeglm("bench", "--bundle", int8_bundle, "--cache-dir", tmp_path / "cache", "--prompt-tokens", "5000")
    assert proc.returncode == 2 and "exceed the model's context window of 4096 tokens" in proc.stderr
    assert "autotune" not in proc.stderr and not (tmp_path / "cache").exists()


def test_options_check_names_the_flag():
    with pytest.raises(RequestError, match="--runs 0 is invalid"):
        BenchOptions(runs=0).check(4096)
