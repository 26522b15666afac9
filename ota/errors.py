"""Errors of the OTA side.

    BundleError     a bundle cannot be used: missing or malformed manifest, a file missing,
                    a size or sha256 that disagrees with the manifest. The message names the
                    file and both values; whatever model is active stays active.

A user error: the CLI prints the message and exits with code 2.
"""


class BundleError(Exception):
    """A bundle is malformed or does not match its manifest."""
