"""Continuous batching (runtime/batching.py): batched outputs equal one-at-a-time outputs.

References come from `runtime.generate.generate` run alone on the same engine (one request at
a time, no padding, no batch), never from the scheduler.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from agent.model import load_model
from models.tiny import HELDOUT_MODULES, corpus_text
from runtime.batching import EngineFailed, Scheduler, SchedulerClosed
from runtime.engine import CacheRow
from runtime.errors import RequestError
from runtime.generate import SamplingParams, generate, prefill

BACKENDS = ["onnxruntime", "openvino"]
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def models(fp32_bundle):
    return {b: load_model(fp32_bundle, b) for b in BACKENDS}


@pytest.fixture(scope="module")
def ids(models):
    return models["onnxruntime"].tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


@pytest.fixture(scope="module")
def prompts(ids):
    """Six prompts of different lengths (3 to 51 tokens)."""
    return [ids[:3], ids[40:77], ids[200:212], ids[300:351], ids[500:507], ids[600:620]]


def alone(engine, prompt, params) -> list[int]:
    return list(generate(engine, prompt, params))


class HoldAtStep:
    """An `on_step` that records batch sizes and holds the worker in decode step `at` (before that step's
    tokens are sampled) until `release()`: "while the request decodes" is then a fact of the test, not a
    race the worker wins on a loaded box by finishing all the tokens first (the CI run of stop 38 did)."""

    def __init__(self, at: int):
        self.sizes: list[int] = []
        self.at, self._go = at, threading.Event()

    def __call__(self, n: int) -> None:
        self.sizes.append(n)
        if len(self.sizes) == self.at:
            self._go.wait(TIMEOUT)

    def release(self) -> None:
        self._go.set()


def scheduler(engine, sizes: list | None = None, **kw) -> Scheduler:
    return Scheduler(engine, on_step=(sizes.append if sizes is not None else None), **kw)


def test_the_execution_info_names_the_kind_of_batches(models):
    assert models["onnxruntime"].execution_info()["batches"] == "row-aligned"
    assert models["openvino"].execution_info()["batches"] == "merged"


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_cache_decodes_each_row_as_if_alone(models, backend, ids):
    """merge_caches: rows of different lengths, from fresh caches and from a batch, left-padded."""
    engine = models[backend].engine
    a, b, c = ids[:9], ids[100:104], ids[200:215]
    single = {}
    for name, seq in (("a", a), ("b", b), ("c", c)):
        logits, cache = prefill(engine, seq)
        single[name] = (engine.forward(np.array([[7]]), np.array([[len(seq)]]), np.ones((1, len(seq) + 1), np.int64),
                                       cache)[0][0])
    fresh = {name: prefill(engine, seq)[1] for name, seq in (("a", a), ("b", b), ("c", c))}
    batch, mask = engine.merge_caches([CacheRow(fresh["a"]), CacheRow(fresh["b"])])
    assert batch.batch == 2 and batch.length == 9 and mask.tolist() == [[1] * 9, [0] * 5 + [1] * 4]
    # the batch's row 1 (b) moves into a new batch with c: the re-merge path of continuous admission
    batch2, mask2 = engine.merge_caches([CacheRow(fresh["c"]), CacheRow(batch, 1, 4), CacheRow(batch, 0, 9)])
    assert batch2.length == 15 and mask2.sum(1).tolist() == [15, 4, 9]
    mask2 = np.concatenate([mask2, np.ones((3, 1), np.int64)], 1)
    logits, _ = engine.forward(np.array([[7], [7], [7]]), np.array([[15], [4], [9]]), mask2, batch2)
    for row, name in enumerate("cba"):
        np.testing.assert_allclose(logits[row], single[name], atol=1e-4)


def _engines(case, fp32_bundle, int8_bundle):
    """(engine, reference engine, the DecodeBatch class new_batch should give) for one test case."""
    from ota.bundle import open_bundle
    from runtime.engine import MergedBatch, ModelArch, load_engine

    if case == "openvino":
        engine = load_model(fp32_bundle, "openvino").engine
        return engine, engine, "MergedBatch", engine.new_batch()
    if case == "onnxruntime-int8":  # every step on the W8A8 prefill graph (4+ rows would be anyway), both engines
        engine = load_model(int8_bundle, "onnxruntime", prefill_graph=True).engine
        ref = load_model(int8_bundle, "onnxruntime", prefill_graph=True).engine
        engine.prefill_min_rows = ref.prefill_min_rows = 1
        assert engine.prefill_graph == "prefill.onnx"
        return engine, ref, "RaggedBatch", engine.new_batch()
    if case == "onnxruntime-gpu-graph":  # device caches (here in host memory, on the CPU provider)
        bundle = open_bundle(int8_bundle)
        engine = load_engine("onnxruntime", bundle.path(bundle.manifest.backends["onnxruntime"].entry),
                             ModelArch.from_manifest(bundle.manifest.architecture), gpu_graph=True)
        return engine, engine, "DeviceRaggedBatch", engine.new_batch()
    engine = load_model(fp32_bundle, "onnxruntime").engine
    if case == "onnxruntime-merged":
        return engine, engine, "MergedBatch", MergedBatch(engine)
    return engine, engine, "RaggedBatch", engine.new_batch()


@pytest.mark.parametrize("case", ["onnxruntime-int8", "onnxruntime-gpu-graph"])
def test_every_host_array_bound_for_a_run_lives_until_the_run(case, fp32_bundle, int8_bundle, ids, monkeypatch):
    """Before 1.30 ONNX Runtime's IO binding kept no reference to a bound OrtValue, and an OrtValue over a host
    array points at the array's memory: one made for the call alone was freed before the run read it (found
    with onnxruntime 1.23: a batch rebuilt on the KV copy graph read another array's value as a row index).
    Here the binding is made to behave like those versions, and every OrtValue bound since the last run must
    still be alive when the next run starts: prompts, batched steps on both graphs, rows joining and leaving
    (on the device-cache batch: the KV write and copy graphs)."""
    import gc
    import weakref

    import onnxruntime as ort

    bound: list = []
    runs = [0]

    def bind_like_before_1_30(self, name, value):
        self._iobinding.bind_ortvalue_input(name, value._ortvalue)  # no reference kept
        bound.append((name, weakref.ref(value)))

    run = ort.InferenceSession.run_with_iobinding

    def checked_run(self, binding, run_options=None):
        gc.collect()
        dead = [name for name, ref in bound if ref() is None]
        bound.clear()
        assert not dead, f"freed before the run: {dead}"
        runs[0] += 1
        return run(self, binding, run_options)

    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_input", bind_like_before_1_30)
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", checked_run)
    engine, _, _, batch = _engines(case, fp32_bundle, int8_bundle)
    for seq in (ids[:9], ids[100:104], ids[200:215], ids[300:306], ids[400:470]):
        batch.add(CacheRow(prefill(engine, seq)[1]))
    for token in (7, 11):
        batch.step(np.full(batch.rows, token))
    batch.remove(1)
    batch.add(CacheRow(prefill(engine, ids[500:540])[1]))
    batch.step(np.full(batch.rows, 13))
    while batch.rows:
        batch.remove(batch.rows - 1)
    assert runs[0] >= 9  # prompts and steps (and on the device-cache batch the KV graphs) ran through it


@pytest.mark.parametrize("case", ["onnxruntime", "onnxruntime-int8", "onnxruntime-gpu-graph", "onnxruntime-merged",
                                  "openvino"])
def test_decode_batch_rows_step_as_if_alone_through_joins_and_leaves(case, fp32_bundle, int8_bundle, ids):
    """engine.new_batch(): rows of different lengths added one by one, stepped, one removed from the
    middle (the last row moves into its slot), one added, the last removed: after every step each
    row's logits equal that row's own single-row decode. On ONNX Runtime the batch is row-aligned
    (each row attends over its own positions) and gives its memory back when the last row leaves."""
    engine, ref, kind, batch = _engines(case, fp32_bundle, int8_bundle)
    assert type(batch).__name__ == kind
    state = []  # per slot: [reference cache, positions held]

    def add(seq):
        batch.add(CacheRow(prefill(engine, seq)[1]))
        state.append([prefill(ref, seq)[1], len(seq)])

    def step_and_check(token):
        got = batch.step(np.full(batch.rows, token))
        assert got.shape == (len(state), engine.arch.vocab_size)
        for i, st in enumerate(state):
            want, st[0] = ref.forward(np.array([[token]]), np.array([[st[1]]]), np.ones((1, st[1] + 1), np.int64),
                                      st[0])
            st[1] += 1
            np.testing.assert_allclose(got[i], want[0], atol=1e-4, err_msg=f"slot {i}")
        assert batch.lengths() == [n for _, n in state]

    for seq in (ids[:9], ids[100:104], ids[200:215], ids[300:306], ids[400:420]):
        add(seq)
    step_and_check(7)
    step_and_check(11)
    assert batch.remove(1) == 4  # slot 4's row moved into slot 1
    state[1] = state.pop()
    step_and_check(13)
    add(ids[500:505])  # shorter than every row held (4+ tokens: int8 prompts on the prefill graph, as in the reference)
    step_and_check(17)
    assert batch.remove(batch.rows - 1) is None
    state.pop()
    step_and_check(19)
    with pytest.raises(ValueError, match="batch slot 9 does not exist; the batch has 4 row"):
        batch.remove(9)
    for _ in range(2):  # down to 2 rows: a RaggedBatch gives back the slots it no longer needs
        assert batch.remove(0) == batch.rows
        state[0] = state.pop()
    if kind == "RaggedBatch":
        assert batch.buffers[0].shape[0] == 4  # 8 slots (grown by doubling for 5 rows) -> 2 x 2 rows
    if kind == "DeviceRaggedBatch":  # the same: slots in powers of two, 8 -> 4
        assert batch._cache.batch == 2 and batch._cache.kv.shape()[1] == 4
    step_and_check(21)  # the rows moved by the removals and the reallocation still decode as if alone
    if kind == "RaggedBatch":  # the logits of every batch size are rows of one buffer (one per size held
        # vocab x 4 bytes x b(b+1)/2: 66 MB on glm-m at max_batch 32)
        runners = [r for r in (engine._decode, getattr(engine, "_prefill", None)) if r is not None and r.logits]
        assert runners and all(len(r._logits_rows) <= 6 for r in runners)
        assert all(np.shares_memory(out, r._logits_rows) for r in runners for out, _ in r.logits.values())
    batch.step(np.full(batch.rows, 23))  # the batch is what the engine ran last
    held = weakref.ref(batch.buffers[0]) if kind == "RaggedBatch" else \
        weakref.ref(batch._cache) if kind == "DeviceRaggedBatch" else None
    while batch.rows:
        batch.remove(0)
    if kind == "RaggedBatch":  # its KV memory is freed, the sessions' IO bindings let go of it too
        gc.collect()
        assert batch.buffers == [] and batch.capacity == 0 and held() is None
    if kind == "DeviceRaggedBatch":
        gc.collect()
        assert batch.capacity == 0 and held() is None


def test_a_ragged_batch_gives_back_the_positions_of_a_long_row_that_left(models, ids):
    """A 1100-token row grows every slot to 1229 positions; once it leaves, the 12-position row that
    stays gets buffers of 256 positions, and it goes on decoding as it would alone."""
    engine = models["onnxruntime"].engine
    long, short = ids[:1100], ids[2000:2012]
    assert len(long) == 1100
    batch = engine.new_batch()
    for seq in (long, short):
        batch.add(CacheRow(prefill(engine, seq)[1]))
    batch.step(np.array([7, 7]))
    assert batch.capacity == 1100 + 1 + 128
    assert batch.remove(0) == 1 and batch.lengths() == [13]
    assert batch.capacity == 256 and batch.buffers[0].shape[2] == 256
    got = batch.step(np.array([9]))[0]
    _, alone_cache = prefill(engine, short)
    engine.forward(np.array([[7]]), np.array([[12]]), np.ones((1, 13), np.int64), alone_cache)
    want = engine.forward(np.array([[9]]), np.array([[13]]), np.ones((1, 14), np.int64), alone_cache)[0][0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_graphs_without_the_ragged_tag_get_merged_batches(fp32_bundle, tmp_path, prompts):
    """A graph exported before `edgeglm.batch_rows` (left-padded batches only) is decoded with
    MergedBatch, and the scheduler's outputs still equal one-at-a-time outputs."""
    import shutil

    import onnx

    from runtime.engine import BATCH_ROWS_KEY, ModelArch, load_engine

    ort_dir = shutil.copytree(fp32_bundle / "onnxruntime", tmp_path / "onnxruntime")
    model = onnx.load(str(ort_dir / "model.onnx"), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != BATCH_ROWS_KEY]
    assert len(kept) == len(model.metadata_props) - 1
    del model.metadata_props[:]
    for key, val in kept:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, val
    onnx.save_model(model, str(ort_dir / "model.onnx"))
    import json

    arch = ModelArch.from_manifest(json.loads((fp32_bundle / "manifest.json").read_text())["architecture"])
    engine = load_engine("onnxruntime", ort_dir / "model.onnx", arch)
    assert not engine.ragged_batches and type(engine.new_batch()).__name__ == "MergedBatch"
    from agent.model import LoadedModel  # what the agent and `edgeglm bench` report for such a bundle

    assert LoadedModel.execution_info(SimpleNamespace(
        path=None, backend="onnxruntime", engine=engine, chosen_by="configured", prefill=None))["batches"] == \
        "merged (the bundle predates row-aligned batches: re-export it)"
    params = [SamplingParams(max_tokens=n) for n in (12, 5, 9)]
    sched = scheduler(engine, max_batch=8, start=False)
    handles = [sched.submit(p, s) for p, s in zip(prompts[:3], params)]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == [alone(engine, p, s) for p, s in zip(prompts[:3], params)]
    sched.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_greedy_equals_one_at_a_time(models, backend, prompts):
    """Six prompts of different lengths and lengths of answer, queued together: rows leave as they end."""
    engine = models[backend].engine
    params = [SamplingParams(max_tokens=n) for n in (24, 9, 30, 17, 3, 26)]
    expected = [alone(engine, p, s) for p, s in zip(prompts, params)]
    sizes: list[int] = []
    loads = []
    sched = scheduler(engine, sizes, max_batch=8, start=False, on_load=loads.append)
    handles = [sched.submit(p, s) for p, s in zip(prompts, params)]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == expected
    assert sizes[0] == 6 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    sched.close()
    assert (loads[-1].active, loads[-1].queued) == (0, 0)  # what the agent's gauges show when idle


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_arriving_while_others_decode(models, backend, prompts):
    engine = models[backend].engine
    params = SamplingParams(max_tokens=40)
    expected = [alone(engine, p, params) for p in prompts[:4]]
    hold = HoldAtStep(5)  # 5 tokens out (1 from the prefill, 4 from steps), the worker held in the 5th step
    sizes = hold.sizes
    sched = Scheduler(engine, max_batch=8, on_step=hold)
    first = sched.submit(prompts[0], params)
    stream = iter(first)
    got = [next(stream) for _ in range(5)]  # the first request is decoding now
    second, third = sched.submit(prompts[1], params), sched.submit(prompts[2], params)
    hold.release()
    got += [next(stream) for _ in range(3)]
    fourth = sched.submit(prompts[3], params)
    got += list(stream)
    assert [got, second.tokens(TIMEOUT), third.tokens(TIMEOUT), fourth.tokens(TIMEOUT)] == expected
    assert sizes[0] == 1 and max(sizes) >= 2  # it started alone, others joined it
    sched.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_equals_one_at_a_time_with_the_same_seed(models, backend, prompts):
    """Each row has its own settings and random generator: a batch mixes them without effect."""
    engine = models[backend].engine
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=1),
              SamplingParams(max_tokens=25, temperature=1.2, top_p=0.9, repetition_penalty=1.2, seed=2),
              SamplingParams(max_tokens=15),  # greedy in the same batch
              SamplingParams(max_tokens=20, temperature=0.7, seed=1, stop_token_ids=(5,))]
    expected = [alone(engine, p, s) for p, s in zip(prompts, params)]
    sched = scheduler(engine, max_batch=8, start=False)
    handles = [sched.submit(p, s) for p, s in zip(prompts, params)]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == expected
    sched.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_one_request_leaves_the_others_unchanged_and_frees_its_row(models, backend, prompts):
    engine = models[backend].engine
    params = SamplingParams(max_tokens=40)
    expected = [alone(engine, p, params) for p in prompts[:3]]
    hold = HoldAtStep(4)  # 4 tokens out, the worker held in the 4th step
    sizes = hold.sizes
    sched = Scheduler(engine, max_batch=8, start=False, on_step=hold)
    handles = [sched.submit(p, params) for p in prompts[:3]]
    sched.start()
    stream = iter(handles[1])
    got = [next(stream) for _ in range(4)]
    handles[1].cancel()
    cut = len(sizes)  # the step running now may still hold the row; the next ones must not
    hold.release()
    assert list(stream) == [] and handles[1].cancelled
    assert [handles[0].tokens(TIMEOUT), handles[2].tokens(TIMEOUT)] == [expected[0], expected[2]]
    assert got == expected[1][:4]
    assert sizes[0] == 3 and max(sizes[cut + 1:]) <= 2
    assert sched.stats().active == 0

    # a queued request that is cancelled leaves the queue at once and never runs
    sched.configure(max_batch=1)
    sched.on_step = hold = HoldAtStep(1)  # `running` holds the one place until `waiting` is cancelled
    running = sched.submit(prompts[0], params)
    waiting = sched.submit(prompts[1], params)
    waiting.cancel()
    hold.release()
    assert waiting.done and waiting.tokens(TIMEOUT) == []
    assert running.tokens(TIMEOUT) == expected[0] and sched.stats().queued == 0
    sched.close()


