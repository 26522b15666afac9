"""ONNX Runtime INT8 bundles: the W8A8 prefill graph beside the MatMulNBits decode graph.

The prefill graph runs every step of at least `PREFILL_GRAPH_MIN_ROWS` token rows (a prompt, or a
decode step of that many sequences); it reads the decode graph's weight bytes (one copy in the
data file) and quantizes activations per token. References come
from transformers' GlmForCausalLM (fp32) and from a numpy matmul, not from the code under test."""

from __future__ import annotations

import shutil
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agent.model import load_model
from models.onnx_graph import GraphBuilder
from models.tiny import HELDOUT_MODULES, corpus_text
from runtime import engine as engine_module
from runtime.engine import (ATTENTION_BLOCKS, PREFILL_GRAPH_MIN_ROWS, PROMPT_RUN_TOKENS, CacheRow, ModelArch,
                            cpu_has_vnni, load_engine, signed_weight_graph)
from runtime.errors import ModelLoadError


@pytest.fixture(scope="module")
def hf_model(trained_checkpoint):
    from transformers import GlmForCausalLM

    return GlmForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_ids(int8_bundle):
    return load_model(int8_bundle, "onnxruntime").tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


def _external(path):
    """{initializer name: (offset, length)} of a graph's external tensors."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "model.onnx.data"
            out[t.name] = (int(info["offset"]), int(info["length"]))
    return out


def test_both_graphs_read_one_aligned_copy_of_the_weights(int8_bundle):
    ort_dir = int8_bundle / "onnxruntime"
    decode, prefill = _external(ort_dir / "model.onnx"), _external(ort_dir / "prefill.onnx")
    weights = [n for n in decode if n.endswith(".weight_uint8")]
    assert len(weights) == 2 * 4 + 1  # tiny: 2 layers x (qkv, o, gate_up, down) + lm_head
    for name in weights:
        assert prefill[name] == decode[name], name  # the same bytes, not a second copy
    refs = {**decode, **prefill}
    for name, (offset, length) in refs.items():
        if length >= 4096:  # big tensors start on a page: ONNX Runtime memory-maps them
            assert offset % 4096 == 0, (name, offset)
    distinct = {span for span in refs.values()}
    stored = sum(length for _, length in distinct)
    assert (ort_dir / "model.onnx.data").stat().st_size < stored + 4096 * len(distinct)
    assert stored < sum(length for _, length in decode.values()) + sum(length for _, length in prefill.values())


def test_engine_runs_prompts_on_the_prefill_graph(int8_bundle, heldout_ids):
    model = load_model(int8_bundle, "onnxruntime")
    assert model.engine.prefill_graph == "prefill.onnx"
    arch = model.arch
    off = load_engine("onnxruntime", int8_bundle / "onnxruntime" / "model.onnx", arch, prefill_graph=False)
    assert off.prefill_graph is None

    def logits(engine, n):
        ids = np.array([heldout_ids[:n]])
        return engine.forward(ids, np.arange(n)[None], np.ones((1, n), np.int64), engine.new_cache())[0][0]

    # steps of fewer token rows run on the decode graph (the same numbers as without a prefill graph),
    # longer ones do not
    assert model.engine.prefill_min_rows == PREFILL_GRAPH_MIN_ROWS
    short, long = PREFILL_GRAPH_MIN_ROWS - 1, PREFILL_GRAPH_MIN_ROWS
    np.testing.assert_array_equal(logits(model.engine, short), logits(off, short))
    assert not np.array_equal(logits(model.engine, long), logits(off, long))
    # the agent's model.prefill_graph = false
    from agent.config import load_config

    cfg = load_config(None, {"model.prefill_graph": False})
    assert load_model(int8_bundle, "onnxruntime", prefill_graph=cfg.model.prefill_graph).engine.prefill_graph is None


def test_wide_decode_steps_run_on_the_prefill_graph_row_by_row(int8_bundle, heldout_ids, monkeypatch):
    """A decode step of PREFILL_GRAPH_MIN_ROWS sequences (the batching scheduler's row-aligned batch) runs on
    the prefill graph: each row's logits equal that sequence's own step on the prefill graph, so
    rows do not change each other's results; fewer rows run on the decode graph. A left-padded batch
    (merge_caches) of as many rows runs on the decode graph: the blocked prefill graph has no padding mask."""
    model = load_model(int8_bundle, "onnxruntime")
    engine, arch = model.engine, model.arch
    ran = []  # (graph, rows) of every run
    for label, runner in (("prefill", engine._prefill), ("decode", engine._decode)):
        real = runner.run
        monkeypatch.setattr(runner, "run", lambda ort_, tokens, *a, _l=label, _real=real:
                            ran.append((_l, tokens[1].shape[0])) or _real(ort_, tokens, *a))
    lengths = [5, 9, 3, 12, 7][:PREFILL_GRAPH_MIN_ROWS + 1]
    prompts = [heldout_ids[40 * i:40 * i + n] for i, n in enumerate(lengths)]
    nxt = [heldout_ids[40 * i + n] for i, n in enumerate(lengths)]

    def alone(prompt, token, min_rows):  # this sequence's next-step logits, that step routed by min_rows
        n = len(prompt)
        _, cache = engine.forward(np.array([prompt]), np.arange(n)[None], np.ones((1, n), np.int64),
                                  engine.new_cache())
        engine.prefill_min_rows = min_rows
        try:
            return engine.forward(np.array([[token]]), np.array([[n]]), np.ones((1, n + 1), np.int64), cache)[0][0]
        finally:
            engine.prefill_min_rows = PREFILL_GRAPH_MIN_ROWS

    def batched(count, merged=False):
        rows = []
        for prompt in prompts[:count]:
            n = len(prompt)
            rows.append(CacheRow(engine.forward(np.array([prompt]), np.arange(n)[None], np.ones((1, n), np.int64),
                                                engine.new_cache())[1]))
        if not merged:
            batch = engine.new_batch()
            for row in rows:
                batch.add(row)
            return batch.step(nxt[:count])
        cache, mask = engine.merge_caches(rows)
        mask = np.concatenate([mask, np.ones((count, 1), np.int64)], axis=1)
        pos = np.array([[len(p)] for p in prompts[:count]])
        return engine.forward(np.array([[t] for t in nxt[:count]]), pos, mask, cache)[0]

    wide = batched(PREFILL_GRAPH_MIN_ROWS)
    assert ran[-1] == ("prefill", PREFILL_GRAPH_MIN_ROWS)  # the batched step ran on the prefill graph
    for row in range(PREFILL_GRAPH_MIN_ROWS):
        on_prefill, on_decode = alone(prompts[row], nxt[row], 1), alone(prompts[row], nxt[row], 10**6)
        np.testing.assert_allclose(wide[row], on_prefill, atol=1e-4)
        assert np.argmax(wide[row]) == np.argmax(on_decode) or \
            np.sort(on_decode)[-1] - np.sort(on_decode)[-2] < 0.1  # the same model, up to near-ties
    narrow = batched(PREFILL_GRAPH_MIN_ROWS - 1)
    assert ran[-1] == ("decode", PREFILL_GRAPH_MIN_ROWS - 1)
    for row in range(PREFILL_GRAPH_MIN_ROWS - 1):
        np.testing.assert_allclose(narrow[row], alone(prompts[row], nxt[row], 10**6), atol=1e-4)
    padded = batched(PREFILL_GRAPH_MIN_ROWS, merged=True)
    assert ran[-1] == ("decode", PREFILL_GRAPH_MIN_ROWS)
    for row in range(PREFILL_GRAPH_MIN_ROWS):
        np.testing.assert_allclose(padded[row], alone(prompts[row], nxt[row], 10**6), atol=1e-4)


def test_prefill_graph_agrees_with_transformers(int8_bundle, hf_model, heldout_ids):
    """Last-position logits of prompts of 33..64 tokens through the W8A8 prefill graph, against the
    fp32 transformers model on the same text; the decode graph (prefill_graph=False) alongside."""
    model = load_model(int8_bundle, "onnxruntime")
    off = load_engine("onnxruntime", int8_bundle / "onnxruntime" / "model.onnx", model.arch, prefill_graph=False)
    seq = heldout_ids[300:364]
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq])).logits[0].numpy()  # (64, vocab)
    ours, base = [], []
    for n in range(33, 65):
        ids, pos, mask = np.array([seq[:n]]), np.arange(n)[None], np.ones((1, n), np.int64)
        ours.append(model.engine.forward(ids, pos, mask, model.engine.new_cache())[0][0])
        base.append(off.forward(ids, pos, mask, off.new_cache())[0][0])
    ours, base, ref = np.stack(ours), np.stack(base), ref[32:64]

    def cosine(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    assert cosine(ours, ref).min() > 0.998
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    agree_decode_graph = float((base.argmax(-1) == ref.argmax(-1)).mean())
    assert agree >= 0.9 and agree >= agree_decode_graph - 0.07, (agree, agree_decode_graph)
    assert cosine(ours, base).min() > 0.999  # the two graphs compute the same model


def test_a_prompt_in_attention_blocks_computes_what_one_block_does(int8_bundle, hf_model, heldout_ids, monkeypatch):
    """The prefill graph's attention runs a one-sequence prompt as ATTENTION_BLOCKS blocks of its rows, each over
    the keys up to its own end: the logits and the cache it leaves are those of the same prompt in one block
    (idle blocks on scratch buffers), from an empty cache and on top of a cached prefix, and the next decode
    step goes on from either alike; the blocked logits follow transformers."""
    engine = load_model(int8_bundle, "onnxruntime").engine
    engine.prompt_run_tokens = None
    runner = engine._prefill
    assert runner.blocks == ATTENTION_BLOCKS > 1
    seq = heldout_ids[100:330]
    prefix, rest, nxt = seq[:60], seq[60:229], seq[229]

    def run(min_tokens):
        monkeypatch.setattr(engine_module, "BLOCKED_MIN_TOKENS", min_tokens)
        out = []
        for start, ids in ((0, seq[:229]), (60, rest)):  # cold; then on top of the cached prefix
            cache = engine.new_cache()
            if start:
                engine.forward(np.array([prefix]), np.arange(60)[None], np.ones((1, 60), np.int64), cache)
            n = start + len(ids)
            logits, cache = engine.forward(np.array([ids]), np.arange(start, n)[None], np.ones((1, n), np.int64),
                                           cache, prompt_tokens=len(ids))
            assert runner.split == (min_tokens <= len(ids))
            step, cache = engine.forward(np.array([[nxt]]), np.array([[n]]), np.ones((1, n + 1), np.int64), cache)
            out.append((logits[0], step[0], [cache.key(i).copy() for i in range(engine.arch.num_layers)]))
        return out

    for (blocked, b_step, b_keys), (whole, w_step, w_keys) in zip(run(64), run(10**6)):
        np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b_step, w_step, rtol=0, atol=1e-5)
        for b, w in zip(b_keys, w_keys):
            np.testing.assert_allclose(b, w, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq[:229]])).logits[0, -1].numpy()
    blocked = run(64)[0][0]
    assert np.argmax(blocked) == np.argmax(ref) or np.sort(ref)[-1] - ref[np.argmax(blocked)] < 0.1
    assert float(blocked @ ref / np.linalg.norm(blocked) / np.linalg.norm(ref)) > 0.99


def test_which_steps_run_in_attention_blocks():
    """One sequence's step of 64+ new tokens, at least half as many as its cache holds, is split into 4
    consecutive ranges (each block's seqlens and total end where its rows end); anything else runs whole in
    block 0, blocks 1-3 taking one token of one sequence as a one-token prompt (their scratch buffers)."""
    from runtime.engine import attention_block_inputs

    split, inp = attention_block_inputs(4, 1, 100, np.ones((1, 120), np.int64))  # 100 new over 20 cached
    assert split
    assert inp["attention_blocks.rows"].tolist() == [[0, 25, 1], [25, 50, 1], [50, 75, 1], [75, 100, 1]]
    assert inp["attention_blocks.seqlens_k"].tolist() == [[44], [69], [94], [119]]
    assert inp["attention_blocks.total"].tolist() == [45, 70, 95, 120]
    for batch, new, cached in ((1, 63, 0), (1, 64, 130), (2, 200, 0)):  # too few, too few for the cache, batched
        mask = np.ones((batch, cached + new), np.int64)
        mask[-1, -3:] = 0 if batch > 1 else 1  # a row-aligned batch: the last row is 3 positions shorter
        split, inp = attention_block_inputs(4, batch, new, mask)
        assert not split, (batch, new, cached)
        assert inp["attention_blocks.rows"].tolist() == [[0, new, batch]] + [[new - 1, new, 1]] * 3
        assert inp["attention_blocks.seqlens_k"][0].tolist() == [cached + new - 1] * (batch - 1) + \
            [cached + new - 1 - (3 if batch > 1 else 0)]
        assert inp["attention_blocks.total"].tolist() == [cached + new, 1, 1, 1]
    assert attention_block_inputs(4, 1, 64, np.ones((1, 192), np.int64))[0]  # 64 new over 128 cached: split


def test_a_prompt_longer_than_a_run_runs_in_pieces_with_the_whole_prompts_logits(int8_bundle, hf_model, heldout_ids,
                                                                                 monkeypatch):
    """Prompts over `prompt_run_tokens` (PROMPT_RUN_TOKENS by default) run as several runs of the graph the
    whole prompt takes (ONNX Runtime's arenas keep the largest run's memory for good): the last position's
    logits are the whole run's and follow transformers; the next input goes on from the whole prompt."""
    model = load_model(int8_bundle, "onnxruntime")
    engine = model.engine
    assert engine.prompt_run_tokens == PROMPT_RUN_TOKENS
    seq = heldout_ids[300:362]
    ids, pos, mask = np.array([seq]), np.arange(62)[None], np.ones((1, 62), np.int64)
    engine.prompt_run_tokens = None
    whole, _ = engine.forward(ids, pos, mask, engine.new_cache())
    engine.prompt_run_tokens = 20
    runs = []
    for runner in {id(r): r for r in (engine._decode, engine._prefill)}.values():
        real = runner.run
        monkeypatch.setattr(runner, "run", lambda ort_, tokens, *a, _r=runner, _real=real:
                            runs.append((_r, tokens[1].shape[1])) or _real(ort_, tokens, *a))
    pieces, cache = engine.forward(ids, pos, mask, engine.new_cache())
    # the 2-token tail too runs where the whole prompt does (alone it would take the decode graph)
    assert [n for _, n in runs] == [20, 20, 20, 2] and {r for r, _ in runs} == {engine._prefill}
    assert cache.length == 62
    scale = np.abs(whole).max()
    assert np.abs(pieces - whole).max() <= 1e-3 * scale
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq + heldout_ids[362:363]])).logits[0].numpy()
    cos = (pieces[0] * ref[61]).sum() / np.linalg.norm(pieces[0]) / np.linalg.norm(ref[61])
    assert cos > 0.998 and pieces[0].argmax() == whole[0].argmax()
    nxt, _ = engine.forward(np.array([heldout_ids[362:363]]), np.array([[62]]), np.ones((1, 63), np.int64), cache)
    cos = (nxt[0] * ref[62]).sum() / np.linalg.norm(nxt[0]) / np.linalg.norm(ref[62])
    assert cos > 0.998
    # several sequences at once run whole (GroupQueryAttention takes new tokens over a cache one row at a time)
    runs.clear()
    two, _ = engine.forward(np.array([seq, seq]), np.stack([np.arange(62)] * 2), np.ones((2, 62), np.int64),
                            engine.new_cache(2))
    assert [n for _, n in runs] == [62] and np.abs(two[1] - whole[0]).max() <= 1e-3 * scale


