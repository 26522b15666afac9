"""Structured pruning of a `GlmForCausalLM` into a smaller dense `GlmForCausalLM`.

Pruning removes whole structures, so the result is a standard checkpoint (transformers loads it,
our loader and exporter take it as they take any other) with smaller config numbers:

- FFN channels: channel j of a layer is row j of the gate half and row j of the up half of
  `gate_up_proj` and column j of `down_proj`;
- attention heads, by whole KV groups so grouped-query attention stays valid: group g is kv head
  g (rows of `k_proj`/`v_proj` and their biases) plus its `num_attention_heads / num_key_value_heads`
  query heads (rows of `q_proj` and its bias, the matching columns of `o_proj`);
- layers: whole decoder layers.

Sizes are uniform across layers (every layer keeps the same number of channels and groups, each
layer its own best ones), so the config stays a plain `GlmConfig`. Which structures are kept is
decided by an `Importance`:

- `activation_importance` runs the model on calibration token ids and scores
  an FFN channel by mean |silu(gate) * up| times the L2 norm of its `down_proj` column (its
  average contribution to the residual stream), a KV group by the mean L2 norm of its heads'
  attention output through `o_proj`, and a layer by its Block Influence (ShortGPT): 1 - mean
  cosine similarity of the layer's input and output hidden states. A layer whose output equals its
  input scores 0 and is removed first; a channel or group that contributes exactly nothing scores 0.
- `magnitude_importance` uses weights only (the baseline): a channel scores the product of the
  L2 norms of its gate row, up row and down column; a group the product of the norms of its
  value rows (with bias) and its `o_proj` columns; a layer the Frobenius norms of what it writes
  to the residual stream (`o_proj` + `down_proj`).

Interface (the build pipeline and the distillation code use exactly these):

    PruneSpec(num_layers: int | None, intermediate_size: int | None, num_key_value_heads: int | None,
              num_attention_heads: int | None = None)     None = keep the teacher's size
        .target_config(cfg, source="prune spec") -> GlmConfig    validates; PruneError if impossible
    Importance(method: str, ffn: Tensor (L, ffn), kv_groups: Tensor (L, kv_heads), layers: Tensor (L,))
    activation_importance(model, calib_ids: LongTensor (n, seq), batch_size=8, progress=None) -> Importance
    magnitude_importance(model) -> Importance
    prune_model(model, spec, importance) -> GlmForCausalLM   new smaller model (eval mode), standard GlmConfig
    non_embedding_params(model_or_config) -> int             parameters outside embed_tokens and lm_head
    solve_spec(cfg, fraction, num_layers=None, num_key_value_heads=None, multiple_of=1,
               source="prune") -> PruneSpec                   the largest uniform FFN size within the fraction

Importance is measured once on the model given; when layers are removed, the kept layers keep
their own width scores. `PruneError` (a `CheckpointError`: the CLI prints it and exits 2) names
the setting and its allowed range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.config import GlmConfig
from models.errors import CheckpointError
from models.glm import GlmForCausalLM


class PruneError(CheckpointError):
    """A pruning request cannot be met by this model (names the setting and the allowed range)."""


# --- what to keep ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneSpec:
    num_layers: int | None = None
    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    num_attention_heads: int | None = None  # optional; must be num_key_value_heads * the teacher's group size

    def target_config(self, cfg: GlmConfig, source: str = "prune spec") -> GlmConfig:
        """The pruned model's config; `PruneError` naming `source` and the range of every impossible size (all of
        them in one message, so that one fix of the recipe is enough)."""
        problems: list[str] = []

        def checked(check, *args):
            try:
                return check(*args)
            except PruneError as exc:
                problems.append(str(exc))

        layers = checked(_check_size, self.num_layers, cfg.num_hidden_layers, f"{source}: num_layers",
                         "decoder layers")
        ffn = checked(_check_size, self.intermediate_size, cfg.intermediate_size, f"{source}: intermediate_size",
                      "FFN channels per layer")
        kv = checked(self._kv_groups, cfg, source)
        if problems:
            raise PruneError("; ".join(problems))
        return dataclasses.replace(cfg, num_hidden_layers=layers, intermediate_size=ffn,
                                   num_key_value_heads=kv, num_attention_heads=kv * cfg.group_size)

    def _kv_groups(self, cfg: GlmConfig, source: str) -> int:
        gs = cfg.group_size
        kv = _check_size(self.num_key_value_heads, cfg.num_key_value_heads, f"{source}: num_key_value_heads",
                         f"KV groups (one kv head + {gs} query heads each)")
        if self.num_attention_heads is None:
            return kv
        heads = self.num_attention_heads
        if not isinstance(heads, int) or isinstance(heads, bool) or heads % gs or heads < gs:
            raise PruneError(
                f"{source}: num_attention_heads={heads!r} must be a positive multiple of {gs} (heads are "
                f"removed by whole KV groups of {gs} query heads); allowed: "
                f"{', '.join(str(gs * k) for k in range(1, cfg.num_key_value_heads + 1))}")
        if heads > cfg.num_attention_heads:
            raise PruneError(f"{source}: num_attention_heads={heads} is more than the teacher's "
                             f"{cfg.num_attention_heads}; allowed {gs}..{cfg.num_attention_heads} in steps of {gs}")
        if self.num_key_value_heads is not None and heads != kv * gs:
            raise PruneError(f"{source}: num_attention_heads={heads} disagrees with num_key_value_heads={kv} "
                             f"(each KV group keeps {gs} query heads: expected {kv * gs})")
        return heads // gs


def _check_size(value, teacher: int, name: str, what: str) -> int:
    if value is None:
        return teacher
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= teacher:
        raise PruneError(f"{name}={value!r} is out of range: keep 1..{teacher} {what} (the teacher has {teacher})")
    return value


def non_embedding_params(model_or_config: GlmForCausalLM | GlmConfig) -> int:
    """Parameters outside `embed_tokens` and `lm_head`: what pruning can shrink."""
    cfg = model_or_config.config if isinstance(model_or_config, GlmForCausalLM) else model_or_config
    C, hs = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hs, cfg.num_key_value_heads * hs
    attn = C * q + 2 * C * kv + q * C + (q + 2 * kv if cfg.attention_bias else 0)
    mlp = 3 * C * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp + 2 * C) + C


def solve_spec(cfg: GlmConfig, fraction: float, num_layers: int | None = None,
               num_key_value_heads: int | None = None, multiple_of: int = 1, source: str = "prune") -> PruneSpec:
    """Uniform sizes for `fraction` of the teacher's non-embedding parameters.

    Layers and KV groups are taken as given (default: the teacher's); the FFN width, the largest
    budget and the finest grain, is solved: the largest multiple of `multiple_of` whose model has at
    most `fraction` of the teacher's non-embedding parameters."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        # NaN ended in a ValueError deep in the arithmetic, 1.5 quietly gave the teacher's width
        raise PruneError(f"{source}: target_fraction={fraction!r} is out of range: must be a number > 0 and <= 1 "
                         "(a fraction of the teacher's non-embedding parameters)")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise PruneError(f"{source}: multiple_of={multiple_of!r} is out of range: must be an integer >= 1")
    if multiple_of > cfg.intermediate_size:  # no width fits at any fraction: the grain is the mistake
        raise PruneError(f"{source}: multiple_of={multiple_of} is out of range: allowed 1..{cfg.intermediate_size} "
                         f"(the teacher's intermediate_size)")
    base = PruneSpec(num_layers, None, num_key_value_heads)
    fixed = base.target_config(cfg, source)
    budget = fraction * non_embedding_params(cfg)
    per_channel = 3 * cfg.hidden_size * fixed.num_hidden_layers
    rest = non_embedding_params(dataclasses.replace(fixed, intermediate_size=1)) - per_channel
    ffn = int((budget - rest) // per_channel) // multiple_of * multiple_of
    ffn = min(ffn, cfg.intermediate_size // multiple_of * multiple_of)
    if ffn < multiple_of:
        smallest = non_embedding_params(dataclasses.replace(fixed, intermediate_size=multiple_of))
        raise PruneError(
            f"{source}: target_fraction={fraction} is unreachable with num_layers={fixed.num_hidden_layers}, "
            f"num_key_value_heads={fixed.num_key_value_heads} and intermediate_size a multiple of {multiple_of}: "
            f"allowed {smallest / non_embedding_params(cfg):.3f}..1.0 (or prune more layers or KV groups)")
    return PruneSpec(num_layers, ffn, num_key_value_heads)


# --- importance -------------------------------------------------------------------------------------

@dataclass
class Importance:
    method: str  # "activation" or "magnitude"
    ffn: torch.Tensor  # (layers, intermediate_size): per-channel score, higher = keep
    kv_groups: torch.Tensor  # (layers, num_key_value_heads)
    layers: torch.Tensor  # (layers,): Block Influence (activation) or residual write norm (magnitude)

    def check(self, cfg: GlmConfig) -> None:
        shapes = {"ffn": (cfg.num_hidden_layers, cfg.intermediate_size),
                  "kv_groups": (cfg.num_hidden_layers, cfg.num_key_value_heads), "layers": (cfg.num_hidden_layers,)}
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise PruneError(f"{self.method} importance {name} has shape {got}, but the model needs {shape}; "
                                 "was it measured on another model?")

    def layer_ranking(self) -> list[int]:
        """Layers from the least to the most important (the order depth pruning removes them in)."""
        return [int(i) for i in torch.sort(self.layers, stable=True).indices]


@torch.no_grad()
def magnitude_importance(model: GlmForCausalLM) -> Importance:
    """Weight-magnitude scores (no data): the baseline for `activation_importance`."""
    cfg = model.config
    ffn, groups, layers = [], [], []
    for layer in model.model.layers:
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2, dim=0)  # (ffn, C) each
        down = layer.mlp.down_proj.weight  # (C, ffn)
        ffn.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
        attn = layer.self_attn
        v = attn.v_proj.weight.view(cfg.num_key_value_heads, -1)  # (nkv, hs * C)
        if attn.v_proj.bias is not None:
            v = torch.cat((v, attn.v_proj.bias.view(cfg.num_key_value_heads, -1)), dim=1)
        o = attn.o_proj.weight.view(cfg.hidden_size, cfg.num_key_value_heads, -1)  # (C, nkv, gs * hs)
        groups.append(v.norm(dim=1) * o.pow(2).sum(dim=(0, 2)).sqrt())
        layers.append(attn.o_proj.weight.norm() + layer.mlp.down_proj.weight.norm())
    return Importance("magnitude", torch.stack(ffn), torch.stack(groups), torch.stack(layers))


class _Recorder:
    """Forward hooks that sum the activation statistics of every layer over the calibration batches."""

    def __init__(self, model: GlmForCausalLM):
        cfg = self.cfg = model.config
        L = cfg.num_hidden_layers
        self.ffn = torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)
        self.groups = torch.zeros(L, cfg.num_key_value_heads, dtype=torch.float64)
        self.cos = torch.zeros(L, dtype=torch.float64)
        self.tokens = 0
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles += [
                layer.mlp.down_proj.register_forward_pre_hook(self._ffn_hook(i)),
                layer.self_attn.o_proj.register_forward_pre_hook(self._attn_hook(i, layer.self_attn.o_proj)),
                layer.register_forward_hook(self._layer_hook(i)),
            ]

    def _ffn_hook(self, i: int):
        def hook(_module, inputs):
            self.ffn[i] += inputs[0].abs().sum(dim=(0, 1)).double()  # sum over tokens of |silu(gate) * up|
        return hook

    def _attn_hook(self, i: int, o_proj):
        cfg = self.cfg

        def hook(_module, inputs):
            y = inputs[0]  # (B, T, nh * hs), heads of group g are contiguous
            B, T, _ = y.shape
            y = y.reshape(B, T, cfg.num_key_value_heads, -1)  # (B, T, nkv, gs * hs)
            w = o_proj.weight.view(cfg.hidden_size, cfg.num_key_value_heads, -1)  # (C, nkv, gs * hs)
            out = torch.einsum("btgd,cgd->btgc", y, w)  # each group's output through o_proj
            self.groups[i] += out.norm(dim=-1).sum(dim=(0, 1)).double()
        return hook

    def _layer_hook(self, i: int):
        def hook(_module, args, output):
            x_in, x_out = args[0], output[0]
            self.cos[i] += F.cosine_similarity(x_in, x_out, dim=-1).sum().double()
            if i == 0:
                self.tokens += x_in.shape[0] * x_in.shape[1]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def activation_importance(model: GlmForCausalLM, calib_ids: torch.Tensor, batch_size: int = 8,
                          progress=None) -> Importance:
    """Scores from activations on calibration token ids (n, seq); `progress(done, total)` per batch."""
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise PruneError(f"calibration ids must be a non-empty (n, seq) tensor, got shape {tuple(calib_ids.shape)}")
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    try:
        for start in range(0, len(calib_ids), batch_size):
            model(calib_ids[start:start + batch_size])
            if progress is not None:
                progress(min(start + batch_size, len(calib_ids)), len(calib_ids))
    finally:
        rec.close()
        model.train(was_training)
    n = rec.tokens
    down_norms = torch.stack([layer.mlp.down_proj.weight.norm(dim=0) for layer in model.model.layers]).double()
    return Importance("activation", (rec.ffn / n * down_norms).float(), (rec.groups / n).float(),
                      (1.0 - rec.cos / n).float())


# --- pruning ----------------------------------------------------------------------------------------

def kept_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (ties: the earlier index is kept)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


@torch.no_grad()
def prune_model(model: GlmForCausalLM, spec: PruneSpec, importance: Importance) -> GlmForCausalLM:
    """A new, smaller `GlmForCausalLM` keeping the most important layers, KV groups and FFN channels."""
    cfg = model.config
    target = spec.target_config(cfg)
    importance.check(cfg)
    src = {k: v.detach() for k, v in model.state_dict().items()}
    state = {k: src[k].clone() for k in ("model.embed_tokens.weight", "model.norm.weight")}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = src["lm_head.weight"].clone()
    layers = kept_indices(importance.layers, target.num_hidden_layers)
    for new_i, old_i in enumerate(layers.tolist()):
        channels = kept_indices(importance.ffn[old_i], target.intermediate_size)
        groups = kept_indices(importance.kv_groups[old_i], target.num_key_value_heads)
        state.update(_prune_layer(src, cfg, old_i, new_i, channels, groups))
    pruned = GlmForCausalLM(target)
    pruned.load_state_dict(state, strict=not target.tie_word_embeddings)
    return pruned.eval()


def _prune_layer(src: dict, cfg: GlmConfig, old_i: int, new_i: int, channels: torch.Tensor,
                 groups: torch.Tensor) -> dict[str, torch.Tensor]:
    p, q = f"model.layers.{old_i}.", f"model.layers.{new_i}."
    hs, gs = cfg.head_dim, cfg.group_size
    kv_rows = torch.cat([torch.arange(g * hs, (g + 1) * hs) for g in groups.tolist()])
    q_rows = torch.cat([torch.arange(g * gs * hs, (g + 1) * gs * hs) for g in groups.tolist()])
    gate, up = src[p + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
    out = {
        q + "input_layernorm.weight": src[p + "input_layernorm.weight"].clone(),
        q + "post_attention_layernorm.weight": src[p + "post_attention_layernorm.weight"].clone(),
        q + "mlp.gate_up_proj.weight": torch.cat((gate[channels], up[channels])),
        q + "mlp.down_proj.weight": src[p + "mlp.down_proj.weight"][:, channels].clone(),
        q + "self_attn.q_proj.weight": src[p + "self_attn.q_proj.weight"][q_rows].clone(),
        q + "self_attn.k_proj.weight": src[p + "self_attn.k_proj.weight"][kv_rows].clone(),
        q + "self_attn.v_proj.weight": src[p + "self_attn.v_proj.weight"][kv_rows].clone(),
        q + "self_attn.o_proj.weight": src[p + "self_attn.o_proj.weight"][:, q_rows].clone(),
    }
    if cfg.attention_bias:
        out[q + "self_attn.q_proj.bias"] = src[p + "self_attn.q_proj.bias"][q_rows].clone()
        out[q + "self_attn.k_proj.bias"] = src[p + "self_attn.k_proj.bias"][kv_rows].clone()
        out[q + "self_attn.v_proj.bias"] = src[p + "self_attn.v_proj.bias"][kv_rows].clone()
    return out
