"""The fleet database's size per device at its retention, measured by table, against the controller's PVC.

    python benchmarks/database_size.py                    # 200 busy, then 200 idle devices, an hour of 30 s windows
    python benchmarks/database_size.py --devices 500 --windows 240

Two fleet databases (temporary directories) are filled as the controller fills them: `--devices` busy devices,
each window with requests and its latency histograms (the traffic of benchmarks/latency_histograms.py), and as
many idle ones (a report per window, no requests, no histograms); each report stored when its window ended, then
rolled up (fleet.store.Store.roll_up) and VACUUMed. SQLite's dbstat gives the bytes of each table and index; per
report they are what the database holds at steady state: reports and their rollups for `[database]
retention_s` (default 7 days), histograms for HISTOGRAM_RETENTION_S (a day). Printed: bytes per report by
table, the bytes per device at the default retention (30 s windows), and the fleet sizes that fill the K3s
controller's 10 GiB volume (k3s/base/core/controller.yaml) side by side with 1,000 and 10,000 devices.
Numbers go to docs/scaling.md ("Database size").
"""

from __future__ import annotations

import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import Parser, positive_int  # noqa: E402

from fleet.store import HISTOGRAM_RETENTION_S, Store, latency_row, telemetry_row  # noqa: E402
from latency_histograms import FLEET, device_traffic  # noqa: E402

RETENTION_S = 7 * 86400.0  # fleet.config's default [database] retention_s
INTERVAL_S = 30.0  # the agents' default telemetry.interval_s
PVC_BYTES = 10 << 30  # the controller's volume as shipped


def fill(path: Path, devices: int, windows: int, busy: bool) -> None:
    """`devices` devices x `windows` reports, each stored when its window ended, rolled up, VACUUMed."""
    t0 = time.time() - INTERVAL_S * windows
    at = [t0]
    store = Store(path, clock=lambda: at[0])
    rng = random.Random(1)
    traffic = {}
    for d in range(devices):
        store.upsert_state(FLEET, {"device": f"d{d}", "online": True, "model": {"name": "m", "version": "1.0.0"}})
        if busy:
            traffic[f"d{d}"] = device_traffic(rng, f"d{d}", windows, t0)[0]
    for w in range(windows):
        at[0] = t0 + INTERVAL_S * (w + 1)
        if busy:
            reports = [traffic[name][w] for name in traffic]
            store.add_telemetry_many([telemetry_row(FLEET, r.model_dump()) for r in reports])
            store.add_latency_many([latency_row(FLEET, r._histograms.model_dump()) for r in reports
                                    if r._histograms])
        else:  # a report per window, no request: no percentiles, no histograms
            store.add_telemetry_many([telemetry_row(FLEET, {
                "device": f"d{d}", "window_start": at[0] - INTERVAL_S, "window_end": at[0], "count": 0, "errors": 0,
                "model_version": "1.0.0"}) for d in range(devices)])
    while store.roll_up(now=at[0] + 600):
        pass
    store.db.execute("VACUUM")
    store.close()


def measure(devices: int, windows: int, busy: bool) -> dict[str, float]:
    """Bytes per report of each table and index (dbstat)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.db"
        fill(path, devices, windows, busy)
        db = sqlite3.connect(path)
        sizes = dict(db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
        db.close()
    return {name: size / (devices * windows) for name, size in sizes.items()}


HISTOGRAMS = {"latency", "sqlite_autoindex_latency_1", "latency_by_stored"}  # kept HISTOGRAM_RETENTION_S


def per_device(per_report: dict[str, float]) -> float:
    """Bytes a device holds in the database at steady state: reports (and rollups) for RETENTION_S, histograms
    for HISTOGRAM_RETENTION_S, one report per INTERVAL_S. An upper bound: a rollup is counted with its histograms
    all along (they go after a day)."""
    # (the tables that grow with reports: the registry and the rest grow with devices, a few KB)
    kept = sum(v for k, v in per_report.items() if k.startswith(("telemetry", "rollup", "sqlite_autoindex_rollup")))
    day = sum(v for k, v in per_report.items() if k in HISTOGRAMS)
    return (kept * RETENTION_S + day * HISTOGRAM_RETENTION_S) / INTERVAL_S


def main() -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=positive_int, default=200, help="devices of each kind (default 200)")
    parser.add_argument("--windows", type=positive_int, default=120, help="30 s windows per device (default 120)")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, sqlite "
          f"{sqlite3.sqlite_version}; {args.devices} devices x {args.windows} windows of {INTERVAL_S:.0f} s, "
          f"rolled up, VACUUMed")
    busy, idle = measure(args.devices, args.windows, True), measure(args.devices, args.windows, False)
    print("| table or index | bytes per report, busy device | idle device |")
    print("|---|---|---|")
    for name in sorted(busy, key=lambda k: -busy[k]):
        if busy[name] >= 0.5 or idle.get(name, 0) >= 0.5:
            print(f"| {name} | {busy[name]:.1f} | {idle.get(name, 0):.1f} |")
    b, i = per_device(busy), per_device(idle)
    print(f"\nper device, 7 days of reports and rollups and a day of histograms, a report every {INTERVAL_S:.0f} s: "
          f"busy {b / 1e6:.2f} MB, idle {i / 1e6:.2f} MB")
    print("| busy devices | database | / the controller's 10 GiB volume |")
    print("|---|---|---|")
    for n in (1000, int(PVC_BYTES // b), 10000):
        print(f"| {n} | {n * b / 2 ** 30:.1f} GiB | {n * b / PVC_BYTES:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
