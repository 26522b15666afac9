"""Continuous batching under load: max_batch=1 against max_batch=8, side by side in one run.

Run from the repository root (the factory extra installed when the bundle must be built):

    python benchmarks/batching.py                                  # glm-s int8, onnxruntime
    python benchmarks/batching.py --backend openvino --seconds 5 --repeats 1
    python benchmarks/batching.py --shape tiny --concurrency 1,2,4 --max-batch 1,2,4 --json > b.json

One process loads the model once (the bundle of benchmarks/agent_load.py, cached in --workdir)
and, per pass, for each --concurrency level (order rotating between passes) runs each
--max-batch value (order alternating): a `runtime.batching.Scheduler` on the engine, N client
threads submitting greedy requests back to back for --seconds (requests still running at the
deadline are finished and counted). Per level: aggregate generated tokens/s, requests/s, p50/p95
end-to-end latency and TTFT, decode throughput (tokens made by decode steps per second spent in
decode steps, prefills excluded; also with the re-merges of continuous admission counted), and
the CPU that other processes used meanwhile ("foreign CPU" in cores, the noise indicator on a
shared machine). The speedup of each max_batch over the first is
the median of same-pass, same-level ratios, which cancels most of the drift between passes.

It also times the cost of continuous admission: `engine.merge_caches` of 8 rows (each
--prompt-tokens + --max-tokens/2 positions) against one batched decode step of 8 rows and one
step of 1 row, interleaved, medians of --merge-rounds.

The prompt is --prompt-tokens random token ids chosen so that greedy generation runs to
--max-tokens without an end-of-sequence token: every request does the same work.
Nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:  # `python benchmarks/batching.py` from anywhere
        sys.path.insert(0, str(p))

from agent_load import prepare  # noqa: E402
from procstats import cpu_model, proc_cpu_s, system_busy_s  # noqa: E402


def pick_prompt(engine, n: int, max_tokens: int) -> list[int]:
    """Random ids whose greedy continuation runs to max_tokens (the longest of 20 seeds otherwise)."""
    from runtime.generate import SamplingParams, generate

    best = None
    for seed in range(20):
        prompt = np.random.default_rng(seed).integers(0, engine.arch.vocab_size, n).tolist()
        made = len(list(generate(engine, prompt, SamplingParams(max_tokens=max_tokens))))
        if best is None or made > best[1]:
            best = (prompt, made)
        if made == max_tokens:
            break
    return best[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(engine, prompt: list[int], max_tokens: int, concurrency: int, max_batch: int, seconds: float) -> dict:
    """N client threads against one scheduler for `seconds`; the level's measurements."""
    from runtime.batching import Scheduler
    from runtime.generate import SamplingParams

    class Timed(Scheduler):
        """Times the decode steps (engine step + per-row sampling) and the re-merges apart from prefills."""
        step_s = merge_s = 0.0

        def _step(self):
            t = time.perf_counter()
            super()._step()
            self.step_s += time.perf_counter() - t

        def _merge(self):
            t = time.perf_counter()
            super()._merge()
            self.merge_s += time.perf_counter() - t

    params = SamplingParams(max_tokens=max_tokens)
    sizes: list[int] = []
    sched = Timed(engine, max_batch=max_batch, on_step=sizes.append)
    done: list[dict] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ttft, n = None, 0
            for _ in sched.submit(prompt, params):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += 1
            with lock:
                done.append({"e2e": time.perf_counter() - t0, "ttft": ttft, "tokens": n})

    own0, busy0, t0 = proc_cpu_s(os.getpid()), system_busy_s(), time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    own, busy = proc_cpu_s(os.getpid()) - own0, system_busy_s() - busy0
    sched.close()
    tokens = sum(d["tokens"] for d in done)
    return {"concurrency": concurrency, "max_batch": max_batch, "requests": len(done), "tokens": tokens,
            "seconds": elapsed, "tok_s": tokens / elapsed, "req_s": len(done) / elapsed,
            "e2e_p50": percentile([d["e2e"] for d in done], 50), "e2e_p95": percentile([d["e2e"] for d in done], 95),
            "ttft_p50": percentile([d["ttft"] for d in done], 50),
            "ttft_p95": percentile([d["ttft"] for d in done], 95),
            "mean_batch": statistics.fmean(sizes) if sizes else 0.0,
            # tokens made by decode steps per second of decode steps (prefills excluded), without and
            # with the re-merges that continuous admission costs
            "decode_tok_s": sum(sizes) / sched.step_s if sched.step_s else 0.0,
            "decode_merge_tok_s": sum(sizes) / (sched.step_s + sched.merge_s) if sched.step_s else 0.0,
            "foreign_cores": max(0.0, busy - own) / elapsed}


