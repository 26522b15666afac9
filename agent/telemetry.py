"""Latency telemetry: raw samples of one reporting window, summarised as a TelemetryReport.

The HTTP API and MQTT inference record every finished request here; every
`telemetry.interval_s` the agent takes the window (which starts a new one) and publishes it.
Samples are kept raw (bounded) so that percentiles are exact, not histogram estimates.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from agent.topics import LatencyPercentiles, TelemetryReport

MAX_SAMPLES = 20_000  # per window; beyond it the oldest samples are overwritten (percentiles stay sane)


def _percentiles(values: list[float]) -> LatencyPercentiles | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 95, 99])
    return LatencyPercentiles(p50=float(p50), p95=float(p95), p99=float(p99))


class LatencyWindow:
    def __init__(self, max_samples: int = MAX_SAMPLES):
        self._lock = threading.Lock()
        self._max = max_samples
        self._reset(time.time())

    def _reset(self, now: float) -> None:
        self.start, self.count, self.errors, self.tokens, self.busy_s = now, 0, 0, 0, 0.0
        self.ttft: list[float] = []
        self.per_token: list[float] = []

    def record(self, ttft_s: float | None, token_intervals_s: list[float], tokens: int, decode_s: float) -> None:
        """One finished request: time to first token, the gaps between later tokens, their count."""
        with self._lock:
            self.count += 1
            self.tokens += tokens
            self.busy_s += decode_s
            if ttft_s is not None:
                self.ttft.append(ttft_s)
            self.per_token.extend(token_intervals_s)
            del self.ttft[:-self._max], self.per_token[:-self._max]

    def record_error(self, n: int = 1) -> None:
        with self._lock:
            self.errors += n

    def take(self, device: str, model_version: str | None, execution_path: str | None,
             now: float | None = None) -> TelemetryReport:
        """The report of the window so far; a new window starts."""
        now = time.time() if now is None else now
        with self._lock:
            report = TelemetryReport(
                device=device, window_start=self.start, window_end=max(now, self.start), count=self.count,
                ttft_ms=_percentiles(self.ttft), per_token_ms=_percentiles(self.per_token),
                tokens_per_s=(self.tokens / self.busy_s) if self.busy_s > 0 else None,
                errors=self.errors, model_version=model_version, execution_path=execution_path)
            self._reset(now)
        return report
