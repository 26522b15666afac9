"""`edgeglm build` end to end on a tiny teacher, and every bad input stopped before any long work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from agent.cli import main
from models.tiny import HELDOUT_MODULES

QUICK = Path(__file__).parents[2] / "models" / "recipes" / "quick.toml"


def corpus_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [lib / m for m in HELDOUT_MODULES]


def edgeglm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built(trained_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    out, work = root / "bundle", root / "work"
    proc = edgeglm("build", "--teacher", trained_checkpoint, "--corpus", *corpus_files(), "--recipe", "quick",
                   "--out", out, "--work", work)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "out": out, "work": work, "proc": proc, "teacher": trained_checkpoint}


def test_build_makes_a_smaller_bundle_that_verifies_loads_and_generates(built):
    from agent.model import load_model
    from models.config import GlmConfig
    from models.prune import non_embedding_params
    from runtime.generate import SamplingParams, generate

    out, root = built["out"], built["root"]
    assert "build" in built["proc"].stderr and "distill" in built["proc"].stderr  # the progress bars
    assert "| distilled |" in built["proc"].stdout
    assert not list(root.glob(".bundle.partial-*"))
    assert edgeglm("bundle", "keygen", "--out", root / "keys").returncode == 0
    assert edgeglm("bundle", "sign", out, "--key", root / "keys" / "bundle-signing.key").returncode == 0
    verify = edgeglm("bundle", "verify", out, "--trusted", root / "keys")
    assert verify.returncode == 0, verify.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    teacher_cfg = GlmConfig.from_file(built["teacher"] / "config.json")
    student_cfg = GlmConfig.from_dict(manifest["architecture"])
    assert student_cfg.num_key_value_heads == 1 and student_cfg.num_attention_heads == 2
    assert student_cfg.intermediate_size % 16 == 0
    assert non_embedding_params(student_cfg) <= 0.5 * non_embedding_params(teacher_cfg)
    for backend in ("onnxruntime", "openvino"):
        model = load_model(out, backend)
        tokens = list(generate(model.engine, model.tokenizer.encode("def push(heap, item):\n").ids,
                               SamplingParams(max_tokens=8)))
        assert len(tokens) >= 1


def test_the_report_is_in_the_work_dir_and_the_signed_manifest(built):
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    report = json.loads((built["work"] / "report.json").read_text())
    compression = manifest["compression"]
    assert {k: v for k, v in compression.items() if k != "export"} == report
    assert set(compression["export"]["backends"]) == {"onnxruntime", "openvino"}
    assert list(report["stages"]) == ["teacher", "pruned", "distilled", "int8 (openvino)", "int8 (onnxruntime)"]
    for stage, result in report["stages"].items():
        assert result["perplexity"] > 1.0, stage
    assert report["stages"]["teacher"]["teacher_agreement"] == 1.0
    assert report["stages"]["int8 (onnxruntime)"]["kind"] == "bundle onnxruntime int8-per-channel-u8"
    assert report["student"]["non_embedding_params"] == report["stages"]["distilled"]["non_embedding_params"]
    assert report["recipe"]["name"] == "quick" and len(report["recipe"]["sha256"]) == 64
    assert report["data"]["train_tokens"] + report["data"]["heldout_tokens"] == report["data"]["corpus_tokens"]
    table = (built["work"] / "report.md").read_text()
    assert "| int8 (onnxruntime) |" in table and "agree w/ teacher" in table


def test_distillation_recovers_what_pruning_lost(built):
    stages = json.loads((built["work"] / "report.json").read_text())["stages"]
    assert stages["distilled"]["perplexity"] < stages["pruned"]["perplexity"]


def test_resume_skips_finished_stages_and_a_used_work_dir_needs_resume(built, capsys):
    again = built["root"] / "again"
    args = ["build", "--teacher", str(built["teacher"]), "--corpus", *map(str, corpus_files()), "--recipe",
            "quick", "--out", str(again), "--work", str(built["work"]), "--quiet"]
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err and not again.exists()
    assert main(args + ["--resume"]) == 0
    first = json.loads((built["out"] / "manifest.json").read_text())["compression"]
    assert json.loads((again / "manifest.json").read_text())["compression"] == first
    assert json.loads((again / "manifest.json").read_text())["name"] == "again"  # after its own --out
    other = built["root"] / "other.toml"
    other.write_text(QUICK.read_text().replace("golden_tokens = 8", "golden_tokens = 12")
                     .replace("temperature = 2.0", "temperature = 3.0"))
    capsys.readouterr()
    args[args.index("quick")], args[args.index(str(again))] = str(other), str(built["root"] / "third")
    assert main(args + ["--resume"]) == 2
    assert "belongs to another build (recipe setting [distill] temperature was 2.0, now 3.0)" in \
        capsys.readouterr().err
    assert not (built["root"] / "third").exists()


def test_resume_into_a_new_work_directory_says_it_starts_a_new_build(built, capsys, monkeypatch):
    """`--resume` with a new `--out` and no `--work` (its default follows --out: a new, empty directory) rebuilt
    everything, distillation included, with exit 0 and not a word (helper-150)."""
    import models.build as build

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(build, "run_prune", stop)  # (what it says before the first long stage is the point)
    args = ["build", "--teacher", str(built["teacher"]), "--corpus", *map(str, corpus_files()), "--recipe", "quick",
            "--out", str(built["root"] / "elsewhere"), "--quiet", "--resume"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"warning: --resume: no build to continue in --work {built['root'] / 'elsewhere.work'} (new or empty): " \
        "starting a new build" in err and "give it as --work" in err, err
    assert main(args[:-1] + ["--work", str(built["work"]), "--resume", "--out", str(built["root"] / "elsewhere2")]) \
        == 0  # the finished build's --work: resumed, nothing to warn about
    assert "no build to continue" not in capsys.readouterr().err


def test_resume_with_only_export_settings_changed_exports_again_and_keeps_the_student(built, capsys, monkeypatch):
    """Bumping `[export] version` (or another export setting) made --resume refuse the work directory as another
    build: a new version of the same student meant distilling again. The export stage (and the report) are
    redone now, from the distilled student kept."""
    import models.build as build
    work = built["root"] / "work-bumped"  # a copy: the other tests share the fixture's work directory
    shutil.copytree(built["work"], work)
    state = json.loads((work / "state.json").read_text())
    student = work / "distilled" / "model.safetensors"
    student_stat = student.stat()
    other = built["root"] / "bumped.toml"
    other.write_text(QUICK.read_text().replace('version = "0.1.0"', 'version = "0.1.1"')
                     .replace("golden_tokens = 8", "golden_tokens = 12"))
    bumped = built["root"] / "bumped"
    args = ["build", "--teacher", str(built["teacher"]), "--corpus", *map(str, corpus_files()), "--recipe",
            str(other), "--out", str(bumped), "--work", str(work)]
    # stopped while evaluating the bundle exported again, then resumed with the first recipe: exported again
    # (the old export's record stood while the new bundle was in the work directory, and was published with it)
    evaluate = build.evaluate_bundle_stages
    monkeypatch.setattr(build, "evaluate_bundle_stages", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(args + ["--resume", "--quiet"]) == 130
    assert "export" not in json.loads((work / "state.json").read_text())["done"] and not bumped.exists()
    monkeypatch.setattr(build, "evaluate_bundle_stages", evaluate)
    back = built["root"] / "back"
    assert main(args[:args.index(str(other))] + ["quick", "--out", str(back), "--work", str(work), "--resume",
                                                 "--quiet"]) == 0
    assert json.loads((back / "manifest.json").read_text())["version"] == "0.1.0"
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "done before (check, tokenize, prune, distill, evaluate) kept, not redone; exported again: recipe " \
           "setting [export] version was '0.1.0', now '0.1.1'" in err, err
    manifest = json.loads((bumped / "manifest.json").read_text())
    assert manifest["version"] == "0.1.1" and len(manifest["golden"]["reference"]["tokens"]) == 12
    assert (student.stat().st_mtime_ns, student.stat().st_ino) == (student_stat.st_mtime_ns, student_stat.st_ino)
    after = json.loads((work / "state.json").read_text())
    assert {k: after["done"][k] for k in ("prune", "distill", "evaluate")} == \
        {k: state["done"][k] for k in ("prune", "distill", "evaluate")}
    first = json.loads((built["out"] / "manifest.json").read_text())["compression"]
    assert manifest["compression"]["stages"]["distilled"] == first["stages"]["distilled"]
    # the same settings again: nothing is exported a third time (the bundle at --out is this build's own)
    capsys.readouterr()
    assert main(args + ["--resume", "--quiet"]) == 0
    assert json.loads((bumped / "manifest.json").read_text()) == manifest


def test_resume_after_a_stop_between_publishing_and_recording_it_finishes(built, capsys):
    """A build killed after copying its bundle to --out and before writing the last state: --resume used to
    refuse (--out exists); it now sees its own bundle there and records it. A different bundle at --out is
    still refused, untouched."""
    state_path = built["work"] / "state.json"
    state = json.loads(state_path.read_text())
    finished = dict(state)
    del state["done"]["report"]
    state_path.write_text(json.dumps(state))
    before = (built["out"] / "manifest.json").read_bytes()
    args = ["build", "--teacher", str(built["teacher"]), "--corpus", *map(str, corpus_files()), "--recipe",
            "quick", "--out", str(built["out"]), "--work", str(built["work"]), "--quiet"]
    try:
        other = built["root"] / "other-bundle"
        shutil.copytree(built["out"], other)
        manifest = json.loads((other / "manifest.json").read_text())
        manifest["version"] = "9.9.9"
        (other / "manifest.json").write_text(json.dumps(manifest))
        capsys.readouterr()
        assert main(args[:args.index("--out") + 1] + [str(other)] + args[args.index("--out") + 2:] + ["--resume"]) == 2
        assert f"--out {other}: already exists" in capsys.readouterr().err
        assert json.loads((other / "manifest.json").read_text())["version"] == "9.9.9"

        report = (built["work"] / "report.json").read_bytes()
        renamed = built["root"] / "renamed-quick.toml"  # the same settings from another file: the same build
        shutil.copy(QUICK, renamed)
        args[args.index("quick")] = str(renamed)
        assert main(args + ["--resume"]) == 0
        assert (built["out"] / "manifest.json").read_bytes() == before
        assert (built["work"] / "report.json").read_bytes() == report  # the published report, not one made anew
        assert json.loads(state_path.read_text())["done"]["report"] == {"out": str(built["out"])}
    finally:
        state_path.write_text(json.dumps(finished, indent=2) + "\n")


def test_a_recipe_setting_quantize_block_is_warned_about_as_having_no_effect(raw_teacher, tmp_path):
    recipe = tmp_path / "blocky.toml"
    recipe.write_text(QUICK.read_text().replace("[quantize]", "[quantize]\nblock = 64"))
    (tmp_path / "taken").mkdir()  # stops the build at the --out check, after the recipe's
    for chosen, warned in ((recipe, True), (QUICK, False)):
        proc = edgeglm("build", "--teacher", raw_teacher, "--corpus", *corpus_files(), "--recipe", chosen,
                       "--out", tmp_path / "taken", "--quiet")
        assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr
        assert (f"edgeglm build: warning: {recipe}: [quantize] block = 64 has no effect" in proc.stderr) == warned, \
            proc.stderr


def test_work_that_is_a_bundle_is_refused_even_with_resume(raw_teacher, fp32_bundle, tmp_path, capsys):
    """`--work BUNDLE --resume` wrote the build's work files into that bundle."""
    bundle = tmp_path / "released"
    shutil.copytree(fp32_bundle, bundle)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    code = main(["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe",
                 str(QUICK), "--out", str(tmp_path / "small"), "--work", str(bundle), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--work {bundle}: is a bundle" in err
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before and not (tmp_path / "small").exists()


# --- bad input: exit 2 naming the setting, before any long work, nothing at --out ------------------

def _recipe(tmp_path, **replace) -> Path:
    text = QUICK.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _foreign_teacher(tmp_path, teacher, kind: str = "llama") -> Path:
    ckpt = tmp_path / kind.replace(" ", "-")
    shutil.copytree(teacher, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    if kind == "llama":
        cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    else:  # a GLM trained with linear RoPE scaling, in the older key beside rope_parameters
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


BAD = {
    "corpus too small": (dict(corpus="small"), ["corpus too small", "[eval] seq_len = 64"]),
    "budget too large": (dict(recipe={"token_budget = 8192": "token_budget = 4000000"}),
                         ["corpus too small for the distillation", "[distill] token_budget=4000000",
                          "max_passes=8.0"]),
    "below one KV group": (dict(recipe={"num_key_value_heads = 1": "num_key_value_heads = 0"}),
                           ["[prune] num_key_value_heads = 0", ">= 1"]),
    "more layers than exist": (dict(recipe={"num_key_value_heads = 1": "num_layers = 5"}),
                               ["[prune]: num_layers=5 is out of range: keep 1..2 decoder layers"]),
    "unreachable fraction": (dict(recipe={"target_fraction = 0.5": "target_fraction = 0.05"}),
                             ["[prune]: target_fraction=0.05 is unreachable", "allowed 0."]),
    "bad recipe value": (dict(recipe={'precision = "int8"': 'precision = "int4"'}),
                         ["[quantize] precision = 'int4'", "'int8' or 'fp32'"]),
    "not GLM": (dict(teacher="llama"), ["model_type='llama' is not supported"]),
    "RoPE scaling": (dict(teacher="rope scaling"), ["rope-scaling/config.json: rope_scaling = {'rope_type': 'linear', "
                                                    "'factor': 4.0}: RoPE scaling 'linear' is not supported",
                                                    "edgeglm refuses this checkpoint"]),
    "unwritable out": (dict(out="under-a-file"), ["--out", "is not a writable directory"]),
    "out exists": (dict(out="exists"), ["--out", "already exists"]),
}


def _build_refused(capsys, teacher, corpus, recipe, out, fragments) -> None:
    """`edgeglm build` stops with exit 2 and one error line that names every fragment."""
    code = main(["build", "--teacher", str(teacher), "--corpus", *map(str, corpus), "--recipe", str(recipe),
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("edgeglm build: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_stops_before_work_with_exit_2(trained_checkpoint, tmp_path, capsys, case):
    how, fragments = BAD[case]
    corpus = corpus_files()
    if how.get("corpus") == "small":
        (tmp_path / "small.py").write_text(corpus[0].read_text()[:500])
        corpus = [tmp_path / "small.py"]
    recipe = _recipe(tmp_path, **how["recipe"]) if "recipe" in how else QUICK
    teacher = _foreign_teacher(tmp_path, trained_checkpoint, how["teacher"]) if how.get("teacher") else \
        trained_checkpoint
    out = tmp_path / "bundle"
    if how.get("out") == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "bundle"
    elif how.get("out") == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    _build_refused(capsys, teacher, corpus, recipe, out, fragments)
    if how.get("out") == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not (tmp_path / "bundle.work" / "distill").exists() and not (tmp_path / "bundle.work" / "pruned").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in QUICK.parent.glob("*.toml")))
def test_every_shipped_recipe_loads_by_name(name):
    """A recipe the package ships must pass the same validation a user's recipe gets."""
    from models.recipe import load_recipe

    recipe = load_recipe(name)
    assert recipe.name == name and recipe.distill_settings().token_budget > 0  # [distill] checked too


# --- cheap checks before the work directory exists; a failed stage stays resumable --------------------

@pytest.fixture(scope="module")
def raw_teacher(tmp_path_factory) -> Path:
    """An untrained tiny teacher (its tokenizer is the trained one's): for checks and the first stages."""
    from models.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("raw") / "teacher", "tiny", train_steps=0)


EARLY = {
    "no CUDA": (dict(recipe={'device = "cpu"': 'device = "cuda"'}),
                ["recipe.toml: [distill] device = 'cuda': no CUDA device is available here", '"cpu"']),
    "not UTF-8": (dict(corpus="latin-1"), ["--corpus ", "latin1.txt: not UTF-8 text (invalid", "at byte 6"]),
    "corpus missing": (dict(corpus="missing"), ["--corpus ", "missing.txt: training text not found",
                                                "nothing was written"]),
    "teacher is a file": (dict(teacher="file"), ["model.safetensors: is a file; give the checkpoint's directory"]),
    "teacher is no checkpoint": (dict(teacher="no checkpoint"), ["--teacher ", "config.json not found",
                                                                 "give a GLM checkpoint directory", "nothing was written"]),
    "out is no bundle name": (dict(out="my bundle"), ["--out ", "'my bundle' is not a bundle name",
                                                      "set [export] name in"]),
    "recipe version": (dict(recipe={'version = "0.1.0"': 'version = "v1"'}),
                       ["recipe.toml: [export] version = 'v1': must look like 1.2.3"]),
    "recipe lr type": (dict(recipe={"lr = 2e-3": 'lr = "fast"'}),
                       ["recipe.toml: [distill] lr = 'fast': must be a number"]),
    "tokenizer larger than the model": (dict(teacher="big tokenizer"), ["tokenizer.json has ", "more than the "
                                                                        "model's vocab_size 512"]),
}


@pytest.mark.parametrize("case", list(EARLY))
def test_cheap_checks_come_before_the_work_directory_is_made(raw_teacher, tmp_path, capsys, case):
    if case == "no CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    how, fragments = EARLY[case]
    corpus = corpus_files()
    if how.get("corpus") == "missing":
        corpus = corpus + [tmp_path / "missing.txt"]
    elif how.get("corpus"):
        (tmp_path / "latin1.txt").write_bytes(b"hello\n\xe9t\xe9\n")
        corpus = corpus + [tmp_path / "latin1.txt"]
    recipe = _recipe(tmp_path, **how["recipe"]) if "recipe" in how else QUICK
    teacher = raw_teacher / "model.safetensors" if how.get("teacher") == "file" else raw_teacher
    if how.get("teacher") == "no checkpoint":  # a folder of something else
        teacher = tmp_path / "notes"
        teacher.mkdir()
        (teacher / "readme.txt").write_text("not a model\n")
    if how.get("teacher") == "big tokenizer":  # the teacher with another model's (larger) tokenizer
        import shutil

        from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
        teacher = tmp_path / "teacher"
        shutil.copytree(raw_teacher, teacher)
        big = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(1024)}, unk_token="w0"))
        big.pre_tokenizer = pre_tokenizers.Whitespace()
        big.save(str(teacher / "tokenizer.json"))
    out = tmp_path / how.get("out", "bundle")
    _build_refused(capsys, teacher, corpus, recipe, out, fragments)
    assert not out.exists() and not out.with_name(out.name + ".work").exists()


