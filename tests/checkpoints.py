"""Tiny GlmForCausalLM checkpoints written by transformers itself (the independent reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def hf_checkpoint(path: Path, *, dtype=torch.float32, max_shard_size=None, legacy_rope=False, seed=0,
                  **overrides) -> Path:
    """Write a random GlmForCausalLM checkpoint with transformers' own `save_pretrained`."""
    from transformers import GlmConfig, GlmForCausalLM

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, max_position_embeddings=512,
              pad_token_id=None, eos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GlmForCausalLM(GlmConfig(**kw)).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that mistakes show in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kw)
    if legacy_rope:  # the layout of older GLM-Edge configs: rope fields at the top level
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"], cfg["partial_rotary_factor"] = rope["rope_theta"], rope["partial_rotary_factor"]
        (path / "config.json").write_text(json.dumps(cfg))
    return path
