"""A/B model slots on disk.

    STATE_DIR/slots/a/    a bundle (or empty)
    STATE_DIR/slots/b/
    STATE_DIR/current  -> slots/a     the active slot: a symlink flipped in one rename

The active slot is never written while it is active: an update installs into the other slot,
self-tests it there, and only then flips `current`. The previous model stays in its slot, so a
rollback is one more flip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ota.fsutil import atomic_symlink, fsync_dir, fsync_tree

SLOT_NAMES = ("a", "b")


class Slots:
    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.slots_dir = self.root / "slots"
        self.link = self.root / "current"
        for name in SLOT_NAMES:
            (self.slots_dir / name).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.slots_dir / name

    def active(self) -> str | None:
        """Name of the active slot, or None before the first install."""
        if not self.link.is_symlink():
            return None
        name = Path(os.readlink(self.link)).name
        return name if name in SLOT_NAMES else None

    def inactive(self) -> str:
        active = self.active()
        return "b" if active == "a" else "a"

    def active_path(self) -> Path | None:
        name = self.active()
        return self.path(name) if name else None

    def install(self, source: Path, slot: str) -> Path:
        """Move `source` (on the same filesystem) into the inactive `slot`, durably; no copy."""
        if slot == self.active():
            raise RuntimeError(f"refusing to install into the active slot {slot!r}")
        dest = self.path(slot)
        fsync_tree(source)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(source, dest)
        fsync_dir(self.slots_dir)
        fsync_dir(Path(source).parent)
        return dest

    def clear(self, slot: str) -> None:
        if slot == self.active():
            raise RuntimeError(f"refusing to clear the active slot {slot!r}")
        dest = self.path(slot)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.slots_dir)

    def activate(self, slot: str) -> None:
        atomic_symlink(self.link, f"slots/{slot}")