def _broken_teacher(tmp_path, teacher, how: str) -> Path:
    ckpt = tmp_path / "teacher"
    shutil.copytree(teacher, ckpt)
    weights = ckpt / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated weights":  # a copy cut short: the header is whole, the data is not
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif how == "a tensor missing":
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        del state["model.layers.1.mlp.down_proj.weight"]
        save_file(state, weights)
    elif how in ("a NaN weight", "an inf weight"):  # a diverged run, an overflow when cast to fp16
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan" if how == "a NaN weight" else "-inf")
        state["model.layers.1.mlp.down_proj.weight"][7, 1] = float("inf")
        save_file(state, weights)
    else:  # a config.json that is not the weights' (vocab 600; the tokenizer's 512 tokens still fit)
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg[how.split()[-1]] = 600
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


TEACHER_WEIGHTS = {
    "no weights": ["teacher: no weights found (expected model.safetensors"],
    "truncated weights": ["model.safetensors: corrupted or truncated safetensors file"],
    "a tensor missing": ["weights missing from the checkpoint: model.layers.1.mlp.down_proj.weight"],
    "config vocab_size": ["tensor 'lm_head.weight' has shape (512, 128), but config.json implies (600, 128)"],
    # found at the prune stage, after tokenizing, until every value was read at the check (one read, which also
    # gives the teacher's sha256)
    "a NaN weight": ["teacher/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds 2 non-finite "
                     "value(s) (NaN or inf)", "give a teacher checkpoint without them"],
    "an inf weight": ["teacher/model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds 2 non-finite "
                      "value(s) (NaN or inf)"],
}


