"""Bundle manifest parsing and verification."""

from __future__ import annotations

import json
import shutil

import pytest

from ota.bundle import open_bundle, read_manifest
from ota.errors import BundleError


def _edit_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_manifest_lists_every_file_with_its_hash(int8_bundle):
    import hashlib

    bundle = open_bundle(int8_bundle)
    on_disk = {p.relative_to(int8_bundle).as_posix() for p in int8_bundle.rglob("*") if p.is_file()}
    assert {f.path for f in bundle.manifest.files} == on_disk - {"manifest.json"}
    for f in bundle.manifest.files:
        data = (int8_bundle / f.path).read_bytes()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
    assert bundle.manifest.golden.prompt_ids and len(bundle.manifest.golden.reference.tokens) == 32
    assert set(bundle.manifest.golden.backends) == {"onnxruntime", "openvino"}
    assert bundle.manifest.backends["openvino"].weights == "int8-per-channel"
    assert bundle.manifest.backends["onnxruntime"].weights == "int8-per-channel-u8"
    assert {"onnxruntime/model.onnx", "onnxruntime/prefill.onnx", "onnxruntime/model.onnx.data"} <= on_disk


def test_path_outside_the_bundle_is_refused(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"][0]["path"] = "../../etc/passwd"
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="points outside the bundle"):
        open_bundle(bundle)


@pytest.mark.parametrize("field,value,message", [
    ("version", "latest", "version: 'latest' is not a version"),
    ("format", "other-bundle/1", "is not supported"),  # a newer edgeglm-bundle/N: test_bundle_checks.py
    ("name", "", "name"),
])
def test_invalid_manifest_fields_are_named(int8_bundle, tmp_path, field, value, message):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    _edit_manifest(bundle, **{field: value})
    with pytest.raises(BundleError, match="invalid manifest") as err:
        read_manifest(bundle)
    assert message in str(err.value)


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": "eight"}, "num_hidden_layers: Input should be a valid integer (got 'eight')"),
    ({"vocab_size": None}, "vocab_size: Field required"),
    ({"max_position_embeddings": -5}, "max_position_embeddings: Input should be greater than or equal to 2"),
    ({"head_dim": 1.5}, "head_dim: Input should be a valid integer"),
    ({"eos_token_id": ["x"]}, "eos_token_id"),
])
def test_architecture_sizes_are_checked_and_named(int8_bundle, tmp_path, change, message):
    """The sizes the runtime builds its cache and inputs from: a wrong one failed later with a traceback
    (`TypeError`, `KeyError: 'vocab_size'`) or "a prompt may have at most -6 tokens"; other fields of the
    model's config stay free."""
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    arch = json.loads((bundle / "manifest.json").read_text())["architecture"]
    arch = {k: v for k, v in {**arch, **change}.items() if v is not None}
    _edit_manifest(bundle, architecture=arch)
    with pytest.raises(BundleError, match="invalid manifest: architecture") as err:
        read_manifest(bundle)
    assert message in str(err.value)
    _edit_manifest(bundle, architecture={**json.loads((int8_bundle / "manifest.json").read_text())["architecture"],
                                         "some_new_config_field": [1, 2]})
    read_manifest(bundle)


