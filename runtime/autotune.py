"""Measured execution-path selection: which backend, device, thread count and hints serve a bundle.

    candidates(hw, bundle_backends, installed, threads)   rules: enumerate, order and prune the paths
    autotune(bundle, hw, cache_dir=..., retune=...)       the cached choice, or measure and cache one

An execution path (`Candidate`) is a backend, a device (an OpenVINO device id or an ONNX Runtime
execution provider), an intra-op thread count, CPU pinning and, on OpenVINO, the inference and
KV-cache precision hints. The rules, from the hardware probe:

- CPU: ONNX Runtime's CPU provider and OpenVINO's CPU device, with the physical and the logical core
  count as thread counts (one when they are equal). ONNX Runtime also gets a pinned variant at one
  thread per physical core (on SMT machines it keeps two threads off one core; OpenVINO pins by
  default). OpenVINO gets f32 with an f32 KV cache (exact), a u8 KV cache (x86 AVX2 or ARM NEON)
  and bf16 only where the CPU computes it natively (AMX or avx512_bf16).
- Accelerators, only where the probe found them: OpenVINO GPU/NPU devices (f16), ONNX Runtime's
  CUDA, TensorRT and OpenVINO execution providers. They are tried first.
- A path that changes numerics (a precision hint, a u8 cache, an accelerator) must pass the bundle's
  golden check (runtime/golden.py) before it is measured; one that fails, or fails to load, is
  excluded with the reason.

The measurement is short (about a second per path on glm-s): a warm-up, then `repeats` rounds of a
`prompt_tokens` random-id prefill and `decode_steps` greedy steps; all paths are loaded together and
the rounds interleave them (one at a time when their estimated memory, `resident_bytes`, would not
fit in half the memory this process can still take: MemAvailable, or the cgroup limit minus its
usage), and each path keeps its best round. ONNX Runtime paths run in the prefill-graph mode that
will serve (`choose_prefill_graph`). Objective: decode tokens/s; paths within `TIE` (3%) of the
best count as tied and the lowest TTFT among them wins. An ONNX Runtime CPU path with both graphs also
times batched steps of 4-32 rows on each (`measure_prefill_rows`; a tie within 3% stays on the decode graph,
whose batched rows round like a row alone): the served engine takes the measured
`prefill_min_rows` (`apply_prefill_rows`) instead of the bundle's.

The result is cached as JSON under `cache_dir`, keyed by (sha256 of the bundle's manifest, the
hardware fingerprint, a thread limit): a new bundle, new hardware or new backend versions mean a new
measurement, `retune=True` forces one.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.engine import BACKENDS, ModelArch, load_engine, prefill_mode
from runtime.errors import BackendUnavailable, Stopped
from runtime.golden import check_golden
from runtime.prefix_cache import release_freed_memory
from runtime.probe import HardwareInfo, accelerators, probe_memory, usable_cpu_ids, usable_cpus

log = logging.getLogger("edgeglm.autotune")

CACHE_VERSION = 1
CACHE_KEEP = 16  # autotune results kept per cache dir, most recently used first (~3.3 KiB each)
TIE = 0.03  # decode tok/s within 3% of the best: a tie, broken by TTFT
ORT_CPU = "CPUExecutionProvider"
ORT_ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider")
OV_ACCELERATOR_PREFIXES = ("GPU", "NPU")
BF16_FEATURES = frozenset({"amx_bf16", "avx512_bf16"})
U8_KV_FEATURES = frozenset({"avx2", "asimd"})


@dataclass(frozen=True)
class Candidate:
    backend: str  # "onnxruntime" or "openvino"
    device: str = "CPU"  # OpenVINO device id, or ONNX Runtime execution provider
    threads: int | None = None  # intra-op threads; None: the engine's default (all usable cores)
    pinned: bool | None = None  # ONNX Runtime: one thread per core; OpenVINO: ENABLE_CPU_PINNING
    precision: str | None = None  # OpenVINO INFERENCE_PRECISION_HINT (None: the engine's f32 / device default)
    kv_cache_precision: str | None = None  # OpenVINO KV_CACHE_PRECISION

    @property
    def on_cpu(self) -> bool:
        return self.device in ("CPU", ORT_CPU)

    @property
    def changes_numerics(self) -> bool:
        """True when results may differ from the f32 CPU path the golden record was made for."""
        return not self.on_cpu or self.precision not in (None, "f32") or self.kv_cache_precision not in (None, "f32")

    def engine_options(self) -> dict:
        """Keyword arguments for runtime.engine.load_engine (besides threads)."""
        if self.backend == "onnxruntime":
            return {"provider": self.device, "pinned": bool(self.pinned)}
        opts = {"device": self.device, "pinned": self.pinned}
        if not self.on_cpu:  # accelerators: the device's default unless a hint is given
            opts.update(precision=self.precision, kv_cache_precision=self.kv_cache_precision)
        else:
            opts.update(precision=self.precision or "f32", kv_cache_precision=self.kv_cache_precision or "f32")
        return opts

    def describe(self) -> str:
        """e.g. "openvino CPU, 2 threads, pinned, kv u8"."""
        device = self.device.removesuffix("ExecutionProvider")
        parts = [f"{self.backend} {device}"]
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        if self.pinned:
            parts.append("pinned")
        if self.precision:
            parts.append(self.precision)
        if self.kv_cache_precision:
            parts.append(f"kv {self.kv_cache_precision}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


ORT_PROVIDER_ALIASES = {"cpu": ORT_CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                        "trt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def device_candidate(backend: str, device: str, threads: int | None = None) -> Candidate:
    """The path of a device the user named (model.device / --device) on a named backend: an OpenVINO
    device id as OpenVINO writes it ("CPU", "GPU", "GPU.1", "NPU"), or an ONNX Runtime execution
    provider, in full or short ("CUDA", "TensorRT", "CPU"). Not measured; the engine refuses a device
    it does not have and lists those it has."""
    device = device.strip()
    if backend == "onnxruntime":
        device = ORT_PROVIDER_ALIASES.get(device.lower(), device)
    else:  # OpenVINO's device ids are upper case ("GPU.1")
        device = device.upper()
    base = default_candidate(backend, threads)
    return Candidate(backend, device, base.threads if device in ("CPU", ORT_CPU) else threads)


def default_candidate(backend: str, threads: int | None = None) -> Candidate:
    """The path a named backend runs on without tuning: CPU, f32, all usable cores unless `threads`."""
    return Candidate(backend, ORT_CPU if backend == "onnxruntime" else "CPU", threads or usable_cpus())


def thread_counts(hw: HardwareInfo, threads: int | None = None) -> list[int]:
    """Physical then logical core count (deduplicated), or only the one the user fixed."""
    if threads:
        return [threads]
    logical = hw.cpu.logical_cores
    physical = min(hw.cpu.physical_cores or logical, logical)
    return sorted({physical, logical})


def _backend_devices(hw: HardwareInfo, name: str) -> tuple[str, ...]:
    return next((b.device_ids for b in hw.backends if b.name == name and b.available), ())


def cpu_candidates(hw: HardwareInfo, backend: str, threads: int | None = None) -> list[Candidate]:
    counts = thread_counts(hw, threads)
    physical = min(hw.cpu.physical_cores or hw.cpu.logical_cores, hw.cpu.logical_cores)
    features = set(hw.cpu.features)
    out: list[Candidate] = []
    if backend == "onnxruntime":
        for t in counts:
            out.append(Candidate(backend, ORT_CPU, t, pinned=False))
            if t == physical and t > 1:
                out.append(Candidate(backend, ORT_CPU, t, pinned=True))
        return out
    for t in counts:
        out.append(Candidate(backend, "CPU", t, pinned=True, precision="f32", kv_cache_precision="f32"))
    best_guess = counts[0]  # hints are tried at one thread count: the physical cores
    if features & U8_KV_FEATURES:
        out.append(Candidate(backend, "CPU", best_guess, pinned=True, precision="f32", kv_cache_precision="u8"))
    if features & BF16_FEATURES:
        out.append(Candidate(backend, "CPU", best_guess, pinned=True, precision="bf16", kv_cache_precision="f32"))
        out.append(Candidate(backend, "CPU", best_guess, pinned=True, precision="bf16", kv_cache_precision="u8"))
    return out


def accelerator_candidates(hw: HardwareInfo, backend: str) -> list[Candidate]:
    if backend == "openvino":
        return [Candidate(backend, d, precision="f16") for d in _backend_devices(hw, backend)
                if d.startswith(OV_ACCELERATOR_PREFIXES)]
    present = set(_backend_devices(hw, backend))
    return [Candidate(backend, p) for p in ORT_ACCELERATORS if p in present]


def candidates(hw: HardwareInfo, bundle_backends, installed=None, threads: int | None = None) -> list[Candidate]:
    """The execution paths worth measuring, in rule order: accelerators, then ONNX Runtime CPU (the
    fastest decode in docs/performance.md), then OpenVINO CPU; exact paths before hinted ones.
    Backends that the bundle does not carry or that the probe did not find (or `installed` lacks) are pruned."""
    installed = [b.name for b in hw.backends if b.available] if installed is None else installed
    usable = [b for b in BACKENDS if b in bundle_backends and b in installed]
    accel = [c for b in usable for c in accelerator_candidates(hw, b)]
    cpu = [c for b in usable for c in cpu_candidates(hw, b, threads)]
    return accel + cpu


# --- measuring ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TuneSettings:
    prompt_tokens: int = 64
    decode_steps: int = 24
    repeats: int = 3  # each path keeps its best round
    seed: int = 0


@dataclass
class Trial:
    candidate: Candidate
    status: str = "pending"  # "measured" or "excluded"
    reason: str | None = None  # why excluded
    golden: str | None = None  # the golden check's outcome, for paths that change numerics
    load_s: float | None = None
    ttft_ms: float | None = None  # best round
    decode_tok_s: float | None = None  # best round
    prefill_min_rows: int | None = None  # ONNX Runtime CPU with both graphs: measure_prefill_rows
    prefill_rows_ms: dict | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "candidate": self.candidate.to_dict(), "path": self.candidate.describe()}

    @classmethod
    def from_dict(cls, data: dict) -> "Trial":
        fields_ = {k: data.get(k) for k in cls.__dataclass_fields__ if k != "candidate"}
        return cls(Candidate.from_dict(data["candidate"]), **fields_)


@dataclass
class TuneResult:
    bundle_sha256: str
    fingerprint: str
    threads_limit: int | None
    choice: Candidate
    trials: list[Trial]
    accelerators: list[str]
    settings: TuneSettings
    measured_at: float
    elapsed_s: float
    objective: str = "highest decode tokens/s; within 3% of the best, lowest TTFT"
    from_cache: bool = False
    cache_path: str | None = None
    prefill: str = "on"  # the ONNX Runtime prefill-graph mode its ONNX Runtime paths were measured with
    # ONNX Runtime CPU with both graphs: the fewest token rows a step needs to run on the prefill graph, measured
    # (`measure_prefill_rows`; None: not measured, the bundle's edgeglm.prefill_min_rows holds), and the
    # milliseconds per step of each measured row count on the decode and the prefill graph
    prefill_min_rows: int | None = None
    prefill_rows_ms: dict | None = None
    # cores of other work on this process's CPUs while the paths were measured, beyond those the measurement
    # left free (`OtherWork`); None where not read (not Linux)
    contention: float | None = None
    # an accelerator path failed while measured and this is the second measurement (`_flaky`): kept as it is
    retried: bool = False

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "bundle_sha256": self.bundle_sha256, "fingerprint": self.fingerprint,
                "threads_limit": self.threads_limit, "choice": self.choice.to_dict(),
                "choice_path": self.choice.describe(), "objective": self.objective,
                "accelerators": self.accelerators, "settings": asdict(self.settings),
                "measured_at": self.measured_at, "elapsed_s": self.elapsed_s,
                "trials": [t.to_dict() for t in self.trials],
                "from_cache": self.from_cache, "cache_path": self.cache_path, "prefill": self.prefill,
                "prefill_min_rows": self.prefill_min_rows, "prefill_rows_ms": self.prefill_rows_ms,
                "contention": self.contention, "retried": self.retried}

    @classmethod
    def from_dict(cls, data: dict) -> "TuneResult":
        return cls(data["bundle_sha256"], data["fingerprint"], data["threads_limit"],
                   Candidate.from_dict(data["choice"]), [Trial.from_dict(t) for t in data["trials"]],
                   list(data["accelerators"]), TuneSettings(**data["settings"]), data["measured_at"],
                   data["elapsed_s"], data["objective"], prefill=data.get("prefill", "on"),
                   prefill_min_rows=data.get("prefill_min_rows"), prefill_rows_ms=data.get("prefill_rows_ms"),
                   contention=data.get("contention"), retried=bool(data.get("retried", False)))

    @property
    def measured_threads(self) -> int:
        """The most threads a measured path ran with (all usable CPUs for a path without a thread count)."""
        return max((t.candidate.threads or usable_cpus() for t in self.trials), default=usable_cpus())


def measurement_prompt(arch: ModelArch, settings: TuneSettings) -> list[int]:
    n = max(1, min(settings.prompt_tokens, arch.max_positions - settings.decode_steps - 1))
    return np.random.default_rng(settings.seed).integers(0, arch.vocab_size, n).tolist()


def measure_round(engine, prompt: list[int], steps: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one prefill and `steps` greedy steps."""
    from runtime.bench import time_generation  # one timing loop for autotune and bench

    timing = time_generation(engine, prompt, steps + 1)
    return timing.ttft_s, timing.decode_tok_s


