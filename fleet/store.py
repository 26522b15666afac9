"""The controller's store: devices, latency telemetry, OTA status and offers, in SQLite.

One file (default `fleet.db`), written by `edgeglm fleet serve` and read by `edgeglm fleet
status`; SQLite's WAL mode lets the status command read while the controller writes.

Telemetry is the only high-rate write (one report per device per interval): the controller hands
it to `add_telemetry_many` in batches, one transaction per batch with `synchronous=NORMAL` (WAL:
no fsync per commit; a power cut loses at most the last commits, never the database), and each
row keeps `stored`, the time its batch was written by the controller's clock, so ingest lag is
`stored - window_end`. Every time range (the rollout gate's windows and baselines, `fleet status`,
/metrics, the retention) is read on `stored`, never on the device's `window_end`: an edge box's
clock may be hours off (no RTC, NTP not yet synced after boot), and a canary whose clock ran an hour
behind had all its reports fall before the gate's window (the gate halted on "no telemetry"); one an
hour ahead put its old version's reports inside it. Rows older than the retention (`[database]
retention_s`, default 7 days) are deleted by `prune`, which the controller calls once a minute (an
index on `stored` keeps that a range delete rather than a scan). A report is stored once: devices publish at QoS 1, which may deliver a
report twice (and an agent re-sends what it buffered during an outage), so a second report of
the same device and `window_end` is dropped and counted (`telemetry_duplicates`) instead of
counting twice in status, /metrics and the rollout gate.

Groups (`edgeglm fleet group add G --fleet F DEVICE...`) are assigned here, by the operator, and
live in the `groups` table: a device may be in several groups; a group belongs to one fleet.

Devices leave the registry only by `edgeglm fleet device remove`: their rows go, and the `removed`
table remembers them, so that the retained state the broker still holds (the controller may not
clear a device's own topic) does not list them again at the next start; an online state the device
publishes does, and ends the removal, as does telemetry it sends more than REMOVED_GRACE_S after it
(its agent runs: `device remove --force`), with the state it had when it was removed.

Offers: `offers` maps an update id to its bundle, `offer_targets` to the devices it was offered
to; the chunk server serves an update only to those (`offered_to`). An offer recorded by a
controller older than `offer_targets` (which served any device that asked) gets, when the database is
brought up to date, the devices that reported an OTA status for it, and a LEGACY target row: a device that
reports a status for such an offer later (one offline at the upgrade, or whose update resumes after it)
becomes a target then (`add_ota_status`). Before, every update those offers had started failed at its
next chunk request after the controller's upgrade, and a rollout waiting on them halted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from agent import histogram
from agent.errors import AgentError

log = logging.getLogger("edgeglm.fleet")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, online INTEGER NOT NULL, last_seen REAL NOT NULL,
    model_name TEXT, model_version TEXT, execution_path TEXT, active_slot TEXT,
    applied_config_version INTEGER, last_config_error TEXT, state TEXT NOT NULL,
    PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model_version TEXT, window_end REAL NOT NULL, count INTEGER,
    ttft_p50 REAL, ttft_p95 REAL, token_p50 REAL, token_p95 REAL, tokens_per_s REAL, errors INTEGER,
    stored REAL, dropped INTEGER, gap_from REAL, gap_to REAL);
CREATE UNIQUE INDEX IF NOT EXISTS telemetry_once ON telemetry (fleet, device, window_end);
CREATE TABLE IF NOT EXISTS ota_status (
    fleet TEXT NOT NULL, device TEXT NOT NULL, update_id TEXT, ts REAL NOT NULL, state TEXT, result TEXT,
    reason TEXT, body TEXT NOT NULL, received REAL);
CREATE TABLE IF NOT EXISTS offers (
    update_id TEXT PRIMARY KEY, bundle TEXT NOT NULL, version TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS offer_manifests (update_id TEXT PRIMARY KEY, manifest_sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offer_targets (
    update_id TEXT NOT NULL, fleet TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (update_id, fleet, device));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT NOT NULL, fleet TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (name, fleet, device));
CREATE TABLE IF NOT EXISTS desired (
    fleet TEXT NOT NULL, device TEXT NOT NULL, version INTEGER NOT NULL, settings TEXT NOT NULL,
    PRIMARY KEY (fleet, device));
CREATE INDEX IF NOT EXISTS telemetry_by_stored ON telemetry (stored);
CREATE INDEX IF NOT EXISTS telemetry_by_device_stored ON telemetry (fleet, device, stored);
CREATE TABLE IF NOT EXISTS removed (
    fleet TEXT NOT NULL, device TEXT NOT NULL, removed REAL NOT NULL, state TEXT, PRIMARY KEY (fleet, device));
CREATE INDEX IF NOT EXISTS ota_status_by_device ON ota_status (fleet, device, update_id, ts);
CREATE TABLE IF NOT EXISTS health (
    fleet TEXT NOT NULL, device TEXT NOT NULL, received REAL NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS latency (
    fleet TEXT NOT NULL, device TEXT NOT NULL, window_end REAL NOT NULL, model_version TEXT, ttft BLOB,
    per_token BLOB, stored REAL NOT NULL, PRIMARY KEY (fleet, device, window_end));
CREATE INDEX IF NOT EXISTS latency_by_stored ON latency (stored);
CREATE TABLE IF NOT EXISTS rollup (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model_version TEXT NOT NULL, bucket INTEGER NOT NULL,
    requests INTEGER, errors INTEGER, ttft_p50_sum REAL, ttft_p50_n INTEGER, ttft_p95_sum REAL, ttft_p95_n INTEGER,
    token_p50_sum REAL, token_p50_n INTEGER, token_p95_sum REAL, token_p95_n INTEGER, tokens_per_s_sum REAL,
    tokens_per_s_n INTEGER, covered INTEGER, ttft BLOB, per_token BLOB,
    PRIMARY KEY (fleet, device, bucket, model_version));
CREATE INDEX IF NOT EXISTS rollup_by_bucket ON rollup (bucket);
"""
REMOVED_GRACE_S = 10.0  # telemetry of a removed device this long after its removal says its agent runs
# a device whose last state said online but that sent nothing (state, telemetry, health) for this long counts as
# offline: one that died while the broker was away never had its Will published, and stayed "online" for good
# (picked as a canary, then waited for an hour). Agents report every telemetry.interval_s (default 30 s)
SILENT_AFTER_S = 900.0
# tables no read-only command reads: a database without them (written by the version before) is read as it is
WRITERS_ONLY = {"offer_manifests"}
# tables read where present: a database without them (written by the version before) is read without them
READ_IF_PRESENT = {"latency", "rollup"}
# latency histograms (the `latency` table) are kept this long at most (the telemetry's retention where shorter):
# the rollout gate reads its window, `fleet status` and /metrics the last hour; a busy device adds ~0.3 KB a window
HISTOGRAM_RETENTION_S = 86400.0
# the share of a range's requests whose windows must have histograms for its percentiles to be read off them
# (the rest: windows whose histogram was lost, e.g. on the controller's QoS 0 subscription); below it, means
HISTOGRAM_COVERAGE = 0.9
HISTOGRAM_READ_ROWS = 5000  # windows' histograms read (and added up) at a time by a fleet-wide read
# Rollups: the reports stored in each ROLLUP_S of the controller's clock, added up per device and model version
# (requests, errors, the means' weighted sums, the covered windows' histograms summed) once that span has ended
# (ROLLUP_DELAY_S after): a range read (`latency`, `versions`: `fleet status`, /metrics, the rollout gate) reads
# the rollups of the whole spans in it and the reports of its two ends, ~1/10 of the rows of an hour at 30 s.
ROLLUP_S = 300
ROLLUP_DELAY_S = 30.0
ROLLUP_BACKFILL_S = 86400.0  # the history a database's first rollup goes back over (older ranges read reports)
# spans `roll_up` does per call (once a minute; one is due every ROLLUP_S): a backfill holds up the writer for
# ~2 s a minute at 10,000 busy devices (~1.1 s per span, the store's lock held), not for a quarter of an hour
ROLLUP_SPANS_PER_CALL = 2
ROLLED_READ_S = 5.0  # how long a range read trusts the rollups' extent it read (`_rolled_spans`)
MEAN_COLUMNS = ("ttft_p50", "ttft_p95", "token_p50", "token_p95", "tokens_per_s")
# the target of an offer recorded before `offer_targets` existed ('' is no fleet or device id)
LEGACY = ("", "")
PRUNE_BATCH = 5000  # telemetry rows the retention deletes per transaction (the store's lock is free between)

