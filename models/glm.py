"""The GLM decoder (`GlmForCausalLM`) in PyTorch: the factory's reference model.

Parameter names equal the Hugging Face ones, so a checkpoint's state dict loads as it is.
Rotary embedding rotates the first `rotary_dim` dims of each head in interleaved pairs
(dims 2i and 2i+1 form one complex number), not in NeoX halves.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import GlmConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: GlmConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per rotated pair: positions (B, T) -> (B, T, rotary_dim // 2) each."""
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    angles = positions.float()[..., None] * inv_freq  # (B, T, rot/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the first rotary dims. x: (B, nh, T, hs); cos, sin: (B, T, rot/2)."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot[..., 0::2], x_rot[..., 1::2]  # (B, nh, T, rot/2)
    c, s = cos[:, None], sin[:, None]  # (B, 1, T, rot/2)
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)  # (B, nh, T, rot)
    return torch.cat((rotated, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GlmConfig):
        super().__init__()
        self.cfg = cfg
        nh, nkv, hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hs, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hs, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hs, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hs, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, past=None):
        B, T, _ = x.shape
        cfg = self.cfg
        hs = cfg.head_dim
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # (B, nkv, P+T, hs)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        P = k.shape[2] - T
        k = k.repeat_interleave(cfg.group_size, dim=1)  # (B, nh, P+T, hs)
        v = v.repeat_interleave(cfg.group_size, dim=1)
        # query i sees keys 0..P+i
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, cfg.num_attention_heads * hs)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: GlmConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, ffn) each
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GlmConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, past=None):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class GlmBackbone(nn.Module):
    def __init__(self, cfg: GlmConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GlmForCausalLM(nn.Module):
    def __init__(self, cfg: GlmConfig):
        super().__init__()
        self.config = cfg
        self.model = GlmBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, past=None, start_pos: int = 0):
        """input_ids (B, T) -> logits (B, T, vocab), and the per-layer (k, v) cache."""
        B, T = input_ids.shape
        positions = torch.arange(start_pos, start_pos + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(self.config, positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, None if past is None else past[i])
            presents.append(present)
        return self.lm_head(self.model.norm(x)), presents

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, recomputing the whole sequence each step (no cache: a plain reference)."""
        ids = list(prompt_ids)
        for _ in range(max_new_tokens):
            logits, _ = self(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
        return ids[len(prompt_ids):]
