"""Execution-path selection: candidates from the probe, the golden gate, the cache, the CLI and the agent.

Candidate enumeration is checked on fixed HardwareInfo values (the accelerators and ISA features
this machine lacks); everything that loads or measures runs the real engines on the tiny session
bundles. Timings are only checked to be well-formed (positive, finite), never against a threshold.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from waiting import until

from agent.model import load_model
from ota.bundle import open_bundle
from runtime.autotune import Candidate, Trial, TuneSettings, autotune, candidates, choose, format_result
from runtime.errors import BackendUnavailable
from runtime.probe import BackendInfo, CpuInfo, HardwareInfo, MemoryInfo, probe_hardware

FAST = TuneSettings(prompt_tokens=8, decode_steps=4, repeats=1)
BOTH = ("onnxruntime", "openvino")
ORT_CPU = "CPUExecutionProvider"


def hardware(physical=2, logical=2, features=("avx", "avx2", "fma"), ov_devices=("CPU",),
             ort_providers=(ORT_CPU,), model="Test CPU") -> HardwareInfo:
    return HardwareInfo(
        cpu=CpuInfo(model, "Vendor", "x86_64", physical, logical, tuple(sorted(features)), None),
        memory=MemoryInfo(8 << 30, 4 << 30, None),
        backends=(BackendInfo("openvino", "2026.0", True, tuple(ov_devices)),
                  BackendInfo("onnxruntime", "1.0", True, tuple(ort_providers))),
        os="Linux", python="3.11")


def only(hw: HardwareInfo, backend: str) -> HardwareInfo:
    """`hw` as if only `backend` were installed."""
    return replace(hw, backends=tuple(replace(b, available=b.name == backend) for b in hw.backends))


# --- candidates from the probe ------------------------------------------------------------------------

def test_cpu_only_avx2_box_gets_cpu_paths_with_exact_and_u8_cache_variants():
    cands = candidates(hardware(), BOTH)
    assert all(c.on_cpu for c in cands)
    assert cands == [
        Candidate("onnxruntime", ORT_CPU, 2, pinned=False),
        Candidate("onnxruntime", ORT_CPU, 2, pinned=True),
        Candidate("openvino", "CPU", 2, pinned=True, precision="f32", kv_cache_precision="f32"),
        Candidate("openvino", "CPU", 2, pinned=True, precision="f32", kv_cache_precision="u8"),
    ]
    assert [c.changes_numerics for c in cands] == [False, False, False, True]
    assert not any(c.precision == "bf16" for c in cands)  # no AMX / avx512_bf16


def test_smt_box_with_amx_gets_both_thread_counts_and_bf16():
    hw = hardware(physical=4, logical=8, features=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    cands = candidates(hw, BOTH)
    ort = [c for c in cands if c.backend == "onnxruntime"]
    assert [(c.threads, c.pinned) for c in ort] == [(4, False), (4, True), (8, False)]  # pinned: one per core
    ov = [(c.threads, c.precision, c.kv_cache_precision) for c in cands if c.backend == "openvino"]
    assert ov == [(4, "f32", "f32"), (8, "f32", "f32"), (4, "f32", "u8"), (4, "bf16", "f32"), (4, "bf16", "u8")]
    assert all(c.changes_numerics for c in cands if c.precision == "bf16")


def test_accelerators_are_tried_first_and_gated_by_the_golden_check():
    hw = hardware(ov_devices=("CPU", "GPU.0 (Intel(R) Arc(TM) Graphics)", "NPU (Intel(R) AI Boost)"),
                  ort_providers=("CUDAExecutionProvider", ORT_CPU))
    cands = candidates(hw, BOTH)
    accel = [c for c in cands if not c.on_cpu]
    assert cands[:len(accel)] == accel
    assert accel == [Candidate("onnxruntime", "CUDAExecutionProvider"),
                     Candidate("openvino", "GPU.0", precision="f16"), Candidate("openvino", "NPU", precision="f16")]
    assert all(c.changes_numerics for c in accel)
    assert not any(c.device.startswith(("GPU", "NPU")) or "CUDA" in c.device for c in candidates(hardware(), BOTH))


def test_backends_missing_from_bundle_or_box_and_user_threads_prune_candidates():
    hw = hardware(physical=4, logical=8)
    assert {c.backend for c in candidates(hw, ("openvino",))} == {"openvino"}
    assert {c.backend for c in candidates(only(hw, "onnxruntime"), BOTH)} == {"onnxruntime"}
    assert {c.threads for c in candidates(hw, BOTH, threads=3)} == {3}
    no_topology = replace(hw, cpu=replace(hw.cpu, physical_cores=None))
    assert {c.threads for c in candidates(no_topology, BOTH)} == {8}


def test_choice_is_fastest_decode_with_ttft_breaking_near_ties():
    a, b, c = (Candidate("onnxruntime", ORT_CPU, t) for t in (1, 2, 4))
    trials = [Trial(a, "measured", ttft_ms=5.0, decode_tok_s=100.0),
              Trial(b, "measured", ttft_ms=9.0, decode_tok_s=120.0),
              Trial(c, "measured", ttft_ms=4.0, decode_tok_s=118.0)]  # within 3% of 120: TTFT decides
    assert choose(trials) == c
    trials[2].decode_tok_s = 110.0
    assert choose(trials) == b
    with pytest.raises(BackendUnavailable, match="golden check failed"):
        choose([Trial(a, "excluded", reason="golden check failed: MISMATCH")])


# --- measured, on the real engines ----------------------------------------------------------------------

def _with_wrong_golden(src: Path, dst: Path, backend: str) -> Path:
    """A copy of `src` whose golden record for `backend` names other tokens with clear margins."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    seq = manifest["golden"]["backends"][backend]
    vocab = manifest["architecture"]["vocab_size"]
    seq["tokens"] = [(t + 1) % vocab for t in seq["tokens"]]
    seq["margins"] = [10.0] * len(seq["tokens"])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def test_candidate_failing_golden_check_or_load_is_excluded(int8_bundle, tmp_path):
    bundle = open_bundle(_with_wrong_golden(int8_bundle, tmp_path / "b", "openvino"))
    here = probe_hardware()
    cores = here.cpu.logical_cores
    hw = only(hardware(physical=cores, logical=cores, ov_devices=("CPU", "GPU.7 (not really here)")), "openvino")
    result = autotune(bundle, hw, settings=FAST)
    trials = {(t.candidate.device, t.candidate.kv_cache_precision): t for t in result.trials}
    gpu, u8, exact = trials[("GPU.7", None)], trials[("CPU", "u8")], trials[("CPU", "f32")]
    assert gpu.status == "excluded" and gpu.reason.startswith("could not load") and "GPU.7" in gpu.reason
    assert u8.status == "excluded" and u8.reason.startswith("golden check failed") and "MISMATCH" in u8.golden
    assert exact.status == "measured" and exact.golden is None  # exact paths are not gated
    assert result.choice == exact.candidate
    text = format_result(result)
    assert "golden check failed" in text and "accelerators found: openvino:GPU.7" in text


