"""Latency telemetry: raw samples of reporting windows, summarised as TelemetryReports.

The HTTP API and MQTT inference record every finished request here; every
`telemetry.interval_s` the agent takes the windows (which starts a new one) and publishes them.
Samples are kept raw so that percentiles are exact, not histogram estimates, up to `MAX_SAMPLES` per window;
beyond that a uniform sample of the window's values is kept (reservoir sampling), so a busy window's percentiles
still describe all of it (keeping the last ones made a window whose latency changed report only its end).
Every value is also counted in a log-bucketed histogram (agent.histogram, 1% buckets), sent with the report
(`LatencyHistograms`, on its own topic): window percentiles cannot be averaged into a fleet's or an hour's
percentile, histograms can be added up.

A report is tagged with one model version and execution path (its `Label`), and the windows
follow each other without gaps (each starts where the previous one ended), so a missing one shows
as a gap (the agent says how many it lost in `dropped_reports`; the controller counts them, and the time between
two reports of one run that no report covers, whoever lost it: `fleet status` names the device). A model switch
(an OTA update, a rollback) therefore cuts the
window: what was served before it is reported under the model that served it, not the new one.
Requests still running on the old model when it is switched finish on it: their latency and
their errors (a request whose model went away under it is answered 503) go to the old model's
window, which is held back until none of them is in flight (at most `HOLD_S`); a request that
outlives a report goes on in the window opened then (`_Window.forward`), which a later switch holds
back for it the same way. A fleet's rollout gate compares the new version's reports with the old
one's: the switch itself must not count against the new version.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from agent import histogram
from agent.topics import (LATENCY_MS_MAX, TOKENS_PER_S_MAX, DeviceHealth, LatencyHistogram, LatencyHistograms,
                          LatencyPercentiles, TelemetryReport)

MAX_SAMPLES = 20_000  # per window and kind; beyond it a uniform sample of them is kept
HOLD_S = 600.0  # the longest a window cut at a model switch waits for the old model's last requests

Label = tuple  # (model_version or None, execution_path or None): what a report is tagged with
NO_MODEL: Label = (None, None)


def serving_label(model) -> Label:
    """The label of the requests a loaded model serves, e.g. ("1.2.0", "onnxruntime:cpu")."""
    if model is None:
        return NO_MODEL
    device = str(getattr(model.engine, "device", "CPU")).removesuffix("ExecutionProvider")
    return model.bundle.manifest.version, f"{model.backend}:{device}".lower()


def _percentiles(values: list[float]) -> LatencyPercentiles | None:
    if not values:
        return None
    # within the report's bounds (a day): a value beyond them (a stalled clock) made every later report fail to
    # build, and the agent's loop with it
    p50, p95, p99 = np.clip(np.percentile(np.asarray(values) * 1000.0, [50, 95, 99]), 0.0, LATENCY_MS_MAX)
    return LatencyPercentiles(p50=float(p50), p95=float(p95), p99=float(p99))


@dataclass
class _Window:
    label: Label
    start: float
    end: float | None = None  # set when cut at a model switch
    cut_at: float = 0.0  # monotonic time of the cut (for HOLD_S)
    in_flight: int = 0  # requests that began in this window (or were handed on to it) and have not finished
    # reported while requests that began in it still ran: they go on in the window opened then (same model), which
    # waits for them at a switch as its own (a request that outlived a report and then a switch was counted under
    # the new model, the old one's window long gone)
    forward: "_Window | None" = None
    count: int = 0
    errors: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    ttft: list = field(default_factory=list)
    per_token: list = field(default_factory=list)
    seen: dict = field(default_factory=lambda: {"ttft": 0, "per_token": 0})  # samples offered, kept or not
    counted: dict = field(default_factory=lambda: {"ttft": Counter(), "per_token": Counter()})  # every value

    def empty(self) -> bool:
        return not (self.count or self.errors)

    def report(self, device: str, end: float) -> TelemetryReport:
        report = TelemetryReport(
            device=device, window_start=self.start, window_end=max(end, self.start), count=self.count,
            ttft_ms=_percentiles(self.ttft), per_token_ms=_percentiles(self.per_token),
            tokens_per_s=min(self.tokens / self.busy_s, TOKENS_PER_S_MAX) if self.busy_s > 0 else None,
            errors=self.errors, model_version=self.label[0], execution_path=self.label[1])
        ttft, per_token = (histogram.bins(self.counted[k]) for k in ("ttft", "per_token"))
        if self.count:  # (a window with requests but no sample, all one-token answers, says so: none, not missing)
            report._histograms = LatencyHistograms(
                device=device, window_end=report.window_end, model_version=self.label[0],
                ttft_ms=LatencyHistogram(bins=ttft) if ttft else None,
                per_token_ms=LatencyHistogram(bins=per_token) if per_token else None)
        return report


class LatencyWindow:
    def __init__(self, max_samples: int = MAX_SAMPLES, label: Label = NO_MODEL):
        self._lock = threading.Lock()
        self._max = max_samples
        self._stamped = (time.time(), time.monotonic())  # the last boundary handed out, and when
        self._open = _Window(label, self._stamped[0])
        self._cut: list[_Window] = []  # cut at a model switch, waiting for the old model's last requests
        self._random = random.Random()

    def _stamp(self, now: float) -> float:
        """The next window boundary: the wall clock `now`, but never at or before the last boundary (after a step
        back it moves on at half the monotonic time passed, until the wall clock is ahead again). A clock stepped
        back (NTP correcting a box that booted hours ahead) made every window end at the same instant until real
        time caught up, and the controller, which keeps one report per device and window_end, dropped each as a
        second copy."""
        last, at = self._stamped
        mono = time.monotonic()
        # behind: forward at half the time passed, so the wall clock catches up (a step back of an hour, in two)
        stamp = now if now > last else last + max((mono - at) / 2, 1e-6)
        self._stamped = (stamp, mono)
        return stamp

    @property
    def label(self) -> Label:
        return self._open.label

    def switch(self, label: Label, now: float | None = None) -> None:
        """The agent serves another model (or path, or none) from now: the window is cut here."""
        now = time.time() if now is None else now
        with self._lock:
            if label == self._open.label:
                return
            if self._open.empty() and not self._open.in_flight:
                self._open.label = label  # nothing was served under the old label: no report for it
                return
            self._open.end, self._open.cut_at = self._stamp(now), time.monotonic()
            self._cut.append(self._open)
            self._open = _Window(label, self._open.end)

    def _window_for(self, label: Label | None) -> _Window:
        if label is not None and label != self._open.label:
            for w in reversed(self._cut):
                if w.label == label:
                    return w
        return self._open  # (a label whose window was reported already: the sample goes to the current one)

    @contextmanager
    def serving(self, label: Label):
        """Around one request served by the model with `label` (its answer and the counting of its error
        included): the window it began in, once cut at a model switch, waits for it. Counted per window, not per
        label: after a switch A -> B -> A the first A window waited for every request of the second as well."""
        with self._lock:
            w = self._window_for(label)
            if w.label != label:  # no window of this model yet: the agent serves it and switches telemetry to it
                w = None  # right after (or its window was reported already); `record` finds its window then
            else:
                w.in_flight += 1
        try:
            yield w  # what `record`/`record_error` take as `window`: the request's samples go where it began
        finally:
            if w is not None:
                with self._lock:
                    _followed(w).in_flight -= 1

    def _target(self, label: Label | None, window: _Window | None) -> _Window:
        """(under the lock) `window` (what `serving` yielded) while it is still open or waiting to be reported,
        else the window of `label`: after A -> B -> A, a request that began in the first A window is counted
        there, not in the second."""
        window = _followed(window) if window is not None else None
        if window is not None and window.label == label and (window is self._open or any(w is window for w in
                                                                                             self._cut)):
            return window
        return self._window_for(label)

    def record(self, ttft_s: float | None, token_intervals_s: list[float], tokens: int, decode_s: float,
               label: Label | None = None, window: _Window | None = None) -> None:
        """One finished request: time to first token, the gaps between later tokens, their count; `label`:
        the model that served it (None: the one served now); `window`: what `serving` yielded for it."""
        with self._lock:
            w = self._target(label, window)
            w.count += 1
            w.tokens += tokens
            w.busy_s += decode_s
            if ttft_s is not None:
                self._keep(w, "ttft", (ttft_s,))
            self._keep(w, "per_token", token_intervals_s)

    def _keep(self, w: _Window, kind: str, values) -> None:
        """Reservoir sampling (Algorithm R): every value of the window has the same chance to be among the kept."""
        kept, values = getattr(w, kind), list(values)
        histogram.count(values, w.counted[kind])
        room = max(0, self._max - len(kept))
        kept.extend(values[:room])  # below the bound: every value (exact percentiles)
        n = w.seen[kind] + min(room, len(values))
        for value in values[room:]:
            n += 1
            j = self._random.randrange(n)
            if j < self._max:
                kept[j] = value
        w.seen[kind] = n

    def record_error(self, n: int = 1, label: Label | None = None, window: _Window | None = None) -> None:
        with self._lock:
            self._target(label, window).errors += n

    def take(self, device: str, now: float | None = None, final: bool = False) -> list[TelemetryReport]:
        """The reports of the windows cut at model switches whose requests have all finished (every one with
        `final`), then the report of the current window so far; a new window starts."""
        now = time.time() if now is None else now
        with self._lock:
            ready = [w for w in self._cut if final or not w.in_flight or time.monotonic() - w.cut_at >= HOLD_S]
            self._cut = [w for w in self._cut if w not in ready]
            reports = [w.report(device, w.end) for w in ready]
            end = self._stamp(now)
            reports.append(self._open.report(device, end))
            old, self._open = self._open, _Window(self._open.label, end)
            if old.in_flight:  # its running requests go on in the new window (see _Window.forward)
                old.forward, self._open.in_flight, old.in_flight = self._open, old.in_flight, 0
            for w in ready + [old]:  # reported: its samples are not needed again (a long request holds it)
                w.ttft, w.per_token, w.counted = [], [], {"ttft": Counter(), "per_token": Counter()}
        return reports


def _followed(w: _Window) -> _Window:
    """The window a request that began in `w` is counted in now (`w`, or where it was handed on at a report)."""
    end = w
    while end.forward is not None:
        end = end.forward
    while w.forward is not None and w.forward is not end:  # shortened: each hop points at the end now
        w.forward, w = end, w.forward
    return end


def hottest_zone_c(pattern: str = "/sys/class/thermal/thermal_zone*/temp") -> float | None:
    """The highest reading of the box's thermal zones in °C (Linux reports millidegrees); None without any."""
    readings = []
    for path in glob.glob(pattern):
        try:
            with open(path) as f:
                readings.append(int(f.read().strip()) / 1000.0)
        except (OSError, ValueError):
            continue  # a zone whose sensor does not answer (some report EIO or ENODATA)
    readings = [t for t in readings if -273.15 <= t <= 1000]
    return max(readings) if readings else None


