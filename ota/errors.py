"""Errors of the OTA side.

    BundleError     a bundle cannot be used: missing or malformed manifest, a file missing,
                    a size or sha256 that disagrees with the manifest. The message names the
                    file and both values; whatever model is active stays active.
      SignatureError  a signature is missing, made by an unknown key, or does not verify;
                      or a key file cannot be read
      VersionError    an offered version is not newer than the active one (downgrade) and
                      the offer is not a signed rollback

User errors: the CLI prints the message and exits with code 2.
"""


class BundleError(Exception):
    """A bundle is malformed or does not match its manifest."""


class SignatureError(BundleError):
    """A signature or key cannot be trusted or read."""


class VersionError(BundleError):
    """An offered version would be a downgrade."""
