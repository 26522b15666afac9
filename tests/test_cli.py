"""End to end through the `edgeglm` command, as a user types it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from pathlib import Path

import pytest

from agent.model import load_model
from checkpoints import hf_checkpoint
from runtime.generate import SamplingParams, generate


def edgeglm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def test_export_then_generate_streams_text_and_reports_speed(trained_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = edgeglm("export", trained_checkpoint, "--out", out, "--name", "tiny", "--version", "2.0.1",
                   "--chunk-kib", "64")
    assert proc.returncode == 0, proc.stderr
    assert "export" in proc.stderr  # the progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "tiny" and manifest["version"] == "2.0.1" and manifest["precision"] == "int8"
    assert {f["path"] for f in manifest["files"]} >= {
        "tokenizer.json", "onnxruntime/model.onnx", "openvino/openvino_model.xml", "openvino/openvino_model.bin"}
    assert not list(tmp_path.glob(".bundle.partial-*"))
    assert manifest["chunk_size"] == 65536
    import hashlib
    for f in manifest["files"]:  # every OTA transfer chunk is pinned by the manifest
        data = (out / f["path"]).read_bytes()
        assert f["chunks"] == [hashlib.sha256(data[i:i + 65536]).hexdigest() for i in range(0, len(data), 65536)]
    prompt = "class Queue:\n    def "
    for backend in ("onnxruntime", "openvino"):
        gen = edgeglm("generate", "--bundle", out, "--backend", backend, "--max-tokens", "12", prompt)
        assert gen.returncode == 0, gen.stderr
        model = load_model(out, backend)
        tokens = list(generate(model.engine, model.tokenizer.encode(prompt).ids, SamplingParams(max_tokens=12)))
        assert gen.stdout == model.tokenizer.decode(tokens) + "\n"
        assert f"[{backend}]" in gen.stderr and "TTFT" in gen.stderr and "tokens/s" in gen.stderr


def test_probe_json_lists_backends():
    proc = edgeglm("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    names = {b["name"]: b for b in info["backends"]}
    assert names["openvino"]["available"] and names["onnxruntime"]["available"]
    assert info["cpu"]["logical_cores"] >= 1 and len(info["fingerprint"]) == 16


def test_export_refuses_existing_output_without_force(trained_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(edgeglm("export", trained_checkpoint, "--out", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("breakage,message", [
    ("model_type", "model_type='llama' is not supported"),
    ("missing_shard", "not found"),
    ("shape", "has shape (64, 96), but config.json implies (64, 128)"),
    ("truncated", "corrupted or truncated"),
])
def test_export_of_a_bad_checkpoint_fails_cleanly(tmp_path, breakage, message):
    ckpt = hf_checkpoint(tmp_path / "ckpt", max_shard_size="60KB" if breakage == "missing_shard" else None)
    cfg = json.loads((ckpt / "config.json").read_text())
    if breakage == "model_type":
        cfg["model_type"] = "llama"
    elif breakage == "shape":
        cfg["intermediate_size"] = 128
    elif breakage == "missing_shard":
        sorted(ckpt.glob("model-*.safetensors"))[0].unlink()
    elif breakage == "truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[:-1000])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "bundle"
    proc = edgeglm("export", ckpt, "--out", out)
    assert_user_error(proc, message, str(ckpt))
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.partial-*"))


def test_export_without_tokenizer_is_refused(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "ckpt")
    proc = edgeglm("export", ckpt, "--out", tmp_path / "bundle")
    assert_user_error(proc, "tokenizer.json not found")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("damage,message", [
    ("flip_byte", "sha256"),
    ("truncate_weights", "does not match the manifest"),
    ("delete_file", "missing from the bundle"),
    ("truncate_manifest", "not valid JSON"),
])
def test_generate_refuses_a_bundle_that_does_not_match_its_manifest(int8_bundle, tmp_path, damage, message):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    weights = bundle / "onnxruntime" / "model.onnx.data"
    if damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "delete_file":
        (bundle / "openvino" / "openvino_model.bin").unlink()
    else:
        manifest = bundle / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:200])
    proc = edgeglm("generate", "--bundle", bundle, "hello")
    assert_user_error(proc, message)
    assert proc.stdout == ""


@pytest.mark.parametrize("command", [["probe", "--bundle"], ["bench", "--bundle"], ["generate", "--bundle"],
                                     ["bundle", "verify"]])
def test_a_bundle_path_that_is_a_file_is_named_as_such(tmp_path, command):
    """A bundle archive given as --bundle was "bundle directory not found", which it was not."""
    archive, plain = tmp_path / "bundle-1.0.0.tar.gz", tmp_path / "weights.bin"
    archive.write_bytes(b"x")
    plain.write_bytes(b"y")
    tail = ["x"] if command[0] == "generate" else ["--trusted", tmp_path] if command[0] == "bundle" else []
    assert_user_error(edgeglm(*command, archive, *tail), f"{archive}: is a file, not a bundle directory; unpack the "
                      "archive and give the directory holding manifest.json")
    assert_user_error(edgeglm(*command, plain, *tail), f"{plain}: is a file, not a bundle directory; give the "
                      "directory holding manifest.json")
    assert_user_error(edgeglm(*command, tmp_path / "nope", *tail), "bundle directory not found")


def test_generate_bad_settings_name_the_field(int8_bundle):
    assert_user_error(edgeglm("generate", "--bundle", int8_bundle, "--temperature", "-1", "x"),
                      "--temperature -1.0 is invalid: must be a number in [0, 100]")
    assert_user_error(edgeglm("generate", "--bundle", int8_bundle, "--max-tokens", "0", "x"),
                      "--max-tokens 0 is invalid: must be an integer >= 1")
    assert_user_error(edgeglm("generate", "--bundle", int8_bundle, "--top-p", "2", "x"), "--top-p 2.0 is invalid")
    assert_user_error(edgeglm("generate", "--bundle", int8_bundle, "--backend", "tensorrt", "x"),
                      "'tensorrt' is unknown", "onnxruntime")
    assert_user_error(edgeglm("generate", "--bundle", int8_bundle, ""), "prompt is empty")


def test_a_prompt_that_is_not_utf8_is_one_line(int8_bundle):
    """Bytes the locale cannot decode reach argv as lone surrogates, which the tokenizer refused with a
    TypeError traceback."""
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "generate", "--bundle", str(int8_bundle).encode(),
                           b"hi\xff\xfe"], capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "the prompt is not valid UTF-8 (byte 0xff at character 2)")


def test_generate_into_a_closed_pipe_or_a_full_disk_stops_without_a_traceback(int8_bundle):
    """`edgeglm generate ... | head -c 5` printed a BrokenPipeError traceback; `> /dev/full` an OSError one."""
    cmd = [sys.executable, "-m", "agent.cli", "generate", "--bundle", str(int8_bundle), "--max-tokens", "200", "hi"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader leaves after the first byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + 13 and err == "", err  # as a tool killed by SIGPIPE, and silent
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        assert_user_error(proc, "edgeglm generate: error: cannot write the output (No space left on device)")
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("command", [["probe", "--json"], ["probe"], ["bundle", "verify", "{b}", "--trusted", "{k}"]])
def test_output_to_a_full_disk_is_one_line(signed_bundles, command):
    """`edgeglm probe --json > /dev/full` and `bundle verify ... > /dev/full` ended in an OSError traceback, exit 1
    (or said nothing when the output waited in the buffer until the interpreter's exit)."""
    args = [a.format(b=signed_bundles["v1"], k=signed_bundles["keys"]) for a in command]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert_user_error(proc, f"edgeglm {' '.join(command[:2]) if command[0] == 'bundle' else 'probe'}: error: "
                            "cannot write the output (No space left on device)")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("command", [["--help"], ["--version"], ["fleet", "status", "--help"]])
def test_help_and_version_to_a_full_disk_is_one_line(command):
    """`edgeglm --help > /dev/full` exited 0 with nothing written (argparse ignores a failed write)."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *command], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    assert_user_error(proc, "edgeglm: error: cannot write the output (No space left on device)")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "agent.cli", *command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout and not proc.stderr, proc  # (to a writable output: as before)


def test_edge_modules_do_not_import_torch():
    code = ("import sys, agent.cli, agent.model, runtime.engine, runtime.generate, runtime.golden, runtime.probe, "
            "runtime.tokenizer, ota.bundle, fleet; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("work", [None, "elsewhere.work"])
def test_an_interrupted_build_says_how_to_resume(monkeypatch, capsys, work):
    """Ctrl-C in `edgeglm build` (distillation saves the completed steps first: tests/models/test_distill.py)."""
    import agent.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(agent.cli, "cmd_build", interrupted)
    argv = ["build", "--teacher", "t", "--corpus", "c.txt", "--recipe", "quick", "--out", "out/bundle/"]
    rc = agent.cli.main(argv + (["--work", work] if work else []))
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.startswith("edgeglm build: interrupted; ")
    assert f"kept in {work or 'out/bundle.work'}: the same command with --resume continues" in err


def test_a_demo_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
    """`edgeglm demo --workdir F` with F a file ended in a FileExistsError traceback."""
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    assert_user_error(edgeglm("demo", "--workdir", plain), f"--workdir {plain}: cannot be used as the demo's working "
                      "directory (it is a file, not a directory)")
    assert plain.read_text() == "mine"


def test_the_demo_refuses_a_workdir_holding_files_that_are_not_its_own(tmp_path):
    """`edgeglm demo --workdir .` deleted the fleet.db of a `fleet serve` run in that directory (the demo starts from
    an empty registry), and rewrote agents/ and unsigned bundle-*/ directories of the same names."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "fleet.db").write_bytes(b"SQLite format 3\0 the operator's registry")
    proc = edgeglm("demo", "--workdir", project)
    assert_user_error(proc, f"--workdir {project}: holds files that are not the demo's (fleet.db)")
    (project / "notes.txt").write_text("mine")
    (project / "keys").mkdir()
    assert_user_error(edgeglm("demo", "--workdir", project), "holds files that are not the demo's (notes.txt)")
    assert (project / "fleet.db").read_bytes().endswith(b"registry") and (project / "notes.txt").is_file()


@pytest.mark.parametrize("argv", [["export", "CKPT", "--out", ""], ["build", "--teacher", "CKPT", "--corpus", "x.txt",
                                                                   "--recipe", "quick", "--out", ""],
                                  ["bundle", "keygen", "--out", ""],
                                  ["build", "--teacher", "CKPT", "--corpus", "x.txt", "", "--recipe", "quick", "--out", "b"],
                                  ["build", "--teacher", "", "--corpus", "x.txt", "--recipe", "quick", "--out", "b"],
                                  ["generate", "hi", "--bundle", ""]])
def test_an_empty_path_is_refused_before_anything(tmp_path, monkeypatch, capsys, argv):
    """`--out "$UNSET"` was read as the current directory: export answered "/home/me: already exists; pass --force",
    build "--out .: ..." (a value the user never typed); keygen wrote its key pair into the current directory;
    `--corpus ""` took every file there as training text."""
    from agent.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path) if a == "CKPT" else a for a in argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: '' is an empty path: name a directory" in err or "'' is an empty path: name a file or " \
        "directory" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_that_is_a_directory_is_named_as_one(tmp_path):
    from models.recipe import RecipeError, recipe_path

    with pytest.raises(RecipeError, match=rf"--recipe {tmp_path}: is a directory; give a recipe TOML file or a "
                                          r"shipped recipe \(edge-small, quick\)"):
        recipe_path(tmp_path)


@pytest.mark.parametrize("args,choices", [(["fleet"], "{serve,status,offer,"), (["bundle"], "{keygen,"),
                                          (["fleet", "group"], "{add,")])
def test_a_missing_subcommand_is_named_by_its_choices(args, choices):
    """`edgeglm fleet` alone said "the following arguments are required: fleet_command" (argparse's dest)."""
    out = edgeglm(*args, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"edgeglm {' '.join(args)}: error: the following arguments are required: {choices}"), error
    assert "_command" not in out.stderr
