"""Agent security: what the desired config may not change, an active slot signed by a key no longer
trusted (the agent stays up and can be updated over the air), and the manifest read once.

The end-to-end test runs a real agent process against a real Mosquitto, like tests/agent/test_daemon.py
(whose controller and agent launcher it reuses).
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.config import load_config
from agent.daemon import Agent, without_paths
from agent.topics import DesiredConfig, desired_topic, ota_offer_topic, ota_status_topic, state_topic
from bundles import variant
from ota.bundle import MANIFEST, file_entry, open_bundle
from ota.errors import BundleError
from ota.offers import make_offer
from ota.signing import generate_keypair, key_id, load_private_key
from test_daemon import DEVICE, FLEET, Controller, start_agent


def _agent(tmp_path, **overrides) -> Agent:
    return Agent(load_config(None, {"model.slots_dir": str(tmp_path / "state"), "mqtt.enabled": False,
                                    "http.port": 0, **overrides}))


# --- desired config: local-only settings --------------------------------------------------------------------

REFUSED = [
    ({"ota": {"trusted_keys": "/tmp/attacker"}}, "ota.trusted_keys"),
    ({"ota": {"require_signature": False}}, "ota.require_signature"),
    ({"ota": {"rollback_keys": "/tmp/attacker"}}, "ota.rollback_keys"),
    ({"cache": {"persist_dir": "/var/lib/edgeglm/slots"}}, "cache.persist_dir"),
    ({"cache": {"max_mb": 1048576}}, "cache.max_mb"),  # above the box's own 64 MiB
    ({"model": {"slots_dir": "/tmp/elsewhere"}}, "model.slots_dir"),
    ({"http": {"host": "0.0.0.0"}}, "http.host"),
    ({"device": {"fleet": "other"}}, "device.fleet"),
    ({"mqtt": {"host": "attacker.example"}}, "mqtt.host"),
]


@pytest.mark.parametrize("settings,key", REFUSED, ids=[key for _, key in REFUSED])
def test_desired_config_cannot_change_local_only_settings(tmp_path, settings, key):
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"sampling": {"max_tokens": 7}}))
    before = agent.cfg
    # an allowed change in the same update is not applied either: all or nothing
    agent._apply_desired(DesiredConfig(version=2, settings={**settings, "sampling": {"max_tokens": 3}}))
    assert agent.last_config_error.startswith("desired config version 2 refused: ")
    assert key in agent.last_config_error, agent.last_config_error
    assert agent.applied_config_version == 1 and agent.cfg is before and agent.http.sampling.max_tokens == 7
    assert agent.reported_state().last_config_error == agent.last_config_error


def test_the_updater_checks_rollbacks_for_this_device_with_the_rollback_keys(tmp_path, signed_bundles):
    """The agent hands its fleet and device id to the updater (a rollback statement must name them), and the
    keys of ota.rollback_keys for rollback statements only; unset, the bundle keys authorise rollbacks."""
    pair = generate_keypair(tmp_path / "rollback-keys", "rollback")
    (tmp_path / "rollback-keys" / "rollback.key").unlink()
    trusted = {"ota.trusted_keys": str(signed_bundles["keys"]), "device.fleet": FLEET, "device.id": DEVICE}
    deps = _agent(tmp_path, **trusted, **{"ota.rollback_keys": str(tmp_path / "rollback-keys")})._updater_deps()
    assert (deps.fleet, deps.device) == (FLEET, DEVICE)
    assert list(deps.rollback_keys) == [pair.key_id] and pair.key_id not in deps.trusted_keys
    deps = _agent(tmp_path, **trusted)._updater_deps()
    assert deps.rollback_keys is None and deps.trusted_keys
    deps = _agent(tmp_path, **trusted, **{"ota.rollback_keys": str(tmp_path / "missing")})._updater_deps()
    assert deps.rollback_keys == {}  # configured but unreadable: every rollback is refused, not the bundle keys


def test_a_desired_config_is_the_whole_remote_layer_the_same_after_a_restart(tmp_path):
    """The broker keeps only the latest desired config: it is the fleet's whole layer over the box's own
    config, not a change to the running one. A running box and one that restarted (or was offline for
    the first version) end with the same config; a key left out goes back to the box's own value."""
    running = _agent(tmp_path, **{"sampling.max_tokens": 100})
    running._apply_desired(DesiredConfig(version=1, settings={"sampling": {"max_tokens": 7}}))
    assert running.cfg.sampling.max_tokens == 7
    latest = DesiredConfig(version=2, settings={"telemetry": {"interval_s": 10.0}})
    running._apply_desired(latest)
    restarted = _agent(tmp_path, **{"sampling.max_tokens": 100})
    restarted._apply_desired(latest)
    assert running.cfg == restarted.cfg and running.applied_config_version == restarted.applied_config_version == 2
    assert running.cfg.sampling.max_tokens == 100 and running.cfg.telemetry.interval_s == 10.0


