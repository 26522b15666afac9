"""Ed25519 signatures over a bundle's exact manifest bytes, with key rotation.

`manifest.sig` is a small JSON document: the signing key's id and the base64 signature of the
exact bytes of `manifest.json`. The manifest pins every file by sha256, so one signature covers
the whole bundle. The agent trusts a *set* of public keys (a directory of `*.pub` files): to
rotate, ship the new public key to the fleet, sign new bundles with the new key, then remove
the old public key.

Key files: the private key is PKCS#8 PEM (written with mode 0600), the public key
SubjectPublicKeyInfo PEM. A key's id is the first 16 hex digits of the sha256 of its raw
32-byte public key.
"""

from __future__ import annotations

import logging

import base64
import hashlib
import json
import os  # noqa: F401 (tests patch ota.signing.os: the os module its writes go through, in ota.fsutil)
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ota.bundle import MANIFEST, Bundle
from ota.errors import SignatureError
from ota.fsutil import write_file_atomically

SIGNATURE = "manifest.sig"
# in an agent's slot: the signature the slot held before the same bundle came again signed by another key (a
# key rotation); either one verifying is enough, so whichever key is removed last, the slot stays trusted
SIGNATURE_PREVIOUS = "manifest.sig.prev"
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a file name in --out, never a path


log = logging.getLogger("edgeglm.ota")

def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


def generate_keypair(out_dir: str | Path, name: str = "bundle-signing") -> KeyPair:
    """Write NAME.key (private, 0600) and NAME.pub into out_dir; refuses to overwrite.

    A directory that cannot be made or written (a file in the way, no permission, a read-only
    file system) is a SignatureError naming it; no half of a pair is left behind. `name` is a file
    name, not a path (1 to 128 of A-Za-z0-9._-, starting with a letter or digit): '' wrote the hidden
    `.key`/`.pub`, '../x' wrote the pair outside out_dir.
    """
    if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
        raise SignatureError(f"--name {name!r}: is not a key name: use 1 to 128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (the files are NAME.key and NAME.pub in --out); "
                             "no key was written")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SignatureError(f"{out_dir}: is a file, not a directory; give a directory for the key files "
                             "(it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SignatureError(f"{out_dir}: cannot create the key directory ({exc.strerror or exc}); "
                             "give a directory you can write to; no key was written") from None
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists; choose another --name or directory (keys are never overwritten)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:
        for path, data, mode in ((priv_path, pem, 0o600), (pub_path, public, 0o644)):
            written.append(path)  # before it can exist: Ctrl-C right after it is put in place still removes it
            try:
                write_file_atomically(path, data, mode, overwrite=False)
            except FileExistsError:  # made meanwhile (another keygen): not ours to remove
                written.remove(path)
                raise SignatureError(f"{path}: already exists; choose another --name or directory (keys are never "
                                     "overwritten); no key was written") from None
    except BaseException as exc:  # an OSError, or Ctrl-C between the two files: no half of a pair is left
        for p in written:
            p.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise SignatureError(f"{out_dir}: cannot write the key files ({exc.strerror or exc}); "
                             "give a directory you can write to; no key was written") from None
    return KeyPair(priv_path, pub_path, key_id(private.public_key()))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"{path}: private key file not found") from None
    except OSError as exc:  # a directory, a file this user may not read
        raise SignatureError(f"{path}: cannot read the private key ({exc.strerror or exc}); give the NAME.key file "
                             "that `edgeglm bundle keygen` wrote") from None
    except (ValueError, TypeError) as exc:
        if b"-----BEGIN PUBLIC KEY-----" in path.read_bytes()[:4096]:  # the .pub beside it, given by mistake
            pair = path.with_suffix(".key") if path.suffix == ".pub" else None
            raise SignatureError(f"{path}: is a public key (the half that verifies); signing takes the private key"
                                 + (f", {pair}" if pair is not None and pair.exists() else ", the NAME.key file that "
                                    "`edgeglm bundle keygen` wrote")) from None
        head = path.read_bytes()[:4096]
        if b"OPENSSH PRIVATE KEY" in head:  # what ssh-keygen writes
            what = "an OpenSSH private key (ssh-keygen's format)"
        elif b"ENCRYPTED" in head or "Password was not given" in str(exc):  # (older cryptography: "may be
            # encrypted" of any file it cannot read)
            what = "an encrypted private key (signing takes an unencrypted one)"
        else:
            what = f"not an unencrypted PEM private key ({str(exc).split('. See ')[0]})"
        raise SignatureError(f"{path}: {what}; nothing was signed: give the NAME.key file that `edgeglm bundle "
                             "keygen` wrote (an Ed25519 PEM key), or make one with it") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: is a {type(key).__name__}, expected an Ed25519 private key; nothing was "
                             "signed: give the NAME.key file that `edgeglm bundle keygen` wrote, or make one with it")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:  # a dangling symlink, a file the service user may not read
        raise SignatureError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        hint = ""
        try:
            if b"PRIVATE KEY-----" in path.read_bytes()[:4096]:  # NAME.key given where NAME.pub belongs
                pub = path.with_suffix(".pub")
                hint = f"; it is a private key: give the public half, {pub}" if pub.exists() else \
                    "; it is a private key: give the public half (the NAME.pub file `edgeglm bundle keygen` wrote)"
        except OSError:
            pass
        raise SignatureError(f"{path}: not a PEM public key ({exc}){hint}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: is a {type(key).__name__}, expected an Ed25519 public key")
    return key


