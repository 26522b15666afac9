"""The bundle's GPU graph (GroupQueryAttention and the KV cache in fp16, the cache kept as device buffers).

ONNX Runtime's CUDA provider has GroupQueryAttention only in fp16/bf16, so on GPU providers the engine runs
this graph with the cache in device memory (runtime.engine.DeviceCache). Without a GPU the same graph and
the same DeviceCache code run on the CPU provider (`gpu_graph=True`), against transformers' GlmForCausalLM
and against the decode graph. On a machine with onnxruntime-gpu, `EDGEGLM_TEST_GPU_PROVIDER=
CUDAExecutionProvider pytest tests/runtime/test_gpu_graph.py` runs them on the GPU, the cache in CUDA
memory (done on an H200 machine, docs/performance.md).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch

from agent.model import load_model
from models.tiny import HELDOUT_MODULES, corpus_text
from ota.bundle import open_bundle
from runtime.engine import (GPU_GRAPH_FILE, GPU_GRAPH_KEY, KV_DTYPE_KEY, CacheRow, DeviceCache, DeviceRaggedBatch,
                            MergedBatch, ModelArch, OrtCache, load_engine)
from runtime.errors import ModelLoadError
from runtime.generate import SamplingParams, decode_one_token, generate, prefill
from runtime.golden import teacher_forced_logits

PROVIDER = os.environ.get("EDGEGLM_TEST_GPU_PROVIDER", "CPUExecutionProvider")
ON_CPU = PROVIDER == "CPUExecutionProvider"


def engines(bundle_dir, **options):
    bundle = open_bundle(bundle_dir)
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    entry = bundle.path(bundle.manifest.backends["onnxruntime"].entry)
    return (load_engine("onnxruntime", entry, arch, prefill_graph="off", **options),
            load_engine("onnxruntime", entry, arch, gpu_graph=True, provider=PROVIDER, **options))


@pytest.fixture(scope="module")
def heldout_ids(fp32_bundle):
    return load_model(fp32_bundle, "onnxruntime").tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


def test_export_writes_the_gpu_graph_over_the_same_weights(int8_bundle):
    bundle = open_bundle(int8_bundle)
    files = {f.path: f.size for f in bundle.manifest.files}
    assert f"onnxruntime/{GPU_GRAPH_FILE}" in files  # hashed and signed with the rest
    assert files[f"onnxruntime/{GPU_GRAPH_FILE}"] < 1 << 20  # the graph only: its weights are model.onnx.data's
    decode = onnx.load(str(int8_bundle / "onnxruntime" / "model.onnx"), load_external_data=False)
    gpu = onnx.load(str(int8_bundle / "onnxruntime" / GPU_GRAPH_FILE), load_external_data=False)
    assert {p.key: p.value for p in decode.metadata_props}[GPU_GRAPH_KEY] == GPU_GRAPH_FILE
    assert {p.key: p.value for p in gpu.metadata_props}[KV_DTYPE_KEY] == "float16"
    kv_types = {v.name: v.type.tensor_type.elem_type for v in list(gpu.graph.input) + list(gpu.graph.output)
                if v.name.startswith(("past.", "present."))}
    assert kv_types and set(kv_types.values()) == {onnx.TensorProto.FLOAT16}
    locations = {e.value for t in gpu.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    # the form measured on CUDA: RotaryEmbedding nodes and MatMulNBits blocks of at most 128, over the very
    # weight bytes the decode graph (rotary inside GroupQueryAttention, blocks of up to 1024) reads
    ops = {n.op_type for n in gpu.graph.node}
    assert "RotaryEmbedding" in ops and "RotaryEmbedding" not in {n.op_type for n in decode.graph.node}

    def blocks(model):
        return {n.input[1]: next(a.i for a in n.attribute if a.name == "block_size")
                for n in model.graph.node if n.op_type == "MatMulNBits"}

    def offsets(model):
        return {t.name: next(e.value for e in t.external_data if e.key == "offset")
                for t in model.graph.initializer if t.name.endswith(".weight_uint8")}

    assert max(blocks(gpu).values()) <= 128
    assert offsets(gpu) == offsets(decode) and offsets(gpu)  # stored once, read by both
    report = bundle.manifest.compression["export"]["backends"]["onnxruntime"]["gpu_graph"]
    assert report["golden_on_cpu"].startswith("32/32") or "near-tie" in report["golden_on_cpu"]


def test_gpu_graph_logits_follow_transformers(fp32_bundle, trained_checkpoint, heldout_ids):
    """fp32 weights with fp16 attention and cache: teacher-forced logits within fp16 rounding of
    GlmForCausalLM's, and greedy continuations equal to it on held-out prompts."""
    from transformers import GlmForCausalLM

    hf = GlmForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()
    _, gpu = engines(fp32_bundle)
    seq = heldout_ids[300:364]
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0, 15:-1].numpy()
    ours = teacher_forced_logits(gpu, seq[:16], seq[16:])
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    for start in (0, 900):
        prompt = heldout_ids[start:start + 24]
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert list(generate(gpu, prompt, SamplingParams(max_tokens=24))) == want


