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
    w.record_error()  # e.g. a malformed MQTT payload: nobody's model
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
