"""The OTA self-test of a newly installed model, run in its slot before anything is switched.

1. load the bundle on the device's execution path (files verified against the manifest again);
2. the golden check: the engine must reproduce the continuation recorded at build time;
3. decode latency: median ms per token on the golden prompt, measured for the new model and
   the serving one back to back, must be within `max_latency_ratio` of the serving one, unless
   the difference is below `min_delta_ms` (sub-millisecond jitter of small models), (or
   within `max_ms_per_token` when nothing serves yet and a limit is set). A regression must
   show twice: when the first measurement is over the budget, both models are timed again in
   the other order and the update fails only if that one is over it too (an edge box's load
   comes and goes; a rollback on one noisy measurement would throw away a good model).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.model import LoadedModel, load_model
from ota.bundle import Manifest
from ota.update import SelfTestResult
from runtime.errors import RuntimeUserError
from runtime.generate import decode_one_token, prefill


@dataclass(frozen=True)
class SelfTestConfig:
    backend: str = "auto"
    threads: int | None = None
    device: str = "auto"  # model.device
    prefill_graph: bool | str = "auto"  # model.prefill_graph: "auto", true, false or "only"
    max_latency_ratio: float = 1.5
    min_delta_ms: float = 1.0  # slower by less than this is timing jitter, not a regression
    max_ms_per_token: float | None = None
    steps: int = 16


def decode_ms_per_token(model: LoadedModel, steps: int) -> float:
    """Median wall time of one greedy decode step after the golden prompt."""
    prompt = model.bundle.manifest.golden.prompt_ids
    logits, cache = prefill(model.engine, prompt)
    times = []
    for i in range(steps):
        token = int(logits.argmax())
        t0 = time.perf_counter()
        logits, cache = decode_one_token(model.engine, token, len(prompt) + i, cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run_self_test(slot: Path, manifest: Manifest, cfg: SelfTestConfig, serving: LoadedModel | None,
                  on_engine: Callable[[LoadedModel, Callable[[], float]], float] | None = None) -> SelfTestResult:
    """Load the new slot, run its golden check and time its decode against `serving`'s. `on_engine(model,
    fn)` runs `fn` with the serving model's engine to itself (the agent's batching worker owns it)."""
    # like for like: on the serving model's execution path (an accelerator the autotune chose, its threads and
    # hints) where the new bundle carries that backend; a CPU-run candidate timed against a GPU-run serving
    # model would always look slower (the new model is tuned anew when it is activated)
    same = serving.path if serving is not None and serving.path is not None \
        and serving.path.backend in manifest.backends else None
    try:
        model = load_model(slot, cfg.backend, cfg.threads, prefill_graph=cfg.prefill_graph, device=cfg.device,
                           path=same)
    except RuntimeUserError as exc:
        return SelfTestResult(False, f"could not load the model: {exc}")
    golden = model.golden_check()
    details = {"backend": model.backend, "path": model.path.describe(), "golden": golden.describe()}
    if not golden.passed:
        return SelfTestResult(False, f"golden check failed on {model.backend}: {golden.describe()}", details)
    new_ms = decode_ms_per_token(model, cfg.steps)
    details["decode_ms_per_token"] = round(new_ms, 3)
    if serving is not None:
        measure = lambda: decode_ms_per_token(serving, cfg.steps)  # noqa: E731
        serving_ms = lambda: on_engine(serving, measure) if on_engine is not None else measure()  # noqa: E731
        old_ms = serving_ms()
        details["serving_ms_per_token"] = round(old_ms, 3)

        def over(new: float, old: float) -> bool:
            return new > cfg.max_latency_ratio * old and new - old > cfg.min_delta_ms

        if over(new_ms, old_ms):  # confirm: the serving model first this time, then the new one
            old_ms = serving_ms()
            new_ms = decode_ms_per_token(model, cfg.steps)
            details["remeasured"] = {"decode_ms_per_token": round(new_ms, 3),
                                     "serving_ms_per_token": round(old_ms, 3)}
            if over(new_ms, old_ms):
                return SelfTestResult(False, f"decode latency {new_ms:.2f} ms/token is over "
                                             f"{cfg.max_latency_ratio}x the serving model's {old_ms:.2f} ms/token "
                                             f"(measured twice)", details)
    elif cfg.max_ms_per_token is not None and new_ms > cfg.max_ms_per_token:
        return SelfTestResult(False, f"decode latency {new_ms:.2f} ms/token is over the limit of "
                                     f"{cfg.max_ms_per_token} ms/token", details)
    return SelfTestResult(True, "", details)