def test_long_prompts_run_in_pieces_on_a_device_cache_and_give_transformers_answers(fp32_bundle, trained_checkpoint,
                                                                                   heldout_ids, monkeypatch):
    """A prompt longer than `prompt_run_tokens` runs as several runs of at most that many tokens (each run's
    memory in ONNX Runtime's CUDA arena is kept for good, and grows faster than the prompt), and the answer
    is still transformers' greedy continuation; a run that fails leaves the cache as it was."""
    from transformers import GlmForCausalLM

    hf = GlmForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()
    _, gpu = engines(fp32_bundle)
    gpu.prompt_run_tokens = 7
    runs = []
    real_run = gpu._run
    monkeypatch.setattr(gpu, "_run", lambda ids, *a, **k: runs.append(np.shape(ids)[1]) or real_run(ids, *a, **k))
    prompt = heldout_ids[500:530]  # 30 tokens: 7 + 7 + 7 + 7 + 2
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert list(generate(gpu, prompt, SamplingParams(max_tokens=16))) == want
    assert runs[:5] == [7, 7, 7, 7, 2] and set(runs[5:]) == {1}
    logits, cache = prefill(gpu, prompt)  # the last piece's logits are the whole prompt's last position's
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max() and logits.argmax() == ref.argmax()

    calls = []

    def fails_third(ids, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of device memory")
        return real_run(ids, *a, **k)

    monkeypatch.setattr(gpu, "_run", fails_third)
    more = heldout_ids[600:620]
    with pytest.raises(RuntimeError, match="out of device memory"):
        gpu.forward(np.array([more]), np.arange(30, 50)[None], np.ones((1, 50), np.int64), cache)
    assert cache.length == 30  # as before the failed input: the next input goes on from there
    monkeypatch.setattr(gpu, "_run", real_run)
    out, _ = gpu.forward(np.array([more]), np.arange(30, 50)[None], np.ones((1, 50), np.int64), cache)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + more])).logits[0, -1].numpy()
    assert out[0].argmax() == ref.argmax()


