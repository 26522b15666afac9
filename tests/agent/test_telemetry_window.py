"""The telemetry window across model switches, driven directly (the end-to-end case, a real agent updated while
clients keep it busy, is tests/agent/test_daemon.py -k each_request_under)."""

from __future__ import annotations

from agent.telemetry import NO_MODEL, LatencyWindow

OLD, NEW = ("1.0.0", "onnxruntime:cpu"), ("1.1.0", "onnxruntime:cpu")


def test_a_request_running_across_a_switch_is_reported_under_its_model_once_it_ends():
    w = LatencyWindow(label=OLD)
    w.record(0.01, [0.002, 0.004], 2, 0.006)
    with w.serving(OLD):  # still generating on the old model when the new one takes over
        w.switch(NEW, now=w._open.start + 5.0)
        w.record(0.02, [0.003], 1, 0.003, label=NEW)
        first = w.take("dev", now=w._open.start + 1.0)
        assert [(r.model_version, r.count) for r in first] == [("1.1.0", 1)]  # the old window waits for it
        w.record(0.05, [0.008], 1, 0.008, label=OLD)
        w.record_error(label=OLD)
    second = w.take("dev")
    assert [(r.model_version, r.count, r.errors) for r in second] == [("1.0.0", 2, 1), ("1.1.0", 0, 0)]
    old = second[0]
    assert old.window_end == first[0].window_start  # the windows still follow each other without a gap
    assert old.ttft_ms.p50 == (10 + 50) / 2 and old.per_token_ms.p50 == 4.0


def test_an_error_with_no_model_named_goes_to_the_model_served_now():
    w = LatencyWindow(label=OLD)
    w.switch(NEW)
    w.record_error()  # e.g. an MQTT event the agent failed to handle: no model named
    assert [(r.model_version, r.errors) for r in w.take("dev")] == [("1.1.0", 1)]


def test_a_switch_before_anything_was_served_relabels_the_window_instead_of_sending_an_empty_one():
    w = LatencyWindow()
    start = w._open.start
    w.switch(OLD)
    reports = w.take("dev")
    assert [(r.model_version, r.execution_path, r.window_start) for r in reports] == [("1.0.0", "onnxruntime:cpu",
                                                                                         start)]


def test_a_switch_with_nothing_in_flight_sends_the_old_window_at_the_next_report():
    w = LatencyWindow(label=OLD)
    w.record(0.01, [], 0, 0.0)
    w.switch(NO_MODEL)  # e.g. the model was unloaded
    w.record_error()  # a 503: no model
    reports = w.take("dev")
    assert [(r.model_version, r.count, r.errors) for r in reports] == [("1.0.0", 1, 0), (None, 0, 1)]
    assert reports[0].window_end == reports[1].window_start


def test_the_last_report_at_shutdown_does_not_wait():
    w = LatencyWindow(label=OLD)
    w.record(0.01, [], 0, 0.0)
    with w.serving(OLD):
        w.switch(NEW)
        assert [r.model_version for r in w.take("dev", final=True)] == ["1.0.0", "1.1.0"]


def test_a_clock_stepped_back_still_gives_each_report_its_own_window(monkeypatch, tmp_path):
    """NTP pulling back a box that booted an hour ahead: each new window was clamped to the last one's start, so
    every report ended at the same instant until real time caught up, and the controller (one report per device
    and window_end) dropped them all as second copies, with their requests. The boundaries keep moving forward
    by the time that passed (the monotonic clock) until the wall clock is ahead again."""
    import time as real_time

    from fleet.store import Store

    wall = [real_time.time()]
    monkeypatch.setattr("agent.telemetry.time.time", lambda: wall[0])
    w = LatencyWindow(label=OLD)
    w.record(0.01, [0.002], 1, 0.002)
    started = real_time.monotonic()  # before the first take, which reads the monotonic clock
    reports = w.take("dev")
    wall[0] -= 3600  # the step back
    for n in range(4):
        w.record(0.01, [0.002], 1, 0.002)
        if n == 2:
            w.switch(NEW)
            w.record(0.01, [0.002], 1, 0.002)
        real_time.sleep(0.002)
        reports += w.take("dev")
    ends = [r.window_end for r in reports]
    assert len(set(ends)) == len(ends) and ends == sorted(ends)
    assert all(b.window_start == a.window_end for a, b in zip(reports, reports[1:]))
    store = Store(tmp_path / "fleet.db")
    for r in reports:
        store.add_telemetry("plant7", r.model_dump())
    assert store.counter("telemetry_duplicates") == 0
    assert sum(n for (n,) in store.db.execute("SELECT count FROM telemetry")) == 6  # every request kept
    # catching up: the boundaries moved on by less than the time that passed (half of it), not an hour ahead for good
    assert reports[-1].window_end - reports[0].window_end < real_time.monotonic() - started
    wall[0] += 7200  # the wall clock ahead again: it is taken as it is
    assert w.take("dev")[-1].window_end == wall[0]


def test_a_window_with_more_samples_than_kept_reports_all_of_it_not_its_end():
    """Beyond MAX_SAMPLES the oldest samples were overwritten: 20,000 token gaps of 50 ms then 10,000 of 10 ms
    reported p50 = 10 ms (the true median is 50). A uniform sample of the whole window is kept now."""
    w = LatencyWindow(max_samples=2000, label=OLD)
    for _ in range(200):
        w.record(0.5, [0.050] * 100, 100, 5.0)
    for _ in range(100):
        w.record(0.1, [0.010] * 100, 100, 1.0)
    (report,) = w.take("dev")
    assert report.count == 300
    assert (report.per_token_ms.p50, report.per_token_ms.p95) == (50.0, 50.0)  # two thirds of it, whole
    assert report.per_token_ms.p50 > 10.0 and report.ttft_ms.p50 == 500.0
    w.record(0.2, [0.001, 0.002], 2, 0.003)  # a fresh window keeps everything again (exact below the bound)
    (report,) = w.take("dev")
    assert (report.ttft_ms.p50, report.per_token_ms.p50) == (200.0, 1.5)