def choose(trials: list[Trial]) -> Candidate:
    """The objective: best decode tok/s; among paths within TIE of it, the lowest TTFT."""
    measured = [t for t in trials if t.status == "measured"]
    if not measured:
        reasons = "; ".join(f"{t.candidate.describe()}: {t.reason}" for t in trials) or "no candidate paths"
        raise BackendUnavailable(f"no execution path could run the bundle ({reasons})")
    best = max(t.decode_tok_s for t in measured)
    tied = [t for t in measured if t.decode_tok_s >= (1 - TIE) * best]
    return min(tied, key=lambda t: t.ttft_ms).candidate


def resident_bytes(bundle, backend: str, prefill: str = "on") -> int:
    """What a loaded path of `backend` holds, estimated from the bundle's files: their bytes (not the
    embedding table, which ONNX Runtime's engine reads a row at a time), plus the weight data once
    more where a prefill graph's session prepacks its own copy beside the decode session's (glm-m
    measured: 723 MB for 365 MB of files, 503 MB without the prefill graph, 472 MB with it alone).
    `prefill`: the ONNX Runtime prefill-graph mode ("on", "off" or "only"; see runtime.engine)."""
    files = {f.path: f.size for f in bundle.manifest.files
             if f.path.startswith(backend + "/") and not f.path.endswith(".npy")}
    twice = files.get(f"{backend}/model.onnx.data", 0) if f"{backend}/prefill.onnx" in files else 0
    return sum(files.values()) + (twice if prefill == "on" else 0)