def test_device_cache_grows_exports_imports_and_merges_like_the_host_cache(int8_bundle, heldout_ids):
    """Every path that reads or writes the cache on the host (growth past its capacity, a prefix exported
    and imported, rows merged into a batch) gives what one sequence alone computes on the same graph."""
    decode, gpu = engines(int8_bundle)
    assert isinstance(gpu.new_cache(), DeviceCache) and type(decode.new_cache()) is OrtCache
    where = "cpu" if ON_CPU else "cuda"
    assert gpu.kv_cache == f"{where} memory, float16 ({GPU_GRAPH_FILE})" and gpu.ragged_batches
    assert isinstance(gpu.new_batch(), DeviceRaggedBatch)
    prompt = heldout_ids[:200]
    logits, cache = prefill(gpu, prompt)
    assert cache.dtype == cache.key(0).dtype == cache.value(0).dtype == np.float16 and cache.capacity == 328
    tokens, steps = [int(logits.argmax())], []
    for i in range(160):  # past 328 positions: the cache grows (on the device, by the KV copy graph)
        logits, cache = decode_one_token(gpu, tokens[-1], len(prompt) + i, cache)
        tokens.append(int(logits.argmax()))
        steps.append(logits)
    assert cache.capacity > 328 and cache.length == 360
    seq = prompt + tokens[:-1]
    recomputed, _ = gpu.forward(np.asarray([seq]), np.arange(len(seq))[None], np.ones((1, len(seq)), np.int64),
                                gpu.new_cache())
    np.testing.assert_allclose(steps[-1], recomputed[0], atol=2e-2)  # grown cache = one pass over all of it

    with pytest.raises(TypeError, match="in device memory: read them with host"):
        cache.buffers  # code written for host caches (RaggedBatch) fails loudly instead of copying nothing
    block = gpu.export_kv(cache, 120)
    assert block.keys[0].dtype == np.float32 and block.length == 120
    imported = gpu.cache_from_kv(block)
    hit, _ = gpu.forward(np.asarray([seq[120:150]]), np.arange(120, 150)[None], np.ones((1, 150), np.int64),
                         imported)
    cold, _ = prefill(gpu, seq[:150])
    # a prefix-cache hit is the same as no cache (to the bit on the CPU; GPU kernels differ by chunk shape)
    np.testing.assert_allclose(hit[0], cold, atol=0 if ON_CPU else 2e-2)

    rows = [prefill(gpu, seq[:n])[1] for n in (30, 75, 150)]
    for batch in (gpu.new_batch(), MergedBatch(gpu)):  # row-aligned on the device; left-padded via the host
        for r in rows:
            batch.add(CacheRow(r))
        out = batch.step([seq[30], seq[75], seq[150]])
        for i, n in enumerate((30, 75, 150)):
            alone, _ = decode_one_token(gpu, seq[n], n, prefill(gpu, seq[:n])[1])
            np.testing.assert_allclose(out[i], alone, atol=1e-4 if ON_CPU else 2e-2,
                                       err_msg=type(batch).__name__)

    # rows of a left-padded two-row cache (the short row's positions start after its padding) join a batch
    ids, pos, mask = np.zeros((2, 45), np.int64), np.zeros((2, 45), np.int64), np.ones((2, 45), np.int64)
    ids[0], pos[0] = seq[:45], np.arange(45)
    ids[1, 25:], pos[1, 25:], mask[1, :25] = seq[100:120], np.arange(20), 0
    _, padded = gpu.forward(ids, pos, mask, gpu.new_cache(2))
    batch = gpu.new_batch()
    batch.add(CacheRow(padded, 1, 20))
    batch.add(CacheRow(padded, 0, 45))
    out = batch.step([seq[120], seq[45]])
    for i, prompt in enumerate((seq[100:120], seq[:45])):
        alone, _ = decode_one_token(gpu, seq[120] if i == 0 else seq[45], len(prompt), prefill(gpu, prompt)[1])
        np.testing.assert_allclose(out[i], alone, atol=1e-4 if ON_CPU else 2e-2, err_msg=f"padded row {i}")