def test_queue_is_ordered_by_deadline_then_arrival(models, prompts):
    engine = models["onnxruntime"].engine
    sched = scheduler(engine, max_batch=1, start=False)  # one at a time
    now, params = time.monotonic(), SamplingParams(max_tokens=4)
    named = {"a": sched.submit(prompts[0], params), "b": sched.submit(prompts[1], params, deadline=now + 10),
             "c": sched.submit(prompts[2], params, deadline=now + 5), "d": sched.submit(prompts[3], params),
             "e": sched.submit(prompts[4], params, deadline=now + 5)}
    sched.start()
    for h in named.values():
        h.tokens(TIMEOUT)
    assert sorted(named, key=lambda n: named[n].admitted_at) == ["c", "e", "b", "a", "d"]
    sched.close()


def test_max_batch_is_respected_and_changes_live(models, prompts):
    engine = models["onnxruntime"].engine
    params = SamplingParams(max_tokens=12)
    expected = [alone(engine, p, params) for p in prompts[:5]]
    sizes: list[int] = []
    sched = scheduler(engine, sizes, max_batch=2, start=False)
    handles = [sched.submit(p, params) for p in prompts[:5]]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == expected
    assert max(sizes) == 2

    # raised live; the window holds an idle engine until the queue fills a batch of 4
    sched.configure(max_batch=4, window_ms=10_000)
    sizes.clear()
    handles = [sched.submit(p, params) for p in prompts[:5]]
    assert [h.tokens(TIMEOUT) for h in handles] == expected
    assert sizes[0] == 4 and max(sizes) == 4
    assert sched.stats().max_batch == 4
    with pytest.raises(ValueError, match=r"max_batch=0 is invalid"):
        sched.configure(max_batch=0)
    with pytest.raises(ValueError, match=r"window_ms=-1 is invalid"):
        sched.configure(window_ms=-1)
    sched.close()


