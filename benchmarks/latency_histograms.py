"""Fleet latency from histograms against request-weighted means of window percentiles: how far each is from the
true percentile, and what reading them costs `fleet status` and /metrics.

    python benchmarks/latency_histograms.py                       # 100 and 1,000 devices, an hour of 30 s windows
    python benchmarks/latency_histograms.py --devices 2000 --windows 60 --repeats 5

Accuracy: simulated canaries serve an hour of traffic through the agent's own LatencyWindow (agent.telemetry):
windows of many short answers at one per-token speed and windows of a few long answers at another, in mixes that
change from device to device. Per device, the per-token p95 the controller reads (fleet.store.Store.latency) is
compared with numpy's p95 ("lower" rank) of every per-token gap the device recorded: the relative error of the
histograms' figure and of the window means' (the same reports, the latency table hidden), median and worst.

Cost: a fleet database (temporary directory) of N devices, each with `--windows` reports with requests and their
histograms, each stored when its window ended and rolled up (fleet.store.Store.roll_up, 5-minute spans);
`fleet status` (format_status) and a /metrics scrape (prometheus_metrics) timed three ways, side by side,
`--repeats` times interleaved: from the rollups (what the controller reads now), from the reports with their
histograms (rollups hidden), and from the window means (histograms hidden too: what the controller read before
histograms); medians and their ratios; and the peak Python memory one `fleet status` allocates (tracemalloc),
each way. Numbers go to docs/scaling.md.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import Parser, int_list, positive_int  # noqa: E402

import numpy as np  # noqa: E402

from agent.telemetry import LatencyWindow  # noqa: E402
from fleet.controller import format_status, prometheus_metrics  # noqa: E402
from fleet.store import Store, latency_row, telemetry_row  # noqa: E402

FLEET = "bench"


def device_traffic(rng: random.Random, device: str, windows: int, t0: float):
    """Reports (with histograms) of one device over `windows` 30 s windows, and all its per-token gaps in ms."""
    window = LatencyWindow(label=("1.0.0", "onnxruntime:cpu"))
    short_ms, long_ms = rng.uniform(15, 25), rng.uniform(20, 50)  # long answers slower per token (KV grows)
    share_long = rng.uniform(0.1, 0.6)  # of the windows: the mix differs from device to device
    reports, gaps_ms = [], []
    for i in range(windows):
        answers = [(200, long_ms)] * rng.randint(1, 2) if rng.random() < share_long else \
            [(rng.randint(3, 8), short_ms)] * rng.randint(10, 30)
        for tokens, per_token in answers:
            gaps = [per_token * rng.uniform(0.9, 1.1) / 1000 for _ in range(tokens - 1)]
            window.record(0.05 * rng.uniform(0.8, 1.2), gaps, tokens, sum(gaps))
            gaps_ms += [g * 1000 for g in gaps]
        reports += window.take(device, now=t0 + 30 * (i + 1))
    return reports, gaps_ms


def build(path: Path, devices: int, windows: int, seed: int):
    """The fleet database: each window's reports stored when it ended (the store's clock), the newest a few
    minutes ahead of now so that `fleet status`' last hour holds them all while the benchmark runs; then rolled
    up (`Store.roll_up`, as the controller's writer does once a minute)."""
    t0 = time.time() - 30 * windows + 300
    at = [t0]
    store = Store(path, clock=lambda: at[0])
    rng = random.Random(seed)
    truth, traffic = {}, {}
    for d in range(devices):
        name = f"d{d}"
        store.upsert_state(FLEET, {"device": name, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        traffic[name], gaps = device_traffic(rng, name, windows, t0)
        truth[name] = float(np.percentile(gaps, 95, method="lower"))
    for w in range(windows):
        at[0] = t0 + 30 * (w + 1)
        reports = [traffic[name][w] for name in traffic]
        store.add_telemetry_many([telemetry_row(FLEET, r.model_dump()) for r in reports])
        store.add_latency_many([latency_row(FLEET, r._histograms.model_dump()) for r in reports if r._histograms])
    while store.roll_up(now=at[0] + 60):
        pass
    store.clock = time.time
    return store, truth, t0


def errors(store: Store, truth: dict, since: float) -> list[float]:
    return [abs(store.latency(FLEET, d, since, "1.0.0")["token_p95_ms"] / p95 - 1) for d, p95 in truth.items()]


def main() -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int_list, default=[100, 1000], help="fleet sizes (default 100,1000)")
    parser.add_argument("--windows", type=positive_int, default=120, help="30 s windows per device (default 120)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes per way (default 3)")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"{args.windows} windows of 30 s per device")
    print("| devices | p95 error, histograms (median / worst) | p95 error, window means (median / worst) | "
          "status from reports: histograms / means | status from rollups / from reports | /metrics from reports: "
          "histograms / means | /metrics from rollups / from reports | status peak memory: histograms / means / "
          "rollups |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            store, truth, _ = build(Path(tmp) / "fleet.db", n, args.windows, seed=n)
            since = time.time() - 3600
            hist = errors(store, truth, since)
            real, rolled = store._has_latency, store._rolled_spans
            store._rolled_spans = lambda since: None  # the rollups hidden: every range read from the reports
            assert errors(store, truth, since) == hist  # (the same figures both ways)
            store._has_latency = lambda: False  # the latency table hidden: what the controller read before
            means = errors(store, truth, since)
            ways = {"rollups": (real, rolled), "histograms": (real, lambda since: None),
                    "means": (lambda: False, lambda since: None)}
            times = {(what, way): [] for what in ("status", "metrics") for way in ways}
            for _ in range(args.repeats):
                for way, (has_latency, spans) in ways.items():
                    store._has_latency, store._rolled_spans = has_latency, spans
                    t = time.perf_counter()
                    format_status(store, FLEET)
                    times[("status", way)].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    prometheus_metrics(store, True)
                    times[("metrics", way)].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            peak = {}  # MB of Python memory a status allocates at its peak (tracemalloc: a pass of its own)
            for way, (has_latency, spans) in ways.items():
                store._has_latency, store._rolled_spans = has_latency, spans
                tracemalloc.start()
                format_status(store, FLEET)
                peak[way] = tracemalloc.get_traced_memory()[1] / 1e6
                tracemalloc.stop()

            def cell(what: str) -> str:
                h, m, r = (med[(what, way)] for way in ("histograms", "means", "rollups"))
                return f"{h:.3f} s / {m:.3f} s = {h / m:.2f}x | {r:.3f} s = {r / h:.2f}x"

            print(f"| {n} | {100 * statistics.median(hist):.2f}% / {100 * max(hist):.2f}% | "
                  f"{100 * statistics.median(means):.1f}% / {100 * max(means):.1f}% | {cell('status')} | "
                  f"{cell('metrics')} | {peak['histograms']:.1f} MB / {peak['means']:.1f} MB / "
                  f"{peak['rollups']:.1f} MB |", flush=True)
            store.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