def test_device_batches_and_growth_never_read_the_cache_to_the_host(int8_bundle, heldout_ids, monkeypatch):
    """Rows joining and leaving a DeviceRaggedBatch, the batch growing past its capacity and a single
    sequence's cache growing all copy on the device (the KV copy graph): DeviceCache.host() is never
    called, and each row of the batch gives what it gives alone, attending over its own positions only."""
    _, gpu = engines(int8_bundle)

    def no_host_copy(self):
        raise AssertionError("a device cache was read to the host")
    monkeypatch.setattr(DeviceCache, "host", no_host_copy)
    steps = 150
    feed = heldout_ids[2000:2000 + steps]
    seqs = [heldout_ids[s:s + n] for s, n in ((0, 40), (300, 12), (600, 250), (900, 7))]
    alone = []  # per sequence: the logits after each fed token, decoded alone
    for seq in seqs:
        _, cache = prefill(gpu, seq)
        capacity, out = cache.capacity, []
        for i, token in enumerate(feed):
            logits, cache = decode_one_token(gpu, token, len(seq) + i, cache)
            out.append(logits)
        assert len(seq) + steps < capacity or cache.capacity > capacity  # the 250-token one grew on the device
        alone.append(out)

    batch = gpu.new_batch()
    assert isinstance(batch, DeviceRaggedBatch)
    live = {}  # slot -> [sequence, tokens fed]
    for k in (0, 1, 2):
        batch.add(CacheRow(prefill(gpu, seqs[k])[1]))
        live[batch.rows - 1] = [k, 0]
    capacity = batch.capacity
    for step in range(steps):
        if step == 30:  # a row leaves from the middle: the last row moves into its slot
            live[1] = live.pop(batch.remove(1))
        if step == 40:  # a row joins, shorter than those held
            batch.add(CacheRow(prefill(gpu, seqs[3])[1]))
            live[batch.rows - 1] = [3, 0]
        got = batch.step([feed[live[slot][1]] for slot in range(batch.rows)])
        for slot in range(batch.rows):
            k, done = live[slot]
            # on the CPU too within fp16 rounding of the cache, not to the bit: the INT8 bundle's MatMulNBits
            # rounds a batch of rows and a single row differently (another kernel), and a key or value written
            # to the fp16 cache can round the other way, which later steps carry (5e-3 on a logit after 27 steps
            # with the tiny model of transformers 5.24 / tokenizers 0.23.3); a wrong row or position is off by ~1
            np.testing.assert_allclose(got[slot], alone[k][done], atol=2e-2, err_msg=f"sequence {k}, token {done}")
            live[slot][1] += 1
    assert batch.capacity > capacity  # the 250-token row outgrew the first buffers
    while batch.rows:
        batch.remove(batch.rows - 1)
    assert batch.capacity == 0


def test_device_batch_buffers_come_in_few_sizes_and_joins_and_leaves_copy_one_row(int8_bundle, heldout_ids):
    """Rows of many lengths joining and leaving one at a time. A new buffer is made only when the rows
    outgrow the slots (or the positions), with a power of two of row slots and of positions (at least
    256, or the context window): ONNX Runtime's arena is asked for few sizes and reuses what earlier
    buffers gave back (exact sizes at every join left 41 GB of an H200 held for under 1 GB of keys and
    values). A join into a free slot and a leave write one row into the same buffer (the KV write
    graph, in place). The rows still step as they do alone."""
    _, gpu = engines(int8_bundle)
    window = gpu.arch.max_positions
    made = []
    real_copy = gpu.copy_kv

    def recording_copy(*args):
        out = real_copy(*args)
        made.append(tuple(out.shape()[1:4:2]))  # (row slots, positions)
        return out
    gpu.copy_kv = recording_copy
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(3, 420, 12)]
    batch = gpu.new_batch()
    live = []  # live[slot]: (prompt length, tokens fed before the last step)
    buffers = set()
    for n in lengths[:9]:
        batch.add(CacheRow(prefill(gpu, heldout_ids[:n])[1]))
        live.append((n, 3))
        buffers.add(batch._cache.kv.data_ptr())
    for _ in range(3):
        batch.step([5] * batch.rows)
    for slot in (4, 0, 6, 2):
        moved = batch.remove(slot)
        last = live.pop()
        if moved is not None:
            live[slot] = last
        buffers.add(batch._cache.kv.data_ptr())
    for n in lengths[9:]:
        batch.add(CacheRow(prefill(gpu, heldout_ids[:n])[1]))
        live.append((n, 0))
        buffers.add(batch._cache.kv.data_ptr())
    got = batch.step([7] * batch.rows)
    assert [slots for slots, _ in made] == [1, 2, 4, 8, 16]  # 16 joins and leaves, 5 buffers
    assert len(buffers) == len(made)
    for _, positions in made:
        assert positions == window or (positions >= 256 and positions & (positions - 1) == 0), positions
    for slot, (n, fed) in enumerate(live):
        _, cache = prefill(gpu, heldout_ids[:n])
        for i in range(fed):
            _, cache = decode_one_token(gpu, 5, n + i, cache)
        alone, _ = decode_one_token(gpu, 7, n + fed, cache)
        np.testing.assert_allclose(got[slot], alone, atol=1e-4 if ON_CPU else 2e-2, err_msg=f"slot {slot}")
    while batch.rows > 1:  # a quarter of the slots in use: the buffer shrinks to twice the rows
        batch.remove(0)
    assert made[-1][0] <= 4 and batch.slots == made[-1][0]


