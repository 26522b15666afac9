"""Bundles refused at verify and load with one line: file paths the OS cannot take, a bundle for a newer agent,
a tokenizer with ids the model lacks, an end-of-sequence id outside the vocabulary."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from ota.bundle import Manifest, agent_version, file_entry, open_bundle, read_manifest
from ota.errors import BundleError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _one_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle, data):
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("path,problem", [
    ("a\u0000b", "NUL character"),
    ("x" * 300, "300 bytes long, more than 255"),
    ("onnxruntime\\model.onnx", "backslash"),
    ("a//b", "empty or '.' part"),
    ("./tokenizer.json", "empty or '.' part"),
    ("manifest.sig", "the bundle's own manifest file"),
    ("/etc/passwd", "points outside the bundle"),
])
def test_a_file_path_the_bundle_cannot_hold_is_named(int8_bundle, tmp_path, path, problem):
    """A NUL in a listed path failed with a raw "ValueError: embedded null byte", a 300-character name with
    "OSError: [Errno 36] File name too long", from `edgeglm generate --bundle` and `bundle verify`."""
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = _manifest(bundle)
    data["files"].append({**data["files"][0], "path": path})
    _write(bundle, data)
    with pytest.raises(BundleError, match="invalid manifest: files.") as err:
        open_bundle(bundle)
    assert problem in str(err.value) and f"files.{len(data['files']) - 1}.path" in str(err.value)
    out = _one_line(_cli("generate", "--bundle", bundle, "--max-tokens", "1", "hi"))
    assert problem in out


def test_a_path_listed_twice_is_refused(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = _manifest(bundle)
    data["files"].append(dict(data["files"][1]))
    _write(bundle, data)
    with pytest.raises(BundleError, match=f"files: file path '{data['files'][1]['path']}' is listed "
                                          "twice"):
        read_manifest(bundle)


def test_a_bundle_for_a_newer_agent_says_update_the_agent(int8_bundle, tmp_path):
    """A bundle of format 2 needing agent 9.0.0, with a field this agent does not know, was "format: Value error
    ... ; new_field: Extra inputs are not permitted": nothing about the agent to install."""
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = {**_manifest(bundle), "format": "edgeglm-bundle/2", "min_agent_version": "9.0.0", "new_field": [1]}
    _write(bundle, data)
    this = agent_version()
    expected = (f"bundle format edgeglm-bundle/2 (needs edgeglm >= 9.0.0; this agent is {this}): update the agent "
                "first; this bundle is not used")
    with pytest.raises(BundleError) as err:
        read_manifest(bundle)
    assert str(err.value) == f"{bundle / 'manifest.json'}: {expected}"
    out = _one_line(_cli("bundle", "verify", bundle, "--trusted", tmp_path / "none.pub"))
    assert expected in out and "Extra inputs" not in out
    # the OTA offer check (ota/update.py `_offered`) reports a ValidationError's messages
    with pytest.raises(ValidationError) as verr:
        Manifest.model_validate_json(json.dumps(data))
    assert [e["msg"] for e in verr.value.errors()] == [expected]


def test_a_newer_agent_version_alone_is_named_only_when_the_manifest_does_not_validate(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = {**_manifest(bundle), "min_agent_version": "9.0.0"}
    _write(bundle, data)
    assert read_manifest(bundle).manifest.min_agent_version == "9.0.0"  # the OTA check names the version itself
    _write(bundle, {**data, "new_field": 1})
    with pytest.raises(BundleError, match=r"bundle needs edgeglm >= 9\.0\.0 \(this agent is .*\): update the agent "
                                          "first; this bundle is not used$"):
        read_manifest(bundle)


def test_an_unknown_field_of_a_bundle_for_this_agent_is_still_named(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    _write(bundle, {**_manifest(bundle), "new_field": 1})
    with pytest.raises(BundleError, match="new_field: Extra inputs are not permitted"):
        read_manifest(bundle)


def _with_tokenizer(src, dst, extra: int):
    """A copy of bundle `src` whose tokenizer.json has `extra` added tokens more (ids after its own), its
    manifest entry stamped again."""
    from tokenizers import Tokenizer

    bundle = shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])
    tok.save(str(bundle / "tokenizer.json"))
    data = _manifest(bundle)
    data["files"] = [file_entry(bundle, bundle / f["path"], data["chunk_size"]).model_dump()
                     if f["path"] == "tokenizer.json" else f for f in data["files"]]
    (bundle / "manifest.sig").unlink(missing_ok=True)
    _write(bundle, data)
    return bundle


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(int8_bundle, tmp_path):
    """It verified, loaded and passed the self-test; a request whose text became token 604 then failed with a
    raw "token id 604 is outside the vocabulary (0..511)" (the agent answered 500)."""
    from transformers import PreTrainedTokenizerFast

    bundle = _with_tokenizer(int8_bundle, tmp_path / "b", 100)
    size = len(PreTrainedTokenizerFast(tokenizer_file=str(bundle / "tokenizer.json")))  # the reference count
    assert size == 612
    expected = f"has token ids up to {size - 1} ({size} tokens), but the model's architecture.vocab_size is 512"
    with pytest.raises(BundleError, match=None) as err:
        open_bundle(bundle)
    assert expected in str(err.value) and str(bundle) in str(err.value)
    assert expected in _one_line(_cli("bundle", "verify", bundle, "--trusted", tmp_path / "none.pub"))
    assert expected in _one_line(_cli("generate", "--bundle", bundle, "--max-tokens", "1", "<extra_92>"))