def test_int8_weights_are_chosen_where_the_cpu_has_vnni_and_leave_nothing_behind(int8_bundle, tmp_path, monkeypatch,
                                                                                  caplog):
    """The prefill graph's weights become int8 (u8 x s8 GEMMs) by default exactly where the CPU has VNNI; the
    copy is written to the temporary directory and removed once loaded; where it cannot be written the
    engine loads the uint8 graph and says why."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    entry = int8_bundle / "onnxruntime" / "model.onnx"
    arch = load_model(int8_bundle, "onnxruntime").arch
    engine = load_engine("onnxruntime", entry, arch)
    assert engine.signed_weights == cpu_has_vnni() and engine.prefill_graph == "prefill.onnx"
    assert load_engine("onnxruntime", entry, arch, signed_weights=True).signed_weights
    assert not load_engine("onnxruntime", entry, arch, signed_weights=False).signed_weights
    assert list(tmp_path.iterdir()) == []  # the int8 copy is gone once the session has it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with caplog.at_level("WARNING"):
        fallback = load_engine("onnxruntime", entry, arch, signed_weights=True)
    assert not fallback.signed_weights and "int8-weight copy could not be made" in caplog.text
    assert "No such file" in caplog.text
    # an install without onnx (the copy is written with it): the uint8 graph serves, with the reason said
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    caplog.clear()
    if not engine_module.takes_wide_blocks(ort.__version__):  # the decode graph's blocks are split with onnx
        with pytest.raises(ModelLoadError, match=r"needs the onnx package.*pip install 'onnx>=1\.17'"):
            load_engine("onnxruntime", entry, arch, signed_weights=True)
        return
    with caplog.at_level("WARNING"):
        no_onnx = load_engine("onnxruntime", entry, arch, signed_weights=True)
    assert not no_onnx.signed_weights and "onnx" in caplog.text and no_onnx.prefill_graph == "prefill.onnx"


def test_int8_weight_graph_has_every_gemm_on_int8_weights(int8_bundle, tmp_path):
    out = signed_weight_graph(int8_bundle / "onnxruntime" / "prefill.onnx", tmp_path)
    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert gemms and all(inits[n.input[1]].data_type == onnx.TensorProto.INT8 for n in gemms)
    assert all(onnx.numpy_helper.to_array(inits[n.input[5]]).tolist() == 0 for n in gemms)
    assert not [t.name for t in inits.values() if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2]
    original = onnx.load(str(int8_bundle / "onnxruntime" / "prefill.onnx"), load_external_data=False)
    assert len([n for n in original.graph.node if n.op_type == "MatMulIntegerToFloat"]) == len(gemms)
    # every weight is the uint8 one minus 128, transposed
    data = np.fromfile(int8_bundle / "onnxruntime" / "model.onnx.data", np.uint8)
    t_u8 = next(t for t in original.graph.initializer if t.name.endswith(".weight_uint8"))
    info = {e.key: e.value for e in t_u8.external_data}
    u8 = data[int(info["offset"]):int(info["offset"]) + int(info["length"])].reshape(tuple(t_u8.dims))
    t_s8 = inits[f"{t_u8.name}.s8t"]
    info = {e.key: e.value for e in t_s8.external_data}
    s8 = np.fromfile(tmp_path / info["location"], np.int8)[int(info["offset"]):][:int(info["length"])]
    np.testing.assert_array_equal(s8.reshape(tuple(t_s8.dims)), (u8.astype(np.int16) - 128).T)
    # gate and up are two GEMMs over row ranges of the one stored gate|up weight: each gets its rows only
    halves = [name for name in inits if ".mlp.gate_up_proj.weight_uint8." in name]
    assert len(halves) == 2 * 2  # tiny: 2 layers x (gate, up)
    for name in halves:
        base, rows = name.rsplit(".s8t", 1)[0].rsplit(".", 1)
        lo, hi = map(int, rows.split("-"))
        t_u8 = next(t for t in original.graph.initializer if t.name == base)
        info = {e.key: e.value for e in t_u8.external_data}
        u8 = data[int(info["offset"]):int(info["offset"]) + int(info["length"])].reshape(tuple(t_u8.dims))
        info = {e.key: e.value for e in inits[name].external_data}
        s8 = np.fromfile(tmp_path / info["location"], np.int8)[int(info["offset"]):][:int(info["length"])]
        np.testing.assert_array_equal(s8.reshape(tuple(inits[name].dims)), (u8[lo:hi].astype(np.int16) - 128).T)


@pytest.mark.skipif(not cpu_has_vnni(), reason="u8 x s8 GEMMs are exact only with VNNI (without it ONNX Runtime's "
                    "kernel saturates; the engine keeps uint8 weights there)")
def test_int8_weights_give_the_uint8_graphs_logits_and_follow_transformers(int8_bundle, hf_model, heldout_ids):
    """On a VNNI CPU: prompts and 8-row decode steps on the int8-weight prefill graph give exactly the
    uint8 graph's logits (the integer sums are the same), and those follow transformers' fp32 model."""
    entry = int8_bundle / "onnxruntime" / "model.onnx"
    arch = load_model(int8_bundle, "onnxruntime").arch
    u8 = load_engine("onnxruntime", entry, arch, signed_weights=False)
    s8 = load_engine("onnxruntime", entry, arch, signed_weights=True)
    assert s8.signed_weights and not u8.signed_weights
    seq = heldout_ids[300:364]
    ids, pos, mask = np.array([seq]), np.arange(64)[None], np.ones((1, 64), np.int64)
    a, cache_a = u8.forward(ids, pos, mask, u8.new_cache())
    b, cache_b = s8.forward(ids, pos, mask, s8.new_cache())
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        ref = hf_model(torch.tensor([seq])).logits[0, -1].numpy()
    assert (b[0] * ref).sum() / np.linalg.norm(b[0]) / np.linalg.norm(ref) > 0.998
    rows = [CacheRow(u8.forward(np.array([heldout_ids[i:i + 20]]), np.arange(20)[None], np.ones((1, 20), np.int64),
                                u8.new_cache())[1]) for i in range(0, 160, 20)]
    rows_s8 = [CacheRow(s8.forward(np.array([heldout_ids[i:i + 20]]), np.arange(20)[None], np.ones((1, 20), np.int64),
                                   s8.new_cache())[1]) for i in range(0, 160, 20)]
    batch_u8, batch_s8 = u8.new_batch(), s8.new_batch()
    for r, q in zip(rows, rows_s8):
        batch_u8.add(r)
        batch_s8.add(q)
    tokens = np.array(heldout_ids[400:408])
    np.testing.assert_array_equal(batch_u8.step(tokens), batch_s8.step(tokens))  # 8 rows: the prefill graph
    # prefill_graph="only" (small boxes): the one graph loaded runs on int8 weights too
    only_u8 = load_engine("onnxruntime", entry, arch, prefill_graph="only", signed_weights=False)
    only_s8 = load_engine("onnxruntime", entry, arch, prefill_graph="only", signed_weights=True)
    assert only_s8.prefill_only and only_s8.signed_weights and not only_u8.signed_weights
    np.testing.assert_array_equal(only_u8.forward(ids, pos, mask, only_u8.new_cache())[0],
                                  only_s8.forward(ids, pos, mask, only_s8.new_cache())[0])


@pytest.mark.parametrize("k", [96, 100])  # 100: rows padded to whole MatMulNBits blocks
def test_w8a8_linear_against_numpy(k):
    """One linear written both ways (decode: MatMulNBits; prefill: W8A8) against x @ w.T in numpy."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((48, k)).astype(np.float32) * 0.05
    b = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    x[1, 2] *= 40.0  # one outlier token: per-token scales keep the others exact-ish
    results = {}
    for prefill in (False, True):
        g = GraphBuilder("int8-per-channel-u8", prefill=prefill)
        y = g.linear("x", w, b, "lin")
        g.nodes.append(onnx.helper.make_node("Identity", [y], ["y"]))
        graph = onnx.helper.make_graph(
            g.nodes, "lin", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 5, k])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], g.initializers)
        m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)],
                                   ir_version=8)  # the exporter's (older onnxruntime versions refuse newer ones)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        results[prefill] = sess.run(None, {"x": x})[0]
    ref = x @ w.T + b
    for prefill, y in results.items():
        assert y.shape == ref.shape
        err = np.abs(y - ref).max(-1) / np.abs(ref).max(-1)  # per token
        assert err.max() < 0.03, (prefill, err.max())
    np.testing.assert_allclose(results[True], results[False], rtol=0, atol=0.03 * np.abs(ref).max())