def test_the_gpu_graph_is_the_one_the_decode_graph_names(int8_bundle, tmp_path):
    """The GPU graph is found through the decode graph's metadata (hashed and signed with the bundle),
    never by file name alone: a bundle whose decode graph names none (exported before it) has none, even
    with a gpu.onnx dropped beside it; a named one that is missing is an incomplete bundle."""
    import shutil

    arch = ModelArch.from_manifest(open_bundle(int8_bundle).manifest.architecture)
    old = tmp_path / "old"
    shutil.copytree(int8_bundle, old)
    decode = onnx.load(str(old / "onnxruntime" / "model.onnx"), load_external_data=False)
    props = [(p.key, p.value) for p in decode.metadata_props if p.key != GPU_GRAPH_KEY]
    del decode.metadata_props[:]
    onnx.helper.set_model_props(decode, dict(props))
    onnx.save(decode, str(old / "onnxruntime" / "model.onnx"))
    with pytest.raises(ModelLoadError, match=f"has no GPU graph \\({GPU_GRAPH_FILE}\\); re-export it"):
        load_engine("onnxruntime", old / "onnxruntime" / "model.onnx", arch, gpu_graph=True)
    assert load_engine("onnxruntime", old / "onnxruntime" / "model.onnx", arch).gpu_graph is None

    missing = tmp_path / "missing"
    shutil.copytree(int8_bundle, missing)
    (missing / "onnxruntime" / GPU_GRAPH_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"its GPU graph '{GPU_GRAPH_FILE}' is not beside it"):
        load_engine("onnxruntime", missing / "onnxruntime" / "model.onnx", arch, gpu_graph=True)


def test_left_padded_prompts_stay_finite_and_equal_single_rows(fp32_bundle, heldout_ids):
    """The attention bias is -1e9 on masked positions; in fp16 that would be -inf and a padding row
    (all masked) NaN, poisoning its logits and the cache. The GPU graph floors it at -1e4."""
    _, gpu = engines(fp32_bundle)
    a, b = heldout_ids[:12], heldout_ids[60:67]
    ids = np.array([a, [0] * 5 + b], dtype=np.int64)
    mask = np.array([[1] * 12, [0] * 5 + [1] * 7], dtype=np.int64)
    logits, cache = gpu.forward(ids, np.maximum(mask.cumsum(1) - 1, 0), mask, gpu.new_cache(2))
    assert np.isfinite(logits).all() and all(np.isfinite(k).all() for k in cache.host())
    for row, prompt in enumerate((a, b)):
        single, _ = gpu.forward(np.array([prompt]), np.arange(len(prompt))[None], np.ones((1, len(prompt)), np.int64),
                                gpu.new_cache())
        np.testing.assert_allclose(logits[row], single[0], atol=1e-3 if ON_CPU else 2e-2)


