"""Signed bundle variants for OTA and agent tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ota.bundle import open_bundle
from ota.signing import sign_bundle


def variant(src: Path, dst: Path, key, **changes) -> Path:
    """A copy of a bundle with manifest fields changed, signed again."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (dst / "manifest.sig").unlink(missing_ok=True)
    sign_bundle(open_bundle(dst), key)
    return dst
