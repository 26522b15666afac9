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
def test_a_batch_row_equals_the_row_alone_and_left_padded_prompts_are_refused(request, precision, heldout_ids):
    """A row's logits do not depend on its batch neighbours. The int8 prompts run on the W8A8 prefill graph,
    whose activations are quantized per token (a per-tensor scale would let one row's values change another's
    rounding). A left-padded prompt batch is refused: GroupQueryAttention rotates a prompt from each row's
    first position, so the padded row would be computed at the wrong positions."""
    model = load_model(request.getfixturevalue(f"{precision}_bundle"), "onnxruntime")
    engine = model.engine
    engine.prefill_min_rows = 2  # int8: every multi-token step runs on the prefill graph
    a, b = heldout_ids[:12], [x * 3 % 500 + 3 for x in heldout_ids[50:62]]  # b: larger, unrelated ids
    logits, _ = engine.forward(np.array([a, b]), np.stack([np.arange(12)] * 2), np.ones((2, 12), np.int64),
                               engine.new_cache(2))
    for row, prompt in enumerate((a, b)):
        single, _ = engine.forward(np.array([prompt]), np.arange(len(prompt))[None],
                                   np.ones((1, len(prompt)), np.int64), engine.new_cache())
        np.testing.assert_allclose(logits[row], single[0], atol=1e-4)
    mask = np.array([[1] * 12, [0] * 5 + [1] * 7], dtype=np.int64)
    with pytest.raises(ValueError, match="left-padded prompt batch"):
        engine.forward(np.array([a, [0] * 5 + b[:7]]), np.maximum(mask.cumsum(1) - 1, 0), mask, engine.new_cache(2))


def _fused_graph_ops(bundle) -> tuple[set[str], dict[str, str], list[int]]:
    import onnx

    model = onnx.load(str(bundle / "onnxruntime" / "model.onnx"), load_external_data=False)
    rotary = [next(a.i for a in n.attribute if a.name == "do_rotary") for n in model.graph.node
              if n.op_type == "GroupQueryAttention"]
    return {n.op_type for n in model.graph.node}, {p.key: p.value for p in model.metadata_props}, rotary


def test_both_rotary_forms_of_the_fused_graph_follow_transformers(trained_checkpoint, int8_bundle, hf_model,
                                                                  heldout_ids, tmp_path, monkeypatch):
    """The fused graphs rotate q and k inside GroupQueryAttention (constant cos/sin tables of every position)
    unless the context window is longer than GQA_ROTARY_MAX_POSITIONS, where they keep RotaryEmbedding nodes;
    both answer like transformers, and only the first refuses a left-padded prompt batch."""
    import models.export as export
    from runtime.engine import ROTARY_KEY

    ops, meta, rotary = _fused_graph_ops(int8_bundle)
    assert "RotaryEmbedding" not in ops and set(rotary) == {1} and meta[ROTARY_KEY] == "from-row-start"
    monkeypatch.setattr(export, "GQA_ROTARY_MAX_POSITIONS", 64)  # the tiny model's window is longer
    out = tmp_path / "nodes"
    export.export_bundle(trained_checkpoint, out, export.ExportOptions(precision="int8", name="tiny",
                                                                       version="1.0.0"), show_progress=False)
    ops, meta, rotary = _fused_graph_ops(out)
    assert "RotaryEmbedding" in ops and set(rotary) == {0} and ROTARY_KEY not in meta
    prompt, more = heldout_ids[900:924], heldout_ids[924:932]
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt + more])).logits[0, len(prompt) - 1:].numpy()  # the prompt, then steps
    for bundle in (int8_bundle, out):
        engine = load_model(bundle, "onnxruntime").engine
        ours = teacher_forced_logits(engine, prompt, more)
        cos = (ours * ref[:len(ours)]).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref[:len(ours)], axis=1)
        assert cos.min() > 0.998 and (ours.argmax(1) == ref[:len(ours)].argmax(1)).mean() >= 0.85, (bundle.name, cos)
    mask = np.array([[1] * 12, [0] * 5 + [1] * 7], dtype=np.int64)
    ids = np.array([prompt[:12], [0] * 5 + prompt[:7]])
    engine.forward(ids, np.maximum(mask.cumsum(1) - 1, 0), mask, engine.new_cache(2))  # the nodes form takes it