def test_max_kv_bytes_holds_requests_back_until_running_ones_end(models, prompts):
    """Eight long requests at once made the batch's KV grow to eight full rows (glm-s, 3,600 positions each:
    peak RSS 1,128 MB against 467 MB for one; glm-m 4x that): a small box was OOM-killed, and a model on
    probation counted it as a death. With `max_kv_bytes`, a request whose KV could go over waits; what the
    batch holds (its buffers, measured) stays within the bound; outputs are those of each request alone;
    a request alone always runs, even one over the bound."""
    from runtime.batching import kv_bytes_per_token

    engine = models["onnxruntime"].engine
    per_token = kv_bytes_per_token(engine)
    assert per_token == 2 * engine.arch.num_layers * engine.arch.num_kv_heads * engine.arch.head_dim * 4
    params = SamplingParams(max_tokens=12)
    expected = [alone(engine, p, params) for p in prompts[:5]]

    def run(**kw):
        held, sizes, waits = [], [], []
        sched = Scheduler(engine, max_batch=8, start=False, on_kv_wait=lambda: waits.append(1), **kw)
        sched.on_step = lambda n: (sizes.append(n), held.append(sum(b.nbytes for b in sched._batch.buffers)))
        handles = [sched.submit(p, params) for p in prompts[:5]]
        sched.start()
        out = [h.tokens(TIMEOUT) for h in handles]
        stats = sched.stats()
        sched.close()
        return out, max(sizes), max(held), len(waits), stats

    bound = 2 * 256 * per_token  # two rows of up to 63 positions: buffers of 2 slots x 256 positions
    out, most_rows, most_held, waits, stats = run(max_kv_bytes=bound)
    assert out == expected
    assert most_rows == 2 and most_held <= bound
    assert waits >= 1 and stats.kv_waits == waits and stats.max_kv_bytes == bound
    out, most_rows, most_held, waits, _ = run()  # no bound: all five at once, twice the bound held
    assert out == expected and most_rows == 5 and most_held > bound and waits == 0

    out, most_rows, _, waits, _ = run(max_kv_bytes=1)  # nothing fits: one at a time, each still served
    assert out == expected and most_rows == 1 and waits >= 1
    with pytest.raises(ValueError, match=r"max_kv_bytes=0 is invalid"):
        Scheduler(engine, max_kv_bytes=0, start=False)