def test_missing_prefill_graph_is_a_clear_error(int8_bundle, tmp_path):
    ort_dir = shutil.copytree(int8_bundle / "onnxruntime", tmp_path / "onnxruntime")
    (ort_dir / "prefill.onnx").unlink()
    arch = ModelArch.from_manifest(load_model(int8_bundle, "onnxruntime").bundle.manifest.architecture)
    with pytest.raises(ModelLoadError, match="prefill graph 'prefill.onnx' is not beside it"):
        load_engine("onnxruntime", ort_dir / "model.onnx", arch)
    engine = load_engine("onnxruntime", ort_dir / "model.onnx", arch, prefill_graph=False)  # still usable
    assert engine.prefill_graph is None


def _with_routing_metadata(int8_bundle, tmp_path, value):
    """A copy of the bundle's ONNX Runtime files whose decode graph has edgeglm.prefill_min_rows set to
    `value` (None: removed, as in graphs exported before the key)."""
    from runtime.engine import PREFILL_ROWS_KEY

    ort_dir = shutil.copytree(int8_bundle / "onnxruntime", tmp_path / "onnxruntime")
    model = onnx.load(str(ort_dir / "model.onnx"), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != PREFILL_ROWS_KEY]
    del model.metadata_props[:]
    for key, val in kept + ([(PREFILL_ROWS_KEY, value)] if value is not None else []):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, val
    onnx.save_model(model, str(ort_dir / "model.onnx"))
    return ort_dir / "model.onnx"