@pytest.mark.parametrize("fails_in", ["golden check", "measurement"])
def test_a_path_that_loads_but_fails_at_run_time_is_excluded_not_the_autotune(int8_bundle, tmp_path, monkeypatch,
                                                                               fails_in):
    """A plugin that compiles lazily or a device out of memory on its first inference: that path is excluded
    with the reason, the others are measured and one is chosen (the error used to end the whole autotune:
    a traceback from `edgeglm probe`, no model for an agent with backend auto)."""
    import runtime.autotune as autotune_module

    class FailsAtRunTime:
        def __init__(self, engine):
            self._engine, self.arch, self.calls = engine, engine.arch, 0  # measurement rounds done

        def __getattr__(self, name):
            return getattr(self._engine, name)

        def forward(self, *args, **kwargs):
            if fails_in == "golden check" or self.calls:  # "measurement": after the warm-up round
                raise RuntimeError("Exception from src/plugin: cannot compile a dynamic shape")
            return self._engine.forward(*args, **kwargs)
    real_round = autotune_module.measure_round

    def measure_round(engine, *args):
        out = real_round(engine, *args)
        if isinstance(engine, FailsAtRunTime):
            engine.calls += 1
        return out
    monkeypatch.setattr(autotune_module, "measure_round", measure_round)
    real_load = autotune_module.load_engine
    monkeypatch.setattr(autotune_module, "load_engine", lambda backend, *a, **k: FailsAtRunTime(
        real_load(backend, *a, **k)) if k.get("kv_cache_precision") == "u8" else real_load(backend, *a, **k))
    hw = only(hardware(physical=2, logical=2), "openvino")
    result = autotune(open_bundle(int8_bundle), hw, settings=FAST)
    trials = {t.candidate.kv_cache_precision: t for t in result.trials}
    assert trials["u8"].status == "excluded" and trials["u8"].reason.startswith("failed at run time: Exception "
                                                                              "from src/plugin")
    assert trials["f32"].status == "measured" and result.choice == trials["f32"].candidate


def test_cache_reused_for_same_bundle_and_hardware_redone_when_either_changes(int8_bundle, fp32_bundle, tmp_path):
    hw = only(probe_hardware(), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    first = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST)
    assert not first.from_cache and first.cache_path and Path(first.cache_path).is_file()
    measured = [t for t in first.trials if t.status == "measured"]
    assert measured and all(t.ttft_ms > 0 and math.isfinite(t.decode_tok_s) and t.decode_tok_s > 0 for t in measured)

    again = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST)
    assert again.from_cache and again.choice == first.choice and again.measured_at == first.measured_at
    assert [t.to_dict() for t in again.trials] == [t.to_dict() for t in first.trials]

    other_cpu = replace(hw, cpu=replace(hw.cpu, model="Another CPU"))
    assert other_cpu.fingerprint() != hw.fingerprint()
    assert not autotune(bundle, other_cpu, cache_dir=tmp_path, settings=FAST).from_cache
    assert not autotune(open_bundle(fp32_bundle), hw, cache_dir=tmp_path, settings=FAST).from_cache
    retuned = autotune(bundle, hw, cache_dir=tmp_path, retune=True, settings=FAST)
    assert not retuned.from_cache and retuned.measured_at > first.measured_at
    assert autotune(bundle, hw, cache_dir=tmp_path, settings=FAST).measured_at == retuned.measured_at

    for damaged in ("{ not json", "[]", "null", '{"version": 1, "choice": "x"}'):  # measured again, not an error
        Path(first.cache_path).write_text(damaged)
        assert not autotune(bundle, hw, cache_dir=tmp_path, settings=FAST).from_cache
    assert len(list((tmp_path / "autotune").glob("*.json"))) == 3  # (int8, hw), (int8, other cpu), (fp32, hw)


def test_a_process_that_finds_another_measuring_waits_and_takes_its_result(int8_bundle, tmp_path, caplog):
    """Agents started together each measured beside the others (skewed by their load) and the last to finish wrote
    its choice over theirs: one process measures per cache folder at a time, and one that waited reads the result
    of the one it waited for instead of measuring again."""
    import fcntl
    import threading

    from waiting import until

    hw = only(probe_hardware(), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    first = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST)
    measured = Path(first.cache_path).read_bytes()
    Path(first.cache_path).unlink()
    caplog.set_level(logging.INFO, logger="edgeglm.autotune")
    with open(tmp_path / "autotune" / ".lock", "a") as other:  # another process, measuring
        fcntl.flock(other, fcntl.LOCK_EX)
        got = []
        waiting = threading.Thread(target=lambda: got.append(autotune(bundle, hw, cache_dir=tmp_path, settings=FAST)))
        waiting.start()
        until(lambda: "another process is measuring" in caplog.text)
        assert waiting.is_alive() and not got
        Path(first.cache_path).write_bytes(measured)  # ... its result, then it lets go
        fcntl.flock(other, fcntl.LOCK_UN)
    waiting.join(60)
    assert got and got[0].from_cache and got[0].measured_at == first.measured_at


def test_the_cache_keeps_the_most_recently_used_results_only(int8_bundle, fp32_bundle, tmp_path):
    """A box that took an OTA update a week kept one result per bundle it ever ran; the cache now keeps
    the CACHE_KEEP most recently used (a result read from the cache counts as used), never the one just
    written, and leaves files that are not its own alone."""
    import os
    import time

    from runtime.autotune import CACHE_KEEP

    hw = only(probe_hardware(), "onnxruntime")
    served = Path(autotune(open_bundle(int8_bundle), hw, cache_dir=tmp_path, settings=FAST).cache_path)
    folder = served.parent
    now = time.time()
    old = [folder / f"{i:016x}-oldbundle.json" for i in range(CACHE_KEEP + 4)]
    for i, f in enumerate(old):
        f.write_text("{}")
        os.utime(f, (now - 1000 + i, now - 1000 + i))
    os.utime(served, (now - 5000, now - 5000))  # the oldest file ...
    (folder / "README.txt").write_text("an operator's note")
    assert autotune(open_bundle(int8_bundle), hw, cache_dir=tmp_path, settings=FAST).from_cache  # ... used again

    written = Path(autotune(open_bundle(fp32_bundle), hw, cache_dir=tmp_path, settings=FAST).cache_path)
    left = set(folder.glob("*.json"))
    assert len(left) == CACHE_KEEP and {served, written} <= left
    assert left - {served, written} == set(old[-(CACHE_KEEP - 2):])  # the newest of the others
    assert (folder / "README.txt").read_text() == "an operator's note"
    assert autotune(open_bundle(int8_bundle), hw, cache_dir=tmp_path, settings=FAST).from_cache


