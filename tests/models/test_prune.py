"""Structured pruning: exact on structures that contribute nothing, standard checkpoints, clear errors."""

from __future__ import annotations

import re

import pytest
import torch

from checkpoints import hf_checkpoint
from models.checkpoint import load_checkpoint, save_checkpoint
from models.prune import (
    PruneError, PruneSpec, activation_importance, magnitude_importance, non_embedding_params, prune_model,
    solve_spec,
)

SHAPE = dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=96)


def _model(tmp_path, **overrides):
    """A transformers-written random GLM (non-trivial biases and norms) loaded by our loader."""
    _, model = load_checkpoint(hf_checkpoint(tmp_path / "teacher", **{**SHAPE, **overrides}))
    return model


def _ids(n=4, seq=24, seed=1):
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@torch.no_grad()
def _silence(model, dead_channels, dead_group, identity_layer):
    """Zero, per layer, some FFN channels (down_proj columns) and one KV group (its o_proj columns),
    and make one layer the identity (o_proj and down_proj zero)."""
    cfg = model.config
    width = cfg.group_size * cfg.head_dim
    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.weight[:, dead_channels[i]] = 0.0
        g = dead_group[i]
        layer.self_attn.o_proj.weight[:, g * width:(g + 1) * width] = 0.0
    layer = model.model.layers[identity_layer]
    layer.self_attn.o_proj.weight.zero_()
    layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("tied", [False, True])