def test_max_kv_bytes_counts_the_buffers_a_batch_kept_from_a_long_row(fp32_bundle):
    """A batch keeps grown buffers until a quarter of them would do: after a long row left, short rows joined
    buffers still sized for it, and the batch held 4 MiB under a 2.5 MiB bound (the bound counted the live
    rows only). Each step's real buffers are measured against the bound."""
    import dataclasses

    from runtime.batching import kv_bytes_per_token
    from runtime.engine import kv_estimate

    engine = load_model(fp32_bundle, "onnxruntime").engine  # its own: the arch is changed below
    engine.arch = dataclasses.replace(engine.arch, eos_token_ids=())  # every row runs to its max_tokens
    per_token = kv_bytes_per_token(engine)
    bound = kv_estimate([610, 190], per_token, engine.arch)  # the long row and one short row
    rng = np.random.default_rng(0)
    held, late = [], []
    sched = Scheduler(engine, max_batch=8, max_kv_bytes=bound, start=False)

    def on_step(n):
        held.append(sum(b.nbytes for b in sched._batch.buffers))
        if len(held) == 580:  # the long row is near its end: short rows arrive
            late.extend(sched.submit(rng.integers(1, 500, 150).tolist(), SamplingParams(max_tokens=40))
                        for _ in range(4))

    sched.on_step = on_step
    first = sched.submit(rng.integers(1, 500, 10).tolist(), SamplingParams(max_tokens=600))
    sched.start()
    assert len(first.tokens(TIMEOUT)) == 600 and all(len(h.tokens(TIMEOUT)) == 40 for h in late)
    sched.close()
    assert max(held) <= bound and sched.stats().kv_waits >= 1


