"""The controller's store: devices, latency telemetry, OTA status and offers, in SQLite.

One file (default `fleet.db`), written by `edgeglm fleet serve` and read by `edgeglm fleet
status`; SQLite's WAL mode lets the status command read while the controller writes.
Telemetry older than the retention is deleted as new reports arrive.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, online INTEGER NOT NULL, last_seen REAL NOT NULL,
    model_name TEXT, model_version TEXT, execution_path TEXT, active_slot TEXT,
    applied_config_version INTEGER, last_config_error TEXT, state TEXT NOT NULL,
    PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model_version TEXT, window_end REAL NOT NULL, count INTEGER,
    ttft_p50 REAL, ttft_p95 REAL, token_p50 REAL, token_p95 REAL, tokens_per_s REAL, errors INTEGER);
CREATE INDEX IF NOT EXISTS telemetry_by_device ON telemetry (fleet, device, window_end);
CREATE TABLE IF NOT EXISTS ota_status (
    fleet TEXT NOT NULL, device TEXT NOT NULL, update_id TEXT, ts REAL NOT NULL, state TEXT, result TEXT,
    reason TEXT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offers (
    update_id TEXT PRIMARY KEY, bundle TEXT NOT NULL, version TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Store:
    def __init__(self, path: str | Path, retention_s: float = 7 * 86400):
        self.path = Path(path)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self.db.execute(sql, args)

    # --- writes (from the controller's MQTT handlers) -------------------------------------
    def upsert_state(self, fleet: str, state: dict) -> None:
        model = state.get("model") or {}
        self._exec(
            "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET "
            "online=excluded.online, last_seen=excluded.last_seen, model_name=excluded.model_name, "
            "model_version=excluded.model_version, execution_path=excluded.execution_path, "
            "active_slot=excluded.active_slot, applied_config_version=excluded.applied_config_version, "
            "last_config_error=excluded.last_config_error, state=excluded.state",
            (fleet, state["device"], int(state["online"]), time.time(), model.get("name"), model.get("version"),
             state.get("execution_path"), state.get("active_slot"), state.get("applied_config_version"),
             state.get("last_config_error"), json.dumps(state)))

    def add_telemetry(self, fleet: str, r: dict) -> None:
        ttft, tok = r.get("ttft_ms") or {}, r.get("per_token_ms") or {}
        self._exec("INSERT INTO telemetry VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (fleet, r["device"], r.get("model_version"), r["window_end"], r["count"], ttft.get("p50"),
                    ttft.get("p95"), tok.get("p50"), tok.get("p95"), r.get("tokens_per_s"), r.get("errors", 0)))
        self._exec("DELETE FROM telemetry WHERE window_end < ?", (time.time() - self.retention_s,))

    def add_ota_status(self, fleet: str, device: str, status: dict) -> None:
        self._exec("INSERT INTO ota_status VALUES (?,?,?,?,?,?,?,?)",
                   (fleet, device, status.get("update_id"), status.get("ts", time.time()), status.get("state"),
                    status.get("result"), status.get("reason"), json.dumps(status)))

    def add_offer(self, update_id: str, bundle: Path, version: str) -> None:
        self._exec("INSERT OR REPLACE INTO offers VALUES (?,?,?,?)", (update_id, str(bundle), version, time.time()))

    def count(self, name: str, n: int = 1) -> None:
        self._exec("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                   (name, n, n))

    # --- reads -----------------------------------------------------------------------------
    def offers(self) -> dict[str, Path]:
        return {u: Path(b) for u, b in self._exec("SELECT update_id, bundle FROM offers").fetchall()}

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
        return [dict(zip(keys, r)) for r in rows]

    def latency(self, fleet: str, device: str, since: float, model_version: str | None = None) -> dict:
        """Latency of one device since `since`: request-weighted means of the window percentiles."""
        sql = ("SELECT SUM(count), SUM(ttft_p50*count), SUM(ttft_p95*count), SUM(token_p50*count), "
               "SUM(token_p95*count), AVG(tokens_per_s), SUM(errors) FROM telemetry "
               "WHERE fleet=? AND device=? AND window_end>=? AND count>0")
        args: tuple = (fleet, device, since)
        if model_version is not None:
            sql += " AND model_version=?"
            args += (model_version,)
        n, t50, t95, k50, k95, tps, errors = self._exec(sql, args).fetchone()
        if not n:
            return {"requests": 0, "errors": errors or 0}
        return {"requests": n, "ttft_p50_ms": t50 / n, "ttft_p95_ms": t95 / n, "token_p50_ms": k50 / n,
                "token_p95_ms": k95 / n, "tokens_per_s": tps, "errors": errors or 0}

    def last_result(self, fleet: str, device: str, update_id: str) -> dict | None:
        row = self._exec("SELECT body FROM ota_status WHERE fleet=? AND device=? AND update_id=? AND result IS NOT NULL "
                         "ORDER BY ts DESC LIMIT 1", (fleet, device, update_id)).fetchone()
        return json.loads(row[0]) if row else None
