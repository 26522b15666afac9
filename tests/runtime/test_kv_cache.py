"""The engines' opaque KV-cache handles: growth, several sequences on one engine, padded batches."""

from __future__ import annotations

import numpy as np
import pytest

from agent.model import load_model
from models.tiny import HELDOUT_MODULES, corpus_text
from runtime.golden import teacher_forced_logits

BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def ids(fp32_bundle):
    model = load_model(fp32_bundle, "onnxruntime")
    return model.tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


def full(engine, seq):  # the whole sequence without a cache: logits of its last position
    n = len(seq)
    logits, _ = engine.forward(np.asarray([seq]), np.arange(n)[None], np.ones((1, n), np.int64), engine.new_cache())
    return logits[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_grows_past_its_first_allocation(fp32_bundle, backend, ids):
    """ONNX Runtime's buffer starts with 128 positions of headroom (250 + 128 = 378 here) and then at
    least doubles; results do not change across the growth."""
    engine = load_model(fp32_bundle, backend).engine
    seq = ids[:420]
    cached = teacher_forced_logits(engine, seq[:250], seq[250:])
    for step in (0, 127, 128, 129, 169):  # across the 378-position boundary
        np.testing.assert_allclose(cached[step], full(engine, seq[:250 + step]), atol=1e-4)


def test_decode_steps_after_a_prompt_do_not_copy_the_cache(fp32_bundle, ids):
    """The first 128 tokens after a prompt fit in the buffer the prompt allocated: no step grows
    (reallocates and copies) the KV cache."""
    from runtime.engine import KV_HEADROOM
    from runtime.generate import decode_one_token, prefill

    engine = load_model(fp32_bundle, "onnxruntime").engine
    logits, cache = prefill(engine, ids[:300])
    first = cache.buffers[0]
    for i in range(KV_HEADROOM):
        logits, cache = decode_one_token(engine, int(np.argmax(logits)), 300 + i, cache)
        assert cache.buffers[0] is first, f"the cache was reallocated at decode step {i}"
    logits, cache = decode_one_token(engine, int(np.argmax(logits)), 300 + KV_HEADROOM, cache)
    assert cache.buffers[0] is not first and cache.capacity >= 2 * (300 + KV_HEADROOM)  # then it grows


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_sequences_do_not_disturb_each_other(fp32_bundle, backend, ids):
    engine = load_model(fp32_bundle, backend).engine
    a, b = ids[:40], ids[500:530]
    alone_a = teacher_forced_logits(engine, a[:10], a[10:])
    alone_b = teacher_forced_logits(engine, b[:8], b[8:])
    ca, cb = engine.new_cache(), engine.new_cache()
    rows_a, rows_b = [], []
    for cache, seq, n, rows in ((ca, a, 10, rows_a), (cb, b, 8, rows_b)):
        logits, _ = engine.forward(np.asarray([seq[:n]]), np.arange(n)[None], np.ones((1, n), np.int64), cache)
        rows.append(logits[0])
    for i in range(20):  # alternate one step of each
        for cache, seq, n, rows in ((ca, a, 10, rows_a), (cb, b, 8, rows_b)):
            p = n + i  # feeds seq[p] at position p: the row that teacher forcing makes after it
            if p >= len(seq) - 1:
                continue
            logits, _ = engine.forward(np.array([[seq[p]]]), np.array([[p]]), np.ones((1, p + 1), np.int64), cache)
            rows.append(logits[0])
    np.testing.assert_allclose(np.stack(rows_a), alone_a[:len(rows_a)], atol=1e-4)
    np.testing.assert_allclose(np.stack(rows_b), alone_b[:len(rows_b)], atol=1e-4)
    assert ca.length == 30 and cb.length == 28


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_decodes_like_single_rows(fp32_bundle, backend, ids):
    """A left-padded prompt batch, then decode steps on the batch: each row as if it ran alone. ONNX
    Runtime's graph rotates a prompt from each row's first position (GroupQueryAttention) and refuses
    a left-padded prompt batch with a clear error; the agent prefills each sequence alone."""
    engine = load_model(fp32_bundle, backend).engine
    a, b = ids[:12], ids[50:57]
    follow = [ids[200:205], ids[300:305]]
    batch_ids = np.array([a, [0] * 5 + b], dtype=np.int64)
    mask = np.array([[1] * 12, [0] * 5 + [1] * 7], dtype=np.int64)
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    cache = engine.new_cache(2)
    if backend == "onnxruntime":
        with pytest.raises(ValueError, match="left-padded prompt batch.*prefill each sequence alone"):
            engine.forward(batch_ids, pos, mask, cache)
        assert cache.length == 0  # nothing was written
        return
    engine.forward(batch_ids, pos, mask, cache)
    steps = []
    for t in range(5):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step_ids = np.array([[follow[0][t]], [follow[1][t]]])
        step_pos = pos[:, -1:] + 1 + t
        logits, cache = engine.forward(step_ids, step_pos, mask, cache)
        steps.append(logits)
    assert cache.batch == 2 and cache.length == 17
    for row, (prompt, more) in enumerate(((a, follow[0]), (b, follow[1]))):
        single = teacher_forced_logits(engine, list(prompt) + [more[0]], list(more[1:]) + [0])
        np.testing.assert_allclose(np.stack([s[row] for s in steps]), single, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_refuses_a_mask_that_does_not_match_the_cache(fp32_bundle, backend):
    engine = load_model(fp32_bundle, backend).engine
    cache = engine.new_cache()
    engine.forward(np.array([[1, 2, 3]]), np.arange(3)[None], np.ones((1, 3), np.int64), cache)
    with pytest.raises(ValueError, match="3 positions"):
        engine.forward(np.array([[4]]), np.array([[3]]), np.ones((1, 3), np.int64), cache)
    with pytest.raises(ValueError, match="1 row"):
        engine.forward(np.array([[4], [5]]), np.array([[3], [3]]), np.ones((2, 4), np.int64), cache)