def test_max_kv_bytes_on_openvino_counts_the_merged_state_it_holds(fp32_bundle):
    """OpenVINO's merged state holds exactly the rows (it grows a position per step), but the bound counted the
    growth rules of ONNX Runtime's buffers (at least 256 positions, twice the longest): two rows that fit were
    never batched. Each step's real state is measured against the bound, and both rows run together."""
    import dataclasses

    from runtime.batching import kv_bytes_per_token

    engine = load_model(fp32_bundle, "openvino").engine  # its own: the arch is changed below
    engine.arch = dataclasses.replace(engine.arch, eos_token_ids=())  # every row runs to its max_tokens
    per_token = kv_bytes_per_token(engine)
    bound = 2 * (20 + 30 + 1) * per_token  # two rows of 20 prompt + 30 new tokens, and the next position's room
    held, rows = [], []
    sched = Scheduler(engine, max_batch=8, max_kv_bytes=bound, start=False)

    def on_step(n):
        rows.append(n)
        held.append(sum(a.nbytes for a in engine._state_of(sched._batch._cache).values()))

    sched.on_step = on_step
    rng = np.random.default_rng(1)
    handles = [sched.submit(rng.integers(1, 500, 20).tolist(), SamplingParams(max_tokens=30)) for _ in range(3)]
    sched.start()
    assert all(len(h.tokens(TIMEOUT)) == 30 for h in handles)
    sched.close()
    assert max(rows) == 2 and max(held) <= bound and sched.stats().kv_waits == 1, (max(rows), max(held), bound)