def test_silent_structures_are_pruned_without_changing_the_logits(tmp_path, method, tied):
    model = _model(tmp_path, tie_word_embeddings=tied)
    gen = torch.Generator().manual_seed(7)
    dead = [torch.randperm(96, generator=gen)[:40] for _ in range(3)]  # different channels in every layer
    _silence(model, dead, dead_group=[2, 0, 1], identity_layer=1)
    ids = _ids()
    importance = activation_importance(model, _ids(seed=2)) if method == "activation" else magnitude_importance(model)
    pruned = prune_model(model, PruneSpec(num_layers=2, intermediate_size=56, num_key_value_heads=2), importance)
    cfg = pruned.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads) == \
        (2, 56, 2, 4)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (64, 56)
    assert (_logits(pruned, ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_pruning_a_live_structure_changes_the_logits(tmp_path):
    """The exactness above is not a tautology: removing one channel that is used does change them."""
    model = _model(tmp_path)
    ids = _ids()
    pruned = prune_model(model, PruneSpec(intermediate_size=95), magnitude_importance(model))
    assert (_logits(pruned, ids) - _logits(model, ids)).abs().max().item() > 1e-4


def test_block_influence_ranks_an_identity_layer_first(tmp_path):
    model = _model(tmp_path)
    _silence(model, [torch.tensor([], dtype=torch.long)] * 3, dead_group=[0, 0, 0], identity_layer=2)
    with torch.no_grad():  # undo the group zeroing of the other layers: only layer 2 is silent
        ref = _model(tmp_path / "again")
        for i in (0, 1):
            model.model.layers[i].load_state_dict(ref.model.layers[i].state_dict())
    importance = activation_importance(model, _ids(seed=3))
    assert importance.layer_ranking()[0] == 2
    assert abs(importance.layers[2].item()) <= 1e-6
    assert importance.layers[0].item() > 1e-3 and importance.layers[1].item() > 1e-3


@torch.no_grad()
def test_activation_importance_sees_a_channel_the_data_never_drives(tmp_path):
    """A channel with the largest weights that reads only a hidden dim the norm zeroes: magnitude keeps
    it first, activations score it 0; pruning by activations is exact, by magnitude it is not."""
    model = _model(tmp_path, num_hidden_layers=1)
    layer = model.model.layers[0]
    layer.post_attention_layernorm.weight[5] = 0.0
    w = layer.mlp.gate_up_proj.weight  # rows 0..95 gate, 96..191 up
    for row in (17, 96 + 17):
        w[row] = 0.0
        w[row, 5] = 50.0
    layer.mlp.down_proj.weight[:, 17] *= 10.0
    act, mag = activation_importance(model, _ids(seed=4)), magnitude_importance(model)
    assert act.ffn[0, 17].item() == 0.0
    assert int(mag.ffn[0].argmax()) == 17
    ids, spec = _ids(), PruneSpec(intermediate_size=95)
    assert (_logits(prune_model(model, spec, act), ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    assert (_logits(prune_model(model, spec, mag), ids) - _logits(model, ids)).abs().max().item() > 1e-4


@pytest.mark.parametrize("tied,bias", [(False, True), (True, False)])
def test_pruned_checkpoint_loads_in_transformers_and_matches(tmp_path, tied, bias):
    from transformers import GlmForCausalLM

    model = _model(tmp_path, tie_word_embeddings=tied, attention_bias=bias)
    pruned = prune_model(model, PruneSpec(2, 40, 1), activation_importance(model, _ids(seed=5)))
    path = save_checkpoint(pruned, tmp_path / "pruned")
    ids = _ids(n=2, seq=19)
    ref = GlmForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert (ref.config.num_hidden_layers, ref.config.intermediate_size, ref.config.num_key_value_heads,
            ref.config.num_attention_heads) == (2, 40, 1, 2)
    with torch.no_grad():
        hf = ref(ids).logits
    assert (_logits(pruned, ids) - hf).abs().max().item() <= 1e-4
    _, loaded = load_checkpoint(path)
    assert (_logits(loaded, ids) - hf).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=False, tie_word_embeddings=True)])
def test_non_embedding_params_counts_the_model(tmp_path, overrides):
    model = _model(tmp_path, **overrides)
    counted = sum(p.numel() for n, p in model.named_parameters()
                  if n not in ("model.embed_tokens.weight", "lm_head.weight"))
    assert non_embedding_params(model) == non_embedding_params(model.config) == counted


@pytest.mark.parametrize("fraction,multiple_of", [(0.5, 1), (0.6, 16), (0.4, 8)])
def test_solve_spec_gives_the_largest_ffn_within_the_fraction(tmp_path, fraction, multiple_of):
    model = _model(tmp_path)
    spec = solve_spec(model.config, fraction, num_layers=2, multiple_of=multiple_of)
    assert spec.intermediate_size % multiple_of == 0
    pruned = prune_model(model, spec, magnitude_importance(model))
    teacher = non_embedding_params(model)
    counted = sum(p.numel() for n, p in pruned.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert counted <= fraction * teacher
    bigger = PruneSpec(2, spec.intermediate_size + multiple_of).target_config(model.config)
    assert non_embedding_params(bigger) > fraction * teacher


@pytest.mark.parametrize("spec,message", [
    (PruneSpec(num_key_value_heads=0), "num_key_value_heads=0 is out of range: keep 1..3 KV groups"),
    (PruneSpec(num_key_value_heads=4), "num_key_value_heads=4 is out of range: keep 1..3"),
    (PruneSpec(num_layers=4), "num_layers=4 is out of range: keep 1..3 decoder layers"),
    (PruneSpec(num_layers=0), "num_layers=0 is out of range"),
    (PruneSpec(intermediate_size=0), "intermediate_size=0 is out of range: keep 1..96 FFN channels"),
    (PruneSpec(intermediate_size=97), "intermediate_size=97 is out of range: keep 1..96"),
    (PruneSpec(num_attention_heads=3), "num_attention_heads=3 must be a positive multiple of 2"),
    (PruneSpec(num_attention_heads=8), "num_attention_heads=8 is more than the teacher's 6"),
    (PruneSpec(num_key_value_heads=2, num_attention_heads=2), "num_attention_heads=2 disagrees with num_key_value_heads=2"),
    (PruneSpec(intermediate_size=2.5), "intermediate_size=2.5 is out of range"),
])
def test_bad_specs_error_naming_the_setting_and_range(tmp_path, spec, message):
    model = _model(tmp_path)
    with pytest.raises(PruneError, match="^prune spec: " + message.replace("(", r"\(").replace(".", r"\.")):
        prune_model(model, spec, magnitude_importance(model))


@pytest.mark.parametrize("fraction, multiple_of, message", [
    (1.5, 1, "target_fraction=1.5 is out of range: must be a number > 0 and <= 1"),
    (float("nan"), 1, "target_fraction=nan is out of range"),
    ("0.5", 1, "target_fraction='0.5' is out of range"),
    (0.5, 0, "multiple_of=0 is out of range: must be an integer >= 1"),
    # larger than the teacher's FFN: was "target_fraction=1.0 is unreachable ... allowed 1.664..1.0"
    (1.0, 100000, "multiple_of=100000 is out of range: allowed 1.."),
])
def test_solve_spec_refuses_a_fraction_or_grain_out_of_range(tmp_path, fraction, multiple_of, message):
    """solve_spec(cfg, 1.5) quietly gave the teacher's width, NaN a ValueError, multiple_of=0 a
    ZeroDivisionError."""
    model = _model(tmp_path)
    with pytest.raises(PruneError, match="^prune: " + re.escape(message)):
        solve_spec(model.config, fraction, multiple_of=multiple_of)


def test_unreachable_fraction_and_foreign_importance_error(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(PruneError, match=r"target_fraction=0\.05 is unreachable .* allowed 0\.\d+\.\.1\.0"):
        solve_spec(model.config, 0.05)
    other = _model(tmp_path / "other", intermediate_size=64)
    with pytest.raises(PruneError, match=r"ffn has shape \(3, 64\), but the model needs \(3, 96\)"):
        prune_model(model, PruneSpec(intermediate_size=32), magnitude_importance(other))