def test_loaded_model_runs_on_the_chosen_path_and_says_so(int8_bundle, tmp_path):
    model = load_model(int8_bundle, "auto", cache_dir=tmp_path)
    info = model.execution_info()
    assert model.path == model.tuning.choice and info["chosen_by"] == "autotune"
    assert info["backend"] == model.backend == model.engine.backend
    assert model.golden_check().passed
    assert load_model(int8_bundle, "auto", cache_dir=tmp_path).execution_info()["chosen_by"] == "autotune cache"
    named = load_model(int8_bundle, "openvino", threads=1).execution_info()
    assert (named["backend"], named["threads"], named["chosen_by"]) == ("openvino", 1, "configured")


def test_a_device_named_on_a_backend_is_served_as_given_and_an_absent_one_lists_those_present(int8_bundle):
    """model.device / --device: the operator pins a device (an iGPU, the CUDA provider) instead of the
    autotune's choice; short ONNX Runtime names are accepted; a device the box lacks fails the load with
    the devices it has."""
    from runtime.autotune import device_candidate

    assert device_candidate("onnxruntime", "TensorRT").device == "TensorrtExecutionProvider"
    assert device_candidate("onnxruntime", "cuda").device == "CUDAExecutionProvider"
    assert device_candidate("onnxruntime", "MyExecutionProvider").device == "MyExecutionProvider"
    assert device_candidate("openvino", "gpu.1").device == "GPU.1"
    ort_cpu = load_model(int8_bundle, "onnxruntime", device="cpu")
    info = ort_cpu.execution_info()
    assert (info["device"], info["chosen_by"]) == (ORT_CPU, "configured") and ort_cpu.golden_check().passed
    ov_cpu = load_model(int8_bundle, "openvino", threads=1, device="CPU").execution_info()
    assert (ov_cpu["backend"], ov_cpu["device"], ov_cpu["threads"]) == ("openvino", "CPU", 1)
    import onnxruntime as ort
    import openvino as ov

    with pytest.raises(BackendUnavailable, match="'CUDAExecutionProvider' is not available; found: "
                       + ", ".join(ort.get_available_providers())):
        load_model(int8_bundle, "onnxruntime", device="CUDA")
    with pytest.raises(BackendUnavailable, match=r"OpenVINO device 'GPU\.3' is not available; found: "
                       + ", ".join(ov.Core().available_devices)):
        load_model(int8_bundle, "openvino", device="GPU.3")
    with pytest.raises(BackendUnavailable, match="device 'GPU' needs a named backend"):
        load_model(int8_bundle, "auto", device="GPU")
    assert load_model(int8_bundle, "onnxruntime", device=" AUTO ").execution_info()["device"] == ORT_CPU


def test_autotune_measures_onnx_runtime_the_way_it_will_serve_where_memory_is_tight(int8_bundle, tmp_path):
    """Where model.prefill_graph = "auto" picks the prefill graph alone, the autotune loads and times ONNX
    Runtime that way too (not both graphs, which would take the memory the choice saves), caches the result
    under its own key, and the served engine is the one measured."""
    from runtime.autotune import choose_prefill_graph, resident_bytes

    hw = only(probe_hardware(), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    tight = MemoryInfo(None, 2 * resident_bytes(bundle, "onnxruntime") - 1, None)
    assert choose_prefill_graph("auto", bundle, tight).mode == "only"
    lean = load_model(int8_bundle, "auto", cache_dir=tmp_path, hardware=hw, memory=tight)
    assert lean.tuning.prefill == "only" and lean.engine.prefill_only and "-prefill-only" in lean.tuning.cache_path
    assert all(t.status == "measured" for t in lean.tuning.trials)
    assert "measured with prefill_graph = 'only'" in format_result(lean.tuning)
    wide = load_model(int8_bundle, "auto", cache_dir=tmp_path, hardware=hw, memory=MemoryInfo(None, None, None))
    assert wide.tuning.prefill == "on" and not wide.tuning.from_cache and not wide.engine.prefill_only
    again = load_model(int8_bundle, "auto", cache_dir=tmp_path, hardware=hw, memory=tight)
    assert again.tuning.from_cache and again.tuning.prefill == "only" and again.engine.prefill_only
    assert len(list((tmp_path / "autotune").glob("*.json"))) == 2



def test_a_named_backend_still_measures_which_steps_the_prefill_graph_takes(int8_bundle, tmp_path, monkeypatch,
                                                                              caplog):
    """A named backend (`model.backend = "onnxruntime"`) serves its default CPU path without an autotune, but
    where batched steps go is still measured on the serving engine (the bundle's fixed 4 rows sent 8-row
    steps to the slower graph on VNNI CPUs), cached per bundle, hardware and path: the next load reads it,
    --retune measures again, another thread count is another path. Without a cache directory, with a
    device named or one graph, nothing is measured."""
    import runtime.autotune as at
    from runtime.engine import PREFILL_GRAPH_MIN_ROWS

    hw = probe_hardware()
    with caplog.at_level("INFO", logger="edgeglm"):
        served = load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw)
    assert served.tuning is None and served.chosen_by == "configured"
    files = list((tmp_path / "autotune").glob("*-rows-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["candidate"]["backend"] == "onnxruntime" and data["fingerprint"] == hw.fingerprint()
    timed = data["prefill_rows_ms"]
    assert set(timed) == {str(n) for n in at.PREFILL_ROWS_SIZES} and all(d > 0 and p > 0 for d, p in timed.values())
    want = 2 * max(at.PREFILL_ROWS_SIZES)  # the rule, recomputed from the recorded timings
    for n in sorted(at.PREFILL_ROWS_SIZES, reverse=True):
        d, p = timed[str(n)]
        if p > (1 - at.TIE) * d:
            break
        want = n
    assert data["prefill_min_rows"] == want and served.engine.prefill_min_rows == want
    assert served.execution_info()["prefill_min_rows"] == want
    assert f"prefill graph from {want} token rows per step (measured now for this path)" in caplog.text

    def not_again(engine, *a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(at, "measure_prefill_rows", not_again)
    caplog.clear()
    with caplog.at_level("INFO", logger="edgeglm"):
        again = load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw)
    assert again.engine.prefill_min_rows == want and "measured for this path earlier" in caplog.text
    # what the cache says is what routes (a value no measurement here gives)
    data["prefill_min_rows"] = 7
    files[0].write_text(json.dumps(data))
    assert load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw).engine.prefill_min_rows == 7
    monkeypatch.setattr(at, "measure_prefill_rows", lambda engine, *a, **k: (5, {"4": [1.0, 2.0]}))
    assert load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw,
                      retune=True).engine.prefill_min_rows == 5
    assert json.loads(files[0].read_text())["prefill_min_rows"] == 5
    other = load_model(int8_bundle, "onnxruntime", 1, cache_dir=tmp_path, hardware=hw)  # another path
    assert other.engine.prefill_min_rows == 5 and len(list((tmp_path / "autotune").glob("*-rows-*.json"))) == 2
    # a damaged cache file: said, measured again
    files[0].write_text("{")
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgeglm"):
        assert load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw).engine.prefill_min_rows == 5
    assert "prefill rows cache" in caplog.text and "measuring again" in caplog.text

    monkeypatch.setattr(at, "measure_prefill_rows", not_again)
    for kwargs in ({}, {"cache_dir": tmp_path, "prefill_graph": False}):
        model = load_model(int8_bundle, "onnxruntime", hardware=hw, **kwargs)
        assert model.engine.prefill_min_rows == PREFILL_GRAPH_MIN_ROWS