def test_prefill_graph_only_runs_every_step_on_it_without_loading_the_decode_graph(int8_bundle, fp32_bundle,
                                                                                 heldout_ids, caplog):
    """model.prefill_graph = "only": one session, the prefill graph's, for prompts and single-token steps
    alike (the same logits as the two-graph engine's prefill graph); a bundle without a prefill graph
    runs its decode graph with a warning; a bad value is named."""
    from agent.config import load_config
    from runtime.engine import prefill_mode

    arch = load_model(int8_bundle, "onnxruntime").arch
    ort_dir = int8_bundle / "onnxruntime"
    only = load_engine("onnxruntime", ort_dir / "model.onnx", arch, prefill_graph="only")
    both = load_engine("onnxruntime", ort_dir / "model.onnx", arch)
    assert only.prefill_only and only.prefill_graph == "prefill.onnx"
    assert only.session._model_path.endswith("prefill.onnx") and only._prefill is only._decode  # one session
    prompt, token = heldout_ids[:20], heldout_ids[20]
    results = {}
    for name, engine in (("only", only), ("both", both)):
        _, cache = engine.forward(np.array([prompt]), np.arange(20)[None], np.ones((1, 20), np.int64),
                                  engine.new_cache())
        both.prefill_min_rows = 1 if name == "both" else both.prefill_min_rows  # the single step on the prefill graph
        results[name] = engine.forward(np.array([[token]]), np.array([[20]]), np.ones((1, 21), np.int64), cache)[0]
    np.testing.assert_allclose(results["only"], results["both"], atol=1e-5)
    with caplog.at_level("WARNING"):
        fp32 = load_model(fp32_bundle, "onnxruntime", prefill_graph="only")
    assert not fp32.engine.prefill_only and fp32.engine.prefill_graph is None
    assert "no prefill graph that can decode" in caplog.text
    assert load_config(None, {"model.prefill_graph": "only"}).model.prefill_graph == "only"
    with pytest.raises(ValueError, match="prefill_graph='sometimes' is invalid"):
        prefill_mode("sometimes")