TELEMETRY_COLUMNS = ("fleet", "device", "model_version", "window_end", "count", "ttft_p50", "ttft_p95", "token_p50",
                     "token_p95", "tokens_per_s", "errors", "dropped", "gap_from", "gap_to", "stored")
_INSERT_TELEMETRY = (f"INSERT OR IGNORE INTO telemetry ({', '.join(TELEMETRY_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(TELEMETRY_COLUMNS))})")


def histogram_blob(h: dict | None) -> bytes | None:
    """A LatencyHistogram (as a dict) as stored: its (index, count) pairs as little-endian int32s."""
    if not h:
        return None
    return np.asarray(h["bins"], dtype="<i4").reshape(-1).tobytes()


class LatencyRow(tuple):
    """A parsed LatencyHistograms as a `latency` row, less the `stored` time (the controller's telemetry writer
    takes these and telemetry rows from one queue)."""


def latency_row(fleet: str, h: dict) -> LatencyRow:
    return LatencyRow((fleet, h["device"], h["window_end"], h.get("model_version"),
                       histogram_blob(h.get("ttft_ms")), histogram_blob(h.get("per_token_ms"))))


class _HistogramSum:
    """Stored histograms added up as they are read, in one dense array of counts per bucket (1,260 of them): a
    fleet-wide read holds one chunk of rows at a time, not every window's histograms (at 10,000 devices x an
    hour of windows that was ~1 GB, over the controller pod's memory limit, on every /metrics scrape)."""

    def __init__(self):
        self.counts: np.ndarray | None = None

    def add(self, blobs: Iterable[bytes | None]) -> None:
        data = b"".join(filter(None, blobs))
        if not data:
            return
        pairs = np.frombuffer(data, dtype="<i4").reshape(-1, 2)
        # float64 weights: exact for counts below 2**53
        dense = np.bincount(pairs[:, 0] - histogram.MIN_INDEX, weights=pairs[:, 1].astype(np.float64),
                            minlength=histogram.MAX_INDEX - histogram.MIN_INDEX + 1)
        self.counts = dense if self.counts is None else self.counts + dense

    def percentiles(self) -> tuple[float, float] | None:
        """p50 and p95 (ms) of the sum; None when it holds no latency."""
        if self.counts is None:
            return None
        held = np.flatnonzero(self.counts)
        found = histogram.quantiles(np.column_stack((held + histogram.MIN_INDEX, self.counts[held])), (0.5, 0.95))
        return tuple(found) if found else None


def _histogram_blob(counts: np.ndarray | None) -> bytes | None:
    """A _HistogramSum's counts as stored histograms are: little-endian int32 (index, count) pairs."""
    if counts is None:
        return None
    held = np.flatnonzero(counts)
    return np.column_stack((held + histogram.MIN_INDEX, counts[held])).astype("<i4").tobytes() if held.size else None


class _Sums:
    """The means' parts of a range read (`latency`, `versions`): requests, errors, and per MEAN_COLUMNS the
    request-weighted sum and its weight, added from reports and from rollups."""

    def __init__(self):
        self.requests = self.errors = 0
        self.parts = [0.0, 0] * len(MEAN_COLUMNS)

    def add(self, requests, errors, *parts) -> None:
        self.requests += requests or 0
        self.errors += errors or 0
        self.parts = [a + (b or 0) for a, b in zip(self.parts, parts)]

    def means(self) -> dict:
        return {key: total / weight if weight else None for key, total, weight in zip(
            ("ttft_p50_ms", "ttft_p95_ms", "token_p50_ms", "token_p95_ms", "tokens_per_s"), self.parts[0::2],
            self.parts[1::2])}


# the means' parts of telemetry rows (errors from every window, one where every request failed has count 0; the
# rest from windows with requests), and of rollup rows
_RAW_SUMS = ("SUM(count), SUM(errors), " + ", ".join(
    f"SUM(CASE WHEN count>0 THEN {c}*count END), SUM(CASE WHEN count>0 AND {c} IS NOT NULL THEN count END)"
    for c in MEAN_COLUMNS))
_ROLLUP_SUMS = "SUM(requests), SUM(errors), " + ", ".join(f"SUM({c}_sum), SUM({c}_n)" for c in MEAN_COLUMNS)


def telemetry_row(fleet: str, r: dict) -> tuple:
    """A parsed TelemetryReport (as a dict) as a telemetry row, less the `stored` time (and no gap: with_gap)."""
    ttft, tok = r.get("ttft_ms") or {}, r.get("per_token_ms") or {}
    return (fleet, r["device"], r.get("model_version"), r["window_end"], r["count"], ttft.get("p50"), ttft.get("p95"),
            tok.get("p50"), tok.get("p95"), r.get("tokens_per_s"), r.get("errors", 0), r.get("dropped_reports", 0))


def with_gap(row: tuple, gap: tuple[float, float] | None = None, late_start: float | None = None) -> tuple:
    """A `telemetry_row` with what the controller found in the order its device's reports came (within one run of
    its agent, each window starts where the one before ended): `gap`, (the end of the device's last report, this
    report's window_start), is time the agent ran that no report it received covers; `late_start`, this report's
    window_start where it came after a later one (a window held back at a model switch, see agent.telemetry): once
    stored, it closes the gap it falls in."""
    return row[:12] + (gap or (None, None)) + (late_start,)


def state_run(state: dict) -> tuple[str, float] | None:
    """(the agent's run id, its start by the device's clock: `ts - uptime_s`) of a ReportedState (as a dict);
    None for an agent that does not name its run."""
    run, ts, uptime = _run_of(state), state.get("ts"), state.get("uptime_s")
    if run is None or not _number(ts) or not _number(uptime):
        return None
    return run, ts - uptime


def _late_start(row: tuple) -> float | None:
    return row[14] if len(row) > 14 else None


def _row_values(row: tuple, stored: float) -> tuple:
    """The INSERT's values of a telemetry_row (or with_gap) and its `stored` time."""
    return row[:12] + (tuple(row[12:14]) if len(row) > 12 else (None, None)) + (stored,)



