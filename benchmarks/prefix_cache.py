"""Prefix cache benchmark: time to first token of a prompt whose system prompt is cached, vs cold.

Run from the repository root (torch, onnx and both runtimes installed):

    python benchmarks/prefix_cache.py                        # glm-s int8, S=512 system + 64 user tokens
    python benchmarks/prefix_cache.py --system-tokens 1024 --prompt-tokens 1056 --precisions fp32,int8 --json

It builds (or reuses, under --workdir, with benchmarks/decode.py's `prepare`) a random-init
checkpoint of the shape and its bundles, loads each backend once, and makes --repeats
interleaved passes. Each pass and engine times the prefill of a prompt of S system-prompt tokens
followed by a fresh suffix of P - S random tokens (a new suffix every time, so only the system
prompt can be reused), up to the first token's logits, three ways:

  * cold:   `prefill_cached(engine, prompt, None)`, the whole prompt computed;
  * memory: a PrefixCache that already holds the system prompt's blocks (another suffix went first);
  * disk:   a new PrefixCache over a directory where an earlier cache persisted those blocks
            (what the agent sees after a restart): the blocks are read, checked and restored.

Each pass checks that the three give the same first token. The table shows per-engine medians,
the cold/cached ratios measured in the same passes, and the prompt tokens the memory and the disk
cache reused (the fewest over the passes). Where a mode reused nothing (OpenVINO INT8: the prefix
cache stays out of that path since session 24) its prefill was a cold one, and the ratio reads
"n/a (nothing reused)" (null in --json) instead of a number. Timings are wall-clock on a shared
machine; nothing here asserts on them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _args import Parser, choice_list, positive_float, positive_int  # noqa: E402  (benchmarks/ is on sys.path)
from decode import PRECISIONS, prepare  # noqa: E402
from procstats import cpu_model  # noqa: E402

if TYPE_CHECKING:  # imported where used: a bad flag is reported before the runtime loads
    from runtime.prefix_cache import PrefixCache

BACKENDS = ("onnxruntime", "openvino")


def timed_prefill(engine, prompt: list[int], cache: PrefixCache | None) -> tuple[float, int, int]:
    """(seconds to the first token's logits, that token, prompt tokens reused)."""
    from runtime.prefix_cache import prefill_cached

    t0 = time.perf_counter()
    logits, _, reused = prefill_cached(engine, prompt, cache)
    token = int(np.argmax(logits))
    return time.perf_counter() - t0, token, reused


def run_pass(model, system: list[int], suffixes, args, persist_root: Path) -> dict:
    from runtime.prefix_cache import PrefixCache, prefill_cached

    key = f"{model.bundle.sha256}-{model.backend}"
    size = int(args.cache_mb * (1 << 20))
    warm = PrefixCache(size, args.block_tokens, persist_dir=persist_root)
    warm.bind(key)
    first, second, timed = next(suffixes), next(suffixes), next(suffixes)
    prefill_cached(model.engine, system + first, warm)  # stores the system prompt's blocks
    prefill_cached(model.engine, system + second, warm)  # reuses them: now they are on disk too
    prompt = system + timed
    out = {}
    for name in ("cold", "memory", "disk"):
        if name == "cold":
            out[name] = timed_prefill(model.engine, prompt, None)
        elif name == "memory":
            out[name] = timed_prefill(model.engine, prompt, warm)
            warm.clear()
        else:
            restarted = PrefixCache(size, args.block_tokens, persist_dir=persist_root)
            restarted.bind(key)
            out[name] = timed_prefill(model.engine, prompt, restarted)
    return out


def benchmark(args) -> dict:
    from agent.model import load_model

    _, bundles = prepare(args.shape, Path(args.workdir), tuple(args.precisions))
    rng = np.random.default_rng(0)
    models = {}
    for precision, path in bundles.items():
        for backend in BACKENDS:
            models[f"{backend} {precision}"] = load_model(path, backend, args.threads)
    vocab = next(iter(models.values())).arch.vocab_size
    system = rng.integers(10, vocab, args.system_tokens).tolist()
    suffix_len = args.prompt_tokens - args.system_tokens

    def suffixes():
        while True:
            yield rng.integers(10, vocab, suffix_len).tolist()

    gen = suffixes()
    rows: dict[str, list[dict]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory(prefix="edgeglm-prefix-bench-") as tmp:
        for name, model in models.items():  # warm-up: one pass each, not recorded
            run_pass(model, system, gen, args, Path(tmp) / "warmup")
        for r in range(args.repeats):
            for name, model in models.items():
                rows[name].append(run_pass(model, system, gen, args, Path(tmp) / f"pass{r}"))
    results = []
    for name, passes in rows.items():
        med = {k: statistics.median(p[k][0] for p in passes) * 1000 for k in ("cold", "memory", "disk")}
        # tokens reused, the fewest over the passes; where a mode reused nothing (OpenVINO INT8: the cache stays
        # out of that path) its "cached" prefill was a cold one, so no cold/cached ratio is reported (None)
        reused = {k: min(p[k][2] for p in passes) for k in ("memory", "disk")}
        ratio = {k: statistics.median(p["cold"][0] / p[k][0] for p in passes) if reused[k] else None
                 for k in ("memory", "disk")}
        results.append({
            "engine": name, "ttft_ms": med,
            "cold_over_memory": ratio["memory"],
            "cold_over_disk": ratio["disk"],
            "reused_tokens": reused["memory"],
            "reused_tokens_disk": reused["disk"],
            "same_first_token": all(p["cold"][1] == p["memory"][1] == p["disk"][1] for p in passes)})
    return {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads},
            "settings": {k: getattr(args, k) for k in ("shape", "system_tokens", "prompt_tokens", "block_tokens",
                                                       "repeats", "precisions")},
            "results": results}


def print_table(rep: dict) -> None:
    m, st = rep["machine"], rep["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads")
    print(f"shape {st['shape']}: prompt {st['prompt_tokens']} tokens of which {st['system_tokens']} system prompt, "
          f"blocks of {st['block_tokens']}, median of {st['repeats']} interleaved passes\n")
    head = ("engine", "cold ms", "memory ms", "disk ms", "cold/memory", "cold/disk", "reused mem", "reused disk",
            "same token")
    widths = (22, 12, 12, 12, 22, 22, 12, 12, 12)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))

    def ratio(x):
        return "n/a (nothing reused)" if x is None else f"{x:.2f}x"

    for r in rep["results"]:
        t = r["ttft_ms"]
        print(f"{r['engine']:<22}{t['cold']:>12.1f}{t['memory']:>12.1f}{t['disk']:>12.1f}"
              f"{ratio(r['cold_over_memory']):>22}{ratio(r['cold_over_disk']):>22}{r['reused_tokens']:>12}"
              f"{r['reused_tokens_disk']:>12}{str(r['same_first_token']):>12}")


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="glm-s", choices=("tiny", "glm-s", "glm-m"))
    ap.add_argument("--system-tokens", type=positive_int, default=512, help="S: the shared, cached part of the prompt")
    ap.add_argument("--prompt-tokens", type=positive_int, default=576,
                    help="P: the whole prompt (P - S fresh tokens)")
    ap.add_argument("--block-tokens", type=positive_int, default=32)
    ap.add_argument("--cache-mb", type=positive_float, default=256.0)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--precisions", default="int8", type=choice_list(PRECISIONS), help="comma-separated: fp32,int8")
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    args = ap.parse_args(argv)
    if not args.system_tokens < args.prompt_tokens:
        ap.error(f"--system-tokens {args.system_tokens} is invalid: must be below --prompt-tokens {args.prompt_tokens}")
    if args.system_tokens < args.block_tokens:
        ap.error(f"--block-tokens {args.block_tokens} is invalid: must be at most --system-tokens "
                 f"{args.system_tokens} (the cache reuses whole blocks of the system prompt)")
    report = benchmark(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