def test_routing_of_graphs_without_the_row_threshold_and_a_bad_one(int8_bundle, heldout_ids, tmp_path):
    """Graphs exported before edgeglm.prefill_min_rows keep the old rule (24+ tokens per row on the
    prefill graph, batch size ignored); a damaged value is a clear load error."""
    from runtime.engine import LEGACY_PREFILL_MIN_TOKENS

    arch = load_model(int8_bundle, "onnxruntime").arch
    legacy = load_engine("onnxruntime", _with_routing_metadata(int8_bundle, tmp_path / "a", None), arch)
    off = load_engine("onnxruntime", int8_bundle / "onnxruntime" / "model.onnx", arch, prefill_graph=False)
    assert legacy.prefill_graph == "prefill.onnx" and legacy.prefill_min_rows == LEGACY_PREFILL_MIN_TOKENS

    def step(engine, rows, tokens):  # logits of a fresh left-aligned batch of `rows` prompts
        ids = np.array([heldout_ids[50 * r:50 * r + tokens] for r in range(rows)])
        return engine.forward(ids, np.tile(np.arange(tokens), (rows, 1)), np.ones((rows, tokens), np.int64),
                              engine.new_cache(rows))[0]

    # 8 rows x 4 tokens: the decode graph under the old rule, the prefill graph under the new one
    np.testing.assert_array_equal(step(legacy, 8, 4), step(off, 8, 4))
    new = load_engine("onnxruntime", int8_bundle / "onnxruntime" / "model.onnx", arch)
    assert not np.array_equal(step(new, 8, 4), step(off, 8, 4))
    assert not np.array_equal(step(legacy, 1, LEGACY_PREFILL_MIN_TOKENS), step(off, 1, LEGACY_PREFILL_MIN_TOKENS))
    for bad in ("0", "four"):
        with pytest.raises(ModelLoadError, match=f"edgeglm.prefill_min_rows='{bad}' is not a positive integer"):
            load_engine("onnxruntime", _with_routing_metadata(int8_bundle, tmp_path / bad, bad), arch)