def test_an_older_desired_config_is_not_applied_over_a_newer_one(tmp_path, caplog):
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=20, settings={"sampling": {"max_tokens": 7}}))
    agent._apply_desired(DesiredConfig(version=10, settings={"sampling": {"max_tokens": 3}}))  # a stale retained copy
    assert agent.applied_config_version == 20 and agent.cfg.sampling.max_tokens == 7
    assert "desired config version 10 ignored: version 20, newer, is applied" in caplog.text


def test_a_desired_config_not_applied_for_its_version_is_reported_in_the_state(tmp_path):
    """A version that goes backwards (a controller's clock stepped back, `config set --version` lower) or the
    applied version with other settings is not applied; the state said nothing (no last_config_error, the
    fleet saw the box as up to date) while the box kept a config other than the fleet's latest."""
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=20, settings={"sampling": {"max_tokens": 7}}))
    agent._apply_desired(DesiredConfig(version=10, settings={"sampling": {"max_tokens": 3}}))
    assert agent.applied_config_version == 20 and agent.cfg.sampling.max_tokens == 7
    error = agent.reported_state().last_config_error
    assert error == ("desired config version 10 ignored: version 20, newer, is applied; publish the change with a "
                     "version above 20"), error
    agent._apply_desired(DesiredConfig(version=20, settings={"sampling": {"max_tokens": 3}}))
    assert agent.applied_config_version == 20 and agent.cfg.sampling.max_tokens == 7
    assert agent.last_config_error == ("desired config version 20 ignored: with other settings than the ones applied "
                                       "under that version; publish the change with a version above 20")
    # the applied one again (the broker's retained copy after a reconnect): it is the latest, nothing is wrong
    agent._apply_desired(DesiredConfig(version=20, settings={"sampling": {"max_tokens": 7}}))
    assert agent.last_config_error is None and agent.applied_config_version == 20


def test_a_desired_config_naming_a_local_only_setting_is_refused_even_at_its_value(tmp_path):
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"ota": {"require_signature": True},
                                                             "sampling": {"max_tokens": 3}}))
    assert agent.applied_config_version is None and agent.cfg.sampling.max_tokens != 3
    assert "ota.require_signature is local-only" in agent.last_config_error


def test_the_fleet_cannot_turn_on_prefix_cache_persistence_a_box_keeps_off(tmp_path):
    """cache.persist writes prompts' KV, and the token ids of their prefixes, to disk: a box configured
    with it off stays off (the fleet may still turn it off where the box has it on)."""
    agent = _agent(tmp_path, **{"cache.persist": False})
    agent._apply_desired(DesiredConfig(version=1, settings={"cache": {"persist": True}}))
    assert agent.applied_config_version is None and agent.cfg.cache.persist is False
    assert "cache.persist = true, but this box's own config sets it false" in agent.last_config_error
    on = _agent(tmp_path / "on")
    on._apply_desired(DesiredConfig(version=1, settings={"cache": {"persist": False}}))
    assert on.applied_config_version == 1 and on.cfg.cache.persist is False


def test_a_remote_log_level_applies_to_the_running_agent(tmp_path):
    import logging
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        agent = _agent(tmp_path)
        agent._apply_desired(DesiredConfig(version=1, settings={"log_level": "debug"}))
        assert agent.applied_config_version == 1 and logging.getLogger("edgeglm.agent").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(before)


def test_an_unreadable_mqtt_tls_file_stops_the_start_naming_the_setting(tmp_path):
    from agent.errors import ConfigError
    agent = _agent(tmp_path, **{"mqtt.enabled": True, "mqtt.port": 1, "mqtt.tls.ca_file": str(tmp_path / "ca.pem")})
    with pytest.raises(ConfigError, match=f"mqtt.tls.ca_file = {tmp_path / 'ca.pem'}: No such file or directory"):
        agent.start()
    agent.shutdown(1)