def load_trusted_keys(paths: list[str | Path], warn_private: bool = False,
                      quiet: bool = False) -> dict[str, Ed25519PublicKey]:
    """Public keys by id, from files and/or directories of `*.pub` files (hidden ones, `.NAME.pub`, are left
    out, as the shell's `*.pub` and `ls` leave them out). In a directory, a `*.pub` that
    cannot be read or is not an Ed25519 PEM public key (an empty file, a dangling symlink left by a key
    rotation, a file the service user may not read) is skipped with a warning naming it: leaving one key
    out only narrows what is trusted, while refusing the whole set would stop the agent from serving
    and from taking any update. SignatureError when no key at all can be loaded, with each reason.
    `warn_private` (the agent): warn about a private key lying in a directory of them (not on the signing
    machine, where `bundle verify --trusted keys/` reads the directory `bundle keygen` made). `quiet`: no
    warning for a key skipped (a caller that reads the keys again every minute to report them)."""
    keys: dict[str, Ed25519PublicKey] = {}
    skipped: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():  # as the shell's *.pub: a hidden .NAME.pub (a key retired by hiding it) is not trusted
            files = sorted(f for f in p.glob("*.pub") if not f.name.startswith("."))
            if warn_private:
                _warn_private_keys(p)
        elif p.is_file():
            files = [p]
        else:
            raise SignatureError(f"{p}: trusted key file or directory not found; give the NAME.pub file that "
                                 "`edgeglm bundle keygen` wrote, or the directory holding it")
        for f in files:
            try:
                key = load_public_key(f)
            except SignatureError as exc:
                if not p.is_dir():
                    raise
                if not quiet:
                    log.warning("%s; this key is not trusted, the others are", exc)
                skipped.append(str(exc))
                continue
            keys[key_id(key)] = key
    if not keys:
        raise SignatureError(f"no trusted public keys found in {', '.join(map(str, paths))}"
                             + (f" ({'; '.join(skipped)})" if skipped else "")
                             + "; put the fleet's NAME.pub there (from `edgeglm bundle keygen`), or give the file")
    return keys


_warned_private: set[Path] = set()


def _warn_private_keys(folder: Path) -> None:
    """Warn (once per file and process) about a private key lying among the trusted public keys: copying a
    whole `bundle keygen` directory puts NAME.key on every box, and whoever can read it there can sign bundles
    every box of the fleet trusts."""
    for f in sorted(folder.iterdir()):
        if f in _warned_private or f.suffix == ".pub":
            continue
        try:
            if not f.is_file() or f.stat().st_size > 65536:
                continue
            with open(f, "rb") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if b"PRIVATE KEY-----" in head:
            _warned_private.add(f)
            log.warning("%s is a private signing key, in the directory of trusted public keys: whoever can read it "
                        "on this box can sign bundles the fleet trusts; remove it from the box (keep it on the "
                        "signing machine) and rotate the key if it left it", f)


def sign_bytes(data: bytes, private: Ed25519PrivateKey) -> dict:
    return {"key_id": key_id(private.public_key()), "algorithm": "ed25519",
            "signature": base64.b64encode(private.sign(data)).decode()}