def test_autotune_measures_which_steps_the_prefill_graph_takes_and_the_served_engine_uses_it(int8_bundle, tmp_path,
                                                                                             monkeypatch):
    """With both graphs, the autotune times row-aligned batched steps of 4-32 rows on each and records the
    fewest rows from which the prefill graph is faster by more than 3% (at that size and every larger one; a
    tie stays on the decode graph); the cache keeps
    it, the loaded engine routes by it (not by the bundle's edgeglm.prefill_min_rows), and probe prints it.
    Where one graph serves, nothing is measured."""
    import runtime.autotune as at
    from runtime.engine import PREFILL_GRAPH_MIN_ROWS

    hw = only(probe_hardware(), "onnxruntime")
    served = load_model(int8_bundle, "auto", cache_dir=tmp_path, hardware=hw, memory=MemoryInfo(None, None, None))
    tuning = served.tuning
    assert set(tuning.prefill_rows_ms) == {str(n) for n in at.PREFILL_ROWS_SIZES}
    assert all(d > 0 and p > 0 for d, p in tuning.prefill_rows_ms.values())
    want = 2 * max(at.PREFILL_ROWS_SIZES)  # the rule, recomputed from the recorded timings
    for n in sorted(at.PREFILL_ROWS_SIZES, reverse=True):
        d, p = tuning.prefill_rows_ms[str(n)]
        if p > (1 - at.TIE) * d:
            break
        want = n
    assert tuning.prefill_min_rows == want
    assert served.engine.prefill_min_rows == want and served.execution_info()["prefill_min_rows"] == want
    assert f"prefill graph from {want} token rows per step" in format_result(tuning)
    again = load_model(int8_bundle, "auto", cache_dir=tmp_path, hardware=hw, memory=MemoryInfo(None, None, None))
    assert again.tuning.from_cache and again.tuning.prefill_min_rows == want and again.engine.prefill_min_rows == want

    # the rule on made-up timings: the prefill graph must win at a size and at every larger one
    class FakeBatch:
        def __init__(self, engine):
            self.engine, self.rows = engine, 0

        def add(self, row):
            self.rows += 1

        def step(self, tokens):
            on_prefill = len(tokens) >= self.engine.prefill_min_rows
            cost = {4: (1.0, 2.0), 8: (2.0, 1.9), 16: (3.0, 3.5), 32: (6.0, 5.0)}[len(tokens)]
            if ties:
                cost = {4: (1.0, 2.0), 8: (2.0, 1.8), 16: (3.0, 2.95), 32: (6.0, 5.0)}[len(tokens)]
            fake_time[0] += cost[on_prefill]

    fake_time, ties = [0.0], False
    engine = served.engine
    monkeypatch.setattr(at, "time", SimpleNamespace(perf_counter=lambda: fake_time[0]))
    monkeypatch.setattr(engine, "new_batch", lambda: FakeBatch(engine))
    rows, timed = at.measure_prefill_rows(engine, repeats=3)
    assert rows == 32 and timed["8"] == [2000.0, 1900.0] and engine.prefill_min_rows == want  # 16 breaks the run
    ties = True  # 16 rows 1.7% faster on the prefill graph: a tie, so 8 rows (10% faster) does not count either
    assert at.measure_prefill_rows(engine, repeats=3)[0] == 32
    monkeypatch.undo()
    lean = load_model(int8_bundle, "onnxruntime", prefill_graph=False)
    assert at.measure_prefill_rows(lean.engine) is None and lean.engine.prefill_min_rows == PREFILL_GRAPH_MIN_ROWS


# --- the command line and the agent ---------------------------------------------------------------------

def edgeglm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_probe_bundle_json_then_text_from_cache(int8_bundle, tmp_path):
    proc = edgeglm("probe", "--bundle", int8_bundle, "--json", "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["fingerprint"]) == 16 and data["cpu"]["logical_cores"] >= 1  # today's probe output stays
    tune = data["autotune"]
    assert tune["from_cache"] is False and tune["fingerprint"] == data["fingerprint"]
    assert tune["bundle_sha256"] == open_bundle(int8_bundle).sha256
    assert {t["candidate"]["backend"] for t in tune["trials"]} == {"onnxruntime", "openvino"}
    chosen = [t for t in tune["trials"] if t["candidate"] == tune["choice"]]
    assert len(chosen) == 1 and chosen[0]["status"] == "measured"
    for t in tune["trials"]:
        assert t["status"] in ("measured", "excluded")
        if t["status"] == "measured":
            assert t["ttft_ms"] > 0 and t["decode_tok_s"] > 0 and t["load_s"] >= 0
        else:
            assert t["reason"]

    # what batching.max_kv_mb "auto" comes to for this bundle here, and how many requests it holds
    arch = json.loads((Path(int8_bundle) / "manifest.json").read_text())["architecture"]
    per_position = 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * arch["head_dim"] * 4
    kv = data["kv"]
    assert kv["kv_bytes_per_position"] == per_position and kv["kv_dtype"] == "float32"
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert 0 < kv["auto_kv_mb"] * 2**20 <= available / 3 * 1.2
    window = arch["max_position_embeddings"]
    assert kv["context_window"] == window and kv["full_context_requests"] >= 1
    assert kv["requests_of_768"] >= kv["full_context_requests"]

    text = edgeglm("probe", "--bundle", int8_bundle, "--cache-dir", tmp_path)
    assert text.returncode == 0, text.stderr
    assert "from the cache" in text.stdout and f"chosen: {tune['choice_path']}" in text.stdout
    assert f"KV cache: {per_position / 1024:g} KiB per position (float32), context window {window}" in text.stdout
    assert 'batching.max_kv_mb "auto" here: about' in text.stdout
    # counted up to 256: a box with room for more says so, not "256" (a tiny model on this machine has room)
    fits = kv["auto_kv_mb"] * 2**20 / (window * per_position)
    if fits > 600:
        assert kv["full_context_requests"] == 256 and "256 or more request(s) of the whole window" in text.stdout
    else:
        assert f"{kv['full_context_requests']} request(s) of the whole window" in text.stdout
    no_accelerator = "no GPU or NPU path (none found, or none a backend here can use): CPU paths only"
    assert (no_accelerator in text.stdout) == (not tune["accelerators"])


@pytest.fixture
def other_work(monkeypatch):
    """Busy loops in other processes on every CPU this process may use, started and stopped by the test
    (`start()`, `stop()`), with the autotune's re-measuring at its default limit."""
    import runtime.autotune as at

    monkeypatch.setenv("EDGEGLM_AUTOTUNE_CONTENTION_LIMIT", str(at.CONTENTION_LIMIT))
    procs: list[subprocess.Popen] = []

    class Loops:
        def start(self):
            procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])
                         for _ in range(len(os.sched_getaffinity(0))))

        def stop(self):
            for proc in procs:
                proc.kill()
                proc.wait()
            procs.clear()
    loops = Loops()
    yield loops
    loops.stop()


