"""Exported bundles through real ONNX Runtime and OpenVINO against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.model import load_model
from models.tiny import HELDOUT_MODULES, corpus_text
from runtime.generate import SamplingParams, generate
from runtime.golden import teacher_forced_logits

BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def hf_model(trained_checkpoint):
    from transformers import GlmForCausalLM

    return GlmForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_ids(fp32_bundle):
    model = load_model(fp32_bundle, "onnxruntime")
    return model.tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_greedy_equals_transformers(fp32_bundle, hf_model, backend, heldout_ids):
    model = load_model(fp32_bundle, backend)
    for start in (0, 700, 1500):  # three prompts from held-out text
        prompt = heldout_ids[start:start + 24]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
        ours = list(generate(model.engine, prompt, SamplingParams(max_tokens=32)))
        assert ours == ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_equals_full_recomputation(fp32_bundle, backend, heldout_ids):
    model = load_model(fp32_bundle, backend)
    engine, arch = model.engine, model.arch
    seq = np.asarray(heldout_ids[100:140], dtype=np.int64)

    def full(n):  # recompute the whole sequence without a cache
        logits, _ = engine.forward(seq[None, :n], np.arange(n)[None], np.ones((1, n), np.int64), engine.new_cache())
        return logits[0]

    cached = teacher_forced_logits(engine, seq[:10].tolist(), seq[10:].tolist())
    recomputed = np.stack([full(n) for n in range(10, 40)])
    np.testing.assert_allclose(cached, recomputed, atol=1e-4)
    # a multi-token chunk on top of a cache (chunked prefill) is the same as well
    _, cache = engine.forward(seq[None, :20], np.arange(20)[None], np.ones((1, 20), np.int64), engine.new_cache())
    logits, cache = engine.forward(seq[None, 20:30], np.arange(20, 30)[None], np.ones((1, 30), np.int64), cache)
    np.testing.assert_allclose(logits[0], full(30), atol=1e-4)
    assert cache.length == 30 and cache.batch == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_top1_agrees_with_fp32_on_heldout_text(fp32_bundle, int8_bundle, backend, heldout_ids):
    seq = heldout_ids[2000:2257]
    ref = teacher_forced_logits(load_model(fp32_bundle, backend).engine, seq[:1], seq[1:]).argmax(-1)
    q = teacher_forced_logits(load_model(int8_bundle, backend).engine, seq[:1], seq[1:]).argmax(-1)
    agreement = float((ref == q).mean())
    assert agreement >= 0.95, f"{backend}: INT8 top-1 agrees with fp32 on {agreement:.1%} of 256 held-out tokens"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_bundle_passes_its_golden_check(int8_bundle, backend):
    result = load_model(int8_bundle, backend).golden_check()
    assert result.passed, result.describe()
    assert result.steps == 32


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_left_padded_batch_equals_single_rows(request, precision, heldout_ids):
    """Padding positions are masked: a row's logits do not depend on its batch neighbours. The int8
    prompts run on the W8A8 prefill graph, whose activations are quantized per token (a per-tensor
    scale would let one row's values change another's rounding)."""
    model = load_model(request.getfixturevalue(f"{precision}_bundle"), "onnxruntime")
    engine = model.engine
    engine.prefill_min_rows = 2  # int8: every multi-token step runs on the prefill graph
    a, b = heldout_ids[:12], [x * 3 % 500 + 3 for x in heldout_ids[50:57]]  # b: larger, unrelated ids
    ids = np.array([a, [0] * 5 + b], dtype=np.int64)
    mask = np.array([[1] * 12, [0] * 5 + [1] * 7], dtype=np.int64)
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    logits, _ = engine.forward(ids, pos, mask, engine.new_cache(2))
    for row, prompt in enumerate((a, b)):
        single, _ = engine.forward(np.array([prompt]), np.arange(len(prompt))[None],
                                   np.ones((1, len(prompt)), np.int64), engine.new_cache())
        np.testing.assert_allclose(logits[row], single[0], atol=1e-4)
