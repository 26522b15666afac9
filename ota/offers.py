"""Making update offers (controller side) and fetching their files from a directory.

The MQTT chunk transfer implements the same `read_chunk` as `DirectoryFetcher`; a directory
source also serves offline installs (a USB stick, a mounted share).
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ota.bundle import Bundle
from ota.signing import read_signature, sign_bytes
from ota.update import Offer, RollbackTerms, UpdateFailed, rollback_statement


def make_offer(bundle: Bundle, update_id: str, source: dict, rollback_key: Ed25519PrivateKey | None = None,
               rollback_terms: RollbackTerms | None = None) -> Offer:
    """An offer for a signed bundle; with `rollback_key` and `rollback_terms` (the fleet and device it is for,
    the version it replaces, its expiry), an authorised rollback offer."""
    raw = bundle.manifest_bytes
    offer = Offer(update_id=update_id, manifest_b64=base64.b64encode(raw).decode(),
                  signature=read_signature(bundle.root), source=source)
    if (rollback_key is None) != (rollback_terms is None):
        raise ValueError("a rollback offer needs both rollback_key and rollback_terms")
    if rollback_key is not None:
        offer.rollback = True
        offer.rollback_terms = rollback_terms
        offer.rollback_signature = sign_bytes(rollback_statement(update_id, raw, rollback_terms), rollback_key)
    return offer


class DirectoryFetcher:
    """Reads chunks of a bundle's files from `offer.source["path"]`."""

    def read_chunk(self, offer: Offer, path: str, index: int, chunk_size: int) -> bytes:
        if offer.source.get("type") != "dir":
            raise UpdateFailed(f"offer source {offer.source!r} is not a directory source")
        root = Path(offer.source["path"]).resolve()
        file = (root / path).resolve()
        if root not in file.parents:
            raise UpdateFailed(f"file {path!r} points outside the source {root}")
        try:
            with open(file, "rb") as f:
                f.seek(index * chunk_size)
                return f.read(chunk_size)
        except FileNotFoundError:
            raise UpdateFailed(f"source file {file} not found") from None
