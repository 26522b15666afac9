"""Checkpoint files are readable as the rest of the checkpoint is (the builder's umask), not 0600."""

import os
import stat

from models.tiny import make_checkpoint


def test_checkpoint_weights_get_the_same_mode_as_its_config(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", train_steps=0)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir() if p.is_file()}
    assert modes["config.json"] == 0o644 and modes["model.safetensors"] == 0o644, modes
