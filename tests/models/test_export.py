"""`edgeglm export` refuses bad input in one line, exit 2, before any work, leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import models.export
from agent.cli import main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint: these tests never get as far as its weights."""
    from models.tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", train_steps=0)


@pytest.fixture
def no_work(monkeypatch):
    """Loading the checkpoint is the first piece of work: a check that comes later fails the test."""
    def load(*_args, **_kwargs):
        raise AssertionError("the export started before the input was checked")

    monkeypatch.setattr(models.export, "load_checkpoint", load)


def _export(capsys, *args) -> str:
    code = main(["export", *map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if not line.startswith("edgeglm export: warning: ")]  # (own lines)
    assert len(errors) == 1 and errors[0].startswith("edgeglm export: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags,fragment", [
    (["--version", "banana"], "--version 'banana': must look like 1.2.3"),
    (["--version", "v1"], "--version 'v1': must look like 1.2.3"),
    (["--version", "01.2.0"], "--version '01.2.0': must look like 1.2.3 (one to three numbers without leading zeros"),
    (["--name", "../x y"], "--name '../x y': is not a bundle name: use 1 to 128 letters, digits"),
    (["--name", ""], "--name '': is empty; give a bundle name, or leave --name out"),
])
def test_name_and_version_are_checked_before_any_work(tiny_ckpt, tmp_path, capsys, no_work, flags, fragment):
    err = _export(capsys, tiny_ckpt, "--out", tmp_path / "by", *flags)
    assert fragment in err and "nothing was exported" in err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_directory_name_that_is_no_bundle_name_needs_name(tiny_ckpt, tmp_path, capsys, no_work):
    odd = tmp_path / "my model"
    shutil.copytree(tiny_ckpt, odd)
    err = _export(capsys, odd, "--out", tmp_path / "by")
    assert "the directory's name 'my model' is not a bundle name" in err and "pass --name" in err
    assert not (tmp_path / "by").exists()


def test_a_file_of_the_checkpoint_is_named_as_such(tiny_ckpt, tmp_path, capsys, no_work):
    err = _export(capsys, tiny_ckpt / "model.safetensors", "--out", tmp_path / "by")
    assert f"{tiny_ckpt / 'model.safetensors'}: is a file; give the checkpoint's directory ({tiny_ckpt})" in err
    assert "not found" not in err


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_out_that_cannot_be_written_is_named_before_any_work(tiny_ckpt, tmp_path, capsys, no_work, where):
    if where == "proc":
        if not Path("/proc").is_dir():
            pytest.skip("no /proc here")
        out = Path("/proc") / f"edgeglm-test-{os.getpid()}"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "bundle"
    err = _export(capsys, tiny_ckpt, "--out", out)
    assert f"--out {out}: not writable: cannot create a directory in {out.parent}" in err
    assert "choose a directory you can write to" in err
    assert not out.exists()


def test_a_failed_export_leaves_no_staging_and_no_directories_it_made(tiny_ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    err = _export(capsys, broken, "--out", tmp_path / "new" / "dirs" / "bundle")
    assert "model_type='llama' is not supported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_staging_left_by_a_killed_export_is_removed_by_the_next_one(tiny_ckpt, tmp_path, capsys, caplog):
    """A SIGKILLed export leaves `.NAME.partial-PID@HOST-...` (a model's size) next to --out; the next export
    to that --out removes the ones whose process is gone, and only those."""
    import socket
    import subprocess
    import sys

    host = socket.gethostname()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    left = {name: tmp_path / name for name in (
        f".bundle.partial-{gone}@{host}-k1ll3d_0",   # a killed export of this host (mkdtemp's 8 characters): removed
        f".bundle.partial-{gone}@{host}",            # a killed build's publishing step: removed
        f".bundle.partial-{os.getppid()}@{host}-x",  # its process still runs: kept
        f".bundle.partial-{gone}@{host}x-y",         # another host whose name starts with ours: kept
        f".bundle.partial-{gone}@{host}-2-k3j4h5g6",  # host "{host}-2" on a shared --out (NFS): kept
        ".bundle.partial-old12345",                   # the old unowned form, untouched for 25 hours: removed
        ".bundle.partial-abc123",                     # the old unowned form, recent: kept
        f".other.partial-{gone}@{host}-z",           # another --out's: kept
    )}
    for d in left.values():
        d.mkdir()
        (d / "model.onnx.data").write_bytes(b"\0" * 1024)
    day_ago = time.time() - 25 * 3600
    os.utime(left[".bundle.partial-old12345"], (day_ago, day_ago))
    broken = tmp_path / "broken"  # fails after the staging step, so nothing new is left behind
    shutil.copytree(tiny_ckpt, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="edgeglm.export"):
        err = _export(capsys, broken, "--out", tmp_path / "bundle")
    assert err.count("edgeglm export: warning: removed ") == 3, err  # lines of their own, named as the command's
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert kept == sorted(list(left)[2:5] + list(left)[6:])
    assert sum("left by an interrupted run" in r.getMessage() for r in caplog.records) == 2
    assert sum("untouched for 25 hours" in r.getMessage() for r in caplog.records) == 1


def test_a_checkpoint_with_a_nan_weight_exports_no_bundle(tiny_ckpt, tmp_path, capsys):
    """It used to export a bundle whose golden reference was NaN (an inf weight: a traceback, exit 1)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"][1, 2] = float("nan")
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    err = _export(capsys, broken, "--out", tmp_path / "bundle")
    assert "tensor 'model.layers.0.self_attn.o_proj.weight' holds 1 non-finite value(s) (NaN or inf)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("where,fragment", [
    ("checkpoint", "is the checkpoint's directory or holds it; --force would delete"),
    ("parent", "is the checkpoint's directory or holds it; --force would delete"),
    ("other files", "exists and is not a bundle (no manifest.json); --force replaces only a bundle"),
])
def test_force_never_replaces_the_checkpoint_or_a_directory_that_is_no_bundle(tiny_ckpt, tmp_path, capsys,
                                                                              no_work, where, fragment):
    """`--out` = the checkpoint (or its parent) with --force used to delete the checkpoint and put the bundle there."""
    ckpt = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_ckpt, ckpt)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    out = {"checkpoint": ckpt, "parent": tmp_path / "models", "other files": tmp_path / "notes"}[where]
    err = _export(capsys, ckpt, "--out", out, "--force")
    assert f"--out {out}: {fragment}" in err and "nothing was exported" in err
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in tiny_ckpt.iterdir())
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "notes"]


def test_an_out_inside_an_existing_bundle_is_refused(tiny_ckpt, fp32_bundle, tmp_path, capsys, no_work):
    bundle = tmp_path / "released"
    shutil.copytree(fp32_bundle, bundle)
    err = _export(capsys, tiny_ckpt, "--out", bundle / "new")
    assert f"--out {bundle / 'new'}: is inside the bundle {bundle}" in err and "nothing was exported" in err
    assert not (bundle / "new").exists() and not list(bundle.glob(".new.partial-*"))


def test_a_manifest_json_of_another_project_higher_up_is_no_bundle(tmp_path):
    from models.checkpoint import enclosing_bundle

    (tmp_path / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    assert enclosing_bundle(tmp_path / "bundles" / "new") is None


def test_force_never_replaces_a_directory_whose_manifest_json_is_another_projects(tiny_ckpt, tmp_path, capsys,
                                                                                  no_work):
    """A web app's or a browser extension's directory has a manifest.json too: --force deleted it whole."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text('{"name": "my app", "start_url": "/", "icons": []}\n')
    (site / "index.html").write_text("<html>mine</html>\n")
    err = _export(capsys, tiny_ckpt, "--out", site, "--force")
    assert (f"--out {site}: exists and is not a bundle (its manifest.json is no bundle manifest); --force "
            "replaces only a bundle") in err and "nothing was exported" in err
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]
    assert (site / "index.html").read_text() == "<html>mine</html>\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_force_leaves_a_directory_named_out_old_alone(tiny_ckpt, tmp_path, capsys):
    """--force moved the replaced bundle to OUT.old after deleting whatever was there: a kept copy of the
    previous release (`cp -r bundle bundle.old`, a common habit) was deleted without a word."""
    out, kept = tmp_path / "bundle", tmp_path / "bundle.old"

    def export(version: str, *flags: str) -> None:
        code = main(["export", str(tiny_ckpt), "--out", str(out), "--precision", "fp32", "--backends", "onnxruntime",
                     "--name", "tiny", "--version", version, "--quiet", *flags])
        assert code == 0, capsys.readouterr().err

    export("1.0.0")
    shutil.copytree(out, kept)
    (kept / "RELEASE-NOTES.txt").write_text("1.0.0 as shipped\n")
    export("2.0.0", "--force")
    assert json.loads((out / "manifest.json").read_text())["version"] == "2.0.0"
    assert (kept / "RELEASE-NOTES.txt").read_text() == "1.0.0 as shipped\n"
    assert json.loads((kept / "manifest.json").read_text())["version"] == "1.0.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.old"]  # nothing else left behind


