"""Load a verified bundle onto an engine: the wiring between `ota.bundle` and `runtime`.

The execution path: a named backend runs on its CPU default (f32, all usable cores or `threads`).
`auto` with a `cache_dir` (the agent's state dir) runs the measured autotune of runtime/autotune.py
once per (bundle, hardware) and serves the path it chose; `auto` without one falls back to the rule
order `AUTO_ORDER`. On ONNX Runtime, `prefill_graph` "auto" (the default) loads the bundle's W8A8
prefill graph beside the decode graph where memory allows, else the prefill graph alone
(runtime.autotune.choose_prefill_graph). `LoadedModel.execution_info()` says which path serves and
how it was chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ota.bundle import Bundle, open_bundle, vocabulary_problem
from runtime.autotune import (Candidate, PrefillChoice, TuneResult, apply_prefill_rows, autotune, choose_prefill_graph,
                              default_candidate, device_candidate, tune_prefill_rows)
from runtime.engine import BACKENDS, ModelArch, available_backends, load_engine
from runtime.errors import BackendUnavailable, ModelLoadError
from runtime.golden import GoldenResult, check_golden
from runtime.tokenizer import load_tokenizer

# "auto" without autotune prefers ONNX Runtime: its MatMulNBits int8 kernel decoded fastest in
# docs/performance.md; OpenVINO is the fallback.
AUTO_ORDER = ("onnxruntime", "openvino")

log = logging.getLogger("edgeglm.model")


@dataclass
class LoadedModel:
    bundle: Bundle
    backend: str
    engine: object
    tokenizer: Tokenizer
    arch: ModelArch
    path: Candidate | None = None  # the execution path the engine runs on
    tuning: TuneResult | None = None  # the autotune result `auto` used, if any
    chosen_by: str = "configured"  # "configured", "rule order", "autotune" or "autotune cache"
    prefill: PrefillChoice | None = None  # ONNX Runtime: the prefill-graph mode loaded and why

    def execution_info(self) -> dict:
        """Backend, device, threads, pinning and precision hints, and how they were chosen; for ONNX
        Runtime also the prefill graph serving prompts (its file name, or None: the decode graph), whether it
        serves everything (`prefill_only`) and why that mode (`prefill_mode`, e.g. "auto: both graphs ... fit"),
        and its weights' type (`prefill_weights`: int8 where the CPU has VNNI);
        `batches`: how concurrent requests are decoded together (runtime.engine.RaggedBatch,
        DeviceRaggedBatch or MergedBatch)."""
        path = self.path or Candidate(self.backend, str(getattr(self.engine, "device", "CPU")))
        info = {**path.to_dict(), "description": path.describe(), "chosen_by": self.chosen_by}
        if getattr(self.engine, "ragged_batches", False):
            info["batches"] = "row-aligned" + (f" (the KV cache is in {self.engine.kv_memory})"
                                               if getattr(self.engine, "gpu_graph", None) else "")
        elif getattr(self.engine, "gpu_graph", None):
            info["batches"] = f"merged (the KV cache is in {self.engine.kv_memory})"
        elif self.backend == "onnxruntime":
            info["batches"] = "merged (the bundle predates row-aligned batches: re-export it)"
        else:
            info["batches"] = "merged"
        if self.backend == "onnxruntime":
            info["prefill_graph"] = getattr(self.engine, "prefill_graph", None)
            info["prefill_only"] = getattr(self.engine, "prefill_only", False)
            info["kv_cache"] = getattr(self.engine, "kv_cache", None)  # e.g. "cuda memory, float16 (gpu.onnx)"
            if info["prefill_graph"] and not info["prefill_only"]:  # which steps run there (autotune or bundle)
                info["prefill_min_rows"] = getattr(self.engine, "prefill_min_rows", None)
            if info["prefill_graph"]:  # its attention in blocks for long prompts (docs/runtime.md), 1 = one node
                info["prefill_attention_blocks"] = getattr(self.engine, "prefill_attention_blocks", 1)
            if info["prefill_graph"]:  # int8 on VNNI CPUs (runtime.engine.signed_weight_graph)
                info["prefill_weights"] = "int8 (u8 x s8, VNNI)" if getattr(self.engine, "signed_weights", False) \
                    else "uint8 (u8 x u8)"
            if self.prefill is not None:
                info["prefill_mode"] = f"{self.prefill.mode} ({self.prefill.reason})"
        return info

    def golden_check(self) -> GoldenResult:
        g = self.bundle.manifest.golden
        seq = g.backends[self.backend]
        return check_golden(self.engine, g.prompt_ids, seq.tokens, seq.margins, g.tolerance)


def choose_backend(bundle: Bundle, requested: str = "auto") -> str:
    in_bundle = list(bundle.manifest.backends)
    installed = available_backends()
    if requested != "auto":
        if requested not in BACKENDS:
            raise BackendUnavailable(f"--backend {requested!r} is unknown; choose auto or one of: {', '.join(BACKENDS)}")
        if requested not in in_bundle:
            raise BackendUnavailable(
                f"bundle {bundle.root} has no {requested!r} model; it carries: {', '.join(in_bundle)}")
        if requested not in installed:
            raise BackendUnavailable(f"backend {requested!r} is not installed; available: {', '.join(installed)}")
        return requested
    for name in AUTO_ORDER:
        if name in in_bundle and name in installed:
            return name
    raise BackendUnavailable(
        f"no backend can run bundle {bundle.root}: it carries {', '.join(in_bundle)}, installed are "
        f"{', '.join(installed) or 'none'}")


def tuning_skipped(backend: str, cache_dir: Path | None, device: str = "auto") -> bool:
    """Whether load_model serves a named backend's default CPU path with a cache to keep measurements in: the
    autotune does not run, but where batched steps go (runtime.autotune.tune_prefill_rows) is measured."""
    return backend != "auto" and cache_dir is not None and (device or "auto").strip().lower() == "auto"


def choose_path(bundle: Bundle, backend: str = "auto", threads: int | None = None, *, cache_dir: Path | None = None,
                retune: bool = False, hardware=None, progress: bool = False,
                prefill: str = "on", device: str = "auto",
                stop=None) -> tuple[Candidate, TuneResult | None]:
    """The execution path: autotuned for `auto` with a `cache_dir` (ONNX Runtime paths measured with the
    prefill-graph mode `prefill`; `stop`, a threading.Event, ends the measuring with runtime.errors.Stopped),
    else the backend's CPU default, or the `device` named on it."""
    device = (device or "auto").strip()
    if device.lower() != "auto":
        if backend == "auto":
            raise BackendUnavailable(f"device {device!r} needs a named backend (model.backend / --backend "
                                     "onnxruntime or openvino); with backend auto the autotune picks the device")
        return device_candidate(choose_backend(bundle, backend), device, threads), None
    if backend == "auto" and cache_dir is not None:
        from runtime.probe import probe_hardware

        result = autotune(bundle, hardware or probe_hardware(), cache_dir=Path(cache_dir), retune=retune,
                          threads=threads, progress=progress, prefill=prefill, isolate=True, stop=stop)
        return result.choice, result
    return default_candidate(choose_backend(bundle, backend), threads), None