def test_preloading_gpu_libraries_prints_nothing_on_stdout(capsys, caplog):
    """onnxruntime.preload_dlls() print()s the CUDA libraries it cannot find; `edgeglm probe --json` and
    `bench --json` write JSON to stdout, so what it says goes to the log, once per process."""
    import logging

    import runtime.engine as engine_module

    class Ort:  # the function is onnxruntime's; on a box without CUDA it prints, as this does
        calls = 0

        def preload_dlls(self):
            Ort.calls += 1
            print("Failed to load libcublasLt.so.12: cannot open shared object file")

    was = engine_module._GPU_LIBRARIES_PRELOADED
    engine_module._GPU_LIBRARIES_PRELOADED = False
    try:
        with caplog.at_level(logging.INFO, logger="edgeglm.engine"):
            engine_module._preload_gpu_libraries(Ort())
            engine_module._preload_gpu_libraries(Ort())
    finally:
        engine_module._GPU_LIBRARIES_PRELOADED = was
    assert capsys.readouterr().out == "" and Ort.calls == 1
    assert "Failed to load libcublasLt.so.12" in caplog.text


def test_the_served_model_says_which_graph_and_cache_it_runs(int8_bundle):
    """execution_info (the agent's state, `edgeglm bench`) names the GPU graph and where its cache lives,
    not the CPU graphs' prefill setting or an advice to re-export."""
    from agent.model import LoadedModel, PrefillChoice
    from runtime.autotune import Candidate

    bundle = open_bundle(int8_bundle)
    _, gpu = engines(int8_bundle)
    model = LoadedModel(bundle, "onnxruntime", gpu, None, gpu.arch, Candidate("onnxruntime", PROVIDER), None,
                        "configured", PrefillChoice("off", "x"))
    info = model.execution_info()
    assert info["batches"] == f"row-aligned (the KV cache is in {'cpu' if ON_CPU else 'cuda'} memory)"
    assert info["kv_cache"] == gpu.kv_cache and gpu.gpu_graph == GPU_GRAPH_FILE
    assert info["prefill_graph"] is None and not info["prefill_only"]
    decode, _ = engines(int8_bundle)
    assert decode.gpu_graph is None and decode.kv_cache == "host memory, float32"


def test_scheduler_on_the_gpu_graph_gives_what_each_request_gets_alone(int8_bundle, heldout_ids):
    """Concurrent requests through the batching scheduler on device caches: prompts sharing a prefix (the
    prefix cache exports and imports it), prefilled in chunks while others decode, rows joining and leaving
    row-aligned device batches; each answer equals that request run alone without any cache."""
    from runtime.batching import Scheduler
    from runtime.prefix_cache import PrefixCache

    _, gpu = engines(int8_bundle)
    system = heldout_ids[:40]
    prompts = [system + heldout_ids[200 + 37 * i:200 + 37 * i + n] for i, n in enumerate((5, 23, 11, 40, 2))]
    params = [SamplingParams(max_tokens=n) for n in (20, 6, 28, 12, 17)]
    expected = [list(generate(gpu, p, s)) for p, s in zip(prompts, params)]
    cache = PrefixCache(64 << 20, block_tokens=16)
    cache.bind("gpu-graph")
    sched = Scheduler(gpu, max_batch=4, prefix_cache=cache, prefill_chunk=16, start=False)
    handles = [sched.submit(p, s) for p, s in zip(prompts, params)]
    sched.start()
    assert [h.tokens(120) for h in handles] == expected
    sched.close()
    assert cache.stats().hits >= 3


