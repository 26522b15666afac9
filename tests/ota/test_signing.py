"""Bundle signatures, key rotation and downgrade protection."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import PLACEHOLDER_ARCHITECTURE
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota.bundle import open_bundle
from ota.errors import BundleError, SignatureError, VersionError
from ota.signing import (generate_keypair, load_private_key, load_trusted_keys, sign_bundle,
                         verify_bundle_signature)
from ota.versions import check_upgrade, parse_version


@pytest.fixture
def signed(int8_bundle, tmp_path):
    bundle_dir = shutil.copytree(int8_bundle, tmp_path / "bundle")
    keys = tmp_path / "keys"
    pair = generate_keypair(keys, "old")
    sign_bundle(open_bundle(bundle_dir), load_private_key(pair.private_path))
    return bundle_dir, keys, pair


def test_signature_is_ed25519_over_the_exact_manifest_bytes(signed):
    bundle_dir, keys, pair = signed
    sig = json.loads((bundle_dir / "manifest.sig").read_text())
    pub = load_trusted_keys([pair.public_path])[pair.key_id]
    assert isinstance(pub, Ed25519PublicKey)
    import base64
    pub.verify(base64.b64decode(sig["signature"]), (bundle_dir / "manifest.json").read_bytes())  # independent check
    assert verify_bundle_signature(open_bundle(bundle_dir), load_trusted_keys([keys])) == pair.key_id


def test_key_rotation(signed, tmp_path):
    bundle_dir, keys, old = signed
    new = generate_keypair(keys, "new")
    trusted = load_trusted_keys([keys])
    assert set(trusted) == {old.key_id, new.key_id}
    assert verify_bundle_signature(open_bundle(bundle_dir), trusted) == old.key_id  # during rotation
    sign_bundle(open_bundle(bundle_dir), load_private_key(new.private_path))
    old.public_path.unlink()  # rotation finished: the old key is no longer trusted
    assert verify_bundle_signature(open_bundle(bundle_dir), load_trusted_keys([keys])) == new.key_id


@pytest.mark.parametrize("bad", ["dangling symlink", "empty file", "not a key"])
def test_a_bad_pub_file_beside_good_keys_is_skipped_with_a_warning(signed, tmp_path, caplog, bad):
    """A key rotation that leaves a dangling symlink, a `touch`ed file, garbage: that file can verify
    nothing, so it is left out with a warning naming it, and the other keys are still trusted (refusing
    the whole set stopped the agent at start, or left it serving nothing and refusing every update). A
    directory with no usable key at all is still refused, with each reason."""
    bundle_dir, keys, pair = signed
    bad_file = keys / "rotated-out.pub"
    if bad == "dangling symlink":
        bad_file.symlink_to(tmp_path / "removed.pub")
    else:
        bad_file.write_bytes(b"" if bad == "empty file" else b"-----BEGIN PUBLIC KEY-----\nnope\n")
    trusted = load_trusted_keys([keys])
    assert set(trusted) == {pair.key_id}
    assert verify_bundle_signature(open_bundle(bundle_dir), trusted) == pair.key_id
    assert f"{bad_file}: " in caplog.text and "this key is not trusted, the others are" in caplog.text
    pair.public_path.unlink()
    with pytest.raises(SignatureError, match=f"no trusted public keys found in {keys} \\({bad_file}: "):
        load_trusted_keys([keys])
    with pytest.raises(SignatureError, match=f"{bad_file}: "):  # named on its own: an error, as before
        load_trusted_keys([bad_file])


def test_a_signing_key_of_another_kind_says_what_it_is_and_what_to_give(tmp_path):
    """An OpenSSH key (what ssh-keygen writes), an encrypted one, an RSA one: cryptography's own words ("Valid
    PEM but no BEGIN/END delimiters ... Are you sure this is a private key?") and no next step."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    ed = ed25519.Ed25519PrivateKey.generate()
    files = {
        "ssh.key": ed.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()),
        "enc.key": ed.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw")),
        "rsa.key": rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
    }
    said = {"ssh.key": "an OpenSSH private key", "enc.key": "an encrypted private key",
            "rsa.key": "is a RSAPrivateKey, expected an Ed25519 private key"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SignatureError) as err:
            load_private_key(tmp_path / name)
        assert said[name] in str(err.value)
        assert "nothing was signed: give the NAME.key file that `edgeglm bundle keygen` wrote" in str(err.value)
    with pytest.raises(SignatureError) as err:  # as --trusted: no .pub beside it to name
        load_trusted_keys([tmp_path / "rsa.key"])
    assert str(err.value).endswith("give the public half (the NAME.pub file `edgeglm bundle keygen` wrote)")