def test_after_a_switch_and_back_the_first_window_does_not_wait_for_the_second_ones_requests():
    """A -> B -> A (an update, then its rollback): requests in flight were counted per model label, so the first
    A window, cut at the switch to B, also waited for every request of the second A window, up to HOLD_S (ten
    minutes of that window's telemetry held back, with the rollout gate waiting on it)."""
    w = LatencyWindow(label=OLD)
    w.record(0.01, [0.002], 1, 0.002)
    with w.serving(OLD):  # r1: began on the first OLD window
        w.switch(NEW)
        w.switch(OLD)  # rolled back before B served anything
        r2 = w.serving(OLD)  # r2: began on the second OLD window, still running at the next report
        r2.__enter__()
    reports = w.take("dev")
    assert [(r.model_version, r.count) for r in reports] == [("1.0.0", 1), ("1.0.0", 0)]  # the first one is sent
    r2.__exit__(None, None, None)


def test_after_a_switch_and_back_a_request_is_counted_in_the_window_it_began_in():
    """A request that began in the first A window and ended after A -> B -> A went into the second A window
    (its 5 s TTFT in a window it did not run in), and the first went out without it."""
    w = LatencyWindow(label=OLD)
    with w.serving(OLD) as began:
        w.switch(NEW)
        w.record(0.01, [0.001], 1, 0.001, label=NEW)  # B serves something: its window is cut at the switch back
        w.switch(OLD)
        w.record(5.0, [0.002], 1, 0.002, label=OLD, window=began)
        w.record_error(label=OLD, window=began)
    reports = w.take("dev")
    assert [(r.model_version, r.count, r.errors) for r in reports] == [("1.0.0", 1, 1), ("1.1.0", 1, 0),
                                                                        ("1.0.0", 0, 0)]
    assert reports[0].ttft_ms.p50 == 5000.0


def test_a_request_the_new_model_takes_before_the_window_switches_is_counted_under_the_new_model():
    """The agent hands the new model to the API, then switches telemetry to it: a request the new model took in
    between was bound to the old model's window and counted as the old version's (found by CI, test_daemon.py
    -k each_request_under)."""
    w = LatencyWindow(label=OLD)
    w.record(0.01, [0.001], 1, 0.001)
    with w.serving(NEW) as began:  # the new model serves it; telemetry has not switched yet
        w.switch(NEW)
        w.record(0.02, [0.002], 1, 0.002, label=NEW, window=began)
    assert [(r.model_version, r.count) for r in w.take("dev")] == [("1.0.0", 1), ("1.1.0", 1)]


def test_a_request_that_outlives_a_report_and_then_a_switch_is_counted_under_its_model():
    """A long answer on the old model ran across a report, then an update switched the model: the window opened at
    the report was empty with nothing in flight, so the switch relabelled it to the new model, and the answer
    was counted under the new version (half of a canary's first new-version window, in review)."""
    w = LatencyWindow(label=OLD)
    with w.serving(OLD) as began:
        first = w.take("dev")  # a report while it runs
        assert [(r.model_version, r.count) for r in first] == [("1.0.0", 0)]
        w.switch(NEW)  # the update: the old model's window must wait for the answer
        w.record(0.02, [0.002], 2, 0.002, label=NEW)
        assert [(r.model_version, r.count) for r in w.take("dev")] == [("1.1.0", 1)]
        w.record(3.0, [0.004] * 99, 100, 0.4, label=OLD, window=began)
    reports = w.take("dev")
    assert [(r.model_version, r.count) for r in reports] == [("1.0.0", 1), ("1.1.0", 0)]
    assert reports[0].ttft_ms.p50 == 3000.0 and reports[0]._histograms.per_token_ms.count == 99
    assert reports[0].window_start == first[0].window_end  # the window opened at that report, held at the switch


def test_a_request_that_outlives_a_report_stays_with_its_model_when_nothing_switches():
    w = LatencyWindow(label=OLD)
    with w.serving(OLD) as began:
        w.take("dev")
        w.take("dev")
        w.record(1.0, [0.004], 2, 0.004, label=OLD, window=began)
    assert [(r.model_version, r.count) for r in w.take("dev")] == [("1.0.0", 1)]
    assert w._open.in_flight == 0


def test_a_request_running_across_many_reports_holds_no_reported_samples():
    """The windows a long request was handed on through are reported: their samples are let go (a stalled
    stream held every window's samples, up to 20,000 per kind each, for as long as it ran)."""
    w = LatencyWindow(label=OLD)
    with w.serving(OLD) as began:
        for _ in range(30):
            w.record(0.01, [0.001] * 500, 501, 0.5)
            w.take("dev")
        hop, chain = began, []
        while hop.forward is not None:
            chain.append(hop)
            hop = hop.forward
        assert hop is w._open and len(chain) == 30
        assert all(h.ttft == [] and h.per_token == [] and not h.counted["per_token"] for h in chain)
        w.record(0.5, [0.002], 2, 0.002, label=OLD, window=began)
        assert began.forward is w._open  # the way shortened once walked
    assert [(r.model_version, r.count) for r in w.take("dev")] == [("1.0.0", 1)]