def test_mqtt_tls_files_that_do_not_load_stop_the_start_before_the_model_loads(tmp_path):
    """A CA file holding no certificate (a public key given by mistake), a client certificate with another key, or
    a passphrase-protected key: the session retried an SSLError every few seconds forever, naming no setting (and
    OpenSSL may prompt on a terminal for a passphrase, which hangs a daemon)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.errors import ConfigError
    from broker import make_test_certs

    certs, other = make_test_certs(tmp_path / "pki"), make_test_certs(tmp_path / "other")
    not_a_cert = tmp_path / "signing.pub"
    not_a_cert.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    locked = tmp_path / "locked.key"
    locked.write_bytes(serialization.load_pem_private_key(certs.key_file.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    mqtt = {"mqtt.enabled": True, "mqtt.port": 1, "model.bundle": str(tmp_path / "never-loaded")}
    cases = [({"mqtt.tls.ca_file": str(not_a_cert)},
              f"mqtt.tls.ca_file = {not_a_cert}: holds no PEM CA certificate (X509: NO_CERTIFICATE_OR_CRL_FOUND)"),
             ({"mqtt.tls.ca_file": str(certs.ca_file), "mqtt.tls.cert_file": str(certs.cert_file),
               "mqtt.tls.key_file": str(other.key_file)},
              f"mqtt.tls.cert_file = {certs.cert_file} and mqtt.tls.key_file = {other.key_file}: not a PEM "
              "certificate and its unencrypted private key"),
             ({"mqtt.tls.cert_file": str(certs.cert_file), "mqtt.tls.key_file": str(locked)},
              f"mqtt.tls.key_file = {locked}: not a PEM certificate and its unencrypted private key")]
    # a client certificate out of its dates: the broker refused the handshake, and the agent said only "the
    # network connection ended before CONNACK" at every retry
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), None)
    for name, days in (("expired", -30), ("future", 30)):
        start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc) if days < 0 else \
            datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
        subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "box-1")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=10))
                .sign(key, hashes.SHA256()))
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cases += [({"mqtt.tls.cert_file": str(tmp_path / "expired.pem"), "mqtt.tls.key_file": str(certs.key_file)},
               f"mqtt.tls.cert_file = {tmp_path / 'expired.pem'}: the certificate expired on 2020-01-11 00:00 UTC; "
               "the broker would refuse it"),
              ({"mqtt.tls.cert_file": str(tmp_path / "future.pem"), "mqtt.tls.key_file": str(certs.key_file)},
               f"mqtt.tls.cert_file = {tmp_path / 'future.pem'}: the certificate is not valid before ")]
    for settings, message in cases:
        agent = _agent(tmp_path, **mqtt, **settings)
        with pytest.raises(ConfigError, match=re.escape(message)):
            agent.start()  # (a model load would fail first: the bundle does not exist)
        agent.shutdown(1)
    good = {"mqtt.tls.ca_file": str(certs.ca_file), "mqtt.tls.cert_file": str(certs.cert_file),
            "mqtt.tls.key_file": str(certs.key_file)}
    assert load_config(None, good).mqtt.tls.unreadable() == []


def test_desired_config_still_applies_the_remote_settings(tmp_path):
    agent = _agent(tmp_path, **{"cache.max_mb": 32.0})
    agent._updater_deps()  # makes the chunk fetcher, whose timeouts apply live
    settings = {"sampling": {"max_tokens": 5}, "batching": {"max_batch": 2}, "telemetry": {"interval_s": 5.0},
                "cache": {"max_mb": 16, "block_tokens": 64, "persist": False},
                "ota": {"max_latency_ratio": 2.0, "min_latency_delta_ms": 3.0, "chunk_timeout_s": 4.0,
                        "give_up_s": 60.0}}
    agent._apply_desired(DesiredConfig(version=3, settings=settings))
    assert agent.last_config_error is None and agent.applied_config_version == 3
    cfg = agent.cfg
    assert (cfg.sampling.max_tokens, cfg.batching.max_batch, cfg.telemetry.interval_s) == (5, 2, 5.0)
    assert (cfg.cache.max_mb, cfg.cache.block_tokens, cfg.cache.persist) == (16, 64, False)
    assert (cfg.ota.max_latency_ratio, cfg.ota.min_latency_delta_ms) == (2.0, 3.0)
    assert (agent._chunk_fetcher.timeout_s, agent._chunk_fetcher.give_up_s) == (4.0, 60.0)
    assert cfg.ota.trusted_keys == agent.local_cfg.ota.trusted_keys and cfg.ota.require_signature
    # the cache may come back up to the box's own limit, no further
    agent._apply_desired(DesiredConfig(version=4, settings={"cache": {"max_mb": 32}}))
    assert agent.last_config_error is None and agent.cfg.cache.max_mb == 32
    agent._apply_desired(DesiredConfig(version=5, settings={"cache": {"max_mb": 33}}))
    assert "cache.max_mb = 33.0 is above this box's own limit 32.0" in agent.last_config_error
    assert agent.applied_config_version == 4 and agent.cfg.cache.max_mb == 32


def test_the_fleet_may_lower_the_kv_bound_a_box_sets_but_not_raise_it(tmp_path):
    agent = _agent(tmp_path, **{"batching.max_kv_mb": 512.0})
    agent._apply_desired(DesiredConfig(version=1, settings={"batching": {"max_kv_mb": 256}}))
    assert agent.last_config_error is None and agent.cfg.batching.max_kv_mb == 256
    agent._apply_desired(DesiredConfig(version=2, settings={"batching": {"max_kv_mb": 1024}}))
    assert "batching.max_kv_mb = 1024.0 is above this box's own limit 512.0" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=3, settings={"batching": {"max_kv_mb": "auto"}}))
    assert "batching.max_kv_mb = \"auto\", but this box's own config sets 512.0" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=4, settings={"batching": {"max_kv_mb": 0}}))
    assert "batching.max_kv_mb = 0 (from the desired-config update) is invalid: must be a number > 0" in \
        agent.last_config_error
    assert agent.applied_config_version == 1 and agent.cfg.batching.max_kv_mb == 256


# --- the manifest is read once ------------------------------------------------------------------------------

def test_files_are_checked_against_the_manifest_whose_signature_was_verified(tmp_path, signed_bundles, monkeypatch):
    """Between the signature check and the file check, manifest.json and a file are swapped for a
    consistent pair the key never signed: the load refuses the file (it is checked against the
    verified bytes, not against a second read of manifest.json)."""
    import agent.daemon as daemon

    bundle = tmp_path / "bundle"
    shutil.copytree(signed_bundles["v1"], bundle)
    real_verify = daemon.verify_bundle_signature

    def verify_then_swap(b, trusted, **kw):
        kid = real_verify(b, trusted, **kw)
        tokenizer = bundle / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text() + " ")
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["files"] = [file_entry(bundle, tokenizer, manifest["chunk_size"]).model_dump()
                             if f["path"] == "tokenizer.json" else f for f in manifest["files"]]
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
        open_bundle(bundle)  # the swapped pair is consistent on disk
        return kid

    monkeypatch.setattr(daemon, "verify_bundle_signature", verify_then_swap)
    agent = _agent(tmp_path, **{"ota.trusted_keys": str(signed_bundles["keys"]), "model.backend": "onnxruntime"})
    with pytest.raises(BundleError, match="tokenizer.json: (size|sha256)"):
        agent._load(bundle)


# --- an active slot signed by a key that is no longer trusted ----------------------------------------------

def _old_key_bundle(int8_bundle, tmp_path, version="1.0.0"):
    """The bundle signed by a key that the agent's trusted-keys directory no longer holds."""
    old = load_private_key(generate_keypair(tmp_path / "old-keys", "old-fleet").private_path)
    return variant(int8_bundle, tmp_path / f"old-{version}", old, version=version)