def _key_ids(value) -> bool:
    """A list of key ids (16 hex digits each; `ota.signing.key_id`), as a device reports them."""
    return isinstance(value, list) and len(value) <= 64 and \
        all(isinstance(k, str) and re.fullmatch(r"[0-9a-f]{16}", k) for k in value) and len(set(value)) == len(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run_of(state: dict):
    """The agent run that made a state (`hardware.run`, random at each agent start; None from older agents)."""
    hardware = state.get("hardware")
    run = hardware.get("run") if isinstance(hardware, dict) else None
    return run if isinstance(run, str) and run else None


def _later_state(state: dict, stored: dict) -> bool:
    """Whether `state` was made after `stored`. Made by the same agent run: by its uptime (monotonic, whatever the
    device's wall clock did: a box that booted ahead of time and was set back by NTP made its Will, at connect,
    with a `ts` later than its states after it); else by `ts`."""
    run = _run_of(state)
    if run is not None and run == _run_of(stored) and _number(state.get("uptime_s")) and \
            _number(stored.get("uptime_s")):
        return state["uptime_s"] >= stored["uptime_s"]
    return _number(stored.get("ts")) and _number(state.get("ts")) and state["ts"] >= stored["ts"]

class StoreError(AgentError):
    """The fleet database cannot be opened: the message names the path and the cause."""


def _open_problem(path: Path, exc: sqlite3.Error) -> str:
    parent = path.parent
    if not parent.is_dir():
        cause = f"directory {parent} does not exist"
    elif path.is_dir():
        cause = "it is a directory"
    elif path.is_file() and "not a database" in str(exc):
        cause = "the file is not an SQLite database"
    elif "locked" in str(exc):  # "Give a writable file path" was the wrong advice
        return (f"fleet database {path} (--db or database.path) is locked by another process (a command or a "
                f"`fleet serve` in the middle of a write) for more than {BUSY_TIMEOUT_MS // 1000} s; nothing was "
                f"done. Try again")
    else:
        cause = str(exc)
    return (f"fleet database {path} (--db or database.path) cannot be opened: {cause}; nothing was done. "
            f"Give a writable file path in an existing directory")


BUSY_TIMEOUT_MS = 5000


class Store:
    def __init__(self, path: str | Path, retention_s: float = 7 * 86400, clock=time.time, read_only: bool = False):
        """`read_only` (`fleet status`): opened as it is, nothing written, so that a user who may only read the
        file (or its directory) can read it; a database older than this schema is read as a writer would."""
        self.path = Path(path)
        self.returned: list[tuple[str, str]] = []  # removed devices the last telemetry batch registered again
        self.retention_s = retention_s
        self.histogram_retention_s = min(retention_s, HISTOGRAM_RETENTION_S)
        self.silent_after_s = SILENT_AFTER_S  # ([fleet] silent_after_s)
        self.clock = clock  # the controller's clock: `stored` and `last_seen` (tests drive their own)
        # re-entrant: a `transaction()` holds it while the store's own methods run inside it
        self._lock = threading.RLock()
        db = None
        try:
            if read_only and not self.path.is_file():
                raise sqlite3.OperationalError("unable to open database file")
            if read_only and os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK | os.X_OK):
                read_only = False  # it may write: opened as a writer, so that an older schema is brought up to date
            self.read_only = read_only
            if read_only:
                self.db = db = self._open_read_only()
                self._check_schema_read_only()
                return
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # first: a lock held elsewhere is waited for
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self.db = db
            self._migrate()
            db.executescript(SCHEMA)
        except sqlite3.Error as exc:  # a missing directory, no permission, a file that is not a database
            if db is not None:
                db.close()
            raise StoreError(_open_problem(self.path, exc)) from None

    def _open_read_only(self) -> sqlite3.Connection:
        """A WAL database cannot be opened read-only where its -shm file cannot be made (a directory the user may
        not write): with no -wal file beside it (no writer at work, everything is in the file), it is read as
        immutable."""
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal")
        for options in ("mode=ro",) + (("mode=ro&immutable=1",) if not wal.exists() else ()):
            db = sqlite3.connect(f"{uri}?{options}", uri=True, check_same_thread=False, isolation_level=None)
            try:
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # "not a database" here, not later
                return db
            except sqlite3.Error as exc:
                db.close()
                error = exc
        raise error

    def _check_schema_read_only(self) -> None:
        """A database made by an older controller, read by a user who may not bring it up to date: one line, not
        "no such table: health" from the first query that needs what is missing."""
        want = sqlite3.connect(":memory:")
        try:
            want.executescript(SCHEMA)
            missing = []
            for (table,) in want.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                if table in WRITERS_ONLY or table in READ_IF_PRESENT:
                    continue
                have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                needed = {row[1] for row in want.execute(f"PRAGMA table_info({table})")}
                if needed - have:
                    missing.append(table if not have else f"{table}.{sorted(needed - have)[0]}")
        finally:
            want.close()
        if missing:
            self.db.close()
            raise StoreError(f"fleet database {self.path} was made by an older controller ({', '.join(missing[:3])} "
                             f"missing) and this user may not bring it up to date: run `edgeglm fleet serve` (or this "
                             "command as a user who may write it) once; nothing was done")

    def _migrate(self) -> None:
        """Bring a database made by an older controller up to this schema (before SCHEMA's indexes), in one write
        transaction: two processes opening an old database at once (`fleet serve` and a `fleet` command) both
        found a table missing and the second failed on "table offer_targets already exists" as "cannot open";
        now the second waits, then finds nothing left to do."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._migrate_in_transaction()
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _migrate_in_transaction(self) -> None:
        removed = {row[1] for row in self.db.execute("PRAGMA table_info(removed)")}
        if removed and "state" not in removed:  # the state a device had when it was removed (see back_from_removal)
            self.db.execute("ALTER TABLE removed ADD COLUMN state TEXT")
        ota = {row[1] for row in self.db.execute("PRAGMA table_info(ota_status)")}
        if ota and "received" not in ota:  # when the controller got it (its clock): what the retention reads
            self.db.execute("ALTER TABLE ota_status ADD COLUMN received REAL")
        offers = {row[1] for row in self.db.execute("PRAGMA table_info(offers)")}
        if offers and not list(self.db.execute("PRAGMA table_info(offer_targets)")):
            self._targets_of_older_offers(bool(ota))
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(telemetry)")}
        if not columns:
            return  # a new database: SCHEMA makes everything
        if "stored" not in columns:
            self.db.execute("ALTER TABLE telemetry ADD COLUMN stored REAL")
        if "dropped" not in columns:  # earlier reports the device lost from its offline buffer (dropped_reports)
            self.db.execute("ALTER TABLE telemetry ADD COLUMN dropped INTEGER")
        if "gap_from" not in columns:  # the time before a report its agent ran and no report covers (see with_gap)
            self.db.execute("ALTER TABLE telemetry ADD COLUMN gap_from REAL")
            self.db.execute("ALTER TABLE telemetry ADD COLUMN gap_to REAL")
        # time ranges are read on `stored`: rows of controllers that did not record it count at their window end
        self.db.execute("UPDATE telemetry SET stored = window_end WHERE stored IS NULL")
        self.db.execute("DROP INDEX IF EXISTS telemetry_by_time")
        indexes = {row[1] for row in self.db.execute("PRAGMA index_list(telemetry)")}
        if "telemetry_once" not in indexes:  # older controllers stored a report as often as it arrived
            self.db.execute("DELETE FROM telemetry WHERE rowid NOT IN "
                            "(SELECT MIN(rowid) FROM telemetry GROUP BY fleet, device, window_end)")
            self.db.execute("DROP INDEX IF EXISTS telemetry_by_device")
            self.db.execute("CREATE UNIQUE INDEX telemetry_once ON telemetry (fleet, device, window_end)")

    def _targets_of_older_offers(self, have_statuses: bool) -> None:
        """(_migrate) The offers of a controller older than `offer_targets`: a LEGACY target each, and the
        devices that reported a status for them as targets (see the module's docstring)."""
        self.db.execute("CREATE TABLE offer_targets (update_id TEXT NOT NULL, fleet TEXT NOT NULL, device TEXT NOT "
                        "NULL, PRIMARY KEY (update_id, fleet, device))")
        self.db.execute("INSERT INTO offer_targets SELECT update_id, ?, ? FROM offers", LEGACY)
        if have_statuses:
            self.db.execute("INSERT OR IGNORE INTO offer_targets SELECT DISTINCT s.update_id, s.fleet, s.device FROM "
                            "ota_status s JOIN offers o ON o.update_id = s.update_id")
        n = self.db.execute("SELECT COUNT(*) FROM offers").fetchone()[0]
        log.info("%s: %d offer(s) recorded by an older controller are served to the devices that report a status "
                 "for them", self.path, n)

    def close(self) -> None:
        self.db.close()

    def executescript(self, script: str) -> None:
        """Run a schema script under the connection's lock: the ingest writer shares the connection, and a
        script's implicit COMMIT would otherwise end the writer's open transaction under it."""
        with self._lock:
            self.db.executescript(script)

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self.db.execute(sql, args)

    def _rollback(self) -> None:
        """ROLLBACK where a transaction is still open: SQLite rolls back by itself after some errors (a full disk),
        and a ROLLBACK then raised "cannot rollback - no transaction is active" in place of the reason."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception), under the connection's lock: a check and the write
        it decides (a rollout's overlap check and its INSERT, `group add`'s check and its rows) happen with no other
        writer in between, this process's threads or another process's (`fleet serve`, another command: they wait
        up to the busy timeout). Every write transaction of the store begins IMMEDIATE: one begun deferred that
        read first and then wrote, after another process had written in between, failed at once with "database is
        locked" (SQLite does not wait there: its snapshot was stale), e.g. `fleet device remove` beside `fleet
        serve`. The store's methods may be called inside it; `executescript` may not (it
        commits)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            self.db.execute("COMMIT")

    # --- writes (from the controller's MQTT handlers) -------------------------------------
    def upsert_state(self, fleet: str, state: dict, device: str | None = None) -> dict | None:
        """Store a device's reported state. `device`, when given, is the device of the topic it came on:
        a state that names another device is refused (ValueError), so no device writes another's row. What the
        row said before (online, model_version), or None for a device new to the registry."""
        if device is not None and state.get("device") != device:
            raise ValueError(f"state of device {state.get('device')!r} on the topic of device {device!r}")
        with self._lock:
            before = self.db.execute("SELECT online, model_version, state, last_seen FROM devices WHERE fleet=? AND "
                                     "device=?", (fleet, state["device"])).fetchone()
            stored = json.loads(before[2]) if before is not None else {}
            stored_ts = stored.get("ts")
            newer = _later_state(state, stored)  # an agent's own offline state at a clean stop: newer than all it said
            if before is not None and not state.get("online") and not newer:
                # an offline state older than the stored one is the broker's Will, made when the device connected:
                # the model, slot and config it names may be older than what the device reported since (an OTA
                # update on the same connection). The device is offline now, and the rest stays as it last said.
                self.db.execute("UPDATE devices SET online = 0, last_seen = ?, state = ? WHERE fleet = ? AND "
                                "device = ?", (self.clock(), json.dumps({**json.loads(before[2]), "online": False}),
                                              fleet, state["device"]))
            else:
                # the stored state again (the same `ts`): the broker's retained copy, handed to the controller at
                # each (re)subscription, is no sign of life: a box that died while the broker was away would not be
                # `silent` again until silent_after_s after every controller restart or broker outage
                again = isinstance(stored_ts, (int, float)) and state.get("ts") == stored_ts
                self._upsert_state(fleet, state, before[3] if again else self.clock())
        return None if before is None else {"online": bool(before[0]), "model_version": before[1]}

    def _upsert_state(self, fleet: str, state: dict, seen: float) -> None:
        """(under the lock) The device's row from its state; it is no longer a removed device."""
        model = state.get("model") or {}
        self.db.execute(
            "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET "
            "online=excluded.online, last_seen=excluded.last_seen, model_name=excluded.model_name, "
            "model_version=excluded.model_version, execution_path=excluded.execution_path, "
            "active_slot=excluded.active_slot, applied_config_version=excluded.applied_config_version, "
            "last_config_error=excluded.last_config_error, state=excluded.state",
            (fleet, state["device"], int(state["online"]), seen, model.get("name"), model.get("version"),
             state.get("execution_path"), state.get("active_slot"), state.get("applied_config_version"),
             state.get("last_config_error"), json.dumps(state)))
        self.db.execute("DELETE FROM removed WHERE fleet=? AND device=?", (fleet, state["device"]))  # it is back

    def has_device(self, fleet: str, device: str) -> bool:
        """Whether the device is in the registry."""
        return self._exec("SELECT 1 FROM devices WHERE fleet=? AND device=?", (fleet, device)).fetchone() is not None

    def is_removed(self, fleet: str, device: str) -> bool:
        """Whether `fleet device remove` took the device out and it has not published a state since."""
        return self._exec("SELECT 1 FROM removed WHERE fleet=? AND device=?", (fleet, device)).fetchone() is not None

    def add_telemetry(self, fleet: str, r: dict) -> None:
        self.add_telemetry_many([telemetry_row(fleet, r)])

    def add_telemetry_many(self, rows: list[tuple]) -> float:
        """Insert `telemetry_row`s in one transaction, each (fleet, device, window_end) once; returns the
        `stored` time given to them (the controller's clock, `clock`). A removed device that reports is back:
        see `_back_from_removal` (the devices it registered again are in `self.returned`)."""
        stored = self.clock()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")  # (a read then a write: see transaction())
            try:
                # never inside a span rolled up already (the controller's clock set back): it would be read
                # neither from the rollup nor as a report outside it
                rolled = self.db.execute("SELECT value FROM counters WHERE name = 'rolled_until'").fetchone()
                stored = max(stored, rolled[0]) if rolled else stored
                self.returned = self._back_from_removal(rows, stored)
                # a report saying earlier ones were lost is rare: inserted alone, so that a second copy of it (a
                # QoS 1 redelivery) does not count the loss twice
                # as is one that came after a later one (late_start): stored, it closes the gap it falls in
                alone = [row for row in rows if row[11] or _late_start(row) is not None]
                before = self.db.total_changes
                self.db.executemany(_INSERT_TELEMETRY, [_row_values(row, stored) for row in rows
                                                        if not (row[11] or _late_start(row) is not None)])
                new, lost = self.db.total_changes - before, 0
                for row in alone:
                    if self.db.execute(_INSERT_TELEMETRY, _row_values(row, stored)).rowcount:
                        new, lost = new + 1, lost + row[11]
                        if _late_start(row) is not None:
                            self._close_gap(row[0], row[1], _late_start(row), row[3])
                # a report is a sign of life: `fleet status`' "seen" column moved only with a state change, so
                # a box reporting every minute showed "seen 395s"
                self.db.executemany("UPDATE devices SET last_seen = ? WHERE fleet = ? AND device = ? AND "
                                    "last_seen < ?", [(stored, f, d, stored) for f, d in {r[:2] for r in rows}])
                for name, n in (("telemetry_reports", new), ("telemetry_duplicates", len(rows) - new),
                                ("telemetry_lost", lost)):
                    if n:
                        self.db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
                                        "value = value + ?", (name, n, n))
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return stored

    def _close_gap(self, fleet: str, device: str, start: float, end: float) -> None:
        """(in add_telemetry_many's transaction) A window [start, end] stored after a later one: it no longer counts
        as missing in the gap it falls in (a later report's; one stored twice, only once)."""
        row = self.db.execute("SELECT rowid, gap_from, gap_to FROM telemetry WHERE fleet=? AND device=? AND "
                              "window_end > ? AND gap_from <= ? AND gap_to >= ? ORDER BY window_end LIMIT 1",
                              (fleet, device, end, start, end)).fetchone()
        if row is None or not start < end:
            return
        gap_from, gap_to = row[1], row[2]
        if start <= gap_from and end >= gap_to:  # (the usual: the window held back at a model switch, whole)
            gap_from = gap_to = None
        elif start <= gap_from:
            gap_from = end
        elif end >= gap_to:
            gap_to = start
        # (one inside the gap, with time missing on both sides, leaves it as it was: it counts a little more)
        self.db.execute("UPDATE telemetry SET gap_from = ?, gap_to = ? WHERE rowid = ?", (gap_from, gap_to, row[0]))

    def add_latency_many(self, rows: list[LatencyRow]) -> None:
        """Insert `latency_row`s (a window's histograms) in one transaction, each (fleet, device, window_end) once
        (a QoS 1 redelivery is a second copy)."""
        stored = self.clock()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")  # (a read then a write: see transaction())
            try:
                # never inside a span rolled up already (the controller's clock set back): it would be read
                # neither from the rollup nor as a report outside it
                rolled = self.db.execute("SELECT value FROM counters WHERE name = 'rolled_until'").fetchone()
                stored = max(stored, rolled[0]) if rolled else stored
                self.db.executemany("INSERT OR IGNORE INTO latency VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    [tuple(row) + (stored,) for row in rows])
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _has_latency(self) -> bool:
        """Whether the database has the `latency` table (a read-only one made by an older controller has not)."""
        return self._has_table("latency")

    def _has_table(self, name: str) -> bool:
        """Whether the database has table `name` of READ_IF_PRESENT (a read-only one made by an older controller
        may not)."""
        seen = self.__dict__.setdefault("_tables_seen", set())
        if name not in seen and self._exec("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                           (name,)).fetchone():
            seen.add(name)
        return name in seen

    def _rolled_spans(self, since: float) -> tuple[int, int] | None:
        """(a, b): the range from `since` reads the rollups of the spans in [a, b) and the reports stored outside
        it; None where no whole rolled-up span lies in it (or the database has no rollups: an older controller's,
        read-only)."""
        if not self._has_table("rollup"):
            return None
        # read once per ROLLED_READ_S, not once per device of a status: a rolled_until older than the database's
        # only reads more reports (rollups are never made of a span twice, reports never go with a rollup)
        kept = getattr(self, "_rolled_read", None)
        if kept is None or time.monotonic() - kept[0] > ROLLED_READ_S:
            kept = self._rolled_read = (time.monotonic(), dict(self._exec(
                "SELECT name, value FROM counters WHERE name IN ('rolled_from', 'rolled_until')")))
        got = kept[1]
        if "rolled_until" not in got:
            return None
        a = max(math.ceil(since / ROLLUP_S) * ROLLUP_S, got.get("rolled_from", 0))
        return (a, got["rolled_until"]) if a < got["rolled_until"] else None

    def roll_up(self, now: float | None = None) -> int:
        """Add up the reports of the spans of ROLLUP_S that ended ROLLUP_DELAY_S ago or more and are not rolled up
        yet, at most ROLLUP_SPANS_PER_CALL of them, each in its own transaction (the controller's writer calls it
        once a minute); a database's first call starts ROLLUP_BACKFILL_S back at most. The spans done."""
        now = self.clock() if now is None else now
        end = int((now - ROLLUP_DELAY_S) // ROLLUP_S * ROLLUP_S)
        row = self._exec("SELECT value FROM counters WHERE name = 'rolled_until'").fetchone()
        if row is None:
            first = self._exec("SELECT MIN(stored) FROM telemetry").fetchone()[0]
            start = end if first is None else max(int(first // ROLLUP_S * ROLLUP_S),
                                                  int((now - ROLLUP_BACKFILL_S) // ROLLUP_S * ROLLUP_S))
            start = min(start, end)
            with self.transaction():
                for name in ("rolled_from", "rolled_until"):
                    self.db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, start))
            self._rolled_read = None
        else:
            start = row[0]
        done = 0
        while start < end and done < ROLLUP_SPANS_PER_CALL:
            self._roll_span(start)
            start, done = start + ROLLUP_S, done + 1
        return done

    def _roll_span(self, start: int) -> None:
        """The rollup rows of the reports stored in [start, start + ROLLUP_S), and rolled_until moved past it."""
        acc: dict[tuple, list] = {}
        with self.transaction():
            # the means' parts as latency() reads them; a window's histograms count where it is covered (_exact)
            for fleet, device, version, count, errors, *values, covered, ttft, per_token in self.db.execute(
                    "SELECT t.fleet, t.device, COALESCE(t.model_version, ''), t.count, t.errors, "
                    + ", ".join(f"t.{c}" for c in MEAN_COLUMNS) + ", l.window_end IS NOT NULL AND (t.ttft_p95 IS NULL "
                    "OR l.ttft IS NOT NULL) AND (t.token_p95 IS NULL OR l.per_token IS NOT NULL), l.ttft, l.per_token "
                    "FROM telemetry t LEFT JOIN latency l ON l.fleet = t.fleet AND l.device = t.device AND "
                    "l.window_end = t.window_end WHERE t.stored >= ? AND t.stored < ?", (start, start + ROLLUP_S)):
                a = acc.get((fleet, device, version))
                if a is None:
                    a = acc[(fleet, device, version)] = [0, 0] + [0.0, 0] * len(MEAN_COLUMNS) + [0, [], []]
                a[1] += errors or 0
                if not count:
                    continue
                a[0] += count
                for i, value in enumerate(values):
                    if value is not None:
                        a[2 + 2 * i] += value * count
                        a[3 + 2 * i] += count
                if covered:
                    a[-3] += count
                    a[-2].append(ttft)
                    a[-1].append(per_token)
            rows = []
            for key, a in acc.items():
                blobs = []
                for parts in (a[-2], a[-1]):
                    held = _HistogramSum()
                    held.add(parts)
                    blobs.append(_histogram_blob(held.counts))
                rows.append(key + (start,) + tuple(a[:-2]) + tuple(blobs))
            self.db.executemany(f"INSERT OR REPLACE INTO rollup VALUES ({', '.join('?' * 19)})", rows)
            self.db.execute("INSERT OR REPLACE INTO counters VALUES ('rolled_until', ?)", (start + ROLLUP_S,))
        self._rolled_read = None  # (this store's own reads see it at once)

    def _exact(self, where: str, args: tuple, out: dict, rollup: tuple[str, tuple] | None = None) -> None:
        """Replace the window means of `out` (a `latency` or `versions` row) by the percentiles of the summed
        histograms of the telemetry windows `where` selects, where the windows that have histograms hold at
        least HISTOGRAM_COVERAGE of the requests (a histogram lost on the QoS 0 leg leaves its window out;
        an agent from before histograms leaves every window out: `out` keeps the means, and says so in
        `percentiles`). The means stay in `out["means"]`: a comparison with a figure read from means (a
        rollout baseline recorded before histograms) compares means."""
        out["percentiles"] = "window means"
        out["means"] = {k: out.get(k) for k in ("ttft_p50_ms", "ttft_p95_ms", "token_p50_ms", "token_p95_ms")}
        if not self._has_latency():
            return
        # a window counts as covered when it has a histogram of each kind its report has percentiles of (one of
        # one-token answers has no per-token gaps, in the report or the histograms)
        cursor = self._exec("SELECT l.window_end IS NOT NULL AND (t.ttft_p95 IS NULL OR l.ttft IS NOT NULL) AND "
                            "(t.token_p95 IS NULL OR l.per_token IS NOT NULL), t.count, l.ttft, l.per_token FROM "
                            "telemetry t LEFT JOIN latency l ON l.fleet = t.fleet AND l.device = t.device AND "
                            "l.window_end = t.window_end WHERE t.count > 0 AND " + where, args)
        total = covered = 0
        sums = {"ttft": _HistogramSum(), "token": _HistogramSum()}
        while rows := cursor.fetchmany(HISTOGRAM_READ_ROWS):
            total += sum(r[1] for r in rows)
            rows = [r for r in rows if r[0]]
            covered += sum(r[1] for r in rows)
            sums["ttft"].add(r[2] for r in rows)
            sums["token"].add(r[3] for r in rows)
        if rollup is not None:  # the whole spans of the range: their windows' sums (`roll_up`)
            cursor = self._exec("SELECT requests, covered, ttft, per_token FROM rollup WHERE " + rollup[0], rollup[1])
            while rows := cursor.fetchmany(HISTOGRAM_READ_ROWS):
                total += sum(r[0] or 0 for r in rows)
                covered += sum(r[1] or 0 for r in rows)
                sums["ttft"].add(r[2] for r in rows)
                sums["token"].add(r[3] for r in rows)
        if not covered or covered < HISTOGRAM_COVERAGE * total:
            return
        for kind, held in sums.items():
            p = held.percentiles()
            out[f"{kind}_p50_ms"], out[f"{kind}_p95_ms"] = p if p else (None, None)
        out["percentiles"] = "histograms"
        out["histogram_coverage"] = covered / total

    def _back_from_removal(self, rows: list[tuple], now: float) -> list[tuple[str, str]]:
        """(under the lock, in the telemetry transaction) A device removed while its agent ran (`fleet device
        remove --force`) that still sends telemetry more than REMOVED_GRACE_S after its removal is running: it is
        registered again, online, with the state it had when it was removed (a running agent publishes its
        state only when something changes: it stayed out of `fleet status` while serving, for hours). A report
        in flight at the removal does not count. The (fleet, device) pairs registered again."""
        removed = self.db.execute("SELECT fleet, device, removed, state FROM removed").fetchall()
        if not removed:
            return []
        reporting = {(row[0], row[1]) for row in rows}
        back = []
        for fleet, device, when, state in removed:
            if (fleet, device) in reporting and state and now - when >= REMOVED_GRACE_S:
                self._upsert_state(fleet, {**json.loads(state), "online": True}, now)
                back.append((fleet, device))
        return back

    def _delete_stored_before(self, table: str, cutoff: float) -> int:
        """Delete the rows of `table` (telemetry, latency) stored before `cutoff`, PRUNE_BATCH per transaction."""
        n = 0
        while True:
            deleted = self._exec(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE stored < ? "
                                 "LIMIT ?)", (cutoff, PRUNE_BATCH)).rowcount
            n += deleted
            if deleted < PRUNE_BATCH:
                return n

    def prune(self, now: float | None = None) -> int:
        """Delete telemetry and OTA statuses older than the retention, except each device's last result for
        each update (what rollouts and `fleet status` read), and offers older than the retention that no
        device follows any more: a device's offer is superseded by a newer one to it (its retained offer
        topic holds only the newest), and an offer with no device left goes unless it is the newest offer of
        its bundle (`fleet rollback --to` finds bundles there). The number of rows deleted."""
        cutoff = (self.clock() if now is None else now) - self.retention_s
        # in batches, each its own transaction under the lock: paho's network thread waits on the lock for every
        # state and OTA status, and one DELETE of millions of rows (a retention lowered on a large database) held
        # it for half a minute, every state of the fleet waiting behind it
        # reports, histograms and rollups go by whole ROLLUP_S spans (at most a span later than the retention
        # says), so that a range reads the same from the rollups as from the reports (`roll_up`): a span whose
        # rollup went while some of its reports stayed was read from neither, and rollups kept their histograms
        # for the telemetry's retention after the windows' own had gone
        span = float(ROLLUP_S)
        n = self._delete_stored_before("telemetry", cutoff // span * span)
        n += self._exec("DELETE FROM rollup WHERE bucket < ?", (cutoff // span * span,)).rowcount
        histograms = ((self.clock() if now is None else now) - self.histogram_retention_s) // span * span
        n += self._delete_stored_before("latency", histograms)
        n += self._exec("UPDATE rollup SET covered = 0, ttft = NULL, per_token = NULL WHERE bucket < ? AND "
                        "covered > 0", (histograms,)).rowcount
        n += self._exec("DELETE FROM health WHERE received < ? AND NOT EXISTS (SELECT 1 FROM devices d WHERE "
                        "d.fleet = health.fleet AND d.device = health.device)", (cutoff,)).rowcount
        # on the controller's clock (`received`; rows from before it: the device's `ts`): a box whose clock is
        # years ahead kept its statuses for ever
        n += self._exec("DELETE FROM ota_status WHERE COALESCE(received, ts) < ? AND rowid NOT IN (SELECT MAX(rowid) "
                        "FROM ota_status WHERE result IS NOT NULL GROUP BY fleet, device, update_id)",
                        (cutoff,)).rowcount
        n += self._exec(
            "DELETE FROM offer_targets WHERE rowid IN (SELECT t.rowid FROM offer_targets t "
            "JOIN offers o ON o.update_id = t.update_id "
            "JOIN (SELECT t2.fleet AS fleet, t2.device AS device, MAX(o2.created) AS newest FROM offer_targets t2 "
            "      JOIN offers o2 ON o2.update_id = t2.update_id GROUP BY t2.fleet, t2.device) m "
            "ON m.fleet = t.fleet AND m.device = t.device WHERE o.created < ? AND o.created < m.newest)",
            (cutoff,)).rowcount
        n += self._exec("DELETE FROM offers WHERE created < ? AND update_id NOT IN "
                        "(SELECT update_id FROM offer_targets) AND rowid NOT IN "
                        "(SELECT MAX(rowid) FROM offers GROUP BY bundle)", (cutoff,)).rowcount
        self._exec("DELETE FROM offer_manifests WHERE update_id NOT IN (SELECT update_id FROM offers)")
        return n

    def group_add(self, name: str, fleet: str, devices: list[str]) -> int:
        """Put devices in a group (kept if already there); how many were new."""
        before = self._exec("SELECT COUNT(*) FROM groups WHERE name=?", (name,)).fetchone()[0]
        with self._lock:
            self.db.executemany("INSERT OR IGNORE INTO groups VALUES (?,?,?)", [(name, fleet, d) for d in devices])
        return self._exec("SELECT COUNT(*) FROM groups WHERE name=?", (name,)).fetchone()[0] - before

    def group_remove(self, name: str, devices: list[str] | None = None, fleet: str | None = None) -> int:
        """Take devices (all of them when None) out of a group, of `fleet` only when given (a group may span
        fleets, and a device id may exist in more than one); how many were removed."""
        where, args = ("name=?", (name,)) if fleet is None else ("name=? AND fleet=?", (name, fleet))
        if devices is None:
            return self._exec(f"DELETE FROM groups WHERE {where}", args).rowcount
        with self._lock:
            before = self.db.total_changes
            self.db.executemany(f"DELETE FROM groups WHERE {where} AND device=?", [(*args, d) for d in devices])
            return self.db.total_changes - before

    def remove_device(self, fleet: str, device: str) -> dict[str, int]:
        """Take a device out of the registry: its row, its group memberships, the desired config recorded for
        it and the offers' targets (its chunk requests are no longer answered); rows removed per table. Its
        telemetry and OTA statuses stay as history until the retention removes them. The removal is
        remembered (`is_removed`) until the device publishes a state again."""
        removed = {}
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")  # (a read then a write: see transaction())
            try:
                row = self.db.execute("SELECT state FROM devices WHERE fleet=? AND device=?", (fleet, device)).fetchone()
                for table in ("devices", "groups", "desired", "offer_targets", "health"):
                    removed[table] = self.db.execute(f"DELETE FROM {table} WHERE fleet=? AND device=?",
                                                     (fleet, device)).rowcount
                self.db.execute("INSERT OR REPLACE INTO removed VALUES (?, ?, ?, ?)",
                                (fleet, device, self.clock(), row[0] if row else None))
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return removed

    def put_health(self, snapshots: list[tuple[str, dict]]) -> None:
        """Keep the latest DeviceHealth (a dict, `device` in it) of each device: [(fleet, health)], one
        transaction, each replacing the device's last one. The received time is the controller's clock (a
        device's `ts` is its own clock, which may be years off until NTP syncs: it orders nothing here)."""
        received = self.clock()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")  # (a read then a write: see transaction())
            try:
                self.db.executemany(
                    "INSERT INTO health VALUES (?, ?, ?, ?) ON CONFLICT(fleet, device) DO UPDATE SET "
                    "received = excluded.received, body = excluded.body",
                    [(fleet, h["device"], received, json.dumps(h)) for fleet, h in snapshots])
                self.db.executemany("UPDATE devices SET last_seen = ? WHERE fleet = ? AND device = ? AND "
                                    "last_seen < ?", [(received, f, h["device"], received) for f, h in snapshots])
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def health(self, fleet: str | None = None) -> dict[tuple[str, str], dict]:
        """The latest DeviceHealth of each device that sent one, with `received` (controller clock) added."""
        rows = self._exec("SELECT fleet, device, received, body FROM health" + (" WHERE fleet = ?" if fleet else ""),
                          (fleet,) if fleet else ()).fetchall()
        return {(f, d): {**json.loads(body), "received": received} for f, d, received, body in rows}

    def agent_versions(self) -> dict[tuple[str, str], str]:
        """Each device's agent version, from its latest state."""
        out = {}
        for f, d, state in self._exec("SELECT fleet, device, state FROM devices").fetchall():
            try:
                version = json.loads(state).get("agent_version")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(version, str):
                out[(f, d)] = version
        return out

    def signing_keys(self, fleet: str | None = None) -> dict[tuple[str, str], dict]:
        """Each device's `hardware.keys` from its latest state (`trusted`, `serving`, `rollback`: key ids; see
        agent.daemon `_signing_keys`), for the devices whose agent reports them in that shape."""
        rows = self._exec("SELECT fleet, device, state FROM devices" + (" WHERE fleet = ?" if fleet else ""),
                          (fleet,) if fleet else ()).fetchall()
        out = {}
        for f, d, state in rows:
            try:
                keys = json.loads(state).get("hardware", {}).get("keys")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(keys, dict) and _key_ids(keys.get("trusted")) and \
                    all(keys.get(k) is None or _key_ids(keys.get(k)) for k in ("serving", "rollback")):
                out[(f, d)] = {**{k: keys.get(k) for k in ("trusted", "serving", "rollback")},
                               "required": keys.get("required") if isinstance(keys.get("required"), bool) else None}
        return out

    def add_ota_status(self, fleet: str, device: str, status: dict) -> None:
        """Store an OTA status; one for an offer recorded by a controller older than `offer_targets` makes the
        device its target (see the module's docstring)."""
        if status.get("update_id") is not None:
            self._exec("INSERT OR IGNORE INTO offer_targets SELECT update_id, ?, ? FROM offer_targets WHERE "
                       "update_id = ? AND fleet = ? AND device = ? AND NOT EXISTS (SELECT 1 FROM removed WHERE "
                       "fleet = ? AND device = ?)", (fleet, device, status["update_id"], *LEGACY, fleet, device))
        self._exec("INSERT INTO ota_status (fleet, device, update_id, ts, state, result, reason, body, received) "
                   "VALUES (?,?,?,?,?,?,?,?,?)",
                   (fleet, device, status.get("update_id"), status.get("ts", time.time()), status.get("state"),
                    status.get("result"), status.get("reason"), json.dumps(status), self.clock()))

    def add_offer(self, update_id: str, bundle: Path, version: str, fleet: str | None = None,
                  device: str | None = None, manifest_sha256: str | None = None) -> None:
        """Record an offer; with `fleet` and `device`, the device it is made to (whose chunk requests for
        this update the chunk server then answers); `manifest_sha256`: of the manifest.json offered (the
        chunk server serves that manifest's chunks only)."""
        # (a table of its own, not a column of `offers`: a controller of the version before, still running while a
        # command of this one opened the database, inserts four values into `offers` and would fail on a fifth column)
        self._exec("INSERT OR REPLACE INTO offers VALUES (?,?,?,?)", (update_id, str(bundle), version, self.clock()))
        if manifest_sha256 is not None:
            self._exec("INSERT OR REPLACE INTO offer_manifests VALUES (?,?)", (update_id, manifest_sha256))
        if device is not None:
            self._exec("INSERT OR IGNORE INTO offer_targets VALUES (?,?,?)", (update_id, fleet, device))

    def count(self, name: str, n: int = 1) -> None:
        self._exec("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                   (name, n, n))

    # --- reads -----------------------------------------------------------------------------
    def offers(self) -> dict[str, Path]:
        return {u: Path(b) for u, b in self._exec("SELECT update_id, bundle FROM offers").fetchall()}

    def offered_to(self, update_id: str, fleet: str, device: str) -> Path | None:
        """The bundle of update `update_id` if it was offered to `fleet`/`device`, else None."""
        row = self._exec("SELECT o.bundle FROM offers o JOIN offer_targets t ON t.update_id = o.update_id "
                         "WHERE o.update_id=? AND t.fleet=? AND t.device=?", (update_id, fleet, device)).fetchone()
        return Path(row[0]) if row else None

    def offer_version(self, update_id: str) -> str | None:
        """The bundle version recorded with an offer (its manifest's, when it was offered)."""
        return (self.offered_manifest(update_id) or (None, None))[0]

    def other_builds(self, name: str, version: str, manifest_sha256: str) -> list[tuple[str, str]]:
        """Offers of bundle `name` `version` (update ids `name-version-<digits>`, as `FleetController.offer` makes
        them: the offer's time, in ms before, µs now) recorded with another manifest than `manifest_sha256`: (update
        id, its manifest sha256), oldest first."""
        rows = self._exec("SELECT o.update_id, m.manifest_sha256 FROM offers o JOIN offer_manifests m ON m.update_id = "
                          "o.update_id WHERE o.version = ? AND m.manifest_sha256 != ? ORDER BY o.created",
                          (version, manifest_sha256)).fetchall()
        mine = re.compile(rf"{re.escape(name)}-{re.escape(version)}-\d+")  # (not bundle "edge-1.0" 1.0 for "edge" 1.0)
        return [(u, m) for u, m in rows if mine.fullmatch(u)]

    def offered_manifest(self, update_id: str) -> tuple[str, str | None] | None:
        """(version, manifest sha256) recorded with an offer (the sha256 None for an older controller's)."""
        row = self._exec("SELECT o.version, m.manifest_sha256 FROM offers o LEFT JOIN offer_manifests m ON m.update_id "
                         "= o.update_id WHERE o.update_id=?", (update_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def desired(self, fleet: str, device: str) -> dict | None:
        """The desired config this controller last published for the device (its whole remote layer)."""
        row = self._exec("SELECT settings FROM desired WHERE fleet = ? AND device = ?", (fleet, device)).fetchone()
        return json.loads(row[0]) if row else None

    def next_desired_version(self, targets: list[tuple[str, str]], now_ms: int) -> int:
        """The version of a desired config for `targets` published now: the controller's clock in ms, but above
        every version recorded for them or applied by them (their reported state). A clock stepped back (an NTP
        correction, a restored VM) gave versions the agents ignore as older, with no way to publish above."""
        newest = -1
        for fleet, device in targets:
            row = self._exec("SELECT MAX(v) FROM (SELECT version AS v FROM desired WHERE fleet=? AND device=? UNION ALL "
                             "SELECT applied_config_version FROM devices WHERE fleet=? AND device=?)",
                             (fleet, device, fleet, device)).fetchone()
            if row and row[0] is not None:
                newest = max(newest, int(row[0]))
        if newest >= now_ms:
            log.warning("the controller's clock (%d ms) is not past the last desired config version %d of %s: "
                        "version %d is used; check the controller's clock (NTP)", now_ms, newest,
                        ", ".join(f"{f}/{d}" for f, d in targets[:3]) + (" ..." if len(targets) > 3 else ""),
                        newest + 1)
            return newest + 1
        return now_ms

    def record_desired(self, fleet: str, device: str, version: int, settings: dict) -> None:
        self._exec("INSERT INTO desired VALUES (?, ?, ?, ?) ON CONFLICT(fleet, device) DO UPDATE SET "
                   "version = excluded.version, settings = excluded.settings",
                   (fleet, device, version, json.dumps(settings, sort_keys=True)))

    def counter(self, name: str) -> int:
        row = self._exec("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def devices(self, fleet: str | None = None) -> list[dict]:
        sql = ("SELECT fleet, device, online, last_seen, model_name, model_version, execution_path, active_slot, "
               "applied_config_version, last_config_error FROM devices")
        rows = self._exec(sql + (" WHERE fleet = ?" if fleet else "") + " ORDER BY fleet, device",
                          (fleet,) if fleet else ()).fetchall()
        keys = ("fleet", "device", "online", "last_seen", "model_name", "model_version", "execution_path",
                "active_slot", "applied_config_version", "last_config_error")
        heard = self.clock() - self.silent_after_s
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            # online by its last state, but nothing from it since: `silent`, and offline for everything that asks
            d["silent"] = bool(d["online"]) and d["last_seen"] < heard
            if d["silent"]:
                d["online"] = 0
            out.append(d)
        return out

    def latency(self, fleet: str, device: str, since: float, model_version: str | None = None) -> dict:
        """Latency of one device from the reports stored since `since` (the controller's clock, whatever
        the device's says): the TTFT and per-token p50/p95 of all its requests in the range, read off the sum of
        the windows' histograms (within 1%; `percentiles: "histograms"`), the request-weighted mean tokens/s.

        Where a window with requests in the range has no histograms (an agent from before them, or with
        telemetry.histograms off, a histogram lost or older than HISTOGRAM_RETENTION_S) the percentiles are
        request-weighted means of the window percentiles instead (`percentiles: "window means"`): each weighted
        by the requests of the windows that have it (a window of one-token answers has no per-token
        percentiles); None when no window in the range has it."""
        # tokens/s request-weighted like the rest (and like `versions`: a plain mean of windows gave the same device
        # 55 tok/s here and 10 in the versions table)
        version = " AND model_version=?" if model_version is not None else ""
        args: tuple = (fleet, device, since) + ((model_version,) if model_version is not None else ())
        spans = self._rolled_spans(since)
        outside = " AND NOT (stored>=? AND stored<?)" if spans else ""
        sums = _Sums()
        sums.add(*self._exec(f"SELECT {_RAW_SUMS} FROM telemetry WHERE fleet=? AND device=? AND stored>=?{version}"
                             f"{outside}", args + (spans or ())).fetchone())
        rollup = None
        if spans:
            rollup = (f"fleet=? AND device=? AND bucket>=? AND bucket<?{version}",
                      (fleet, device) + spans + ((model_version,) if model_version is not None else ()))
            sums.add(*self._exec(f"SELECT {_ROLLUP_SUMS} FROM rollup WHERE {rollup[0]}", rollup[1]).fetchone())
        if not sums.requests:
            return {"requests": 0, "errors": sums.errors}
        out = {"requests": sums.requests, "errors": sums.errors, **sums.means()}
        self._exact("t.fleet=? AND t.device=? AND t.stored>=?" + version.replace("model", "t.model") +
                    outside.replace("stored", "t.stored"), args + (spans or ()), out, rollup)
        return out

    def histogram_senders(self) -> set[tuple[str, str]]:
        """(fleet, device) of the agents that sent latency histograms (within their retention, a day)."""
        if not self._has_latency():
            return set()
        return {(f, d) for f, d in self._exec("SELECT DISTINCT fleet, device FROM latency").fetchall()}

    def served_versions(self, since_s: float = 86400.0) -> set[str]:
        """Model versions some device (of any fleet) is known to have served: one a device runs now, one an update
        committed (within the retention), one telemetry was stored under in the last `since_s` (read on the
        `stored` index: a whole week's table of a large fleet is hundreds of millions of rows)."""
        rows = self._exec("SELECT model_version FROM devices UNION SELECT DISTINCT model_version FROM telemetry "
                          "WHERE stored >= ? UNION SELECT o.version FROM offers o WHERE EXISTS (SELECT 1 FROM "
                          "ota_status s WHERE s.update_id = o.update_id AND s.result = 'committed')",
                          (self.clock() - since_s,)).fetchall()
        return {v for (v,) in rows if v}

    def telemetry_losses(self, fleet: str | None, since: float) -> dict[tuple[str, str], dict]:
        """What is missing of each device's telemetry, from the reports stored since `since`, by device (only those
        missing some): `lost_reports`, the reports the device said it lost (its offline buffer overflowed during an
        outage: the `dropped_reports` of the first report after it); `missing_gaps` and `missing_s`, the gaps
        between its reports while its agent ran (see with_gap: reports lost on the way, the broker's or the
        device's buffer) and their seconds within the range."""
        where, args = (" AND fleet=?", (fleet,)) if fleet else ("", ())
        # a gap counts within the range: at most from the range's start to when the report after it was stored (a
        # gap is the device's clock, the range the controller's: that is as near as they compare)
        return {(f, d): {"lost_reports": lost or 0, "missing_gaps": gaps, "missing_s": seconds or 0.0}
                for f, d, lost, gaps, seconds in self._exec(
                    "SELECT fleet, device, SUM(dropped), COUNT(gap_from), SUM(MIN(gap_to - gap_from, stored - ?)) "
                    "FROM telemetry WHERE stored>=? AND (dropped>0 OR gap_from IS NOT NULL)" + where +
                    " GROUP BY fleet, device", (since, since) + args).fetchall()}

    def last_window_end(self, fleet: str, device: str) -> float | None:
        """The latest window_end of the device's stored reports (None: none stored)."""
        return self._exec("SELECT MAX(window_end) FROM telemetry WHERE fleet=? AND device=?",
                          (fleet, device)).fetchone()[0]

    def device_run(self, fleet: str, device: str) -> tuple[str, float] | None:
        """The run of its agent the device's stored state names: (run id, when it started by the device's clock),
        or None (no state, or an agent that does not say)."""
        # (or, for a device removed from the registry, the state it had then: its agent may still run, and its
        # reports register it again: `_back_from_removal`)
        row = self._exec("SELECT state FROM devices WHERE fleet=? AND device=? UNION ALL SELECT state FROM removed "
                         "WHERE fleet=? AND device=? AND state IS NOT NULL", (fleet, device, fleet, device)).fetchone()
        return state_run(json.loads(row[0])) if row else None

    def last_result(self, fleet: str, device: str, update_id: str) -> dict | None:
        # the latest to arrive, not the latest by the device's clock (edge clocks step: a canary that committed
        # and then went back on probation, its clock set back meanwhile, read "committed")
        row = self._exec("SELECT body FROM ota_status WHERE fleet=? AND device=? AND update_id=? AND result IS NOT NULL "
                         "ORDER BY rowid DESC LIMIT 1", (fleet, device, update_id)).fetchone()
        return json.loads(row[0]) if row else None

    def last_results(self, fleet: str | None = None) -> dict[tuple[str, str], dict]:
        """Each device's latest OTA result to arrive: (fleet, device) -> {update_id, result, reason, ts} (ts: the
        device's clock)."""
        where, args = (" AND fleet=?", (fleet,)) if fleet else ("", ())
        rows = self._exec("SELECT fleet, device, update_id, result, reason, ts, MAX(rowid) FROM ota_status WHERE "
                          "result IS NOT NULL" + where + " GROUP BY fleet, device", args).fetchall()
        return {(f, d): {"update_id": u, "result": res, "reason": reason, "ts": ts}
                for f, d, u, res, reason, ts, _ in rows}

    def groups(self) -> dict[str, list[tuple[str, str]]]:
        """Every assigned group: name -> sorted (fleet, device) members."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name, fleet, device in self._exec("SELECT name, fleet, device FROM groups ORDER BY name, fleet, device"):
            out.setdefault(name, []).append((fleet, device))
        return out

    def fleets(self) -> list[str]:
        return [r[0] for r in self._exec("SELECT DISTINCT fleet FROM devices ORDER BY fleet").fetchall()]

    def versions(self, fleet: str | None = None, since: float = 0.0) -> list[dict]:
        """One row per model version: its devices (all, online, model names) and, from the telemetry
        reports tagged with that version stored since `since`, the percentiles of all their requests (as
        `latency`: from the histograms where every window has them, else request-weighted means of the window
        percentiles), the request-weighted mean tokens/s and the error rate errors/(requests+errors)."""
        where, args = (" WHERE fleet=?", (fleet,)) if fleet else ("", ())
        rows: dict[str | None, dict] = {}
        for version, names, n, online in self._exec(
                "SELECT model_version, GROUP_CONCAT(DISTINCT model_name), COUNT(*), "
                "SUM(online AND last_seen >= ?) FROM devices" + where + " GROUP BY model_version",
                (self.clock() - self.silent_after_s,) + args).fetchall():
            rows[version] = {"model_version": version, "model_names": sorted((names or "").split(",")) if names
                             else [], "devices": n, "online": online or 0}
        in_fleet = " AND fleet=?" if fleet else ""
        spans = self._rolled_spans(since)
        outside = " AND NOT (stored>=? AND stored<?)" if spans else ""
        sums: dict[str | None, _Sums] = {}
        for version, *parts in self._exec(f"SELECT model_version, {_RAW_SUMS} FROM telemetry WHERE stored>=?{in_fleet}"
                                          f"{outside} GROUP BY model_version", (since,) + args + (spans or ())):
            sums.setdefault(version, _Sums()).add(*parts)
        if spans:
            for version, *parts in self._exec(f"SELECT model_version, {_ROLLUP_SUMS} FROM rollup WHERE bucket>=? AND "
                                              f"bucket<?{in_fleet} GROUP BY model_version", spans + args):
                sums.setdefault(version or None, _Sums()).add(*parts)  # ('' is a report of no model version)
        for version, total in sums.items():
            row = rows.setdefault(version, {"model_version": version, "model_names": [], "devices": 0, "online": 0})
            requests, errors = total.requests, total.errors
            row.update(total.means(), requests=requests, errors=errors,
                       error_rate=errors / (requests + errors) if requests + errors else None)
            if requests:
                self._exact("t.stored>=?" + in_fleet.replace("fleet", "t.fleet") + (
                    " AND t.model_version=?" if version is not None else " AND t.model_version IS NULL") +
                    outside.replace("stored", "t.stored"),
                    (since,) + args + ((version,) if version is not None else ()) + (spans or ()), row,
                    (f"bucket>=? AND bucket<?{in_fleet} AND model_version=?", spans + args + (version or "",))
                    if spans else None)
        empty = {"requests": 0, "errors": 0, "error_rate": None, "ttft_p50_ms": None, "ttft_p95_ms": None,
                 "token_p50_ms": None, "token_p95_ms": None, "tokens_per_s": None, "percentiles": None}
        rows = {v: r for v, r in rows.items()  # no model: a row only while devices or traffic have none
                if v is not None or r["devices"] or r.get("requests") or r.get("errors")}
        return [{**empty, **rows[v]} for v in sorted(rows, key=lambda v: (v is None, v or ""))]

    def ingest_lag(self, since_stored: float) -> list[float]:
        """`stored - window_end` of every report stored since `since_stored`, seconds (benchmarks)."""
        return [r[0] for r in self._exec("SELECT stored - window_end FROM telemetry WHERE stored>=?",
                                         (since_stored,)).fetchall()]
