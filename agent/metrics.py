"""Prometheus metrics written by hand: Counter, Gauge, Histogram and the text exposition format.

No client library: the edge install stays lean, and the format is small
(https://prometheus.io/docs/instrumenting/exposition_formats/). Every metric is thread-safe.
`ServingMetrics` is the set the local HTTP API keeps; docs/http-api.md lists the names.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. CPU decode of a small INT8 model takes a few ms to ~100 ms per token; prompts and
# whole requests take from tens of ms to a minute.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Rows per batched decode step (batching.max_batch is at most 256).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


def format_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class _Value(_Metric):
    """One number per label set. Without labels it is exposed as 0 before the first change."""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_label_text(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Counter(_Value):
    """A value that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up; got inc({amount})")
        self._add(amount, labels)

    def advance_to(self, total: float, **labels: str) -> None:
        """Mirror a cumulative count kept elsewhere: raised to `total`, never lowered."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = max(self._values.get(key, 0.0), float(total))


class Gauge(_Value):
    """A value that goes up and down."""

    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets (`le` upper bounds), with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets or any(math.isinf(b) for b in self.buckets):
            raise ValueError(f"histogram {self.name} needs finite bucket bounds; +Inf is added by itself")
        # per label set: [count per bucket (not cumulative) + one for +Inf, sum]
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.labelnames:
            self._series[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        lines = []
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip(self.buckets + (math.inf,), counts):
                running += n
                le = _label_text(self.labelnames, key, f'le="{format_value(bound)}"')
                lines.append(f"{self.name}_bucket{le} {running}")
            lines.append(f"{self.name}_sum{_label_text(self.labelnames, key)} {format_value(total)}")
            lines.append(f"{self.name}_count{_label_text(self.labelnames, key)} {running}")
        return lines


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def exposition(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header() + m.samples()
        return "\n".join(lines) + "\n"


class ServingMetrics:
    """The metrics of the local HTTP API. `endpoint` is the route, e.g. `/v1/completions`."""

    def __init__(self):
        self.registry = r = Registry()
        self.requests = r.register(Counter(
            "edgeglm_http_requests_total", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "code")))
        self.errors = r.register(Counter(
            "edgeglm_http_errors_total", "Requests that failed, by endpoint and OpenAI error type "
            "(invalid_request_error, rate_limit_error, server_error, client_disconnected).",
            ("endpoint", "type")))
        self.connections_refused = r.register(Counter(
            "edgeglm_http_connections_refused_total", "Connections answered 503 because http.max_connections were "
            "open (those past the cap that asked a probe path and were served are not counted)."))
        self.prompt_tokens = r.register(Counter(
            "edgeglm_prompt_tokens_total", "Prompt tokens processed, by endpoint.", ("endpoint",)))
        self.completion_tokens = r.register(Counter(
            "edgeglm_completion_tokens_total", "Tokens generated, by endpoint.", ("endpoint",)))
        self.ttft = r.register(Histogram(
            "edgeglm_time_to_first_token_seconds", "From request received (queue wait included) to the first "
            "generated token.", TTFT_BUCKETS, ("endpoint",)))
        self.token_latency = r.register(Histogram(
            "edgeglm_inter_token_latency_seconds", "Time between consecutive generated tokens (decode steps).",
            TOKEN_BUCKETS, ("endpoint",)))
        self.request_latency = r.register(Histogram(
            "edgeglm_request_duration_seconds", "End-to-end time of an inference request, from received to "
            "last byte written, whatever the outcome (failed requests and clients gone included: until the "
            "server let go of the request).", REQUEST_BUCKETS, ("endpoint",)))
        self.mqtt_answers = r.register(Counter(
            "edgeglm_mqtt_inference_answers_total", "MQTT inference requests answered, by outcome: ok, or the error "
            "code of the answer (bad_request, busy, timeout, model_unavailable, too_large, internal).", ("outcome",)))
        self.mqtt_session = r.register(Counter(
            "edgeglm_mqtt_session_events_total", "The agent's MQTT session: connects, payload_errors (malformed, "
            "oversized or refused messages it received), dropped_reports and dropped_messages (pushed out of the "
            "offline buffers), too_large (messages not sent: over the broker's maximum packet size), client_resets.",
            ("event",)))
        self.mqtt_held_reports = r.register(Gauge(
            "edgeglm_mqtt_telemetry_held_reports", "Telemetry reports the agent holds, not sent yet: while it is "
            "offline, or while the fleet controller says it is away (its presence); at most mqtt.telemetry_buffer."))
        self.in_flight = r.register(Gauge(
            "edgeglm_inference_in_flight", "Inference requests in the engine's batch now (at most batching.max_batch)."))
        self.queued = r.register(Gauge(
            "edgeglm_inference_queue_depth", "Inference requests waiting for a place in the batch."))
        self.kv_waits = r.register(Counter(
            "edgeglm_inference_kv_waits_total", "Requests that waited for running ones to end because their KV "
            "would not fit batching.max_kv_mb."))
        self.batch_size = r.register(Histogram(
            "edgeglm_batch_size", "Sequences decoded together, observed once per batched decode step.",
            BATCH_BUCKETS))
        self.prefix_cache_lookups = r.register(Counter(
            "edgeglm_prefix_cache_lookups_total", "Prefills that looked up the prefix KV cache (while it was on)."))
        self.prefix_cache_hits = r.register(Counter(
            "edgeglm_prefix_cache_hits_total", "Prefills that reused the KV of a cached prompt prefix."))
        self.prefix_cache_hit_tokens = r.register(Counter(
            "edgeglm_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache instead "
            "of being computed."))
        self.prefix_cache_evictions = r.register(Counter(
            "edgeglm_prefix_cache_evictions_total", "Prefix cache blocks evicted to stay within cache.max_mb."))
        self.prefix_cache_bytes = r.register(Gauge(
            "edgeglm_prefix_cache_bytes", "KV bytes held by the prefix cache now."))
        self.kv_bound = r.register(Gauge(
            "edgeglm_inference_kv_bound_bytes", "batching.max_kv_mb in bytes as applied (\"auto\" resolved when the "
            "model was loaded); 0: no bound."))
        # the process, under Prometheus' standard names (read from /proc at each scrape, Linux only)
        self.process_rss = r.register(Gauge(
            "process_resident_memory_bytes", "Resident memory of the agent's process."))
        self.process_cpu = r.register(Counter(
            "process_cpu_seconds_total", "User and system CPU time of the agent's process."))
        self.process_fds = r.register(Gauge("process_open_fds", "Open file descriptors of the agent's process."))
        self.process_threads = r.register(Gauge("process_threads", "Threads of the agent's process."))
        self.process_start = r.register(Gauge(
            "process_start_time_seconds", "When the agent's process started, unix time."))
        self.memory_available = r.register(Gauge(
            "edgeglm_memory_available_bytes", "Memory the process can still take: MemAvailable, or less under a "
            "cgroup limit (what batching.max_kv_mb \"auto\" and model.prefill_graph \"auto\" read)."))
        self._started: float | None = None
        self.collectors: list = [self.observe_process]  # called before each exposition

    def observe_prefix_cache(self, stats) -> None:
        """Copy a runtime.prefix_cache.PrefixCacheStats into the prefix cache metrics."""
        self.prefix_cache_lookups.advance_to(stats.lookups)
        self.prefix_cache_hits.advance_to(stats.hits)
        self.prefix_cache_hit_tokens.advance_to(stats.hit_tokens)
        self.prefix_cache_evictions.advance_to(stats.evictions)
        self.prefix_cache_bytes.set(stats.bytes)

    def observe_process(self) -> None:
        """The standard process metrics and the memory left, from /proc (left as they are elsewhere)."""
        sample = process_sample(self._started)
        if sample is None:
            return
        self._started = sample.start_time
        self.process_cpu.advance_to(sample.cpu_seconds)
        self.process_threads.set(sample.threads)
        self.process_start.set(sample.start_time)
        self.process_rss.set(sample.rss_bytes)
        self.process_fds.set(sample.open_fds)
        if sample.memory_available is not None:
            self.memory_available.set(sample.memory_available)

    def exposition(self) -> str:
        for collect in self.collectors:
            collect()
        return self.registry.exposition()


@dataclass(frozen=True)
class ProcessSample:
    rss_bytes: int
    cpu_seconds: float
    threads: int
    open_fds: int
    start_time: float  # unix time
    memory_available: int | None  # what the process can still take (runtime.probe.probe_memory)


def process_sample(start_time: float | None = None) -> ProcessSample | None:
    """This process from /proc (None where there is no /proc); `start_time`: a value read before (it never moves:
    boot time plus the start in clock ticks, both fixed integers)."""
    import os

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        if start_time is None:
            with open("/proc/stat") as f:
                btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
            start_time = btime + int(fields[19]) / ticks
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    from runtime.probe import probe_memory

    return ProcessSample(rss_bytes=rss, cpu_seconds=(int(fields[11]) + int(fields[12])) / ticks,  # utime, stime
                         threads=int(fields[17]), open_fds=fds, start_time=start_time,
                         memory_available=probe_memory().budget_bytes())