def verify_bytes(data: bytes, sig: dict, trusted: dict[str, Ed25519PublicKey], what: str) -> str:
    """Check `sig` over `data` against the trusted keys; returns the key id."""
    if not isinstance(sig, dict) or not isinstance(sig.get("key_id"), str) or not isinstance(sig.get("signature"), str):
        raise SignatureError(f"{what}: the signature is not an object with a key_id and a signature string")
    kid = sig.get("key_id")
    if sig.get("algorithm") != "ed25519":
        raise SignatureError(f"{what}: signature algorithm {sig.get('algorithm')!r} is not supported (ed25519)")
    if kid not in trusted:
        raise SignatureError(
            f"{what}: signed by unknown key {kid!r}; trusted keys: {', '.join(sorted(trusted))}" if trusted else
            f"{what}: signed by key {kid!r}, and no key is trusted here (the trusted-keys directory holds no .pub "
            "file): add the fleet's public key")
    try:
        trusted[kid].verify(base64.b64decode(sig.get("signature", ""), validate=True), data)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: signature does not verify with key {kid}; the content was "
                             "modified or signed by another key") from None
    return kid


def sign_bundle(bundle: Bundle, private: Ed25519PrivateKey) -> Path:
    """Write manifest.sig for the bundle's exact manifest bytes (atomically)."""
    sig = sign_bytes(bundle.manifest_bytes, private)
    path = bundle.root / SIGNATURE
    try:
        write_file_atomically(path, (json.dumps(sig, indent=2) + "\n").encode(), 0o644)
    except OSError as exc:  # a read-only bundle directory, a full disk: the old manifest.sig stays (Ctrl-C too)
        raise SignatureError(f"{path}: cannot write the signature ({exc.strerror or exc}); the bundle is left "
                             "as it was; sign a copy you can write to") from None
    return path


def read_signature(root: Path) -> dict:
    path = root / SIGNATURE
    try:
        is_file = path.is_file()
    except OSError as exc:  # a bundle directory this user may not search
        raise SignatureError(f"{path}: cannot read ({exc.strerror or exc}); the bundle will not be activated") \
            from None
    if not is_file:
        if path.exists() or path.is_symlink():  # a directory, a dangling link: not "unsigned"
            raise SignatureError(f"{path}: is not a file; the signature is damaged and the bundle will not be "
                                 "activated (remove it and sign again with `edgeglm bundle sign`)")
        raise SignatureError(f"{path}: not found; the bundle is unsigned and will not be activated "
                             "(sign it with `edgeglm bundle sign`)")
    try:
        sig = json.loads(path.read_text())
    except OSError as exc:  # a signature this user may not read, an I/O error
        raise SignatureError(f"{path}: cannot read the signature ({exc.strerror or exc}); the bundle will not be "
                             "activated") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # a bundle's file: anything may come
        raise SignatureError(f"{path}: not a signature (JSON nested deeper than Python reads)") from None
    if not isinstance(sig, dict):
        raise SignatureError(f"{path}: expected a JSON object")
    return sig


def read_previous(root: Path) -> list[dict]:
    """The signatures an agent's slot keeps in manifest.sig.prev (SIGNATURE_PREVIOUS) besides manifest.sig: the
    other keys' signatures of the same manifest bytes it was offered (key rotations), newest first. One object
    (written so while there is one) or a list of them; [] where there is none or it cannot be read."""
    try:
        held = json.loads((root / SIGNATURE_PREVIOUS).read_bytes())
    except (OSError, ValueError, RecursionError):
        return []
    held = held if isinstance(held, list) else [held]
    return [sig for sig in held if isinstance(sig, dict)]


def slot_signers(root: Path, manifest_bytes: bytes, trusted: dict[str, Ed25519PublicKey]) -> list[str]:
    """The ids of the trusted keys that sign `manifest_bytes` in `root`'s manifest.sig or manifest.sig.prev
    (sorted; [] when none does): the keys whose removal would leave the bundle there refused. Never raises:
    an unreadable or damaged signature file signs nothing."""
    ids = set()
    try:
        signatures = [json.loads((root / SIGNATURE).read_bytes())]
    except (OSError, ValueError, RecursionError):
        signatures = []
    for sig in signatures + read_previous(root):
        try:
            ids.add(verify_bytes(manifest_bytes, sig, trusted, SIGNATURE))
        except SignatureError:
            pass
    return sorted(ids)


def verify_bundle_signature(bundle: Bundle, trusted: dict[str, Ed25519PublicKey], previous: bool = False) -> str:
    """Verify manifest.sig over the bundle's manifest bytes; returns the signing key's id. `previous` (an agent's
    slot): when it fails, one of manifest.sig.prev's (read_previous) verifying is enough; the error is
    manifest.sig's."""
    try:
        return verify_bytes(bundle.manifest_bytes, read_signature(bundle.root), trusted, str(bundle.root / MANIFEST))
    except SignatureError:
        if not previous:
            raise
        for prev in read_previous(bundle.root):
            try:
                return verify_bytes(bundle.manifest_bytes, prev, trusted, str(bundle.root / MANIFEST))
            except SignatureError:
                pass
        raise