def load_model(bundle_path: str | Path | Bundle, backend: str = "auto", threads: int | None = None, *,
               cache_dir: Path | None = None, retune: bool = False, hardware=None,
               progress: bool = False, prefill_graph: bool | str = "auto", memory=None,
               device: str = "auto", path: Candidate | None = None, stop=None) -> LoadedModel:
    """Verify the bundle's files against its manifest, then load the model on its execution path.

    `bundle_path`: a bundle directory (its manifest is read here), or a `Bundle` whose manifest the caller
    already read and checked (the agent verifies its signature first): the files are then checked against
    those exact manifest bytes, not against manifest.json read again (which could have changed since).

    `cache_dir`: with backend `auto`, use (or make) the autotune result cached under `cache_dir/autotune/`.
    `prefill_graph`: True: ONNX Runtime runs prompts (and decode steps of 4+ sequences) on the bundle's prefill
    graph when it has one; False: never; "only": the prefill graph runs everything (the decode graph is not
    loaded); "auto": True where both graphs fit in half the memory this process can still take, else "only"
    (runtime.autotune.choose_prefill_graph) with `memory` (a runtime.probe.MemoryInfo; default: read now).
    `device`: "auto", or a device of the named `backend` (runtime.autotune.device_candidate). `path`: run
    exactly this execution path instead of choosing one (the OTA self-test times a new model on the path
    the serving model runs on). `stop`: a threading.Event that, set, ends an autotune's measuring with
    runtime.errors.Stopped (the agent stopping while it starts)."""
    from runtime.probe import probe_memory

    if isinstance(bundle_path, Bundle):
        bundle = bundle_path
        bundle.verify()  # every file against the manifest the caller verified
    else:
        bundle = open_bundle(bundle_path)
    # before the engine (and an autotune): a tokenizer with ids beyond the model's vocabulary is refused here
    tokenizer = load_tokenizer(bundle.path(bundle.manifest.tokenizer))
    check_vocabulary(bundle, tokenizer)
    # decided first, so that the autotune loads ONNX Runtime the way it will serve (and no more memory)
    prefill = choose_prefill_graph(prefill_graph, bundle, memory if memory is not None else probe_memory())
    named_path = path is None and tuning_skipped(backend, cache_dir, device)
    if path is not None:
        choose_backend(bundle, path.backend)  # carried by the bundle and installed, or a clear error
        tuning = None
    else:
        path, tuning = choose_path(bundle, backend, threads, cache_dir=cache_dir, retune=retune, hardware=hardware,
                                   progress=progress, prefill=prefill.mode, device=device, stop=stop)
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    options = path.engine_options()
    if path.backend == "onnxruntime":
        options["prefill_graph"] = prefill.mode
    else:
        prefill = None
    entry = bundle.manifest.backends[path.backend].entry
    engine = load_engine(path.backend, bundle.path(entry), arch, path.threads, listed=bundle.listed_beside(entry),
                         **options)
    if getattr(engine, "gpu_graph", None):  # the prefill-graph setting is for CPU graphs: say what runs instead
        prefill = PrefillChoice("off", f"the GPU graph {engine.gpu_graph} runs prompts too; KV cache in "
                                       f"{engine.kv_memory}")
    if prefill is not None:
        log.info("prefill graph: %s (%s)", prefill.mode, prefill.reason)
    if apply_prefill_rows(engine, tuning):  # steps of how many token rows run on the prefill graph, as measured here
        log.info("prefill graph from %d token rows per step (measured by the autotune)", engine.prefill_min_rows)
    elif named_path and path.on_cpu:  # a named backend: its path is not measured, but where steps go is
        from runtime.probe import probe_hardware

        rows = tune_prefill_rows(engine, bundle.sha256, (hardware or probe_hardware()).fingerprint(), path,
                                 Path(cache_dir), retune=retune)
        if rows is not None:
            log.info("prefill graph from %d token rows per step (%s)", rows[0],
                     "measured for this path earlier" if rows[2] else "measured now for this path")
    if tuning is not None:
        chosen_by = "autotune cache" if tuning.from_cache else "autotune"
    else:
        chosen_by = "rule order" if backend == "auto" else "configured"
    return LoadedModel(bundle, path.backend, engine, tokenizer, arch, path, tuning, chosen_by, prefill)


