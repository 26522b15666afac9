"""The controller's SQLite store: each telemetry report stored once, databases of older controllers
brought up to the schema, and the configured retention."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from agent.cli import build_parser
from fleet.cli import _settings
from fleet.controller import FleetController
from fleet.store import Store, telemetry_row

FLEET = "plant7"


def report(device: str, window_end: float, count: int = 1, p95: float = 2.0) -> dict:
    return {"device": device, "window_end": window_end, "count": count, "model_version": "1.0.0",
            "per_token_ms": {"p50": p95 / 2, "p95": p95}}


def rows(store: Store) -> int:
    return store._exec("SELECT COUNT(*) FROM telemetry").fetchone()[0]


def test_a_second_copy_of_a_report_is_dropped_and_counted(tmp_path):
    store = Store(tmp_path / "fleet.db")
    now = time.time()
    a, b = report("d1", now - 20, count=3), report("d1", now - 10, count=1, p95=6.0)
    store.add_telemetry_many([telemetry_row(FLEET, r) for r in (a, a, b)])
    store.add_telemetry_many([telemetry_row(FLEET, a)])
    store.add_telemetry_many([telemetry_row(FLEET, report("d2", now - 20))])  # another device, same window
    assert rows(store) == 3
    assert (store.counter("telemetry_reports"), store.counter("telemetry_duplicates")) == (3, 2)
    lat = store.latency(FLEET, "d1", now - 60)
    assert lat["requests"] == 4 and abs(lat["token_p95_ms"] - (2.0 * 3 + 6.0) / 4) < 1e-9
    store.close()


OLD_SCHEMA = """
CREATE TABLE telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model_version TEXT, window_end REAL NOT NULL, count INTEGER,
    ttft_p50 REAL, ttft_p95 REAL, token_p50 REAL, token_p95 REAL, tokens_per_s REAL, errors INTEGER);
CREATE INDEX telemetry_by_device ON telemetry (fleet, device, window_end);
"""


def test_a_database_of_an_older_controller_loses_its_duplicates_and_keeps_the_rest(tmp_path):
    path = tmp_path / "fleet.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    for end, count in ((100.0, 3), (100.0, 3), (200.0, 1), (100.0, 3)):  # what an older controller stored
        db.execute("INSERT INTO telemetry VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (FLEET, "d1", "1.0.0", end, count, None, None, 1.0, 2.0, None, 0))
    db.commit()
    db.close()
    store = Store(path)
    assert store._exec("SELECT window_end, count FROM telemetry ORDER BY window_end").fetchall() == \
        [(100.0, 3), (200.0, 1)]
    indexes = {row[1]: row[2] for row in store._exec("PRAGMA index_list(telemetry)")}
    assert indexes.get("telemetry_once") == 1 and "telemetry_by_device" not in indexes
    # no stored time: such rows count at their window end in every time range (status, gate, retention)
    assert store._exec("SELECT COUNT(*) FROM telemetry WHERE stored = window_end").fetchone()[0] == 2
    store.add_telemetry_many([telemetry_row(FLEET, report("d1", 200.0))])  # a late copy: dropped from now on
    assert rows(store) == 2 and store.counter("telemetry_duplicates") == 1
    store.close()
    Store(path).close()  # opening it again changes nothing


def test_offers_of_a_controller_older_than_offer_targets_are_served_to_the_devices_that_report_them(tmp_path):
    """An upgrade of the controller while an update it offered downloads (or waits, retained, for a box that is
    offline): the offers table had no targets then, and the new chunk server refused every chunk of those offers
    ("not offered to ... by this controller"): the update failed, and a rollout waiting on it halted."""
    path = tmp_path / "fleet.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA + """
CREATE TABLE offers (update_id TEXT PRIMARY KEY, bundle TEXT NOT NULL, version TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE ota_status (fleet TEXT NOT NULL, device TEXT NOT NULL, update_id TEXT, ts REAL NOT NULL, state TEXT,
    result TEXT, reason TEXT, body TEXT NOT NULL);""")
    db.execute("INSERT INTO offers VALUES ('old-1', '/b/1.2.0', '1.2.0', 100.0)")
    db.execute("INSERT INTO ota_status VALUES (?, 'box1', 'old-1', 100.0, 'downloading', NULL, NULL, '{}')", (FLEET,))
    db.commit()
    db.close()
    store = Store(path)
    assert store.offered_to("old-1", FLEET, "box1") == Path("/b/1.2.0")  # it reported a status for it
    assert store.offered_to("old-1", FLEET, "box2") is None  # not yet
    store.add_ota_status(FLEET, "box2", {"update_id": "old-1", "ts": 200.0, "state": "offered"})  # back online
    assert store.offered_to("old-1", FLEET, "box2") == Path("/b/1.2.0")
    # an offer made by this controller stays its targets' only, whatever another device reports
    store.add_offer("new-1", Path("/b/1.3.0"), "1.3.0", FLEET, "box1")
    store.add_ota_status(FLEET, "box3", {"update_id": "new-1", "ts": 300.0, "state": "offered"})
    assert store.offered_to("new-1", FLEET, "box3") is None and store.offered_to("new-1", FLEET, "box1")
    store.close()
    store = Store(path)  # opening it again changes nothing
    assert store.offered_to("old-1", FLEET, "box2") and store.offered_to("old-1", FLEET, "box3") is None
    store.close()


def test_processes_opening_an_old_database_at_once_all_open_it(tmp_path):
    """`fleet serve` and a `fleet` command started together on a database of an older controller: both found a
    column or table missing, and the second's change failed ("duplicate column name: received", "table
    offer_targets already exists"), reported as the database not opening. The migration is one write transaction
    now: the others wait, then find it done."""
    import multiprocessing

    path = tmp_path / "fleet.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")  # as every controller leaves its database
    db.executescript(OLD_SCHEMA + """
CREATE TABLE offers (update_id TEXT PRIMARY KEY, bundle TEXT NOT NULL, version TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE ota_status (fleet TEXT NOT NULL, device TEXT NOT NULL, update_id TEXT, ts REAL NOT NULL, state TEXT,
    result TEXT, reason TEXT, body TEXT NOT NULL);""")
    db.execute("INSERT INTO offers VALUES ('old-1', '/b/1.2.0', '1.2.0', 100.0)")
    db.commit()
    db.close()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(6)
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_store_after, args=(path, start, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert outcomes == ["ok"] * 6, outcomes
    store = Store(path)
    assert store.offered_to("old-1", "", "") == Path("/b/1.2.0")  # one LEGACY row, made once
    assert store.offered_manifest("old-1") == ("1.2.0", None)
    store.close()


def test_the_controller_before_keeps_recording_offers_after_this_one_opened_its_database(tmp_path):
    """The offered manifest's sha256 was a fifth column of `offers`: a `fleet serve` of the version before, still
    running while a command of this one opened its database, failed every offer ("table offers has 5 columns but
    4 values were supplied"), its rollouts with them. It is a table of its own."""
    path = tmp_path / "fleet.db"
    store = Store(path)
    store.add_offer("tiny-1.1.0-1", Path("/b/1.1.0"), "1.1.0", FLEET, "box1", "ab" * 32)
    store.close()
    older = sqlite3.connect(path)  # the statement the controller before makes
    older.execute("INSERT OR REPLACE INTO offers VALUES (?,?,?,?)", ("tiny-1.1.0-2", "/b/1.1.0", "1.1.0", 100.0))
    older.commit()
    older.close()
    store = Store(path)
    assert store.offered_manifest("tiny-1.1.0-1") == ("1.1.0", "ab" * 32)
    assert store.offered_manifest("tiny-1.1.0-2") == ("1.1.0", None)  # not compared: served as before
    assert store.other_builds("tiny", "1.1.0", "cd" * 32) == [("tiny-1.1.0-1", "ab" * 32)]
    assert store.other_builds("tiny", "1.1.0", "ab" * 32) == []
    store.add_offer("tiny-1.1-1.1.0-3", Path("/b/x"), "1.1.0", FLEET, "box1", "ef" * 32)  # bundle "tiny-1.1"
    assert store.other_builds("tiny", "1.1.0", "ab" * 32) == []  # not a build of "tiny"
    store.close()


def _open_store_after(path, start, results) -> None:
    start.wait(30)
    try:
        Store(path).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 what the test reports
        results.put(f"{type(exc).__name__}: {exc}")


def test_the_configured_retention_reaches_the_controllers_store(tmp_path):
    (tmp_path / "fleet.toml").write_text(f'[database]\npath = "{tmp_path / "fleet.db"}"\nretention_s = 60\n')
    args = build_parser().parse_args(["fleet", "serve", "--config", str(tmp_path / "fleet.toml")])
    _, settings = _settings(args)
    controller = FleetController(settings)  # not started: no broker needed to open its store
    store = controller.store
    now = time.time()
    # (the retention goes by whole ROLLUP_S spans: a report stored 500 s ago is past it, wherever the span edge)
    for stored, end in ((now - 500, now - 500), (now - 30, now - 30), (now - 30, now - 30 * 86400)):
        store.clock = lambda: stored  # noqa: B023 (called at once)
        store.add_telemetry_many([telemetry_row(FLEET, report("d1", end))])
    # by when the controller stored them: a device whose clock is a month behind keeps its fresh report
    assert store.prune(now) == 1
    assert sorted(store._exec("SELECT window_end FROM telemetry").fetchall()) == [(now - 30 * 86400,), (now - 30,)]
    store.close()


def test_status_ranges_read_the_controllers_clock(tmp_path):
    """`fleet status` and /metrics show the last hour: what a device whose clock runs an hour behind reported
    a minute ago is in it (it was left out), and what one whose clock runs ahead reported two hours ago is not."""
    store = Store(tmp_path / "fleet.db")
    now = time.time()
    store.clock = lambda: now - 60
    store.add_telemetry_many([telemetry_row(FLEET, report("behind", now - 60 - 3700, count=2))])
    store.clock = lambda: now - 7200
    store.add_telemetry_many([telemetry_row(FLEET, report("ahead", now - 7200 + 7300, count=5))])
    assert store.latency(FLEET, "behind", now - 3600)["requests"] == 2
    assert store.latency(FLEET, "ahead", now - 3600)["requests"] == 0
    assert [v["requests"] for v in store.versions(FLEET, now - 3600)] == [2]
    store.close()


def test_known_bundles_skip_the_staging_of_an_unfinished_export(tmp_path, signed_bundles):
    """A `.NAME.partial-...` directory in bundles.dir (an export or copy killed there) holds a manifest but is no
    bundle to roll back to."""
    import shutil

    from fleet.groups import known_bundles

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copytree(signed_bundles["v2"], bundles / "v2")
    shutil.copytree(signed_bundles["v1"], bundles / ".v1.partial-123@box-k1ll3d")
    store = Store(tmp_path / "fleet.db")
    assert known_bundles(store, bundles) == {"1.1.0": bundles / "v2"}
    store.close()


def test_group_remove_with_a_fleet_touches_only_that_fleets_devices(tmp_path):
    """A group spanning fleets can hold one device id twice: `group remove G DEV --fleet F` used to take it
    out of every fleet."""
    store = Store(tmp_path / "f.db")
    store.group_add("ring1", "plant7", ["dev1", "dev2"])
    store.group_add("ring1", "plant8", ["dev1"])
    assert store.group_remove("ring1", ["dev1"], fleet="plant8") == 1
    assert store.groups()["ring1"] == [("plant7", "dev1"), ("plant7", "dev2")]
    assert store.group_remove("ring1", None, fleet="plant7") == 2 and "ring1" not in store.groups()
    store.close()


def test_a_new_database_has_the_indexes_its_queries_need(tmp_path):
    """Pruning by stored time and looking up a device's result for an update (once per device and rollout
    tick) used to scan whole tables on a new database."""
    store = Store(tmp_path / "f.db")
    plan = lambda sql: " ".join(str(r) for r in store._exec("EXPLAIN QUERY PLAN " + sql).fetchall())  # noqa: E731
    assert "telemetry_by_stored" in plan("DELETE FROM telemetry WHERE stored < 5")
    assert "ota_status_by_device" in plan("SELECT body FROM ota_status WHERE fleet='f' AND device='d' AND "
                                          "update_id='u' AND result IS NOT NULL ORDER BY ts DESC LIMIT 1")
    store.close()


def test_old_ota_statuses_are_pruned_but_each_devices_last_result_per_update_stays(tmp_path):
    """Every status of every update used to be kept for ever (and rollout ticks look them up per device)."""
    store = Store(tmp_path / "f.db", retention_s=60)
    now = time.time()
    for ts, update, state, result in ((now - 500, "u1", "downloading", None), (now - 400, "u1", "reporting", "committed"),
                                      (now - 300, "u2", "downloading", None), (now - 200, "u2", "reporting", "failed"),
                                      (now - 10, "u3", "downloading", None)):
        store.clock = lambda: ts  # noqa: B023 (called at once): received when the device sent it
        store.add_ota_status("plant7", "d1", {"update_id": update, "ts": ts, "state": state, "result": result})
    assert store.prune(now) == 2  # the two old in-between states
    assert [r[0] for r in store._exec("SELECT update_id FROM ota_status ORDER BY ts")] == ["u1", "u2", "u3"]
    assert store.last_result("plant7", "d1", "u1")["result"] == "committed"
    store.close()


def test_offers_no_device_follows_any_more_are_pruned_after_the_retention(tmp_path):
    """`offers` and `offer_targets` kept a row per device per offer for ever (a weekly rollout to 1,500
    boxes: 78,000 rows a year). A device's older offers go once a newer one was made to it and the retention
    has passed; its newest stays however old (its retained offer may still be downloaded), and so does the
    newest offer of each bundle (`fleet rollback --to` finds bundles there)."""
    from pathlib import Path

    clock = [1000.0]
    store = Store(tmp_path / "f.db", retention_s=100, clock=lambda: clock[0])

    def offer(update, bundle, devices, at):
        clock[0] = at
        for d in devices:
            store.add_offer(update, Path(bundle), bundle[-5:], FLEET, d)

    offer("u-old", "/b/1.0.0", ["d1", "d2", "d3"], 1000)
    offer("u-new", "/b/1.1.0", ["d1", "d2"], 1050)  # d3 was offline: its offer of u-old is its newest
    offer("u-again", "/b/1.0.0", ["d1"], 1060)  # a rollback of d1 to 1.0.0 under a new update id
    clock[0] = 1090.0
    assert store.prune() == 0  # nothing is older than the retention yet
    clock[0] = 1200.0
    assert store.prune() == 3  # u-old to d1 and d2, u-new to d1: each superseded and older than the retention
    targets = sorted(store._exec("SELECT update_id, device FROM offer_targets").fetchall())
    assert targets == [("u-again", "d1"), ("u-new", "d2"), ("u-old", "d3")]
    assert store.offered_to("u-old", FLEET, "d3") == Path("/b/1.0.0")
    assert store.offered_to("u-old", FLEET, "d1") is None
    clock[0] = 1400.0
    for d in ("d1", "d2", "d3"):
        store.add_offer("u-last", Path("/b/1.1.0"), "1.1.0", FLEET, d)
    assert store.prune() == 5  # the three older targets, then the offers u-old and u-new (no device left)
    assert set(store.offers()) == {"u-again", "u-last"}  # u-again: no device, but the newest offer of /b/1.0.0
    assert store.prune() == 0
    store.close()


def test_a_telemetry_report_counts_as_seen(tmp_path):
    """`fleet status`' "seen" column moved only when a device published a state: a box reporting telemetry every
    minute read "seen 395s" as if it had gone quiet."""
    from fleet.store import telemetry_row

    clock = [1000.0]
    store = Store(tmp_path / "fleet.db", clock=lambda: clock[0])
    store.upsert_state(FLEET, {"device": "d1", "online": True, "agent_version": "0.1.0"})
    store.upsert_state(FLEET, {"device": "d2", "online": True, "agent_version": "0.1.0"})
    clock[0] = 1400.0
    store.add_telemetry_many([telemetry_row(FLEET, {"device": "d1", "window_end": 1399.0, "count": 0}),
                              telemetry_row(FLEET, {"device": "ghost", "window_end": 1399.0, "count": 0})])
    assert {d["device"]: d["last_seen"] for d in store.devices(FLEET)} == {"d1": 1400.0, "d2": 1000.0}
    store.close()


def test_the_latest_ota_result_is_the_latest_to_arrive_whatever_the_devices_clock(tmp_path):
    """A canary committed, then went back on probation after its clock was set back 120 s: ordered by the device's
    ts, its result read "committed" (no halt at once, no ROLLED BACK line in `fleet status`, a rollback offered
    to a device no longer on the version)."""
    store = Store(tmp_path / "fleet.db")
    store.add_ota_status("f", "d1", {"update_id": "u1", "ts": 1000.0, "state": "reporting", "result": "committed"})
    store.add_ota_status("f", "d1", {"update_id": "u1", "ts": 880.0, "state": "reporting", "result": "rolled_back",
                                     "reason": "probation"})
    assert store.last_result("f", "d1", "u1")["result"] == "rolled_back"
    assert store.last_results("f")[("f", "d1")] == {"update_id": "u1", "result": "rolled_back", "reason": "probation",
                                                    "ts": 880.0}
    store.close()


def test_the_largest_counts_and_latencies_a_report_may_carry_keep_status_and_metrics_working(tmp_path):
    """Two reports with count 2^62 each passed validation and overflowed SQLite's SUM(): `fleet status`, /metrics,
    the rollout tick and the versions table all raised. A report's counts are bounded now (2^31 - 1), and so are its
    percentiles (a day in ms: 1e308 summed to Infinity in `fleet status --json`)."""

    import pytest
    from pydantic import ValidationError

    from agent.topics import LATENCY_MS_MAX, REPORT_COUNT_MAX, TelemetryReport
    from fleet.controller import format_status, prometheus_metrics

    now = time.time()
    with pytest.raises(ValidationError, match="count"):
        TelemetryReport(device="d1", window_start=now - 1, window_end=now, count=1 << 62)
    with pytest.raises(ValidationError, match="p99"):
        TelemetryReport(device="d1", window_start=now - 1, window_end=now, count=1,
                        ttft_ms={"p50": 1.0, "p95": 2.0, "p99": 1e308})
    store = Store(tmp_path / "fleet.db")
    big = [TelemetryReport(device="d1", window_start=now - 20 + i, window_end=now - 19 + i, count=REPORT_COUNT_MAX,
                           errors=REPORT_COUNT_MAX, model_version="1.0.0",
                           ttft_ms={"p50": LATENCY_MS_MAX, "p95": LATENCY_MS_MAX, "p99": LATENCY_MS_MAX},
                           per_token_ms={"p50": LATENCY_MS_MAX, "p95": LATENCY_MS_MAX, "p99": LATENCY_MS_MAX})
           for i in range(3)]
    store.add_telemetry_many([telemetry_row(FLEET, r.model_dump()) for r in big])
    assert store.latency(FLEET, "d1", now - 60)["requests"] == 3 * REPORT_COUNT_MAX
    assert store.versions(FLEET)[0]["requests"] == 3 * REPORT_COUNT_MAX
    assert "6442450941" in format_status(store, FLEET) and "edgeglm_fleet" in prometheus_metrics(store, True)
    json.dumps(store.versions(FLEET), allow_nan=False)  # finite: valid JSON
    store.close()


def test_a_devices_tokens_per_second_is_request_weighted_as_in_the_versions_table(tmp_path):
    """`latency` took a plain mean of the windows' tokens/s (55 for these two), `versions` a request-weighted one
    (19): the same device showed two speeds."""
    store = Store(tmp_path / "fleet.db")
    now = time.time()
    store.add_telemetry_many([telemetry_row(FLEET, {**report("d1", now - 20, count=1), "tokens_per_s": 100.0}),
                              telemetry_row(FLEET, {**report("d1", now - 10, count=9), "tokens_per_s": 10.0})])
    assert store.latency(FLEET, "d1", now - 60)["tokens_per_s"] == store.versions(FLEET)[0]["tokens_per_s"] == 19.0
    store.close()


def test_a_device_heard_nothing_from_for_silent_after_s_counts_offline(tmp_path):
    """A box that died while the broker was away never had its Will published: its retained state said online
    for good, `fleet status` and /metrics counted it online, and rollouts picked it as a canary (then waited an
    hour for its result). Nothing from it (state, telemetry, health) for `silent_after_s`: offline, and said."""
    from fleet.controller import format_status, prometheus_metrics

    clock = [10_000.0]
    store = Store(tmp_path / "fleet.db", clock=lambda: clock[0])
    for d in ("alive", "dead", "healthy"):
        store.upsert_state(FLEET, {"device": d, "online": True, "agent_version": "0.1.0",
                                   "model": {"name": "m", "version": "1.0.0"}})
    clock[0] += 600
    store.add_telemetry_many([telemetry_row(FLEET, report("alive", clock[0] - 1, count=0))])
    store.put_health([(FLEET, {"device": "healthy", "ts": clock[0]})])  # a health snapshot is a sign of life too
    clock[0] += 400  # "dead": 1000 s since its state, over the default 900
    online = {d["device"]: (d["online"], d["silent"]) for d in store.devices(FLEET)}
    assert online == {"alive": (1, False), "dead": (0, True), "healthy": (1, False)}
    assert [(v["devices"], v["online"]) for v in store.versions(FLEET)] == [(3, 2)]
    status = format_status(store, FLEET)
    assert f"device {FLEET}/dead is SILENT: its last state said online, but nothing came from it for " in status
    assert "[fleet] silent_after_s 900" in status
    assert 'edgeglm_fleet_devices{online="true"} 2' in prometheus_metrics(store, True)
    store.silent_after_s = 2000.0  # a fleet whose agents report less often
    assert all(d["online"] for d in store.devices(FLEET))
    store.close()


def test_a_rollout_never_picks_a_silent_device_as_a_canary(tmp_path):
    from fleet.rollout import RolloutDriver, create_rollout, load_rollouts

    class Offers:
        def __init__(self):
            self.made = []

        def offer(self, fleet, device, bundle, **kw):
            self.made.append(device)
            return f"u-{device}"

    clock = [time.time() - 2000]
    store = Store(tmp_path / "fleet.db", clock=lambda: clock[0])
    for d in ("dead", "live"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
    clock[0] = time.time()
    store.upsert_state(FLEET, {"device": "live", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')
    rid = create_rollout(store, bundle, FLEET, canary_pct=100, window_s=10.0, min_requests=1)
    offers = Offers()
    driver = RolloutDriver(store, offers)
    driver.tick(clock[0])
    driver.tick(clock[0] + 25)  # past the wait for a baseline neither has
    r = next(r for r in load_rollouts(store) if r.id == rid)
    assert r.data["canaries"] == ["live"] and offers.made == ["live"], r.data["report"]
    store.close()


def test_silent_after_s_comes_from_the_fleet_config(tmp_path):
    from fleet.cli import _store

    (tmp_path / "fleet.toml").write_text(f'[fleet]\nsilent_after_s = 3600\n[database]\npath = "{tmp_path / "fleet.db"}"\n')
    args = build_parser().parse_args(["fleet", "status", "--config", str(tmp_path / "fleet.toml")])
    assert _store(args, tmp_path / "fleet.db").silent_after_s == 3600.0
    _, settings = _settings(build_parser().parse_args(["fleet", "serve", "--config", str(tmp_path / "fleet.toml")]))
    controller = FleetController(settings)  # not started: no broker needed to open its store
    assert controller.store.silent_after_s == 3600.0 and controller.store.path == tmp_path / "fleet.db"
    controller.store.close()


def test_the_retention_deletes_in_batches_and_reads_ota_statuses_on_the_controllers_clock(tmp_path, monkeypatch):
    """One DELETE of millions of rows held the store's lock (which paho's thread needs for every state) for half
    a minute; and OTA statuses were pruned on the device's `ts`, so a box whose clock ran years ahead kept them
    for ever."""
    import fleet.store

    monkeypatch.setattr(fleet.store, "PRUNE_BATCH", 3)
    clock = [1000.0]
    store = Store(tmp_path / "f.db", retention_s=100, clock=lambda: clock[0])
    store.add_telemetry_many([telemetry_row(FLEET, report("d1", 900.0 + i)) for i in range(10)])
    store.add_ota_status(FLEET, "d1", {"update_id": "u1", "ts": 1e12, "state": "downloading", "result": None})
    store.add_ota_status(FLEET, "d1", {"update_id": "u1", "ts": 1e12 + 1, "state": "reporting",
                                       "result": "committed"})
    clock[0] = 1250.0
    store.add_telemetry_many([telemetry_row(FLEET, report("d1", 1049.0))])
    clock[0] = 1420.0  # the cutoff 1320: telemetry goes by whole ROLLUP_S spans, before 1200
    deletes, real_exec = [], store._exec

    def counting(sql, args=()):
        if sql.startswith("DELETE FROM telemetry"):
            deletes.append(sql)
        return real_exec(sql, args)
    store._exec = counting
    assert store.prune() == 11  # 10 telemetry rows, the in-between OTA status
    assert len(deletes) == 4  # 3 + 3 + 3 + 1: each batch its own statement, the lock free between them
    assert rows(store) == 1
    assert [r[0] for r in store._exec("SELECT state FROM ota_status")] == ["reporting"]  # the last result stays
    store.close()


def test_a_devices_latency_reads_an_index_on_its_stored_time(tmp_path):
    """`fleet status` and every /metrics scrape sum each device's last hour: on the (fleet, device, window_end)
    index SQLite read the device's whole retained history (1,000 devices x a day at 30 s: 1.1 s a scrape)."""
    store = Store(tmp_path / "f.db")
    plan = " ".join(str(r) for r in store._exec(
        "EXPLAIN QUERY PLAN SELECT SUM(count) FROM telemetry WHERE fleet='f' AND device='d' AND stored>=5").fetchall())
    assert "telemetry_by_device_stored" in plan, plan
    store.close()


def test_reports_a_device_lost_offline_are_counted_once_and_shown(tmp_path):
    """An agent whose offline buffer overflowed says how many reports it lost in the first report after the
    outage (`dropped_reports`); the controller did not keep it, so a gap in a device's latency looked like an
    idle box. A second copy of that report (QoS 1) does not count the loss twice."""
    from fleet.controller import format_status, prometheus_metrics

    store = Store(tmp_path / "fleet.db")
    store.upsert_state(FLEET, {"device": "d1", "online": True, "agent_version": "0.1.0"})
    now = time.time()
    first = {**report("d1", now - 5), "dropped_reports": 7}
    store.add_telemetry_many([telemetry_row(FLEET, first), telemetry_row(FLEET, report("d1", now - 4))])
    store.add_telemetry_many([telemetry_row(FLEET, first)])  # the redelivered copy
    assert store.counter("telemetry_lost") == 7 and store.counter("telemetry_duplicates") == 1
    assert store.telemetry_losses(FLEET, now - 3600) == {
        (FLEET, "d1"): {"lost_reports": 7, "missing_gaps": 0, "missing_s": 0.0}}
    assert f"device {FLEET}/d1 LOST 7 telemetry report(s) in the last 3600 s" in format_status(store, FLEET)
    assert "edgeglm_fleet_telemetry_lost_reports_total 7" in prometheus_metrics(store, True)
    store.close()


def test_the_brokers_retained_copy_of_a_state_is_no_sign_of_life(tmp_path):
    """The controller subscribes again at every (re)connect and the broker hands it each device's retained
    state: a dead box's `online: true` state made it "not silent" again for silent_after_s after every
    controller restart or broker outage, the very case `silent` is for."""
    clock = [10_000.0]
    store = Store(tmp_path / "fleet.db", clock=lambda: clock[0])
    state = {"device": "dead", "online": True, "agent_version": "0.1.0", "ts": 9_999.0}
    store.upsert_state(FLEET, state)
    clock[0] += 1000
    assert store.devices(FLEET)[0]["silent"]
    store.upsert_state(FLEET, dict(state))  # the retained copy, at the controller's resubscription
    assert store.devices(FLEET)[0]["silent"]
    store.upsert_state(FLEET, {**state, "ts": 10_999.0})  # the agent itself, connecting again
    assert not store.devices(FLEET)[0]["silent"] and store.devices(FLEET)[0]["online"]
    store.close()


def test_a_desired_version_stays_above_what_the_devices_have_when_the_clock_steps_back(tmp_path, caplog):
    """Versions were the controller's clock in ms: after the clock stepped back (NTP, a restored VM) every new
    `config set` got a version the agents ignored as older ("publish the change with a version above X"), and
    no command could publish above."""
    import logging

    store = Store(tmp_path / "fleet.db")
    now = 1_795_000_000_000
    assert store.next_desired_version([("f", "d1")], now) == now  # nothing recorded: the clock
    store.record_desired("f", "d1", now + 6 * 3600_000, {"sampling": {"top_k": 3}})  # set while 6 h ahead
    store.upsert_state("f", {"device": "d2", "online": True, "model": None,
                             "applied_config_version": now + 7 * 3600_000})  # applied from another controller
    with caplog.at_level(logging.WARNING, logger="edgeglm.fleet"):
        assert store.next_desired_version([("f", "d1")], now) == now + 6 * 3600_000 + 1
        assert store.next_desired_version([("f", "d1"), ("f", "d2")], now) == now + 7 * 3600_000 + 1
    assert "check the controller's clock" in caplog.text
    assert store.next_desired_version([("f", "d1"), ("f", "d2")], now + 8 * 3600_000) == now + 8 * 3600_000
    store.close()


def test_status_counts_the_devices_each_signing_key_is_the_only_key_of(tmp_path):
    """A key rotation's last step (removing the old key from the boxes) is safe only when no box serves, or would
    roll back to, a model only that key signs: `fleet status` counts them per key from the devices' reported
    `hardware.keys`, and names the devices serving a model no key they trust signs."""
    from fleet.controller import format_status, signing_key_summary

    old, new = "0123456789abcdef", "fedcba9876543210"
    store = Store(tmp_path / "fleet.db")

    def state(device, keys):
        store.upsert_state(FLEET, {"device": device, "online": True, "agent_version": "0.1.0",
                                   "model": {"name": "m", "version": "1.0.0"}, "hardware": {"keys": keys}})

    state("done", {"trusted": [new, old], "serving": [new, old], "rollback": [new]})  # re-signed, rolled out
    state("serves-old", {"trusted": [new, old], "serving": [old], "rollback": None})
    state("rolls-back-to-old", {"trusted": [new, old], "serving": [new], "rollback": [old]})
    state("not-yet", {"trusted": [old], "serving": [old], "rollback": []})
    state("removed-early", {"trusted": [new], "serving": [], "rollback": None, "required": True})
    state("unchecked", {"trusted": [new], "serving": [], "rollback": None, "required": False})  # not refused there
    state("older-agent", None)  # an agent that does not report its keys
    state("forged", {"trusted": ["../etc"], "serving": [old], "rollback": None})  # not a key id: not counted
    by_key = {e["key"]: e for e in signing_key_summary(store.signing_keys(FLEET))}
    assert set(by_key) == {old, new}
    assert (by_key[new]["trusted_by"], by_key[new]["serving"], by_key[new]["serving_only"],
            by_key[new]["rollback"], by_key[new]["rollback_only"]) == (5, 2, 1, 1, 1)
    assert (by_key[old]["trusted_by"], by_key[old]["serving"], by_key[old]["serving_only"],
            by_key[old]["rollback"], by_key[old]["rollback_only"]) == (4, 3, 2, 1, 1)
    assert by_key[old]["serving_only_devices"] == [f"{FLEET}/not-yet", f"{FLEET}/serves-old"]
    assert by_key[old]["rollback_only_devices"] == [f"{FLEET}/rolls-back-to-old"]
    status = format_status(store, FLEET)
    assert f"{old}  4           3 (2 only)" in status and f"{new}  5           2 (1 only)" in status, status
    assert "6 of 8 device(s) report their keys" in status
    assert f"1 device(s) serve a model no key they trust now signs (its key was removed): ['{FLEET}/removed-early']; " \
           "their next start refuses it" in status, status
    assert f"1 device(s) serve a model no key they trust signs, and take it (ota.require_signature = false there): " \
           f"['{FLEET}/unchecked']" in status, status
    store.close()
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "status", "--db", str(tmp_path / "fleet.db"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {e["key"]: e["serving_only_devices"] for e in data["signing_keys"]} == \
        {old: [f"{FLEET}/not-yet", f"{FLEET}/serves-old"], new: [f"{FLEET}/rolls-back-to-old"]}
    keys = {d["device"]: d["keys"] for d in data["devices"]}
    assert keys["rolls-back-to-old"] == {"trusted": [new, old], "serving": [new], "rollback": [old], "required": None}
    assert keys["unchecked"]["required"] is False
    assert keys["older-agent"] is None and keys["forged"] is None


def test_removing_a_device_while_another_process_writes_waits_instead_of_failing(tmp_path):
    """`fleet device remove` read the device's state in a deferred transaction, then deleted: when `fleet serve`
    wrote in between, SQLite failed the delete at once with "database is locked" (a stale snapshot cannot wait).
    Another process's write now waits for the removal, and both land."""
    import threading

    path = tmp_path / "fleet.db"
    remover, server = Store(path), Store(path)
    remover.upsert_state("f", {"device": "d1", "online": True, "model": None})

    class Interleaved:  # the remover's connection; right after its first read, the server writes
        def __init__(self, db):
            self.db, self.done = db, threading.Event()

        def __getattr__(self, name):
            return getattr(self.db, name)

        def execute(self, sql, *args):
            cursor = self.db.execute(sql, *args)
            if sql.startswith("SELECT state FROM devices") and not self.done.is_set():
                writer = threading.Thread(target=lambda: (server.upsert_state(
                    "f", {"device": "d2", "online": True, "model": None}), self.done.set()))
                writer.start()
                self.done.wait(0.5)  # (it waits for the removal's transaction, begun IMMEDIATE)
                self.writer = writer
            return cursor

    remover.db = Interleaved(remover.db)
    assert remover.remove_device("f", "d1")["devices"] == 1
    remover.db.writer.join(10)
    assert remover.db.done.is_set()
    assert [d["device"] for d in server.devices("f")] == ["d2"]


def test_metrics_give_the_databases_size_and_the_free_space_beside_it(tmp_path):
    """The fleet database grows with devices x retention (docs/scaling.md, "Database size"); a full disk loses
    every telemetry batch until space is freed. /metrics says how large it is and how much room is left, so that
    an alert fires first."""
    import os
    import shutil

    from fleet.controller import prometheus_metrics

    store = Store(tmp_path / "fleet.db")
    store.upsert_state(FLEET, {"device": "d1", "online": True, "agent_version": "0.1.0"})
    now = time.time()
    store.add_telemetry_many([telemetry_row(FLEET, report("d1", now - 60 + i)) for i in range(50)])
    metrics = dict(line.split(" ", 1) for line in prometheus_metrics(store, True).splitlines()
                   if line.startswith("edgeglm_fleet_database_"))
    files = [tmp_path / "fleet.db", tmp_path / "fleet.db-wal"]
    assert int(metrics["edgeglm_fleet_database_bytes"]) == sum(os.path.getsize(f) for f in files if f.exists()) > 0
    assert 0 < int(metrics["edgeglm_fleet_database_disk_free_bytes"]) <= shutil.disk_usage(tmp_path).total
    store.close()