def test_a_device_batch_keeps_the_context_window_and_survives_a_failed_copy(int8_bundle, heldout_ids, monkeypatch):
    """As RaggedBatch: a row with no room left for its next position is refused when it joins, and a step
    past the window is refused; a copy that fails (out of device memory) while a row leaves or joins
    changes nothing: the batch keeps its rows and steps on as before."""
    _, gpu = engines(int8_bundle)
    window = gpu.arch.max_positions
    batch = gpu.new_batch()
    full = prefill(gpu, (heldout_ids * 3)[:window])[1]
    with pytest.raises(ValueError, match=f"would hold {window + 1} positions; the context window is {window}"):
        batch.add(CacheRow(full))
    assert batch.rows == 0
    batch.add(CacheRow(full, length=window - 1))  # its last window - 1 positions: room for one more
    batch.add(CacheRow(prefill(gpu, heldout_ids[:20])[1]))
    batch.step([5, 5])
    with pytest.raises(ValueError, match="the context window is"):
        batch.step([5, 5])
    assert batch.lengths() == [window, 21]

    batch = gpu.new_batch()
    for n in (30, 12, 50):
        batch.add(CacheRow(prefill(gpu, heldout_ids[:n])[1]))
    before = batch.step([7, 7, 7])

    def out_of_memory(*args):
        raise RuntimeError("out of device memory")
    with monkeypatch.context() as m:
        m.setattr(gpu, "copy_kv", out_of_memory)  # a new buffer (growth, shrink)
        m.setattr(gpu, "write_kv", out_of_memory)  # one row written in place (a join into a free slot, a leave)
        with pytest.raises(RuntimeError, match="out of device memory"):
            batch.remove(0)
        with pytest.raises(RuntimeError, match="out of device memory"):
            batch.add(CacheRow(prefill(gpu, heldout_ids[:9])[1]))
    assert batch.rows == 3 and batch.lengths() == [31, 13, 51]
    after = batch.step([9, 9, 9])
    for i, n in enumerate((30, 12, 50)):
        _, cache = prefill(gpu, heldout_ids[:n])
        decode_one_token(gpu, 7, n, cache)
        alone, _ = decode_one_token(gpu, 9, n + 1, cache)
        np.testing.assert_allclose(after[i], alone, atol=1e-4 if ON_CPU else 2e-2)
    assert before.shape == after.shape


@pytest.mark.parametrize("copy_graph", ["absent", "damaged"])
def test_without_the_kv_copy_graph_device_caches_are_batched_and_grown_through_the_host(int8_bundle, heldout_ids,
                                                                                       monkeypatch, tmp_path,
                                                                                       caplog, copy_graph):
    """An installation whose runtime/kv_copy.onnx is missing or damaged still serves the GPU graph, with a
    warning: batches are merged through the host (and execution_info says so), caches grow through the
    host, the answers are the same."""
    import runtime.engine as engine_module
    from agent.model import LoadedModel, PrefillChoice
    from runtime.autotune import Candidate

    _, with_copy = engines(int8_bundle)
    prompt = heldout_ids[:300]
    want = list(generate(with_copy, prompt, SamplingParams(max_tokens=140)))  # 300 + 140 > 428: grows
    broken = tmp_path / "kv_copy.onnx"
    if copy_graph == "damaged":
        broken.write_bytes(engine_module.KV_COPY_GRAPH.read_bytes()[:200])
    monkeypatch.setattr(engine_module, "KV_COPY_GRAPH", broken)
    _, gpu = engines(int8_bundle)
    assert f"{broken}: ONNX Runtime could not load the KV copy graph" in caplog.text
    assert "merged through the host; reinstall edgeglm" in caplog.text
    assert not gpu.ragged_batches and isinstance(gpu.new_batch(), MergedBatch) and gpu.new_cache().copier is None
    assert list(generate(gpu, prompt, SamplingParams(max_tokens=140))) == want
    model = LoadedModel(open_bundle(int8_bundle), "onnxruntime", gpu, None, gpu.arch,
                        Candidate("onnxruntime", PROVIDER), None, "configured", PrefillChoice("off", "x"))
    assert model.execution_info()["batches"] == f"merged (the KV cache is in {'cpu' if ON_CPU else 'cuda'} memory)"


