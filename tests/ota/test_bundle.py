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
