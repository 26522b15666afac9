"""Errors of the model factory.

    CheckpointError   a checkpoint or its config cannot be used (unsupported architecture,
                      missing shard, shape mismatch, corrupted file); the message names the file
    ExportError       exporting a checkpoint to a bundle failed; nothing is left at the output path

Both are user errors: the CLI prints the message and exits with code 2.
"""


class CheckpointError(Exception):
    """A checkpoint (config, weights or tokenizer) cannot be used as given."""


class ExportError(Exception):
    """Exporting a checkpoint to a bundle failed."""