KV_SIZING_MAX = 256  # kv_sizing counts requests up to this many (more than any batch takes)


def kv_sizing(bundle, memory, choice: "Candidate", prefill: str = "on") -> dict:
    """What the agent's batching.max_kv_mb = "auto" would come to for `bundle` on the chosen path here (a third
    of the memory left once the model is loaded, the load estimated by `resident_bytes`), and how many
    requests that holds: at the whole context window, and at 512 prompt + 256 new tokens."""
    from runtime.engine import kv_estimate

    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    gpu = choice.backend == "onnxruntime" and not choice.on_cpu  # the GPU graph: float16 KV in device memory
    per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * (2 if gpu else 4)
    from runtime.batching import AUTO_KV_DIVISOR
    from runtime.probe import gpu_memory

    on_gpu = gpu_memory() if gpu else None
    budget = on_gpu[0] if on_gpu is not None else memory.budget_bytes()  # the agent's rule (agent.http_api)

    loaded = resident_bytes(bundle, choice.backend, prefill)
    auto = None if budget is None else max(1, (budget - loaded) // AUTO_KV_DIVISOR)

    def rows(need: int) -> int | None:
        """How many requests of `need` positions fit, up to KV_SIZING_MAX (which reads "KV_SIZING_MAX or more")."""
        if auto is None:
            return None
        n = 0
        while n < KV_SIZING_MAX and kv_estimate([need] * (n + 1), per_token, arch, device=gpu) <= auto:
            n += 1
        return n

    return {"kv_bytes_per_position": per_token, "kv_dtype": "float16" if gpu else "float32",
            "auto_from": "GPU memory free" if on_gpu is not None else "memory available",
            "context_window": arch.max_positions, "auto_kv_mb": None if auto is None else round(auto / 2**20, 1),
            "full_context_requests": rows(arch.max_positions - 1),
            "requests_of_768": rows(min(768, arch.max_positions - 1))}


def format_kv_sizing(k: dict) -> str:
    head = f"KV cache: {k['kv_bytes_per_position'] / 1024:g} KiB per position ({k['kv_dtype']}), context window " \
           f"{k['context_window']}"
    if k["auto_kv_mb"] is None:
        return head + '; batching.max_kv_mb "auto": no bound here (the memory available is not known)'
    def count(n: int) -> str:
        return f"{n} or more" if n >= KV_SIZING_MAX else str(n)

    return (head + f'\nbatching.max_kv_mb "auto" here: about {k["auto_kv_mb"]:g} MiB once the model is loaded '
            f'(a third of the {k.get("auto_from", "memory available")}): '
            f'{count(k["full_context_requests"])} request(s) of the whole window at once, '
            f'{count(k["requests_of_768"])} of '
            "512 + 256 tokens (more wait their turn; a request alone always runs; batching.max_batch, 8 by "
            "default, caps a batch too)")


AUTO_PREFILL_SHARE = 0.5  # prefill_graph "auto": both graphs when they take at most this share of the budget


@dataclass(frozen=True)
class PrefillChoice:
    """The ONNX Runtime prefill-graph mode to load ("on", "off" or "only") and why."""

    mode: str
    reason: str


def choose_prefill_graph(setting: bool | str, bundle, memory) -> PrefillChoice:
    """Resolve `model.prefill_graph` for `bundle`: true/false/"only" as configured; "auto" runs both
    graphs (fast prompts and batches, fast single-stream decode) when their estimated resident bytes
    take at most `AUTO_PREFILL_SHARE` of the memory this process can still take (`memory`, a
    runtime.probe.MemoryInfo: MemAvailable, or the cgroup limit minus its usage), else the prefill
    graph alone ("only": the weights held once, prompts as fast, one stream decodes 10-25% slower).
    The other half is left for KV caches, the prefix cache and an OTA candidate loaded beside the
    serving model for its self-test. Unknown memory counts as plenty."""
    both, alone = resident_bytes(bundle, "onnxruntime", "on"), resident_bytes(bundle, "onnxruntime", "only")
    if setting != "auto":
        mode = prefill_mode(setting)
        budget = memory.budget_bytes() if memory is not None and mode == "on" and both != alone else None
        if budget is not None and both > AUTO_PREFILL_SHARE * budget:  # e.g. an agent.toml of edgeglm 0.1.0's
            # installer, which wrote every setting with its default then (true)
            reason = (f"configured ({str(setting).lower()}): both graphs (about {_mb(both)}) take more than half of the {_mb(budget)} "
                      f"available; \"auto\", the default, would hold the weights once (about {_mb(alone)})")
            log.warning("model.prefill_graph %s", reason)
            return PrefillChoice(mode, reason)
        return PrefillChoice(mode, "configured")
    if both == alone:
        return PrefillChoice("on", "auto: the bundle has no prefill graph")
    budget = memory.budget_bytes() if memory is not None else None
    if budget is None:
        return PrefillChoice("on", f"auto: both graphs (about {_mb(both)}); available memory unknown")
    if both <= AUTO_PREFILL_SHARE * budget:
        return PrefillChoice("on", f"auto: both graphs (about {_mb(both)}) fit in half of the {_mb(budget)} available")
    return PrefillChoice("only", f"auto: both graphs (about {_mb(both)}) would take more than half of the "
                                 f"{_mb(budget)} available; the prefill graph alone holds the weights once "
                                 f"(about {_mb(alone)})")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 10 << 20 else f"{n / (1 << 20):.1f} MB"


def _prefill_of(c: Candidate, prefill: str) -> str:
    return prefill if c.backend == "onnxruntime" else "on"


def loaded_bytes(bundle, backend: str, prefill: str = "on") -> int:
    """What loading and running a path of `backend` adds to the process, for the autotune's "together or one at a
    time": `resident_bytes` is the files' share of it. OpenVINO's CPU plugin keeps its own copy of the weights
    beside the IR it read, plus buffers; ONNX Runtime's sessions add arenas. Measured per path (VNNI EPYC, a fresh
    process, after loading and two prompts): glm-m OpenVINO 618-622 MB for 341 MB of files, ONNX Runtime 537 MB
    (high-water mark) for 447 estimated; glm-s 119-120 for 43, 89 for 57."""
    files = resident_bytes(bundle, backend, prefill)
    if backend == "openvino":
        return 2 * files + (48 << 20)
    return files + files // 4 + (32 << 20)


def _groups(bundle, cands: list[Candidate], available: int | None, prefill: str = "on") -> list[list[Candidate]]:
    """All paths together (interleaved rounds) when what they add (`loaded_bytes`) fits in half the available
    memory, else one at a time (glm-m's six CPU paths loaded together peaked at 4.35 GB: two ONNX Runtime and four
    OpenVINO precision / KV-cache variants)."""
    total = sum(loaded_bytes(bundle, c.backend, _prefill_of(c, prefill)) for c in cands)
    if available is None or total <= available // 2:
        return [cands]
    return [[c] for c in cands]


def _load(bundle, arch: ModelArch, trial: Trial, prefill: str = "on"):
    c = trial.candidate
    entry = bundle.path(bundle.manifest.backends[c.backend].entry)
    options = c.engine_options() | {"listed": bundle.listed_beside(bundle.manifest.backends[c.backend].entry)}
    if c.backend == "onnxruntime":
        options["prefill_graph"] = prefill
    t0 = time.perf_counter()
    try:
        engine = load_engine(c.backend, entry, arch, c.threads, **options)
    except Exception as exc:  # a missing provider, a plugin that cannot compile the graph: excluded
        trial.status, trial.reason = "excluded", f"could not load: {str(exc).splitlines()[0][:200]}"
        return None
    trial.load_s = time.perf_counter() - t0
    if c.changes_numerics:
        g = bundle.manifest.golden
        seq = g.backends[c.backend]
        try:
            result = check_golden(engine, g.prompt_ids, seq.tokens, seq.margins, g.tolerance)
        except Exception as exc:  # loads, then fails on its first inference (lazy compilation, out of memory)
            _failed_at_run_time(trial, exc)
            return None
        trial.golden = result.describe()
        if not result.passed:
            trial.status, trial.reason = "excluded", f"golden check failed: {result.describe()}"
            return None
    return engine


def _failed_at_run_time(trial: Trial, exc: Exception) -> None:
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    trial.status, trial.reason = "excluded", f"failed at run time: {first}"


def measure(bundle, trials: list[Trial], settings: TuneSettings, available_memory: int | None,
            on_step: Callable[[], None] = lambda: None, prefill: str = "on",
            on_event: Callable[[str, Trial], None] = lambda what, trial: None) -> None:
    """Load, gate and time every trial's path in place (status, reason, golden, timings); ONNX Runtime
    paths with the prefill-graph mode `prefill` (the one that will serve). Each group's engines are let go,
    and their memory handed back to the system, before the next group loads (and before the caller loads
    the path that will serve): glm-m's six paths left the process at 1.59 GB RSS without that, 0.16 GB with
    it. `on_event(what, trial)` is called before each thing done with a trial's engine ("loading", "warming
    up", "measuring", "timing batched steps") and with "done" once its outcome is final."""
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    prompt = measurement_prompt(arch, settings)
    by_candidate = {t.candidate: t for t in trials}
    for group in _groups(bundle, [t.candidate for t in trials], available_memory, prefill):
        _measure_group(bundle, arch, [by_candidate[c] for c in group], settings, prompt, on_step, prefill,
                       on_event)
        gc.collect()  # nothing of the group's engines may wait for the cyclic collector
        release_freed_memory()  # glibc keeps freed pages in its arenas otherwise (glm-m: 0.78 -> 0.16 GB)


def _measure_group(bundle, arch: ModelArch, group: list[Trial], settings: TuneSettings, prompt: list[int],
                   on_step: Callable[[], None], prefill: str,
                   on_event: Callable[[str, Trial], None]) -> None:
    """Load `group`'s paths together and time them in interleaved rounds; its engines are gone on return."""
    engines = {}
    for trial in group:
        on_event("loading", trial)
        engine = _load(bundle, arch, trial, prefill)
        if engine is not None:
            on_event("warming up", trial)
            try:
                measure_round(engine, prompt, 2)  # warm-up: first-run allocations and compilation, both graphs
            except Exception as exc:  # a path that fails at run time is excluded, not the whole autotune
                _failed_at_run_time(trial, exc)
            else:
                engines[trial.candidate] = engine
        del engine
        on_step()
    by_candidate = {t.candidate: t for t in group}
    rounds: dict[Candidate, list[tuple[float, float]]] = {c: [] for c in engines}
    for _ in range(settings.repeats):
        for c in list(engines):
            on_event("measuring", by_candidate[c])
            try:
                rounds[c].append(measure_round(engines[c], prompt, settings.decode_steps))
            except Exception as exc:
                _failed_at_run_time(by_candidate[c], exc)
                del engines[c], rounds[c]
            on_step()
    for c, results in rounds.items():
        t = by_candidate[c]
        t.status = "measured"
        t.ttft_ms = round(min(r[0] for r in results) * 1000, 3)
        t.decode_tok_s = round(max(r[1] for r in results), 2)
        on_event("timing batched steps", t)
        try:  # which steps the prefill graph should take here (None: the engine has one graph)
            rows = measure_prefill_rows(engines[c])
        except Exception as exc:  # not a reason to drop the path: the bundle's threshold holds
            log.warning("autotune: %s: timing batched steps on both graphs failed (%s); the bundle's "
                        "prefill_min_rows holds", c.describe(), (str(exc).splitlines() or [repr(exc)])[0][:200])
            rows = None
        if rows is not None:
            t.prefill_min_rows, t.prefill_rows_ms = rows
    for t in group:
        on_event("done", t)


# other work on this process's CPUs beside a measurement, beyond the cores the measurement left free, above
# which the result is measured again at a later load that finds the box quieter (an OTA update is tuned while
# the model before it serves; a box may run other jobs)
CONTENTION_LIMIT = 0.25  # cores; EDGEGLM_AUTOTUNE_CONTENTION_LIMIT overrides it ("inf": never measured again)
QUIET_SAMPLE_S = 0.3  # how long a load samples the box's other work before using such a result
PATH_TIMEOUT_S = 600.0  # isolated: one thing done with one path (a load, a round) for longer is stopped
STOP_POLL_S = 0.2  # isolated: how often a wait for the measuring child looks at the stop request
_CHILD_TAG = "edgeglm-autotune "  # the child's protocol lines on its stdout start with this


def measure_isolated(bundle, trials: list[Trial], settings: TuneSettings, available_memory: int | None,
                     on_step: Callable[[], None] = lambda: None, prefill: str = "on",
                     timeout_s: float = PATH_TIMEOUT_S, stop: threading.Event | None = None) -> bool:
    """`measure` in a child process: a path that kills the process (a GPU or NPU plugin that crashes, the
    kernel's OOM killer) or hangs costs that path, not the agent (which would otherwise die at every start,
    before it serves anything), and what the measured paths loaded (libraries, arenas) never lands in the
    process that serves. Where the child dies or goes silent for `timeout_s` while on a path, that path is
    excluded with the reason and the paths it had not finished are measured in a new child. Where no child
    can run at all, the paths are measured in this process, with a warning: False then, else True. `stop`: when
    it is set, the child is killed and `Stopped` raised (within STOP_POLL_S; nothing measured is kept; measuring
    in this process, after the load or round in progress)."""
    pending = [t for t in trials if t.status == "pending"]
    while pending:
        progress = _measure_in_child(bundle, pending, settings, available_memory, on_step, prefill, timeout_s,
                                     stop)
        if not progress:
            _check_stop(stop)
            log.warning("autotune: the measuring process could not run; measuring in this process instead")
            measure(bundle, pending, settings, available_memory, _stopping_step(on_step, stop), prefill)
            return False
        pending = [t for t in pending if t.status == "pending"]
    return True


def _measure_in_child(bundle, trials: list[Trial], settings: TuneSettings, available_memory: int | None,
                      on_step: Callable[[], None], prefill: str, timeout_s: float,
                      stop: threading.Event | None = None) -> bool:
    """One child measuring `trials` (updated in place as it reports them); False when it made no progress at
    all (it did not start, or died before any path), True otherwise."""
    from runtime.child import Child

    try:
        child = Child("runtime.autotune", "_child_main", _CHILD_TAG)
        child.send({"bundle": str(bundle.root), "candidates": [t.candidate.to_dict() for t in trials],
                    "settings": asdict(settings), "available": available_memory, "prefill": prefill})
    except OSError as exc:
        log.warning("autotune: could not start the measuring process: %s", exc)
        return False
    try:
        return _follow_child(child, trials, on_step, timeout_s, stop)
    finally:
        child.stop()  # an exception here (Ctrl-C, the agent stopping): the child stops too


STOPPED = "the autotune was stopped: the process is stopping (it measures again at the next start)"


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped(STOPPED)


def _stopping_step(on_step: Callable[[], None], stop: threading.Event | None) -> Callable[[], None]:
    """`on_step` that raises Stopped once `stop` is set (measuring in this process: the stop is seen after the
    load or round in progress, not within STOP_POLL_S)."""
    def step() -> None:
        on_step()
        _check_stop(stop)
    return step


def _next_event(child, timeout_s: float, stop: threading.Event | None):
    """The child's next report (Child.next_event), looking at `stop` every STOP_POLL_S while it waits."""
    import queue

    if stop is None:
        return child.next_event(timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        if stop.is_set():
            child.stop()
            raise Stopped(STOPPED)
        left = deadline - time.monotonic()
        if left <= 0:
            raise queue.Empty
        try:
            return child.next_event(min(left, STOP_POLL_S))
        except queue.Empty:
            continue


def _follow_child(child, trials: list[Trial], on_step: Callable[[], None], timeout_s: float,
                  stop: threading.Event | None = None) -> bool:
    """Read the child's reports until it ends (see _measure_in_child)."""
    import queue

    from runtime.child import exit_text

    current: tuple[Trial, str] | None = None  # the path the child is on, and what it is doing with it
    progress = finished = False
    while True:
        try:
            event = _next_event(child, timeout_s, stop)
        except queue.Empty:
            child.stop()
            if current is None:
                return progress
            trial, what = current
            trial.status, trial.reason = "excluded", f"{what} took longer than {timeout_s:g} s: stopped"
            log.warning("autotune: %s: %s", trial.candidate.describe(), trial.reason)
            return True
        if event is None:
            break
        if "step" in event:
            on_step()
        elif "at" in event:
            current = (trials[event["at"]], event["doing"])
        elif "trial" in event:
            trial, got = trials[event["trial"]], Trial.from_dict(event["result"])
            for name in Trial.__dataclass_fields__:
                if name != "candidate":
                    setattr(trial, name, getattr(got, name))
            progress = True
            if current is not None and current[0] is trial:
                current = None
        elif "done" in event:
            finished = True
    code = child.end()
    if finished and code == 0:
        for trial in trials:  # (never seen: every path is reported before "done")
            if trial.status == "pending":
                trial.status, trial.reason = "excluded", "the measuring process did not report it"
        return True
    if current is None:  # died between paths: those not reported are measured again
        log.warning("autotune: the measuring process ended (%s) between paths", exit_text(code))
        return progress
    trial, what = current
    trial.status, trial.reason = "excluded", f"the measuring process died ({exit_text(code)}) while {what}"
    log.warning("autotune: %s: %s; excluded", trial.candidate.describe(), trial.reason)
    return True


def _child_main() -> None:
    """The measuring process of `measure_isolated`: the request on stdin, tagged reports on stdout."""
    from runtime.child import child_stdout, report

    out = child_stdout()
    request = json.loads(sys.stdin.readline())
    from ota.bundle import open_bundle

    bundle = open_bundle(request["bundle"], verify=False)  # verified by the parent, which serves it
    trials = [Trial(Candidate.from_dict(c)) for c in request["candidates"]]
    index = {id(t): i for i, t in enumerate(trials)}

    def on_event(what: str, trial: Trial) -> None:
        if what == "done":
            report(out, _CHILD_TAG, trial=index[id(trial)], result=trial.to_dict())
        else:
            report(out, _CHILD_TAG, at=index[id(trial)], doing=what)
    measure(bundle, trials, TuneSettings(**request["settings"]), request["available"],
            on_step=lambda: report(out, _CHILD_TAG, step=1), prefill=request["prefill"], on_event=on_event)
    report(out, _CHILD_TAG, done=True)


PREFILL_ROWS_SIZES = (4, 8, 16, 32)  # batched-step row counts timed on both graphs
PREFILL_ROWS_CONTEXT = 64  # positions each row holds while timed


def measure_prefill_rows(engine, repeats: int = 5, sizes=PREFILL_ROWS_SIZES) -> tuple[int, dict] | None:
    """Where the prefill graph starts to pay on this machine: row-aligned batched decode steps of each of
    `sizes` rows (rows of PREFILL_ROWS_CONTEXT zero positions) timed on the decode graph and on the prefill
    graph, interleaved, `repeats` steps each after one untimed; the median ms per step of each. Returns
    (the fewest rows from which the prefill graph is faster by more than TIE (3%) at that size and every
    larger one, else twice the largest size; {rows: [decode ms, prefill ms]}), or None for an engine without
    both graphs
    (OpenVINO, prefill_graph off or only, a GPU graph). On the VNNI EPYC with blocks of up to 1024 the decode
    graph won at 4 rows (glm-m 15.6 vs 18.0 ms) and glm-s's up to 16, where the bundles say 4."""
    from runtime.engine import CacheRow, KvBlock

    if not _both_graphs(engine):
        return None
    arch, keep = engine.arch, engine.prefill_min_rows
    zeros = np.zeros((arch.num_kv_heads, PREFILL_ROWS_CONTEXT, arch.head_dim), np.float32)
    block = KvBlock((zeros,) * arch.num_layers, (zeros,) * arch.num_layers)
    timed: dict[int, list[float]] = {}
    try:
        for rows in sizes:
            batch = engine.new_batch()
            for _ in range(rows):
                batch.add(CacheRow(engine.cache_from_kv(block)))
            tokens = [0] * rows
            steps: dict[bool, list[float]] = {False: [], True: []}
            for r in range(repeats):
                for on_prefill in ((False, True) if r % 2 == 0 else (True, False)):
                    engine.prefill_min_rows = 1 if on_prefill else rows + 1
                    if r == 0:
                        batch.step(tokens)  # untimed: first run of this shape on this graph
                    t0 = time.perf_counter()
                    batch.step(tokens)
                    steps[on_prefill].append(time.perf_counter() - t0)
            timed[rows] = [round(float(np.median(steps[on])) * 1e3, 3) for on in (False, True)]
    finally:
        engine.prefill_min_rows = keep
    threshold = 2 * max(sizes)
    for rows in sorted(timed, reverse=True):  # the largest suffix of sizes where the prefill graph is faster
        if timed[rows][1] > (1 - TIE) * timed[rows][0]:  # within TIE: a tie, kept on the decode graph
            break
        threshold = rows
    return threshold, {str(k): v for k, v in timed.items()}


def _both_graphs(engine) -> bool:
    """An ONNX Runtime engine that routes steps between its two graphs by token rows (OpenVINO has none)."""
    return bool(getattr(engine, "routes_by_rows", False))


def apply_prefill_rows(engine, result: "TuneResult | None") -> bool:
    """Give `engine` the prefill_min_rows `result` measured, where it applies (an engine with both graphs, as
    the measurement had); True if given."""
    if result is None or result.prefill_min_rows is None or not _both_graphs(engine):
        return False
    engine.prefill_min_rows = result.prefill_min_rows
    return True



def rows_cache_path(cache_dir: Path, bundle_sha256: str, fingerprint: str, candidate: Candidate) -> Path:
    """Where `tune_prefill_rows` keeps its measurement: beside the autotune's results (pruned with them),
    keyed by the bundle, the hardware and the path (threads, pinning) the rows were timed on."""
    import hashlib

    key = hashlib.sha256(json.dumps(asdict(candidate), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir) / "autotune" / f"{bundle_sha256[:16]}-{fingerprint}-rows-{key}.json"


def tune_prefill_rows(engine, bundle_sha256: str, fingerprint: str, candidate: Candidate, cache_dir: Path,
                      retune: bool = False) -> tuple[int, dict, bool] | None:
    """The prefill_min_rows of an ONNX Runtime engine that serves on a path the autotune did not choose (a
    named backend: `model.backend = "onnxruntime"`, `--backend onnxruntime`), measured on that engine
    (`measure_prefill_rows`, under a second) and cached under `cache_dir` per bundle, hardware and path, so
    that batched decode steps go to the graph that is faster here instead of the bundle's fixed 4 rows (on the
    VNNI EPYC the decode graph is faster up to 16-32 rows: glm-s 8 rows 2.96 vs 3.75 ms). Applied to the
    engine. Returns (rows, {rows: [decode ms, prefill ms]}, from the cache), or None where the engine has not
    both graphs. A measurement that fails keeps the bundle's rows, with a warning."""
    if not _both_graphs(engine):
        return None
    path = rows_cache_path(cache_dir, bundle_sha256, fingerprint, candidate)
    threads = candidate.threads or usable_cpus()
    if not retune:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"not a JSON object but {type(data).__name__}")
            if (data.get("version"), data.get("bundle_sha256"), data.get("fingerprint"), data.get("candidate")) \
                    == (CACHE_VERSION, bundle_sha256, fingerprint, asdict(candidate)):
                rows, ms, contention = data.get("prefill_min_rows"), data.get("prefill_rows_ms"), data.get("contention")
                if rows is None or ms is None:
                    raise ValueError("prefill_min_rows or prefill_rows_ms missing")
                _check_rows(rows, ms, "")
                _check_contention(contention)
                if not quieter_now(contention, threads, "where batched steps go"):
                    _touch(path)
                    engine.prefill_min_rows = rows
                    return rows, ms, True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:  # deeply nested JSON too
            log.warning("prefill rows cache %s ignored (%s): measuring again", path, exc)
    # in this process, which may also serve the model before this one: that serving is not seen (other
    # processes' work is)
    other_work = OtherWork(threads, in_process=True)
    try:
        measured = measure_prefill_rows(engine)
    except Exception as exc:  # an engine error while timing: the bundle's rows serve
        log.warning("%s: timing batched steps on both graphs failed (%s): the bundle's prefill_min_rows %d holds",
                    candidate.describe(), (str(exc).splitlines() or [repr(exc)])[0][:200], engine.prefill_min_rows)
        return None
    if measured is None:
        return None
    rows, ms = measured
    engine.prefill_min_rows = rows
    contention = other_work.contention()
    if contention is not None and contention > contention_limit():
        log.warning("%s: where batched steps go was measured beside %.2f cores of other work: measured again at a "
                    "later load that finds the box quieter", candidate.describe(), contention)
    from ota.fsutil import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": CACHE_VERSION, "bundle_sha256": bundle_sha256,
                                 "fingerprint": fingerprint, "candidate": asdict(candidate),
                                 "prefill_min_rows": rows, "prefill_rows_ms": ms, "measured_at": time.time(),
                                 "contention": contention})
        prune_cache(path.parent, spare=path)
    except OSError as exc:
        log.warning("prefill rows not cached: %s (%s)", path, exc.strerror or exc)
    return rows, ms, False


