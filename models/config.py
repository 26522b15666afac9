"""The GLM architecture config, read from and written to Hugging Face's `config.json`.

Only the fields that change the computation are kept. Both layouts of the rotary settings are
read: older configs put `rope_theta` and `partial_rotary_factor` at the top level, newer ones
(transformers >= 5) nest them in `rope_parameters`. Defaults are those of transformers'
`GlmConfig`, so a config that omits a field means the same thing here as there.

RoPE as transformers' `GlmConfig` reads it (`rope_settings`): a non-empty `rope_scaling` (the
older key) replaces `rope_parameters` whole; what it leaves out comes from the top level or the
defaults; a dict without `rope_type`/`type` is the unscaled ("default") RoPE. edgeglm computes
unscaled RoPE only, so a config that transformers would run with a scaling (linear, dynamic,
yarn, ...) is refused rather than read without it (wrong logits on long contexts), and so is one
whose meaning is not clear: a `factor` other than 1 without a type (transformers >= 5 runs it
unscaled and ignores the factor, 4.x cannot load it), or `rope_scaling` and `rope_parameters`
that disagree (transformers would silently use `rope_scaling`'s values).

This module imports no torch: the runtime and the bundle manifest use it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("glm",)
SUPPORTED_ARCHITECTURES = ("GlmForCausalLM",)
ROPE_KEYS = ("rope_scaling", "rope_parameters")
NO_SCALING = "edgeglm computes unscaled RoPE only"


def _rope_values(rope: dict, raw: dict) -> dict:
    """rope_type, rope_theta and partial_rotary_factor of one rope dict as transformers completes it: its own
    value, else the top-level one, else GlmConfig's default."""
    return {"rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            "partial_rotary_factor": rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))}


def rope_settings(raw: dict, source: str = "config.json") -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a Hugging Face GLM config, read as transformers' GlmConfig reads
    it (see the module docstring); a RoPE scaling, or rope settings whose meaning is unclear, is refused with
    one line naming the file, the key and its value."""
    dicts = {}
    for key in ROPE_KEYS:
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{source}: {key} = {value!r}: must be an object like "
                                  '{"rope_type": "default", "rope_theta": 10000.0}; this checkpoint cannot be used')
        if value:
            dicts[key] = value
    for key, rope in dicts.items():
        factor = rope.get("factor", 1.0)
        if "rope_type" not in rope and "type" not in rope and factor != 1:
            raise CheckpointError(
                f"{source}: {key} = {rope!r}: a scaling factor without a rope_type: transformers >= 5 runs the "
                "model unscaled (ignoring the factor) and 4.x cannot load it, so the RoPE it was trained with is "
                f"unclear; edgeglm refuses this checkpoint ({NO_SCALING}): if the model was trained unscaled, "
                'remove "factor" or set "rope_type": "default"')
    # transformers (4.x and >= 5): a non-empty rope_scaling is used whole, rope_parameters then ignored
    key = "rope_scaling" if "rope_scaling" in dicts else "rope_parameters"
    used = _rope_values(dicts.get(key, {}), raw)
    if used["rope_type"] != "default":
        raise CheckpointError(
            f"{source}: {key} = {dicts[key]!r}: RoPE scaling {used['rope_type']!r} is not supported: {NO_SCALING}, "
            "and the model without its scaling gives wrong logits (on long contexts); edgeglm refuses this "
            "checkpoint (nothing is loaded, exported or built)")
    if len(dicts) == 2:
        other = _rope_values(dicts["rope_parameters"], raw)
        for name, value in used.items():
            if other[name] != value:
                raise CheckpointError(
                    f"{source}: rope_scaling = {dicts['rope_scaling']!r} and rope_parameters = "
                    f"{dicts['rope_parameters']!r} disagree on {name} ({value!r} as transformers reads it, from "
                    f"rope_scaling, which replaces rope_parameters; {other[name]!r} by rope_parameters): edgeglm "
                    "will not guess which the model was trained with and refuses this checkpoint; keep only one "
                    "of the two keys")
    try:
        return float(used["rope_theta"]), float(used["partial_rotary_factor"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: rope_theta = {used['rope_theta']!r} and partial_rotary_factor = "
                              f"{used['partial_rotary_factor']!r} must be numbers") from None


def _kv_heads(raw: dict, source: str) -> int:
    """num_key_value_heads as transformers' GlmConfig takes it: 2 when absent; an explicit null or a non-number is
    refused (transformers keeps None and cannot build the model)."""
    value = raw.get("num_key_value_heads", 2)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{source}: num_key_value_heads = {json.dumps(value)}: must be a whole number (the key-"
                              "value heads of the attention; absent means 2, as in transformers' GlmConfig); this "
                              "checkpoint cannot be used")
    return value


@dataclass(frozen=True)
class GlmConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"config field {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise CheckpointError(
                f"partial_rotary_factor={self.partial_rotary_factor!r} must be in (0, 1]"
            )
        if self.rotary_dim % 2:
            raise CheckpointError(
                f"rotary dims int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be even"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that are rotated (as transformers computes it)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "GlmConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type={model_type!r} is not supported; edgeglm loads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        archs = raw.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{source}: architectures={archs!r} is not supported; expected "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_theta, partial_rotary_factor = rope_settings(raw, source)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise CheckpointError(f"{source}: required field(s) missing: {', '.join(missing)}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                # absent: GlmConfig's default, 2 (not num_attention_heads, as for some other architectures)
                num_key_value_heads=_kv_heads(raw, source),
                head_dim=raw.get("head_dim") or 128,
                partial_rotary_factor=partial_rotary_factor,
                rope_theta=rope_theta,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1.5625e-07)),
                attention_bias=bool(raw.get("attention_bias", True)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
                hidden_act=raw.get("hidden_act", "silu"),
                eos_token_id=eos_ids,
                pad_token_id=raw.get("pad_token_id"),
                bos_token_id=raw.get("bos_token_id"),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> "GlmConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found; a checkpoint directory needs one")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict:
        """The config as transformers (4.x and 5.x) reads it: rope fields both nested and flat."""
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id) or None
        d.update(
            model_type="glm",
            architectures=list(SUPPORTED_ARCHITECTURES),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            torch_dtype="float32",
        )
        return d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GlmConfig":
        d = dict(d)
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)
