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
histograms; `fleet status` (format_status) and a /metrics scrape (prometheus_metrics) timed with the histograms,
then with them hidden (window means, what the controller read before), side by side, `--repeats` times
interleaved; medians and the histograms / means ratio; and the peak Python memory one `fleet status` allocates
(tracemalloc), both ways. Numbers go to docs/scaling.md.
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
    store = Store(path)
    rng = random.Random(seed)
    t0 = time.time() - 30 * windows
    truth = {}
    for d in range(devices):
        name = f"d{d}"
        store.upsert_state(FLEET, {"device": name, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        reports, gaps = device_traffic(rng, name, windows, t0)
        store.add_telemetry_many([telemetry_row(FLEET, r.model_dump()) for r in reports])
        store.add_latency_many([latency_row(FLEET, r._histograms.model_dump()) for r in reports if r._histograms])
        truth[name] = float(np.percentile(gaps, 95, method="lower"))
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
          "status: histograms / means | /metrics: histograms / means | status peak memory: histograms / means |")
    print("|---|---|---|---|---|---|")
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            store, truth, _ = build(Path(tmp) / "fleet.db", n, args.windows, seed=n)
            # every row was stored now (the store's clock): the last hour covers them all
            hist = errors(store, truth, store.clock() - 3600)
            real = store._has_latency
            store._has_latency = lambda: False  # the latency table hidden: what the controller read before
            means = errors(store, truth, store.clock() - 3600)
            times = {("status", True): [], ("status", False): [], ("metrics", True): [], ("metrics", False): []}
            for _ in range(args.repeats):
                for with_histograms in (True, False):
                    store._has_latency = real if with_histograms else (lambda: False)
                    t = time.perf_counter()
                    format_status(store, FLEET)
                    times[("status", with_histograms)].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    prometheus_metrics(store, True)
                    times[("metrics", with_histograms)].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            peak = {}  # MB of Python memory a status allocates at its peak (tracemalloc: a pass of its own)
            for with_histograms in (True, False):
                store._has_latency = real if with_histograms else (lambda: False)
                tracemalloc.start()
                format_status(store, FLEET)
                peak[with_histograms] = tracemalloc.get_traced_memory()[1] / 1e6
                tracemalloc.stop()
            print(f"| {n} | {100 * statistics.median(hist):.2f}% / {100 * max(hist):.2f}% | "
                  f"{100 * statistics.median(means):.1f}% / {100 * max(means):.1f}% | "
                  f"{med[('status', True)]:.3f} s / {med[('status', False)]:.3f} s = "
                  f"{med[('status', True)] / med[('status', False)]:.2f}x | "
                  f"{med[('metrics', True)]:.3f} s / {med[('metrics', False)]:.3f} s = "
                  f"{med[('metrics', True)] / med[('metrics', False)]:.2f}x | "
                  f"{peak[True]:.1f} MB / {peak[False]:.1f} MB |", flush=True)
            store.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
