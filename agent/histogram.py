"""Log-bucketed latency histograms: what an agent sends per telemetry window so that the controller can merge
windows and devices and read true percentiles from the sum (a mean of window percentiles is not a percentile:
a canary twice as slow per token on its long answers only read as faster).

Bucket `i` holds the latencies `x` (in ms) with GAMMA**(i-1) < x <= GAMMA**i, GAMMA = (1 + a) / (1 - a) for a
relative accuracy `a` of 1%: a bucket's value, 2 * GAMMA**i / (GAMMA + 1), is within 1% of every latency in it
(the scheme of DDSketch). Latencies below MIN_MS go to MIN_MS's bucket, above LATENCY_MS_MAX to its bucket, so
indices stay within MIN_INDEX..MAX_INDEX (about 1,300 buckets from 1 us to a day; a window fills a few dozen).
Merging is adding counts. A quantile is that of the "lower" rank (numpy's method="lower"): the value of rank
floor(q * (n - 1)) of the sorted latencies, within 1% of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
MIN_MS = 0.001  # 1 us: anything faster is that fast for a latency figure
LATENCY_MS_MAX = 86_400_000.0  # a day (as agent.topics: beyond it a clock is broken)


def index_of(ms: float) -> int:
    """The bucket of a latency in ms (clamped to MIN_MS..LATENCY_MS_MAX; NaN counts as MIN_MS)."""
    ms = min(max(ms, MIN_MS), LATENCY_MS_MAX) if ms == ms else MIN_MS
    i = math.ceil(math.log(ms) / _LOG_GAMMA)
    # float rounding at a bucket's upper edge: GAMMA**(i-1) < ms <= GAMMA**i must hold
    if GAMMA ** (i - 1) >= ms:
        i -= 1
    elif GAMMA ** i < ms:
        i += 1
    return i


MIN_INDEX = index_of(MIN_MS)
MAX_INDEX = index_of(LATENCY_MS_MAX)


def value_of(index: int) -> float:
    """The latency (ms) a bucket stands for: within RELATIVE_ACCURACY of all of its latencies."""
    return 2.0 * GAMMA ** index / (GAMMA + 1.0)


def count(values_s: Iterable[float], into: Counter | None = None) -> Counter:
    """Add latencies in seconds to a Counter of bucket -> count (a new one without `into`)."""
    into = Counter() if into is None else into
    for v in values_s:
        into[index_of(v * 1000.0)] += 1
    return into


COUNT_MAX = (1 << 31) - 1  # what one bucket of one window may hold (agent.topics.REPORT_COUNT_MAX)


def bins(counter: Mapping[int, int]) -> list[tuple[int, int]]:
    """The wire form: (index, count) pairs, sorted, counts 1..COUNT_MAX."""
    return sorted((int(i), min(int(c), COUNT_MAX)) for i, c in counter.items() if c > 0)


def merge(histograms: Iterable[Iterable[tuple[int, int]] | None]) -> Counter:
    """The sum of histograms in wire form (None: none)."""
    total: Counter = Counter()
    for h in histograms:
        for i, c in h or ():
            total[i] += c
    return total


def quantiles(counter: Mapping[int, int] | "np.ndarray", qs: Iterable[float]) -> list[float] | None:
    """The latencies (ms) of quantiles `qs` (0..1) of a merged histogram, a {index: count} mapping or an array of
    (index, count) rows (indices may repeat: they add up); None when it is empty."""
    pairs = np.asarray(list(counter.items()) if isinstance(counter, Mapping) else counter, dtype=np.int64)
    if not pairs.size:
        return None
    cumulative = np.cumsum(np.bincount(pairs[:, 0] - MIN_INDEX, weights=pairs[:, 1].astype(np.float64)))
    if not cumulative[-1]:
        return None
    # the bucket holding rank floor(q (n - 1)) (0-based)
    ranks = np.floor(np.asarray(list(qs), dtype=np.float64) * (cumulative[-1] - 1))
    return [value_of(int(i) + MIN_INDEX) for i in np.searchsorted(cumulative, ranks, side="right")]
