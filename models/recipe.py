"""Compression recipes: one TOML file naming the stages of `edgeglm build` and their settings.

    name = "edge-small"                 # a label, copied into the report
    description = "..."

    [prune]                             # structured pruning (models/prune.py)
    importance = "activation"           # or "magnitude" (weights only)
    target_fraction = 0.5               # of the teacher's non-embedding parameters, solved to a uniform
                                        # FFN width; or give the sizes themselves:
    num_layers = 6                      # decoder layers kept (default: all)
    num_key_value_heads = 1             # KV groups kept (default: all)
    intermediate_size = 512             # FFN channels kept per layer (not with target_fraction)
    multiple_of = 32                    # the solved FFN width is a multiple of this
    calibration_tokens = 16384          # train-split tokens run through the teacher to score structures
    calibration_seq_len = 256

    [distill]                           # knowledge distillation: the fields of models.distill.DistillSettings
    temperature = 2.0                   # (each checked by it; see docs/factory.md for all of them)
    kl_weight = 0.5
    ce_weight = 0.5
    token_budget = 2000000              # tokens of training; the train split may be repeated up to max_passes
    batch_size = 16
    seq_len = 256
    lr = 1e-3
    min_lr = 1e-4
    warmup_steps = 20
    checkpoint_every = 50

    [quantize]
    precision = "int8"                  # or "fp32"

    [export]
    backends = ["openvino", "onnxruntime"]
    name = "edge-small"                 # bundle name (default: the --out directory's name)
    version = "0.1.0"
    chunk_kib = 256

    [eval]
    heldout_fraction = 0.05             # the end of the token stream kept out of calibration and training
    heldout_tokens = 32768              # at most this many held-out tokens are scored per stage
    seq_len = 256

Every setting is checked when the file is read: a wrong value, or a value of the wrong type (`lr =
"fast"`, `seq_len = "64"`, `batch_size = 8.0`, `true` for a number), ends in one `RecipeError` line
naming the file, the setting (`[prune] target_fraction`) and what is allowed. `[export] name` and
`version` follow the bundle manifest's rules (`bundle_name_problem`, `bundle_version_problem`, which
`edgeglm export` uses for --name and --version too). Checks that need the teacher
(sizes within the teacher's, a fraction that can be reached) are made by `edgeglm build` before any
long work. Sample recipes ship in `models/recipes/` and are named by their stem (`--recipe quick`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from models.distill import DEVICES, RESUMABLE_CHANGES, DistillError, DistillSettings
from models.errors import CheckpointError
from ota.bundle import VERSION_RE, Manifest
from ota.transfer import MAX_CHUNK_SIZE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).parent / "recipes"


class RecipeError(CheckpointError):
    """A recipe file cannot be used (names the file, the setting and the allowed values)."""


# --- bundle name and version: the manifest's own rules (ota/bundle.py), in words --------------------

_MANIFEST_NAME = TypeAdapter(Annotated[(str, *Manifest.model_fields["name"].metadata)])
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
VERSION_RULE = ("must look like 1.2.3 (one to three numbers without leading zeros, optionally with a suffix such as "
                "-rc1 or +build5)")


def bundle_name_problem(name) -> str | None:
    """Why `name` cannot be a bundle's name (the manifest would refuse it), or None."""
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return f"is empty; a bundle name is {NAME_RULE}"
    try:
        _MANIFEST_NAME.validate_python(name)
    except ValidationError:
        return f"is not a bundle name: use {NAME_RULE}"
    return None


def bundle_version_problem(version) -> str | None:
    """Why `version` cannot be a bundle's version (the manifest would refuse it), or None."""
    if not isinstance(version, str):
        return "must be a string"
    return None if VERSION_RE.fullmatch(version) else VERSION_RULE


class _Section(BaseModel):
    # strict: a string is not a number ("64"), nor is a boolean, nor 8.0 an integer
    model_config = ConfigDict(extra="forbid", strict=True)


class PruneSection(_Section):
    importance: Literal["activation", "magnitude"] = "activation"
    target_fraction: float | None = Field(default=None, gt=0, le=1)
    num_layers: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    multiple_of: int = Field(default=1, ge=1, le=1024)
    calibration_tokens: int = Field(default=16384, ge=16, le=10_000_000)
    calibration_seq_len: int = Field(default=256, ge=8, le=32768)

    @model_validator(mode="after")
    def _one_way_to_size_the_ffn(self):
        if self.target_fraction is not None and self.intermediate_size is not None:
            raise ValueError("give target_fraction or intermediate_size, not both "
                             "(target_fraction solves intermediate_size)")
        return self


class QuantizeSection(_Section):
    precision: Literal["int8", "fp32"] = "int8"
    block: Literal[16, 32, 64, 128, 256] = 128