OLD_ORT_REFUSAL = ("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: matmul_nbits.cc:146 "
                   "onnxruntime::contrib::MatMulNBits<T1>::MatMulNBits(const onnxruntime::OpKernelInfo&) [with T1 = "
                   "float] block_size_ == 16 || block_size_ == 32 || block_size_ == 64 || block_size_ == 128 || "
                   "block_size_ == 256 was false. Only block sizes 16, 32, 64, 128, and 256 are supported for "
                   "MatMulNBits op, got: 512")  # onnxruntime-gpu 1.31.1, word for word


def test_a_decode_graph_wider_than_an_older_onnx_runtime_takes_loads_there_with_its_blocks_split(
        trained_checkpoint, tmp_path, monkeypatch, caplog):
    """The exporter writes MatMulNBits blocks as wide as a weight's rows allow (512 here, up to 1024);
    ONNX Runtime before 1.32 (onnxruntime-gpu 1.31.1 among them) refuses blocks over 256, so glm-s and glm-m
    bundles did not load there at all (the GPU path neither: it read the decode graph's metadata through a
    session). The engine now loads such a graph with its blocks split (the same weight bytes, each scale
    repeated), with a warning, and it answers like transformers. That ONNX Runtime is not installed here: its
    refusal (its own message) is raised for graph files with wider blocks, and the split graph, which it would
    take, runs on the installed one."""
    import json
    import shutil

    import onnx
    import onnxruntime as ort
    from transformers import GlmForCausalLM

    from models.export import ExportOptions, export_bundle
    from runtime.engine import NARROW_BLOCK, takes_wide_blocks
    from tests.checkpoints import hf_checkpoint

    vocab = json.loads((trained_checkpoint / "config.json").read_text())["vocab_size"]
    ckpt = hf_checkpoint(tmp_path / "wide", vocab_size=vocab, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    for f in trained_checkpoint.glob("tokenizer*"):
        shutil.copy(f, ckpt / f.name)
    bundle = tmp_path / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(precision="int8", name="wide", version="1.0.0",
                                              backends=("onnxruntime",)), show_progress=False)

    def blocks(graph) -> list[int]:
        return [next(a.i for a in n.attribute if a.name == "block_size") for n in graph.node
                if n.op_type == "MatMulNBits"]
    assert max(blocks(onnx.load(str(bundle / "onnxruntime" / "model.onnx"), load_external_data=False).graph)) \
        > NARROW_BLOCK
    as_exported = load_model(bundle, "onnxruntime", prefill_graph=False).engine
    real, split, refused = ort.InferenceSession, [], []

    def older_onnx_runtime(model, *args, **kwargs):
        graph = onnx.load(model, load_external_data=False).graph if isinstance(model, str) else \
            onnx.load_from_string(model).graph
        if max(blocks(graph), default=0) > NARROW_BLOCK:
            refused.append(model)
            raise RuntimeError(OLD_ORT_REFUSAL)
        if not isinstance(model, str):
            split.append(blocks(graph))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(ort, "InferenceSession", older_onnx_runtime)
    with caplog.at_level("WARNING"):
        engine = load_model(bundle, "onnxruntime", prefill_graph=False).engine
    assert split and max(split[0]) == NARROW_BLOCK and "MatMulNBits blocks of up to 256" in caplog.text
    # a version said to take them (1.32 and later) splits them once refused; an older one up front
    assert len(refused) == (1 if takes_wide_blocks(ort.__version__) else 0)
    before = len(refused)
    monkeypatch.setattr(ort, "__version__", "1.31.1")  # an older one is not even asked to load them
    assert load_model(bundle, "onnxruntime", prefill_graph=False).engine is not None and len(refused) == before
    prompt = np.random.default_rng(0).integers(0, vocab, 24).tolist()
    more = np.random.default_rng(1).integers(0, vocab, 8).tolist()
    with torch.no_grad():
        ref = GlmForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()(
            torch.tensor([prompt + more])).logits[0, len(prompt) - 1:].numpy()
    for e in (as_exported, engine):
        ours = teacher_forced_logits(e, prompt, more)
        cos = (ours * ref[:len(ours)]).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref[:len(ours)], axis=1)
        assert cos.min() > 0.995, cos
    a, b = teacher_forced_logits(as_exported, prompt, more), teacher_forced_logits(engine, prompt, more)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # only the activations' int8 blocks differ