def test_key_errors_say_what_to_give_instead(signed, tmp_path):
    """`--trusted keys/fleet.key` said only "not a PEM public key (...)"; a missing path or an empty directory
    (the installer's, holding its README) gave no next step."""
    _, keys, pair = signed
    with pytest.raises(SignatureError) as err:
        load_trusted_keys([pair.private_path])
    assert str(err.value).endswith(f"it is a private key: give the public half, {pair.public_path}")
    with pytest.raises(SignatureError, match="not found; give the NAME.pub file that `edgeglm bundle keygen` wrote"):
        load_trusted_keys([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("put NAME.pub files here\n")
    with pytest.raises(SignatureError, match="no trusted public keys found in .*; put the fleet's NAME.pub there"):
        load_trusted_keys([tmp_path / "empty"])


def test_unknown_key_is_refused(signed, tmp_path):
    bundle_dir, _, old = signed
    other = generate_keypair(tmp_path / "other", "other")
    with pytest.raises(SignatureError, match=f"signed by unknown key '{old.key_id}'; trusted keys: {other.key_id}"):
        verify_bundle_signature(open_bundle(bundle_dir), load_trusted_keys([other.public_path]))


def test_no_trusted_key_at_all_says_so(signed):
    """With nothing trusted the message ended "trusted keys: " with nothing after it."""
    bundle_dir, _, old = signed
    with pytest.raises(SignatureError, match=f"signed by key '{old.key_id}', and no key is trusted here .*add the "
                                             "fleet's public key"):
        verify_bundle_signature(open_bundle(bundle_dir), {})


def test_any_change_to_the_manifest_breaks_the_signature(signed):
    bundle_dir, keys, _ = signed
    manifest = bundle_dir / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version": "1.0.0"', b'"version": "9.0.0"'))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle_signature(open_bundle(bundle_dir), load_trusted_keys([keys]))


def test_unsigned_bundle_is_refused(int8_bundle, tmp_path):
    pair = generate_keypair(tmp_path / "k")
    with pytest.raises(SignatureError, match="unsigned and will not be activated"):
        verify_bundle_signature(open_bundle(int8_bundle), load_trusted_keys([pair.public_path]))


def test_a_signature_that_is_not_a_file_is_damaged_not_unsigned(int8_bundle, tmp_path):
    bundle_dir = shutil.copytree(int8_bundle, tmp_path / "b")
    (bundle_dir / "manifest.sig").mkdir()
    pair = generate_keypair(tmp_path / "k")
    with pytest.raises(SignatureError, match="manifest.sig: is not a file; the signature is damaged and the bundle "
                                             "will not be activated"):
        verify_bundle_signature(open_bundle(bundle_dir), load_trusted_keys([pair.public_path]))


def test_keygen_never_overwrites_and_private_key_is_private(tmp_path):
    pair = generate_keypair(tmp_path, "k")
    assert pair.private_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path, "k")


@pytest.mark.parametrize("lower,higher", [("1.0.0", "1.0.1"), ("1.2", "1.10"), ("1.0.0-rc.1", "1.0.0"),
                                          ("1.0.0-rc.2", "1.0.0-rc.10"), ("0.9.9", "1"),
                                          ("1.2.3-rc.1", "1.2.3+build-5"),  # build metadata with a hyphen
                                          ("1.2.2+build-9", "1.2.3-rc.1")])
def test_version_order(lower, higher):
    assert parse_version(lower) < parse_version(higher)
    check_upgrade(lower, higher)
    with pytest.raises(VersionError, match=re.escape(f"offered version {lower} is not newer than the active {higher}")):
        check_upgrade(higher, lower)
    check_upgrade(higher, lower, rollback=True)


@pytest.mark.parametrize("version", ["01.2.0", "1.02.0", "1.2.00", "00"])
def test_a_version_with_leading_zeros_is_refused(version):
    """"01.2.0" sorted as 1.2.0 but is another string: a rollout took a box on 1.2.0 for one that needs it, and
    offered it a bundle its agent refused as a downgrade."""
    with pytest.raises(VersionError, match=re.escape(f"version {version!r} is not like 1.2.3 (numbers without "
                                                     "leading zeros)")):
        check_upgrade("1.0.0", version)


def test_same_version_is_not_an_upgrade():
    with pytest.raises(VersionError, match="downgrade"):
        check_upgrade("1.0.0", "1.0.0")


def test_cli_keygen_sign_verify(int8_bundle, tmp_path):
    bundle_dir = shutil.copytree(int8_bundle, tmp_path / "bundle")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "agent.cli", "bundle", *map(str, args)],
                              capture_output=True, text=True)

    made = cli("keygen", "--out", tmp_path / "keys")
    assert made.returncode == 0
    # the rollback key's public half goes to ota.rollback_keys: "install it in the agents' trusted keys" put it where
    # it would let whoever holds the controller sign bundles
    assert "ota.trusted_keys for a bundle-signing key, their ota.rollback_keys for a rollback key" in made.stdout
    assert "on the controller only for a rollback key" in made.stdout
    unsigned = cli("verify", bundle_dir, "--trusted", tmp_path / "keys")
    assert unsigned.returncode == 2 and "unsigned" in unsigned.stderr and "Traceback" not in unsigned.stderr
    assert cli("sign", bundle_dir, "--key", tmp_path / "keys" / "bundle-signing.key").returncode == 0
    ok = cli("verify", bundle_dir, "--trusted", tmp_path / "keys")
    assert ok.returncode == 0 and "signed by key" in ok.stdout
    (bundle_dir / "tokenizer.json").write_text("{}")
    bad = cli("verify", bundle_dir, "--trusted", tmp_path / "keys")
    assert bad.returncode == 2 and "tokenizer.json" in bad.stderr and "does not match the manifest" in bad.stderr