def _kid(private) -> str:
    return key_id(private.public_key())


def _install_slot(state, slot, bundle):
    (state / "slots").mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, state / "slots" / slot)


def _get(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_previous_slot_serves_when_the_active_one_is_no_longer_trusted(tmp_path, int8_bundle, signed_bundles):
    state = tmp_path / "state"
    _install_slot(state, "a", signed_bundles["v1"])  # the previous model, signed by the trusted key
    _install_slot(state, "b", _old_key_bundle(int8_bundle, tmp_path, "1.1.0"))
    os.symlink("slots/b", state / "current")
    agent = _agent(tmp_path, **{"ota.trusted_keys": str(signed_bundles["keys"]), "model.backend": "onnxruntime"})
    agent.start()
    try:
        assert agent.model is not None and agent.model.bundle.manifest.version == "1.0.0"
        assert agent.updater.slots.active() == "a"  # flipped: the next update installs over the refused slot
        state_now = agent.reported_state()
        assert state_now.active_slot == "a" and state_now.model.version == "1.0.0"
        assert "slot b is refused" in agent.model_error and "unknown key" in agent.model_error
        assert "serving the previous model from slot a" in state_now.hardware["model_error"]
        # the fleet sees which keys the box trusts and which sign its serving and its rollback models
        assert state_now.hardware["keys"] == {"trusted": [_kid(signed_bundles["key"])],
                                              "serving": [_kid(signed_bundles["key"])], "rollback": [],
                                              "required": True}
        assert _get(agent.http.port, "/readyz")[0] == 200
    finally:
        agent.shutdown(deadline=5.0)


def test_agent_with_an_untrusted_active_slot_stays_up_and_is_updated_over_the_air(
        mosquitto, signed_bundles, int8_bundle, tmp_path):
    """Key rotation done wrong (the old key removed before every box had a new-key bundle): the agent
    does not crash-loop; it answers 503 with the reason, reports it, refuses a desired config that
    would change its trusted keys, and installs the new-key bundle offered over MQTT."""
    state = tmp_path / "state"
    _install_slot(state, "a", _old_key_bundle(int8_bundle, tmp_path))
    os.symlink("slots/a", state / "current")
    keys = tmp_path / "trusted"  # (the fixture's directory is shared: a key is added to a copy below)
    shutil.copytree(signed_bundles["keys"], keys)
    proc, http_port, log = start_agent(mosquitto, {**signed_bundles, "keys": keys}, tmp_path)
    new, old = _kid(signed_bundles["key"]), _kid(load_private_key(tmp_path / "old-keys" / "old-fleet.key"))
    try:
        ctl = Controller(mosquitto.port)
        reported = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"], timeout=60)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert reported["model"] is None and reported["active_slot"] == "a"
        assert reported["hardware"]["keys"] == {"trusted": [new], "serving": None, "rollback": None, "required": True}
        assert "slot a is refused" in reported["hardware"]["model_error"]
        assert "unknown key" in reported["hardware"]["model_error"]

        assert _get(http_port, "/healthz") == (200, {"status": "ok"})
        status, body = _get(http_port, "/readyz")
        assert status == 503 and "slot a is refused" in body["reason"] and "trusted key" in body["reason"], body
        # the reason, not the box's directory layout: the HTTP API may be reachable beyond the box
        assert "slots/a/manifest.json: signed by unknown key" in body["reason"], body
        assert str(tmp_path) not in body["reason"] and str(tmp_path) in reported["hardware"]["model_error"]
        status, body = _get(http_port, "/v1/completions", {"prompt": "def f(", "max_tokens": 2})
        assert status == 503 and "slot a is refused" in body["error"]["message"], body
        assert str(tmp_path) not in body["error"]["message"], body
        status, body = _get(http_port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 503 and "slot a is refused" in body["error"]["message"], body
        assert str(tmp_path) not in body["error"]["message"], body

        # the fleet cannot "fix" it by pointing the box at other keys
        ctl.publish(desired_topic(FLEET, DEVICE), json.dumps({"version": 1, "settings": {
            "ota": {"trusted_keys": "/tmp/attacker", "require_signature": False}}}), retain=True)
        reported = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["last_config_error"] is not None, timeout=60)
        assert "ota.trusted_keys" in reported["last_config_error"]
        assert "ota.require_signature" in reported["last_config_error"]
        assert reported["applied_config_version"] is None

        # the bundle signed with the trusted key arrives over the air, installs and serves
        v1 = open_bundle(signed_bundles["v1"])
        ctl.chunks.add("rotate-v1", signed_bundles["v1"])
        ctl.publish(ota_offer_topic(FLEET, DEVICE), make_offer(v1, "rotate-v1", {"type": "mqtt"}).model_dump_json(),
                    retain=True)
        final = ctl.wait(ota_status_topic(FLEET, DEVICE),
                         lambda d, m: d.get("state") == "reporting" and "result" in d, timeout=180)
        assert final["result"] == "committed", (final, log.read_text()[-3000:])
        reported = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["model"] is not None, timeout=60)
        assert reported["model"]["sha256"] == v1.sha256 and reported["active_slot"] == "b"
        assert reported["hardware"]["model_error"] is None
        # the model it would roll back to (slot a) is signed by no key it trusts
        assert reported["hardware"]["keys"] == {"trusted": [new], "serving": [new], "rollback": [],
                                                "required": True}
        status, body = _get(http_port, "/v1/completions", {"prompt": "def f(", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        # the old key trusted again on the box: seen within a telemetry window, without a restart
        shutil.copy(tmp_path / "old-keys" / "old-fleet.pub", keys / "old-fleet.pub")
        reported = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["hardware"]["keys"]["rollback"], timeout=60)
        assert reported["hardware"]["keys"] == {"trusted": sorted([new, old]), "serving": [new], "rollback": [old],
                                                "required": True}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_restart_keeps_the_fleet_layer_it_had_applied_when_the_latest_is_refused(tmp_path):
    """Version 1 applied, version 2 refused (the box keeps 1 while it runs); after a restart the broker hands it
    only version 2, refused again, and the box ran on its own config alone: not what it ran before, nor what a
    box that never restarted runs."""
    first = _agent(tmp_path, **{"sampling.max_tokens": 100})
    first.start()
    first._apply_desired(DesiredConfig(version=1, settings={"sampling": {"max_tokens": 7}}))
    first._apply_desired(DesiredConfig(version=2, settings={"cache": {"max_mb": 1048576}}))  # over the box's own
    assert first.applied_config_version == 1 and first.cfg.sampling.max_tokens == 7 and first.last_config_error
    first.shutdown(1)
    again = _agent(tmp_path, **{"sampling.max_tokens": 100})
    again.start()
    try:
        assert again.applied_config_version == 1 and again.cfg.sampling.max_tokens == 7
        again._apply_desired(DesiredConfig(version=2, settings={"cache": {"max_mb": 1048576}}))  # the retained one
        assert again.cfg == first.cfg and again.applied_config_version == 1
    finally:
        again.shutdown(1)
    own = _agent(tmp_path, **{"sampling.max_tokens": 100, "cache.max_mb": 8})  # the layer is checked again
    own.start()
    try:
        assert own.applied_config_version == 1 and own.cfg.cache.max_mb == 8
    finally:
        own.shutdown(1)


def test_the_fleet_cannot_set_a_telemetry_interval_that_floods_the_broker(tmp_path):
    """A desired config is pushed to a whole fleet: `telemetry.interval_s = 0.001` had every box publish a thousand
    reports a second. The fleet may set 1 s or more; a box's own config may set less (a test rig), and a desired
    config that repeats the box's own value is not refused for it."""
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"telemetry": {"interval_s": 0.001}}))
    assert agent.applied_config_version is None and agent.cfg.telemetry.interval_s == 30.0
    assert "telemetry.interval_s = 0.001 is below 1.0, the least a desired config may set" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=2, settings={"telemetry": {"interval_s": 1.0}}))
    assert agent.applied_config_version == 2 and agent.cfg.telemetry.interval_s == 1.0
    rig = _agent(tmp_path / "rig", **{"telemetry.interval_s": 0.3})
    rig._apply_desired(DesiredConfig(version=1, settings={"telemetry": {"interval_s": 0.3}, "sampling.top_k": 4}))
    assert rig.applied_config_version == 1 and rig.cfg.telemetry.interval_s == 0.3
    # the health snapshots likewise; the fleet may turn them off (0)
    agent._apply_desired(DesiredConfig(version=3, settings={"telemetry": {"health_interval_s": 0.01}}))
    assert agent.applied_config_version == 2 and agent.cfg.telemetry.health_interval_s == 60.0
    assert "telemetry.health_interval_s = 0.01 is below 1.0" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=4, settings={"telemetry": {"health_interval_s": 0}}))
    assert agent.applied_config_version == 4 and agent.cfg.telemetry.health_interval_s == 0