def test_a_choice_measured_beside_other_work_is_measured_again_once_the_box_is_quieter(int8_bundle, tmp_path,
                                                                                         other_work, caplog):
    """An update is tuned while the model before it serves, and a box may run other jobs: paths measured beside
    them can rank wrong, and the result was cached for good. The other work on this process's CPUs is recorded with the result (said by
    `probe`); a later load that finds the box as busy keeps it, one that finds it quieter measures again."""
    import runtime.autotune as at

    hw = only(probe_hardware(), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    other_work.start()
    with caplog.at_level("WARNING", logger="edgeglm"):
        busy = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST, isolate=True)
    assert not busy.from_cache and busy.contention > at.CONTENTION_LIMIT
    assert json.loads(Path(busy.cache_path).read_text())["contention"] == busy.contention
    assert "measured beside" in caplog.text and "measured beside" in format_result(busy)

    as_busy = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST, isolate=True)
    assert as_busy.from_cache and as_busy.measured_at == busy.measured_at  # still busy: kept
    other_work.stop()
    caplog.clear()
    with caplog.at_level("INFO", logger="edgeglm"):
        quiet = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST, isolate=True)
    assert not quiet.from_cache and quiet.measured_at > busy.measured_at and "measuring again" in caplog.text
    assert json.loads(Path(quiet.cache_path).read_text())["measured_at"] == quiet.measured_at

    # turned off by the environment: a busy result is kept whatever the box does later
    other_work.start()
    busy = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST, isolate=True, retune=True)
    other_work.stop()
    assert busy.contention > at.CONTENTION_LIMIT
    os.environ["EDGEGLM_AUTOTUNE_CONTENTION_LIMIT"] = "inf"
    kept = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST, isolate=True)
    assert kept.from_cache and kept.measured_at == busy.measured_at and "measured beside" not in format_result(kept)


def test_where_batched_steps_go_measured_beside_other_work_is_measured_again_once_quieter(int8_bundle, tmp_path,
                                                                                         other_work):
    """The same for a named backend's rows, timed in the serving process."""
    import runtime.autotune as at

    hw = probe_hardware()
    other_work.start()
    load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw)
    path = next((tmp_path / "autotune").glob("*-rows-*.json"))
    busy = json.loads(path.read_text())
    assert busy["contention"] > at.CONTENTION_LIMIT
    load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw)
    assert json.loads(path.read_text())["measured_at"] == busy["measured_at"]  # as busy: kept
    other_work.stop()
    load_model(int8_bundle, "onnxruntime", cache_dir=tmp_path, hardware=hw)
    assert json.loads(path.read_text())["measured_at"] > busy["measured_at"]  # quieter: measured again


def test_a_damaged_contention_or_limit_is_said_not_a_traceback(int8_bundle, tmp_path, monkeypatch, caplog):
    import runtime.autotune as at

    hw = only(probe_hardware(), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    first = autotune(bundle, hw, cache_dir=tmp_path, settings=FAST)
    data = json.loads(Path(first.cache_path).read_text())
    data["contention"] = "lots"
    Path(first.cache_path).write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="edgeglm"):
        assert not autotune(bundle, hw, cache_dir=tmp_path, settings=FAST).from_cache
    assert "contention 'lots' is not a number of cores" in caplog.text
    caplog.clear()
    monkeypatch.setenv("EDGEGLM_AUTOTUNE_CONTENTION_LIMIT", "some")
    with caplog.at_level("WARNING", logger="edgeglm"):
        assert at.contention_limit() == at.CONTENTION_LIMIT
    assert "EDGEGLM_AUTOTUNE_CONTENTION_LIMIT='some' is not a number of cores" in caplog.text


