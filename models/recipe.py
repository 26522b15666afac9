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
"fast"`, `seq_len = "64"`, `batch_size = 8.0`, `true` for a number), ends in a `RecipeError` of one
line per problem, in plain words (none of pydantic's), naming the file, the setting, the value given and
what is allowed (`recipe.toml: [eval] seq_len = 8.0: must be a whole number (allowed: >= 8 and <= 32768);
write it without a decimal point: seq_len = 8`). `[export] name` and
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


EXPORT_SECTIONS = ("quantize", "export")  # the recipe sections only the export stage reads


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
        problems = _distill_problems(self.distill, self.source)
        if problems:
            raise RecipeError("\n".join(problems))
        return DistillSettings(**self.distill)

    def resume_identity(self) -> dict:
        """Every setting that shapes the results of the stages up to evaluate, as used: what a resumed build must
        share with the one that wrote its work directory. Left out: `name` and `description` (only copied into
        the report, which is written anew), the [distill] settings a distillation may resume with changed
        (device, checkpoint_every), and [quantize] and [export] (`export_identity`: a resume with them changed
        exports again, with the distilled student kept)."""
        settings = self.model_dump(exclude={"name", "description", "distill", *EXPORT_SECTIONS})
        distill = {k: v for k, v in self.distill_settings().to_dict().items() if k not in RESUMABLE_CHANGES}
        return {**settings, "distill": distill}

    def export_identity(self) -> dict:
        """The settings the export stage (and only it) is made with."""
        return self.model_dump(include=set(EXPORT_SECTIONS))


def _distill_problems(distill: dict, source: str) -> list[str]:
    """One line per [distill] setting that is unknown or of the wrong type, else one per value DistillSettings
    refuses."""
    fields = {f.name: f for f in dataclasses.fields(DistillSettings)}
    problems = []
    for name, value in distill.items():
        if name not in fields:
            problems.append(f"{source}: unknown setting [distill] {name} = {_toml(value)}; allowed settings here: "
                            f"{', '.join(fields)}")
            continue
        problem = _type_problem(str(fields[name].type), value, name)
        if problem:
            kind = {"int": "int_type", "float": "float_type"}.get(str(fields[name].type), "")
            problems.append(f"{source}: [distill] {name} = {_toml(value)}: {problem}{_hint(name, value, kind)}")
    if problems:  # and the values of the other settings out of their own ranges
        given = {k: v for k, v in distill.items() if k in fields and not _type_problem(str(fields[k].type), v, k)}
        defaults = DistillSettings().to_dict()
        return problems + [f"{source}: [distill] {name} = {_toml(value)}: must be {allowed}" for name, value, allowed
                           in DistillSettings.field_problems({**defaults, **given}) if name in given]
    try:  # every value out of its range, in the same words, all at once
        DistillSettings(**distill)
    except DistillError as exc:
        return [f"{source}: [distill] {name} = {_toml(value)}: must be {allowed}" for name, value, allowed in
                exc.problems] or [f"{source}: [distill] {re.sub(r'^distill settings? ', '', str(exc))}"]
    return []


def _type_problem(annotation: str, value, name: str) -> str | None:
    """A [distill] value of the wrong type for its DistillSettings field (annotation "int", "float", "str")."""
    if annotation == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be a whole number"
    if annotation == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if annotation == "float" and not math.isfinite(value):
        return "must be a finite number"
    if annotation == "str" and not isinstance(value, str):
        return "must be a string" + (f" (one of {', '.join(DEVICES)})" if name == "device" else "")
    return None


def _toml(value) -> str:
    """A value as the recipe spells it: true/false for booleans, strings quoted, lists in brackets."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _number(value) -> str:
    return "must be a finite number" if isinstance(value, float) and not math.isfinite(value) else "must be a number"


def _hint(setting: str, value, kind: str) -> str:
    """How to write a value that was meant right but spelled as another TOML type ("64", 8.0, version = 1.2)."""
    if kind.startswith(("int_", "float_")) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return ""
        if math.isfinite(number) and (kind.startswith("float_") or number.is_integer()):
            return f"; write it without quotes: {setting} = {value.strip()}"
    if kind.startswith("int_") and isinstance(value, float) and value.is_integer():
        return f"; write it without a decimal point: {setting} = {int(value)}"
    if kind == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'; quote it: {setting} = "{value}"'
    return ""


# pydantic's error types, in plain words
_WORDS = {
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), lambda v: "must be a whole number"),
    "float_type": _number, "float_parsing": _number,
    "finite_number": lambda v: "must be a finite number",
    "bool_type": lambda v: "must be true or false", "bool_parsing": lambda v: "must be true or false",
    "string_type": lambda v: "must be a string",
    "list_type": lambda v: "must be a list in brackets, e.g. [\"openvino\", \"onnxruntime\"]",
    "greater_than": lambda v: "is too small", "greater_than_equal": lambda v: "is too small",
    "less_than": lambda v: "is too large", "less_than_equal": lambda v: "is too large",
}


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


def _section(name: str) -> type[BaseModel] | None:
    """The model of a recipe section ([prune], [quantize], ...), or None for a top-level setting."""
    info = Recipe.model_fields.get(name)
    kind = info.annotation if info is not None else None
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


SECTIONS = tuple(name for name, info in Recipe.model_fields.items() if info.annotation is dict or _section(name))


def _problem(err: dict, source: str) -> str:
    """One pydantic error as one line: the file, `[section] setting = value` and what is allowed, in words."""
    loc = list(err["loc"])
    model = _section(str(loc[0])) if loc else None
    section, rest = (str(loc[0]), loc[1:]) if model is not None else (None, loc)
    setting = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(rest))
    where = (f"[{section}] {setting}" if setting else f"[{section}]") if section else (setting or "(file)")
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    shown = f" = {_toml(value)}" if "input" in err and not isinstance(value, dict) else ""
    if kind == "extra_forbidden":
        known = ", ".join((model or Recipe).model_fields)
        return f"{source}: unknown setting {where}{shown}; allowed settings here: {known}"
    name = section if not rest else str(rest[0]) if len(rest) == 1 and section is None else None
    if name in SECTIONS and kind in ("model_type", "dict_type"):  # `prune = 3`
        return f"{source}: {name}{shown}: must be a section of settings, a [{name}] table, not a single value"
    if kind == "literal_error":
        msg = f"must be {ctx.get('expected', 'one of the allowed values')}"
    elif kind in ("string_too_short", "too_short"):
        msg = "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx.get('min_length')}"
    elif kind in ("string_too_long", "too_long"):
        msg = f"must be at most {ctx.get('max_length')} characters long" if kind == "string_too_long" else \
            f"must have at most {ctx.get('max_length')} items"
    elif kind in _WORDS:
        msg = _WORDS[kind](value)
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and \
                isinstance(value, float) and math.isnan(value):
            msg = "must be a finite number"
    elif kind == "value_error":  # our own validators' words
        msg = str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
    else:  # any other pydantic check: its sentence, without its "Input should be"
        msg = re.sub(r"^Input should be ", "must be ", err["msg"])
    allowed = _allowed(model, str(rest[0])) if model is not None and len(rest) == 1 else ""
    return (f"{source}: {where}{shown}: {msg}" + (f" ({allowed})" if allowed and allowed not in msg else "")
            + (_hint(str(rest[-1]), value, kind) if rest else ""))


def _describe(exc: ValidationError, source: str) -> list[str]:
    """Every problem pydantic found, one line each (no pydantic wording, links or error counts)."""
    lines = []
    for err in exc.errors(include_url=False):
        line = _problem(err, source)
        if line not in lines:
            lines.append(line)
    return lines


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the stem of a shipped recipe (`quick`, `edge-small`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if path.suffix == "" and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    if path.is_dir():
        raise RecipeError(f"--recipe {name_or_path}: is a directory; give a recipe TOML file or a shipped recipe "
                          f"({names})")
    raise RecipeError(f"--recipe {name_or_path}: no such file, nor a shipped recipe (shipped: {names})")


def parse_recipe(raw: bytes, source: str = "<recipe>") -> Recipe:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: not valid TOML ({exc})") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:  # every problem of the file at once, [distill] types included
        distill = data.get("distill")
        extra = _distill_problems(distill, source) if isinstance(distill, dict) else []
        raise RecipeError("\n".join(_describe(exc, source) + extra)) from None
    recipe._source, recipe._sha256 = source, hashlib.sha256(raw).hexdigest()
    recipe.distill_settings()
    return recipe


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = recipe_path(name_or_path)
    return parse_recipe(path.read_bytes(), str(path))