@pytest.mark.parametrize("case", list(TEACHER_WEIGHTS))
def test_a_teachers_broken_weights_are_refused_before_the_work_directory_is_made(raw_teacher, tmp_path, capsys,
                                                                                  case):
    """A teacher whose weights are missing, cut short or not its config's passed the checks, was tokenized,
    and failed at the prune stage, leaving a work directory and an error line that said to --resume."""
    teacher = _broken_teacher(tmp_path, raw_teacher, case)
    out = tmp_path / "bundle"
    _build_refused(capsys, teacher, corpus_files(), QUICK, out, TEACHER_WEIGHTS[case] + ["nothing was written"])
    assert not out.exists() and not out.with_name("bundle.work").exists()


@pytest.mark.parametrize("flag", ["--out", "--work"])
def test_an_out_or_work_that_cannot_be_created_is_refused_before_any_work(raw_teacher, tmp_path, capsys, flag):
    """Permission bits said /proc was writable (to root, and its mode is r-x otherwise): --work /proc/w ended in
    a FileNotFoundError traceback, and --out /proc/b ran every stage and failed at the last one, publishing."""
    out, work = tmp_path / "bundle", tmp_path / "work"
    if flag == "--out":
        out = Path("/proc/edgeglm-test-bundle")
    else:
        work = Path("/proc/edgeglm-test-work")
    code = main(["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe",
                 str(QUICK), "--out", str(out), "--work", str(work), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{flag} /proc/edgeglm-test-" in err and "cannot write there" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, recipe", [
    ("[prune] calibration_seq_len = 64", {}),
    ("[distill] seq_len = 64", {"calibration_seq_len = 64": "calibration_seq_len = 32"}),
    ("[eval] seq_len = 64", {"calibration_seq_len = 64": "calibration_seq_len = 32",
                             "seq_len = 64\nlr": "seq_len = 32\nlr"}),
])
def test_windows_longer_than_the_teachers_context_window_are_refused(raw_teacher, tmp_path, capsys, setting,
                                                                     recipe):
    """A teacher of 48 positions was distilled and scored on windows of 64 without a word: positions it never
    saw, that the edge runtime never runs."""
    teacher = tmp_path / "teacher"
    shutil.copytree(raw_teacher, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["max_position_embeddings"] = 48
    (teacher / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "bundle"
    _build_refused(capsys, teacher, corpus_files(), _recipe(tmp_path, **recipe), out,
                   [f"recipe.toml: {setting} is longer than the teacher's context window (max_position_embeddings "
                    f"= 48 in {teacher / 'config.json'}): must be <= 48"])
    assert not out.exists() and not out.with_name("bundle.work").exists()


def test_every_problem_the_recipe_has_with_the_teacher_comes_in_one_line(raw_teacher, tmp_path, capsys):
    """The checks against the teacher (sizes to keep, windows within its context) stopped at the first: a recipe
    with four problems took four runs to fix."""
    teacher = tmp_path / "teacher"
    shutil.copytree(raw_teacher, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["max_position_embeddings"] = 48
    (teacher / "config.json").write_text(json.dumps(cfg))
    recipe = _recipe(tmp_path, **{"target_fraction = 0.5": "num_layers = 5\nintermediate_size = 100000",
                                  "num_key_value_heads = 1": "num_key_value_heads = 9"})
    out = tmp_path / "bundle"
    _build_refused(capsys, teacher, corpus_files(), recipe, out, [
        f"[prune]: num_layers=5 is out of range: keep 1..{cfg['num_hidden_layers']} decoder layers",
        f"[prune]: intermediate_size=100000 is out of range: keep 1..{cfg['intermediate_size']}",
        f"[prune]: num_key_value_heads=9 is out of range: keep 1..{cfg['num_key_value_heads']}",
        "[prune] calibration_seq_len = 64 is longer", "[distill] seq_len = 64 is longer",
        "[eval] seq_len = 64 is longer", "must be <= 48; nothing was written"])
    assert not out.exists() and not out.with_name("bundle.work").exists()


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_an_out_that_names_no_directory_is_one_line(raw_teacher, out):
    from models.build import BuildError, BuildInputs
    with pytest.raises(BuildError, match=f"--out {re.escape(out)}: name a directory for the bundle"):
        BuildInputs.create(raw_teacher, corpus_files(), QUICK, out)


def test_a_failed_stage_stays_resumable_and_resume_takes_a_fixed_device(raw_teacher, tmp_path, capsys,
                                                                      monkeypatch):
    import models.build
    from models.distill import DistillError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in corpus_files():
        shutil.copy(f, corpus / f.name)
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = ["build", "--teacher", str(raw_teacher), "--corpus", str(corpus), "--recipe", str(QUICK),
            "--out", str(out), "--work", str(work), "--quiet"]

    def fail(message):
        def stage(*_args, **_kwargs):
            raise DistillError(message)
        return stage

    def run(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    monkeypatch.setattr(models.build, "distill", fail("the GPU went away"))
    err = run(args)
    assert "the GPU went away; the stages done (check, tokenize, prune) are kept in" in err
    assert "rerun with --resume once the cause is fixed" in err and f"or remove {work} to start over" in err
    assert (work / "pruned").is_dir() and not out.exists()
    assert "a build stopped after prune); pass --resume" in run(args)

    # --resume with a changed device, description and checkpoint_every: the finished prune is not repeated
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(QUICK.read_text().replace('device = "cpu"', 'device = "auto"')
                     .replace("checkpoint_every = 8", "checkpoint_every = 4")
                     .replace('description = "', 'description = "fixed: '))
    monkeypatch.setattr(models.build, "run_prune", fail("prune ran again"))
    monkeypatch.setattr(models.build, "distill", fail("reached distill again"))
    resume = [a if a != str(QUICK) else str(fixed) for a in args] + ["--resume"]
    assert "reached distill again" in run(resume)

    # a setting that shapes a stage done is refused, by name
    other = tmp_path / "other.toml"
    other.write_text(QUICK.read_text().replace("calibration_tokens = 1024", "calibration_tokens = 512"))
    err = run([a if a != str(QUICK) else str(other) for a in args] + ["--resume"])
    assert "belongs to another build (recipe setting [prune] calibration_tokens was 1024, now 512)" in err
    assert f"after removing {work} or with another --work directory" in err

    # distillation ran out of memory before saving a step (torch's own error): one line that names the batch
    # and says a smaller one resumes; it does (the stages done kept), until distillation saves a step
    def out_of_memory(*_args, **_kwargs):
        import torch
        torch.empty((1 << 60,), dtype=torch.uint8)  # (more than any address space: refused at once)
    monkeypatch.setattr(models.build, "distill", out_of_memory)
    err = run(resume)
    assert "out of memory in stage distill (" in err and "can't allocate memory" in err
    assert "[distill] batch_size x seq_len = 8 x 64 tokens" in err and "lower [distill] batch_size or seq_len" in err
    assert "a changed [distill] setting (distillation saved no step yet) is fine" in err
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(QUICK.read_text().replace("batch_size = 8", "batch_size = 4"))
    monkeypatch.setattr(models.build, "distill", fail("reached distill again"))
    assert "reached distill again" in run([a if a != str(QUICK) else str(smaller) for a in args] + ["--resume"])
    (work / "distill").mkdir(exist_ok=True)
    (work / "distill" / "state.pt").write_bytes(b"")  # a step saved (with batch_size 4): now it is refused
    err = run(resume)
    assert "belongs to another build (recipe setting [distill] batch_size was 4, now 8)" in err
    assert "the other [distill] settings only until distillation saved a step" in err
    (work / "distill" / "state.pt").unlink()

    # and so is a corpus whose text changed under the stages done: the same lines in another order (the
    # same tokens, so the same count), then more text
    first = corpus / corpus_files()[0].name
    original = first.read_text()
    first.write_text("".join(reversed(original.splitlines(keepends=True))))
    assert "the corpus changed since" in run(resume)
    first.write_text(original)
    with open(first, "a") as f:
        f.write("\n# more text\n" * 50)
    assert "the corpus changed since" in run(resume)
    assert not out.exists()


def test_the_teacher_sha256_read_with_the_value_check_is_the_one_earlier_builds_recorded(raw_teacher, tmp_path,
                                                                                       monkeypatch):
    """The teacher's sha256 (state.json, for --resume) now comes from the read that checks every value: it must be
    the sha256 over config.json and the weight files (names and bytes) that work directories already hold, and
    it must see every byte, also when a file is read in many pieces."""
    import hashlib

    import models.checkpoint
    from models.build import teacher_sha256
    from models.checkpoint import weight_files

    def reference(teacher: Path) -> str:
        h = hashlib.sha256()
        for path in [teacher / "config.json", *weight_files(teacher)]:
            h.update(f"{path.name}\0".encode() + path.read_bytes())
        return h.hexdigest()

    assert teacher_sha256(raw_teacher) == reference(raw_teacher)
    monkeypatch.setattr(models.checkpoint, "SCAN_BYTES", 1000)  # many pieces per tensor (64 MiB in real use)
    teacher = tmp_path / "teacher"
    shutil.copytree(raw_teacher, teacher)
    with open(teacher / "model.safetensors", "r+b") as f:  # one bit of one weight
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert teacher_sha256(teacher) == reference(teacher) != reference(raw_teacher)


def test_resume_refuses_a_teacher_changed_in_place(raw_teacher, tmp_path, capsys, monkeypatch):
    """The build's identity held the teacher's path only: a teacher retrained (or fixed) in place was taken by
    --resume, which distilled the student pruned from the old teacher against the new one, without a word."""
    import models.build
    from models.distill import DistillError
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(raw_teacher, teacher)
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = ["build", "--teacher", str(teacher), "--corpus", *map(str, corpus_files()), "--recipe", str(QUICK),
            "--out", str(out), "--work", str(work), "--quiet"]

    def stop(*_args, **_kwargs):
        raise DistillError("stopped at distill")
    monkeypatch.setattr(models.build, "distill", stop)
    assert main(args) == 2 and "stopped at distill" in capsys.readouterr().err
    state = load_file(teacher / "model.safetensors")  # the same shapes, other weights
    state["model.layers.0.mlp.down_proj.weight"] *= 2
    save_file(state, teacher / "model.safetensors")
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: the teacher {teacher} changed since {work} was made" in err, err
    assert err.count("\n") == 1 and not out.exists()


def test_a_build_that_fails_before_its_state_is_kept_leaves_no_work_directory(raw_teacher, tmp_path, capsys):
    (tmp_path / "small.py").write_text(corpus_files()[0].read_text()[:500])
    work = tmp_path / "deep" / "work"
    code = main(["build", "--teacher", str(raw_teacher), "--corpus", str(tmp_path / "small.py"), "--recipe",
                 str(QUICK), "--out", str(tmp_path / "bundle"), "--work", str(work), "--quiet"])
    assert code == 2 and "corpus too small" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["small.py"]  # no work dir, nor its parent "deep"


def test_a_build_inside_its_corpus_directory_resumes_and_reads_none_of_its_own_files(raw_teacher, tmp_path,
                                                                                    capsys, monkeypatch):
    """`--corpus data --out data/bundle`: the resume read data/bundle.work/distill/state.pt as training text
    and was refused as 'not UTF-8'."""
    import models.build
    from models.distill import DistillError

    data = tmp_path / "data"
    data.mkdir()
    for f in corpus_files():
        shutil.copy(f, data / f.name)
    out = data / "bundle"
    args = ["build", "--teacher", str(raw_teacher), "--corpus", str(data), "--recipe", str(QUICK),
            "--out", str(out), "--quiet"]
    real_distill = models.build.distill

    def distill_then_stop(student, teacher, train, settings, work_dir, **kwargs):
        def stop(step, _metrics):
            if step == settings.checkpoint_every:
                raise DistillError("stopped after the first checkpoint")
        return real_distill(student, teacher, train, settings, work_dir, **kwargs, on_step=stop)

    monkeypatch.setattr(models.build, "distill", distill_then_stop)
    assert main(args) == 2 and "stopped after the first checkpoint" in capsys.readouterr().err
    assert (data / "bundle.work" / "distill" / "state.pt").is_file()
    monkeypatch.setattr(models.build, "distill", real_distill)
    code = main(args + ["--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((data / "bundle.work" / "report.json").read_text())
    assert report["distill"]["resumed_from_step"] == 8
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("flag", ["--out", "--work"])
def test_out_or_work_inside_an_existing_bundle_is_refused(raw_teacher, fp32_bundle, tmp_path, capsys, flag):
    """It used to build into the existing bundle's directory: the new bundle and its work files inside it."""
    bundle = tmp_path / "released"
    shutil.copytree(fp32_bundle, bundle)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    out = bundle / "small" if flag == "--out" else tmp_path / "small"
    work = ["--work", str(bundle / "work")] if flag == "--work" else []
    code = main(["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe",
                 str(QUICK), "--out", str(out), *work, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    where = out if flag == "--out" else bundle / "work"
    assert f"{flag} {where}: is inside the bundle {bundle}" in err and "choose a path outside any bundle" in err
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before
    assert not out.exists() and not (tmp_path / "small.work").exists()


@pytest.mark.parametrize("inside", ["out in work", "work in out"])
def test_out_and_work_inside_each_other_are_refused_before_any_work(raw_teacher, tmp_path, capsys, inside):
    """`--work W --out W/bundle` ran every stage, then ended in an OSError traceback at the very last step."""
    if inside == "out in work":
        work, out, fragment = tmp_path / "w", tmp_path / "w" / "bundle", "is inside --work"
    else:
        work, out, fragment = tmp_path / "b" / "work", tmp_path / "b", "is inside --out"
    code = main(["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe",
                 str(QUICK), "--out", str(out), "--work", str(work), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err
    assert list(tmp_path.iterdir()) == []


def test_a_work_directory_that_holds_the_teacher_or_is_not_a_builds_is_refused(raw_teacher, tmp_path, capsys):
    """`--work TEACHER` was told "not empty ...; remove it" (the teacher checkpoint) and with --resume wrote the
    build's files into the checkpoint; `--work DIR --resume` on a folder of other files left tokens/ in it
    after a failure."""
    import shutil

    teacher = shutil.copytree(raw_teacher, tmp_path / "teacher")
    before = sorted(p.relative_to(teacher) for p in teacher.rglob("*"))
    base = ["build", "--corpus", *map(str, corpus_files()), "--recipe", str(QUICK), "--quiet"]
    for work, resume in ((teacher, False), (teacher, True), (tmp_path, True)):
        code = main([*base, "--teacher", str(teacher), "--out", str(tmp_path / "out"), "--work", str(work),
                     *(["--resume"] if resume else [])])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"--work {work}: holds the teacher checkpoint {teacher}; choose a --work directory of its own" in err
    assert sorted(p.relative_to(teacher) for p in teacher.rglob("*")) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code = main([*base, "--teacher", str(teacher), "--out", str(tmp_path / "out"), "--work", str(mine), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and f"--resume: --work {mine} holds files but no state.json (not a build's work directory)" \
        in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_the_report_of_a_teacher_that_predicts_nothing_right_is_written():
    """A teacher with top-1 0 (random weights, a corpus it never saw) ended the build in ZeroDivisionError at
    the report, every --resume again; the relative column is "-" instead."""
    from models.evaluate import StageMetrics, format_report

    def stage(name, top1):
        return StageMetrics(name, "pytorch fp32", 100, 5000.0, top1, None, None, 10, 8, 40)

    table = format_report([stage("teacher", 0.0), stage("student", 0.01)])
    assert table.splitlines()[-1].startswith("| student | pytorch fp32 |") and "| 1.0% | - |" in table


def test_distillation_keeps_an_inherited_ignored_ctrl_c():
    """A build started in the background by a script inherits SIGINT ignored; every stage kept that but
    distillation, which installed its own handler and stopped on a Ctrl-C meant for the script."""
    import signal

    from models.distill import _CtrlC

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _CtrlC():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _CtrlC() as ctrl_c:
            assert signal.getsignal(signal.SIGINT) == ctrl_c._handle  # a terminal's Ctrl-C: saved and stopped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_full_disk_during_a_stage_is_one_line_and_keeps_the_build_resumable(raw_teacher, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    import models.build as build_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "bundle.work" / "pruned"))
    monkeypatch.setattr(build_module, "save_checkpoint", full)
    _build_refused(capsys, raw_teacher, corpus_files(), QUICK, tmp_path / "bundle",
                   [f"{tmp_path / 'bundle.work' / 'pruned'}: No space left on device", "--resume"])
    assert (tmp_path / "bundle.work").is_dir()  # the finished stages stay for --resume



@pytest.mark.parametrize("importance, refused", [("activation", True), ("magnitude", False)])
def test_calibration_tokens_must_fit_the_corpus_only_for_activation_importance(importance, refused):
    """Magnitude importance reads no text: a small corpus is not refused for a calibration it never does."""
    from models.build import BuildError, check_data
    from models.data import TokenCorpus
    from models.distill import DistillSettings
    from models.recipe import parse_recipe

    recipe = parse_recipe(f'[prune]\nimportance = "{importance}"\ncalibration_tokens = 16384\n[eval]\n'
                          f'heldout_tokens = 512\nseq_len = 128\n'.encode(), "r.toml")
    corpus = TokenCorpus(Path("unused.bin"), 12000, (), 0)
    settings = DistillSettings(seq_len=64, batch_size=2, token_budget=128 * 40, warmup_steps=2)
    if refused:
        with pytest.raises(BuildError, match="calibration_tokens = 16384 must be at most that"):
            check_data(recipe, corpus, settings)
    else:
        assert check_data(recipe, corpus, settings)["calibration_tokens"] == 0  # as the prune section says


@pytest.mark.parametrize("heldout_tokens, scored", [(1000, 960), (32768, 1984)])
def test_the_report_counts_the_tokens_really_scored_and_calibrated(tmp_path, heldout_tokens, scored):
    """The report said min(held-out, heldout_tokens) tokens were scored, and calibration_tokens calibrated; the
    stages run on whole windows only: 2000 held-out tokens with at most 1000 scored are 15 windows of 64 (960),
    with 32768 allowed 31 windows (1984, the last token of a window being only a target)."""
    import numpy as np

    from models.build import calibration_windows, check_data
    from models.data import TokenCorpus, corpus_from_ids
    from models.distill import DistillSettings
    from models.evaluate import heldout_windows
    from models.recipe import parse_recipe

    recipe = parse_recipe(f'[prune]\ncalibration_tokens = 1000\ncalibration_seq_len = 64\n[eval]\n'
                          f'heldout_fraction = 0.1\nheldout_tokens = {heldout_tokens}\nseq_len = 64\n'.encode(),
                          "r.toml")
    corpus = TokenCorpus(Path("unused.bin"), 20000, (), 0)
    settings = DistillSettings(seq_len=64, batch_size=2, token_budget=128 * 40, warmup_steps=2)
    data = check_data(recipe, corpus, settings)
    assert data["heldout_tokens"] == 2000
    windows = heldout_windows(np.arange(2000), 64, heldout_tokens)  # what the evaluate stage scores
    assert data["heldout_tokens_scored"] == scored == windows[:, 1:].numel()
    train = corpus_from_ids(np.arange(18000) % 500, tmp_path)
    assert data["calibration_tokens"] == 960 == calibration_windows(train, 1000, 64).numel()


# --- Ctrl-C: what is kept is what the line says ------------------------------------------------------

# Each interrupted build runs in its own process, as a terminal's Ctrl-C reaches one: a real SIGINT raised at a
# chosen point (the hooks below) in `edgeglm build`. (In the test process itself a SIGINT once ended the whole
# suite with a segmentation fault after hundreds of other tests; a child process keeps that from hiding the rest.)
_DRIVER = r"""
import json, signal, sys
import agent.cli, models.build, models.data

hook, argv = sys.argv[1], json.loads(sys.argv[2])

SIG = signal.SIGTERM if hook.endswith("-sigterm") else signal.SIGINT  # `timeout`, docker, systemd, Kubernetes
hook = hook.removesuffix("-sigterm")

def ctrl_c(*_args, **_kwargs):
    signal.raise_signal(SIG)  # Python raises KeyboardInterrupt from its handler (the CLI's, for SIGTERM)
    raise AssertionError("the signal did not interrupt")

def never(*_args, **_kwargs):
    raise AssertionError("a stage done ran again")

if hook == "tokenizing":  # the first corpus file is tokenized, the second is being read
    real_pieces, files = models.data._pieces, []
    def pieces(path):
        files.append(path)
        if len(files) == 2:
            ctrl_c()
        yield from real_pieces(path)
    models.data._pieces = pieces
elif hook == "before":  # while the factory's modules load
    agent.cli._factory = ctrl_c
elif hook == "check":  # tokenizing finished, the corpus-size checks had not
    models.build._sha256_file = ctrl_c
else:
    models.data._pieces = never  # a resumed build: the tokens are not made again
    if hook == "prune":
        models.build.run_prune = ctrl_c
    elif hook == "distill":  # models.distill's handler lets step 4 finish and saves it
        real_distill = models.build.distill
        def distill(student, teacher, train, settings, work_dir, **kwargs):
            def on_step(step, _metrics):
                if step == 3:
                    signal.raise_signal(SIG)
            return real_distill(student, teacher, train, settings, work_dir, **kwargs, on_step=on_step)
        models.build.distill = distill
    elif hook in ("export", "finish"):
        models.build.run_prune = never
        if hook == "export":
            models.build.run_export = ctrl_c
sys.exit(agent.cli.main(argv))
"""


def _build(hook: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`edgeglm build argv` in a child process, Ctrl-C'd where `hook` says."""
    return subprocess.run([sys.executable, "-c", _DRIVER, hook, json.dumps(argv)], capture_output=True, text=True,
                          timeout=600)


def _said(proc: subprocess.CompletedProcess, line: str) -> None:
    assert line in proc.stderr.splitlines() and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_while_tokenizing_a_fresh_build_keeps_nothing_and_does_not_promise_resume(raw_teacher, tmp_path):
    """It used to remove the work directory and then say that the finished stages were kept in it and that
    --resume continued."""
    work = tmp_path / "deep" / "work"
    proc = _build("tokenizing", ["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()),
                                 "--recipe", str(QUICK), "--out", str(tmp_path / "bundle"), "--work", str(work),
                                 "--quiet"])
    assert proc.returncode == 130, proc.stderr
    _said(proc, "edgeglm build: interrupted while tokenizing the corpus, before any stage finished: nothing was "
                "kept; run the same command again to start over")
    assert list(tmp_path.iterdir()) == []  # no work directory (nor its parent), so the same command starts over


@pytest.mark.lifecycle
def test_ctrl_c_at_every_stage_keeps_what_it_says_and_resume_continues(raw_teacher, tmp_path, capsys):
    """A Ctrl-C (a real SIGINT) at each point of one build: the line names the stages kept, they are on disk,
    and the same command with --resume continues from them (nothing done is repeated) to the bundle."""
    out, work = tmp_path / "bundle", tmp_path / "bundle.work"
    args = ["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe", str(QUICK),
            "--out", str(out), "--quiet"]

    def interrupted(hook: str, argv, doing: str, done: str, step: str = "") -> subprocess.CompletedProcess:
        proc = _build(hook, argv)
        assert proc.returncode == 130, proc.stderr
        _said(proc, f"edgeglm build: interrupted while {doing}; the stages done ({done}) are kept in {work}{step}: "
                    "the same command with --resume continues from there")
        assert not out.exists()
        return proc

    interrupted("check", args, "checking the corpus size", "tokenize")
    state = json.loads((work / "state.json").read_text())
    assert state["identity"]["teacher"] == str(raw_teacher.resolve()) and list(state["done"]) == ["tokenize"]
    assert main(args) == 2 and "(a build stopped after tokenize); pass --resume" in capsys.readouterr().err
    interrupted("prune", args + ["--resume"], "pruning", "check, tokenize")
    interrupted("distill", args + ["--resume"], "distilling", "check, tokenize, prune",
                ", with distillation's last saved training step (step 4 of 16)")
    assert (work / "distill" / "state.pt").is_file() and not (work / "distilled").exists()
    # without --quiet, a resume says what it does not redo and the step distillation continues after
    proc = interrupted("export", [a for a in args if a != "--quiet"] + ["--resume"], "exporting the bundle",
                       "check, tokenize, prune, distill, evaluate")
    assert f"edgeglm build: resuming {work}: done before (check, tokenize, prune) kept, not redone" in proc.stderr
    assert f"distill: resuming after step 4 of 16 (saved in {work / 'distill' / 'state.pt'})" in proc.stderr
    # the top bar counts stages without an ETA (an average per stage was minutes off); stage bars keep theirs
    tops = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("build:")]
    assert tops and all("stages [" in line and "<" not in line for line in tops), tops
    proc = _build("finish", args + ["--resume"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "report.json").read_text())
    assert report["distill"]["resumed_from_step"] == 4 and (out / "manifest.json").is_file()


@pytest.mark.lifecycle
def test_sigterm_stops_a_build_as_ctrl_c_does_saving_the_steps_trained(raw_teacher, tmp_path):
    """SIGTERM (what `timeout`, `docker stop`, systemd and Kubernetes send) killed the build on the spot: the
    training steps since the last checkpoint were lost (edge-small saves every 200), and one sent while tokenizing
    left a work directory that neither the same command nor --resume took."""
    out, work = tmp_path / "bundle", tmp_path / "bundle.work"
    args = ["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe", str(QUICK),
            "--out", str(out), "--quiet"]
    proc = _build("tokenizing-sigterm", args)
    assert proc.returncode == 143, proc.stderr
    _said(proc, "edgeglm build: stopped (SIGTERM) while tokenizing the corpus, before any stage finished: nothing "
                "was kept; run the same command again to start over")
    assert list(tmp_path.iterdir()) == []
    for hook, argv in (("check-sigterm", args), ("prune-sigterm", args + ["--resume"])):
        proc = _build(hook, argv)
        assert proc.returncode == 143 and "stopped (SIGTERM) while" in proc.stderr, proc.stderr
    proc = _build("distill-sigterm", args + ["--resume"])
    assert proc.returncode == 143, proc.stderr
    _said(proc, f"edgeglm build: stopped (SIGTERM) while distilling; the stages done (check, tokenize, prune) are "
                f"kept in {work}, with distillation's last saved training step (step 4 of 16): the same command "
                "with --resume continues from there")
    import torch

    assert torch.load(work / "distill" / "state.pt", map_location="cpu", weights_only=False)["step"] == 4


def test_a_build_killed_while_tokenizing_leaves_a_work_directory_the_next_command_takes(raw_teacher, tmp_path):
    """SIGKILL or a power cut while tokenizing left `tokens/*.partial` and no state.json: the same command said
    "not empty ... pass --resume", and --resume said "not a build's work directory"."""
    from models.build import BuildError, BuildInputs, check_paths
    from models.recipe import load_recipe

    def checked(resume: bool) -> None:  # what `edgeglm build` checks before it writes anything
        check_paths(BuildInputs.create(raw_teacher, corpus_files(), load_recipe(str(QUICK)), tmp_path / "b", work,
                                       resume))

    work = tmp_path / "b.work"
    (work / "tokens").mkdir(parents=True)
    (work / "tokens" / "tokens-0123abcd.partial").write_bytes(b"\0" * 100)
    checked(False)
    assert not work.exists() or list(work.iterdir()) == []  # the partial file went: a fresh build starts there
    (work / "tokens").mkdir(parents=True, exist_ok=True)
    (work / "tokens" / "tokens-0123abcd.bin").write_bytes(b"\0" * 8)  # a finished token file: kept, --resume goes on
    (work / "tokens" / "tokens-0123abcd.json.partial").write_text("{")
    checked(True)
    assert sorted(p.name for p in (work / "tokens").iterdir()) == ["tokens-0123abcd.bin"]
    (work / "notes.txt").write_text("someone's")  # anything else: not the build's to clear
    with pytest.raises(BuildError, match="holds files but no state.json"):
        checked(True)


def test_a_full_disk_while_tokenizing_or_saving_a_training_step_is_one_line(raw_teacher, tmp_path, capsys,
                                                                          monkeypatch):
    """A full disk while tokenizing ended in a traceback (only the stages' OSErrors were one line), and one
    while distillation saved its state in torch's RuntimeError ("unexpected pos ..."), leaving state.partial."""
    import errno

    import torch

    import models.data
    import models.distill

    real_pieces = models.data._pieces

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "b.work" / "tokens" / "t.partial"))
        yield from real_pieces(path)
    monkeypatch.setattr(models.data, "_pieces", full)
    _build_refused(capsys, raw_teacher, corpus_files(), QUICK, tmp_path / "b",
                   ["t.partial: No space left on device; nothing was kept"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(models.data, "_pieces", real_pieces)

    real_save = torch.save

    def torch_full(obj, path, *a, **k):
        Path(path).write_bytes(b"cut short")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 120715392 vs 120715344")
    monkeypatch.setattr(models.distill.torch, "save", torch_full)
    _build_refused(capsys, raw_teacher, corpus_files(), QUICK, tmp_path / "b",
                   ["state.pt: cannot save the training state of step 8: the write failed ([enforce fail",
                    "a full disk?", "the stages done (check, tokenize, prune) are kept", "--resume"])
    assert not list((tmp_path / "b.work" / "distill").glob("*.partial"))
    monkeypatch.setattr(models.distill.torch, "save", real_save)


def test_ctrl_c_before_the_build_starts_says_nothing_was_written(tmp_path):
    proc = _build("before", ["build", "--teacher", str(tmp_path / "t"), "--corpus", str(tmp_path / "c.txt"),
                             "--recipe", "quick", "--out", str(tmp_path / "bundle"), "--quiet"])
    assert proc.returncode == 130, proc.stderr
    _said(proc, "edgeglm build: interrupted before the build started: nothing was written")
    assert list(tmp_path.iterdir()) == []


# --- the report of a resumed build ----------------------------------------------------------------------

def test_a_resume_after_distillation_finished_but_was_not_recorded_reports_its_real_time(raw_teacher, tmp_path,
                                                                                          capsys, monkeypatch):
    """The crash came after the last training step was saved and before the stage was recorded: the resumed
    distillation trains nothing, and the report said seconds ~0 and tokens_per_second 0."""
    import errno

    import models.build

    real_save = models.build.save_checkpoint

    def full_at_distilled(model, path, **kwargs):
        if Path(path).name == "distilled":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(model, path, **kwargs)

    out, work = tmp_path / "bundle", tmp_path / "bundle.work"
    args = ["build", "--teacher", str(raw_teacher), "--corpus", *map(str, corpus_files()), "--recipe", str(QUICK),
            "--out", str(out), "--quiet"]
    monkeypatch.setattr(models.build, "save_checkpoint", full_at_distilled)
    assert main(args) == 2
    assert "No space left on device; the stages done (check, tokenize, prune) are kept" in capsys.readouterr().err
    import torch

    saved = torch.load(work / "distill" / "state.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 16 and saved["train_seconds"] > 0

    monkeypatch.setattr(models.build, "save_checkpoint", real_save)
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    report = json.loads((work / "report.json").read_text())["distill"]
    assert report["resumed_from_step"] == 16 and report["seconds_this_run"] == 0.0
    assert report["seconds"] == saved["train_seconds"]  # the first run's, as recorded, not this run's ~0
    assert report["tokens_per_second"] == pytest.approx(report["tokens"] / saved["train_seconds"])
    assert report["note"] is None and report["device"] == "cpu"
    assert f"{report['seconds']:.1f} s of training" in (work / "report.md").read_text()


def test_an_out_name_that_is_no_bundle_name_with_a_shipped_recipe_says_to_copy_it(tmp_path):
    """With `--recipe quick` the hint named the installed recipe file inside site-packages to edit."""
    from models.build import BuildError, BuildInputs, check_bundle_name
    from models.recipe import load_recipe

    inputs = BuildInputs.create(tmp_path / "teacher", (tmp_path / "c.txt",), load_recipe("quick"),
                                tmp_path / "my bundle")
    with pytest.raises(BuildError) as info:
        check_bundle_name(inputs)
    assert "set [export] name in a copy of the 'quick' recipe (--recipe COPY.toml) or choose another --out" \
        in str(info.value) and "site-packages" not in str(info.value) and "recipes/quick.toml" not in str(info.value)
