"""Rollups: a range read gives the same figures from the 5-minute rollups as from the reports themselves.

`fleet status`, /metrics and the rollout gate read a range of each device's reports (`Store.latency`) and of
each model version's (`Store.versions`): at 1,000 devices x an hour of 30 s windows that is 120,000 reports and
their histograms per read. The controller's writer adds up each ROLLUP_S span of reports once it has ended
(`Store.roll_up`); a read takes the rollups of the whole spans in its range and the reports at its two ends.
The reference here is the same store read before any rollup (reports only), on traffic made by the agent's own
LatencyWindow: model switches, windows whose histograms were lost, windows of failures only, one-token answers.
"""

from __future__ import annotations

import random

import pytest

from agent.telemetry import LatencyWindow
from fleet.store import ROLLUP_DELAY_S, ROLLUP_S, ROLLUP_SPANS_PER_CALL, Store, latency_row, telemetry_row

FLEET = "roll"
T0 = 1_800_000_000.0  # a multiple of ROLLUP_S


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fill(store: Store, clock: Clock, rng: random.Random, devices: int = 4, windows: int = 60) -> None:
    """`windows` 30 s windows per device, each stored when it ends (the store's clock), in mixed shapes."""
    traffic = {f"d{i}": LatencyWindow(label=("1.0.0", "onnxruntime:cpu")) for i in range(devices)}
    for w in range(windows):
        clock.now = T0 + 30 * (w + 1) + rng.uniform(0, 3)
        for device, window in traffic.items():
            if device == "d1" and w == windows // 2:  # d1 is updated halfway
                window.switch(("2.0.0", "onnxruntime:cpu"), now=clock.now - 15)
            if device == "d2" and w % 7 == 3:  # a window of failures only
                window.record_error(2)
            elif rng.random() < 0.9:
                for _ in range(rng.randint(1, 6)):
                    tokens = rng.choice([1, 5, 40])  # a one-token answer has no per-token gap
                    gaps = [rng.uniform(0.01, 0.05) for _ in range(tokens - 1)]
                    window.record(rng.uniform(0.03, 0.3), gaps, tokens, sum(gaps) + 0.01)
            reports = window.take(device, now=clock.now)
            store.add_telemetry_many([telemetry_row(FLEET, r.model_dump()) for r in reports])
            # windows lose their histograms on the way (QoS 0, a kill): d3 one in four (its figures are means)
            kept = [latency_row(FLEET, r._histograms.model_dump()) for r in reports
                    if r._histograms is not None and rng.random() < (0.75 if device == "d3" else 0.97)]
            if kept:
                store.add_latency_many(kept)


def reads(store: Store, since: float) -> dict:
    out = {("versions",): store.versions(FLEET, since)}
    for device in ("d0", "d1", "d2", "d3"):
        for version in (None, "1.0.0", "2.0.0"):
            out[(device, version)] = store.latency(FLEET, device, since, version)
    return out


def same(a, b) -> None:
    """Equal, floats within rounding (sums are added in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9)
    else:
        assert a == b


def test_a_range_reads_the_same_from_rollups_as_from_the_reports(tmp_path):
    clock = Clock(T0)
    store = Store(tmp_path / "fleet.db", clock=clock)
    fill(store, clock, random.Random(7))
    end = clock.now
    # on a span's boundary, just after one (a fraction of a second: `fleet status` reads from time.time() - 3600),
    # just before one, inside one
    ranges = [T0, T0 + 0.7, T0 + 1, T0 + 299, T0 + 300, T0 + 300.7, T0 + 451, T0 + 930, end - 200]
    before = {since: reads(store, since) for since in ranges}
    # (both kinds of figure are under test)
    assert before[T0][("d1", "2.0.0")]["percentiles"] == "histograms"
    assert before[T0][("d3", None)]["percentiles"] == "window means"
    clock.now = end + 60
    spans = 0
    while done := store.roll_up():  # (ROLLUP_SPANS_PER_CALL at a time)
        spans += done
    assert spans == int((end + 60 - ROLLUP_DELAY_S - T0) // ROLLUP_S)
    assert store._rolled_spans(T0) == (T0, T0 + ROLLUP_S * spans)
    for since in ranges:
        same(reads(store, since), before[since])
    store.close()


def test_a_database_with_history_is_rolled_up_a_bounded_piece_at_a_time(tmp_path):
    """The first rollup of a database with an hour of reports does ROLLUP_SPANS_PER_CALL spans per call (the
    writer calls it once a minute), reads stay the same meanwhile, and a report stored while the controller's
    clock was set back into a rolled-up span is still read."""
    clock = Clock(T0)
    store = Store(tmp_path / "fleet.db", clock=clock)
    fill(store, clock, random.Random(3), windows=130)  # 65 minutes: 13 spans
    before = reads(store, T0)
    clock.now = T0 + 130 * 30 + 600
    assert store.roll_up() == ROLLUP_SPANS_PER_CALL
    same(reads(store, T0), before)
    while store.roll_up():
        same(reads(store, T0), before)
    assert store._rolled_spans(T0)[1] >= T0 + 13 * ROLLUP_S
    clock.now = T0 + 100  # set back, an hour: this report falls in the first span, rolled up long ago
    late = {"device": "d0", "window_start": T0 + 9000, "window_end": T0 + 9030, "count": 3, "errors": 1,
            "model_version": "1.0.0", "per_token_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}}
    store.add_telemetry_many([telemetry_row(FLEET, late)])
    got = store.latency(FLEET, "d0", T0, "1.0.0")
    assert got["requests"] == before[("d0", "1.0.0")]["requests"] + 3
    assert got["errors"] == before[("d0", "1.0.0")]["errors"] + 1
    store.close()


def test_ranges_past_the_retentions_read_the_same_from_rollups(tmp_path):
    """Histograms are kept a day (HISTOGRAM_RETENTION_S), reports the telemetry's retention: a range read a day and
    a half later read the rollups' histograms (kept as long as the reports) where the reports' own were gone, and
    a span whose rollup the retention deleted while some of its reports stayed was read from neither."""
    clock = Clock(T0)
    store = Store(tmp_path / "fleet.db", clock=clock, retention_s=2 * 86400)
    fill(store, clock, random.Random(11), windows=40)
    clock.now += 600
    while store.roll_up():
        pass
    for later, retention in ((1.5 * 86400, None), (2 * 86400 + 450, None), (2 * 86400 + 450, 2 * 86400 - 100)):
        clock.now = T0 + later
        if retention is not None:
            store.retention_s = retention
        store.prune()
        rolled = {since: reads(store, since) for since in (T0 - 3600, T0, T0 + 450.5)}
        real = store._rolled_spans
        store._rolled_spans = lambda since: None  # the reports alone
        try:
            for since, got in rolled.items():
                same(got, reads(store, since))
        finally:
            store._rolled_spans = real
    store.close()


def test_rollups_go_with_the_retention(tmp_path):
    clock = Clock(T0)
    store = Store(tmp_path / "fleet.db", clock=clock, retention_s=3600)
    fill(store, clock, random.Random(5), devices=2, windows=40)
    clock.now += 600
    assert store.roll_up() > 0
    assert store.db.execute("SELECT COUNT(*) FROM rollup").fetchone()[0] > 0
    clock.now += 2 * 3600
    store.prune()
    assert store.db.execute("SELECT COUNT(*) FROM rollup").fetchone()[0] == 0
    assert store.latency(FLEET, "d0", T0) == {"requests": 0, "errors": 0}
    store.close()