def test_embedding_rows_come_from_the_table_beside_the_graph(int8_bundle, trained_checkpoint, tmp_path):
    """The ONNX Runtime graphs take inputs_embeds; the engine reads the rows from embed_tokens.npy,
    which holds the checkpoint's fp32 embedding exactly."""
    from safetensors.numpy import load_file

    ort_dir = int8_bundle / "onnxruntime"
    table = np.load(ort_dir / "embed_tokens.npy")
    np.testing.assert_array_equal(table, load_file(trained_checkpoint / "model.safetensors")["model.embed_tokens.weight"])
    for graph in ("model.onnx", "prefill.onnx"):
        model = onnx.load(str(ort_dir / graph), load_external_data=False)
        assert [i.name for i in model.graph.input][:1] == ["inputs_embeds"]
        assert not any("embed_tokens" in t.name for t in model.graph.initializer)
    engine = load_model(int8_bundle, "onnxruntime").engine
    ids = np.array([[0, 5, 5, table.shape[0] - 1]])
    np.testing.assert_array_equal(engine._embeddings[ids], table[ids])
    with pytest.raises(ValueError, match=f"token id {table.shape[0]} is outside the vocabulary"):
        engine.forward(np.array([[1, table.shape[0]]]), np.arange(2)[None], np.ones((1, 2), np.int64),
                       engine.new_cache())
    copy = shutil.copytree(ort_dir, tmp_path / "onnxruntime")
    (copy / "embed_tokens.npy").unlink()
    with pytest.raises(ModelLoadError, match="embedding table 'embed_tokens.npy' is not beside it"):
        load_engine("onnxruntime", copy / "model.onnx", engine.arch)
    np.save(copy / "embed_tokens.npy", table[:10])
    with pytest.raises(ModelLoadError, match=r"expected float32 \(512, hidden\)"):
        load_engine("onnxruntime", copy / "model.onnx", engine.arch)