def test_openvino_refuses_a_step_past_the_context_window(fp32_bundle):
    """ONNX Runtime's batches check the window; OpenVINO ran a position past it without a word (what the model was
    never trained on): the engine now says so, as the others do."""
    import dataclasses

    engine = load_model(fp32_bundle, "openvino").engine
    engine.arch = dataclasses.replace(engine.arch, max_positions=16)
    _, cache = prefill(engine, list(range(3, 19)))  # 16 positions: the whole window
    with pytest.raises(ValueError, match="would hold 17 positions; the context window is 16"):
        engine.forward(np.array([[7]]), np.array([[16]]), np.ones((1, 17), np.int64), cache)


class FailingEngine:
    """The real engine with one injected fault: its `fail_at`-th batched decode step raises."""

    def __init__(self, engine, fail_at: int):
        self.engine, self.arch, self.fail_at, self.batched = engine, engine.arch, fail_at, 0

    def new_cache(self, batch=1):
        return self.engine.new_cache(batch)

    def merge_caches(self, rows):
        return self.engine.merge_caches(rows)

    def forward(self, input_ids, position_ids, attention_mask, cache, **kwargs):
        self.count(input_ids.shape[0])
        return self.engine.forward(input_ids, position_ids, attention_mask, cache, **kwargs)

    def count(self, rows):
        if rows > 1:
            self.batched += 1
            if self.batched == self.fail_at:
                raise RuntimeError("injected fault")

    def new_batch(self):
        return FailingBatch(self, self.engine.new_batch())


class FailingBatch:
    """The engine's own decode batch, its steps counted by FailingEngine."""

    def __init__(self, owner, batch):
        self.owner, self.batch = owner, batch

    rows = property(lambda self: self.batch.rows)

    def add(self, source):
        self.batch.add(source)

    def remove(self, slot):
        return self.batch.remove(slot)

    def step(self, input_ids):
        self.owner.count(len(input_ids))
        return self.batch.step(input_ids)


def test_an_engine_error_fails_the_affected_requests_and_serving_goes_on(models, prompts):
    engine = models["onnxruntime"].engine
    params = SamplingParams(max_tokens=10)
    sched = scheduler(FailingEngine(engine, fail_at=3), max_batch=8, start=False)
    doomed = [sched.submit(p, params) for p in prompts[:2]]
    sched.start()
    for h in doomed:
        with pytest.raises(EngineFailed, match=r"decode step of a batch of 2 \(injected fault\); the request was "
                                               r"ended, others go on"):
            h.tokens(TIMEOUT)
    assert sched.submit(prompts[2], params).tokens(TIMEOUT) == alone(engine, prompts[2], params)

    # a prompt the engine itself refuses (a token id outside the vocabulary): only that request fails
    sched2 = scheduler(engine, max_batch=8, start=False)
    good = sched2.submit(prompts[0], params)
    bad = sched2.submit([1, 2, engine.arch.vocab_size + 5], params)
    sched2.start()
    with pytest.raises(EngineFailed, match=r"the engine failed on the 3-token prompt"):
        bad.tokens(TIMEOUT)
    assert good.tokens(TIMEOUT) == alone(engine, prompts[0], params)
    assert sched2.submit(prompts[1], params).tokens(TIMEOUT) == alone(engine, prompts[1], params)
    sched.close()
    sched2.close()


