"""Recipe files: every setting of the wrong type or shape is one clear RecipeError line (no TypeError,
no pydantic dump, no silent coercion), naming the file and the `[section] setting`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from models.distill import DistillSettings
from models.recipe import (EvalSection, ExportSection, PruneSection, QuantizeSection, RecipeError, load_recipe,
                           parse_recipe)

QUICK = Path(__file__).parents[2] / "models" / "recipes" / "quick.toml"


def _numeric_fields() -> list[tuple[str, str, str]]:
    """(section, setting, "int" | "float") for every numeric setting a recipe has."""
    out = []
    for section, model in (("prune", PruneSection), ("export", ExportSection), ("eval", EvalSection)):
        for name, info in model.model_fields.items():
            kind = next((k for k in ("int", "float") if k in str(info.annotation)), None)
            if kind:
                out.append((section, name, kind))
    out += [("distill", f.name, str(f.type)) for f in dataclasses.fields(DistillSettings)
            if str(f.type) in ("int", "float")]
    return out


NUMERIC = _numeric_fields()


def test_every_numeric_setting_is_covered():
    names = {f"[{s}] {n}" for s, n, _ in NUMERIC}
    assert {"[distill] lr", "[distill] min_lr", "[distill] batch_size", "[prune] target_fraction",
            "[export] chunk_kib", "[eval] heldout_fraction"} <= names
    assert len(NUMERIC) >= 25


def _bad_values(kind: str):
    yield '"fast"'  # a word
    yield '"64"'  # a number in quotes is a string, not silently converted
    yield "true"  # a boolean is not a number
    if kind == "int":
        yield "8.5"
        yield "8.0"  # integers only


@pytest.mark.parametrize("section,name,kind", NUMERIC, ids=[f"{s}.{n}" for s, n, _ in NUMERIC])
def test_a_numeric_setting_of_the_wrong_type_is_a_clear_field_error(section, name, kind):
    for value in _bad_values(kind):
        raw = f"[{section}]\n{name} = {value}\n".encode()
        with pytest.raises(RecipeError) as info:
            parse_recipe(raw, "my.toml")
        msg = str(info.value)
        assert msg.startswith(f"my.toml: [{section}] {name} = "), (value, msg)
        assert "\n" not in msg and ("number" in msg or "integer" in msg), (value, msg)


def test_distill_lr_as_a_word_names_the_field_not_a_comparison():
    with pytest.raises(RecipeError, match=r"my\.toml: \[distill\] lr = 'fast': must be a number$"):
        parse_recipe(b'[distill]\nlr = "fast"\n', "my.toml")


@pytest.mark.parametrize("text,fragment", [
    ('[export]\nversion = "v1"', "[export] version = 'v1': must look like 1.2.3"),
    ('[export]\nversion = "banana"', "[export] version = 'banana': must look like 1.2.3"),
    ('[export]\nversion = 1.2', '[export] version = 1.2: must be a string; quote it: version = "1.2"'),
    ('[export]\nname = "../x y"', "[export] name = '../x y': is not a bundle name: use 1 to 128 letters"),
    ('[export]\nname = ""', "[export] name = '': is empty"),
    ('[distill]\ndevice = 3', "[distill] device = 3: must be a string (one of auto, cpu, cuda)"),
    # found late they cost the distillation: an export that crashed on a repeated backend, an evaluation
    # with no window to score; refused when the recipe is read
    ('[export]\nbackends = ["onnxruntime", "onnxruntime"]', "names a backend twice; list each once"),
    ('[eval]\nheldout_tokens = 128\nseq_len = 128', "heldout_tokens = 128 scores less than one window of "
                                                    "seq_len = 128"),
    ('[distill]\nseed = 20000000000000', "[distill] seed"),
])
def test_export_name_and_version_read_like_the_manifest_rules(text, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text.encode(), "my.toml")
    assert fragment in str(info.value) and "pattern" not in str(info.value)


def test_the_name_and_version_rules_are_the_manifests():
    from ota.bundle import Manifest, VERSION_RE
    from models.recipe import bundle_name_problem, bundle_version_problem

    for name in ("tiny", "glm-edge_1.5b", "a" * 128, "", "a" * 129, "../x", "x y", ".hidden", "-x"):
        pattern_ok = all(getattr(m, "pattern", None) is None or __import__("re").match(m.pattern, name)
                         for m in Manifest.model_fields["name"].metadata)
        assert (bundle_name_problem(name) is None) == (pattern_ok and 1 <= len(name) <= 128), name
    for version in ("1", "1.2", "1.2.3", "1.2.3-rc1", "2.0+build5", "v1", "banana", "1.2.3.4", ""):
        assert (bundle_version_problem(version) is None) == bool(VERSION_RE.fullmatch(version)), version


def test_resume_identity_leaves_out_what_does_not_change_a_result():
    base = load_recipe("quick")
    text = QUICK.read_text()
    same = parse_recipe(text.replace('device = "cpu"', 'device = "auto"').replace("checkpoint_every = 8",
                        "checkpoint_every = 3").replace('name = "quick"', 'name = "renamed"').encode(), "x.toml")
    assert same.resume_identity() == base.resume_identity()
    other = parse_recipe(text.replace("token_budget = 8192", "token_budget = 4096").encode(), "x.toml")
    assert other.resume_identity() != base.resume_identity()


def test_a_chunk_the_controller_cannot_serve_is_refused_when_the_recipe_is_read():
    """[export] chunk_kib and `export --chunk-kib` took up to 16 MiB, while the controller serves chunks of at most
    512 KiB (one MQTT message): such a bundle was built and then refused at every offer."""
    from models.export import ExportOptions
    from models.errors import ExportError

    assert parse_recipe(b"[export]\nchunk_kib = 512\n", "my.toml").export.chunk_kib == 512
    with pytest.raises(RecipeError, match=r"my.toml: \[export\] chunk_kib = 1024"):
        parse_recipe(b"[export]\nchunk_kib = 1024\n", "my.toml")
    with pytest.raises(ExportError, match="--chunk-kib 1024 must be between 4 and 512"):
        ExportOptions(chunk_kib=1024)


PYDANTIC_WORDS = ("Input should", "valid integer", "valid number", "valid string", "valid dictionary", "instance of",
                  "pydantic", "For further information", "errors.pydantic.dev", "validation error", "type=")


def test_every_problem_of_a_recipe_is_one_plain_line_naming_file_setting_value_and_what_is_allowed():
    """Recipe errors were pydantic's sentences ("Input should be a valid integer"), and only the first problem of
    the file was told: a recipe with three mistakes took three runs to fix."""
    raw = (b'[prune]\nnum_layers = "abc"\ncalibration_tokens = 8.0\n[quantize]\nprecision = "int4"\n'
           b'[export]\nbackends = ["openvino", "tensorrt"]\n[eval]\nseq_len = true\n[distill]\nlr = "1e-3"\n')
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, "recipe.toml")
    assert str(info.value).splitlines() == [
        "recipe.toml: [prune] num_layers = 'abc': must be a whole number (allowed: >= 1)",
        "recipe.toml: [prune] calibration_tokens = 8.0: must be a whole number (allowed: >= 16 and <= 10000000); "
        "write it without a decimal point: calibration_tokens = 8",
        "recipe.toml: [quantize] precision = 'int4': must be 'int8' or 'fp32'",
        "recipe.toml: [export] backends[1] = 'tensorrt': must be 'openvino' or 'onnxruntime'",
        "recipe.toml: [eval] seq_len = true: must be a whole number (allowed: >= 8 and <= 32768)",
        "recipe.toml: [distill] lr = '1e-3': must be a number; write it without quotes: lr = 1e-3",
    ]


def _every_setting():
    for section, model in (("prune", PruneSection), ("quantize", QuantizeSection), ("export", ExportSection),
                           ("eval", EvalSection)):
        for name in model.model_fields:
            yield f"[{section}]\n{name}"
    for f in dataclasses.fields(DistillSettings):
        yield f"[distill]\n{f.name}"
    yield from ("name", "description", "prune", "distill", "quantize", "export", "eval", "[prune]\nhidden")


@pytest.mark.parametrize("value", ['"abc"', '"64"', "true", "8.5", "8.0", "-1", "0", "1e12", "nan", "inf", "[1, 1]",
                                   "[]", "{ a = 1 }", '""'])
def test_no_wrong_value_of_any_setting_shows_pydantic_words(value):
    for where in _every_setting():
        raw = f"{where} = {value}\n".encode()
        try:
            parse_recipe(raw, "my.toml")
        except RecipeError as exc:
            for line in str(exc).splitlines():
                assert line.startswith("my.toml: ") and not any(w in line for w in PYDANTIC_WORDS), (raw, line)
                setting = where.split("\n")[-1]
                assert setting in line, (raw, line)


def test_every_distill_value_out_of_range_is_told_at_once_in_the_recipes_words():
    """[distill] values out of range came one per run, as `lr=2.0 is invalid` (the other sections' errors read
    `lr = 2.0: must be ...` and came all at once)."""
    raw = b'[prune]\nnum_layers = 0\n[distill]\nlr = 2.0\nbatch_size = 0\nseed = -1\n'
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, "my.toml")
    assert str(info.value).splitlines() == [
        "my.toml: [prune] num_layers = 0: is too small (allowed: >= 1)",
        "my.toml: [distill] lr = 2.0: must be in (0, 1]",
        "my.toml: [distill] batch_size = 0: must be >= 1",
        "my.toml: [distill] seed = -1: must be in [0, 2**31)",
    ]
    with pytest.raises(RecipeError) as info:  # a setting checked against others names them
        parse_recipe(b"[distill]\nbatch_size = 4\nseq_len = 32\ntoken_budget = 100\n", "my.toml")
    assert str(info.value) == "my.toml: [distill] token_budget = 100: must be >= 128, one batch (batch_size * seq_len)"
    with pytest.raises(RecipeError) as info:  # with a value of the wrong type too
        parse_recipe(b'[distill]\nlr = "fast"\nbatch_size = 0\n', "my.toml")
    assert str(info.value).splitlines() == ["my.toml: [distill] lr = 'fast': must be a number",
                                            "my.toml: [distill] batch_size = 0: must be >= 1"]
