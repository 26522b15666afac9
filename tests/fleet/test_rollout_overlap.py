"""One active rollout per device while group membership changes, and rollout records that concurrent writers
do not lose: a device in the targets of two active rollouts, the cancel / driver race, the create transaction,
and the simulator refusing the offers the real agent refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

import fleet.rollout as R
from agent.mqtt import MqttSettings
from fleet.rollout import RolloutDriver, RolloutError, cancel_rollout, create_rollout, load_rollouts
from fleet.store import Store
from waiting import until

FLEET = "F"


def cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", *args], capture_output=True, text=True)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def bundle(tmp_path, name: str, version: str):
    (tmp_path / name).mkdir()
    (tmp_path / name / "manifest.json").write_text(json.dumps({"version": version}))
    return tmp_path / name


class Recorder:
    def __init__(self, on_offer=None):
        self.offers: list[tuple[str, str]] = []  # (device, bundle name)
        self.on_offer = on_offer

    def offer(self, fleet, device, bundle, **kw) -> str:
        self.offers.append((device, bundle.name))
        if self.on_offer:
            self.on_offer()
        return f"{bundle.name}-{device}"


@pytest.fixture
def two_rings(tmp_path):
    """Rollout 1 (b2 -> ring1: a1, a2) and rollout 2 (b3 -> ring2: b1, b2), both active."""
    store = Store(tmp_path / "fleet.db")
    for d in ("a1", "a2", "b1", "b2"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": None})
    store.group_add("ring1", FLEET, ["a1", "a2"])
    store.group_add("ring2", FLEET, ["b1", "b2"])
    r1 = create_rollout(store, bundle(tmp_path, "b2", "2.0.0"), FLEET, 50, group="ring1", min_requests=1)
    r2 = create_rollout(store, bundle(tmp_path, "b3", "3.0.0"), FLEET, 50, group="ring2", min_requests=1)
    yield store, r1, r2
    store.close()


def test_a_device_in_two_active_rollouts_targets_is_offered_by_the_older_only(two_rings):
    """a2 put in ring2 too while both ran (a `group add` before the check, or --force): rollout 2 picked it as a
    canary and rollout 1 offered it its rest: two bundles on one retained offer topic. The older rollout keeps
    it; the newer leaves it out and says so."""
    store, r1, r2 = two_rings
    store.group_add("ring2", FLEET, ["a2"])
    rec = Recorder()
    driver = RolloutDriver(store, rec)
    now = time.time()
    driver.tick(now)
    by_id = {r.id: r for r in load_rollouts(store)}
    assert by_id[r1].data["canaries"] == ["a1"] and by_id[r2].data["canaries"] == ["b1"], rec.offers
    assert "['a2'] left out: also targeted by active rollout 1 (b2 -> group ring1 of F), which may offer it " \
        "another bundle" in by_id[r2].data["report"][-1], by_id[r2].data["report"]
    for d in ("a1", "b1"):  # the canaries commit, and rollout 1's gate passes: it picks its rest
        store.add_ota_status(FLEET, d, {"update_id": by_id[r1 if d == "a1" else r2].data["offers"][d],
                                        "ts": now, "result": "committed"})
    store._exec("UPDATE rollouts SET phase='rest' WHERE id=?", (r1,))
    store._exec("UPDATE rollouts SET phase='rest' WHERE id=?", (r2,))
    driver.tick(now + 1)
    by_id = {r.id: r for r in load_rollouts(store)}
    assert by_id[r1].phase == "rest_wait" and by_id[r1].data["rest"] == ["a2"], by_id[r1].data["report"]
    assert by_id[r2].phase == "rest_wait" and by_id[r2].data["rest"] == ["b2"], by_id[r2].data["report"]
    assert [o for o in rec.offers if o[0] == "a2"] == [("a2", "b2")]  # by the older rollout only


def test_two_rollouts_whose_targets_hold_each_others_devices_do_not_wait_on_each_other(two_rings):
    """ring1 = {a1}, ring2 = {b1}, then b1 forced into ring1 and a1 into ring2: each rollout's every device was
    one the other may offer, and both waited for the other to end, for ever. The older one goes on."""
    store, r1, r2 = two_rings
    store.group_remove("ring1", ["a2"], FLEET)
    store.group_remove("ring2", ["b2"], FLEET)
    store.group_add("ring1", FLEET, ["b1"])
    store.group_add("ring2", FLEET, ["a1"])
    rec = Recorder()
    RolloutDriver(store, rec).tick()
    by_id = {r.id: r for r in load_rollouts(store)}
    assert by_id[r1].phase == "canary_wait" and by_id[r1].data["canaries"] == ["a1"], by_id[r1].data["report"]
    assert by_id[r2].phase == "canary" and by_id[r2].data["waiting_others"] == ["a1", "b1"]
    assert "it starts when they end (or cancel one" in by_id[r2].data["report"][-1]


def test_a_rollout_whose_other_devices_run_its_version_waits_for_a_left_out_one_instead_of_ending(two_rings):
    """Every device of ring1 but a2 already ran 2.0.0 and a2 was left out (the older rollout 1 may offer it its
    own bundle): rollout 2 ended "done: every online device already runs" while a2 never got it."""
    store, r1, r2 = two_rings
    cancel_rollout(store, r1)
    r1 = create_rollout(store, bundle(store.path.parent, "b4", "4.0.0"), FLEET, 50, group="ring1", min_requests=1)
    r2_rollout = next(r for r in load_rollouts(store) if r.id == r2)
    for d in ("b1", "b2"):  # ring2's own devices already run rollout 2's version
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "3.0.0"}})
    store.group_add("ring2", FLEET, ["a2"])  # (the store's own add: no check)
    store._exec("UPDATE rollouts SET id=? WHERE id=?", (0, r1))  # rollout 1 is older than rollout 2
    RolloutDriver(store, Recorder()).tick()
    r = next(r for r in load_rollouts(store) if r.id == r2_rollout.id)
    assert r.phase == "canary" and r.data["waiting_others"] == ["a2"], r.data["report"]


def test_a_device_moved_out_of_a_rollouts_group_may_join_another_rollouts_group(two_rings, tmp_path):
    """Rollout 1 picked a2 for its rest with its canaries; a2 then left ring1 (which its rest then skips): moving
    it to ring2 was refused as "two active rollouts would offer different bundles"."""
    store, r1, r2 = two_rings
    RolloutDriver(store, Recorder()).tick()
    store.group_remove("ring1", ["a2"], FLEET)
    out = cli("group", "add", "ring2", "--fleet", FLEET, "a2", "--db", str(tmp_path / "fleet.db"))
    assert out.returncode == 0, out.stderr


def test_group_add_refuses_a_device_two_active_rollouts_would_target(two_rings, tmp_path):
    store, r1, r2 = two_rings
    RolloutDriver(store, Recorder()).tick()  # rollout 1 offered a1, and may still offer a2 (its rest)
    db = str(tmp_path / "fleet.db")
    for device in ("a1", "a2"):
        out = cli("group", "add", "ring2", "--fleet", FLEET, device, "--db", db)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (out.stdout, out.stderr)
        for phrase in (f"group ring2: adding {device} of fleet F would have two active rollouts target it",
                       "rollout 1 (b2 -> group ring1 of F) and rollout 2 (b3 -> group ring2 of F)",
                       "nothing was added", "edgeglm fleet rollout cancel", "--force"):
            assert phrase in out.stderr, (phrase, out.stderr)
    assert {d for f, d in store.groups()["ring2"]} == {"b1", "b2"}  # nothing was added
    out = cli("group", "add", "ring3", "--fleet", FLEET, "a2", "--db", db)  # no active rollout to ring3: fine
    assert out.returncode == 0, out.stderr
    out = cli("group", "add", "ring2", "--fleet", FLEET, "a2", "--force", "--db", db)
    assert out.returncode == 0 and "a2 is targeted by active rollouts 1 and 2 (--force): the older, rollout 1, " \
        "offers it" in out.stderr, out.stderr
    cancel_rollout(store, r1)  # one ended: the other may take it
    assert cli("group", "add", "ring2", "--fleet", FLEET, "a1", "--db", db).returncode == 0


def test_a_driver_write_between_the_cancels_read_and_its_write_is_not_lost(tmp_path):
    """The cancel read the data and then `updated` in two SELECTs: an offer the driver recorded in between was
    overwritten (gone from the database, and the cancel said no device had been offered it)."""
    store = Store(tmp_path / "fleet.db")
    rid = create_rollout(store, bundle(tmp_path, "b2", "2.0.0"), FLEET, 50, min_requests=1)
    driver = RolloutDriver(store, None)
    real = store._exec
    landed = []

    class Rows:
        def __init__(self, rows):
            self.rows = rows

        def fetchone(self):
            return self.rows[0] if self.rows else None

        def fetchall(self):
            return self.rows

        def __iter__(self):
            return iter(self.rows)

    def exec_(sql, args=()):
        cur = real(sql, args)
        if not landed and sql.startswith("SELECT") and "FROM rollouts" in sql and "data" in sql:
            rows = cur.fetchall()
            landed.append(True)  # fleet serve records the offer it just published to dev-7 (RolloutDriver._offer)
            r = next(x for x in load_rollouts(store) if x.id == rid)
            r.data.setdefault("offers", {})["dev-7"] = "b2-dev-7"
            r.data["canaries"] = ["dev-7"]
            time.sleep(0.002)  # (a later `updated`)
            driver._keep(r)
            return Rows(rows)
        return cur

    store._exec = exec_
    r, was = cancel_rollout(store, rid)
    store._exec = real
    assert landed and was == "canary"
    assert r.data["offers"] == {"dev-7": "b2-dev-7"}  # what the cancel command prints
    stored = json.loads(real("SELECT data FROM rollouts WHERE id=?", (rid,)).fetchone()[0])
    assert stored["offers"] == {"dev-7": "b2-dev-7"} and "cancelled by the operator" in stored["report"][-1]
    store.close()


def test_an_offer_that_went_out_as_the_cancel_landed_is_recorded(tmp_path):
    store = Store(tmp_path / "fleet.db")
    for d in ("d1", "d2"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": None})
    rid = create_rollout(store, bundle(tmp_path, "b2", "2.0.0"), FLEET, 50, min_requests=1)
    rec = Recorder(on_offer=lambda: cancel_rollout(store, rid))  # published, then the cancel lands
    RolloutDriver(store, rec).tick()
    [r] = load_rollouts(store)
    assert r.phase == "cancelled" and rec.offers == [("d1", "b2")]
    assert r.data["offers"] == {"d1": "b2-d1"}, r.data
    assert "offered to d1 (b2-d1) as the cancel landed" in r.data["report"][-1], r.data["report"]
    store.close()


def test_two_rollouts_created_at_once_to_one_target_one_is_refused(tmp_path, monkeypatch):
    """The overlap check and the INSERT were two statements: a second `fleet rollout` between them passed its
    check too, and two active rollouts offered the same devices."""
    a, b = Store(tmp_path / "fleet.db"), Store(tmp_path / "fleet.db")
    b2 = bundle(tmp_path, "b2", "2.0.0")
    create_rollout(a, b2, "other", 50)  # the table exists
    check = R.active_rollout
    other: dict = {}

    def second_create():
        try:
            other["id"] = create_rollout(b, b2, FLEET, 50)
        except RolloutError as exc:
            other["error"] = str(exc)

    def active_rollout(store, fleet, group=None):
        found = check(store, fleet, group)
        if store is a:  # the first command checked: the second one runs now
            t = threading.Thread(target=second_create)
            t.start()
            t.join(1.0)  # it waits for the first's transaction (BEGIN IMMEDIATE): not done within a second
            other["thread"] = t
        return found

    monkeypatch.setattr(R, "active_rollout", active_rollout)
    first = create_rollout(a, b2, FLEET, 50)
    other["thread"].join(10)
    assert "is still active" in other.get("error", ""), other
    assert [r.id for r in load_rollouts(a, active_only=True) if r.fleet == FLEET] == [first]
    a.close()
    b.close()


def test_the_simulator_refuses_downgrades_and_rollbacks_for_another_version(mosquitto, tmp_path, signed_bundles):
    """It committed any offer; the real agent refuses a plain offer not newer than what it serves and a rollback
    whose statement replaces another version (ota/update.py)."""
    from fleet.controller import ControllerSettings, FleetController
    from fleet.rollout import offer_rollback
    from fleet.simulator import SimDevice

    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "c.db", fleet=FLEET)).start()
    dev = SimDevice(MqttSettings(enabled=True, port=mosquitto.port), FLEET, "s1", version="1.1.0").start()
    key = signed_bundles["root"] / "keys" / "fleet.key"
    try:
        until(lambda: ctl.store.devices(FLEET))

        def result(uid):
            until(lambda: (ctl.store.last_result(FLEET, "s1", uid) or {}).get("result"))
            return ctl.store.last_result(FLEET, "s1", uid)

        res = result(ctl.offer(FLEET, "s1", signed_bundles["v1"]))  # 1.0.0 over 1.1.0
        assert res["result"] == "failed" and "not newer than the active 1.1.0" in res["reason"], res
        uid = offer_rollback(ctl, FLEET, {"s1": "9.9.9"}, signed_bundles["v1"], key)["s1"]
        res = result(uid)
        assert res["result"] == "failed" and "replaces version 9.9.9, this device serves 1.1.0" in res["reason"]
        assert dev.version == "1.1.0"
        uid = offer_rollback(ctl, FLEET, {"s1": "1.1.0"}, signed_bundles["v1"], key)["s1"]
        assert result(uid)["result"] == "committed" and dev.version == "1.0.0"
        res = result(ctl.offer(FLEET, "s1", signed_bundles["v2"]))  # an upgrade: taken
        assert res["result"] == "committed" and dev.version == "1.1.0"
    finally:
        dev.stop()
        ctl.stop()


# --- offers recorded one row each (a rollout of 10,000 rewrote its whole data after every offer) -----------------

@pytest.fixture
def big_fleet(tmp_path):
    store = Store(tmp_path / "fleet.db")
    devices = [f"d{i:04d}" for i in range(300)]
    for d in devices:
        store.upsert_state(FLEET, {"device": d, "online": True, "model": None})
    rid = create_rollout(store, bundle(tmp_path, "b2", "2.0.0"), FLEET, 100, min_requests=1)
    yield store, rid, devices
    store.close()


def _data_writes(store, monkeypatch) -> list[str]:
    writes, real = [], store._exec

    def counting(sql, params=()):
        if sql.startswith("UPDATE rollouts SET") and "data=" in sql:
            writes.append(sql)
        return real(sql, params)
    monkeypatch.setattr(store, "_exec", counting)
    return writes


def test_offers_are_recorded_one_row_each_not_by_rewriting_the_rollout(big_fleet, monkeypatch):
    """Each offer rewrote the rollout's data, which lists every offer: 1 MB and a WAL write per offer at 10,000
    devices (110 s of store lock, ~30 GB written; benchmarks/rollout_scale.py). Now one row per offer, the data
    taking them in once a second and at the end."""
    store, rid, devices = big_fleet
    monkeypatch.setattr(R, "KEEP_EVERY_S", 3600.0)
    writes = _data_writes(store, monkeypatch)
    r = next(x for x in load_rollouts(store) if x.id == rid)
    rec = Recorder()
    assert RolloutDriver(store, rec)._offer(r, devices, r.bundle)
    assert len(rec.offers) == 300 and len(writes) == 1, len(writes)  # the end's, not one per offer
    assert store._exec("SELECT COUNT(*) FROM rollout_offers WHERE rollout_id=?", (rid,)).fetchone()[0] == 300
    saved = json.loads(store._exec("SELECT data FROM rollouts WHERE id=?", (rid,)).fetchone()[0])
    assert saved["offers"] == {d: f"b2-{d}" for d in devices}


def test_offers_cut_off_midway_are_known_to_the_next_tick(big_fleet, monkeypatch):
    """A tick that raises (the broker lost) after 120 offers: the data was never saved meanwhile, yet the next
    tick offers only the 180 left, not the 120 again (their offers came from the rows)."""
    store, rid, devices = big_fleet
    monkeypatch.setattr(R, "KEEP_EVERY_S", 3600.0)
    r = next(x for x in load_rollouts(store) if x.id == rid)

    def broker_lost():
        if len(rec.offers) == 120:
            raise ConnectionError("the broker went away")
    rec = Recorder(on_offer=broker_lost)
    with pytest.raises(ConnectionError):
        RolloutDriver(store, rec)._offer(r, devices, r.bundle)
    r = next(x for x in load_rollouts(store) if x.id == rid)
    assert len(r.data["offers"]) == 119  # (the 120th raised before its row)
    again = Recorder()
    assert RolloutDriver(store, again)._offer(r, devices, r.bundle)
    assert [d for d, _ in again.offers] == devices[119:]


def test_a_stop_while_offering_keeps_what_was_offered_and_the_next_start_goes_on(big_fleet):
    """SIGTERM to `fleet serve` during the offers of a large rollout waited for all of them (minutes at 10,000)."""
    store, rid, devices = big_fleet
    stopping = threading.Event()
    rec = Recorder(on_offer=lambda: stopping.set() if len(rec.offers) == 50 else None)
    r = next(x for x in load_rollouts(store) if x.id == rid)
    assert not RolloutDriver(store, rec, stopping=stopping)._offer(r, devices, r.bundle)
    assert len(rec.offers) == 50
    saved = json.loads(store._exec("SELECT data FROM rollouts WHERE id=?", (rid,)).fetchone()[0])
    assert len(saved["offers"]) == 50
    again = Recorder()
    r = next(x for x in load_rollouts(store) if x.id == rid)
    assert RolloutDriver(store, again)._offer(r, devices, r.bundle) and len(again.offers) == 250


def test_an_ended_rollout_keeps_its_offers_in_its_data_and_leaves_no_rows(big_fleet, monkeypatch):
    store, rid, devices = big_fleet
    monkeypatch.setattr(R, "KEEP_EVERY_S", 3600.0)
    r = next(x for x in load_rollouts(store) if x.id == rid)
    driver = RolloutDriver(store, Recorder())
    assert driver._offer(r, devices, r.bundle)
    r = next(x for x in load_rollouts(store) if x.id == rid)
    driver._save(r, "done", "finished")
    assert store._exec("SELECT COUNT(*) FROM rollout_offers").fetchone()[0] == 0
    assert len(next(x for x in load_rollouts(store) if x.id == rid).data["offers"]) == 300