# --- cache ----------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """The CLI's cache: $EDGEGLM_CACHE_DIR, else $XDG_CACHE_HOME/edgeglm, else ~/.cache/edgeglm."""
    if os.environ.get("EDGEGLM_CACHE_DIR"):
        return Path(os.environ["EDGEGLM_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgeglm"


def cache_path(cache_dir: Path, bundle_sha256: str, fingerprint: str, threads: int | None,
               prefill: str = "on") -> Path:
    suffix = (f"-t{threads}" if threads else "") + (f"-prefill-{prefill}" if prefill != "on" else "")
    return Path(cache_dir) / "autotune" / f"{bundle_sha256[:16]}-{fingerprint}{suffix}.json"


def _busy_cpu_s(cpus: list[int]) -> float | None:
    """CPU seconds the logical CPUs `cpus` have spent not idle since boot (/proc/stat); None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        wanted = {f"cpu{c}" for c in cpus}
        busy, found = 0, 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in wanted:
                ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                busy += sum(ticks) - ticks[3] - ticks[4]
                found += 1
        return busy / os.sysconf("SC_CLK_TCK") if found else None
    except (OSError, ValueError):
        return None


class OtherWork:
    """How much other work ran on this process's CPUs while something of ours did, beyond the cores ours left
    free (`threads` busy of the usable CPUs): the CPUs' busy time (/proc/stat) minus the CPU time of this
    process's children (the autotune measures in one; a child counts once it is reaped) and, `in_process`,
    of this process. In the agent an update is tuned while the model before it serves: that serving counts
    as other work."""

    def __init__(self, threads: int, in_process: bool = False):
        self.cpus = usable_cpu_ids()
        self.spare = max(0, len(self.cpus) - threads)
        self.in_process = in_process
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        """(monotonic s, the CPUs' busy s, reaped children's CPU s, this process's CPU s)"""
        busy = _busy_cpu_s(self.cpus)
        if busy is None:
            return None
        try:
            import resource

            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            children = usage.ru_utime + usage.ru_stime
        except ImportError:
            children = 0.0
        return time.monotonic(), busy, children, time.process_time()

    def contention(self, in_process: bool | None = None) -> float | None:
        """Cores of other work beyond the free ones, on average since this object was made (`in_process`: this
        process's CPU time is ours too, by default as made); None where the CPUs' busy time cannot be read."""
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        ours = (end[2] - self._start[2]) + ((end[3] - self._start[3])
                                            if (self.in_process if in_process is None else in_process) else 0.0)
        other = (end[1] - self._start[1]) - ours
        return round(max(0.0, other / (end[0] - self._start[0]) - self.spare), 2)


def contention_limit() -> float:
    """CONTENTION_LIMIT, or the cores EDGEGLM_AUTOTUNE_CONTENTION_LIMIT gives (a box that always runs other work
    can turn the re-measuring off with "inf"); a value that is not a number of cores is said and ignored."""
    text = os.environ.get("EDGEGLM_AUTOTUNE_CONTENTION_LIMIT", "").strip()
    if not text:
        return CONTENTION_LIMIT
    try:
        value = float(text)
        if value >= 0:
            return value
    except ValueError:
        pass
    log.warning("EDGEGLM_AUTOTUNE_CONTENTION_LIMIT=%r is not a number of cores (0 or more, or inf): %g holds",
                text, CONTENTION_LIMIT)
    return CONTENTION_LIMIT


def quieter_now(contention: float | None, threads: int, what: str = "the cached choice",
                sample_s: float = QUIET_SAMPLE_S) -> bool:
    """True when a cached result was measured beside `contention` cores of other work (over CONTENTION_LIMIT)
    and the box is quieter now by more than that limit (other work sampled for `sample_s` with `threads` of
    the usable CPUs taken as busy, this process's own work counted as other: a model serving here competes
    with a measurement): such a result is measured again."""
    limit = contention_limit()
    if contention is None or not contention > limit:
        return False
    sample = OtherWork(threads)
    time.sleep(sample_s)
    now = sample.contention()
    if now is None or now >= contention - limit:
        log.info("autotune: %s was measured beside %.2f cores of other work; the box is as busy now (%s): kept",
                 what, contention, "unknown" if now is None else f"{now:.2f} cores")
        return False
    log.info("autotune: %s was measured beside %.2f cores of other work, now %.2f: measuring again", what,
             contention, now)
    return True


def read_cache(path: Path, bundle_sha256: str, fingerprint: str, threads: int | None,
               prefill: str = "on") -> TuneResult | None:
    """The cached result, or None when missing, unreadable or made for something else."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        if (data.get("version"), data.get("bundle_sha256"), data.get("fingerprint"), data.get("threads_limit"),
                data.get("prefill", "on")) != (CACHE_VERSION, bundle_sha256, fingerprint, threads, prefill):
            return None
        result = TuneResult.from_dict(data)
        _check_result(result)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # nested past the limit
        log.warning("autotune cache %s ignored (%s): measuring again", path, exc)
        return None
    result.from_cache, result.cache_path = True, str(path)
    _touch(path)  # recently used: kept when the cache is pruned
    return result


def _check_result(result: TuneResult) -> None:
    """ValueError naming the first field of a cached result (a damaged or hand-edited file) that is not of
    the type a fresh measurement gives: such a value failed later, with a traceback, when printed or loaded."""
    def number(value, optional: bool = True) -> bool:  # finite and not negative: NaN or 1e300 failed when printed
        return (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                and math.isfinite(value) and value >= 0)

    def text(value) -> bool:
        return value is None or isinstance(value, str)

    def check_candidate(c: Candidate, where: str) -> None:
        if c.backend not in BACKENDS:
            raise ValueError(f"{where}.backend {c.backend!r} is not one of {', '.join(BACKENDS)}")
        if not isinstance(c.device, str) or not c.device:
            raise ValueError(f"{where}.device {c.device!r} is not a device name")
        if c.threads is not None and (not isinstance(c.threads, int) or isinstance(c.threads, bool) or c.threads < 1):
            raise ValueError(f"{where}.threads {c.threads!r} is not a thread count")
        if c.pinned is not None and not isinstance(c.pinned, bool):
            raise ValueError(f"{where}.pinned {c.pinned!r} is not true, false or null")
        if not text(c.precision) or not text(c.kv_cache_precision):
            raise ValueError(f"{where} precision {c.precision!r} / {c.kv_cache_precision!r} is not a string or null")

    check_candidate(result.choice, "choice")
    for i, t in enumerate(result.trials):
        check_candidate(t.candidate, f"trials[{i}].candidate")
        for name in ("load_s", "ttft_ms", "decode_tok_s"):
            if not number(getattr(t, name)):
                raise ValueError(f"trials[{i}].{name} {getattr(t, name)!r} is not a number")
        if not all(text(v) for v in (t.status, t.reason, t.golden)):
            raise ValueError(f"trials[{i}] status, reason or golden is not a string")
        _check_rows(t.prefill_min_rows, t.prefill_rows_ms, f"trials[{i}].")
    for name in ("measured_at", "elapsed_s"):
        if not number(getattr(result, name), optional=False):
            raise ValueError(f"{name} {getattr(result, name)!r} is not a number")
    if result.measured_at > MAX_TIMESTAMP:  # a date `time.localtime` cannot show
        raise ValueError(f"measured_at {result.measured_at!r} is not a time")
    _check_contention(result.contention)
    for name, value in asdict(result.settings).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"settings.{name} {value!r} is not an integer")
    if not all(isinstance(a, str) for a in result.accelerators) or not isinstance(result.objective, str):
        raise ValueError("accelerators or objective is not text")
    _check_rows(result.prefill_min_rows, result.prefill_rows_ms, "")


MAX_TIMESTAMP = 2 ** 34  # seconds: the year 2514


def _check_contention(value) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value)):
        raise ValueError(f"contention {value!r} is not a number of cores")


def _check_rows(rows, ms, where: str) -> None:
    """ValueError unless a cached prefill_min_rows / prefill_rows_ms pair is of the types measured."""
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"{where}prefill_min_rows {rows!r} is not a positive integer")
    if ms is not None and not (isinstance(ms, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and math.isfinite(x) for x in v) for v in ms.values())):
        raise ValueError(f"{where}prefill_rows_ms {ms!r} is not a map of [decode ms, prefill ms]")


def write_cache(path: Path, result: TuneResult) -> bool:
    """Write atomically; False (logged) when the directory is not writable: the result still serves."""
    from ota.fsutil import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**result.to_dict(), "from_cache": False, "cache_path": None})
    except OSError as exc:
        log.warning("autotune result not cached: %s (%s)", path, exc.strerror or exc)
        return False
    return True


def prune_cache(folder: Path, keep: int = CACHE_KEEP, spare: Path | None = None) -> int:
    """Delete all but the `keep` most recently used results in an autotune folder (a box that took many
    OTA updates had one file per bundle it ever ran, for ever); `spare` is never deleted. Only the
    cache's own `*.json` files are touched. The number of files deleted."""
    try:
        entries = [(p.stat().st_mtime, p) for p in Path(folder).glob("*.json") if p.is_file() and p != spare]
    except OSError:
        return 0
    deleted = 0
    for _, p in sorted(entries, reverse=True)[max(keep - (spare is not None), 0):]:
        try:
            p.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("autotune cache: could not delete %s (%s)", p, exc.strerror or exc)
            break
    return deleted


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves


def autotune(bundle, hw: HardwareInfo, *, cache_dir: Path | None = None, retune: bool = False,
             threads: int | None = None, settings: TuneSettings = TuneSettings(),
             progress: bool = False, prefill: str = "on", isolate: bool = False,
             path_timeout_s: float = PATH_TIMEOUT_S, stop: threading.Event | None = None) -> TuneResult:
    """The execution path for `bundle` on this hardware: from the cache, or measured (and cached).
    `prefill`: the ONNX Runtime prefill-graph mode ("on", "off", "only") its paths are loaded and
    measured with, the one that will serve (`choose_prefill_graph`); part of the cache key. `isolate`:
    measure in a child process (`measure_isolated`: a path that crashes or hangs it, or than `path_timeout_s`
    per load or round, is excluded), as the agent and the CLI do; `stop` (isolated only): set, the measuring
    ends within STOP_POLL_S with `Stopped`, and nothing is cached."""
    prefill = prefill_mode(prefill)
    fingerprint = hw.fingerprint()
    path = cache_path(cache_dir, bundle.sha256, fingerprint, threads, prefill) if cache_dir is not None else None
    second = False  # accelerator paths failed in the cached measurement: this one is their second try
    if path is not None and not retune:
        cached, second = _from_cache(path, bundle, fingerprint, threads, prefill, say=True)
        if cached is not None:
            return cached
    with _measuring_alone(path, stop):
        if path is not None and not retune:  # another process may have measured this very key meanwhile (also one
            # that let the lock go between our first read and our taking it: no wait, and its result is there)
            cached, second = _from_cache(path, bundle, fingerprint, threads, prefill)
            if cached is not None:
                return cached
        return _measure_and_cache(bundle, hw, path, fingerprint, threads, settings, progress, prefill, isolate,
                                  path_timeout_s, stop, second)


def _from_cache(path: Path, bundle, fingerprint: str, threads: int | None, prefill: str,
                say: bool = False) -> tuple[TuneResult | None, bool]:
    """(the cached result to serve, or None: measure; whether that measurement is the second try of accelerator
    paths that failed in the cached one)."""
    cached = read_cache(path, bundle.sha256, fingerprint, threads, prefill)
    second = cached is not None and bool(_flaky(cached.trials))
    if cached is not None and not quieter_now(cached.contention, cached.measured_threads):
        if cached.retried or not second:
            return cached, second
        if say:
            log.info("autotune: %s failed when last measured: measuring again", ", ".join(_flaky(cached.trials)))
    return None, second


@contextlib.contextmanager
def _measuring_alone(path: Path | None, stop: threading.Event | None):
    """One process of this cache measures at a time (agents started together each measured beside the others,
    skewed by their load, and the last to finish wrote its choice over the others'): an exclusive flock on the
    folder's `.lock`, polled so that `stop` ends the wait. Without a writable folder, no lock (nothing is cached
    there either); on a file system without flock, none either (measured as before)."""
    fd = None
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            fd = None
    try:
        said = False
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    log.info("autotune: another process is measuring with the cache %s; waiting for it", path.parent)
                    said = True
                _check_stop(stop)
                time.sleep(LOCK_POLL_S)
            except OSError:
                break
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


LOCK_POLL_S = 0.2


def _measure_and_cache(bundle, hw: HardwareInfo, path: Path | None, fingerprint: str, threads: int | None,
                       settings: TuneSettings, progress: bool, prefill: str, isolate: bool, path_timeout_s: float,
                       stop: threading.Event | None, second: bool) -> TuneResult:
    t0 = time.perf_counter()
    trials = [Trial(c) for c in candidates(hw, bundle.manifest.backends, threads=threads)]
    # what the process can take now, not only when `hw` was probed (the agent probes once at start; an update
    # is tuned while the model before it serves)
    available = min((b for b in (hw.memory.budget_bytes(), probe_memory().budget_bytes()) if b is not None),
                    default=None)
    threads_used = max((t.candidate.threads or usable_cpus() for t in trials), default=usable_cpus())
    other_work = OtherWork(threads_used)
    in_child = False
    with _progress(progress, len(trials) + settings.repeats * len(trials)) as bar:
        if isolate:
            in_child = measure_isolated(bundle, trials, settings, available, on_step=bar.update, prefill=prefill,
                                        timeout_s=path_timeout_s, stop=stop)
        else:
            measure(bundle, trials, settings, available, on_step=bar.update, prefill=prefill)
    choice = choose(trials)
    chosen = next(t for t in trials if t.candidate == choice)
    result = TuneResult(bundle.sha256, fingerprint, threads, choice, trials, accelerators(hw), settings,
                        measured_at=time.time(), elapsed_s=round(time.perf_counter() - t0, 2), prefill=prefill,
                        prefill_min_rows=chosen.prefill_min_rows, prefill_rows_ms=chosen.prefill_rows_ms,
                        contention=other_work.contention(in_process=not in_child))
    if result.contention is not None and result.contention > contention_limit():
        log.warning("autotune: measured beside %.2f cores of other work on this process's CPUs; the choice may "
                    "be skewed: it is measured again at a later load that finds the box quieter", result.contention)
    # an accelerator path that the probe found but that failed to load or run (out of device memory beside the
    # model still serving while an update is tuned, a driver hiccup) is not excluded for good on one try: the next
    # load measures again, once (`retried`: a path that fails every time does not cost a measurement at every
    # start). Before, a GPU box served on its CPU until someone ran --retune
    flaky = _flaky(trials)
    result.retried = bool(flaky) and second
    if flaky and not second:
        log.warning("autotune: %s failed while measured; the choice (%s) is measured again at the next load",
                    ", ".join(flaky), result.choice.describe())
    if path is not None and write_cache(path, result):
        result.cache_path = str(path)
        prune_cache(path.parent, spare=path)
    log.info("autotune: %s (%s paths measured in %.1f s)", result.choice.describe(),
             sum(t.status == "measured" for t in trials), result.elapsed_s)
    return result


def _flaky(trials: list[Trial]) -> list[str]:
    """The accelerator paths that were found but failed to load, run or finish while measured."""
    def failed(reason: str) -> bool:
        return reason.startswith(("could not load", "failed at run time", "the measuring process died")) or \
            "took longer than" in reason

    return [t.candidate.describe() for t in trials
            if not t.candidate.on_cpu and t.status == "excluded" and failed(t.reason or "")]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def _progress(show: bool, total: int):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="autotune", unit="step", leave=False)


def format_result(result: TuneResult) -> str:
    """The human-readable report for `edgeglm probe --bundle`."""
    lines = ["", f"Execution paths (bundle manifest {result.bundle_sha256[:12]}, hardware {result.fingerprint}):"]
    if not result.accelerators:
        lines.append("  no GPU or NPU path (none found, or none a backend here can use): CPU paths only")
    else:
        lines.append(f"  accelerators found: {', '.join(result.accelerators)}")
    lines.append(f"  {'path':<44} {'status':<10} {'TTFT ms':>9} {'decode tok/s':>13}  note")
    for t in result.trials:
        ttft = f"{t.ttft_ms:.1f}" if t.ttft_ms is not None else "-"
        rate = f"{t.decode_tok_s:.1f}" if t.decode_tok_s is not None else "-"
        note = t.reason or (f"golden: {t.golden}" if t.golden else "")
        mark = "*" if t.candidate == result.choice else " "
        lines.append(f"{mark} {t.candidate.describe():<44} {t.status:<10} {ttft:>9} {rate:>13}  {note}")
    s = result.settings
    lines.append(f"  measured: prefill {s.prompt_tokens} tokens + {s.decode_steps} decode steps, best of "
                 f"{s.repeats}; objective: {result.objective}")
    if result.prefill != "on":
        lines.append(f"  ONNX Runtime paths measured with prefill_graph = {result.prefill!r}, the mode that serves "
                     "(docs/runtime.md)")
    if result.prefill_min_rows is not None and result.prefill_rows_ms:
        timed = ", ".join(f"{rows} rows {d:.1f} / {p:.1f} ms" for rows, (d, p) in result.prefill_rows_ms.items())
        lines.append(f"  prefill graph from {result.prefill_min_rows} token rows per step (batched decode steps, "
                     f"prompts); decode / prefill graph: {timed}")
    if result.contention is not None and result.contention > contention_limit():
        lines.append(f"  measured beside {result.contention:.2f} cores of other work on this process's CPUs: "
                     "measured again at a later run that finds the box quieter")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(result.measured_at))
    source = (f"from the cache {result.cache_path} (measured {when}; --retune measures again)" if result.from_cache
              else f"measured now in {result.elapsed_s:.1f} s" + (f", cached in {result.cache_path}"
                                                                 if result.cache_path else ", not cached"))
    lines.append(f"chosen: {result.choice.describe()}, {source}")
    return "\n".join(lines)