# --- keygen: a bad --out is one line, exit code 2 ----------------------------------------------------

def _keygen(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", "bundle", "keygen", *map(str, args)],
                          capture_output=True, text=True)


def test_keygen_out_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _keygen("--out", tmp_path / "file")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"edgeglm bundle keygen: error: {tmp_path / 'file'}: is a file, not a directory; "
                                   "give a directory for the key files (it is created if missing)")


def test_keygen_out_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _keygen("--out", tmp_path / "file" / "keys")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'file' / 'keys'}: cannot create the key directory (Not a directory)" in proc.stderr
    assert "no key was written" in proc.stderr


def test_keygen_leaves_no_half_pair_when_a_write_fails(tmp_path, monkeypatch):
    import errno
    import os

    import ota.signing

    real_open = os.open

    def full_disk(path, *args, **kw):
        if ".pub" in Path(path).name:  # k.pub, or the temporary file it is written to first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(ota.signing.os, "open", full_disk)
    with pytest.raises(SignatureError, match=r"keys: cannot write the key files \(No space left on device\)"):
        generate_keypair(tmp_path / "keys", "k")
    assert list((tmp_path / "keys").iterdir()) == []


def test_ctrl_c_during_keygen_or_signing_leaves_no_half_pair_and_the_old_signature(tmp_path, monkeypatch):
    """Ctrl-C between the two key files left a private key without its public key (the next keygen with that
    name was refused: "already exists"); Ctrl-C while signing left manifest.sig.tmp in the bundle."""
    import os

    import ota.signing

    real_fsync = os.fsync
    monkeypatch.setattr(ota.signing.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        generate_keypair(tmp_path / "keys", "k")
    assert list((tmp_path / "keys").iterdir()) == []

    monkeypatch.setattr(ota.signing.os, "fsync", real_fsync)
    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "k")
    key = load_private_key(pair.private_path)
    sign_bundle(open_bundle(bundle), key)
    old = (bundle / "manifest.sig").read_bytes()
    monkeypatch.setattr(ota.signing.os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sign_bundle(open_bundle(bundle), generate_keypair(tmp_path / "keys", "k2") and
                    load_private_key(tmp_path / "keys" / "k2.key"))
    assert (bundle / "manifest.sig").read_bytes() == old
    assert not (bundle / "manifest.sig.tmp").exists()


@pytest.mark.parametrize("sig", [{"key_id": ["k"], "signature": "AA==", "algorithm": "ed25519"},
                                 {"key_id": "k", "signature": 5, "algorithm": "ed25519"}, ["not", "a", "dict"]])
def test_a_signature_of_the_wrong_shape_is_a_signature_error(signed, sig):
    """An edited manifest.sig or offer: a clear SignatureError, not a TypeError from deep inside."""
    from ota.signing import verify_bytes
    _, keys, _ = signed
    with pytest.raises(SignatureError, match="not an object with a key_id and a signature string"):
        verify_bytes(b"manifest", sig, load_trusted_keys([keys]), "offer u1 manifest")


def test_a_signature_nested_past_pythons_limit_is_a_signature_error(signed):
    """A bundle's manifest.sig comes from wherever the bundle came from: JSON nested deeper than Python reads was
    a RecursionError (the update failed saying only that; `bundle verify` printed a traceback)."""
    bundle, keys, _ = signed
    (bundle / "manifest.sig").write_text("[" * 200_000)
    with pytest.raises(SignatureError, match="not a signature \\(JSON nested deeper than Python reads\\)"):
        verify_bundle_signature(open_bundle(bundle), load_trusted_keys([keys]))


# --- keygen --name, sign --key and a signature that cannot be written: one line, exit code 2 ----------------

@pytest.mark.parametrize("name", ["", "../escaped", "sub/key", ".hidden"])
def test_keygen_name_is_a_file_name_not_a_path(tmp_path, name):
    """'' wrote the hidden keys/.key and keys/.pub (a `*.pub` that a trusted-keys directory still picks up);
    '../escaped' wrote the pair outside --out; 'sub/key' failed saying the directory was not writable."""
    (tmp_path / "work").mkdir()
    proc = _keygen("--out", tmp_path / "work" / "keys", "--name", name)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"edgeglm bundle keygen: error: --name {name!r}: is not a key name: use 1 to 128 "
                                  "letters, digits, '.', '_' or '-', starting with a letter or digit")
    assert "no key was written" in proc.stderr
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["work"]


