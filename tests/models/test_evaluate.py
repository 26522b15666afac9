"""Evaluation: perplexity and top-1 against transformers, and the INT8 bundle through the real runtime."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.data import DataError
from models.evaluate import (evaluate_bundle, evaluate_model, format_report, heldout_windows, report_dict,
                             teacher_reference)
from models.tiny import HELDOUT_MODULES, corpus_text

SEQ = 32


@pytest.fixture(scope="module")
def model(trained_checkpoint):
    return load_checkpoint(trained_checkpoint)[1]


@pytest.fixture(scope="module")
def windows(trained_checkpoint) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_checkpoint / "tokenizer.json"))
    return heldout_windows(tok.encode(corpus_text(HELDOUT_MODULES)).ids, SEQ, max_tokens=8 * SEQ)


def test_windows_are_consecutive_slices_of_the_text():
    ids = list(range(100))
    w = heldout_windows(ids, 10, max_tokens=45)
    assert w.shape == (4, 11)
    assert w[1].tolist() == list(range(10, 21))
    with pytest.raises(DataError, match="shorter than one evaluation window of seq_len \\+ 1 = 11"):
        heldout_windows(list(range(10)), 10)


def test_perplexity_and_top1_agree_with_transformers(model, windows, trained_checkpoint):
    from transformers import GlmForCausalLM

    hf = GlmForCausalLM.from_pretrained(trained_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=windows, labels=windows)  # transformers shifts the labels itself
    hf_top1 = (out.logits[:, :-1].argmax(-1) == windows[:, 1:]).float().mean()
    ours = evaluate_model(model, windows)
    assert ours.tokens == windows.shape[0] * SEQ
    assert ours.perplexity == pytest.approx(float(out.loss.exp()), rel=1e-4)
    assert ours.top1 == pytest.approx(float(hf_top1), abs=1.5 / ours.tokens)  # at most one near-tie flips
    assert ours.params == sum(p.numel() for p in hf.parameters())
    assert ours.non_embedding_params == sum(p.numel() for n, p in hf.named_parameters()
                                            if "embed_tokens" not in n and "lm_head" not in n)
    assert ours.bytes == 4 * ours.params


def test_teacher_columns_are_agreement_and_kl(model, windows):
    ref = teacher_reference(model, windows)
    itself = evaluate_model(model, windows, ref)
    assert itself.teacher_agreement == 1.0 and itself.kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    cooler = copy.deepcopy(model)
    with torch.no_grad():
        cooler.lm_head.weight.mul_(0.5)  # same argmax everywhere, flatter distribution
    s = evaluate_model(cooler, windows, ref)
    assert s.teacher_agreement == 1.0 and s.top1 == itself.top1
    assert s.kl_to_teacher > 0.01 and s.perplexity != pytest.approx(itself.perplexity)


def test_evaluation_reports_its_progress_window_by_window(model, windows, fp32_bundle):
    """A build's evaluate and export stages showed no progress of their own: the bundles are scored one token at
    a time (hours for a large model and held-out set); each pass now reports the windows it scored."""
    seen_model, seen_bundle = [], []
    evaluate_model(model, windows, on_windows=seen_model.append)
    evaluate_bundle(fp32_bundle, windows[:3], backend="onnxruntime", decode_tokens=0, on_windows=seen_bundle.append)
    assert sum(seen_model) == len(windows) and all(n > 0 for n in seen_model)
    assert seen_bundle == [1, 1, 1]


def test_fp32_bundle_through_the_runtime_matches_pytorch(model, windows, fp32_bundle):
    ref = teacher_reference(model, windows[:4])
    torch_stage = evaluate_model(model, windows[:4], ref)
    bundle_stage = evaluate_bundle(fp32_bundle, windows[:4], ref, backend="onnxruntime", decode_tokens=8)
    assert bundle_stage.perplexity == pytest.approx(torch_stage.perplexity, rel=1e-4)
    assert bundle_stage.teacher_agreement >= 1 - 1.5 / bundle_stage.tokens
    assert bundle_stage.params == torch_stage.params
    assert bundle_stage.non_embedding_params == torch_stage.non_embedding_params


def test_the_decode_speed_probe_stays_inside_the_context_window(windows, fp32_bundle):
    """16 prompt tokens + `decode_tokens` steps ran past a short context window: ONNX Runtime failed in the
    export stage, after the distillation. The probe now stops at the window's end (4096 positions here)."""
    stage = evaluate_bundle(fp32_bundle, windows[:1], backend="onnxruntime", decode_tokens=4100)
    assert stage.decode_tokens_per_s > 0


def test_int8_bundle_agrees_with_the_fp32_model(model, windows, int8_bundle):
    ref = teacher_reference(model, windows)
    fp32 = evaluate_model(model, windows, ref, name="fp32")
    int8 = evaluate_bundle(int8_bundle, windows, ref, backend="onnxruntime", decode_tokens=16)
    assert int8.kind == "bundle onnxruntime int8-per-channel-u8"
    assert abs(int8.perplexity / fp32.perplexity - 1) <= 0.02
    assert abs(int8.top1 - fp32.top1) <= 0.02
    assert int8.teacher_agreement >= 0.9 and int8.kl_to_teacher < 0.02
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    assert int8.bytes == sum(f["size"] for f in manifest["files"] if f["path"].startswith("onnxruntime/"))
    assert int8.bytes < fp32.bytes
    assert int8.decode_tokens_per_s > 0

    table = format_report([fp32, int8])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| fp32 |") and "int8-per-channel-u8" in lines[3]
    assert json.loads(json.dumps(report_dict([fp32, int8])))["stages"][1]["name"] == "int8"


def test_a_bundle_without_the_backend_is_a_clear_error(windows, int8_bundle, tmp_path):
    import shutil

    from bundles import variant
    from ota.signing import generate_keypair, load_private_key

    key = load_private_key(generate_keypair(tmp_path / "keys", "k").private_path)
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    only_ov = {k: v for k, v in manifest["backends"].items() if k == "openvino"}
    copy = variant(int8_bundle, tmp_path / "ov-only", key, backends=only_ov)
    with pytest.raises(DataError, match="has no 'onnxruntime' model; it carries: openvino"):
        evaluate_bundle(copy, windows[:1], backend="onnxruntime")
    shutil.rmtree(copy)