def test_the_load_counts_the_tokenizer_itself(int8_bundle, tmp_path, monkeypatch):
    """Where tokenizer.json cannot be counted as JSON (another tokenizer model kind), the load still refuses."""
    import ota.bundle
    from agent.model import load_model
    from runtime.errors import ModelLoadError

    bundle = _with_tokenizer(int8_bundle, tmp_path / "b", 3)
    monkeypatch.setattr(ota.bundle, "tokenizer_size", lambda path: None)
    with pytest.raises(ModelLoadError, match=r"has token ids up to 514 \(515 tokens\), but the model's "
                                             "architecture.vocab_size is 512"):
        load_model(bundle, backend="onnxruntime")


def test_a_model_vocabulary_larger_than_the_tokenizer_is_fine(int8_bundle, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    small = Tokenizer(models.BPE(vocab={chr(c): i for i, c in enumerate(range(97, 123))}, merges=[]))
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.save(str(bundle / "tokenizer.json"))
    data = _manifest(bundle)
    data["files"] = [file_entry(bundle, bundle / f["path"], data["chunk_size"]).model_dump()
                     if f["path"] == "tokenizer.json" else f for f in data["files"]]
    _write(bundle, data)
    open_bundle(bundle, chunks=True)



@contextlib.contextmanager
def _as_a_service_user():
    """The file checks of this process as uid/gid 65534 (nobody) when the tests run as root, who reads every file
    whatever its mode (the real ids stay root's, so this process takes them back); as this user otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def _cli_in_process(capsys, *args) -> tuple[int, str, str]:
    from agent.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def readable_copy(signed_bundles):
    """A copy of the signed bundle 1.0.0 and its public key where uid 65534 can reach them (pytest's tmp_path
    lies under a directory only its owner may search)."""
    top = Path(tempfile.mkdtemp(prefix="edgeglm-modes-"))
    try:
        top.chmod(0o755)
        bundle = shutil.copytree(signed_bundles["v1"], top / "b")
        shutil.copy(signed_bundles["keys"] / "fleet.pub", top / "fleet.pub")
        yield bundle, top / "fleet.pub"
    finally:
        for p in [top, *top.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(top)


@pytest.mark.parametrize("what,expected", [
    ("onnxruntime/model.onnx", "{p}: cannot read (Permission denied); the bundle is refused"),
    (".", "{p}: cannot read the bundle directory (Permission denied); the bundle is refused"),
    ("manifest.json", "{p}: cannot read the manifest (Permission denied); the bundle is refused"),
    ("manifest.sig", "{p}: cannot read the signature (Permission denied); the bundle will not be activated"),
])
def test_a_bundle_file_the_user_cannot_read_is_one_line(readable_copy, capsys, what, expected):
    """A model file of mode 000 (`bundle verify`, `generate --bundle`, the agent's --bundle) ended in a raw
    PermissionError traceback, exit 1, as did a bundle directory its user may not search."""
    bundle, pub = readable_copy
    verify = ("bundle", "verify", bundle, "--trusted", pub)
    generate = ("generate", "--bundle", bundle, "--max-tokens", "1", "hi")
    for args in (verify, generate):  # as root first: the modules the commands import are loaded (the Python
        assert _cli_in_process(capsys, *args)[0] == 0  # installation may lie where uid 65534 cannot read)
    with _as_a_service_user():
        code, out, err = _cli_in_process(capsys, *verify)
    assert code == 0 and out.startswith("OK: "), err  # the service user reads the bundle as it is
    target = (bundle / what).resolve()
    target.chmod(0)
    line = expected.format(p=target if what != "." else bundle)
    with _as_a_service_user():
        results = [_cli_in_process(capsys, *verify)] + (
            [_cli_in_process(capsys, *generate)] if what != "manifest.sig" else [])  # (generate reads no signature)
    for code, out, err in results:
        assert code == 2 and line in err and len(err.strip().splitlines()) == 1, err