def test_precision_is_int8_or_fp32(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    _edit_manifest(bundle, precision="bogus")
    with pytest.raises(BundleError, match="precision: Input should be 'int8' or 'fp32'"):
        read_manifest(bundle)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", 3, "KV inputs for 2 layers (past.0.key .. past.1.key) where num_hidden_layers is 3"),
    ("num_key_value_heads", 7, "in axis 1 of past.0.key where num_key_value_heads is 7"),
    ("head_dim", 3, "in axis 3 of past.0.key where head_dim is 3"),
])
def test_a_manifest_that_does_not_describe_its_graph_is_one_line(int8_bundle, tmp_path, backend, field, value,
                                                                  message):
    """Sizes of the right type that are not the graph's (a hand-edited manifest, or one of another model):
    ONNX Runtime failed at the first step with "Failed to find input name in the mapping: past.8.key" or
    "Got invalid dimensions for input", as a traceback from `edgeglm generate`."""
    import subprocess
    import sys

    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    arch = json.loads((bundle / "manifest.json").read_text())["architecture"]
    assert (arch["num_hidden_layers"], arch["num_key_value_heads"]) == (2, 2)  # the tiny model; values above
    _edit_manifest(bundle, architecture={**arch, field: value})
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "generate", "--bundle", str(bundle), "--backend",
                           backend, "--max-tokens", "2", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the model graph does not match the manifest's architecture" in proc.stderr and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_backend_entry_must_be_a_listed_file(int8_bundle, tmp_path):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    data["backends"]["openvino"]["entry"] = "openvino/other.xml"
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="entry 'openvino/other.xml' is not a listed file"):
        open_bundle(bundle)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_an_archive_without_its_suffix_is_still_named_an_archive(tmp_path):
    """A downloaded bundle archive saved without its suffix was "is a file" with the hint for any other file."""
    import gzip
    import io
    import tarfile
    import zipfile

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        t.addfile(info, io.BytesIO(b"{}"))
    (tmp_path / "a-tar").write_bytes(tar.getvalue())
    (tmp_path / "a-gz").write_bytes(gzip.compress(b"x"))
    with zipfile.ZipFile(tmp_path / "a-zip", "w") as z:
        z.writestr("manifest.json", "{}")
    for name in ("a-tar", "a-gz", "a-zip"):
        with pytest.raises(BundleError, match=f"{tmp_path / name}: is a file, not a bundle directory; unpack the "
                                              "archive and give the directory holding manifest.json$"):
            read_manifest(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(BundleError, match="notes.txt: is a file, not a bundle directory; give the directory holding "
                                          r"manifest.json \(made by `edgeglm export`\)$"):
        read_manifest(tmp_path / "notes.txt")


def test_a_directory_holding_a_bundle_names_it(int8_bundle, tmp_path):
    """An archive unpacked into a directory of its own (`tar xf b.tgz -C unpacked`) was given as the bundle: the
    error said manifest.json was not found, not where the bundle was."""
    outer = tmp_path / "unpacked"
    outer.mkdir()
    inner = shutil.copytree(int8_bundle, outer / "tiny-1.0.0")
    with pytest.raises(BundleError, match=f"{outer / 'manifest.json'}: not found; {outer} is not a bundle, but holds "
                                          f"one in {inner}: give that directory$"):
        read_manifest(outer)
    proc = _cli("bundle", "sign", outer, "--key", tmp_path / "nokey")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"holds one in {inner}: give that directory" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match=f"{empty / 'manifest.json'}: not found; is {empty} a bundle made by"):
        read_manifest(empty)


def test_a_manifest_that_is_not_a_readable_file_is_one_line(int8_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").mkdir()
    with pytest.raises(BundleError, match="manifest.json: is not a file; the bundle is damaged and is refused"):
        read_manifest(bundle)
    copy = shutil.copytree(int8_bundle, tmp_path / "c")
    from pathlib import Path

    real = Path.read_bytes

    def denied(self):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(BundleError, match=r"manifest.json: cannot read the manifest \(Permission denied\); the bundle "
                                          "is refused$"):
        read_manifest(copy)


@pytest.mark.parametrize("command", [["bundle", "sign", "{b}", "--key", "{k}"],
                                     ["fleet", "offer", "--fleet", "f", "--device", "d", "--bundle", "{b}", "--db",
                                      "{db}"],
                                     ["fleet", "rollout", "--group", "g", "--canary", "10", "--bundle", "{b}",
                                      "--db", "{db}"]])
def test_every_cli_taking_a_bundle_says_a_file_is_not_a_bundle_directory(tmp_path, command):
    """`probe`, `bench`, `generate` and `bundle verify` are in tests/test_cli.py; these read the bundle too."""
    archive = tmp_path / "bundle-1.0.0.tgz"
    archive.write_bytes(b"\x1f\x8b rest")
    args = [a.format(b=archive, k=tmp_path / "k.key", db=tmp_path / "fleet.db") for a in command]
    proc = _cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert (f"{archive}: is a file, not a bundle directory; unpack the archive and give the directory holding "
            "manifest.json") in proc.stderr