def _small_bundle(root):
    """A bundle written the way the exporter writes one (real files, the real manifest writer): enough for
    sign and verify, which read files and the manifest only."""
    from ota.bundle import write_manifest

    (root / "onnxruntime").mkdir(parents=True)
    (root / "onnxruntime" / "model.onnx").write_bytes(b"graph" * 1000)
    (root / "tokenizer.json").write_text('{"model": {}}\n')
    write_manifest(root, {"name": "small", "version": "1.0.0", "min_agent_version": "0.1.0",
                          "architecture": PLACEHOLDER_ARCHITECTURE,
                          "precision": "int8",
                          "backends": {"onnxruntime": {"entry": "onnxruntime/model.onnx", "weights": "fp32",
                                                       "scheme": "test"}},
                          "golden": {"prompt_ids": [1], "reference": {"tokens": [2], "margins": [1.0]},
                                     "backends": {}, "tolerance": 0.1}})
    return root


def _bundle_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent.cli", "bundle", *map(str, args)],
                          capture_output=True, text=True)


def test_sign_with_a_key_path_that_is_a_directory_is_one_line(tmp_path):
    """`--key keys` (the directory keygen wrote into) ended in IsADirectoryError's traceback."""
    bundle = _small_bundle(tmp_path / "bundle")
    generate_keypair(tmp_path / "keys", "fleet")
    proc = _bundle_cli("sign", bundle, "--key", tmp_path / "keys")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert (f"edgeglm bundle sign: error: {tmp_path / 'keys'}: cannot read the private key (Is a directory); give the "
            "NAME.key file that `edgeglm bundle keygen` wrote") in proc.stderr
    assert not (bundle / "manifest.sig").exists()


