"""The GLM architecture config, read from and written to Hugging Face's `config.json`.

Only the fields that change the computation are kept. Both layouts of the rotary settings are
read: older configs put `rope_theta` and `partial_rotary_factor` at the top level, newer ones
(transformers >= 5) nest them in `rope_parameters`. Defaults are those of transformers'
`GlmConfig`, so a config that omits a field means the same thing here as there.

This module imports no torch: the runtime and the bundle manifest use it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("glm",)
SUPPORTED_ARCHITECTURES = ("GlmForCausalLM",)


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
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported (only 'default')")
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
                num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                head_dim=raw.get("head_dim") or 128,
                partial_rotary_factor=float(
                    rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
                ),
                rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
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
