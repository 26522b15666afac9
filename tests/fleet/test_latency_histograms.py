"""Fleet latency from histograms: a mean of window percentiles is not a percentile.

The agent counts every latency of a telemetry window in 1% log buckets and sends them on the `latency` topic
with the window's report; the controller adds them up over windows (and devices) and reads p50/p95 off the
sum. Reference values are numpy's percentiles of all the raw latencies (method "lower": the value of rank
floor(q (n - 1))), never the code under test; the buckets promise 1%.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import histogram
from agent.mqtt import MqttSession, MqttSettings
from agent.telemetry import LatencyWindow
from agent.topics import LatencyHistograms, ReportedState, TelemetryReport, latency_topic, parse_payload
from agent.errors import PayloadError
from fleet.controller import ControllerSettings, FleetController, format_status, prometheus_metrics
from fleet.rollout import RolloutDriver, create_rollout, load_rollouts
from fleet.store import ROLLUP_S, Store, latency_row, telemetry_row
from waiting import until

FLEET = "hist"


def lower(values_ms, q: float) -> float:
    return float(np.percentile(np.asarray(values_ms), q, method="lower"))


def test_buckets_hold_what_they_say_and_quantiles_are_within_one_percent():
    rng = random.Random(7)
    for _ in range(20_000):
        ms = math.exp(rng.uniform(math.log(histogram.MIN_MS), math.log(histogram.LATENCY_MS_MAX)))
        i = histogram.index_of(ms)
        assert histogram.GAMMA ** (i - 1) < ms <= histogram.GAMMA ** i * (1 + 1e-12)
        assert abs(histogram.value_of(i) / ms - 1) <= histogram.RELATIVE_ACCURACY + 1e-9
    assert histogram.index_of(0.0) == histogram.MIN_INDEX and histogram.index_of(1e12) == histogram.MAX_INDEX
    # windows of different shapes, added up: the quantiles of the sum against numpy's of all the values
    windows = [[rng.lognormvariate(math.log(mu), 0.4) / 1000 for _ in range(n)]
               for mu, n in ((5, 3000), (20, 40), (80, 500), (0.3, 7), (2000, 2))]
    merged = histogram.merge(histogram.bins(histogram.count(w)) for w in windows)
    every_ms = [v * 1000 for w in windows for v in w]
    for q, got in zip((0.0, 0.5, 0.9, 0.95, 0.99, 1.0), histogram.quantiles(merged, (0.0, 0.5, 0.9, 0.95, 0.99, 1.0))):
        assert got == pytest.approx(lower(every_ms, q * 100), rel=histogram.RELATIVE_ACCURACY), q
    assert histogram.quantiles({}, (0.5,)) is None


def test_the_payload_refuses_bins_out_of_order_range_or_count():
    ok = {"device": "d", "window_end": 1.0, "ttft_ms": {"bins": [[-3, 1], [40, 2]]}}
    assert parse_payload(LatencyHistograms, __import__("json").dumps(ok).encode(), 65536, "t").ttft_ms.count == 3
    for bins, why in (([[40, 1], [-3, 1]], "ascend"), ([[5, 1], [5, 1]], "ascend"), ([[5, 0]], "count"),
                      ([[histogram.MAX_INDEX + 1, 1]], "outside"), ([[1, 2 ** 31]], "count")):
        with pytest.raises(PayloadError, match=why):
            parse_payload(LatencyHistograms, __import__("json").dumps({**ok, "ttft_ms": {"bins": bins}}).encode(),
                          65536, "t")
    with pytest.raises(PayloadError, match="relative_accuracy"):  # another bucket scheme is another payload
        parse_payload(LatencyHistograms, __import__("json").dumps({**ok, "relative_accuracy": 0.02}).encode(),
                      65536, "t")


def serve(window: LatencyWindow, answers: list[tuple[int, float]], rng: random.Random) -> list[float]:
    """Record answers of (tokens, per-token ms) in `window` as the agent does; the per-token gaps in ms."""
    gaps_ms = []
    for tokens, per_token_ms in answers:
        gaps = [per_token_ms * rng.uniform(0.97, 1.03) / 1000 for _ in range(tokens - 1)]
        window.record(0.05 * rng.uniform(0.9, 1.1), gaps, tokens, sum(gaps))
        gaps_ms += [g * 1000 for g in gaps]
    return gaps_ms


def traffic(device: str, version: str, t0: float, long_ms: float, rng: random.Random, windows: int = 6):
    """The reports (with their histograms) of a device serving many short answers in some windows and one long
    answer in others, short answers at 20 ms a token, long ones at `long_ms`; and every per-token gap in ms."""
    window = LatencyWindow(label=(version, "onnxruntime:cpu"))
    reports, gaps = [], []
    for i in range(windows):
        short = i % 2 == 0
        gaps += serve(window, [(4, 20.0)] * 20 if short else [(200, long_ms)], rng)
        reports += window.take(device, now=t0 + i + 1)
    return reports, gaps


def put(store: Store, reports, histograms: bool = True) -> None:
    for r in reports:
        store.clock = lambda: r.window_end
        if histograms and r._histograms is not None:
            store.add_latency_many([latency_row(FLEET, r._histograms.model_dump())])
        store.add_telemetry_many([telemetry_row(FLEET, r.model_dump())])
    store.clock = time.time


def test_a_device_p95_is_that_of_all_its_tokens_not_a_mean_of_windows(tmp_path):
    rng = random.Random(1)
    store = Store(tmp_path / "fleet.db")
    t0 = float(int(time.time()))
    reports, gaps = traffic("d0", "1.1.0", t0, 40.0, rng)
    put(store, reports)
    lat = store.latency(FLEET, "d0", t0, "1.1.0")
    assert lat["percentiles"] == "histograms"
    assert lat["token_p95_ms"] == pytest.approx(lower(gaps, 95), rel=0.0101)
    assert lat["token_p50_ms"] == pytest.approx(lower(gaps, 50), rel=0.0101)
    # the means of the window p95s, what was read before: far from it (most requests are short, most tokens long)
    other = Store(tmp_path / "means.db")
    put(other, reports, histograms=False)
    means = other.latency(FLEET, "d0", t0, "1.1.0")
    assert means["percentiles"] == "window means" and means["token_p95_ms"] < 0.6 * lower(gaps, 95)
    # the versions table adds devices up the same way
    more, more_gaps = traffic("d1", "1.1.0", t0 + 0.5, 30.0, rng)
    store.upsert_state(FLEET, {"device": "d1", "online": True, "model": {"name": "m", "version": "1.1.0"}})
    put(store, more)
    row = next(v for v in store.versions(FLEET, t0) if v["model_version"] == "1.1.0")
    assert row["percentiles"] == "histograms"
    assert row["token_p95_ms"] == pytest.approx(lower(gaps + more_gaps, 95), rel=0.0101)


def test_a_lost_histogram_leaves_its_window_out_and_an_agent_without_them_reads_window_means(tmp_path):
    rng = random.Random(2)
    store = Store(tmp_path / "fleet.db")
    t0 = float(int(time.time()))
    reports, gaps = traffic("d0", "1.1.0", t0, 40.0, rng, windows=20)
    lost = reports[4]  # a short-answer window (20 requests of 63 x 10 / 3...): its histogram lost on the way
    put(store, [r for r in reports if r is not lost])
    put(store, [lost], histograms=False)
    lat = store.latency(FLEET, "d0", t0, "1.1.0")
    total = sum(r.count for r in reports)
    assert lat["percentiles"] == "histograms" and lat["histogram_coverage"] == pytest.approx(1 - lost.count / total)
    kept = [g for r, w in zip(reports, windows_gaps(reports, gaps)) if r is not lost for g in w]
    assert lat["token_p95_ms"] == pytest.approx(lower(kept, 95), rel=0.0101)
    # an agent from before histograms (none for most of the range): request-weighted means of window percentiles
    other = Store(tmp_path / "older.db")
    put(other, reports[:5])
    put(other, reports[5:], histograms=False)
    lat = other.latency(FLEET, "d0", t0, "1.1.0")
    assert lat["percentiles"] == "window means"
    weighted = sum(r.per_token_ms.p95 * r.count for r in reports if r.per_token_ms) / sum(
        r.count for r in reports if r.per_token_ms)
    assert lat["token_p95_ms"] == pytest.approx(weighted)
    # histograms past their retention are gone, the reports stay: means again, nothing fails
    store.histogram_retention_s = 1.0
    store.prune(now=reports[-1].window_end + 10 + ROLLUP_S)  # (the retention goes by whole spans)
    assert store._exec("SELECT COUNT(*) FROM latency").fetchone()[0] == 0
    assert store.latency(FLEET, "d0", t0, "1.1.0")["percentiles"] == "window means"


def windows_gaps(reports, gaps: list[float]) -> list[list[float]]:
    """`gaps` (in the order recorded) cut into the reports' windows by their per-token counts."""
    out, i = [], 0
    for r in reports:
        n = sum(c for _, c in r._histograms.per_token_ms.bins) if r._histograms and r._histograms.per_token_ms else 0
        out.append(gaps[i:i + n])
        i += n
    return out


