"""The PyTorch reference and loader against transformers' GlmForCausalLM on checkpoints it wrote."""

from __future__ import annotations

import json
import re

import pytest
import torch

from checkpoints import hf_checkpoint
from models.checkpoint import load_checkpoint
from models.errors import CheckpointError

SHAPES = {
    "gqa2-rot0.5": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5),
    "mqa-rot1.0-tied-sharded": dict(num_attention_heads=6, num_key_value_heads=1, head_dim=24,
                                    partial_rotary_factor=1.0, tie_word_embeddings=True, max_shard_size="60KB"),
    "mha-rot0.25-legacy-rope": dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                                    partial_rotary_factor=0.25, legacy_rope=True, rope_theta=500.0),
    "gqa4-nobias-3layers": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12, num_hidden_layers=3,
                                partial_rotary_factor=0.5, attention_bias=False, rms_norm_eps=1e-5),
}


def _reference_logits(path, ids):
    from transformers import GlmForCausalLM

    ref = GlmForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(tmp_path, shape):
    path = hf_checkpoint(tmp_path / shape, **SHAPES[shape])
    if "max_shard_size" in SHAPES[shape]:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))
    _, model = load_checkpoint(path)
    with torch.no_grad():
        ours, _ = model(ids)
    assert (ours - _reference_logits(path, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_fp32(tmp_path, dtype):
    path = hf_checkpoint(tmp_path / "half", dtype=dtype)
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    _, model = load_checkpoint(path)
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        ours, _ = model(ids)
    assert (ours - _reference_logits(path, ids)).abs().max().item() <= 1e-4


def test_kv_cache_matches_full_sequence(tmp_path):
    _, model = load_checkpoint(hf_checkpoint(tmp_path / "c"))
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
        logits, past = model(ids[:, :7])
        steps = [logits[:, -1]]
        for t in range(7, 12):
            logits, past = model(ids[:, t:t + 1], past=past, start_pos=t)
            steps.append(logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - full[:, 6:11]).abs().max() <= 1e-5


# --- bad checkpoints: one clear error naming the file ---------------------------------------

def test_unsupported_model_type(tmp_path):
    path = hf_checkpoint(tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='llama' is not supported"):
        load_checkpoint(path)


def test_missing_shard(tmp_path):
    path = hf_checkpoint(tmp_path / "c", max_shard_size="60KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard.*not found.*{victim.name}"):
        load_checkpoint(path)


def test_shape_disagrees_with_config(tmp_path):
    path = hf_checkpoint(tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj"
                                              r"\.weight' has shape \(64, 96\), but config\.json implies \(64, 128\)"):
        load_checkpoint(path)


def test_truncated_weights(tmp_path):
    path = hf_checkpoint(tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted or truncated"):
        load_checkpoint(path)


def test_missing_weights_file(tmp_path):
    path = hf_checkpoint(tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(path)


@pytest.mark.parametrize("value,dtype", [(float("nan"), torch.float32), (float("inf"), torch.float16)])
def test_a_non_finite_weight_is_refused_naming_the_tensor(tmp_path, value, dtype):
    """A NaN or inf weight (a diverged run, an fp16 overflow) used to load, export and pass the golden check."""
    from safetensors.torch import load_file, save_file

    path = hf_checkpoint(tmp_path / "c", dtype=dtype)
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = value
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"
                                              r" holds 1 non-finite value\(s\) \(NaN or inf\)"):
        load_checkpoint(path)


# --- RoPE settings: read as transformers' GlmConfig reads them, or refused in one line ------------------------

PLAIN = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
ROPE_CASES = {  # config.json's rope keys -> None (read as transformers reads it) or the refusal's fragment
    "linear rope_scaling beside rope_parameters": (
        dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_parameters=PLAIN),
        "rope_scaling = {'rope_type': 'linear', 'factor': 4.0}: RoPE scaling 'linear' is not supported"),
    "dynamic rope_scaling, older layout": (
        dict(rope_scaling={"type": "dynamic", "factor": 4.0}, rope_theta=10000.0, partial_rotary_factor=0.5),
        "rope_scaling = {'type': 'dynamic', 'factor': 4.0}: RoPE scaling 'dynamic' is not supported"),
    "yarn rope_parameters": (
        dict(rope_parameters={**PLAIN, "rope_type": "yarn", "factor": 4.0}),
        "rope_parameters = {'rope_type': 'yarn', 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5, 'factor': "
        "4.0}: RoPE scaling 'yarn' is not supported"),
    "rope_scaling with a factor and no type": (
        dict(rope_scaling={"factor": 4.0}, rope_parameters=PLAIN),
        "rope_scaling = {'factor': 4.0}: a scaling factor without a rope_type"),
    "rope_scaling and rope_parameters disagree": (
        dict(rope_scaling={"rope_type": "default", "rope_theta": 500.0}, rope_parameters=PLAIN),
        "disagree on rope_theta (500.0 as transformers reads it"),
    "rope_scaling without a type, older layout": (
        dict(rope_scaling={"rope_theta": 500.0}, partial_rotary_factor=0.25), None),
    "rope_scaling and rope_parameters agree": (
        dict(rope_scaling={"type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25},
             rope_parameters={"rope_type": "default", "rope_theta": 500, "partial_rotary_factor": 0.25}), None),
    "empty rope_scaling beside rope_parameters": (
        dict(rope_scaling={}, rope_parameters={**PLAIN, "rope_theta": 500.0}), None),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_settings_are_read_as_transformers_reads_them_or_refused(tmp_path, case):
    """transformers' GlmForCausalLM is the reference: a rope_scaling beside rope_parameters used to be ignored
    (rope_parameters won), so a linear or differently-based RoPE was exported as the plain one: wrong logits."""
    keys, refused = ROPE_CASES[case]
    path = hf_checkpoint(tmp_path / "c", max_position_embeddings=16, initializer_range=0.1)  # logits ~ 3
    cfg = json.loads((path / "config.json").read_text())
    plain = _reference_logits(path, ids := torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(4)))
    cfg.pop("rope_parameters")
    cfg.update(keys)
    (path / "config.json").write_text(json.dumps(cfg))
    reference = _reference_logits(path, ids)  # 48 positions: past max_position_embeddings, where dynamic scales
    if refused is None:
        _, model = load_checkpoint(path)
        with torch.no_grad():
            ours, _ = model(ids)
        assert (ours - reference).abs().max().item() <= 1e-4
        assert (plain - reference).abs().max().item() > 0.1  # a rope_theta of 500 (and a partial factor) shows
        return
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path / 'config.json'}: ") and "\n" not in message and refused in message, message
    if "factor and no type" in case:  # transformers >= 5 runs it unscaled, ignoring the factor
        assert (plain - reference).abs().max().item() <= 1e-5
    else:  # what the scaling (or the other theta) does to transformers' logits, which reading it unscaled lost
        assert (plain - reference).abs().max().item() > 0.1


def test_a_config_without_num_key_value_heads_reads_as_transformers_reads_it(tmp_path):
    """transformers' GlmConfig takes an absent num_key_value_heads as 2; the reader took num_attention_heads (the
    rule of other architectures) and failed on the weights' shapes. An explicit null is refused in one line."""
    import json

    path = hf_checkpoint(tmp_path / "nokv", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(3))
    _, model = load_checkpoint(path)
    with torch.no_grad():
        ours, _ = model(ids)
    assert (ours - _reference_logits(path, ids)).abs().max().item() <= 1e-4
    cfg["num_key_value_heads"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_key_value_heads = null: must be a whole number"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_weight_value_is_checked_a_piece_at_a_time_naming_the_shard_and_tensor(tmp_path, monkeypatch, dtype):
    """A NaN or inf was found only when the whole model was loaded (for `edgeglm build`: at the prune stage, after
    tokenizing); `check_weight_values` reads each file once, a piece at a time, and names the file and tensor."""
    import models.checkpoint
    from safetensors.torch import load_file, save_file

    from models.checkpoint import check_weight_values

    path = hf_checkpoint(tmp_path / "c", dtype=dtype, max_shard_size="60KB")
    monkeypatch.setattr(models.checkpoint, "SCAN_BYTES", 4096)  # tensors span many pieces (64 MiB in real use)
    seen = []
    check_weight_values(path, progress=seen.append)  # a clean checkpoint passes
    assert max(seen) <= 4096 and sum(seen) == sum(p.stat().st_size for p in path.glob("*.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.gate_up_proj.weight"  # (192, 64): 12 or 24 pieces of 4096 bytes
    shard = path / index[name]
    state = load_file(shard)
    state[name][150, 3] = float("inf")  # far into the tensor: not in its first piece
    state[name][190, 60] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{re.escape(name)}' holds 2 non-finite "
                                              r"value\(s\) \(NaN or inf\)"):
        check_weight_values(path)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_a_half_precision_teacher_is_reported_at_its_stored_size(tmp_path, dtype, name):
    """A bf16 or fp16 teacher is scored in fp32: the build's report named it "pytorch fp32" at twice its size on
    disk, which made the bundle's compression look twice as good. The size is the weights' as stored, counted by
    transformers (tied lm_head once), and the kind names the stored dtype."""
    from transformers import GlmForCausalLM

    from models.build import Evaluator, evaluate_stages
    from models.checkpoint import save_checkpoint, stored_weights
    from models.data import corpus_from_ids
    from models.recipe import load_recipe

    path = hf_checkpoint(tmp_path / "t", dtype=dtype, tie_word_embeddings=True, max_shard_size="60KB")
    ref = GlmForCausalLM.from_pretrained(path, dtype=dtype)
    stored = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert stored_weights(path, load_checkpoint(path)[0]) == (name, stored)

    cfg, teacher = load_checkpoint(path)
    work = tmp_path / "work"
    for stage in ("pruned", "distilled"):
        save_checkpoint(teacher, work / stage)
    recipe = load_recipe("quick")
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"seq_len": 16, "heldout_tokens": 64})})
    heldout = corpus_from_ids(list(range(1, 200)), tmp_path / "tokens")
    stages = evaluate_stages(Evaluator(recipe, teacher, heldout), teacher, work, path)
    assert stages["teacher"]["bytes"] == stored
    assert stages["teacher"]["kind"] == ("pytorch fp32" if name == "fp32" else f"pytorch fp32 (stored {name})")
    assert stages["distilled"]["bytes"] == sum(p.numel() * 4 for p in ref.parameters())  # written in fp32