class ExportSection(_Section):
    backends: list[Literal["openvino", "onnxruntime"]] = Field(default=["openvino", "onnxruntime"], min_length=1)
    name: str | None = None  # the bundle manifest's rules: bundle_name_problem
    version: str = "0.1.0"  # bundle_version_problem
    chunk_kib: int = Field(default=256, ge=4, le=MAX_CHUNK_SIZE // 1024)  # what the controller serves
    golden_tokens: int = Field(default=32, ge=4, le=256)

    @field_validator("backends")
    @classmethod
    def _once_each(cls, v):  # a repeated one crashed the export, after distillation
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a backend twice; list each once")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        problem = None if v is None else bundle_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v):
        problem = bundle_version_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class EvalSection(_Section):
    heldout_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    heldout_tokens: int = Field(default=32768, ge=64, le=10_000_000)
    seq_len: int = Field(default=256, ge=8, le=32768)

    @model_validator(mode="after")
    def _one_window_at_least(self):  # else the build fails at its evaluate stage, after distillation
        if self.heldout_tokens < self.seq_len + 1:
            raise ValueError(f"heldout_tokens = {self.heldout_tokens} scores less than one window of seq_len = "
                             f"{self.seq_len} (+1 for the next token): raise heldout_tokens or lower seq_len")
        return self


class Recipe(_Section):
    name: str = Field(default="recipe", min_length=1, max_length=64)
    description: str = ""
    prune: PruneSection = Field(default_factory=PruneSection)
    distill: dict = Field(default_factory=dict)  # models.distill.DistillSettings fields, checked by it
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    export: ExportSection = Field(default_factory=ExportSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    # set by parse_recipe: where it came from and the hash of its bytes (the report names both)
    _source: str = PrivateAttr(default="<recipe>")
    _sha256: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        return self._source

    @property
    def sha256(self) -> str:
        return self._sha256

    def distill_settings(self) -> DistillSettings:
        """The [distill] section as `DistillSettings` (its own checks; errors name the file and setting)."""
        fields = {f.name: f for f in dataclasses.fields(DistillSettings)}
        unknown = sorted(set(self.distill) - set(fields))
        if unknown:
            raise RecipeError(f"{self.source}: unknown setting [distill] {unknown[0]}; allowed settings here: "
                              f"{', '.join(fields)}")
        for name, value in self.distill.items():  # types first: DistillSettings compares values
            problem = _type_problem(str(fields[name].type), value, name)
            if problem:
                raise RecipeError(f"{self.source}: [distill] {name} = {value!r}: {problem}")
        try:
            return DistillSettings(**self.distill)
        except DistillError as exc:
            raise RecipeError(f"{self.source}: [distill] {re.sub(r'^distill settings? ', '', str(exc))}") from None


    def resume_identity(self) -> dict:
        """Every setting that shapes a build's results, as used: what a resumed build must share with
        the one that wrote its work directory. Left out: `name` and `description` (only copied into
        the report, which is written anew) and the [distill] settings a distillation may resume with
        changed (device, checkpoint_every)."""
        settings = self.model_dump(exclude={"name", "description", "distill"})
        distill = {k: v for k, v in self.distill_settings().to_dict().items() if k not in RESUMABLE_CHANGES}
        return {**settings, "distill": distill}


def _type_problem(annotation: str, value, name: str) -> str | None:
    """A [distill] value of the wrong type for its DistillSettings field (annotation "int", "float", "str")."""
    if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if annotation == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if annotation == "float" and not math.isfinite(value):
        return "must be a finite number"
    if annotation == "str" and not isinstance(value, str):
        return "must be a string" + (f" (one of {', '.join(DEVICES)})" if name == "device" else "")
    return None


def _allowed(model: type[BaseModel], field: str) -> str:
    """The allowed values of a field in words, from its declared constraints."""
    info = model.model_fields.get(field)
    if info is None:
        return ""
    bounds = []
    for meta in info.metadata:
        for attr, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{word} {getattr(meta, attr)}")
    return f"allowed: {' and '.join(bounds)}" if bounds else ""


def _describe(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    section = loc[0] if loc and loc[0] in Recipe.model_fields and \
        isinstance(Recipe.model_fields[loc[0]].annotation, type) and \
        issubclass(Recipe.model_fields[loc[0]].annotation, BaseModel) else None
    setting = ".".join(loc[1:] if section else loc)
    where = (f"[{section}] {setting}" if setting else f"[{section}]") if section else (setting or "(file)")
    model = Recipe.model_fields[section].annotation if section else Recipe
    if err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return f"{source}: unknown setting {where}; allowed settings here: {known}"
    value = f" = {err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
    allowed = _allowed(model, loc[-1]) if section and len(loc) == 2 else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_type" and isinstance(err.get("input"), (int, float)) and loc:
        msg += f'; quote it: {loc[-1]} = "{err["input"]}"'
    return f"{source}: {where}{value}: {msg}" + (f" ({allowed})" if allowed and allowed not in msg else "")


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the stem of a shipped recipe (`quick`, `edge-small`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if path.suffix == "" and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise RecipeError(f"--recipe {name_or_path}: no such file, nor a shipped recipe (shipped: {names})")


def parse_recipe(raw: bytes, source: str = "<recipe>") -> Recipe:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: not valid TOML ({exc})") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_describe(exc, source)) from None
    recipe._source, recipe._sha256 = source, hashlib.sha256(raw).hexdigest()
    recipe.distill_settings()
    return recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = recipe_path(name_or_path)
    return parse_recipe(path.read_bytes(), str(path))