def test_a_signature_that_cannot_be_written_is_one_line_and_leaves_the_bundle_as_it_was(tmp_path):
    """A signature that cannot be written (here a directory in the way; a read-only bundle or a full disk end the
    same way) ended in OSError's traceback."""
    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "fleet")
    (bundle / "manifest.sig").mkdir()
    before = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))
    proc = _bundle_cli("sign", bundle, "--key", pair.private_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert (f"edgeglm bundle sign: error: {bundle / 'manifest.sig'}: cannot write the signature (Is a directory); the "
            "bundle is left as it was") in proc.stderr
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == before


def test_a_key_retired_by_hiding_its_pub_file_is_no_longer_trusted(tmp_path):
    """`mv old.pub .old.pub` takes the key out of `ls` and of the shell's `*.pub`, but Python's glob still matched
    it: bundles signed by the retired key kept verifying."""
    bundle = _small_bundle(tmp_path / "bundle")
    keys = tmp_path / "keys"
    old = generate_keypair(keys, "old")
    new = generate_keypair(keys, "new")
    sign_bundle(open_bundle(bundle), load_private_key(old.private_path))
    old.private_path.unlink()
    old.public_path.rename(keys / ".old.pub")  # retired
    assert set(load_trusted_keys([keys])) == {new.key_id}
    proc = _bundle_cli("verify", bundle, "--trusted", keys)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"signed by unknown key '{old.key_id}'; trusted keys: {new.key_id}" in proc.stderr


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(chunk_size=4096), "the manifest lists 1 transfer chunk hash(es), 2 expected for 5000 bytes"),
    (lambda m: m["files"][0].update(chunks=["0" * 64]), "transfer chunk 0 (bytes 0-4999) does not match"),
])
def test_a_manifest_whose_chunk_hashes_do_not_match_its_files_is_refused_before_it_is_signed_or_offered(
        tmp_path, edit, message):
    """Whole-file hashes right, transfer chunk list wrong (a hand-edited chunk_size, a damaged hash): `bundle
    verify` and `bundle sign` passed it and the controller offered it, and every OTA transfer of it failed at
    that chunk on every device."""
    from fleet.controller import offerable_bundle
    from ota.errors import BundleError

    bundle = _small_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].sort(key=lambda f: f["path"])  # onnxruntime/model.onnx first
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    pair = generate_keypair(tmp_path / "keys", "fleet")
    for args in (("verify", bundle, "--trusted", tmp_path / "keys"), ("sign", bundle, "--key", pair.private_path)):
        proc = _bundle_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
        assert "an OTA transfer of it would fail" in proc.stderr
    assert not (bundle / "manifest.sig").exists()
    sign_bundle(open_bundle(bundle, verify=False), load_private_key(pair.private_path))  # signed by other means
    with pytest.raises(BundleError, match=re.escape(message)):
        offerable_bundle(bundle)


def test_a_damaged_file_is_called_damaged_not_a_manifest_edit(tmp_path):
    """One flipped byte in a model file was reported as "the manifest was edited or written for another chunk
    size" (the first chunk compared first): the operator looked at the wrong file."""
    bundle = _small_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = bundle / manifest["files"][0]["path"]
    data = bytearray(target.read_bytes())
    data[7] ^= 1
    target.write_bytes(bytes(data))
    pair = generate_keypair(tmp_path / "keys", "fleet")
    proc = _bundle_cli("sign", bundle, "--key", pair.private_path)
    assert proc.returncode == 2 and "(corrupted or modified file); the bundle is refused" in proc.stderr
    assert "manifest was edited" not in proc.stderr, proc.stderr


def test_files_the_manifest_does_not_list_fail_sign_verify_and_the_offer(tmp_path):
    """A file put beside a signed bundle's files (a hand-added config, a stray model file) verified "OK": the
    signature does not cover it and no OTA transfer carries it, so the operator believed a bundle that no agent
    gets. Sign, verify and the controller's offer name such files; the listed files and manifest.sig pass."""
    from fleet.controller import offerable_bundle

    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "fleet")
    assert _bundle_cli("sign", bundle, "--key", pair.private_path).returncode == 0
    assert _bundle_cli("verify", bundle, "--trusted", tmp_path / "keys").returncode == 0
    offerable_bundle(bundle)
    (bundle / "onnxruntime" / "extra.onnx").write_bytes(b"not signed")
    (bundle / ".hidden").write_text("x")
    for proc in (_bundle_cli("verify", bundle, "--trusted", tmp_path / "keys"),
                 _bundle_cli("sign", bundle, "--key", pair.private_path)):
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert (f"{bundle}: 2 file(s) not listed in the manifest: .hidden, onnxruntime/extra.onnx; the signature does "
                "not cover them and no agent would get them") in proc.stderr
    with pytest.raises(BundleError, match="not listed in the manifest: .hidden, onnxruntime/extra.onnx"):
        offerable_bundle(bundle)