def test_a_cache_file_nested_past_pythons_limit_is_measured_again_not_a_traceback(int8_bundle, tmp_path):
    """JSON nested deeper than Python's recursion limit raised RecursionError out of `probe`, `bench` and the agent's
    start (a crash loop on that file)."""
    assert edgeglm("probe", "--bundle", int8_bundle, "--json", "--cache-dir", tmp_path).returncode == 0
    path = next((tmp_path / "autotune").glob("*.json"))
    path.write_text("[" * 200_000)
    proc = edgeglm("probe", "--bundle", int8_bundle, "--cache-dir", tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"autotune cache {path} ignored" in proc.stderr and "measuring again" in proc.stderr


@pytest.mark.parametrize("field,value", [("measured_at", "yesterday"), ("choice", {"backend": "bogus"}),
                                         ("trial_ttft", "fast"),
                                         # numbers JSON cannot hold, or no date can show: a traceback at printing
                                         # (`time.localtime`), `"measured_at": NaN` in probe --json
                                         ("measured_at", float("nan")), ("measured_at", 1e300),
                                         ("trial_ttft", float("inf")), ("trial_ttft", -5.0)])
def test_a_cached_result_with_a_damaged_field_is_measured_again_not_a_traceback(int8_bundle, tmp_path, field, value):
    """A cache file whose fields had the wrong type (a damaged or hand-edited file) was taken as it was: `probe
    --bundle` then died in printing it (TypeError, ValueError) and `bench` / the agent in loading its choice
    (KeyError 'bogus'). Such a file is ignored with a warning naming the field, and the path measured again."""
    first = edgeglm("probe", "--bundle", int8_bundle, "--json", "--cache-dir", tmp_path)
    assert first.returncode == 0, first.stderr
    path = next((tmp_path / "autotune").glob("*.json"))
    data = json.loads(path.read_text())
    if field == "trial_ttft":
        data["trials"][0]["ttft_ms"] = value
    else:
        data[field] = value
    path.write_text(json.dumps(data))
    proc = edgeglm("probe", "--bundle", int8_bundle, "--cache-dir", tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"autotune cache {path} ignored" in proc.stderr and "measuring again" in proc.stderr
    named = {"measured_at": f"measured_at {value!r}", "choice": "choice.backend 'bogus'",
             "trial_ttft": f"trials[0].ttft_ms {value!r}"}[field]
    assert named in proc.stderr and "measured now" in proc.stdout
    assert json.loads(path.read_text())["measured_at"] != value  # the cache holds a good result again


def test_bench_with_a_device_the_box_lacks_exits_2_naming_what_it_has(int8_bundle):
    proc = edgeglm("bench", "--bundle", int8_bundle, "--backend", "onnxruntime", "--device", "cuda", "--runs", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "edgeglm bench: error: ONNX Runtime execution provider 'CUDAExecutionProvider' is not available; " \
           "found: " in proc.stderr and "CPUExecutionProvider" in proc.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--retune"], "give --bundle BUNDLE too"),
    (["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    (["--bundle", ".", "--threads", "0"], "'0' is not a positive integer"),
])
def test_probe_bad_flags_exit_2(args, fragment):
    proc = edgeglm("probe", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr


def test_agent_serves_and_reports_the_autotuned_path(int8_bundle, tmp_path):
    from agent.config import load_config
    from agent.daemon import Agent

    cfg = load_config(None, {"model.bundle": str(int8_bundle), "model.slots_dir": str(tmp_path / "state"),
                             "mqtt.enabled": False, "http.port": 0, "ota.require_signature": False})
    for expected in ("autotune", "autotune cache"):  # the second start reuses the first one's measurement
        agent = Agent(cfg)
        agent.start()
        try:
            execution = agent.reported_state().hardware["execution"]
            assert execution["chosen_by"] == expected and execution["backend"] == agent.model.backend
            assert agent.reported_state().execution_path.startswith(execution["backend"] + ":")
            metrics = urllib.request.urlopen(agent.http.url + "/metrics", timeout=10).read().decode()
            line = next(x for x in metrics.splitlines() if x.startswith("edgeglm_execution_path_info{"))
            assert f'backend="{execution["backend"]}"' in line and f'chosen_by="{expected}"' in line
            assert line.endswith(" 1")
        finally:
            agent.shutdown(1.0)
    assert len(list((tmp_path / "state" / "autotune").glob("*.json"))) == 1


def test_agent_serves_the_device_its_config_names(int8_bundle, tmp_path):
    from agent.config import load_config
    from agent.daemon import Agent

    cfg = load_config(None, {"model.bundle": str(int8_bundle), "model.slots_dir": str(tmp_path / "state"),
                             "model.backend": "openvino", "model.device": "cpu", "mqtt.enabled": False,
                             "http.port": 0, "ota.require_signature": False})
    agent = Agent(cfg)
    agent.start()
    try:
        execution = agent.reported_state().hardware["execution"]
        assert (execution["backend"], execution["device"], execution["chosen_by"]) == ("openvino", "CPU", "configured")
        assert agent.reported_state().execution_path == "openvino:cpu"
    finally:
        agent.shutdown(1.0)
    assert not (tmp_path / "state" / "autotune").exists()  # nothing measured


def test_paths_are_measured_one_at_a_time_when_they_would_not_fit(int8_bundle):
    """The memory estimate counts ONNX Runtime's weights twice when the bundle has a prefill graph
    (packed by the decode session, mapped by the prefill session) and leaves out the embedding table
    (read a row at a time); what a loaded path adds is more than its files (OpenVINO's plugin keeps its own
    copy of the weights: twice), and paths are loaded together only when that fits in half the memory."""
    from runtime.autotune import _groups, loaded_bytes, resident_bytes

    bundle = open_bundle(int8_bundle)
    size = {f.path: f.size for f in bundle.manifest.files}
    ort_files = sum(v for k, v in size.items() if k.startswith("onnxruntime/") and not k.endswith(".npy"))
    assert "onnxruntime/prefill.onnx" in size
    assert resident_bytes(bundle, "onnxruntime") == ort_files + size["onnxruntime/model.onnx.data"]
    assert resident_bytes(bundle, "openvino") == sum(v for k, v in size.items() if k.startswith("openvino/"))
    assert loaded_bytes(bundle, "openvino") > 2 * resident_bytes(bundle, "openvino")
    assert loaded_bytes(bundle, "onnxruntime") > resident_bytes(bundle, "onnxruntime")
    cands = [Candidate("onnxruntime", ORT_CPU, 2), Candidate("openvino", "CPU", 2)]
    need = sum(loaded_bytes(bundle, c.backend) for c in cands)
    assert _groups(bundle, cands, 2 * need) == [cands]
    assert _groups(bundle, cands, 2 * need - 2) == [[c] for c in cands]
    assert _groups(bundle, cands, None) == [cands]  # unknown memory: together


@pytest.mark.parametrize("backend,prefill", [("onnxruntime", True), ("onnxruntime", False),
                                             ("onnxruntime", "only"), ("openvino", None)])
def test_a_dropped_engine_lets_go_of_its_memory_at_once(int8_bundle, backend, prefill):
    """An engine nobody refers to any more is freed by reference counting, not whenever Python's cyclic
    collector runs (it may not for a long time in an idle agent): ONNX Runtime's engine once held itself
    through a closure, so the autotune's measured paths, and a model replaced over the air, kept their
    sessions' memory (glm-m's six paths "one at a time" peaked at 2.75 GB instead of about 1 GB)."""
    import gc
    import weakref

    from runtime.generate import decode_one_token, prefill as run_prefill

    options = {} if prefill is None else {"prefill_graph": prefill}
    model = load_model(int8_bundle, backend, 2, **options)
    logits, cache = run_prefill(model.engine, [1, 2, 3, 4, 5])
    decode_one_token(model.engine, int(logits.argmax()), 5, cache)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        engine = weakref.ref(model.engine)
        del model, cache, logits
        assert engine() is None, "the engine outlived its last reference (a reference cycle)"
    finally:
        if was_enabled:
            gc.enable()


def _watch_loads(monkeypatch) -> tuple[list, list]:
    """(weak references to every engine the autotune loads, how many of those before it were still alive at
    each load)."""
    import weakref

    import runtime.autotune as autotune_module

    loaded, alive_at_load = [], []
    real_load = autotune_module.load_engine

    def load_engine(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        engine = real_load(*args, **kwargs)
        loaded.append(weakref.ref(engine))
        return engine
    monkeypatch.setattr(autotune_module, "load_engine", load_engine)
    return loaded, alive_at_load


def test_paths_measured_one_at_a_time_are_let_go_before_the_next_one_loads(int8_bundle, monkeypatch):
    """Where memory is tight the autotune loads one path at a time; that only bounds its peak if each path's
    engine is gone before the next one loads, and none is left once the result is known (the serving path
    loads next)."""
    from runtime.probe import MemoryInfo

    loaded, alive_at_load = _watch_loads(monkeypatch)
    hw = replace(hardware(), memory=MemoryInfo(8 << 30, 1 << 20, None))  # 1 MiB available: one at a time
    result = autotune(open_bundle(int8_bundle), hw, settings=FAST)
    assert len(loaded) == len(result.trials) >= 3
    assert all(t.status == "measured" for t in result.trials)
    assert alive_at_load == [0] * len(loaded)
    assert [ref() for ref in loaded] == [None] * len(loaded)


def test_memory_taken_since_the_hardware_was_probed_counts_for_one_at_a_time(int8_bundle, monkeypatch):
    """The agent probes the hardware once, at start; an update is tuned later, while the model before it
    serves. The autotune reads what the process can take now as well, and the lesser decides whether the
    paths are loaded together."""
    import runtime.autotune as autotune_module
    from runtime.probe import MemoryInfo

    loaded, alive_at_load = _watch_loads(monkeypatch)
    at_start = hardware()  # 4 GiB available when probed: the paths would be loaded together
    autotune(open_bundle(int8_bundle), at_start, settings=FAST)
    assert max(alive_at_load) >= 1
    loaded.clear(), alive_at_load.clear()
    monkeypatch.setattr(autotune_module, "probe_memory", lambda: MemoryInfo(8 << 30, 1 << 20, None))  # now: 1 MiB
    result = autotune(open_bundle(int8_bundle), at_start, settings=FAST)
    assert all(t.status == "measured" for t in result.trials)
    assert alive_at_load == [0] * len(loaded) and len(loaded) >= 3


FAULT_ON_U8_KV = """
import os, signal, time
import runtime.autotune as autotune_module
_real_load = autotune_module.load_engine
def load_engine(backend, *args, **kwargs):
    if kwargs.get("kv_cache_precision") == "u8":
        {fault}
    return _real_load(backend, *args, **kwargs)
autotune_module.load_engine = load_engine
"""


@pytest.mark.lifecycle
@pytest.mark.parametrize("fault,reason", [
    ("os.kill(os.getpid(), signal.SIGSEGV)", "the measuring process died (killed by SIGSEGV) while loading"),
    ("time.sleep(600)", "loading took longer than 20 s: stopped")])
def test_a_path_that_crashes_or_hangs_the_measuring_process_is_excluded_not_the_agent(int8_bundle, tmp_path,
                                                                                      monkeypatch, fault, reason):
    """The agent and the CLI measure paths in a child process: a plugin that segfaults (or hangs) on one
    path would otherwise kill the agent at every start, before it serves anything. The fault is injected
    into the child only (a sitecustomize on its PYTHONPATH): a real SIGSEGV, or a load that never returns.
    The path is excluded with the reason; the path loaded beside it in the child that died is measured
    again in a new one, and chosen."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAULT_ON_U8_KV.replace("{fault}", fault))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject)] + ([os.environ["PYTHONPATH"]] if os.environ.get(
        "PYTHONPATH") else [])))  # before what the box already puts there
    hw = only(hardware(physical=2, logical=2), "openvino")
    result = autotune(open_bundle(int8_bundle), hw, settings=FAST, isolate=True, path_timeout_s=20)
    trials = {t.candidate.kv_cache_precision: t for t in result.trials}
    assert trials["u8"].status == "excluded" and trials["u8"].reason == reason
    assert trials["f32"].status == "measured" and trials["f32"].decode_tok_s > 0
    assert result.choice == trials["f32"].candidate
    assert reason in format_result(result)


def test_paths_measured_in_a_child_process_report_what_in_process_measurement_does(int8_bundle):
    """Isolated measurement carries every field of a trial back (status, golden check, timings, the prefill
    graph's row threshold), so the cache and `edgeglm probe` read the same as before."""
    hw = only(hardware(physical=2, logical=2), "onnxruntime")
    here = autotune(open_bundle(int8_bundle), hw, settings=FAST)
    there = autotune(open_bundle(int8_bundle), hw, settings=FAST, isolate=True)
    assert [t.candidate for t in there.trials] == [t.candidate for t in here.trials]
    for a, b in zip(here.trials, there.trials):
        assert (a.status, a.reason, a.golden) == (b.status, b.reason, b.golden) == ("measured", None, None)
        assert b.ttft_ms > 0 and b.decode_tok_s > 0 and b.load_s > 0
        assert (a.prefill_min_rows is None) == (b.prefill_min_rows is None)
        assert (a.prefill_rows_ms or {}).keys() == (b.prefill_rows_ms or {}).keys()


@pytest.mark.lifecycle
def test_a_stop_signal_sent_to_the_measuring_child_is_the_parents_to_act_on(int8_bundle, monkeypatch):
    """systemd's stop sends SIGTERM to every process of the unit (Ctrl-C sends SIGINT to the terminal's group): the
    measuring child died of it, the path it measured was recorded as one that kills its process (excluded from the
    cache until --retune), and the measuring went on in a new child. The child ignores both; the parent stops it."""
    import os
    import signal
    import threading

    import runtime.child as child_module

    started = []
    real_init = child_module.Child.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(child_module.Child, "__init__", init)
    hw = only(hardware(physical=2, logical=2), "onnxruntime")
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("tune", autotune(open_bundle(int8_bundle), hw,
                                                                             settings=FAST, isolate=True)))
    worker.start()

    def ignoring() -> bool:  # SigIgn of /proc: the child's own handlers are set (child_stdout ran)
        try:
            fields = dict(line.split(":\t", 1) for line in open(f"/proc/{started[0].proc.pid}/status"))
        except (IndexError, OSError):
            return False
        return bool(int(fields["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)))
    until(lambda: started and ignoring() or not worker.is_alive(), 60)
    if started:
        pid = started[0].proc.pid
        assert os.getpgid(pid) == pid  # a session of its own: not in the terminal's (the parent's) process group
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                os.kill(started[0].proc.pid, sig)
            except ProcessLookupError:
                pass
    worker.join(300)
    tune = done["tune"]
    assert [t.status for t in tune.trials] == ["measured"] * len(tune.trials), [t.reason for t in tune.trials]
    assert len(started) == 1  # one child did it all (a dead one was replaced by another)


HANG_EVERY_LOAD = """
import time
import runtime.autotune as autotune_module
def load_engine(*args, **kwargs):
    time.sleep(600)
autotune_module.load_engine = load_engine
"""


def _hang_in_the_measuring_child(tmp_path, monkeypatch) -> None:
    """Every load in the autotune's measuring child hangs (a sitecustomize on its PYTHONPATH; the agent's own
    loads go through runtime.engine, not runtime.autotune, and are left alone)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(HANG_EVERY_LOAD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject)] + ([os.environ["PYTHONPATH"]] if os.environ.get(
        "PYTHONPATH") else [])))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.lifecycle
def test_a_stop_asked_while_paths_are_measured_ends_the_measuring_at_once(int8_bundle, tmp_path, monkeypatch):
    """The agent measures its paths at a first start (minutes for a large model, up to PATH_TIMEOUT_S per path):
    systemd's stop waited for all of it and then SIGKILLed the agent (TimeoutStopSec). With `stop` set, the
    measuring child is killed and Stopped raised within a fraction of a second; nothing is cached."""
    import threading

    import runtime.child as child_module
    from runtime.errors import Stopped

    _hang_in_the_measuring_child(tmp_path, monkeypatch)
    started = []
    real_init = child_module.Child.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(child_module.Child, "__init__", init)
    stop, outcome = threading.Event(), {}

    def tune():
        try:
            outcome["result"] = autotune(open_bundle(int8_bundle), only(hardware(), "onnxruntime"), settings=FAST,
                                         isolate=True, cache_dir=tmp_path / "cache", stop=stop)
        except Exception as exc:  # noqa: BLE001: the test looks at it
            outcome["error"] = exc
    worker = threading.Thread(target=tune)
    worker.start()
    until(lambda: started or not worker.is_alive(), 60)
    time.sleep(1.0)  # the child is in its (hanging) load
    assert worker.is_alive(), outcome
    stop.set()
    worker.join(10)
    assert not worker.is_alive()
    assert isinstance(outcome.get("error"), Stopped), outcome
    assert started[0].proc.poll() is not None  # the measuring child is gone
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing measured is kept


@pytest.mark.lifecycle
def test_a_stop_is_seen_when_the_paths_are_measured_in_this_process(int8_bundle, tmp_path, monkeypatch):
    """Where no measuring child can start (ENOMEM, EAGAIN), the paths are measured in the agent's own process: a
    stop is seen there too, after the load or round in progress, not at the end of the whole autotune."""
    import threading

    import runtime.autotune as at
    import runtime.child as child_module
    from runtime.errors import Stopped

    def no_child(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(child_module.Child, "__init__", no_child)
    stop, steps = threading.Event(), []
    real_load = at._load

    def load(*args, **kwargs):  # the stop comes while the first path loads
        stop.set()
        return real_load(*args, **kwargs)
    monkeypatch.setattr(at, "_load", load)
    with pytest.raises(Stopped):
        autotune(open_bundle(int8_bundle), only(hardware(), "onnxruntime"), settings=FAST, isolate=True,
                 cache_dir=tmp_path / "cache", stop=stop)
    assert not list((tmp_path / "cache").rglob("*.json"))
    stop.clear()  # already set before: nothing is measured at all
    stop.set()
    monkeypatch.setattr(at, "_load", lambda *a, **k: steps.append(1) or real_load(*a, **k))
    with pytest.raises(Stopped):
        autotune(open_bundle(int8_bundle), only(hardware(), "onnxruntime"), settings=FAST, isolate=True,
                 cache_dir=tmp_path / "cache", stop=stop)
    assert steps == []


@pytest.mark.lifecycle
def test_sigterm_while_the_agent_measures_its_paths_stops_it_cleanly_at_once(int8_bundle, tmp_path, monkeypatch):
    """`edgeglm agent` on a bundle with backend auto, its first start's measuring hung: SIGTERM ends it within
    seconds, exit code 0, the measuring child gone, and the log says it stopped before the model served."""
    _hang_in_the_measuring_child(tmp_path, monkeypatch)
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--bundle", str(int8_bundle), "--port", "0",
                             "--state-dir", str(tmp_path / "state"), "--backend", "auto"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "EDGEGLM_OTA__REQUIRE_SIGNATURE": "false",
                                 "EDGEGLM_MQTT__ENABLED": "false"})
    try:
        until(lambda: _children(proc.pid) or proc.poll() is not None, 120)
        assert proc.poll() is None, log.read_text()[-3000:]
        child = _children(proc.pid)[0]
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
        until(lambda: not Path(f"/proc/{child}").exists() or "State:\tZ" in Path(f"/proc/{child}/status").read_text(),
              10)
        text = log.read_text()
        assert "stopping before the model served: the autotune was stopped" in text, text[-3000:]
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_session_that_is_not_on_the_provider_asked_for_is_refused(int8_bundle):
    """ONNX Runtime can hand back a CPU session when a GPU provider cannot start (seen on a CUDA machine
    without TensorRT's libraries: the autotune measured the CPU and reported TensorRT); the engine checks
    the session's providers, so such a path is excluded with the reason instead."""
    import onnxruntime as ort

    from runtime.engine import _first_line, require_provider

    bundle = open_bundle(int8_bundle)
    session = ort.InferenceSession(str(bundle.path(bundle.manifest.backends["onnxruntime"].entry)),
                                   providers=[ORT_CPU])
    require_provider(session, ORT_CPU)
    with pytest.raises(BackendUnavailable, match="'CUDAExecutionProvider' did not start; the session runs on "
                                                 "CPUExecutionProvider instead"):
        require_provider(session, "CUDAExecutionProvider")
    # ONNX Runtime's messages start with a C++ source location; the reason a user can act on follows it
    raw = RuntimeError("/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::"
                       "python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::"
                       "ProviderOptions&) Please install TensorRT libraries as mentioned in the GPU requirements "
                       "page\nmore")
    assert _first_line(raw) == "Please install TensorRT libraries as mentioned in the GPU requirements page"


def test_an_accelerator_that_failed_while_measured_is_measured_again_not_excluded_for_good(int8_bundle, tmp_path,
                                                                                          monkeypatch, caplog):
    """An update is tuned while the model before it still serves on the GPU: the new model's GPU path ran out of
    device memory, a CPU path was chosen and cached, and the box served on its CPU until someone ran --retune. Such
    a choice is measured again at the next load (and, the old model gone, the GPU path runs); a path that fails on
    the second try too is taken as failing (not measured at every start)."""
    import runtime.autotune as at

    runs, gpu_fails = [], {1}

    def fake_measure(bundle, trials, settings, available, on_step=None, prefill="on"):
        runs.append(len(runs) + 1)
        for t in trials:
            if not t.candidate.on_cpu and runs[-1] in gpu_fails:
                t.status, t.reason = "excluded", "could not load: CUDA failure 2: out of memory"
            else:
                t.status, t.ttft_ms, t.decode_tok_s = "measured", 10.0, 100.0 if t.candidate.on_cpu else 300.0

    monkeypatch.setattr(at, "measure", fake_measure)
    hw = only(hardware(ort_providers=("CUDAExecutionProvider", ORT_CPU)), "onnxruntime")
    bundle = open_bundle(int8_bundle)
    with caplog.at_level("WARNING", logger="edgeglm"):
        first = autotune(bundle, hw, cache_dir=tmp_path)
    assert first.choice.on_cpu and not first.retried
    assert "failed while measured; the choice (onnxruntime CPU" in caplog.text and "measured again at the next " \
        "load" in caplog.text
    second = autotune(bundle, hw, cache_dir=tmp_path)
    assert runs == [1, 2] and second.choice.device == "CUDAExecutionProvider" and not second.from_cache
    assert autotune(bundle, hw, cache_dir=tmp_path).from_cache and runs == [1, 2]
    # a path that fails on its second try too: kept as failing
    gpu_fails.update({3, 4})
    assert autotune(bundle, hw, cache_dir=tmp_path, retune=True).choice.on_cpu and runs == [1, 2, 3]
    again = autotune(bundle, hw, cache_dir=tmp_path)
    assert runs == [1, 2, 3, 4] and again.retried and again.choice.on_cpu
    kept = autotune(bundle, hw, cache_dir=tmp_path)
    assert kept.from_cache and kept.retried and runs == [1, 2, 3, 4]