def test_the_fleet_cannot_set_an_ota_timeout_that_floods_the_broker_or_fails_every_update(tmp_path):
    """`ota.chunk_timeout_s = 1e-6` was accepted: the download asked for the same chunk over a thousand times in half
    a second, until `give_up_s`."""
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"ota": {"chunk_timeout_s": 1e-6}}))
    assert agent.applied_config_version is None and agent.cfg.ota.chunk_timeout_s == 10.0
    assert "ota.chunk_timeout_s = 1e-06 is below 1.0, the least a desired config may set" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=2, settings={"ota": {"give_up_s": 0.5}}))
    assert agent.applied_config_version is None and agent.cfg.ota.give_up_s == 300.0
    assert "ota.give_up_s = 0.5 is below 10.0" in agent.last_config_error
    assert "fails every update" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=3, settings={"ota": {"chunk_timeout_s": 2.0, "give_up_s": 60.0}}))
    assert agent.applied_config_version == 3 and (agent.cfg.ota.chunk_timeout_s, agent.cfg.ota.give_up_s) == (2, 60)


def test_a_desired_config_of_a_thousand_mistakes_gives_a_short_refusal(tmp_path):
    """Each unknown key repeated the section's allowed names: a 17 KB payload of 1500 made a 218 KB retained state,
    past the controller's 256 KiB at ~1800 (the device's state then never reached the fleet)."""
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"sampling": {"top_k": 3}}))
    mistakes = {f"sampling.nope{i}": i for i in range(1500)}
    mistakes.update({f"batching.x{i}": "y" * 100_000 for i in range(30)})
    agent._apply_desired(DesiredConfig(version=2, settings=mistakes))
    error = agent.last_config_error
    assert error.startswith("desired config version 2 refused: ") and error.endswith("; version 1 stays applied")
    assert "sampling.nope0, sampling.nope1" in error and "and 1488 more (from the desired-config update) are not " \
        "settings; allowed in sampling: " in error and error.count("allowed in sampling") == 1
    assert len(error) < 2000 and agent.applied_config_version == 1 and agent.cfg.sampling.top_k == 3
    agent._apply_desired(DesiredConfig(version=3, settings={"sampling": {"top_k": "x" * 100_000}}))
    assert "(100002 characters)" in agent.last_config_error and len(agent.last_config_error) < 1000
    many = {f"{section}.k{i}": 1 for section in ("sampling", "batching", "telemetry", "cache") for i in range(20)}
    many.update({"sampling.top_p": 9, "sampling.top_k": -1, "batching.max_batch": -1})
    agent._apply_desired(DesiredConfig(version=4, settings=many))
    assert agent.last_config_error.count("; ") < 16
    agent.last_config_error = "x" * 100_000  # whatever made it: the retained state stays small
    assert len(agent.reported_state().last_config_error) <= 4096