class RecordingEngine:
    """The real engine, its calls logged: ("prompt", tokens) for a batch-1 forward (a prefill or a
    chunk of one) and ("step", rows) for a batched decode step."""

    def __init__(self, engine):
        self.engine, self.arch, self.log = engine, engine.arch, []
        self.swaps_state = getattr(engine, "swaps_state", False)

    def new_cache(self, batch=1):
        return self.engine.new_cache(batch)

    def forward(self, input_ids, position_ids, attention_mask, cache, **kwargs):
        self.log.append(("prompt", input_ids.shape[1]))
        return self.engine.forward(input_ids, position_ids, attention_mask, cache, **kwargs)

    def new_batch(self):
        batch, log = self.engine.new_batch(), self.log

        class Recorded:
            rows = property(lambda self: batch.rows)
            add, remove = batch.add, batch.remove

            def step(self, input_ids):
                log.append(("step", len(input_ids)))
                return batch.step(input_ids)
        return Recorded()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_prompt_joins_in_chunks_between_the_decode_steps_of_running_requests(models, backend, prompts, ids):
    """prefill_chunk=16: a 51-token prompt arriving while another request decodes is prefilled 16
    tokens per step (16, 16, 16, 3), each chunk followed by a decode step of the running row, so
    that row never waits for the whole prompt; both answers equal their one-at-a-time answers. With
    nothing decoding, prompts run whole; prefill_chunk=0 runs them whole always, and so does
    OpenVINO (one state per infer request: chunks would copy the batch's state at every step)."""
    engine = RecordingEngine(models[backend].engine)
    first, long = prompts[2], prompts[3]  # 12 and 51 tokens
    params = SamplingParams(max_tokens=20)
    expected = [alone(models[backend].engine, p, params) for p in (first, long)]

    def run(chunk):
        """The first request decoding; the long one submitted by the worker after its first step."""
        engine.log.clear()
        second = []

        def on_step(rows):
            if not second:
                second.append(sched.submit(long, params))
        sched = Scheduler(engine, max_batch=8, prefill_chunk=chunk, on_step=on_step)
        got = [sched.submit(first, params).tokens(TIMEOUT), None]
        got[1] = second[0].tokens(TIMEOUT)
        sched.close()
        assert got == expected
        return engine.log

    log = run(16)
    assert log[:2] == [("prompt", 12), ("step", 1)]  # alone: whole
    if backend == "openvino":
        assert [n for kind, n in log if kind == "prompt"] == [12, 51]
        return
    chunks = [i for i, (kind, n) in enumerate(log) if kind == "prompt"][1:]
    assert [log[i][1] for i in chunks] == [16, 16, 16, 3]
    for i in chunks[:-1]:  # a decode step of the running row between consecutive chunks
        assert log[i + 1] == ("step", 1)
    assert log[chunks[-1] + 1] == ("step", 2)  # then it decodes with the batch
    log = run(0)
    assert [n for kind, n in log if kind == "prompt"] == [12, 51]

    # a burst on an idle engine: the first prompt runs whole, then 16 prompt tokens per step
    engine.log.clear()
    sched = Scheduler(engine, max_batch=8, prefill_chunk=16, start=False)
    trio = (first, long, prompts[5])  # 12, 51 and 20 tokens
    handles = [sched.submit(p, params) for p in trio]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == [expected[0], expected[1], alone(engine.engine, trio[2], params)]
    sched.close()
    assert [n for kind, n in engine.log if kind == "prompt"] == [12, 16, 16, 16, 3, 13, 7]
    assert engine.log[:3] == [("prompt", 12), ("prompt", 16), ("step", 1)]


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_burst_sharing_a_system_prompt_computes_it_once(models, ids, chunk):
    """Four requests with one 48-token system prompt, queued together: the first one's prefill
    stores the shared blocks before the others look them up (lookups happen at a prompt's first
    chunk, not at admission), so three of them reuse 48 tokens; answers equal one at a time."""
    from runtime.prefix_cache import PrefixCache

    engine = models["onnxruntime"].engine
    cache = PrefixCache(64 << 20, block_tokens=16)
    cache.bind("burst")
    system = ids[:48]
    burst = [system + ids[100 + 30 * i:110 + 30 * i] for i in range(4)]
    params = SamplingParams(max_tokens=8)
    sched = Scheduler(engine, max_batch=8, prefix_cache=cache, prefill_chunk=chunk, start=False)
    handles = [sched.submit(p, params) for p in burst]
    sched.start()
    assert [h.tokens(TIMEOUT) for h in handles] == [alone(engine, p, params) for p in burst]
    sched.close()
    stats = cache.stats()
    assert stats.hits == 3 and stats.hit_tokens == 3 * 48