def test_the_rollout_gate_halts_a_canary_twice_as_slow_on_long_answers(tmp_path):
    """helper-141's case: a canary whose long answers take twice as long per token, its short ones not. Means of
    window p95s, weighted by requests, saw a few percent; the tokens' p95 doubled."""
    rng = random.Random(3)
    store = Store(tmp_path / "fleet.db")
    t0 = float(int(time.time()))
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        put(store, traffic(d, "1.0.0", t0 - 30, 20.0, rng)[0])
    canary, tick = canary_committed(store, tmp_path, t0, canary_pct=50)
    reports, gaps = traffic(canary, "1.1.0", t0 + 2, 40.0, rng)
    put(store, reports)
    r = tick(t0 + 20)
    assert r.phase in ("halting", "halted"), r.data["report"]
    line = next(x for x in r.data["report"] if "latency gate failed" in x)
    new = float(line.split(" -> ")[1].split(" ms")[0])
    assert new == pytest.approx(lower(gaps, 95), rel=0.011), line


def test_the_gate_compares_like_for_like_when_the_baseline_has_no_histograms(tmp_path):
    """The baseline from an agent without histograms (means of window p95s), the new version's with them (the
    tokens' p95): the same traffic on both sides read +95% and halted a healthy canary. Both sides are compared
    as means then, and the verdict says so."""
    rng = random.Random(5)
    store = Store(tmp_path / "fleet.db")
    t0 = float(int(time.time()))
    store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    put(store, traffic("d0", "1.0.0", t0 - 30, 40.0, rng)[0], histograms=False)
    canary, tick = canary_committed(store, tmp_path, t0, canary_pct=100)
    assert canary == "d0"
    put(store, traffic("d0", "1.1.0", t0 + 2, 40.0, rng)[0])  # the same traffic, with histograms
    r = tick(t0 + 20)
    verdict = next(x for x in r.data["report"] if "latency gate" in x)
    assert "latency gate passed" in verdict, r.data["report"]
    assert "p95 of d0 compared as request-weighted means of window p95s on both sides" in verdict, verdict
    assert abs(r.data["p95_change_pct"]["d0"]) < 10