def test_a_local_only_setting_is_refused_as_such_before_its_value_is_checked(tmp_path):
    """`{"mqtt.password": "x"}` was refused for "mqtt.username is not set: set both", which the fleet cannot do
    either; an empty section (it changes nothing) was "local-only"; a name that is no setting was "local-only"."""
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"mqtt.password": "x", "sampling": {"top_k": 2}}))
    assert agent.last_config_error == ("desired config version 1 refused: mqtt.password is local-only and cannot be "
                                       "changed by the desired config; set it in the agent's config file; the box's "
                                       "own config stays")
    # names are matched as in the config file (`[SAMPLING]` is `[sampling]`): this was "applied" with no effect
    agent._apply_desired(DesiredConfig(version=2, settings={"SAMPLING": {"Top_K": 5}}))
    assert agent.applied_config_version == 2 and agent.cfg.sampling.top_k == 5
    agent._apply_desired(DesiredConfig(version=3, settings={"SAMPLING.top_k": 6, "sampling": {"top_k": 7}}))
    assert "'sampling.top_k' is given twice" in agent.last_config_error and agent.cfg.sampling.top_k == 5
    agent._apply_desired(DesiredConfig(version=3, settings={"HTTP": {"host": "0.0.0.0"}}))
    assert "http.host is local-only" in agent.last_config_error and agent.cfg.http.host == "127.0.0.1"
    agent._apply_desired(DesiredConfig(version=3, settings={"samplin": {"top_k": 5}}))
    assert "samplin (from the desired-config update) is not a setting" in agent.last_config_error
    assert "local-only" not in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=4, settings={"cache": {}, "sampling": {"top_k": 2}}))
    assert agent.applied_config_version == 4 and agent.last_config_error is None and agent.cfg.sampling.top_k == 2