def merge_cost(engine, prompt: list[int], max_tokens: int, rows: int, rounds: int) -> dict:
    """Median times of merge_caches (rows x length) against batched and single decode steps."""
    from runtime.engine import CacheRow
    from runtime.generate import prefill

    length = len(prompt) + max_tokens // 2
    seq = (prompt * 3)[:length]
    caches = [prefill(engine, seq)[1] for _ in range(rows)]
    single = prefill(engine, seq)[1]
    merge, step_n, step_1 = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        batch, mask = engine.merge_caches([CacheRow(c) for c in caches])
        merge.append(time.perf_counter() - t0)
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        t0 = time.perf_counter()
        engine.forward(np.full((rows, 1), 7), np.full((rows, 1), length), mask, batch)
        step_n.append(time.perf_counter() - t0)
        n = single.length
        t0 = time.perf_counter()
        engine.forward(np.array([[7]]), np.array([[n]]), np.ones((1, n + 1), np.int64), single)
        step_1.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in (("merge_ms", merge), ("step_batch_ms", step_n),
                                                       ("step_single_ms", step_1))}
    return {"rows": rows, "positions": length, **med, "merge_per_step": med["merge_ms"] / med["step_batch_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm-s")
    p.add_argument("--bundle", help="an existing bundle (default: build or reuse the random-init one of --shape)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--max-batch", default="1,8")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--merge-rounds", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "serve")
    p.add_argument("--json", action="store_true", help="print the raw samples as JSON")
    args = p.parse_args(argv)
    try:
        levels = [int(x) for x in args.concurrency.split(",")]
        batches = [int(x) for x in args.max_batch.split(",")]
        if not levels or not batches or min(levels + batches) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--concurrency {args.concurrency!r} / --max-batch {args.max_batch!r}: give positive integers "
                "separated by commas, e.g. 1,4,8")

    from agent.model import load_model

    bundle = Path(args.bundle) if args.bundle else prepare(args.shape, args.workdir)
    model = load_model(bundle, args.backend)
    engine = model.engine
    prompt = pick_prompt(engine, args.prompt_tokens, args.max_tokens)
    print(f"{bundle} on {model.backend}; {cpu_model()}, {os.cpu_count()} cpus; prompt {len(prompt)} tokens, "
          f"{args.max_tokens} new tokens, {args.seconds:g} s per level, {args.repeats} pass(es)", file=sys.stderr)

    samples, merges = [], []
    for rep in range(args.repeats):
        order = levels[rep % len(levels):] + levels[:rep % len(levels)]
        for level in order:
            for mb in (batches if (rep + level) % 2 == 0 else batches[::-1]):
                r = run_level(engine, prompt, args.max_tokens, level, mb, args.seconds)
                r["pass"] = rep
                samples.append(r)
                print(f"pass {rep} concurrency {level} max_batch {mb}: {r['tok_s']:.1f} tok/s, "
                      f"e2e p50 {r['e2e_p50'] * 1000:.0f} ms, mean batch {r['mean_batch']:.2f}, "
                      f"foreign CPU {r['foreign_cores']:.2f}", file=sys.stderr)
        merges.append(merge_cost(engine, prompt, args.max_tokens, max(batches), args.merge_rounds))
    report(samples, merges, levels, batches)
    if args.json:
        print(json.dumps({"samples": samples, "merge": merges}, indent=1))
    return 0


def report(samples: list[dict], merges: list[dict], levels: list[int], batches: list[int]) -> None:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    base = batches[0]
    print(f"\n| concurrency | max_batch | tok/s | req/s | e2e p50 ms | e2e p95 ms | TTFT p50 ms | TTFT p95 ms | "
          f"mean batch | tok/s vs max_batch={base} | decode tok/s (steps / + merges) | decode vs max_batch={base} "
          f"(steps / + merges) | foreign CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(rows, level, key):  # median of same-pass ratios against max_batch=base
        out = []
        for r in rows:
            ref = [b for b in samples if b["pass"] == r["pass"] and b["concurrency"] == level and b["max_batch"] == base]
            out += [r[key] / ref[0][key]] if ref and ref[0][key] else []
        return statistics.median(out) if out else float("nan")

    for level in levels:
        for mb in batches:
            rows = [r for r in samples if r["concurrency"] == level and r["max_batch"] == mb]
            print(f"| {level} | {mb} | {med(rows, 'tok_s'):.1f} | {med(rows, 'req_s'):.2f} | "
                  f"{med(rows, 'e2e_p50') * 1000:.0f} | {med(rows, 'e2e_p95') * 1000:.0f} | "
                  f"{med(rows, 'ttft_p50') * 1000:.0f} | {med(rows, 'ttft_p95') * 1000:.0f} | "
                  f"{med(rows, 'mean_batch'):.2f} | {ratio(rows, level, 'tok_s'):.2f} | "
                  f"{med(rows, 'decode_tok_s'):.1f} / {med(rows, 'decode_merge_tok_s'):.1f} | "
                  f"{ratio(rows, level, 'decode_tok_s'):.2f} / {ratio(rows, level, 'decode_merge_tok_s'):.2f} | "
                  f"{med(rows, 'foreign_cores'):.2f} |")
    m = merges[0]
    print(f"\nmerge_caches of {m['rows']} rows x {m['positions']} positions: {med(merges, 'merge_ms'):.2f} ms; "
          f"one decode step of {m['rows']} rows: {med(merges, 'step_batch_ms'):.2f} ms; of 1 row: "
          f"{med(merges, 'step_single_ms'):.2f} ms; merge / batched step = {med(merges, 'merge_per_step'):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
