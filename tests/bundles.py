"""Signed bundle variants for OTA and agent tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ota.bundle import open_bundle
from ota.signing import sign_bundle

# the sizes a manifest's architecture must carry, for bundles without a real model (signing, transfer tests)
PLACEHOLDER_ARCHITECTURE = {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 16,
                            "max_position_embeddings": 32}


def variant(src: Path, dst: Path, key, **changes) -> Path:
    """A copy of a bundle with manifest fields changed, signed again."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (dst / "manifest.sig").unlink(missing_ok=True)
    sign_bundle(open_bundle(dst), key)
    return dst