def test_a_tokenizer_with_more_tokens_than_the_vocabulary_is_refused_in_one_line(tiny_ckpt, tmp_path, capsys):
    """Another model's tokenizer.json beside the weights: token ids past the embedding table ended the export
    in `IndexError: index out of range in self` from inside torch."""
    from checkpoints import hf_checkpoint

    ckpt = hf_checkpoint(tmp_path / "ckpt", vocab_size=320)  # transformers writes the weights; no tokenizer
    shutil.copyfile(tiny_ckpt / "tokenizer.json", ckpt / "tokenizer.json")
    capsys.readouterr()  # transformers' progress bar
    tok = json.loads((tiny_ckpt / "tokenizer.json").read_text())
    tokens = len(set(tok["model"]["vocab"].values()) | {t["id"] for t in tok.get("added_tokens", [])})
    assert tokens > 320
    err = _export(capsys, ckpt, "--out", tmp_path / "bundle")
    assert (f"{ckpt / 'tokenizer.json'}: has {tokens} tokens, more than the model's vocab_size 320 (config.json)"
            in err) and "nothing was exported" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_out_that_is_a_dangling_symlink_is_refused_before_any_work(tiny_ckpt, tmp_path, capsys, no_work):
    """A symlink to a removed release (`bundle -> releases/1.0.0`): the export ran to the end and then failed in
    a NotADirectoryError traceback renaming its staging directory onto the link."""
    out = tmp_path / "bundle"
    out.symlink_to(tmp_path / "releases" / "1.0.0")
    err = _export(capsys, tiny_ckpt, "--out", out)
    assert f"{out}: already exists; pass --force to replace it" in err
    err = _export(capsys, tiny_ckpt, "--out", out, "--force")
    assert f"--out {out}: exists and is not a bundle (no manifest.json)" in err and "nothing was exported" in err
    assert out.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_an_out_that_is_a_file_is_called_a_file(tiny_ckpt, tmp_path, capsys, no_work):
    """`--out notes.txt` was told "already exists; pass --force to replace it (the existing bundle is untouched)",
    and --force then refused it as not a bundle."""
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    err = _export(capsys, tiny_ckpt, "--out", out)
    assert f"--out {out}: is a file, not a bundle directory; choose another --out; nothing was exported" in err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("command", ["export", "build"])