def test_a_reload_tries_the_fleets_newest_config_again(tmp_path):
    """A reload that dropped the fleet's layer (over the box's new limit) never brought it back when the limit was
    raised again: the broker does not resend its retained copy, so only a restart did (reload and restart gave
    different configs). Likewise a version refused over the box's own limit applies once a reload allows it."""
    own = {"cache.max_mb": 32.0}

    def reread(**changes):
        return load_config(None, {"model.slots_dir": str(tmp_path / "state"), "mqtt.enabled": False,
                                  "http.port": 0, **own, **changes})

    agent = _agent(tmp_path, **own)
    agent._apply_desired(DesiredConfig(version=3, settings={"cache": {"max_mb": 16}, "sampling": {"top_k": 5}}))
    agent.reload(reread(**{"cache.max_mb": 8.0}))
    assert agent.applied_config_version is None and agent.cfg.cache.max_mb == 8
    assert "desired config version 3 no longer applies" in agent.last_config_error
    agent.reload(reread())  # back to 32: the fleet's 16 fits again
    assert agent.applied_config_version == 3 and agent.last_config_error is None
    assert (agent.cfg.cache.max_mb, agent.cfg.sampling.top_k) == (16, 5)
    agent._apply_desired(DesiredConfig(version=4, settings={"cache": {"max_mb": 48}}))  # above the box's 32
    assert agent.applied_config_version == 3 and "version 4 refused" in agent.last_config_error
    assert agent.last_config_error.endswith("; version 3 stays applied")
    used, real_use = [], agent._use
    agent._use = lambda cfg: (used.append(cfg.cache.max_mb), real_use(cfg))
    agent.reload(reread(**{"cache.max_mb": 64.0}))
    assert agent.applied_config_version == 4 and agent.cfg.cache.max_mb == 48 and agent.last_config_error is None
    assert used == [48]  # straight to the new layer: never the box's bare 64 in between (helper-98)