def _interrupt_midway(monkeypatch, seen: list):
    """os.write as used by ota.signing writes half of what it is given, then raises KeyboardInterrupt (Ctrl-C in
    the middle of a write); `seen` gets (path, mode) of each file written to, read from the open descriptor."""
    import os
    import stat

    import ota.signing

    real_write = os.write

    def write(fd, data):
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_IMODE(os.fstat(fd).st_mode)))
        real_write(fd, bytes(data)[: len(data) // 2])
        raise KeyboardInterrupt()

    monkeypatch.setattr(ota.signing.os, "write", write)


def test_ctrl_c_in_the_middle_of_writing_a_key_leaves_nothing_and_the_private_key_is_0600_from_its_first_byte(
        tmp_path, monkeypatch):
    """A key was written in place: Ctrl-C (or a power cut) in the middle of it left a truncated NAME.key, and the
    next keygen with that name was refused ("already exists"). Keys are now written to a hidden temporary file,
    0600 before any byte, and linked into place only once complete and fsynced."""
    seen: list = []
    _interrupt_midway(monkeypatch, seen)
    with pytest.raises(KeyboardInterrupt):
        generate_keypair(tmp_path / "keys", "k")
    assert list((tmp_path / "keys").iterdir()) == []
    assert len(seen) == 1 and seen[0][1] == 0o600, seen  # the private key's file, private from the start
    assert not seen[0][0].endswith("/k.key")  # never written in place
    monkeypatch.undo()
    pair = generate_keypair(tmp_path / "keys", "k")
    assert pair.private_path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["k.key", "k.pub"]


def test_ctrl_c_in_the_middle_of_writing_a_signature_keeps_the_old_one_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "k")
    sign_bundle(open_bundle(bundle), load_private_key(pair.private_path))
    old = (bundle / "manifest.sig").read_bytes()
    before = sorted(p.name for p in bundle.iterdir())
    other = load_private_key(generate_keypair(tmp_path / "keys", "k2").private_path)
    seen: list = []
    _interrupt_midway(monkeypatch, seen)
    with pytest.raises(KeyboardInterrupt):
        sign_bundle(open_bundle(bundle), other)
    assert seen and not seen[0][0].endswith("/manifest.sig")  # never written in place
    assert (bundle / "manifest.sig").read_bytes() == old
    assert sorted(p.name for p in bundle.iterdir()) == before


def _power_cut_at_fsync(code: str, cwd) -> None:
    """Run `code` in a child whose first os.fsync ends the process at once (os._exit: no cleanup, no finally),
    as a power cut or SIGKILL after the bytes were written but before they were made durable."""
    prelude = "import os\nos.fsync = lambda fd: os._exit(9)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 9, proc.stderr


def test_a_power_cut_during_keygen_leaves_no_key_under_its_name(tmp_path):
    """A power cut while the private key was written left NAME.key (maybe empty or torn) without NAME.pub: the
    pair was unusable and keygen refused the name again. Only a hidden temporary file may be left now."""
    _power_cut_at_fsync(f"from ota.signing import generate_keypair\ngenerate_keypair({str(tmp_path / 'keys')!r}, "
                        "'k')\n", tmp_path)
    left = [p.name for p in (tmp_path / "keys").iterdir()]
    assert all(name.startswith(".") for name in left), left
    assert load_trusted_keys_or_none(tmp_path / "keys") is None  # no half pair is trusted or found
    generate_keypair(tmp_path / "keys", "k")


def load_trusted_keys_or_none(path):
    try:
        return load_trusted_keys([path])
    except SignatureError:
        return None


def test_a_power_cut_during_signing_keeps_the_old_signature_whole(tmp_path):
    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "k")
    sign_bundle(open_bundle(bundle), load_private_key(pair.private_path))
    old = (bundle / "manifest.sig").read_bytes()
    k2 = generate_keypair(tmp_path / "keys", "k2")
    _power_cut_at_fsync(f"from ota.bundle import open_bundle\nfrom ota.signing import load_private_key, "
                        f"sign_bundle\nsign_bundle(open_bundle({str(bundle)!r}), "
                        f"load_private_key({str(k2.private_path)!r}))\n", tmp_path)
    assert (bundle / "manifest.sig").read_bytes() == old
    verify_bundle_signature(open_bundle(bundle), load_trusted_keys([tmp_path / "keys"]))


def test_signing_never_writes_through_a_link_planted_at_a_temporary_name(tmp_path):
    """The signature was written to the fixed name manifest.sig.tmp, opened for writing: a symlink there (left in a
    copied bundle, or planted) had its target overwritten with the signature."""
    bundle = _small_bundle(tmp_path / "bundle")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    for name in ("manifest.sig.tmp", ".manifest.sig.tmp"):
        (bundle / name).symlink_to(victim)
    pair = generate_keypair(tmp_path / "keys", "k")
    sign_bundle(open_bundle(bundle), load_private_key(pair.private_path))
    assert victim.read_text() == "keep me\n"
    verify_bundle_signature(open_bundle(bundle), load_trusted_keys([tmp_path / "keys"]))