def test_without_the_kv_write_graph_every_join_and_leave_rebuilds_the_batch(int8_bundle, heldout_ids, monkeypatch,
                                                                             tmp_path, caplog):
    """An installation whose runtime/kv_write.onnx is missing keeps row-aligned device batches, with a
    warning; joins and leaves then copy the whole batch into a new buffer, with the same answers."""
    import runtime.engine as engine_module

    _, with_write = engines(int8_bundle)
    monkeypatch.setattr(engine_module, "KV_WRITE_GRAPH", tmp_path / "kv_write.onnx")
    _, gpu = engines(int8_bundle)
    assert f"{tmp_path / 'kv_write.onnx'}: ONNX Runtime could not load the KV write graph" in caplog.text
    assert "every join and leave of a batch on" in caplog.text and "copies the whole batch" in caplog.text
    assert gpu.ragged_batches and not gpu.can_write_kv and with_write.can_write_kv
    outs = []
    for engine in (with_write, gpu):
        batch, got = engine.new_batch(), []
        assert isinstance(batch, DeviceRaggedBatch)
        for n in (40, 9, 120):
            batch.add(CacheRow(prefill(engine, heldout_ids[:n])[1]))
        got.append(batch.step([3, 4, 5]))
        buffer = batch._cache.kv
        batch.remove(0)
        batch.add(CacheRow(prefill(engine, heldout_ids[50:75])[1]))
        got.append(batch.step([6, 7, 8]))
        assert (batch._cache.kv is buffer) == (engine is with_write)  # in place, or a new buffer
        outs.append(got)
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-5 if ON_CPU else 1e-3)


def test_max_kv_bytes_counts_the_device_batchs_power_of_two_positions(fp32_bundle):
    """DeviceRaggedBatch rounds positions up to a power of two: two rows of 200 positions take 2 x 512, which
    a bound of 2 x 400 (RaggedBatch's sizing) let in. Its own sizing is used now: they run one at a time."""
    import dataclasses

    from runtime.batching import Scheduler, kv_bytes_per_token

    _, engine = engines(fp32_bundle)
    engine.arch = dataclasses.replace(engine.arch, eos_token_ids=())
    per_token = kv_bytes_per_token(engine)
    assert isinstance(engine.new_batch(), DeviceRaggedBatch) and per_token % 2 == 0  # float16 KV
    bound = 2 * 400 * per_token
    held = []
    sched = Scheduler(engine, max_batch=8, max_kv_bytes=bound, start=False)
    sched.on_step = lambda n: held.append(int(np.prod(sched._batch._cache.kv.shape())) * 2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, 190).tolist() for _ in range(2)]
    expected = [list(generate(engine, p, SamplingParams(max_tokens=10))) for p in prompts]
    handles = [sched.submit(p, SamplingParams(max_tokens=10)) for p in prompts]
    sched.start()
    assert [h.tokens(120) for h in handles] == expected
    sched.close()
    assert max(held) <= bound and sched.stats().kv_waits == 1


@pytest.mark.skipif(ON_CPU, reason="needs a CUDA device (EDGEGLM_TEST_GPU_PROVIDER=CUDAExecutionProvider)")
def test_kv_auto_on_cuda_is_a_third_of_the_gpus_free_memory(int8_bundle):
    """On the CUDA provider batching.max_kv_mb "auto" reads the card's free memory (cudaMemGetInfo), checked
    against NVML's figure for the same card."""
    pynvml = pytest.importorskip("pynvml")
    from agent.http_api import auto_kv_budget

    _, gpu = engines(int8_bundle)
    assert gpu.kv_memory == "cuda memory"
    auto = auto_kv_budget(engine=gpu)
    pynvml.nvmlInit()
    free = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).free
    assert abs(auto * 3 - free) < 512 << 20
