"""Hand-written Prometheus metrics: values, cumulative buckets, label escaping, thread safety."""

from __future__ import annotations

import threading

import pytest

from agent.metrics import Counter, Gauge, Histogram, Registry, format_value


def test_counter_with_labels_and_without():
    plain, labelled = Counter("a_total", "A."), Counter("b_total", "B.", ("endpoint",))
    assert plain.samples() == ["a_total 0"] and labelled.samples() == []
    plain.inc()
    labelled.inc(3, endpoint="/x")
    assert plain.samples() == ["a_total 1"] and labelled.samples() == ['b_total{endpoint="/x"} 3']
    with pytest.raises(ValueError, match="only go up"):
        plain.inc(-1)
    with pytest.raises(ValueError, match=r"takes labels \('endpoint',\)"):
        labelled.inc(route="/x")


def test_gauge_goes_both_ways():
    g = Gauge("q", "Q.")
    g.inc(2)
    g.dec()
    assert g.value() == 1
    g.set(0.5)
    assert g.samples() == ["q 0.5"]


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    h = Histogram("lat_seconds", "L.", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    assert h.samples() == ['lat_seconds_bucket{le="0.1"} 2', 'lat_seconds_bucket{le="1"} 3',
                           'lat_seconds_bucket{le="+Inf"} 4', "lat_seconds_sum 7.65", "lat_seconds_count 4"]


def test_label_values_and_help_are_escaped():
    c = Counter("e_total", 'Help with \\ and\nnewline.', ("path",))
    c.inc(path='a"b\\c\nd')
    assert c.samples() == ['e_total{path="a\\"b\\\\c\\nd"} 1']
    assert c.header()[0] == "# HELP e_total Help with \\\\ and\\nnewline."


def test_registry_exposition_and_duplicates():
    r = Registry()
    r.register(Counter("x_total", "X."))
    assert r.exposition() == "# HELP x_total X.\n# TYPE x_total counter\nx_total 0\n"
    with pytest.raises(ValueError, match="twice"):
        r.register(Gauge("x_total", "again"))
    assert [format_value(v) for v in (3.0, 0.25, float("inf"))] == ["3", "0.25", "+Inf"]


def test_concurrent_increments_are_not_lost():
    c, h = Counter("n_total", "N."), Histogram("h", "H.", (1.0,))

    def work():
        for _ in range(2000):
            c.inc()
            h.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 8000 and h.count() == 8000


def test_the_documented_metrics_are_the_served_set():
    """docs/http-api.md's table names every metric /metrics serves, and no other (the execution path's info
    gauge is the agent's own, registered beside ServingMetrics by agent.model)."""
    import re
    from pathlib import Path

    from agent.metrics import ServingMetrics
    from agent.model import EXECUTION_METRIC

    doc = (Path(__file__).resolve().parents[2] / "docs" / "http-api.md").read_text()
    section = doc.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([a-z_]+)`", line.split(" | ")[0])}
    served = {m.name for m in ServingMetrics().registry._metrics} | {EXECUTION_METRIC}
    assert documented == served, (documented - served, served - documented)
    assert "edgeglm_http_connections_refused_total" in served