def test_auto_loads_both_graphs_where_memory_allows_and_the_prefill_graph_alone_where_not(int8_bundle, fp32_bundle):
    """model.prefill_graph = "auto" (the default): both graphs when their estimated resident bytes take at
    most half of what the process can still take (MemAvailable, or a cgroup limit minus its usage), the
    prefill graph alone otherwise; the choice and its reason are in execution_info(). Both pass the bundle's
    golden check."""
    from agent.config import load_config
    from ota.bundle import open_bundle
    from runtime.autotune import choose_prefill_graph, resident_bytes
    from runtime.probe import MemoryInfo

    bundle = open_bundle(int8_bundle)
    both, alone = resident_bytes(bundle, "onnxruntime", "on"), resident_bytes(bundle, "onnxruntime", "only")
    data = (int8_bundle / "onnxruntime" / "model.onnx.data").stat().st_size
    assert both == alone + data  # the second session's prepacked copy of the weights
    plenty, tight = MemoryInfo(None, 2 * both, None), MemoryInfo(None, 2 * both - 1, None)
    assert choose_prefill_graph("auto", bundle, plenty).mode == "on"
    assert choose_prefill_graph("auto", bundle, tight).mode == "only"
    # under a cgroup limit what counts is the limit minus what the cgroup already uses
    cgroup = MemoryInfo(None, 100 * both, 10 * both, cgroup_usage_bytes=9 * both)
    assert cgroup.budget_bytes() == both and choose_prefill_graph("auto", bundle, cgroup).mode == "only"
    assert choose_prefill_graph("auto", bundle, MemoryInfo(None, None, None)).mode == "on"  # unknown: plenty
    assert choose_prefill_graph("auto", open_bundle(fp32_bundle), tight).mode == "on"  # nothing to choose
    for setting, mode in ((True, "on"), (False, "off"), ("only", "only"), ("on", "on")):
        assert choose_prefill_graph(setting, bundle, tight).mode == choose_prefill_graph(setting, bundle, plenty).mode
        assert choose_prefill_graph(setting, bundle, tight).mode == mode
    # `true` where "auto" would hold the weights once (an agent.toml of 0.1.0's installer, which wrote every
    # default, `true` then): kept, and said in execution_info() and the log
    assert choose_prefill_graph(True, bundle, plenty).reason == "configured"
    assert "take more than half of" in choose_prefill_graph(True, bundle, tight).reason
    assert '"auto", the default, would hold the weights once' in choose_prefill_graph(True, bundle, tight).reason

    wide = load_model(int8_bundle, "onnxruntime", memory=plenty)
    lean = load_model(int8_bundle, "onnxruntime", memory=tight)
    assert wide.engine.prefill_graph == "prefill.onnx" and not wide.engine.prefill_only
    assert lean.engine.prefill_only and lean.engine.session._model_path.endswith("prefill.onnx")
    info = lean.execution_info()
    assert info["prefill_only"] and info["prefill_mode"].startswith("only (auto: both graphs")
    assert wide.execution_info()["prefill_mode"].startswith("on (auto: both graphs")
    for model in (wide, lean):  # both reproduce the continuation recorded at export (the OTA self-test's check)
        assert model.golden_check().passed, model.golden_check().describe()
    assert load_config(None, {}).model.prefill_graph == "auto"


def test_a_graph_naming_a_file_the_manifest_does_not_list_is_refused(int8_bundle, tmp_path):
    """The decode graph's metadata names its prefill graph and embedding table; both were opened when present
    beside it, listed in the manifest or not: a bundle whose manifest forgot one ran here, unchecked by any
    hash, and failed on every agent (an OTA transfer carries listed files only)."""
    import json

    bundle = shutil.copytree(int8_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "onnxruntime/prefill.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (bundle / "manifest.sig").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="prefill graph 'prefill.onnx' is not listed in the bundle's manifest"):
        load_model(bundle, "onnxruntime", prefill_graph=True)
    assert load_model(bundle, "onnxruntime", prefill_graph=False).engine.prefill_graph is None  # unaffected
