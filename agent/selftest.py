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

The new model is loaded and timed in a child process (runtime/child.py): a model that crashes its runtime
or hangs (SELF_TEST_STEP_TIMEOUT_S per step) fails the self-test while the agent keeps serving, and what it
loaded is gone with the child.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from agent.model import LoadedModel, load_model
from ota.bundle import Manifest
from ota.update import SelfTestResult
from runtime.autotune import Candidate
from runtime.errors import RuntimeUserError
from runtime.generate import decode_one_token, prefill

log = logging.getLogger("edgeglm.selftest")


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


SELF_TEST_STEP_TIMEOUT_S = 600.0  # loading the new model, or one timing of it, taking longer fails the test
_CHILD_TAG = "edgeglm-selftest "


class _Failed(Exception):
    """The new model failed the self-test before the latency budget (`reason`, `details`)."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.reason, self.details = reason, details


class _HereModel:
    """The new model loaded in this process (where no child process can start)."""

    def __init__(self, slot: Path, cfg: SelfTestConfig, same: Candidate | None):
        self.slot, self.cfg, self.same, self.model = slot, cfg, same, None

    def load(self) -> dict:
        try:
            self.model = load_model(self.slot, self.cfg.backend, self.cfg.threads, prefill_graph=self.cfg.prefill_graph,
                                    device=self.cfg.device, path=self.same)
        except RuntimeUserError as exc:
            raise _Failed(f"could not load the model: {exc}") from None
        return _loaded(self.model)

    def measure(self, steps: int) -> float:
        return decode_ms_per_token(self.model, steps)

    def close(self) -> None:
        self.model = None


class _ChildModel:
    """The new model loaded in a child process: a model that crashes its runtime (a segfault, the OOM killer)
    or hangs fails the self-test instead of taking the serving agent down (and restarting it up to
    `max_entries` times before the update fails), and what it loaded goes away with the child."""

    def __init__(self, slot: Path, cfg: SelfTestConfig, same: Candidate | None, timeout_s: float):
        from runtime.child import Child

        self.timeout_s = timeout_s
        self.child = Child("agent.selftest", "_child_main", _CHILD_TAG)
        self.child.send({"slot": str(slot), "cfg": asdict(cfg), "path": same.to_dict() if same else None})

    def _next(self, doing: str) -> dict:
        import queue

        from runtime.child import exit_text

        try:
            event = self.child.next_event(self.timeout_s)
        except queue.Empty:
            self.child.stop()
            raise _Failed(f"{doing} took longer than {self.timeout_s:g} s: stopped") from None
        if event is None:
            raise _Failed(f"the self-test's process died ({exit_text(self.child.end())}) while {doing}")
        return event

    def load(self) -> dict:
        event = self._next("loading the model")
        if "error" in event:
            raise _Failed(event["error"])
        return event["loaded"]

    def measure(self, steps: int) -> float:
        self.child.send("measure")
        return self._next("timing its decode")["ms"]

    def close(self) -> None:
        try:
            self.child.send("quit")
            self.child.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001: gone already, or stuck: stopped below
            pass
        self.child.stop()


def _loaded(model: LoadedModel) -> dict:
    golden = model.golden_check()
    return {"backend": model.backend, "path": model.path.describe(), "golden": golden.describe(),
            "golden_passed": golden.passed}


def _child_main() -> None:
    """The self-test's process: the request on stdin, then "measure" lines; tagged reports on stdout."""
    import json
    import sys

    from runtime.child import child_stdout, report

    out = child_stdout()
    request = json.loads(sys.stdin.readline())
    cfg = SelfTestConfig(**request["cfg"])
    here = _HereModel(Path(request["slot"]), cfg, Candidate.from_dict(request["path"]) if request["path"] else None)
    try:
        report(out, _CHILD_TAG, loaded=here.load())
    except _Failed as exc:
        report(out, _CHILD_TAG, error=exc.reason)
        return
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        report(out, _CHILD_TAG, ms=here.measure(cfg.steps))


def run_self_test(slot: Path, manifest: Manifest, cfg: SelfTestConfig, serving: LoadedModel | None,
                  on_engine: Callable[[LoadedModel, Callable[[], float]], float] | None = None, *,
                  isolate: bool = True, timeout_s: float = SELF_TEST_STEP_TIMEOUT_S) -> SelfTestResult:
    """Load the new slot, run its golden check and time its decode against `serving`'s. `on_engine(model,
    fn)` runs `fn` with the serving model's engine to itself (the agent's batching worker owns it). The new
    model runs in a child process (`isolate`; in this one where none can start), each step of it limited to
    `timeout_s`."""
    # like for like: on the serving model's execution path (an accelerator the autotune chose, its threads and
    # hints) where the new bundle carries that backend; a CPU-run candidate timed against a GPU-run serving
    # model would always look slower (the new model is tuned anew when it is activated)
    same = serving.path if serving is not None and serving.path is not None \
        and serving.path.backend in manifest.backends else None
    new = None
    if isolate:
        try:
            new = _ChildModel(slot, cfg, same, timeout_s)
        except OSError as exc:
            log.warning("self-test: could not start its process (%s); loading the new model in the agent's", exc)
    new = new or _HereModel(slot, cfg, same)
    try:
        return _judge(new, cfg, serving, on_engine)
    except _Failed as exc:
        return SelfTestResult(False, exc.reason, exc.details)
    finally:
        new.close()


def _judge(new, cfg: SelfTestConfig, serving: LoadedModel | None, on_engine) -> SelfTestResult:
    loaded = new.load()
    details = {"backend": loaded["backend"], "path": loaded["path"], "golden": loaded["golden"]}
    if not loaded["golden_passed"]:
        return SelfTestResult(False, f"golden check failed on {loaded['backend']}: {loaded['golden']}", details)
    try:
        new_ms = new.measure(cfg.steps)
    except _Failed as exc:
        raise _Failed(exc.reason, details) from None
    details["decode_ms_per_token"] = round(new_ms, 3)
    if serving is not None:
        measure = lambda: decode_ms_per_token(serving, cfg.steps)  # noqa: E731
        serving_ms = lambda: on_engine(serving, measure) if on_engine is not None else measure()  # noqa: E731
        old_ms = serving_ms()
        details["serving_ms_per_token"] = round(old_ms, 3)

        def over(new_: float, old: float) -> bool:
            return new_ > cfg.max_latency_ratio * old and new_ - old > cfg.min_delta_ms

        if over(new_ms, old_ms):  # confirm: the serving model first this time, then the new one
            old_ms = serving_ms()
            try:
                new_ms = new.measure(cfg.steps)
            except _Failed as exc:
                raise _Failed(exc.reason, details) from None
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