def test_keygen_never_overwrites_a_key_that_appears_while_it_writes(tmp_path, monkeypatch):
    """The pair is put in place with a link that fails when the name exists (not a rename, which would replace a
    key made meanwhile by another keygen); its own half is removed and the other key is left as it was."""
    import os

    import ota.signing

    real_fsync = os.fsync
    keys = tmp_path / "keys"

    def other_keygen(fd):
        real_fsync(fd)
        if not (keys / "k.pub").exists():
            (keys / "k.pub").write_text("someone else's key\n")

    monkeypatch.setattr(ota.signing.os, "fsync", other_keygen)
    with pytest.raises(SignatureError, match=re.escape(f"{keys / 'k.pub'}: already exists")):
        generate_keypair(keys, "k")
    assert sorted(p.name for p in keys.iterdir()) == ["k.pub"]
    assert (keys / "k.pub").read_text() == "someone else's key\n"


def test_a_bundle_whose_version_has_leading_zeros_is_not_signed_or_offered(tmp_path):
    """Made by hand or by an older exporter: `bundle sign` and the controller's offer name the field and value (an
    agent refuses the offer too: the manifest fails its schema, and nothing is switched)."""
    from fleet.controller import offerable_bundle

    bundle = _small_bundle(tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    data["version"] = "01.2.0"
    (bundle / "manifest.json").write_text(json.dumps(data))
    pair = generate_keypair(tmp_path / "keys", "k")
    proc = _bundle_cli("sign", bundle, "--key", pair.private_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "invalid manifest: version: '01.2.0' is not a version like 1.2.3 (numbers without leading " \
           "zeros)" in proc.stderr
    assert not (bundle / "manifest.sig").exists()
    with pytest.raises(BundleError, match="'01.2.0' is not a version like 1.2.3"):
        offerable_bundle(bundle)


def test_a_symlink_or_a_hidden_file_beside_the_listed_files_is_named_and_an_empty_directory_is_not(tmp_path):
    bundle = _small_bundle(tmp_path / "bundle")
    pair = generate_keypair(tmp_path / "keys", "k")
    sign_bundle(open_bundle(bundle), load_private_key(pair.private_path))
    (bundle / "empty").mkdir()
    open_bundle(bundle).check_complete()  # an empty directory carries nothing
    (tmp_path / "outside.bin").write_bytes(b"x")
    (bundle / "onnxruntime" / "linked.bin").symlink_to(tmp_path / "outside.bin")
    (bundle / ".DS_Store").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"3 file\(s\) not listed in the manifest: .DS_Store, manifest.json.bak, "
                                          "onnxruntime/linked.bin; the signature does not cover them"):
        shutil.copy(bundle / "manifest.json", bundle / "manifest.json.bak")
        open_bundle(bundle).check_complete()


def test_a_private_key_among_the_trusted_keys_is_warned_about_once(tmp_path, caplog):
    """`cp -r keys/ /etc/edgeglm/trusted-keys` (the whole `bundle keygen` directory) put the fleet's signing key on
    every box without a word: whoever reads it there can sign bundles the whole fleet trusts."""
    import logging

    keys = tmp_path / "keys"
    pair = generate_keypair(keys, "fleet")
    (keys / "README").write_text("public keys of the fleet\n")
    with caplog.at_level(logging.WARNING, logger="edgeglm.ota"):
        assert set(load_trusted_keys([keys], warn_private=True)) == {pair.key_id}  # a warning, not a refusal
        load_trusted_keys([keys], warn_private=True)
        load_trusted_keys([keys])  # `bundle verify --trusted keys/` on the signing machine: no warning there
    warnings = [r.getMessage() for r in caplog.records if "private signing key" in r.getMessage()]
    assert len(warnings) == 1 and str(pair.private_path) in warnings[0] and "README" not in caplog.text


def test_the_public_key_given_to_sign_says_which_file_to_give(tmp_path):
    """It was the library's "Valid PEM but no BEGIN/END delimiters for a private key found"."""
    pair = generate_keypair(tmp_path / "keys", "fleet")
    with pytest.raises(SignatureError, match=f"{pair.public_path}: is a public key \\(the half that verifies\\); "
                                             f"signing takes the private key, {pair.private_path}$"):
        load_private_key(pair.public_path)