def check_vocabulary(bundle: Bundle, tokenizer: Tokenizer) -> None:
    """ModelLoadError where the tokenizer has token ids the model does not (Bundle.verify checks the same from
    tokenizer.json as JSON; this counts with the tokenizers library, whatever its model kind)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = max(vocab.values()) + 1 if vocab else 0
    problem = vocabulary_problem(bundle.root, bundle.manifest.tokenizer, tokens,
                                 bundle.manifest.architecture["vocab_size"])
    if problem:
        raise ModelLoadError(problem)


EXECUTION_METRIC = "edgeglm_execution_path_info"
EXECUTION_LABELS = ("backend", "device", "threads", "pinned", "precision", "kv_cache_precision", "chosen_by")


def register_execution_metric(registry):
    """An info gauge in the agent's /metrics: 1 for the path serving now, 0 for paths served before."""
    from agent.metrics import Gauge

    return registry.register(Gauge(EXECUTION_METRIC, "the execution path serving the model (labels) and how it "
                                   "was chosen; 1 = current", EXECUTION_LABELS))


def set_execution_metric(gauge, model: LoadedModel | None, previous: dict | None) -> dict | None:
    """Mark `model`'s path current (and `previous`, the labels returned last time, no longer); returns its labels."""
    if previous is not None:
        gauge.set(0, **previous)
    if model is None:
        return None
    info = model.execution_info()
    labels = {k: "" if info[k] is None else str(info[k]).lower() if isinstance(info[k], bool) else str(info[k])
              for k in EXECUTION_LABELS}
    gauge.set(1, **labels)
    return labels