def test_a_kept_desired_config_with_fields_of_a_newer_edgeglm_is_applied_again(tmp_path):
    """desired-applied.json with a field this version does not know was thrown away at the start ("1 validation
    error for DesiredConfig", without the field's name)."""
    import json

    first = _agent(tmp_path)
    first.start()
    try:
        first._apply_desired(DesiredConfig(version=5, settings={"sampling": {"top_k": 4}}))
    finally:
        first.shutdown(1)
    kept = tmp_path / "state" / "desired-applied.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "applied_at": 1.0}))
    again = _agent(tmp_path)
    again.start()
    try:
        assert again.applied_config_version == 5 and again.cfg.sampling.top_k == 4
    finally:
        again.shutdown(1)


def test_a_desired_config_giving_one_setting_twice_is_refused_not_settled_by_key_order(tmp_path):
    agent = _agent(tmp_path)
    agent._apply_desired(DesiredConfig(version=1, settings={"sampling.max_tokens": 5,
                                                             "sampling": {"max_tokens": 7, "top_k": 2}}))
    assert agent.applied_config_version is None and agent.cfg.sampling.max_tokens == 256
    assert "'sampling.max_tokens' is given twice (dotted and nested, or spelled two ways)" in agent.last_config_error
    agent._apply_desired(DesiredConfig(version=2, settings={"sampling.max_tokens": 5, "sampling": {"top_k": 2}}))
    assert agent.applied_config_version == 2 and (agent.cfg.sampling.max_tokens, agent.cfg.sampling.top_k) == (5, 2)


def test_a_reload_applies_the_live_settings_under_the_fleets_layer_and_keeps_the_rest_until_a_restart(tmp_path,
                                                                                                       caplog):
    """SIGHUP reads the box's config again: what applies live does (under the desired config, which stays on top);
    the HTTP address keeps its running value, named in a warning; a desired config that no longer fits the box's
    new limits is dropped, saying so, instead of running above them."""
    import logging

    own = {"sampling.max_tokens": 16, "cache.max_mb": 32.0, "http.port": 0}
    agent = _agent(tmp_path, **own)
    agent._apply_desired(DesiredConfig(version=3, settings={"sampling": {"top_k": 5}, "cache": {"max_mb": 16}}))
    assert agent.last_config_error is None and agent.cfg.cache.max_mb == 16
    reread = load_config(None, {"model.slots_dir": str(tmp_path / "state"), "mqtt.enabled": False,
                                **own, "sampling.max_tokens": 8, "http.port": 9999})
    with caplog.at_level(logging.WARNING, logger="edgeglm.agent"):
        assert agent.reload(reread) == ["http.port"]
    assert "config reload: http.port changed; applied at the next restart" in caplog.text
    cfg = agent.cfg
    assert (cfg.sampling.max_tokens, cfg.sampling.top_k, cfg.cache.max_mb, cfg.http.port) == (8, 5, 16, 0)
    assert agent.http.sampling.max_tokens == 8 and agent.applied_config_version == 3
    lower = load_config(None, {"model.slots_dir": str(tmp_path / "state"), "mqtt.enabled": False, **own,
                               "cache.max_mb": 8.0})
    agent.reload(lower)  # the fleet's 16 MB is above the box's new 8 MB: the fleet's layer goes
    assert "desired config version 3 no longer applies over the box's reloaded config" in agent.last_config_error
    assert (agent.cfg.cache.max_mb, agent.cfg.sampling.top_k, agent.applied_config_version) == (8, 0, None)


@pytest.mark.parametrize("text, expected", [
    ("cannot read /srv/edge/slots/b/model.onnx (Permission denied)", "cannot read slots/b/model.onnx (Permission denied)"),
    ("key file '/etc/edgeglm/trusted-keys/fleet.pub': bad", "key file 'fleet.pub': bad"),
    ("/opt/other/dir/ is gone; see [/var/log/x.log]", "dir is gone; see [x.log]"),
    ("a ratio 1/2, the path a/b/c and a lone /", "a ratio 1/2, the path a/b/c and a lone /"),
    ("/srv/edge2/a: no", "a: no"),  # a directory whose name starts as the root's is not under it
    ("ota.trusted_keys=/etc/edgeglm/keys.pem: bad; <also /tmp/x>", "ota.trusted_keys=keys.pem: bad; <also x>"),
    ("see http://host:8080/path", "see http://host:8080/path"),
])
def test_http_reasons_carry_no_absolute_paths(text, expected):
    """What /readyz and the 503s say of a refused model: paths under the slots directory relative to it, any
    other absolute path cut to its last part, the rest of the reason as it was."""
    assert without_paths(text, (Path("/srv/edge"),)) == expected
