"""The OTA state machine, table-driven: failures and power cuts injected into every state.

Real parts throughout: signed bundles exported by the factory, the agent's self-test loading
them through ONNX Runtime, and for power cuts a separate process killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ota.bundle import open_bundle
from ota.errors import BundleError
from ota.offers import make_offer
from bundles import variant
from ota.signing import generate_keypair, load_private_key, sign_bytes
from ota.update import ROLLBACK_CLOCK_SKEW_S, ROLLBACK_FORMAT, RollbackTerms
from update_driver import DEVICE, FLEET, build_updater

DRIVER = Path(__file__).with_name("update_driver.py")
BEFORE = ["idle", "offered", "downloading", "verifying", "installing", "self_test", "committing"]
SUCCESS = BEFORE + ["cleanup", "reporting", "idle"]
# a rollback to the model the inactive slot still holds: verified there, self-tested and switched, nothing fetched
FROM_SLOT = ["idle", "offered", "self_test", "committing", "cleanup", "reporting", "idle"]


def failure_chain(state: str) -> list[str]:
    upto = BEFORE[: BEFORE.index(state) + 1]
    if state == "committing":
        return upto + ["rollback", "cleanup", "reporting", "idle"]
    return upto + ["failure", "cleanup", "reporting", "idle"]


def reports(work: Path) -> list[dict]:
    path = work / "reports.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def serving(work: Path):
    return json.loads((work / "serving.json").read_text()).get("version")


def offer_for(bundle: Path, update_id: str, **kw):
    return make_offer(open_bundle(bundle), update_id, {"type": "dir", "path": str(bundle)}, **kw)


@pytest.fixture
def device(signed_bundles, tmp_path):
    """A device serving v1 (installed through the updater itself, from nothing)."""
    work = tmp_path / "device"
    work.mkdir()
    shutil.copytree(signed_bundles["keys"], work / "keys")
    updater = build_updater(work)
    updater.submit(offer_for(signed_bundles["v1"], "install-v1"))
    updater.run()
    assert updater.data["history"] == SUCCESS and serving(work) == "1.0.0"
    (work / "reports.jsonl").unlink()
    return work


def test_update_commits_and_serves_the_new_model(device, signed_bundles):
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["history"] == SUCCESS
    assert updater.slots.active() == "b" and serving(device) == "1.1.0"
    sent = reports(device)
    assert [r["state"] for r in sent if "event" in r] == SUCCESS[1:]
    assert any(r.get("progress") == 100.0 for r in sent)
    self_test = next(r["self_test"] for r in sent if "self_test" in r)
    assert self_test["passed"] and "decode_ms_per_token" in self_test and "32/32" in self_test["golden"]
    assert sent[-2]["result"] == "committed"
    assert not (device / "state" / "staging").exists()
    assert (updater.slots.path("a") / "manifest.json").exists()  # the previous model stays for rollback


@pytest.mark.parametrize("state", BEFORE[1:])
def test_injected_failure_in_every_state_keeps_a_verified_model_serving(device, signed_bundles, state):
    updater = build_updater(device, activate_fails="1.1.0" if state == "committing" else None)
    if state != "committing":
        from ota.update import UpdateFailed

        def fail(s):
            if s.value == state:
                raise UpdateFailed(f"injected failure in {state}")
        updater.on_enter = fail
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["history"] == failure_chain(state)
    assert updater.slots.active() == "a" and serving(device) == "1.0.0"
    final = reports(device)[-2]
    assert final["result"] == ("rolled_back" if state == "committing" else "failed")
    assert final["reason"].startswith(state)
    assert not (updater.slots.path("b") / "manifest.json").exists()  # the failed slot is cleared
    probation = json.loads((device / "state" / "probation.json").read_text())  # 1.0.0's, from the install
    assert probation["update_id"] == "install-v1"  # a failed update leaves none of its own


@pytest.mark.parametrize("state", BEFORE[1:] + ["cleanup", "reporting"])
def test_power_cut_in_every_state_resumes_to_the_new_model(device, signed_bundles, state):
    (device / "offer.json").write_text(offer_for(signed_bundles["v2"], "u2").model_dump_json())
    killed = subprocess.run([sys.executable, str(DRIVER), str(device), "--kill-at", state], capture_output=True)
    assert killed.returncode == -9
    assert json.loads((device / "state" / "update.json").read_text())["state"] == state
    resumed = subprocess.run([sys.executable, str(DRIVER), str(device)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads((device / "state" / "update.json").read_text())
    assert data["history"] == SUCCESS
    assert serving(device) == "1.1.0" and data["outcome"] == "committed"
    sent = reports(device)  # the killed process and the restarted one together reported every step once
    assert [r["state"] for r in sent if "event" in r] == SUCCESS[1:]
    assert sent[-2]["result"] == "committed" and "reason" not in sent[-2]


def test_a_crash_loop_in_committing_gives_up_and_serves_the_old_model_again(device, signed_bundles):
    """The agent loads no model at a start in COMMITTING (that state loads the new one); a COMMITTING that then
    failed before its switch (a crash loop there, a state that cannot be saved) left the box serving nothing, with
    no reason given, until the next restart."""
    (device / "offer.json").write_text(offer_for(signed_bundles["v2"], "u2").model_dump_json())
    for _ in range(4):  # the process dies on entering COMMITTING every time
        subprocess.run([sys.executable, str(DRIVER), str(device), "--kill-at", "committing"], capture_output=True)
    data = json.loads((device / "state" / "update.json").read_text())
    assert data["state"] == "idle" and "entered 4 times" in data["reason"] and data["outcome"] == "failed"
    assert serving(device) == "1.0.0"  # loaded again by the failed update's end, in the last run
    assert json.loads((device / "state" / "update.json").read_text())["history"][-4:] == \
        ["rollback", "cleanup", "reporting", "idle"]


def test_the_serving_bundle_signed_again_and_offered_keeps_the_new_signature(device, signed_bundles, tmp_path):
    """A key rotation: the serving bundle re-signed with the new key (same manifest bytes) and offered counted as
    done, and the slot kept the old key's signature; once the old key left ota.trusted_keys, as a rotation ends,
    the next start refused the serving model."""
    from ota.signing import load_trusted_keys, read_signature, sign_bundle, slot_signers, verify_bundle_signature

    new = generate_keypair(tmp_path / "new-keys", "fleet-2027")
    shutil.copy(new.public_path, device / "keys")
    resigned = shutil.copytree(signed_bundles["v1"], tmp_path / "v1-resigned")
    (resigned / "manifest.sig").unlink()
    sign_bundle(open_bundle(resigned), load_private_key(new.private_path))
    updater = build_updater(device)
    updater.submit(offer_for(resigned, "resign-v1"))
    updater.run()
    assert updater.data["outcome"] == "committed" and "downloading" not in updater.data["history"]
    active = updater.slots.active_path()
    assert read_signature(active)["key_id"] == new.key_id
    # the old key's copy offered again meanwhile (a rollout or `fleet offer` from the copy not re-signed): it put
    # the old key's signature back, and the end of the rotation left the box serving nothing at its next start
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v1"], "old-copy-v1"))
    updater.run()
    assert updater.data["outcome"] == "committed" and "downloading" not in updater.data["history"]
    assert read_signature(active)["key_id"] == new.key_id  # a key the slot holds a signature of: nothing changes
    # replayed by anyone who can publish on the offer topic, under new update ids, its signature spelt another
    # way (an extra field; base64 that decodes the same): twice, it pushed the new key's signature out of the slot
    for i, extra in enumerate(({"x": 1}, {"y": 2})):
        replay = offer_for(signed_bundles["v1"], f"replay-{i}")
        replay.signature = {**replay.signature, **extra}
        updater = build_updater(device)
        updater.submit(replay)
        updater.run()
        assert updater.data["outcome"] == "committed"
    assert read_signature(active)["key_id"] == new.key_id
    (device / "keys" / "fleet.pub").unlink()  # the rotation ends: the old key is no longer trusted
    trusted = load_trusted_keys([device / "keys"])
    assert verify_bundle_signature(open_bundle(active), trusted) == new.key_id
    # the next rotation, the old key trusted again meanwhile: each key's signature is kept, none pushed out
    third = generate_keypair(tmp_path / "third-keys", "fleet-2028")
    shutil.copy(third.public_path, device / "keys")
    shutil.copy(signed_bundles["keys"] / "fleet.pub", device / "keys")
    again = shutil.copytree(signed_bundles["v1"], tmp_path / "v1-third")
    (again / "manifest.sig").unlink()
    sign_bundle(open_bundle(again), load_private_key(third.private_path))
    for update_id, bundle in (("third-v1", again), ("old-again", signed_bundles["v1"])):
        updater = build_updater(device)
        updater.submit(offer_for(bundle, update_id))
        updater.run()
    assert read_signature(active)["key_id"] == third.key_id
    assert slot_signers(active, (active / "manifest.json").read_bytes(), load_trusted_keys([device / "keys"])) == \
        sorted({new.key_id, third.key_id, read_signature(signed_bundles["v1"])["key_id"]})


def test_a_damaged_signature_in_the_slot_is_replaced_by_the_same_keys_offered_again(device, signed_bundles):
    """The slot's manifest.sig damaged (its signature bytes changed, its key id intact: a bad block): the bundle
    offered again with a good signature by the same key puts it back (a key the slot holds a signature of changes
    nothing only where that signature verifies)."""
    import base64

    from ota.signing import load_trusted_keys, verify_bundle_signature

    active = build_updater(device).slots.active_path()
    sig = json.loads((active / "manifest.sig").read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[0] ^= 0xFF
    (active / "manifest.sig").write_text(json.dumps({**sig, "signature": base64.b64encode(bytes(raw)).decode()}))
    trusted = load_trusted_keys([device / "keys"])
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle_signature(open_bundle(active), trusted, previous=True)
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v1"], "again-v1"))
    updater.run()
    assert updater.data["outcome"] == "committed"
    assert verify_bundle_signature(open_bundle(active), trusted) == sig["key_id"]


def test_a_key_removed_while_its_bundle_downloads_is_not_trusted_at_verification(device, signed_bundles, tmp_path):
    """The keys were read once, when the offer came: a key removed while its bundle downloaded still passed
    VERIFYING and SELF_TEST, and INSTALLING overwrote the previous model with it before COMMITTING refused it."""
    from ota.signing import load_trusted_keys

    rotating = generate_keypair(tmp_path / "rotating", "rotating")
    shutil.copy(rotating.public_path, device / "keys")
    bundle = variant(signed_bundles["v2"], tmp_path / "rotating-v2", load_private_key(rotating.private_path))
    updater = build_updater(device)
    updater.deps.reload_keys = lambda: load_trusted_keys([device / "keys"])  # as the agent wires it

    def remove_key(state):
        if state.value == "downloading":
            (device / "keys" / "rotating.pub").unlink()
    updater.on_enter = remove_key
    updater.submit(offer_for(bundle, "u2"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "verifying" in updater.data["history"]
    assert "installing" not in updater.data["history"], updater.data["history"]
    assert f"unknown key '{rotating.key_id}'" in updater.data["reason"]
    assert updater.slots.active() == "a" and serving(device) == "1.0.0"


def test_a_box_with_room_for_two_bundles_takes_every_update(signed_bundles, int8_bundle, tmp_path):
    """The free-space check wanted the whole bundle free while the target slot still held the model before the
    serving one, which the install replaces anyway: a box sized for two bundles refused every update after the
    second with "disk full". Now that slot is cleared first (and it is said), only when the room is needed."""
    from bundles import variant

    v3 = variant(int8_bundle, tmp_path / "v3", signed_bundles["key"], version="1.2.0")
    blocks = sum(-(-f.size // 4096) * 4096 for f in open_bundle(signed_bundles["v1"]).manifest.files)
    with small_disk(tmp_path / "two-bundles", (2 * blocks + (1 << 20)) // 1024 + 384) as work:
        shutil.copytree(signed_bundles["keys"], work / "keys")
        for bundle, update_id in ((signed_bundles["v1"], "u1"), (signed_bundles["v2"], "u2"), (v3, "u3")):
            gc.collect()  # the models an earlier updater here loaded map files of the slot to be cleared (an agent
            # has one process: the model before the serving one is not loaded)
            updater = build_updater(work)
            updater.submit(offer_for(bundle, update_id))
            updater.run()
            assert updater.data["outcome"] == "committed", updater.data["reason"]
            del updater.deps  # its serving model, for the collection above
        assert serving(work) == "1.2.0" and updater.slots.active() == "a"
        assert open_bundle(updater.slots.path("b")).manifest.version == "1.1.0"  # the one before stays
        cleared = [r for r in reports(work) if r.get("cleared_slot")]
        assert [(r["update_id"], r["cleared_slot"]) for r in cleared] == [("u3", "a")]


def test_a_download_that_fails_before_it_needs_the_room_keeps_the_previous_model(signed_bundles, int8_bundle,
                                                                                  tmp_path):
    """The slot of the model before the serving one was cleared as soon as the offer was taken: a download that
    then failed (its source gone, a damaged or forged chunk answer) left the box with no previous model. It is
    cleared only once the download has filled the free space."""
    from bundles import variant

    v3 = variant(int8_bundle, tmp_path / "v3", signed_bundles["key"], version="1.2.0")
    damaged = shutil.copytree(v3, tmp_path / "v3-damaged")
    first = open_bundle(v3).manifest.files[0]
    data = bytearray((damaged / first.path).read_bytes())
    data[0] ^= 0xFF  # its first chunk: the download fails before anything needed the room
    (damaged / first.path).write_bytes(bytes(data))
    blocks = sum(-(-f.size // 4096) * 4096 for f in open_bundle(signed_bundles["v1"]).manifest.files)
    with small_disk(tmp_path / "two-bundles", (2 * blocks + (1 << 20)) // 1024 + 384) as work:
        shutil.copytree(signed_bundles["keys"], work / "keys")
        for bundle, update_id in ((signed_bundles["v1"], "u1"), (signed_bundles["v2"], "u2")):
            gc.collect()
            updater = build_updater(work)
            updater.submit(offer_for(bundle, update_id))
            updater.run()
            assert updater.data["outcome"] == "committed", updater.data["reason"]
            del updater.deps
        gc.collect()
        updater = build_updater(work)
        offer = offer_for(v3, "u3-damaged")
        offer.source = {"type": "dir", "path": str(damaged)}
        updater.submit(offer)
        updater.run()
        assert updater.data["outcome"] == "failed" and "does not match the manifest" in updater.data["reason"]
        assert open_bundle(updater.slots.path("a")).manifest.version == "1.0.0"  # still there to go back to
        assert not [r for r in reports(work) if r.get("cleared_slot")]
        del updater.deps
        gc.collect()
        updater = build_updater(work)
        updater.submit(offer_for(v3, "u3"))
        updater.run()
        assert updater.data["outcome"] == "committed", updater.data["reason"]
        cleared = [r for r in reports(work) if r.get("cleared_slot")]
        assert [(r["update_id"], r["state"], r["cleared_slot"]) for r in cleared] == [("u3", "downloading", "a")]


def test_crash_loop_in_self_test_gives_up_and_keeps_the_old_model(device, signed_bundles):
    (device / "offer.json").write_text(offer_for(signed_bundles["v2"], "u2").model_dump_json())
    for _ in range(4):  # the process dies in SELF_TEST every time it gets there
        subprocess.run([sys.executable, str(DRIVER), str(device), "--kill-at", "self_test"], capture_output=True)
    data = json.loads((device / "state" / "update.json").read_text())
    assert data["state"] == "idle" and data["history"] == failure_chain("self_test")
    assert "entered 4 times" in data["reason"]
    assert serving(device) == "1.0.0"
    final = reports(device)[-2]
    assert final["result"] == "failed" and "entered 4 times" in final["reason"]


def _refused(device, offer, match):
    updater = build_updater(device)
    updater.submit(offer)
    updater.run()
    assert updater.data["history"][-4:] == ["failure", "cleanup", "reporting", "idle"]
    assert match in updater.data["reason"], updater.data["reason"]
    assert updater.slots.active() == "a" and serving(device) == "1.0.0"
    return updater


def test_corrupted_chunk_is_refused(device, signed_bundles, tmp_path):
    source = shutil.copytree(signed_bundles["v2"], tmp_path / "src")
    weights = source / "openvino" / "openvino_model.bin"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0x01
    weights.write_bytes(bytes(data))
    offer = make_offer(open_bundle(signed_bundles["v2"]), "u2", {"type": "dir", "path": str(source)})
    _refused(device, offer, "chunk 0 of openvino/openvino_model.bin: sha256")


def test_a_chunk_damaged_once_on_its_way_is_asked_for_again(device, signed_bundles):
    """One chunk that did not match failed the whole update (and CLEANUP removed every chunk already verified):
    it is fetched again, up to CHUNK_ATTEMPTS times, before the update fails (the source's bytes then differ)."""
    from ota.update import CHUNK_ATTEMPTS

    updater = build_updater(device)
    real, damaged = updater.deps.fetcher, []

    class Flaky:
        def read_chunk(self, offer, path, index, chunk_size):
            data = real.read_chunk(offer, path, index, chunk_size)
            if index == 0 and path.endswith(".bin") and len(damaged) < CHUNK_ATTEMPTS - 1:
                damaged.append(path)
                return bytes([data[0] ^ 1]) + data[1:]
            return data

    updater.deps.fetcher = Flaky()
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["outcome"] == "committed", updater.data["reason"]
    assert len(damaged) == CHUNK_ATTEMPTS - 1 and serving(device) == "1.1.0"


def test_an_offer_of_a_bundle_whose_download_failed_resumes_from_its_verified_chunks(device, signed_bundles):
    """A download that failed for good (the controller unreachable past ota.give_up_s) had its chunks removed: the
    operator's next offer of the same bundle (a new update id) downloaded it from chunk 0 again. Its verified
    chunks are kept for an offer of the same manifest now (and dropped for any other)."""
    from ota.update import UpdateFailed

    total = sum(len(f.chunks) for f in open_bundle(signed_bundles["v2"]).manifest.files)
    updater = build_updater(device)
    real, fetched = updater.deps.fetcher, []

    class GoesAway:
        def read_chunk(self, offer, path, index, chunk_size):
            if len(fetched) == total // 2:
                raise UpdateFailed(f"chunk {index} of {path}: no answer from the controller within 300 s")
            fetched.append((path, index))
            return real.read_chunk(offer, path, index, chunk_size)

    updater.deps.fetcher = GoesAway()
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["outcome"] == "failed" and (device / "state" / "staging-partial").is_dir()
    first = len(fetched)
    junk = offer_for(signed_bundles["v1"], "junk")  # refused unverified (any sender can publish one): the chunks stay
    junk.signature = {"key_id": "x", "signature": "AA==", "algorithm": "ed25519"}
    updater.submit(junk)
    updater.run()
    assert updater.data["outcome"] == "failed" and (device / "state" / "staging-partial").is_dir()

    class Counting:
        def read_chunk(self, offer, path, index, chunk_size):
            fetched.append((path, index))
            return real.read_chunk(offer, path, index, chunk_size)

    updater.deps.fetcher = Counting()
    updater.submit(offer_for(signed_bundles["v2"], "u2-again"))
    updater.run()
    assert updater.data["outcome"] == "committed", updater.data["reason"]
    assert first == total // 2 and len(fetched) == total  # together each chunk once: the second fetched the rest
    assert serving(device) == "1.1.0" and not (device / "state" / "staging-partial").exists()
    assert any(r.get("resumed_bytes") for r in reports(device))


def test_wrong_signature_is_refused(device, signed_bundles, tmp_path):
    offer = offer_for(signed_bundles["v2"], "u2")
    other = offer_for(signed_bundles["v1"], "u1")
    offer.signature = other.signature  # a valid signature, but of another manifest
    _refused(device, offer, "signature does not verify")


def test_unknown_key_is_refused(device, signed_bundles, tmp_path):
    rogue = generate_keypair(tmp_path / "rogue", "rogue")
    bundle = variant(signed_bundles["v2"], tmp_path / "rogue-v2", load_private_key(rogue.private_path))
    _refused(device, offer_for(bundle, "u2"), f"unknown key '{rogue.key_id}'")


def test_truncated_manifest_is_refused(device, signed_bundles):
    import base64

    offer = offer_for(signed_bundles["v2"], "u2")
    offer.manifest_b64 = base64.b64encode(offer.manifest_bytes()[:300]).decode()
    _refused(device, offer, "offered manifest is invalid")


def test_an_offered_version_with_leading_zeros_is_refused_naming_it(device, signed_bundles):
    """The reason read "offered manifest is invalid (1 validation error for Manifest)": the field and the value
    were in lines the status left out."""
    import base64

    offer = offer_for(signed_bundles["v2"], "u2")
    data = json.loads(offer.manifest_bytes())
    data["version"] = "01.2.0"
    offer.manifest_b64 = base64.b64encode(json.dumps(data).encode()).decode()
    _refused(device, offer, "offered manifest is invalid (version: '01.2.0' is not a version like "
                            "1.2.3 (numbers without leading zeros))")


def rollback_for(bundle: Path, update_id: str, key, **terms):
    """A rollback offer to `bundle`, signed by `key`, by default for the driven device serving 1.1.0, valid 1 h."""
    terms = {"format": ROLLBACK_FORMAT, "fleet": FLEET, "device": DEVICE, "replaces": "1.1.0",
             "not_after": int(time.time()) + 3600, **terms}
    return offer_for(bundle, update_id, rollback_key=key, rollback_terms=RollbackTerms(**terms))


@pytest.fixture
def upgraded(device, signed_bundles):
    """The device serving v2 (1.1.0) from slot b, v1 kept in slot a."""
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["history"] == SUCCESS and serving(device) == "1.1.0"
    (device / "reports.jsonl").unlink()
    return device


def _rollback_refused(device, offer, match, **kw):
    """The offer is refused in OFFERED, the reason is in the OTA status, 1.1.0 keeps serving."""
    updater = build_updater(device, **kw)
    updater.submit(offer)
    updater.run()
    assert updater.data["history"] == ["idle", "offered", "failure", "cleanup", "reporting", "idle"]
    assert match in updater.data["reason"], updater.data["reason"]
    final = reports(device)[-2]
    assert final["result"] == "failed" and match in final["reason"]
    assert updater.slots.active() == "b" and serving(device) == "1.1.0"
    return updater


def test_replayed_older_version_is_refused_unless_a_signed_rollback(upgraded, signed_bundles):
    _rollback_refused(upgraded, offer_for(signed_bundles["v1"], "replay"), "not newer than the active 1.1.0")
    unsigned_rollback = offer_for(signed_bundles["v1"], "rb")
    unsigned_rollback.rollback = True
    _rollback_refused(upgraded, unsigned_rollback, "no rollback_signature")
    updater = build_updater(upgraded)
    updater.submit(rollback_for(signed_bundles["v1"], "rb2", signed_bundles["key"]))
    updater.run()
    assert updater.data["history"] == FROM_SLOT and serving(upgraded) == "1.0.0"
    assert updater.applied_rollbacks() == ["rb2"]  # persisted in the OTA state dir
    assert json.loads((upgraded / "state" / "rollbacks-applied.json").read_text()) == {"applied": ["rb2"]}


def test_the_bundle_a_signed_rollback_backed_out_is_refused_when_its_old_offer_is_replayed(upgraded,
                                                                                        signed_bundles):
    """After a signed rollback from 1.1.0 to 1.0.0, anyone able to publish on the device's offer topic could send
    1.1.0's old offer again (offers are retained, so it is easy to have): it was a plain upgrade and committed,
    undoing the rollback. The backed-out bundle is remembered by its manifest hash and refused; a new version of
    the model, or a signed rollback offer, still installs."""
    updater = build_updater(upgraded)
    updater.submit(rollback_for(signed_bundles["v1"], "rb", signed_bundles["key"]))
    updater.run()
    assert serving(upgraded) == "1.0.0"
    (entry,) = updater.withdrawn()
    assert entry["version"] == "1.1.0" and entry["why"] == "rollback rb"
    updater = build_updater(upgraded)
    updater.submit(offer_for(signed_bundles["v2"], "u2-replayed"))
    updater.run()
    assert updater.data["outcome"] == "failed" and serving(upgraded) == "1.0.0"
    assert "bundle 1.1.0 (manifest sha256" in updater.data["reason"]
    assert "was backed out on this device by rollback rb" in updater.data["reason"]
    assert "release the model again as a new version" in updater.data["reason"]
    updater = build_updater(upgraded)  # an authorised rollback to it (from 1.0.0) still installs it
    updater.submit(rollback_for(signed_bundles["v2"], "rb-again", signed_bundles["key"], replaces="1.0.0"))
    updater.run()
    assert updater.data["outcome"] == "committed", updater.data["reason"]
    assert serving(upgraded) == "1.1.0"


def test_a_model_that_crash_looped_on_probation_is_refused_when_offered_again(upgraded, signed_bundles):
    """1.1.0 killed the agent three times on probation and the box went back to 1.0.0: the same offer again (the
    controller's retained one after a reconnect, a replay) installed it again into the same crash loop."""
    for _ in range(3):
        build_updater(upgraded, probation=True)
    assert serving(upgraded) == "1.0.0"
    updater = build_updater(upgraded)
    assert [e["version"] for e in updater.withdrawn()] == ["1.1.0"]
    assert "its probation: 3 deaths" in updater.withdrawn()[0]["why"]
    updater.submit(offer_for(signed_bundles["v2"], "u2-again"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "was backed out on this device by its probation" in \
        updater.data["reason"]
    assert serving(upgraded) == "1.0.0"
    (upgraded / "state" / "withdrawn.json").write_text("{")  # a damaged record refuses offers, names itself
    updater = build_updater(upgraded)
    updater.submit(offer_for(signed_bundles["v2"], "u2-damaged"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "withdrawn.json: unreadable" in updater.data["reason"]


def test_a_signed_rollback_whose_commit_was_cut_by_a_death_backs_out_the_right_bundle(upgraded, signed_bundles):
    """COMMITTING withdrew the bundle in the active slot: entered again after the agent died while loading the
    rollback's model, the active slot was already the target, and the model rolled back TO was recorded as
    backed out (its plain offers refused from then on)."""
    updater = build_updater(upgraded)
    real = updater.deps.activate

    def dies_once(path):
        updater.deps.activate = real
        raise KeyboardInterrupt("the process dies while loading the model")  # not caught by the state machine

    updater.deps.activate = dies_once
    updater.submit(rollback_for(signed_bundles["v1"], "rb-cut", signed_bundles["key"]))
    with pytest.raises(KeyboardInterrupt):
        updater.run()
    restarted = build_updater(upgraded)  # the next start: COMMITTING again
    restarted.run()
    assert restarted.data["outcome"] == "committed" and serving(upgraded) == "1.0.0"
    assert [e["version"] for e in restarted.withdrawn()] == ["1.1.0"]


def test_a_probation_rollback_goes_back_even_when_its_record_cannot_be_written(upgraded, monkeypatch, caplog):
    """The record of the backed-out bundle was written before the switch back, unguarded: on a disk a crash loop
    had filled, every start raised there and the box never went back to the previous model."""
    import ota.update as update

    real = update.atomic_write_json

    def full_for_the_record(path, data):
        if path.name == update.WITHDRAWN:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(update, "atomic_write_json", full_for_the_record)
    for _ in range(3):
        updater = build_updater(upgraded, probation=True)
    assert serving(upgraded) == "1.0.0" and updater.slots.active() == "a"
    assert "withdrawn.json could not be written" in caplog.text and updater.withdrawn() == []


class _CountingFetcher:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def read_chunk(self, *args):
        self.calls += 1
        return self.real.read_chunk(*args)


def test_a_rollback_to_the_model_kept_in_the_inactive_slot_downloads_nothing(upgraded, signed_bundles, tmp_path):
    """The previous model stays in its slot after an update: a rollback to it is verified there (every file's
    hash), self-tested and switched to, without fetching a chunk (a box on a slow or metered link, where the
    new model misbehaves, goes back at once). The offer's source is gone here: a download would fail."""
    updater = build_updater(upgraded)
    updater.deps.fetcher = counting = _CountingFetcher(updater.deps.fetcher)
    offer = rollback_for(signed_bundles["v1"], "rb-slot", signed_bundles["key"])
    offer.source = {"type": "dir", "path": str(tmp_path / "gone")}
    updater.submit(offer)
    updater.run()
    assert updater.data["history"] == FROM_SLOT, updater.data.get("reason")
    assert counting.calls == 0 and serving(upgraded) == "1.0.0" and updater.slots.active() == "a"
    sent = reports(upgraded)
    assert any(r.get("in_slot") == "a" for r in sent) and sent[-2]["result"] == "committed"
    assert (updater.slots.path("b") / "manifest.json").exists()  # 1.1.0 is kept in its turn


def test_a_damaged_copy_in_the_inactive_slot_is_downloaded_again(upgraded, signed_bundles):
    """A file of the kept model changed on disk (bit rot, an edit): the slot is not taken as it is; the bundle is
    downloaded into it and verified like any other update."""
    updater = build_updater(upgraded)
    onnx = next((updater.slots.path("a")).rglob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    updater.deps.fetcher = counting = _CountingFetcher(updater.deps.fetcher)
    updater.submit(rollback_for(signed_bundles["v1"], "rb-damaged-slot", signed_bundles["key"]))
    updater.run()
    assert updater.data["history"] == SUCCESS, updater.data.get("reason")
    assert counting.calls > 0 and serving(upgraded) == "1.0.0"
    assert onnx.read_bytes() != bytes(data)  # the downloaded, verified copy replaced it


def test_a_kept_model_signed_again_since_is_taken_with_the_offers_signature(upgraded, signed_bundles, tmp_path):
    """Key rotation: the bundle kept in the slot carries a signature by a key the device no longer trusts; the
    controller offers the same manifest signed by the new key. The slot is used, with the offer's signature."""
    import base64

    from ota.signing import SIGNATURE

    new = generate_keypair(tmp_path / "new-key", "rotated")
    for old in (upgraded / "keys").glob("*.pub"):
        old.unlink()  # only the new key is trusted now
    shutil.copy(new.public_path, upgraded / "keys")
    updater = build_updater(upgraded)
    new_key = load_private_key(new.private_path)
    offer = rollback_for(signed_bundles["v1"], "rb-rotated", new_key)
    offer.signature = sign_bytes(base64.b64decode(offer.manifest_b64), new_key)
    updater.deps.fetcher = counting = _CountingFetcher(updater.deps.fetcher)
    updater.submit(offer)
    updater.run()
    assert updater.data["history"] == FROM_SLOT, updater.data.get("reason")
    assert counting.calls == 0 and serving(upgraded) == "1.0.0"
    assert json.loads((updater.slots.path("a") / SIGNATURE).read_text()) == offer.signature


def test_a_committed_model_that_keeps_killing_the_agent_goes_back_by_itself(upgraded):
    """1.1.0 passed its self-test and was committed, then the agent died without a clean stop (a native crash in
    the engine, the OOM killer, SIGKILL) before the model had served its probation: at the third such start the
    agent goes back to 1.0.0 in the other slot before loading anything, clears 1.1.0's slot and reports the
    update rolled back. Before, every restart loaded 1.1.0 again: a crash loop no update could reach."""
    probation = upgraded / "state" / "probation.json"
    assert json.loads(probation.read_text())["slot"] == "b"  # the committing run never stopped cleanly
    for deaths in (1, 2):
        updater = build_updater(upgraded, probation=True)
        assert serving(upgraded) == "1.1.0" and updater.probation["deaths"] == deaths
    updater = build_updater(upgraded, probation=True)
    assert serving(upgraded) == "1.0.0" and updater.slots.active() == "a" and updater.probation is None
    assert not (updater.slots.path("b") / "manifest.json").exists() and not probation.exists()
    (result,) = [r for r in reports(upgraded) if r.get("result")]
    assert result["update_id"] == "u2" and result["result"] == "rolled_back" and result["active_slot"] == "a"
    assert "ended without a clean stop 3 times" in result["reason"] and "version 1.1.0" in result["reason"]
    updater = build_updater(upgraded, probation=True)  # the next start: nothing left to count
    assert serving(upgraded) == "1.0.0" and updater.probation is None and len(reports(upgraded)) == 1


class _Killed(BaseException):
    """The process dies here (not caught by anything in the updater)."""


@pytest.mark.parametrize("cut", ["switching back", "clearing the slot", "dropping the record"])
def test_a_probation_rollback_cut_short_is_finished_and_reported_at_the_next_start(upgraded, signed_bundles,
                                                                                   monkeypatch, cut):
    """A kill between the switch back and the record of the backed-out bundle (or the report) left 1.1.0 not
    withdrawn, sometimes whole in its slot: the next start dropped the probation record without a word, a replay of
    1.1.0's offer installed it again into the same crash loop, and the rollout never heard of the rollback."""
    import ota.slots
    import ota.update as update

    for _ in range(2):
        build_updater(upgraded, probation=True)
    patch = {"switching back": (ota.slots.Slots, "activate"), "clearing the slot": (ota.slots.Slots, "clear"),
             "dropping the record": (update.Updater, "_save_probation")}[cut]
    real = getattr(*patch)

    def dies(self, *args):
        if patch[1] != "_save_probation" or args[0] is None:
            raise _Killed(cut)
        return real(self, *args)

    monkeypatch.setattr(*patch, dies)
    with pytest.raises(_Killed):
        build_updater(upgraded, probation=True)  # the third death's start, killed midway through the rollback
    monkeypatch.setattr(*patch, real)
    assert reports(upgraded) == []
    updater = build_updater(upgraded, probation=True)  # the next start finishes it
    assert serving(upgraded) == "1.0.0" and updater.slots.active() == "a" and updater.probation is None
    assert not (updater.slots.path("b") / "manifest.json").exists()
    (result,) = [r for r in reports(upgraded) if r.get("result")]
    assert result["result"] == "rolled_back" and result["active_slot"] == "a" and "3 times" in result["reason"]
    assert [e["version"] for e in updater.withdrawn()] == ["1.1.0"]
    updater.submit(offer_for(signed_bundles["v2"], "u2-replayed"))  # the replay is refused
    updater.run()
    assert updater.data["outcome"] == "failed" and serving(upgraded) == "1.0.0"


def test_an_outcome_stays_in_the_state_dir_until_the_broker_has_it(upgraded):
    """A probation rollback's report (and any update's outcome) lived only in the MQTT session's memory: an agent
    killed before the broker had it lost it for good, and the fleet never heard why the box went back. The outcome
    is kept in ota-report.json (written before the probation record goes) until the agent says it was delivered."""
    kept = upgraded / "state" / "ota-report.json"
    assert json.loads(kept.read_text())["result"] == "committed"  # u2's outcome, never said delivered here
    for _ in range(3):
        updater = build_updater(upgraded, probation=True)
    (result,) = [r for r in reports(upgraded) if r.get("result")]
    assert result["result"] == "rolled_back" and updater.undelivered_report() == result
    updater = build_updater(upgraded, probation=True)  # a start after a kill: the same outcome, still there
    assert updater.undelivered_report() == result
    updater.report_delivered({**result, "ts": result["ts"] + 1})  # not this one (a newer outcome replaced it)
    assert updater.undelivered_report() == result
    updater.report_delivered(result)
    assert updater.undelivered_report() is None and not kept.exists()
    kept.write_text('{"result": "committed"')  # cut short by a full disk: dropped with its name, not a crash
    assert updater.undelivered_report() is None and not kept.exists()


@pytest.mark.parametrize("disk", ["previous slot empty", "current missing", "previous is the bad slot"])
def test_a_rollback_record_that_does_not_match_the_disk_never_deletes_the_only_model(upgraded, disk):
    """Finishing a rollback cut short must not clear the bad slot unless the previous one holds a model and `current`
    points there: with slot a emptied by hand (or a disk error) it cleared b too, both slots empty, and reported
    `rolled_back` to slot a; with `current` missing it cleared b and served nothing."""
    state = upgraded / "state"
    probation = state / "probation.json"
    record = {**json.loads(probation.read_text()), "deaths": 3, "running": False, "rolling_back": True}
    if disk == "previous slot empty":
        shutil.rmtree(state / "slots" / "a")
        (state / "slots" / "a").mkdir()
    elif disk == "current missing":
        (state / "current").unlink()
    else:
        record["previous_slot"] = record["slot"]
    probation.write_text(json.dumps(record))
    updater = build_updater(upgraded, probation=True)
    if disk == "current missing":  # the previous model is there: the rollback is finished onto it
        assert updater.slots.active() == "a" and serving(upgraded) == "1.0.0"
        assert not (state / "slots" / "b" / "manifest.json").exists()
        assert [r["active_slot"] for r in reports(upgraded) if r.get("result")] == ["a"]
    else:  # no previous model: the bad one is all there is, kept and served
        assert updater.slots.active() == "b" and serving(upgraded) == "1.1.0" and reports(upgraded) == []
        assert (state / "slots" / "b" / "manifest.json").is_file()
    assert updater.probation is None


@pytest.mark.parametrize("record", [{"previous_slot": 5}, {"previous_slot": ["a"]}, {"probation_s": "600"},
                                    {"deaths": True}, {"running": "yes"}, []])
def test_a_probation_record_with_a_wrong_type_is_dropped_not_a_crash_at_every_start(upgraded, caplog, record):
    """A wrong-typed field of probation.json (a disk error, an edit) raised TypeError or ValueError at every start,
    before the model loaded: the box never served again, out of reach of OTA."""
    probation = upgraded / "state" / "probation.json"
    data = json.loads(probation.read_text())
    probation.write_text(json.dumps({**data, "deaths": 2, **record} if isinstance(record, dict) else record))
    updater = build_updater(upgraded, probation=True)
    assert serving(upgraded) == "1.1.0" and updater.probation is None and not probation.exists()
    assert "probation.json unreadable" in caplog.text


def test_temporary_files_left_by_writes_cut_short_are_removed_at_start(upgraded):
    """A kill between writing a state file's temporary copy and putting it in place left `.update.json.<hex>.tmp`
    (the whole offer, ~14 KB) behind at every crash, and nothing removed them."""
    state = upgraded / "state"
    leftovers = [state / ".update.json.0123456789ab.tmp", state / ".probation.json.a1b2c3d4e5f6.tmp",
                 state / "slots" / "b" / ".manifest.sig.ffffffffffff.tmp"]
    for f in leftovers:
        f.write_text("{}")
    (state / ".current.tmp").symlink_to("slots/a")
    mine = state / "notes.tmp"  # not a name the updater writes: left alone
    mine.write_text("keep")
    build_updater(upgraded)
    assert not any(f.exists() for f in leftovers) and not (state / ".current.tmp").is_symlink()
    assert mine.read_text() == "keep" and serving(upgraded) == "1.1.0"


def test_a_withdrawn_record_of_the_wrong_shape_names_the_file(device, signed_bundles):
    """{"withdrawn": 5} refused offers with a bare "TypeError: 'int' object is not iterable"."""
    (device / "state" / "withdrawn.json").write_text(json.dumps({"withdrawn": 5}))
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v2"], "u2-again"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "withdrawn.json: unreadable ('withdrawn' is int, not a list)" in \
        updater.data["reason"]


def test_clean_stops_and_a_passed_probation_do_not_count_as_deaths(upgraded):
    """A restart with a clean stop (systemctl restart, a config change) is no death; once the model has served its
    probation, crashes are no longer the model's to answer for: it stays."""
    for _ in range(4):
        updater = build_updater(upgraded, probation=True)
        updater.stopped_cleanly()
    # the committing run (the fixture's) ended uncleanly: one death; the four clean stops after it: none
    assert updater.probation["deaths"] == 1 and serving(upgraded) == "1.1.0"
    updater = build_updater(upgraded, probation=True)
    updater.pass_probation()
    for _ in range(4):
        build_updater(upgraded, probation=True)
    assert serving(upgraded) == "1.1.0" and reports(upgraded) == []
    assert not (upgraded / "state" / "probation.json").exists()


def test_a_rollback_of_the_older_format_is_refused(upgraded, signed_bundles):
    """A statement over {update_id, manifest_sha256, rollback} only (what controllers signed before)."""
    import hashlib

    offer = offer_for(signed_bundles["v1"], "rb-old")
    old = json.dumps({"update_id": "rb-old", "manifest_sha256": hashlib.sha256(offer.manifest_bytes()).hexdigest(),
                      "rollback": True}, sort_keys=True).encode()
    offer.rollback, offer.rollback_signature = True, sign_bytes(old, signed_bundles["key"])
    _rollback_refused(upgraded, offer, "rollback statement of an older format: re-issue it with this controller")


def test_an_applied_rollback_is_refused_when_replayed(upgraded, signed_bundles):
    """After the rollback and a way back to 1.1.0 (a plain offer of the backed-out bundle is refused; a signed
    rollback to it is not), the same authorisation (still valid, for this device and the version it serves
    again) is refused: a rollback is applied once."""
    offer = rollback_for(signed_bundles["v1"], "rb-once", signed_bundles["key"])
    updater = build_updater(upgraded)
    updater.submit(offer)
    updater.run()
    assert updater.data["history"] == FROM_SLOT and serving(upgraded) == "1.0.0"
    updater = build_updater(upgraded)
    updater.submit(rollback_for(signed_bundles["v2"], "u2-again", signed_bundles["key"], replaces="1.0.0"))
    updater.run()
    assert serving(upgraded) == "1.1.0" and updater.slots.active() == "b"
    updater = build_updater(upgraded)  # a restarted agent: the applied ids come from the state dir
    updater.submit(offer)
    updater.run()
    assert "rollback rb-once was already applied on this device" in updater.data["reason"]
    assert reports(upgraded)[-2]["result"] == "failed" and "already applied" in reports(upgraded)[-2]["reason"]
    assert serving(upgraded) == "1.1.0" and updater.slots.active() == "b"


@pytest.mark.parametrize("terms,match", [
    ({"device": "box-2"}, "rollback statement is for device plant7/box-2, this device is plant7/box-1"),
    ({"fleet": "plant8"}, "rollback statement is for device plant8/box-1"),
    ({"replaces": "1.0.5"}, "rollback statement replaces version 1.0.5, this device serves 1.1.0"),
    ({"replaces": None}, "replaces version (no model), this device serves 1.1.0"),
    ({"not_after": int(time.time()) - ROLLBACK_CLOCK_SKEW_S - 60},
     f"Z, {ROLLBACK_CLOCK_SKEW_S} s of clock skew allowed); refused: if the device clock is wrong, correct it (NTP) "
     "and issue the rollback again"),  # (the device clock as a date, as the expiry: it was a bare epoch)
    ({"format": 1}, "rollback statement of an older format: re-issue it with this controller"),
    ({"format": 3}, "rollback statement of format 3, this agent takes format 2"),
])
def test_a_rollback_for_another_device_version_or_time_is_refused(upgraded, signed_bundles, terms, match):
    _rollback_refused(upgraded, rollback_for(signed_bundles["v1"], "rb", signed_bundles["key"], **terms), match)


def test_rollback_terms_are_signed_and_the_clock_skew_is_bounded(upgraded, signed_bundles):
    offer = rollback_for(signed_bundles["v1"], "rb", signed_bundles["key"], device="box-2")
    offer.rollback_terms = offer.rollback_terms.model_copy(update={"device": DEVICE})  # retargeted after signing
    _rollback_refused(upgraded, offer, "rollback authorisation: signature does not verify")
    not_after = int(time.time()) - 100
    late = rollback_for(signed_bundles["v1"], "rb-late", signed_bundles["key"], not_after=not_after)
    _rollback_refused(upgraded, late, "expired", clock=lambda: not_after + ROLLBACK_CLOCK_SKEW_S + 1)
    updater = build_updater(upgraded, clock=lambda: not_after + ROLLBACK_CLOCK_SKEW_S - 1)  # within the skew
    updater.submit(late)
    updater.run()
    assert updater.data["history"] == FROM_SLOT and serving(upgraded) == "1.0.0"


def test_a_device_clock_behind_the_serving_models_build_time_does_not_revive_an_expired_rollback(upgraded,
                                                                                                 signed_bundles):
    """A box without an RTC boots at 1970 (or a stale time) until NTP syncs: with its clock alone it took an old
    rollback statement, long expired, replayed to it (a downgrade to a version the fleet had left). The signed
    build time of the model it serves is a floor under its clock."""
    from datetime import datetime

    created = json.loads((build_updater(upgraded).slots.active_path() / "manifest.json").read_text())["created"]
    built = datetime.fromisoformat(created).timestamp()
    stale = rollback_for(signed_bundles["v1"], "rb-stale", signed_bundles["key"],
                         not_after=int(built) - ROLLBACK_CLOCK_SKEW_S - 60)
    updater = _rollback_refused(upgraded, stale, "expired", clock=lambda: 0.0)
    assert "the model it serves was built (signed manifest) at" in updater.data["reason"]
    fresh = rollback_for(signed_bundles["v1"], "rb-fresh", signed_bundles["key"], not_after=int(built) + 3600)
    updater = build_updater(upgraded, clock=lambda: 0.0)  # still valid at the floor: taken
    updater.submit(fresh)
    updater.run()
    assert updater.data["history"] == FROM_SLOT and serving(upgraded) == "1.0.0"


def test_rollback_keys_authorise_rollbacks_only(upgraded, signed_bundles, tmp_path):
    """With rollback-keys configured, the bundle key cannot authorise a rollback, and the rollback key cannot
    sign a bundle."""
    pair = generate_keypair(tmp_path / "rollback-key", "rollback")
    (upgraded / "rollback-keys").mkdir()
    shutil.copy(pair.public_path, upgraded / "rollback-keys")  # the device holds only the public half
    rollback_key = load_private_key(pair.private_path)
    _rollback_refused(upgraded, rollback_for(signed_bundles["v1"], "rb-bundle-key", signed_bundles["key"]),
                      "rollback authorisation: signed by unknown key")
    rogue = variant(signed_bundles["v2"], tmp_path / "v2-by-rollback-key", rollback_key, version="1.2.0")
    _rollback_refused(upgraded, offer_for(rogue, "u3"), f"unknown key '{pair.key_id}'")
    updater = build_updater(upgraded)
    updater.submit(rollback_for(signed_bundles["v1"], "rb-ok", rollback_key))
    updater.run()
    assert updater.data["history"] == FROM_SLOT and serving(upgraded) == "1.0.0"


def test_bundle_for_another_device_is_refused(device, signed_bundles, tmp_path):
    manifest = json.loads((signed_bundles["v2"] / "manifest.json").read_text())
    backends = {"tensorrt": {**manifest["backends"]["onnxruntime"]}}
    bundle = variant(signed_bundles["v2"], tmp_path / "trt", signed_bundles["key"], backends=backends)
    _refused(device, offer_for(bundle, "u2"), "not for this device")


def test_bundle_for_another_architecture_is_refused(device, signed_bundles, tmp_path):
    manifest = json.loads((signed_bundles["v2"] / "manifest.json").read_text())
    arch = {**manifest["architecture"], "hidden_act": "gelu"}
    bundle = variant(signed_bundles["v2"], tmp_path / "arch", signed_bundles["key"], architecture=arch)
    _refused(device, offer_for(bundle, "u2"), "hidden_act='gelu'")


def test_an_offered_architecture_without_a_size_the_runtime_needs_is_refused_naming_it(device, signed_bundles):
    import base64

    offer = offer_for(signed_bundles["v2"], "u2")
    data = json.loads(offer.manifest_bytes())
    del data["architecture"]["num_hidden_layers"]
    offer.manifest_b64 = base64.b64encode(json.dumps(data).encode()).decode()
    _refused(device, offer, "offered manifest is invalid (architecture: num_hidden_layers: Field "
                            "required)")


def test_model_failing_its_golden_check_is_not_activated(device, signed_bundles, tmp_path):
    manifest = json.loads((signed_bundles["v2"] / "manifest.json").read_text())
    golden = manifest["golden"]
    for seq in golden["backends"].values():
        seq["tokens"] = [(t + 1) % 512 for t in seq["tokens"]]
        seq["margins"] = [10.0] * len(seq["tokens"])
    bundle = variant(signed_bundles["v2"], tmp_path / "bad-golden", signed_bundles["key"], golden=golden)
    _refused(device, offer_for(bundle, "u2"), "golden check failed")


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int):
    """A real tmpfs of `size_kib` at `path` (skips the test where mounting needs root), unmounted after."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # engines may still map model files


def test_full_disk_is_refused_and_the_old_model_keeps_serving(signed_bundles, tmp_path):
    """The device's state directory on a real tmpfs with room for one model but not two."""
    need = sum(f.size for f in open_bundle(signed_bundles["v2"]).manifest.files)
    with small_disk(tmp_path / "small-disk", need * 3 // 2 // 1024 + 1024 + 64) as work:  # (+ the 1 MiB headroom)
        shutil.copytree(signed_bundles["keys"], work / "keys")
        updater = build_updater(work)
        updater.submit(offer_for(signed_bundles["v1"], "install-v1"))
        updater.run()
        assert serving(work) == "1.0.0"
        _refused(work, offer_for(signed_bundles["v2"], "u2"), "disk full")
        assert not (work / "state" / "staging").exists()


@pytest.mark.parametrize("upgrade,outcome", [(True, "committed"), (False, "failed")])
def test_a_controller_away_when_the_outcome_went_by_finds_it_on_the_broker(signed_bundles, tmp_path, mosquitto,
                                                                           upgrade, outcome):
    """Each status is published retained, and the outcome travelled in REPORTING's alone: the idle status right
    after it replaced it on the broker, so a controller that was away (restarting, reconnecting after a broker
    restart) never got the result, and its rollout waited an hour for it, then halted on "no result". The
    updater's statuses, published as the agent publishes them while no controller listens, then a controller."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.topics import ota_status_topic
    from fleet.controller import ControllerSettings, FleetController
    from waiting import until

    work = tmp_path / "device"
    work.mkdir()
    shutil.copytree(signed_bundles["keys"], work / "keys")
    updater = build_updater(work)
    if not upgrade:  # serving v2, v1 is offered: refused as a downgrade
        updater.submit(offer_for(signed_bundles["v2"], "u0"))
        updater.run()
    updater.submit(offer_for(signed_bundles["v1"], "u1"))
    updater.run()
    assert updater.data["outcome"] == outcome, updater.data
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        for status in reports(work):
            pub.publish(ota_status_topic(FLEET, DEVICE), json.dumps(status), qos=1, retain=True).wait_for_publish(10)
    finally:
        pub.loop_stop()
        pub.disconnect()
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET))
    ctl.start()
    try:
        until(lambda: ctl.store.last_result(FLEET, DEVICE, "u1") is not None)
        assert ctl.store.last_result(FLEET, DEVICE, "u1")["result"] == outcome
    finally:
        ctl.stop()


def test_an_offer_on_a_read_only_state_disk_fails_and_says_why(signed_bundles, tmp_path):
    """The state directory remounted read-only (a failing SD card, an overlay gone ro): `submit` raised EROFS
    removing the progress file after it had taken the offer's id, so the offer was neither run nor reported,
    and the same offer seen again was skipped as done: a rollout waited on the box until it restarted."""
    work = tmp_path / "device"
    work.mkdir()
    shutil.copytree(signed_bundles["keys"], work / "keys")
    with small_disk(work / "state", 16 * 1024) as state:
        updater = build_updater(work)
        updater.submit(offer_for(signed_bundles["v1"], "install-v1"))
        updater.run()
        assert serving(work) == "1.0.0"
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(state)], capture_output=True, text=True)
        assert remounted.returncode == 0, remounted.stderr
        updater = build_updater(work)
        updater.submit(offer_for(signed_bundles["v2"], "u2"))
        updater.run()
        assert updater.data["outcome"] == "failed" and "Read-only file system" in updater.data["reason"]
        assert updater.data["history"][-4:] == ["failure", "cleanup", "reporting", "idle"], updater.data
        assert updater.slots.active() == "a" and serving(work) == "1.0.0"
        final = [r for r in reports(work) if r.get("update_id") == "u2" and "result" in r]
        assert final and final[-1]["result"] == "failed" and "Read-only" in final[-1]["reason"], reports(work)


def test_a_disk_with_only_a_few_kib_beyond_the_bundle_refuses_it_up_front(signed_bundles, tmp_path):
    """The check compared free space with the plain sum of the files: a box with a few KiB more accepted the
    offer and then failed with a raw OSError (No space left on device) while saving its state. Whole blocks and
    headroom for the update's own files are counted now: refused with "disk full" before anything is written."""
    from ota.update import DISK_HEADROOM

    files = [f.size for f in open_bundle(signed_bundles["v1"]).manifest.files]
    blocks = sum(-(-n // 4096) * 4096 for n in files)
    with small_disk(tmp_path / "tight-disk", blocks // 1024 + 48) as work:
        shutil.copytree(signed_bundles["keys"], work / "keys")
        updater = build_updater(work)
        updater.submit(offer_for(signed_bundles["v1"], "install-v1"))
        updater.run()
        assert updater.data["history"][-4:] == ["failure", "cleanup", "reporting", "idle"]
        assert "disk full" in updater.data["reason"] and f"{DISK_HEADROOM >> 20} MiB" in updater.data["reason"]
        assert "Errno" not in updater.data["reason"] and not (work / "state" / "staging").exists()


def test_disk_filling_up_during_the_download_fails_the_update_and_frees_the_staging(signed_bundles, tmp_path):
    """Room for the bundle when it is offered, then another writer fills the tmpfs mid-download: the update
    fails with the reason (not even the state file can be written then), staging is removed, the old model
    serves, and the next offer is taken. The updater used to stop in FAILURE with staging left on the full
    disk, refusing every later offer until a restart."""
    from ota.update import State

    need = sum(f.size for f in open_bundle(signed_bundles["v2"]).manifest.files)
    with small_disk(tmp_path / "filling-disk", need * 3 // 1024 + 256) as work:
        shutil.copytree(signed_bundles["keys"], work / "keys")
        updater = build_updater(work)
        updater.submit(offer_for(signed_bundles["v1"], "install-v1"))
        updater.run()
        assert serving(work) == "1.0.0"

        def fill_the_disk(state):
            if state is State.DOWNLOADING:
                with open(work / "ballast", "wb") as f:
                    with pytest.raises(OSError, match="No space left"):
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()

        updater.on_enter = fill_the_disk
        updater.submit(offer_for(signed_bundles["v2"], "u2"))
        updater.run()
        assert updater.state is State.IDLE and updater.data["outcome"] == "failed"
        assert updater.data["history"] == ["idle", "offered", "downloading", "failure", "cleanup", "reporting", "idle"]
        assert "No space left" in updater.data["reason"]
        assert not (work / "state" / "staging").exists()
        assert updater.slots.active() == "a" and serving(work) == "1.0.0"
        final = [r for r in reports(work) if r.get("update_id") == "u2" and "result" in r][-1]
        assert final["result"] == "failed" and "No space left" in final["reason"]

        (work / "ballast").unlink()
        updater.on_enter = None
        updater.submit(offer_for(signed_bundles["v2"], "u2-again"))
        updater.run()
        assert updater.data["outcome"] == "committed" and serving(work) == "1.1.0"
        assert json.loads((work / "state" / "update.json").read_text())["state"] == "idle"


@pytest.mark.parametrize("content", ['{"state": "downloading", "entr', "", "{}", '{"state": "bogus"}',
                                     '{"state": "verifying", "entries": 1, "history": []}', "\udcff"])
def test_an_unreadable_state_file_is_set_aside_and_the_active_model_serves(device, signed_bundles, content):
    """update.json with invalid JSON, missing fields or an unknown state (a disk error, an edit by hand): the
    updater starts idle instead of raising (the agent exited at every start), the file is kept aside,
    staging is removed, the active slot serves, and the next offer commits."""
    state = device / "state"
    (state / "staging").mkdir()
    (state / "staging" / "half.bin").write_bytes(b"x" * 100)
    (state / "update.json").write_bytes(content.encode(errors="surrogateescape"))
    subprocess.run([sys.executable, str(DRIVER), str(device)], check=True, capture_output=True)  # a fresh start
    assert serving(device) == "1.0.0"
    assert (state / "update.json.unreadable").read_bytes() == content.encode(errors="surrogateescape")
    assert not (state / "staging").exists()
    updater = build_updater(device)
    assert updater.state.value == "idle"
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["history"] == SUCCESS and serving(device) == "1.1.0"


@pytest.mark.parametrize("edit", [{"state": "installing", "target_slot": "a"}, {"previous_slot": "c"}])
def test_a_state_that_contradicts_the_slots_is_set_aside_not_acted_on(device, signed_bundles, edit):
    """update.json edited by hand to install into the serving slot (target = the active slot before the switch),
    or naming no slot as the previous one: it used to be resumed, and an install into the serving slot removes
    the model that serves. Set aside as unreadable; the active model serves; the next offer commits."""
    updater = build_updater(device)
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.data.update({"state": "downloading", **edit})
    updater._save()
    restarted = build_updater(device)
    assert restarted.state.value == "idle" and "update.json was unreadable" in restarted.load_problem
    assert serving(device) == "1.0.0" and (restarted.slots.path("a") / "manifest.json").is_file()
    restarted.submit(offer_for(signed_bundles["v2"], "u2-again"))
    restarted.run()
    assert restarted.data["history"] == SUCCESS and serving(device) == "1.1.0"


def test_an_offer_of_the_bundle_already_serving_is_committed_without_a_change(upgraded, signed_bundles, tmp_path):
    """The exact signed manifest the device serves, offered again under a new update id (a rollout over a fleet
    where some boxes have it, a retained offer seen after the state file was lost): committed, nothing
    downloaded or switched, the previous model kept for a rollback. It used to fail as "refused as a
    downgrade", which a rollout counts as a failed canary. The same version with another manifest, or the
    same manifest with a signature that does not verify, is still refused."""
    updater = build_updater(upgraded)
    updater.submit(offer_for(signed_bundles["v2"], "u2-again"))
    updater.run()
    assert updater.data["history"] == ["idle", "offered", "cleanup", "reporting", "idle"]
    final = reports(upgraded)[-2]
    assert final["result"] == "committed" and "reason" not in final, final
    assert updater.slots.active() == "b" and serving(upgraded) == "1.1.0"
    assert (updater.slots.path("a") / "manifest.json").exists()  # the previous model stays for a rollback

    other = variant(signed_bundles["v2"], tmp_path / "v2-rebuilt", signed_bundles["key"], name="tiny-rebuilt")
    _rollback_refused(upgraded, offer_for(other, "u2-rebuilt"), "not newer than the active 1.1.0")
    forged = offer_for(signed_bundles["v2"], "u2-forged")
    forged.signature = offer_for(signed_bundles["v1"], "u1").signature
    _rollback_refused(upgraded, forged, "signature does not verify")


def test_an_offer_refused_before_installing_keeps_the_previous_model_in_its_slot(upgraded, signed_bundles):
    """A replayed older offer is refused in OFFERED, before anything is written to the inactive slot: that
    slot keeps the previous model (1.0.0), the fallback at start and what a rollback goes back to.
    CLEANUP used to clear the inactive slot after every failed update."""
    slots = build_updater(upgraded).slots
    assert slots.active() == "b" and (slots.path("a") / "manifest.json").is_file()
    _rollback_refused(upgraded, offer_for(signed_bundles["v1"], "replay"), "not newer than the active 1.1.0")
    assert open_bundle(slots.path("a")).manifest.version == "1.0.0"  # verified: every file intact


def test_a_failure_after_installing_still_clears_the_half_written_slot(device, signed_bundles, tmp_path):
    """The other side of the rule above: an update that wrote the inactive slot and then failed (its model
    fails the golden check) leaves nothing half-made there."""
    golden = json.loads((signed_bundles["v2"] / "manifest.json").read_text())["golden"]
    for seq in golden["backends"].values():
        seq["tokens"] = [(t + 1) % 512 for t in seq["tokens"]]
        seq["margins"] = [10.0] * len(seq["tokens"])
    bad = variant(signed_bundles["v2"], tmp_path / "v2-bad-golden", signed_bundles["key"], golden=golden)
    updater = build_updater(device)
    updater.submit(offer_for(bad, "u-bad"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "installing" in updater.data["history"]
    assert not (updater.slots.path(updater.data["target_slot"]) / "manifest.json").exists()
    assert serving(device) == "1.0.0"


def _rechunked(src: Path, dst: Path, key, chunk_size: int) -> Path:
    """`src` re-chunked (and re-signed) so a download takes many chunks."""
    from ota.bundle import file_entry
    from ota.signing import sign_bundle
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["chunk_size"] = chunk_size
    manifest["files"] = [file_entry(dst, dst / f["path"], chunk_size).model_dump() for f in manifest["files"]]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (dst / "manifest.sig").unlink()
    sign_bundle(open_bundle(dst), key)
    return dst


class _PowerCut(BaseException):
    pass


def test_a_long_download_cut_many_times_resumes_to_the_end(device, signed_bundles, tmp_path, monkeypatch):
    """A power cut after every 60 chunks of a 375-chunk download: each restart resumes from the chunks on
    disk and gets further, so it is not a crash loop (it used to fail at the 4th restart, "entered 4
    times", and delete the download). The state written while downloading stays small: a progress file
    per chunk, not update.json with the whole offer (that was 12.5x the bundle in writes here). A chunk
    recorded as done but lost from the disk is fetched again on resume."""
    import ota.update as update_module
    from ota.update import State

    # about 375 chunks whatever the test model's size (4 KiB chunks of the bundle this test was written for)
    total = sum(f.size for f in open_bundle(signed_bundles["v2"]).manifest.files)
    chunk = max(4096, -(-total // 375 // 1024) * 1024)
    bundle = _rechunked(signed_bundles["v2"], tmp_path / "v2-4k", signed_bundles["key"], chunk)
    size = sum(f.size for f in open_bundle(bundle).manifest.files)
    written = {"update.json": 0}
    real_write = update_module.atomic_write_json

    def counting(path, obj):
        if path.name == "update.json":
            written["update.json"] += len(json.dumps(obj))
        return real_write(path, obj)
    monkeypatch.setattr(update_module, "atomic_write_json", counting)

    class CutAfter:
        def __init__(self, inner, n):
            self.inner, self.n = inner, n

        def read_chunk(self, *args):
            if self.n == 0:
                raise _PowerCut()
            self.n -= 1
            return self.inner.read_chunk(*args)

    updater = build_updater(device)
    updater.submit(offer_for(bundle, "u2-4k"))
    cuts = 0
    while updater.state is not State.IDLE and cuts < 10:
        updater = build_updater(device)
        updater.deps.fetcher = CutAfter(updater.deps.fetcher, 60)
        if cuts == 3:  # a chunk recorded as on disk whose bytes were lost in the cut
            staged = next(p for p in sorted((device / "state" / "staging").rglob("*"))  # a data file, not the manifest
                          if p.is_file() and not p.name.startswith("manifest.") and p.stat().st_size)
            staged.write_bytes(b"\0" * staged.stat().st_size)
        try:
            updater.run()
        except _PowerCut:
            cuts += 1
    assert updater.data["outcome"] == "committed", updater.data["reason"]
    assert cuts >= 6 and serving(device) == "1.1.0"
    assert written["update.json"] < size  # was 12.5x the bundle's bytes
    assert not (device / "state" / "download-progress.json").exists()


@pytest.mark.parametrize("content", ['{"applied": 5}', "[1, 2]", "{not json"])
def test_a_damaged_record_of_applied_rollbacks_refuses_rollbacks_with_its_name(upgraded, signed_bundles, content):
    from ota.update import ROLLBACK_APPLIED
    (upgraded / "state" / ROLLBACK_APPLIED).write_text(content)
    offer = rollback_for(signed_bundles["v1"], "rb-damaged", signed_bundles["key"])
    _rollback_refused(upgraded, offer, f"{ROLLBACK_APPLIED}: unreadable")


def test_a_commit_whose_state_cannot_be_saved_fails_without_reloading_the_serving_model(device, signed_bundles,
                                                                                        monkeypatch):
    """The disk fills up just as COMMITTING is entered: nothing was switched, so the update fails (it used to
    report rolled_back and load the old model a second time, two copies in memory on a tight box)."""
    from ota.update import Updater

    updater = build_updater(device)
    loads = []
    real_activate = updater.deps.activate
    updater.deps.activate = lambda path: (loads.append(path), real_activate(path))
    real_persist = Updater._persist

    def full_disk_at_commit(self):
        if self.state.value == "committing":
            return "OSError: [Errno 28] No space left on device"
        return real_persist(self)
    monkeypatch.setattr(Updater, "_persist", full_disk_at_commit)
    updater.submit(offer_for(signed_bundles["v2"], "u2"))
    updater.run()
    assert updater.data["outcome"] == "failed" and "cannot be saved" in updater.data["reason"]
    assert loads == [] and updater.slots.active() == "a" and serving(device) == "1.0.0"