def canary_committed(store: Store, tmp_path, t0: float, canary_pct: float):
    """A rollout of 1.1.0 (gate: +20%, 10 s window, 1 request) whose first canary committed at t0 + 1: (canary,
    tick(now) -> the rollout)."""
    driver = RolloutDriver(store, _Offers())
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')
    rid = create_rollout(store, bundle, FLEET, canary_pct=canary_pct, window_s=10.0, min_requests=1,
                         max_regression_pct=20.0)

    def tick(now):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    r = tick(t0)
    canary = r.data["canaries"][0]
    store.add_ota_status(FLEET, canary, {"update_id": r.data["offers"][canary], "ts": t0 + 1, "state": "reporting",
                                         "result": "committed"})
    assert tick(t0 + 1).phase == "canary_window"
    return canary, tick


class _Offers:
    def __init__(self):
        self.n = 0

    def offer(self, fleet, device, bundle, rollback_key=None) -> str:
        self.n += 1
        return f"update-{self.n}"


def test_histograms_travel_from_the_agents_session_to_the_controller(mosquitto, tmp_path):
    """Over a real broker: the agent's session sends each window's histograms before its report; the controller
    stores them and reads the device's percentiles off them (status, /metrics, the versions table)."""
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET))
    ctl.start()
    state = lambda online=True: ReportedState(  # noqa: E731
        device="dev-h", online=True, agent_version="0.2.0", execution_path="onnxruntime:cpu",
        model={"name": "tiny", "version": "1.1.0", "sha256": "0" * 64}, active_slot="a", uptime_s=1.0, ts=time.time())
    dev = MqttSession(MqttSettings(enabled=True, port=mosquitto.port, reconnect_min_delay_s=0.1), fleet=FLEET,
                      device="dev-h", state_fn=state)
    try:
        dev.start()
        assert dev.wait_connected(10)
        until(lambda: ctl.store.devices(FLEET))
        t0 = time.time()
        reports, gaps = traffic("dev-h", "1.1.0", t0, 40.0, random.Random(4))
        for r in reports:
            dev.publish_telemetry(r)
        until(lambda: ctl.store.latency(FLEET, "dev-h", t0 - 60, "1.1.0").get("requests") == 63)
        until(lambda: ctl.store._exec("SELECT COUNT(*) FROM latency").fetchone()[0] == len(reports))
        lat = ctl.store.latency(FLEET, "dev-h", t0 - 60, "1.1.0")
        assert lat["percentiles"] == "histograms"
        assert lat["token_p95_ms"] == pytest.approx(lower(gaps, 95), rel=0.0101)
        metrics = prometheus_metrics(ctl.store, True)
        line = next(x for x in metrics.splitlines() if x.startswith("edgeglm_fleet_token_p95_ms{") and "dev-h" in x)
        assert float(line.split()[-1]) == pytest.approx(lower(gaps, 95), rel=0.0101)
        row = next(x for x in format_status(ctl.store, FLEET).splitlines() if "dev-h" in x)
        assert f"{lat['token_p95_ms']:.1f}ms " in row and "*" not in row, row
        # a report without histograms (telemetry.histograms = false, or an older agent) is taken as before; with a
        # third of the requests in it, the range reads window means
        plain = TelemetryReport(device="dev-h", window_start=reports[-1].window_end,
                                window_end=reports[-1].window_end + 1, count=30, model_version="1.1.0")
        dev.publish_telemetry(plain)
        until(lambda: ctl.store.latency(FLEET, "dev-h", t0 - 60, "1.1.0").get("requests") == 93)
        assert ctl.store.latency(FLEET, "dev-h", t0 - 60, "1.1.0")["percentiles"] == "window means"
        status = format_status(ctl.store, FLEET)
        assert "ms* " in next(x for x in status.splitlines() if "dev-h" in x) and "* a request-weighted mean" in status
        assert ctl.store._exec("SELECT COUNT(*) FROM latency").fetchone()[0] == len(reports)
        # histograms are stored with their report only: none for a window never reported, none that count more
        # requests than their report (a device filling the controller's disk, or skewing the fleet's figures)
        stray = LatencyHistograms(device="dev-h", window_end=1e12, ttft_ms={"bins": [[5, 1]]})
        inflated = LatencyHistograms(device="dev-h", window_end=plain.window_end + 1, ttft_ms={"bins": [[5, 999]]})
        raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        raw.connect("127.0.0.1", mosquitto.port)
        raw.loop_start()
        for h in (stray, inflated):
            raw.publish(latency_topic(FLEET, "dev-h"), h.model_dump_json(), qos=1).wait_for_publish(5)
        raw.loop_stop()
        raw.disconnect()
        until(lambda: inflated.window_end in ctl._pending_histograms.get((FLEET, "dev-h"), {}))  # then its report
        dev.publish_telemetry(TelemetryReport(device="dev-h", window_start=plain.window_end,
                                              window_end=inflated.window_end, count=1, model_version="1.1.0"))
        until(lambda: ctl.store.latency(FLEET, "dev-h", t0 - 60, "1.1.0").get("requests") == 94)
        assert ctl.store._exec("SELECT COUNT(*) FROM latency").fetchone()[0] == len(reports)
    finally:
        dev.close()
        ctl.stop()


def test_a_window_whose_histograms_miss_a_kind_its_report_has_is_not_covered(tmp_path):
    """A histogram without TTFT for a window whose report has TTFT percentiles (a buggy agent): counted as covered,
    its requests dropped out of the TTFT figure, which read None under "histograms"."""
    rng = random.Random(6)
    store = Store(tmp_path / "fleet.db")
    t0 = float(int(time.time()))
    reports, _ = traffic("d0", "1.1.0", t0, 40.0, rng, windows=4)
    for r in reports:
        r._histograms = r._histograms.model_copy(update={"ttft_ms": None})
    put(store, reports)
    lat = store.latency(FLEET, "d0", t0, "1.1.0")
    assert lat["percentiles"] == "window means" and lat["ttft_p95_ms"] is not None