def device_health(device: str, uptime_s: float, metrics, state_dir: str | os.PathLike,
                  next_s: float | None = None) -> DeviceHealth:
    """The DeviceHealth snapshot of this agent now: its process (/proc), the box (memory left, load, disk of
    `state_dir`, temperature) and the serving numbers kept in `metrics` (agent.metrics.ServingMetrics)."""
    from agent.metrics import process_sample

    for collect in metrics.collectors:  # the values read at a scrape: the prefix cache's bytes, the process
        collect()
    sample = process_sample()
    try:
        disk_free = shutil.disk_usage(state_dir).free
    except OSError:
        disk_free = None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return DeviceHealth(
        device=device, ts=time.time(), uptime_s=max(0.0, uptime_s),
        rss_bytes=sample.rss_bytes if sample else None, cpu_seconds=sample.cpu_seconds if sample else time.process_time(),
        memory_available_bytes=sample.memory_available if sample else None, load_1m=load, cpus=max(1, cpus),
        disk_free_bytes=disk_free, temperature_c=hottest_zone_c(),
        in_flight=int(metrics.in_flight.value()), queued=int(metrics.queued.value()),
        kv_waits=int(metrics.kv_waits.value()), kv_bound_bytes=int(metrics.kv_bound.value()),
        prefix_cache_bytes=int(metrics.prefix_cache_bytes.value()), next_s=next_s)