def test_every_argument_of_the_factory_commands_says_what_it_is_in_help(command, capsys):
    """`edgeglm export --help` showed the checkpoint argument and --precision with no words at all."""
    import argparse

    from agent.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    silent = [a.dest for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert silent == [], f"edgeglm {command}: no help text for {silent}"
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    shown = capsys.readouterr().out
    if command == "export":
        assert "checkpoint directory to export" in shown and "int8 (default" in shown and "fp32 (unquantized" in shown


@pytest.mark.parametrize("shape", [dict(head_dim=40, hidden_size=80, num_attention_heads=2, num_key_value_heads=1,
                                        partial_rotary_factor=0.5),
                                   dict(head_dim=32, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                                        partial_rotary_factor=0.25, max_position_embeddings=48)])
def test_head_shapes_and_windows_gqa_cannot_rotate_export_and_answer_like_transformers(tmp_path, shape):
    """head_dim 40, or a rotary of 8 dims on 32, made the ONNX Runtime export end in ONNX Runtime's traceback
    ("head_size shall be a multiple of 16", "cos_cache dimension 1 must be ... a multiple of 8"): RotaryEmbedding
    nodes now; and a context window shorter than the golden check (35 + 32 positions) was checked past it (a
    traceback on ONNX Runtime, a meaningless check on OpenVINO): the check is cut to the window."""
    import numpy as np
    import torch
    from transformers import GlmForCausalLM

    from agent.model import load_model
    from checkpoints import hf_checkpoint
    from models.tiny import train_tokenizer
    from runtime.golden import teacher_forced_logits

    ckpt = hf_checkpoint(tmp_path / "ckpt", vocab_size=320, intermediate_size=96, **shape)
    train_tokenizer("def f(x):\n    return x + 1\n" * 50, 300).save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "bundle"
    manifest = models.export.export_bundle(ckpt, out, models.export.ExportOptions(precision="fp32", name="odd",
                                                                                  version="1.0.0"),
                                           show_progress=False)
    positions = len(manifest.golden.prompt_ids) + len(manifest.golden.reference.tokens)
    assert positions <= shape.get("max_position_embeddings", 512)
    ref_model = GlmForCausalLM.from_pretrained(ckpt).eval()
    prompt, more = list(range(3, 15)), list(range(20, 26))
    with torch.no_grad():
        ref = ref_model(torch.tensor([prompt + more])).logits[0, len(prompt) - 1:].numpy()
    for backend in ("onnxruntime", "openvino"):
        ours = teacher_forced_logits(load_model(out, backend).engine, prompt, more)
        np.testing.assert_allclose(ours, ref[:len(ours)], atol=2e-4, err_msg=backend)


def test_a_head_dim_onnx_runtime_cannot_run_is_one_line_naming_it(tmp_path, capsys):
    from checkpoints import hf_checkpoint
    from models.tiny import train_tokenizer

    ckpt = hf_checkpoint(tmp_path / "ckpt", head_dim=20, hidden_size=40, num_attention_heads=2, num_key_value_heads=1,
                         partial_rotary_factor=0.4)
    train_tokenizer("def f(x):\n    return x + 1\n" * 50, 300).save(str(ckpt / "tokenizer.json"))
    capsys.readouterr()  # transformers' own output while saving it
    err = _export(capsys, ckpt, "--out", tmp_path / "b", "--name", "odd")
    assert f"{ckpt / 'config.json'}: head_dim 20 (config.json) is not a multiple of 8, which ONNX Runtime's " \
           "GroupQueryAttention needs; export it with --backends openvino; nothing was exported" in err
    assert not (tmp_path / "b").exists()
