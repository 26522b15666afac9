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
    ("version", "latest", "version: Value error, 'latest' is not a version"),
    ("format", "edgeglm-bundle/9", "is not supported"),
    ("name", "", "name"),
])
def test_invalid_manifest_fields_are_named(int8_bundle, tmp_path, field, value, message):
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    _edit_manifest(bundle, **{field: value})
    with pytest.raises(BundleError, match="invalid manifest") as err:
        read_manifest(bundle)
    assert message in str(err.value)


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
