"""`edgeglm fleet ...` refuses bad input with one line and exit code 2, before anything is recorded
or published: rollouts (bundle signature, target, numbers, one active rollout per target, cancel),
config pushes checked against the agent's schema, offers to devices never seen, `status` options,
and a database path that cannot be opened."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.topics import desired_topic, ota_offer_topic
from broker import retained
from fleet.rollout import RolloutDriver, create_rollout, load_rollouts
from fleet.store import Store

FLEET = "plant7"


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", *args], capture_output=True, text=True)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def refused(out: subprocess.CompletedProcess, *phrases: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for phrase in phrases:
        assert phrase in out.stderr, (phrase, out.stderr)


@pytest.fixture
def db(tmp_path):
    """A controller database whose registry knows plant7/d1, d2 and plant8/e1 (no model yet, so a rollout
    offers its canaries at once instead of waiting for their baseline latency)."""
    path = tmp_path / "fleet.db"
    store = Store(path)
    for fleet, device in ((FLEET, "d1"), (FLEET, "d2"), ("plant8", "e1")):
        store.upsert_state(fleet, {"device": device, "online": True, "model": None})
    store.close()
    return path


@pytest.fixture
def unsigned(signed_bundles, tmp_path):
    out = tmp_path / "unsigned"
    shutil.copytree(signed_bundles["v2"], out)
    (out / "manifest.sig").unlink()
    return out


class OfferRecorder:
    def __init__(self, on_offer=None):
        self.offers: list[tuple[str, str]] = []
        self.on_offer = on_offer

    def offer(self, fleet, device, bundle, rollback_key=None) -> str:
        self.offers.append((fleet, device))
        if self.on_offer:
            self.on_offer()
        return f"update-{len(self.offers)}"


# --- rollout -----------------------------------------------------------------------------------

def test_rollout_checks_bundles_target_and_numbers_before_recording(db, signed_bundles, unsigned):
    v1, v2 = str(signed_bundles["v1"]), str(signed_bundles["v2"])
    key = str(signed_bundles["root"] / "keys" / "fleet.key")
    start = ("rollout", "--db", str(db), "--canary", "50")
    refused(cli(*start, "--bundle", str(unsigned), "--group", FLEET), f"{unsigned / 'manifest.sig'}: not found")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--previous-bundle", str(unsigned), "--key", key),
            f"{unsigned / 'manifest.sig'}: not found")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--previous-bundle", v1, "--key", v1),
            f"--key {v1}: no such file")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--previous-bundle", v1, "--key", f"{v1}/manifest.json"),
            f"{v1}/manifest.json: not an unencrypted PEM private key")
    refused(cli(*start, "--bundle", v2, "--group", "nogroup"), "--group 'nogroup': no such group or fleet",
            "fleets: plant7, plant8")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--window", "-1"), "--window -1: must be > 0")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--window", "0"), "--window 0: must be > 0")
    # a window of 1e308 s was recorded: the rollout never decided, and held its target until cancelled
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--window", "1e308"), "<= 604800 seconds (7 days)")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--max-p95-regression", "-10"),
            "--max-p95-regression -10: must be >= 0")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--min-delta-ms", "-1"), "--min-delta-ms -1: must be >= 0")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--min-requests", "0"), "--min-requests 0: must be >= 1")
    refused(cli("rollout", "--db", str(db), "--bundle", v2, "--group", FLEET), "rollout needs --canary")
    # swapped: the canaries' signed rollback would take them "back" to a newer version nobody rolled out
    refused(cli(*start, "--bundle", v1, "--group", FLEET, "--previous-bundle", v2, "--key", key),
            f"--previous-bundle {v2} is version 1.1.0, not older than --bundle {v1} (1.0.0): the canaries' rollback "
            "only goes back")
    refused(cli(*start, "--bundle", v2, "--group", FLEET, "--previous-bundle", v2, "--key", key),
            "is version 1.1.0, not older than")
    store = Store(db)
    assert load_rollouts(store) == []  # nothing was recorded
    out = cli(*start, "--bundle", v2, "--group", FLEET, "--max-p95-regression", "0", "--previous-bundle", v1,
              "--key", key)
    assert out.returncode == 0 and "rollout 1:" in out.stdout and "rollout cancel 1" in out.stdout, out.stderr
    store.close()


def test_the_rollback_key_comes_from_key_or_the_fleet_config(db, signed_bundles, tmp_path):
    v1, v2 = str(signed_bundles["v1"]), str(signed_bundles["v2"])
    key = signed_bundles["root"] / "keys" / "fleet.key"
    start = ("rollout", "--db", str(db), "--canary", "50", "--bundle", v2, "--group", FLEET)
    refused(cli(*start, "--previous-bundle", v1), "no key to sign the canaries' rollback offers",
            "--key ROLLBACK_KEY or set [rollback] key", "nothing was done")
    refused(cli(*start, "--key", str(key)), "--key signs the canaries' rollback offers to --previous-bundle")
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[rollback]\nkey = "{tmp_path / "missing.key"}"\n')
    refused(cli(*start, "--previous-bundle", v1, "--config", str(conf)),
            f"[rollback] key {tmp_path / 'missing.key'}: no such file")
    refused(cli("rollback", "--group", FLEET, "--db", str(db), "--config", str(conf)),
            f"[rollback] key {tmp_path / 'missing.key'}: no such file", "rollback offers")
    refused(cli("rollback", "--group", FLEET, "--db", str(db)), "no key to sign rollback offers")
    store = Store(db)
    assert load_rollouts(store) == []  # nothing was recorded
    conf.write_text(f'[rollback]\nkey = "{key}"\n')
    out = cli(*start, "--previous-bundle", v1, "--config", str(conf))
    assert out.returncode == 0 and "rollout 1:" in out.stdout, out.stderr
    (r,) = load_rollouts(store)
    assert r.key == key and r.previous_bundle == signed_bundles["v1"]  # the halt path signs with the config's key
    store.close()


def test_one_active_rollout_per_target_and_cancel_stops_it(db, signed_bundles):
    v2 = str(signed_bundles["v2"])
    assert cli("group", "add", "ring1", "--fleet", FLEET, "d1", "--db", str(db)).returncode == 0
    start = ("rollout", "--db", str(db), "--canary", "50", "--bundle", v2)
    assert cli(*start, "--group", FLEET).returncode == 0
    # the same fleet, or a group within it: the active rollout 1 may offer the same devices
    for target in (FLEET, "ring1"):
        refused(cli(*start, "--group", target), "rollout 1 (v2 -> fleet plant7) is still active (phase canary)",
                "`edgeglm fleet rollout cancel 1`", "nothing was recorded")
    out = cli(*start, "--group", "plant8")  # another fleet: no conflict
    assert out.returncode == 0 and "rollout 2:" in out.stdout, out.stderr

    out = cli("rollout", "cancel", "1", "--db", str(db))
    assert out.returncode == 0 and "cancelled in phase canary" in out.stdout and "no device had been offered" \
        in out.stdout, out.stderr
    store = Store(db)
    assert {r.id: r.phase for r in load_rollouts(store)} == {1: "cancelled", 2: "canary"}
    recorder = OfferRecorder()
    RolloutDriver(store, recorder).tick()
    assert recorder.offers == [("plant8", "e1")]  # the cancelled rollout offers nothing
    refused(cli("rollout", "cancel", "1", "--db", str(db)), "rollout 1 already ended (cancelled)")
    refused(cli("rollout", "cancel", "9", "--db", str(db)), "rollout 9: no such rollout (active: 2)")
    # beyond SQLite's integers: a raw OverflowError traceback
    refused(cli("rollout", "cancel", "99999999999999999999", "--db", str(db)),
            "rollout 99999999999999999999: no such rollout (active: 2)")
    refused(cli("rollout", "cancel", "--db", str(db)), "rollout cancel needs the rollout's ID")
    out = cli(*start, "--group", "ring1")  # the fleet is free again
    assert out.returncode == 0 and "rollout 3:" in out.stdout, out.stderr

    # a cancel after canaries were offered names them and what they keep
    RolloutDriver(store, OfferRecorder()).tick()
    out = cli("rollout", "cancel", "3", "--db", str(db))
    assert out.returncode == 0 and "cancelled in phase canary_wait" in out.stdout, out.stderr
    assert f"{FLEET}/d1: no result yet" in out.stdout and "fleet rollback --group ring1" in out.stdout
    store.close()


def test_a_rollout_whose_target_has_no_device_online_says_it_waits(tmp_path):
    """It stayed in phase canary with an empty report: nothing told the operator why nothing happened."""
    store = Store(tmp_path / "fleet.db")
    store.upsert_state(FLEET, {"device": "d1", "online": False, "model": None})
    store.group_add("ring1", FLEET, ["d1", "ghost"])
    create_rollout(store, tmp_path / "bundle", FLEET, canary_pct=50, window_s=1.0, group="ring1")
    recorder = OfferRecorder()
    driver = RolloutDriver(store, recorder)
    driver.tick()
    driver.tick()  # said once, not at every tick
    [r] = load_rollouts(store)
    assert r.phase == "canary" and recorder.offers == []
    assert [line.split(" ", 1)[1] for line in r.data["report"]] == \
        ["waiting: no device of group ring1 of plant7 is online (members: d1, ghost)"]
    store.upsert_state(FLEET, {"device": "d1", "online": True, "model": None})
    driver.tick()
    assert recorder.offers == [(FLEET, "d1")]
    store.close()


def test_a_cancel_that_lands_during_a_tick_is_not_overwritten(tmp_path):
    from fleet.rollout import cancel_rollout

    store = Store(tmp_path / "fleet.db")
    for d in ("d1", "d2"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": None})
    rid = create_rollout(store, tmp_path / "bundle", FLEET, canary_pct=50, window_s=1.0)
    recorder = OfferRecorder(on_offer=lambda: cancel_rollout(store, rid))  # the operator cancels mid-tick
    driver = RolloutDriver(store, recorder)
    driver.tick()
    assert [r.phase for r in load_rollouts(store)] == ["cancelled"]
    driver.tick()
    assert recorder.offers == [(FLEET, "d1")]  # the offer under way, and nothing after the cancel
    store.close()


def test_a_cancel_during_the_rest_step_stops_its_offers(tmp_path):
    """The rest step offers to every remaining device in one tick: a cancel that lands in the middle stops
    the offers from the next device on (it used to let the step offer them all)."""
    from fleet.rollout import cancel_rollout

    store = Store(tmp_path / "fleet.db")
    devices = [f"d{i:02d}" for i in range(10)]
    for d in devices:
        store.upsert_state(FLEET, {"device": d, "online": True, "model": None})
    rid = create_rollout(store, tmp_path / "bundle", FLEET, canary_pct=10, window_s=1.0)
    recorder = OfferRecorder()
    driver = RolloutDriver(store, recorder)
    driver.tick()
    [r] = load_rollouts(store)
    store.add_ota_status(FLEET, "d00", {"update_id": r.data["offers"]["d00"], "ts": time.time(), "result": "committed"})
    store._exec("UPDATE rollouts SET phase='rest' WHERE id=?", (rid,))  # the gate passed
    recorder.on_offer = lambda: len(recorder.offers) == 4 and cancel_rollout(store, rid)  # mid-step
    driver.tick()
    assert [r.phase for r in load_rollouts(store)] == ["cancelled"]
    assert [d for _, d in recorder.offers] == ["d00", "d01", "d02", "d03"]  # none after the cancel
    store.close()


# --- offer -------------------------------------------------------------------------------------

def test_offer_to_a_device_never_seen_is_refused_unless_forced(mosquitto, db, signed_bundles, unsigned):
    args = ("offer", "--fleet", FLEET, "--bundle", str(signed_bundles["v2"]), "--db", str(db),
            "--broker", f"127.0.0.1:{mosquitto.port}")
    refused(cli(*args, "--device", "nodev"), "--device plant7/nodev: device nodev has never reported",
            "devices of fleet plant7: d1, d2", "nothing was offered", "--force")
    refused(cli(*args[:-4], "--device", "d1", "--db", str(db.with_name("other.db")), "--broker",
                f"127.0.0.1:{mosquitto.port}"), "no fleet database at")
    assert retained(mosquitto.port, ota_offer_topic(FLEET, "nodev")) == []
    refused(cli("offer", "--fleet", FLEET, "--device", "d1", "--bundle", str(unsigned), "--db", str(db),
                "--broker", f"127.0.0.1:{mosquitto.port}"), "manifest.sig: not found")

    out = cli(*args, "--device", "nodev", "--force")
    assert out.returncode == 0 and "offered" in out.stdout, out.stderr
    assert "warning: --device plant7/nodev: device nodev has never reported" in out.stderr
    assert "the retained offer waits for it" in out.stderr
    assert len(retained(mosquitto.port, ota_offer_topic(FLEET, "nodev"), 0.2, expect=1)) == 1
    out = cli(*args, "--device", "d1")  # a known device: no warning
    assert out.returncode == 0 and out.stderr == "", out.stderr


# --- config set and the status table -----------------------------------------------------------

def test_config_set_refuses_what_the_agents_would_refuse_before_publishing(mosquitto, db):
    args = ("config", "set", "--fleet", FLEET, "--device", "d1", "--broker", f"127.0.0.1:{mosquitto.port}",
            "--db", str(db))  # never a fleet.db in the working directory
    refused(cli(*args, "sampling.max_tokens=-1"), "sampling.max_tokens = -1 (from the command line) is too small",
            "1 <= max_tokens", "nothing was published")
    refused(cli(*args, "sampling.bogus=1"), "sampling.bogus (from the command line) is not a setting",
            "allowed in sampling: max_tokens")
    refused(cli(*args, "http.port=9000"), "http.port: local-only; the agents refuse a desired config that changes it",
            "the fleet may set only sampling, batching")
    # the agents' allowlist (agent/remote_config.py), not whole sections: these passed a section check
    refused(cli(*args, "ota.require_signature=false", "cache.persist_dir=/tmp/x", "sampling.top_k=5"),
            "ota.require_signature, cache.persist_dir: local-only", "nothing was published")
    refused(cli(*args, "ota.trusted_keys=/tmp/evil-keys"), "ota.trusted_keys: local-only")
    # local-only before the value's own checks (this said "set both", which the fleet may not do either)
    refused(cli(*args, "mqtt.password=x"), "mqtt.password: local-only")
    refused(cli(*args, "HTTP.Port=9000"), "http.port: local-only")  # names as the agents read them
    refused(cli(*args, "sampling=1", "sampling.top_k=2"), "'sampling.top_k' sets a field inside 'sampling'")
    refused(cli(*args, "telemetry.interval_s=0.01"), "telemetry.interval_s = 0.01 is below 1.0, the least a desired "
            "config may set", "nothing was published")
    refused(cli(*args, "sampling.max_tokens=99999999"), "sampling.max_tokens = 99999999 (from the command line) is "
            "too large; allowed: 1 <= max_tokens <= 1048576")
    refused(cli(*args, "sampling.max_tokens=1e999"), "'sampling.max_tokens=1e999': 1e999 is too large to be a number "
            "(it reads as infinity); nothing was published")  # was "inf ...: must be an integer, not a fractional"
    refused(cli("config", "set", "--group", "ring9", "--db", str(db), "sampling.max_tokens=-1"),
            "--group 'ring9': no such group or fleet")
    assert retained(mosquitto.port, desired_topic(FLEET, "d1")) == []
    out = cli(*args, "SAMPLING.max_tokens=64", "cache.persist=false")  # `[SAMPLING]` is `[sampling]`, as in a file
    assert out.returncode == 0, out.stderr
    (payload,) = retained(mosquitto.port, desired_topic(FLEET, "d1"), 0.2, expect=1)
    assert json.loads(payload)["settings"] == {"sampling": {"max_tokens": 64}, "cache": {"persist": False}}


def test_status_table_shows_a_refused_desired_config(db):
    store = Store(db)
    error = "desired config version 7 refused: invalid config: sampling.top_p = 5 (from the desired-config update)"
    store.upsert_state(FLEET, {"device": "d2", "online": True, "model": {"name": "m", "version": "1.0.0"},
                               "applied_config_version": 5, "last_config_error": error})
    store.close()
    out = cli("status", "--db", str(db), "--fleet", FLEET)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith(FLEET)}
    assert rows["d2"].endswith("5 REFUSED") and "REFUSED" not in rows["d1"]
    assert f"config REFUSED by {FLEET}/d2 (it keeps config version 5): {error}" in out.stdout


def test_status_shows_an_update_that_did_not_commit(db):
    """A refused or failed update (a bundle signed by an unknown key, a corrupted chunk) was reported by the agent
    and stored, but `fleet status` showed nothing of it, and `fleet offer` only says "offered"."""
    store = Store(db)
    reason = "manifest signature: signed by unknown key '5c0581138e76b9ee'; refused"
    store.add_ota_status(FLEET, "d1", {"update_id": "u-old", "ts": 100.0, "state": "reporting",
                                       "result": "committed"})
    store.add_ota_status(FLEET, "d1", {"update_id": "u-rogue", "ts": 200.0, "state": "reporting",
                                       "result": "failed", "reason": reason})
    store.add_ota_status(FLEET, "d2", {"update_id": "u-ok", "ts": 200.0, "state": "reporting",
                                       "result": "committed"})
    store.close()
    out = cli("status", "--db", str(db), "--fleet", FLEET)
    assert out.returncode == 0, out.stderr
    assert f"update u-rogue FAILED on {FLEET}/d1 (it serves no model): {reason}" in out.stdout
    assert "u-ok" not in out.stdout and "u-old" not in out.stdout  # a committed one is no news
    out = cli("status", "--db", str(db), "--fleet", FLEET, "--json")
    last = {d["device"]: d["last_update"] for d in json.loads(out.stdout)["devices"]}
    assert last["d1"] == {"update_id": "u-rogue", "result": "failed", "reason": reason, "ts": 200.0}
    assert last["d2"]["result"] == "committed"


# --- status options and the database path ------------------------------------------------------

def test_status_checks_a_given_config_and_since_even_with_db(db, tmp_path):
    (tmp_path / "bad.toml").write_text("bogus = 1\n")
    refused(cli("status", "--config", str(tmp_path / "bad.toml"), "--db", str(db)), "bad.toml", "bogus")
    refused(cli("status", "--config", str(tmp_path / "nope.toml"), "--db", str(db)),
            "nope.toml: fleet config file not found")
    for since in ("-5", "0", "nan"):
        refused(cli("status", "--since", since, "--db", str(db)), f"--since {since}: must be a positive number")
    assert cli("status", "--since", "60", "--db", str(db)).returncode == 0


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_serve_with_a_database_path_it_cannot_open_is_one_line(tmp_path, where):
    path = tmp_path / "nope" / "fleet.db" if where == "missing-dir" else tmp_path
    out = cli("serve", "--db", str(path), "--broker", "127.0.0.1:1")
    refused(out, f"fleet database {path}", "cannot be opened",
            f"directory {tmp_path / 'nope'} does not exist" if where == "missing-dir" else "it is a directory")


def test_ids_no_topic_can_carry_and_ports_that_cannot_be_bound_are_one_line(mosquitto, db, signed_bundles, tmp_path):
    broker = ("--broker", f"127.0.0.1:{mosquitto.port}", "--db", str(db))
    refused(cli("offer", *broker, "--fleet", "plant 7", "--device", "dev1", "--bundle", str(signed_bundles["v2"]),
                "--force"), "fleet id 'plant 7' cannot be an MQTT topic level")
    refused(cli("config", "set", *broker, "--fleet", FLEET, "--device", "dev/1", "sampling.max_tokens=64"),
            "device id 'dev/1' cannot be an MQTT topic level")
    refused(cli("group", "add", "ring1", "--db", str(db), "--fleet", FLEET, "dev 1"), "device id 'dev 1'")
    refused(cli("serve", *broker, "--fleet", "plant/7", "--http-port", "0"), "fleet id 'plant/7'")
    refused(cli("serve", *broker, "--http-port", "70000"), "--http-port 70000 is not a port number")
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused(cli("serve", *broker, "--http-port", str(busy.getsockname()[1])), "cannot serve HTTP on 127.0.0.1:",
                "choose another --http-port")


def test_cli_commands_publish_without_listening_each_under_its_own_client_id(mosquitto, db):
    """`config set` (as offer and rollback) used to start a full controller: it stored every device's
    retained OTA status again on each run, and every command shared one client id, so two at once took
    each other's MQTT session over. Now a command only publishes, as edgeglm-controller-cli-<pid>."""
    import paho.mqtt.client as paho_client

    from agent.topics import ota_status_topic
    raw = paho_client.Client(CallbackAPIVersion.VERSION2, protocol=paho_client.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.port)
    raw.loop_start()
    try:
        raw.publish(ota_status_topic(FLEET, "d0"), json.dumps({"update_id": "u1", "ts": time.time(), "state":
                    "reporting", "result": "committed"}), qos=1, retain=True).wait_for_publish(5)
        args = ("config", "set", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", FLEET,
                "--device", "d0", "--force")  # d0 has only an OTA status, no state: not in the registry
        runs = [subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", *args, f"sampling.max_tokens={60 + i}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        assert all(p.wait(60) == 0 for p in runs), [p.stderr.read() for p in runs]
    finally:
        raw.loop_stop()
    store = Store(db)
    assert store._exec("SELECT COUNT(*) FROM ota_status").fetchone()[0] == 0
    store.close()
    assert "taken over" not in mosquitto.log_text().lower()
    clients = set(re.findall(r"New client connected from \S+ as (edgeglm-controller-cli\S*)", mosquitto.log_text()))
    assert len(clients) == 2 and all(re.fullmatch(r"edgeglm-controller-cli-\d+", c) for c in clients), clients


# --- device remove -----------------------------------------------------------------------------

def test_a_removed_device_stays_out_of_the_registry_until_it_comes_back_online(mosquitto, tmp_path, signed_bundles,
                                                                                caplog):
    """Devices could not be removed: a decommissioned box stayed in `fleet status`, its groups and every rollout's
    device list for ever, its retained state registered it again at each controller start, and its retained
    offer and desired config waited on the broker for whoever took its id next."""
    from agent.mqtt import MqttSession, MqttSettings
    from agent.topics import ReportedState, state_topic
    from fleet.controller import ControllerSettings, FleetController
    from waiting import until

    db, port = tmp_path / "fleet.db", mosquitto.port
    broker = ("--db", str(db), "--broker", f"127.0.0.1:{port}")

    def agent(device: str) -> MqttSession:
        s = MqttSession(MqttSettings(enabled=True, port=port, reconnect_min_delay_s=0.1), fleet=FLEET, device=device,
                        state_fn=lambda online=True: ReportedState(device=device, online=online, agent_version="0.1.0",
                                                                   uptime_s=1.0, ts=time.time()))
        s.start()
        assert s.wait_connected(10)
        return s

    def listed(ctl) -> dict[str, int]:
        return {d["device"]: d["online"] for d in ctl.store.devices(FLEET)}

    ctl = FleetController(ControllerSettings(broker_port=port, db=db, fleet=FLEET)).start()
    try:
        d1, d2 = agent("d1"), agent("d2")
        until(lambda: listed(ctl) == {"d1": 1, "d2": 1})
        ctl.set_desired(FLEET, "d1", {"sampling": {"top_k": 1}})
        ctl.offer(FLEET, "d1", signed_bundles["v2"])
        ctl.store.group_add("ring1", FLEET, ["d1", "d2"])
        refused(cli("device", "remove", "--fleet", FLEET, "d1", *broker), "d1 of fleet plant7: online",
                "stop the agent", "--force", "nothing was removed")
        refused(cli("device", "remove", "--fleet", FLEET, "d9", *broker), "d9 of fleet plant7: not in the registry")
        d1.close()  # the box is switched off: its agent says goodbye (offline, retained)
        until(lambda: listed(ctl) == {"d1": 0, "d2": 1})
        out = cli("device", "remove", "--fleet", FLEET, "d1", *broker)
        assert out.returncode == 0, out.stderr
        assert "plant7/d1: removed from the registry; its retained desired config and offer cleared on the broker; " \
               "1 group membership(s); its recorded desired config dropped" in out.stdout, out.stdout
        assert listed(ctl) == {"d2": 1} and ctl.store.groups()["ring1"] == [(FLEET, "d2")]
        assert ctl.store.desired(FLEET, "d1") is None
        assert retained(port, desired_topic(FLEET, "d1")) == [] and retained(port, ota_offer_topic(FLEET, "d1")) == []
        # the device's own topic: the controller may not
        assert len(retained(port, state_topic(FLEET, "d1"), expect=1)) == 1
    finally:
        ctl.stop()
    # a controller started again gets d1's retained state from the broker, and does not list it again
    with caplog.at_level("DEBUG", logger="edgeglm.fleet"):
        again = FleetController(ControllerSettings(broker_port=port, db=db, fleet=FLEET)).start()
        until(lambda: f"{FLEET}/d1: removed from the registry: its retained state is not taken" in caplog.text)
    try:
        assert listed(again) == {"d2": 1}
        d1 = agent("d1")  # the box is back (or its id was given to a new one): it registers as any device
        until(lambda: listed(again) == {"d1": 1, "d2": 1})
        d1.close()
        until(lambda: listed(again) == {"d1": 0, "d2": 1})  # and stays listed once it has been back
        d2.close()
    finally:
        again.stop()


def test_a_running_agent_removed_with_force_is_listed_again_at_its_next_telemetry(mosquitto, tmp_path, monkeypatch,
                                                                                   caplog):
    """`device remove --force` of a box whose agent keeps running: the agent publishes its state only when
    something changes, so it served for hours without a row in `fleet status`, its telemetry stored under an id
    the registry did not list. Its next telemetry report registers it again, online, with the state it had."""
    import logging

    import fleet.store
    from agent.mqtt import MqttSession, MqttSettings
    from agent.topics import ModelRef, ReportedState, TelemetryReport
    from fleet.controller import ControllerSettings, FleetController
    from waiting import until

    monkeypatch.setattr(fleet.store, "REMOVED_GRACE_S", 0.5)  # (10 s: a report in flight at the removal)
    db, port = tmp_path / "fleet.db", mosquitto.port
    state = ReportedState(device="d1", online=True, agent_version="0.1.0", execution_path="onnxruntime:cpu",
                          model=ModelRef(name="tiny", version="1.0.0", sha256="0" * 64), active_slot="a",
                          uptime_s=1.0, ts=time.time())
    d1 = MqttSession(MqttSettings(enabled=True, port=port, reconnect_min_delay_s=0.1), fleet=FLEET, device="d1",
                     state_fn=lambda online=True: state.model_copy(update={"online": online}))
    ctl = FleetController(ControllerSettings(broker_port=port, db=db, fleet=FLEET)).start()
    caplog.set_level(logging.WARNING, logger="edgeglm.fleet")
    try:
        d1.start()
        assert d1.wait_connected(10)
        until(lambda: [d["device"] for d in ctl.store.devices(FLEET)] == ["d1"])
        out = cli("device", "remove", "--fleet", FLEET, "d1", "--force", "--db", str(db), "--broker",
                  f"127.0.0.1:{port}")
        assert out.returncode == 0 and "online: it registers again with its next state or telemetry report" \
            in out.stdout, (out.stdout, out.stderr)
        assert ctl.store.devices(FLEET) == []
        time.sleep(0.6)
        now = time.time()
        d1.publish_telemetry(TelemetryReport(device="d1", window_start=now - 60, window_end=now, count=0,
                                             model_version="1.0.0"))
        until(lambda: ctl.store.devices(FLEET) != [])
        (row,) = ctl.store.devices(FLEET)
        assert (row["online"], row["model_version"], row["execution_path"], row["active_slot"]) == \
            (1, "1.0.0", "onnxruntime:cpu", "a")
        assert not ctl.store.is_removed(FLEET, "d1")
        assert "device d1 (fleet plant7) was removed but its agent still sends telemetry" in caplog.text
    finally:
        d1.close()
        ctl.stop()


def test_telemetry_in_flight_at_a_removal_does_not_bring_the_device_back(tmp_path):
    """A report the agent sent just before `device remove`, stored just after, is no sign that it still runs;
    one stored REMOVED_GRACE_S later is. A device removed by an older controller (no state kept) waits for its
    next state, as before."""
    from fleet.store import REMOVED_GRACE_S, telemetry_row

    clock = [1000.0]
    store = Store(tmp_path / "fleet.db", clock=lambda: clock[0])
    state = {"device": "d1", "online": True, "agent_version": "0.1.0", "model": {"name": "m", "version": "2.0.0"},
             "uptime_s": 1.0, "ts": 1.0}
    store.upsert_state(FLEET, state)
    store.upsert_state(FLEET, {**state, "device": "d2"})
    store.remove_device(FLEET, "d1")
    store.remove_device(FLEET, "d2")
    store.db.execute("UPDATE removed SET state = NULL WHERE device = 'd2'")  # what an older controller kept

    def report(device: str):
        clock[0] += 1
        store.add_telemetry_many([telemetry_row(FLEET, {"device": device, "window_end": clock[0], "count": 0})])
        return store.returned

    assert report("d1") == [] and store.devices(FLEET) == []
    clock[0] += REMOVED_GRACE_S
    assert report("d2") == [] and report("d1") == [(FLEET, "d1")]
    assert [(d["device"], d["online"], d["model_version"]) for d in store.devices(FLEET)] == [("d1", 1, "2.0.0")]
    assert store.is_removed(FLEET, "d2") and not store.is_removed(FLEET, "d1")
    store.close()


def test_config_for_a_device_the_registry_never_saw_is_refused_unless_forced(mosquitto, db):
    """`config set` to a mistyped device id published a retained config no command could clear (`device remove`
    refuses a device that is not in the registry); `fleet offer` already refused it."""
    broker = ("--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}")
    refused(cli("config", "set", *broker, "--fleet", FLEET, "--device", "nodev", "sampling.top_k=3"),
            "--device plant7/nodev: has never reported to the registry", "devices of fleet plant7: d1, d2",
            "nothing was published", "--force")
    assert retained(mosquitto.port, desired_topic(FLEET, "nodev")) == []
    out = cli("config", "set", *broker, "--fleet", FLEET, "--device", "nodev", "--force", "sampling.top_k=3")
    assert out.returncode == 0, out.stderr
    assert len(retained(mosquitto.port, desired_topic(FLEET, "nodev"), expect=1)) == 1
    # and what was forced onto the broker for an id no box has can be taken off again
    refused(cli("device", "remove", "--fleet", FLEET, "nodev", *broker), "not in the registry", "--force clears")
    out = cli("device", "remove", "--fleet", FLEET, "nodev", "--force", *broker)
    assert out.returncode == 0 and f"{FLEET}/nodev: not in the registry; its retained desired config and offer " \
        "cleared" in out.stdout, out.stderr
    assert retained(mosquitto.port, desired_topic(FLEET, "nodev")) == []
    # no database at all (a mistyped --db): refused as `fleet offer` refuses it, and no database is made
    nowhere = db.parent / "typo.db"
    refused(cli("config", "set", "--db", str(nowhere), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", FLEET,
                "--device", "devX", "sampling.top_k=3"),
            f"there is no fleet database at {nowhere}, so no device has reported; nothing was published")
    assert retained(mosquitto.port, desired_topic(FLEET, "devX")) == [] and not nowhere.exists()


def test_group_commands_refuse_a_missing_database_and_unknown_groups_or_members(db):
    """`group remove nosuch` said "0 device(s) removed" with exit 0, and `--db typo.db` made a new empty database
    at the mistyped path, where a group added was never read by `serve`."""
    nowhere = db.parent / "typo.db"
    for args in (("list",), ("add", "ring1", "--fleet", FLEET, "d1"), ("remove", "ring1")):
        refused(cli("group", *args, "--db", str(nowhere)), f"{nowhere}: no fleet database")
    assert not nowhere.exists()
    assert cli("group", "add", "ring1", "--fleet", FLEET, "d1", "d2", "--db", str(db)).returncode == 0
    refused(cli("group", "remove", "nosuch", "--db", str(db)), "group nosuch: no such group (groups: ring1)",
            "nothing was removed")
    refused(cli("group", "remove", "ring1", "dQ", "--db", str(db)),
            f"group ring1: dQ is not in it (members: {FLEET}/d1 {FLEET}/d2); nothing was removed")
    refused(cli("group", "remove", "ring1", "--fleet", "plant8", "--db", str(db)), "group ring1 has no device of "
            "fleet plant8")
    assert cli("group", "list", "--db", str(db)).stdout.strip() == f"ring1: {FLEET}/d1 {FLEET}/d2"
    out = cli("group", "remove", "ring1", "d2", "--db", str(db))
    assert out.returncode == 0 and "1 device(s) removed" in out.stdout


def test_a_controller_of_one_fleet_drives_only_that_fleets_rollouts(db, signed_bundles):
    """`fleet serve --fleet plant7` hears only plant7's devices, but drove every rollout in its database: a
    plant8 rollout was offered by it too (twice, beside plant8's own controller on a shared database)."""
    store = Store(db)
    r7 = create_rollout(store, signed_bundles["v2"], FLEET, canary_pct=100, window_s=10.0)
    r8 = create_rollout(store, signed_bundles["v2"], "plant8", canary_pct=100, window_s=10.0)
    recorder = OfferRecorder()
    RolloutDriver(store, recorder, fleet=FLEET).tick()
    assert recorder.offers == [(FLEET, "d1"), (FLEET, "d2")]
    phases = {r.id: r.phase for r in load_rollouts(store)}
    assert phases == {r7: "canary_wait", r8: "canary"}
    RolloutDriver(store, recorder).tick()  # a controller of every fleet ('+') drives the rest
    assert recorder.offers[2:] == [("plant8", "e1")]
    store.close()


def test_a_recorded_rollout_keeps_its_key_through_a_secret_rotation(db, signed_bundles, tmp_path):
    """On K3s the controller's rollback key is a Secret file: `rollback.key` is a link to `..data/rollback.key`,
    `..data` a link to a timestamped directory the kubelet replaces (and deletes) when the Secret changes. The
    rollout recorded the resolved path, so after a key rotation its halt path could not sign the canaries'
    rollback (the file was gone, every tick failed, the canaries stayed on the regressed version)."""
    import os

    from ota.signing import load_private_key

    secret = tmp_path / "secret"
    secret.mkdir()

    def publish(stamp: str, key) -> None:  # what the kubelet does on a Secret update
        (secret / stamp).mkdir()
        shutil.copy(key, secret / stamp / "rollback.key")
        os.symlink(stamp, secret / "..data_tmp")
        os.replace(secret / "..data_tmp", secret / "..data")

    publish("..2026_11_26_10_00_00.1", signed_bundles["root"] / "keys" / "fleet.key")
    os.symlink("..data/rollback.key", secret / "rollback.key")
    out = cli("rollout", "--db", str(db), "--bundle", str(signed_bundles["v2"]), "--group", FLEET, "--canary", "50",
              "--previous-bundle", str(signed_bundles["v1"]), "--key", str(secret / "rollback.key"))
    assert out.returncode == 0, out.stderr
    store = Store(db)
    [r] = load_rollouts(store)
    store.close()
    publish("..2026_11_27_10_00_00.2", signed_bundles["root"] / "keys" / "fleet.key")  # the rotation
    shutil.rmtree(secret / "..2026_11_26_10_00_00.1")
    assert r.key == secret / "rollback.key"
    load_private_key(r.key)  # what the halt path signs with


def test_a_broker_lost_in_the_middle_of_a_command_is_one_line_saying_what_was_published(
        mosquitto, db, signed_bundles, tmp_path, monkeypatch, capsys):
    """`fleet rollback` over a group whose broker went away after the first offer ended in a traceback (exit 1)
    that did not say which devices already had a signed rollback offer."""
    import fleet.rollout
    from agent.cli import main

    store = Store(db)
    for d in ("d1", "d2"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.1.0"}})
    store.close()
    key = signed_bundles["root"] / "keys" / "fleet.key"
    (tmp_path / "fleet.toml").write_text(f'[bundles]\ndir = "{signed_bundles["root"]}"\n[rollback]\nkey = "{key}"\n')
    real = fleet.rollout.offer_rollback

    def offer_then_lose_the_broker(*args, **kwargs):
        ids = real(*args, **kwargs)
        mosquitto.stop()
        return ids
    monkeypatch.setattr(fleet.rollout, "offer_rollback", offer_then_lose_the_broker)
    rc = main(["fleet", "rollback", "--group", FLEET, "--db", str(db), "--config", str(tmp_path / "fleet.toml"),
               "--broker", f"127.0.0.1:{mosquitto.port}", "--to", "1.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"1 of 2 rollback offer(s) published before ({FLEET}/d1 (" in err
    assert "run the same command again for the rest" in err


# --- [mqtt] password_file -----------------------------------------------------------------------

def _no_edgeglm_env(monkeypatch) -> None:
    import os

    for var in [v for v in os.environ if v.upper().startswith("EDGEGLM_")]:
        monkeypatch.delenv(var)


def test_the_mqtt_password_comes_from_password_file_without_its_trailing_newline(tmp_path, monkeypatch):
    """On K3s the controller's and the operator commands' passwords are Secret files, not environment variables
    (fleet.toml / fleet-cli.toml `[mqtt] password_file`); `openssl rand -hex 24 > FILE` ends them with a newline."""
    from fleet.config import load_fleet_config, mqtt_password

    _no_edgeglm_env(monkeypatch)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[mqtt]\nusername = "ops"\npassword_file = "{secret}"\n')
    cfg = load_fleet_config(conf)
    assert cfg.mqtt.password is None and cfg.mqtt.password_file == secret
    assert mqtt_password(cfg.mqtt) == "s3cret"
    secret.write_text("n3w\r\n")  # read at each use: a Secret the kubelet replaced is the new password
    assert mqtt_password(cfg.mqtt) == "n3w"
    secret.write_text("s3cret")
    assert mqtt_password(cfg.mqtt) == "s3cret"
    conf.write_text('[mqtt]\npassword = "inline"\n')  # without password_file: as before
    assert mqtt_password(load_fleet_config(conf).mqtt) == "inline"
    monkeypatch.setenv("EDGEGLM_MQTT__PASSWORD", "from-env")
    assert mqtt_password(load_fleet_config().mqtt) == "from-env"
    monkeypatch.delenv("EDGEGLM_MQTT__PASSWORD")
    assert mqtt_password(load_fleet_config().mqtt) is None


def test_password_and_password_file_together_are_refused(tmp_path, monkeypatch, db):
    from agent.errors import ConfigError
    from fleet.config import load_fleet_config

    _no_edgeglm_env(monkeypatch)
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[mqtt]\npassword = "inline"\npassword_file = "{secret}"\n')
    with pytest.raises(ConfigError) as exc:
        load_fleet_config(conf)
    assert f"[mqtt] (from config file {conf}): password (or EDGEGLM_MQTT__PASSWORD) and password_file are both " \
           "set" in str(exc.value)
    assert "\n" not in str(exc.value) and "Value error" not in str(exc.value)
    args = ("config", "set", "--config", str(conf), "--db", str(db), "--broker", "127.0.0.1:1", "--fleet", FLEET,
            "--device", "d1", "sampling.max_tokens=64")
    refused(cli(*args), str(conf), "password", "password_file are both set")
    conf.write_text(f'[mqtt]\npassword_file = "{secret}"\n')  # the other one from the environment
    monkeypatch.setenv("EDGEGLM_MQTT__PASSWORD", "from-env")
    refused(cli(*args), "password (or EDGEGLM_MQTT__PASSWORD) and password_file are both set")


@pytest.mark.parametrize("problem", ["missing", "empty", "a-directory"])
def test_an_unreadable_or_empty_password_file_stops_a_command_with_one_line(tmp_path, monkeypatch, db, problem):
    """Before anything is published or removed, and before `fleet serve` connects."""
    _no_edgeglm_env(monkeypatch)
    secret = tmp_path / "operator-mqtt" / "password"
    if problem == "empty":
        secret.parent.mkdir()
        secret.write_text("\n")
    elif problem == "a-directory":
        secret.mkdir(parents=True)
    conf = tmp_path / "fleet-cli.toml"
    conf.write_text(f'[mqtt]\nusername = "edgeglm-operator"\npassword_file = "{secret}"\n')
    why = {"missing": "cannot read it (No such file or directory)", "empty": "empty; put the MQTT password of user "
           "edgeglm-operator in it", "a-directory": "cannot read it (Is a directory)"}[problem]
    common = ("--config", str(conf), "--db", str(db), "--broker", "127.0.0.1:1")
    for args in (("config", "set", "--fleet", FLEET, "--device", "d1", "sampling.max_tokens=64"),
                 ("device", "remove", "--fleet", FLEET, "d1", "--force"),
                 ("serve", "--http-port", "0")):
        refused(cli(*args, *common), f"[mqtt] password_file {secret}: {why}", "no MQTT connection was made")
    store = Store(db)
    assert "d1" in {d["device"] for d in store.devices(FLEET)}, "nothing was removed"
    store.close()


def test_a_command_logs_in_with_the_password_of_its_password_file(make_mosquitto, tmp_path, monkeypatch, db):
    _no_edgeglm_env(monkeypatch)
    broker = make_mosquitto(users={"edgeglm-operator": "s3cret"})
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    conf = tmp_path / "fleet-cli.toml"
    conf.write_text(f'[mqtt]\nusername = "edgeglm-operator"\nclient_id = "edgeglm-operator"\n'
                    f'password_file = "{secret}"\n')
    out = cli("config", "set", "--config", str(conf), "--db", str(db), "--broker", f"127.0.0.1:{broker.port}",
              "--fleet", FLEET, "--device", "d1", "sampling.max_tokens=64")
    assert out.returncode == 0 and "desired config version" in out.stdout, out.stderr
    assert re.search(r"New client connected from \S+ as edgeglm-operator-cli-\d+ .*u'edgeglm-operator'",
                     broker.log_text()), broker.log_text()


def test_a_flag_rollout_does_not_take_is_named(db):
    """`rollout ... --broker HOST:PORT` (every publishing command takes it; rollout only records) failed with
    "argument cancel: invalid choice: 'HOST:PORT'"."""
    out = cli("rollout", "--db", str(db), "--bundle", "b", "--group", FLEET, "--canary", "10", "--broker", "127.0.0.1:1")
    assert out.returncode == 2 and "unrecognized arguments: --broker" in out.stderr and "invalid choice" not in out.stderr
    out = cli("rollout", "--db", str(db), "stop", "3")
    assert out.returncode == 2 and "rollout stop 3: not understood" in out.stderr, out.stderr


def test_config_set_key_null_drops_one_setting_of_the_fleets_layer(mosquitto, db):
    """A setting a box refused (cache.max_mb above its own) stayed in everything `config set` published after it, so
    every later config was refused too; only --replace (dropping everything) got rid of it."""
    broker = ("--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", FLEET, "--device", "d1")
    assert cli("config", "set", *broker, "cache.max_mb=1000", "sampling.top_k=3").returncode == 0
    out = cli("config", "set", *broker, "cache.max_mb=null", "sampling.max_tokens=64")
    assert out.returncode == 0, out.stderr
    assert 'with what was set before: {"sampling": {"top_k": 3, "max_tokens": 64}}' in out.stdout, out.stdout
    published = json.loads(retained(mosquitto.port, desired_topic(FLEET, "d1"), expect=1)[0])
    assert published["settings"] == {"sampling": {"top_k": 3, "max_tokens": 64}}


def test_a_ca_file_that_is_missing_or_no_certificate_is_one_line(db, tmp_path):
    """`[mqtt.tls] ca_file` pointing at nothing, or at a file that holds no CA certificate (a signing key's public
    half given by mistake), ended every command that connects in paho's FileNotFoundError / SSLError traceback."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = tmp_path / "signing.pub"
    public.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for ca, why in [(tmp_path / "nope.pem", "No such file or directory"),
                    (public, "X509: NO_CERTIFICATE_OR_CRL_FOUND")]:
        config = tmp_path / "fleet.toml"
        config.write_text(f'[mqtt]\nport = 1\n[mqtt.tls]\nca_file = "{ca}"\n')
        for command in (["config", "set", "--fleet", FLEET, "--device", "d1", "--force", "sampling.top_k=3"],
                        ["serve"]):
            refused(cli(*command, "--config", str(config), "--db", str(db)),
                    f"mqtt.tls.ca_file = {ca}: cannot be used as the broker's CA certificate ({why})")


def test_a_bad_fleet_config_names_each_setting_its_value_and_source_in_plain_words(tmp_path, monkeypatch):
    """`fleet.toml` problems read "mqtt.prot: Extra inputs are not permitted", "mqtt.port: Input should be a valid
    integer, unable to parse string as an integer": no value, no source, no list of what is allowed."""
    config = tmp_path / "fleet.toml"
    config.write_text('[broker]\nx = 1\n[mqtt]\nport = "abc"\nprot = 3\n[database]\nretention_s = -1\n')
    out = cli("status", "--config", str(config), "--db", str(tmp_path / "fleet.db"))
    refused(out, f"[database] retention_s = -1 (from config file {config}) is too small; must be above 0",
            f"[mqtt] port = 'abc' (from config file {config}) is invalid: must be an integer",
            f"[mqtt] prot (from config file {config}) is not a setting; allowed in [mqtt]: host, port,",
            f"broker (from config file {config}) is not a setting; allowed at the top level: log_level, fleet,")
    assert "Input should" not in out.stderr and "Extra inputs" not in out.stderr
    monkeypatch.setenv("EDGEGLM_MQTT__PORT", "99999")
    refused(cli("status", "--db", str(tmp_path / "fleet.db")),
            "[mqtt] port = '99999' (from environment variable EDGEGLM_MQTT__PORT) is too large; must be at most 65535")


# --- the broker cannot be reached or refuses ------------------------------------------------------

def test_a_broker_that_cannot_be_reached_or_refuses_is_said_at_once_with_the_reason(tmp_path, make_mosquitto):
    """`fleet serve` and the operator commands waited 10 s, then said only "no connection ... with its
    subscriptions acknowledged", hid ECONNREFUSED or the broker's refusal, and left fleet.db-wal/-shm behind."""
    import time

    from broker import free_port

    work = tmp_path / "w"
    work.mkdir()
    db = work / "fleet.db"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve", "--broker", f"127.0.0.1:{free_port()}",
                          "--db", str(db), "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and time.monotonic() - start < 8, out.stderr
    assert re.search(r"cannot connect to the broker 127\.0\.0\.1:\d+: Connection refused", out.stderr), out.stderr
    assert sorted(p.name for p in work.iterdir()) == ["fleet.db"]  # no -wal/-shm left open

    broker = make_mosquitto(users={"ops": "right"})
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[mqtt]\nusername = "ops"\npassword = "wrong"\nport = {broker.port}\n')
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "config", "set", "--config", str(conf),
                          "--db", str(db), "--fleet", "f1", "--device", "d1", "--force", "sampling.max_tokens=64"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and time.monotonic() - start < 8, out.stderr
    assert f"the broker 127.0.0.1:{broker.port} refused the connection: " in out.stderr
    assert "check the MQTT username and password ([mqtt] username and password or password_file of the fleet " \
           "config)" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # said once (the log warning was a second line)


def test_a_rollout_or_offer_names_the_devices_that_reported_too_little_disk_for_the_bundle(db, signed_bundles,
                                                                                           mosquitto):
    """Their health snapshot says how much the state directory has free: an update that would fail with "disk
    full" is said when it is started, not found out device by device later. A warning: nothing is refused."""
    import time

    v2 = signed_bundles["v2"]
    need = sum(f.stat().st_size for f in v2.rglob("*") if f.is_file() and f.name not in ("manifest.json",
                                                                                        "manifest.sig"))
    store = Store(db)
    now = time.time()
    store.put_health([(FLEET, {"device": "d1", "ts": now, "disk_free_bytes": need // 2}),
                      (FLEET, {"device": "d2", "ts": now, "disk_free_bytes": need * 10}),
                      ("plant8", {"device": "e1", "ts": now, "disk_free_bytes": 1})])
    store.close()
    out = cli("rollout", "--db", str(db), "--canary", "50", "--bundle", str(v2), "--group", FLEET)
    assert out.returncode == 0 and "rollout 1:" in out.stdout, out.stderr
    warned = [line for line in out.stderr.splitlines() if "free for updates" in line]
    assert len(warned) == 1 and f"device {FLEET}/d1 reported" in warned[0], out.stderr  # not d2, not plant8's e1
    assert "its update will fail (disk full) unless space is freed on it" in warned[0]
    out = cli("offer", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "plant8",
              "--device", "e1", "--bundle", str(v2))
    assert out.returncode == 0 and "offered" in out.stdout, out.stderr
    assert "device plant8/e1 reported 1B free for updates" in out.stderr


def test_a_rollout_or_offer_names_the_devices_whose_agent_is_older_than_the_bundle_needs(db, signed_bundles,
                                                                                          mosquitto):
    """An agent older than the bundle's min_agent_version refuses the offer ("bundle needs agent >= ..."): a
    rollout whose canary it is halts. Said when it is started, from the agent version of each device's state."""
    v2 = signed_bundles["v2"]
    needs = json.loads((v2 / "manifest.json").read_text())["min_agent_version"]
    store = Store(db)
    for fleet, device, version in ((FLEET, "d1", "0.1.0"), (FLEET, "d2", needs), ("plant8", "e1", "0.1.0-rc1")):
        store.upsert_state(fleet, {"device": device, "online": True, "model": None, "agent_version": version})
    store.close()
    out = cli("rollout", "--db", str(db), "--canary", "50", "--bundle", str(v2), "--group", FLEET)
    assert out.returncode == 0 and "rollout 1:" in out.stdout, out.stderr
    warned = [line for line in out.stderr.splitlines() if "run an agent older than" in line]
    assert warned == [f"edgeglm fleet: warning: 1 device(s) run an agent older than {needs}, which the bundle needs "
                      f"(min_agent_version): ['{FLEET}/d1 (0.1.0)']; they refuse the update: upgrade their agent "
                      "first"], out.stderr  # not d2, not plant8's e1
    out = cli("offer", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", "plant8",
              "--device", "e1", "--bundle", str(v2))
    assert out.returncode == 0 and "offered" in out.stdout, out.stderr
    assert "['plant8/e1 (0.1.0-rc1)']; they refuse the update" in out.stderr


def test_a_bundle_exported_again_at_a_version_already_offered_is_refused(db, signed_bundles, mosquitto):
    """Re-exported in place at the same version (what the chunk server's error used to advise, "offer the bundle
    there again"), a bundle was rolled out over the devices that took the first build: they report that version and
    were skipped as "already run", and the fleet ran two builds under one version with nothing to tell them apart."""
    v2 = signed_bundles["v2"]
    manifest = json.loads((v2 / "manifest.json").read_text())
    name, version = manifest["name"], manifest["version"]
    store = Store(db)
    store.add_offer(f"{name}-{version}-1700000000000", v2, version, FLEET, "d1", "ab" * 32)  # the first build
    store.add_offer(f"other-{version}-1700000000001", v2, version, FLEET, "d2", "cd" * 32)  # another model's
    store.close()
    out = cli("rollout", "--db", str(db), "--canary", "50", "--bundle", str(v2), "--group", FLEET)
    refused(out, f"--bundle {v2} is {name} {version}, but another build of {name} {version} was offered before "
                 f"(update {name}-{version}-1700000000000, manifest sha256 abababababab...", "export this build at a "
                 "new version", "nothing was recorded (--force offers it anyway)")
    out = cli("offer", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--fleet", FLEET, "--device",
              "d1", "--bundle", str(v2))
    refused(out, "another build of", "nothing was offered")
    out = cli("rollout", "--db", str(db), "--canary", "50", "--bundle", str(v2), "--group", FLEET, "--force")
    assert out.returncode == 0 and "rollout 1:" in out.stdout, out.stderr
    assert f"edgeglm fleet: warning: --bundle {v2} is {name} {version}, but another build" in out.stderr


def test_config_set_of_a_newer_setting_names_the_devices_that_may_not_know_it(db, mosquitto):
    """An agent from before telemetry.health_interval_s refuses a whole desired config that names it, and every
    later `config set` to that device merges the key in again: the devices that never sent a health snapshot are
    named when it is set, and as long as it stays in their desired config."""
    import time

    store = Store(db)
    store.put_health([(FLEET, {"device": "d1", "ts": time.time()})])
    store.close()
    base = ("config", "set", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--group", FLEET)
    out = cli(*base, "telemetry.health_interval_s=0")
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "newer than some agents" in line]
    assert len(warned) == 1 and f"{FLEET}/d2 never sent a health snapshot" in warned[0], out.stderr
    assert f"{FLEET}/d1" not in warned[0] and "config set telemetry.health_interval_s=null" in warned[0]
    out = cli(*base, "sampling.max_tokens=5")  # the key is still in what is published: said again
    assert out.returncode == 0 and "newer than some agents" in out.stderr, out.stderr
    out = cli(*base, "telemetry.health_interval_s=null")
    assert out.returncode == 0 and "newer than some agents" not in out.stderr, out.stderr
    assert "health_interval_s" not in out.stdout.split("with what was set before:")[1]


# --- two controllers on one broker -------------------------------------------------------------

def test_a_second_controller_never_takes_the_running_ones_broker_session(mosquitto, tmp_path):
    """A second `fleet serve` whose HTTP port was taken connected to the broker first, under the same client id,
    and so knocked the running controller off before failing; per-fleet controllers (`--fleet`) shared the one
    default client id and took each other's session over every second."""
    from broker import free_port
    from waiting import until

    port = free_port()
    broker = ("--broker", f"127.0.0.1:{mosquitto.port}")

    def serve(*args):
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", *broker, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [proc.stdout.readline()]
        while "fleet controller" not in lines[-1] and lines[-1]:
            lines.append(proc.stdout.readline())
        assert "fleet controller" in lines[-1], lines
        return proc

    def stop(proc) -> str:
        proc.terminate()
        return proc.communicate(timeout=60)[0]

    first = serve("--fleet", FLEET, "--db", str(tmp_path / "a.db"), "--http-port", str(port))
    other = None
    try:
        refused(cli("serve", *broker, "--fleet", FLEET, "--db", str(tmp_path / "b.db"), "--http-port", str(port)),
                f"cannot serve HTTP on 127.0.0.1:{port}", "the controller did not start")
        other = serve("--fleet", "plant8", "--db", str(tmp_path / "c.db"), "--http-port", "0")
        # the broker logs a session taken over when the second client connects: by its own connect line
        until(lambda: " as edgeglm-controller-plant8 " in mosquitto.log_text())
        assert "already connected" not in mosquitto.log_text(), mosquitto.log_text()
    finally:
        logs = [stop(p) for p in (first, other) if p is not None]
    assert all("lost the broker" not in log for log in logs), logs


def test_a_db_that_is_a_directory_is_said_so_by_every_command(tmp_path):
    """`status`, `group` and `offer` said "no fleet database; is `fleet serve --db DIR` running?", which it cannot
    be: `fleet serve` itself says the path is a directory."""
    for args in (("status",), ("group", "list"), ("rollout", "cancel", "1")):
        out = cli(*args, "--db", str(tmp_path))
        assert out.returncode == 2 and f"fleet database {tmp_path} (--db or database.path) cannot be opened: it is " \
            f"a directory; give the database file, e.g. --db {tmp_path / 'fleet.db'}" in out.stderr, out.stderr


def test_status_refuses_a_fleet_id_no_device_can_have(db):
    """`fleet status --fleet bad/id` printed an empty table and exited 0."""
    refused(cli("status", "--db", str(db), "--fleet", "bad/id"), "fleet id 'bad/id' cannot be an MQTT topic level")


def test_python_m_fleet_cli_is_edgeglm_fleet(db):
    """`python -m fleet.cli status` did nothing and exited 0 (the module had no main)."""
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "status", "--db", str(db)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "device(s)" in out.stdout, out.stderr


def test_serve_without_fleet_connects_as_the_plain_controller_id():
    """`fleet serve` without --fleet serves every fleet ("+") and connected as `edgeglm-controller-+`: a client id
    with "+" that brokers may refuse, and that ACL patterns keyed on the client id never match."""
    from fleet.cli import _serve_client_id
    from fleet.config import MqttSection

    assert _serve_client_id(MqttSection(), "+") == _serve_client_id(MqttSection(), None) == "edgeglm-controller"
    assert _serve_client_id(MqttSection(), FLEET) == f"edgeglm-controller-{FLEET}"


def test_a_mistyped_device_in_a_big_fleet_names_the_closest_ids_not_all_of_them(tmp_path):
    """`config set --device nosuch` printed every id of the fleet on one line (80 KB at 10,000 devices)."""
    path = tmp_path / "fleet.db"
    store = Store(path)
    for i in range(200):
        store.upsert_state(FLEET, {"device": f"cam-{i:03d}", "online": True, "model": None})
    store.close()
    out = cli("config", "set", "--db", str(path), "--broker", "127.0.0.1:1", "--fleet", FLEET, "--device", "cam-1000",
              "sampling.top_k=3")
    refused(out, "has never reported to the registry", "200 registered; closest: cam-100", "nothing was published")
    assert "cam-199" not in out.stderr and len(out.stderr) < 600, out.stderr


def test_a_locked_database_says_so_and_status_reads_a_database_it_may_not_write(db, tmp_path):
    """Another process holding the database's lock got "cannot be opened: database is locked ... Give a writable
    file path" (wrong advice); `fleet status` by a user who may only read the file failed with "attempt to write a
    readonly database" (opening it always set WAL and created the schema)."""
    import os
    import sqlite3

    from fleet.store import StoreError
    holder = sqlite3.connect(str(db), isolation_level=None, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        import fleet.store as fs
        old, fs.BUSY_TIMEOUT_MS = fs.BUSY_TIMEOUT_MS, 200
        try:
            with pytest.raises(StoreError) as err:
                Store(db)
        finally:
            fs.BUSY_TIMEOUT_MS = old
        assert "is locked by another process" in str(err.value) and "Try again" in str(err.value)
        assert "Give a writable file path" not in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    old_db = tmp_path / "old.db"  # made by an older controller (no health table), read by who may not update it
    shutil.copy(db, old_db)
    raw = sqlite3.connect(str(old_db))
    raw.execute("DROP TABLE health")
    raw.commit()
    raw.close()
    real_access = os.access
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda path, mode, *a, **k: not mode & os.W_OK and real_access(path, mode, *a, **k))
        with pytest.raises(StoreError) as err:
            Store(old_db, read_only=True)
    assert f"fleet database {old_db} was made by an older controller (health missing)" in str(err.value)
    assert "run `edgeglm fleet serve`" in str(err.value)
    if os.geteuid() != 0:
        pytest.skip("the read-only half needs root (to run `fleet status` as nobody)")
    import tempfile
    from pathlib import Path
    ro = Path(tempfile.mkdtemp(prefix="edgeglm-ro-"))  # /tmp: reachable for an unprivileged user
    try:
        shutil.copy(db, ro / "fleet.db")
        (ro / "fleet.db").chmod(0o444)
        ro.chmod(0o555)
        import pwd

        from fleet.controller import format_status
        nobody = pwd.getpwnam("nobody")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reads as nobody, through what `fleet status` runs (the checkout may be root's only)
            try:
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                text = format_status(Store(ro / "fleet.db", read_only=True), FLEET, 3600.0)
            except BaseException as exc:
                text = f"FAILED {type(exc).__name__}: {exc}"
            os.write(write, text.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            text = pipe.read()
        os.waitpid(pid, 0)
        assert "d1" in text and "d2" in text and "FAILED" not in text, text
        assert sorted(p.name for p in ro.iterdir()) == ["fleet.db"]  # nothing written beside it
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)


def test_broker_takes_the_demos_mqtt_url_and_serve_says_it_did_not_start(tmp_path):
    """`edgeglm demo --broker` takes mqtt://HOST:PORT; `fleet` refused it as "[mqtt] host = 'mqtt://...'", and
    `fleet serve` with no broker said "nothing was published: is the broker that `fleet serve` uses up?"."""
    from broker import free_port

    port = free_port()  # nothing listens there
    out = cli("serve", "--broker", f"mqtt://127.0.0.1:{port}", "--db", str(tmp_path / "f.db"), "--http-port", "0")
    refused(out, f"127.0.0.1:{port}", "the controller did not start: is the broker up?")
    assert "nothing was published" not in out.stderr
    out = cli("offer", "--broker", f"mqtt://127.0.0.1:{port}", "--db", str(tmp_path / "f.db"), "--bundle",
              str(tmp_path), "--device", "d1", "--fleet", FLEET)
    assert out.returncode == 2 and "[mqtt] host" not in out.stderr, out.stderr
    refused(cli("serve", "--broker", f"mqtts://127.0.0.1:{port}", "--db", str(tmp_path / "f.db")),
            "give HOST:PORT (or mqtt://HOST:PORT)", "[mqtt.tls] ca_file")


def test_config_set_telemetry_histograms_names_the_devices_that_never_sent_them(db, mosquitto):
    """An agent from before latency histograms refuses a desired config with telemetry.histograms: the devices
    that sent none are named."""
    from fleet.store import latency_row

    store = Store(db)
    store.add_latency_many([latency_row(FLEET, {"device": "d1", "window_end": 1.0, "model_version": "1.0.0",
                                                "ttft_ms": {"bins": [[5, 1]]}, "per_token_ms": None})])
    store.close()
    out = cli("config", "set", "--db", str(db), "--broker", f"127.0.0.1:{mosquitto.port}", "--group", FLEET,
              "telemetry.histograms=false")
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "telemetry.histograms is newer than some agents" in line]
    assert len(warned) == 1 and f"{FLEET}/d2 never sent latency histograms (in the last day)" in warned[0], out.stderr
    assert f"{FLEET}/d1" not in warned[0] and "config set telemetry.histograms=null" in warned[0]