def test_prefill_chunk_is_validated_and_changes_live(models, prompts):
    engine = models["onnxruntime"].engine
    with pytest.raises(ValueError, match=r"prefill_chunk=-1 is invalid: must be a number of prompt tokens"):
        Scheduler(engine, prefill_chunk=-1, start=False)
    sched = scheduler(engine, prefill_chunk=64)
    with pytest.raises(ValueError, match=r"prefill_chunk='8' is invalid"):
        sched.configure(prefill_chunk="8")
    assert sched.prefill_chunk == 64
    sched.configure(prefill_chunk=8)
    assert sched.prefill_chunk == 8
    params = SamplingParams(max_tokens=6)
    assert sched.submit(prompts[1], params).tokens(TIMEOUT) == alone(engine, prompts[1], params)
    sched.close()


def test_a_request_that_fails_to_start_ends_alone_and_the_others_taken_with_it_run(models, prompts):
    """A request whose admission raises (here a seed that slipped past validation) is ended with
    EngineFailed; the request admitted at the same boundary still runs; the worker serves on."""
    engine = models["onnxruntime"].engine
    bad, good = SamplingParams(max_tokens=5), SamplingParams(max_tokens=5)
    object.__setattr__(bad, "seed", -1)  # numpy refuses it when the scheduler makes the generator
    sched = scheduler(engine, max_batch=8, start=False)
    handles = [sched.submit(prompts[0], bad), sched.submit(prompts[1], good)]
    sched.start()
    with pytest.raises(EngineFailed, match=r"could not be started .*the request was ended, others go on"):
        handles[0].tokens(TIMEOUT)
    assert handles[1].tokens(TIMEOUT) == alone(engine, prompts[1], good)
    assert sched.submit(prompts[2], good).tokens(TIMEOUT) == alone(engine, prompts[2], good)
    sched.close()


def test_bad_requests_and_closing(models, prompts):
    engine = models["onnxruntime"].engine
    sched = scheduler(engine, start=False)
    with pytest.raises(RequestError, match="prompt is empty"):
        sched.submit([], SamplingParams())
    with pytest.raises(RequestError, match="context window"):
        sched.submit([1] * engine.arch.max_positions, SamplingParams())
    queued = sched.submit(prompts[0], SamplingParams(max_tokens=5))
    sched.start()
    sched.close()  # drains: what was queued still finishes
    assert queued.tokens(TIMEOUT) == alone(engine, prompts[0], SamplingParams(max_tokens=5))
    with pytest.raises(SchedulerClosed, match="closed"):
        sched.submit(prompts[0], SamplingParams())

    cut = scheduler(engine, start=False)
    handle = cut.submit(prompts[0], SamplingParams(max_tokens=5))
    cut.close(error="the agent is shutting down", wait=False)  # before the worker could finish it
    cut.start()
    with pytest.raises(SchedulerClosed, match="shutting down"):
        handle.tokens(TIMEOUT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_work_on_the_engine_runs_between_steps_without_disturbing_the_batch(models, backend, prompts):
    """The OTA self-test times the serving model through `call`: mid-batch, its own generation is
    what it would be alone, and the batch's outputs are unchanged by it."""
    engine = models[backend].engine
    params = SamplingParams(max_tokens=30)
    expected = [alone(engine, p, params) for p in prompts[:3]]
    sched = scheduler(engine, max_batch=8)
    handles = [sched.submit(p, params) for p in prompts[:2]]
    stream = iter(handles[0])
    got = [next(stream) for _ in range(4)]  # the batch is decoding now
    assert sched.call(lambda: alone(engine, prompts[2], params), TIMEOUT) == expected[2]
    got += list(stream)
    assert [got, handles[1].tokens(TIMEOUT)] == expected[:2]
    sched.close()
    assert sched.call(lambda: alone(engine, prompts[2], params)) == expected[2]  # after the worker ended: inline
    other = scheduler(engine, max_batch=8)
    with pytest.raises(ZeroDivisionError):
        other.call(lambda: 1 / 0, TIMEOUT)  # the caller gets fn's exception; the worker goes on
    assert other.submit(prompts[0], params).tokens(TIMEOUT) == expected[0]
    other.close()
