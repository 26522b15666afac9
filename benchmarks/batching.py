"""Continuous batching under load: max_batch=1 against max_batch=8, side by side in one run.

Run from the repository root (the factory extra installed when the bundle must be built):

    python benchmarks/batching.py                                  # glm-s int8, onnxruntime
    python benchmarks/batching.py --backend openvino --seconds 5 --repeats 1
    python benchmarks/batching.py --shape tiny --concurrency 1,2,4 --max-batch 1,2,4 --json > b.json
    python benchmarks/batching.py --bundle B --concurrency 8 --max-batch 1,8,8m --stagger
    python benchmarks/batching.py --bundle B --concurrency 8 --max-batch 8,8:0 --stagger --prompt-tokens 256

One process loads the model once (the bundle of benchmarks/agent_load.py, cached in --workdir)
and, per pass, for each --concurrency level (order rotating between passes) runs each
--max-batch value (order alternating): a `runtime.batching.Scheduler` on the engine, N client
threads submitting greedy requests back to back for --seconds (requests still running at the
deadline are finished and counted). A max_batch written with an `m` (`8m`) decodes with
`runtime.engine.MergedBatch` (rows re-merged into one left-padded cache at each change of
membership, as on OpenVINO and older graphs) instead of what `engine.new_batch()` gives
(row-aligned `RaggedBatch` on ONNX Runtime), and one with `:N` (`8:0`, `8m:64`) prefills prompts
N tokens per decode step while others decode (`prefill_chunk`; 0 = whole prompts) instead of the
default 128. Per level: aggregate generated tokens/s, requests/s, p50/p95 end-to-end latency and
TTFT, inter-token latency (p50/p95/p99/max of the gaps between consecutive tokens of a request, as
its client receives them: a prompt prefilled while others decode shows up there), decode throughput (tokens made by decode steps per second
spent in decode steps, prefills and re-merges excluded; also with the batch's membership changes
counted: rows added and removed, re-merges), and the CPU that other processes used meanwhile
("foreign CPU" in cores, the noise indicator on a shared machine). The speedup of each max_batch
over the first is the median of same-pass, same-level ratios, which cancels most of the drift
between passes.

It also times the cost of continuous admission: `engine.merge_caches` of 8 rows (each
--prompt-tokens + --max-tokens/2 positions) against one batched decode step of 8 rows and one
step of 1 row, interleaved, medians of --merge-rounds.

The prompt is --prompt-tokens random token ids chosen so that greedy generation runs to
--max-tokens without an end-of-sequence token: every request does the same work, and 8 clients
move in lockstep. With --stagger each request instead takes a random prompt of 1/4 to 2x
--prompt-tokens and a random max_tokens of 1/4 to 2x --max-tokens (a seeded sequence per client,
the same for every candidate): rows of different lengths join and leave the batch at different
steps, as under real traffic. Nothing asserts on the numbers.
"""

from __future__ import annotations

import contextlib
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

from _args import Parser, int_list, positive_float, positive_int  # noqa: E402
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


class TimedBatch:
    """The scheduler's DecodeBatch with its steps and membership changes timed into `acc`."""

    def __init__(self, batch, acc: dict):
        self.batch, self.acc = batch, acc

    rows = property(lambda self: self.batch.rows)

    def _timed(self, key, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.acc[key] += time.perf_counter() - t

    def add(self, source):
        return self._timed("member", self.batch.add, source)

    def remove(self, slot):
        return self._timed("member", self.batch.remove, slot)

    def step(self, input_ids):
        return self._timed("step", self.batch.step, input_ids)


def parse_candidate(text: str) -> tuple[int, bool, int | None]:
    """'8' -> (8, False, None); '8m' -> MergedBatch; '8:0' / '8m:64' -> that prefill_chunk.
    ValueError unless the size is an integer >= 1 and the chunk (when given) an integer >= 0."""
    size, colon, chunk = text.strip().partition(":")
    merged = size.endswith("m")
    n, c = int(size[:-1] if merged else size), (int(chunk) if colon else None)
    if n < 1 or (c is not None and c < 0):
        raise ValueError(text)
    return n, merged, c


def requests(prompt: list[int], max_tokens: int, stagger: bool, vocab: int, seed: int):
    """Endless (prompt, max_tokens) for one client: the fixed pair, or seeded random ones (--stagger)."""
    rng = np.random.default_rng(seed)
    while True:
        if not stagger:
            yield prompt, max_tokens
            continue
        n = int(rng.integers(max(1, len(prompt) // 4), 2 * len(prompt) + 1))
        yield rng.integers(0, vocab, n).tolist(), int(rng.integers(max(1, max_tokens // 4), 2 * max_tokens + 1))


def run_level(engine, prompt: list[int], max_tokens: int, concurrency: int, max_batch: int, seconds: float,
              merged: bool = False, stagger: bool = False, seed: int = 0, chunk: int | None = None,
              label: str | None = None) -> dict:
    """N client threads against one scheduler for `seconds`; the level's measurements."""
    from runtime.batching import DEFAULT_PREFILL_CHUNK, Scheduler
    from runtime.engine import MergedBatch
    from runtime.generate import SamplingParams

    acc = {"step": 0.0, "member": 0.0, "merge": 0.0}
    own_new_batch, own_merge = engine.new_batch, engine.merge_caches

    def new_batch():
        return TimedBatch(MergedBatch(engine) if merged else own_new_batch(), acc)

    def merge_caches(rows):  # MergedBatch re-merges inside its first step after a change
        t = time.perf_counter()
        try:
            return own_merge(rows)
        finally:
            acc["merge"] += time.perf_counter() - t

    engine.new_batch, engine.merge_caches = new_batch, merge_caches  # instance attributes, removed below
    sizes: list[int] = []
    sched = Scheduler(engine, max_batch=max_batch, on_step=sizes.append,
                      prefill_chunk=DEFAULT_PREFILL_CHUNK if chunk is None else chunk)
    done: list[dict] = []
    gaps: list[float] = []  # seconds between consecutive tokens of one request, as its client sees them
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        work = requests(prompt, max_tokens, stagger, engine.arch.vocab_size, seed * 1000 + index)
        while time.perf_counter() < stop_at:
            ids, limit = next(work)
            t0 = time.perf_counter()
            ttft, n, last, mine = None, 0, None, []
            for _ in sched.submit(ids, SamplingParams(max_tokens=limit)):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    mine.append(now - last)
                last = now
                n += 1
            with lock:
                done.append({"e2e": time.perf_counter() - t0, "ttft": ttft, "tokens": n})
                gaps.extend(mine)

    own0, busy0, t0 = proc_cpu_s(os.getpid()), system_busy_s(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        own, busy = proc_cpu_s(os.getpid()) - own0, system_busy_s() - busy0
        sched.close()
    finally:
        del engine.new_batch, engine.merge_caches
    steps = acc["step"] - acc["merge"]
    tokens = sum(d["tokens"] for d in done)
    return {"concurrency": concurrency, "max_batch": max_batch, "merged": merged,
            "candidate": label or f"{max_batch}{'m' if merged else ''}", "prefill_chunk": sched.prefill_chunk,
            "requests": len(done), "tokens": tokens,
            "itl_p50": percentile(gaps, 50), "itl_p95": percentile(gaps, 95), "itl_p99": percentile(gaps, 99),
            "itl_max": max(gaps) if gaps else float("nan"),
            "seconds": elapsed, "tok_s": tokens / elapsed, "req_s": len(done) / elapsed,
            "e2e_p50": percentile([d["e2e"] for d in done], 50), "e2e_p95": percentile([d["e2e"] for d in done], 95),
            "ttft_p50": percentile([d["ttft"] for d in done], 50),
            "ttft_p95": percentile([d["ttft"] for d in done], 95),
            "mean_batch": statistics.fmean(sizes) if sizes else 0.0,
            # tokens made by decode steps per second of decode steps (prefills and re-merges excluded),
            # and with the batch's membership changes counted (rows added and removed, re-merges)
            "decode_tok_s": sum(sizes) / steps if steps > 0 else 0.0,
            "decode_merge_tok_s": sum(sizes) / (acc["step"] + acc["member"]) if steps > 0 else 0.0,
            "member_share": (acc["member"] + acc["merge"]) / (acc["step"] + acc["member"]) if steps > 0 else 0.0,
            "foreign_cores": max(0.0, busy - own) / elapsed}


def merge_cost(engine, prompt: list[int], max_tokens: int, rows: int, rounds: int) -> dict:
    """Median times of a re-merge (merge_caches of all rows) and of one row leaving and one joining
    `engine.new_batch()` (rows x length; the step after it less a plain step, so MergedBatch's re-merge
    counts), against batched and single decode steps."""
    from runtime.engine import CacheRow
    from runtime.generate import prefill

    length = len(prompt) + max_tokens // 2
    seq = (prompt * 3)[:length]
    caches = [prefill(engine, seq)[1] for _ in range(rows)]
    single = prefill(engine, seq)[1]
    batch = engine.new_batch()
    for c in caches:
        batch.add(CacheRow(c))
    merge, swap, step_n, step_1 = [], [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine.merge_caches([CacheRow(c) for c in caches])
        merge.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # a row leaves, one joins, the next step (where MergedBatch re-merges)
        batch.remove(rows // 2)
        batch.add(CacheRow(caches[0]))
        batch.step(np.full(rows, 7))
        t1 = time.perf_counter()
        batch.step(np.full(rows, 7))
        step_n.append(time.perf_counter() - t1)
        swap.append(max(0.0, (t1 - t0) - step_n[-1]))
        n = single.length
        t0 = time.perf_counter()
        engine.forward(np.array([[7]]), np.array([[n]]), np.ones((1, n + 1), np.int64), single)
        step_1.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 for k, v in (("merge_ms", merge), ("swap_ms", swap),
                                                       ("step_batch_ms", step_n), ("step_single_ms", step_1))}
    return {"rows": rows, "positions": length, "batch": type(batch).__name__, **med,
            "merge_per_step": med["merge_ms"] / med["step_batch_ms"],
            "swap_per_step": med["swap_ms"] / med["step_batch_ms"]}


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm-s", choices=("tiny", "glm-s", "glm-m"))
    p.add_argument("--bundle", help="an existing bundle (default: build or reuse the random-init one of --shape)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    p.add_argument("--device", default="auto", help="the backend's device, as model.device: e.g. cuda (ONNX "
                   "Runtime on the bundle's GPU graph), GPU or NPU (OpenVINO); default: the CPU")
    p.add_argument("--concurrency", default="1,4,8", type=int_list, help="client counts, comma-separated")
    p.add_argument("--max-batch", default="1,8", help="max_batch values; with an m (8m): MergedBatch; "
                   "with :CHUNK (8:0, 8m:64): that prefill_chunk")
    p.add_argument("--stagger", action="store_true", help="random prompt and answer lengths per request")
    p.add_argument("--seconds", type=positive_float, default=10.0)
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--merge-rounds", type=positive_int, default=20)
    p.add_argument("--prefill-min-rows", type=positive_int, default=None,
                   help="ONNX Runtime: steps of this many token rows or more run on the prefill graph, as the "
                        "autotune may set it (default: the bundle's edgeglm.prefill_min_rows)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "serve")
    p.add_argument("--json", action="store_true",
                   help="print the raw samples as JSON on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    levels = args.concurrency
    try:
        batches = [x.strip() for x in args.max_batch.split(",")]
        cands = {b: parse_candidate(b) for b in batches}
        sizes = [c[0] for c in cands.values()]
        if len(set(batches)) != len(batches):
            raise ValueError
    except ValueError:
        p.error(f"--max-batch {args.max_batch} is invalid: must be max_batch values (integers >= 1) separated by "
                "commas, no repeats, each optionally ending in m and :CHUNK (an integer >= 0), e.g. 1,8m,8:0")
    if args.bundle and not Path(args.bundle).is_dir():
        p.error(f"--bundle {args.bundle} is invalid: no such bundle directory")

    from agent.model import load_model
    from ota.errors import BundleError
    from runtime.errors import RuntimeUserError

    bundle = Path(args.bundle) if args.bundle else prepare(args.shape, args.workdir)
    try:
        model = load_model(bundle, args.backend, device=args.device)
    except (RuntimeUserError, BundleError) as exc:  # a missing device or bundle: the message, not a traceback
        p.error(str(exc))
    engine = model.engine
    if args.prefill_min_rows is not None:
        if not getattr(engine, "prefill_graph", None):
            p.error(f"--prefill-min-rows {args.prefill_min_rows}: needs an ONNX Runtime engine with a prefill graph")
        engine.prefill_min_rows = args.prefill_min_rows
    prompt = pick_prompt(engine, args.prompt_tokens, args.max_tokens)
    rows = getattr(engine, "prefill_min_rows", None) if getattr(engine, "prefill_graph", None) else None
    print(f"{bundle} on {model.execution_info()['description']}"
          f"{f' (prefill graph from {rows} token rows)' if rows else ''}; {cpu_model()}, {os.cpu_count()} cpus; "
          f"prompt {len(prompt)} tokens, "
          f"{args.max_tokens} new tokens{' (staggered: 1/4 to 2x each)' if args.stagger else ''}, "
          f"{args.seconds:g} s per level, {args.repeats} pass(es); engine.new_batch(): "
          f"{type(engine.new_batch()).__name__}", file=sys.stderr)

    samples, merges = [], []
    for rep in range(args.repeats):
        order = levels[rep % len(levels):] + levels[:rep % len(levels)]
        for level in order:
            for cand in (batches if (rep + level) % 2 == 0 else batches[::-1]):
                size, merged, chunk = cands[cand]
                r = run_level(engine, prompt, args.max_tokens, level, size, args.seconds, merged=merged,
                              stagger=args.stagger, seed=rep, chunk=chunk, label=cand)
                r["pass"] = rep
                samples.append(r)
                print(f"pass {rep} concurrency {level} max_batch {cand}: {r['tok_s']:.1f} tok/s, "
                      f"e2e p50 {r['e2e_p50'] * 1000:.0f} ms, mean batch {r['mean_batch']:.2f}, decode "
                      f"{r['decode_tok_s']:.1f} tok/s, membership {100 * r['member_share']:.1f}% of it, "
                      f"inter-token p50/p95/max {1000 * r['itl_p50']:.0f}/{1000 * r['itl_p95']:.0f}/"
                      f"{1000 * r['itl_max']:.0f} ms, "
                      f"foreign CPU {r['foreign_cores']:.2f}", file=sys.stderr)
        merges.append(merge_cost(engine, prompt, args.max_tokens, max(sizes), args.merge_rounds))
    if args.json:  # stdout holds the JSON alone (`--json > b.json`); the table goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            report(samples, merges, levels, batches)
        print(json.dumps({"samples": samples, "merge": merges}, indent=1))
    else:
        report(samples, merges, levels, batches)
    return 0


def report(samples: list[dict], merges: list[dict], levels: list[int], batches: list[str]) -> None:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    base = batches[0]
    print(f"\n| concurrency | max_batch | tok/s | req/s | e2e p50 ms | e2e p95 ms | TTFT p50 ms | TTFT p95 ms | "
          f"mean batch | tok/s vs max_batch={base} | decode tok/s (steps / + membership) | decode vs "
          f"max_batch={base} (steps / + membership) | membership share | inter-token p50 / p95 / p99 / max ms | "
          f"foreign CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(rows, level, key):  # median of same-pass ratios against max_batch=base
        out = []
        for r in rows:
            ref = [b for b in samples if b["pass"] == r["pass"] and b["concurrency"] == level and b["candidate"] == base]
            out += [r[key] / ref[0][key]] if ref and ref[0][key] else []
        return statistics.median(out) if out else float("nan")

    for level in levels:
        for mb in batches:
            rows = [r for r in samples if r["concurrency"] == level and r["candidate"] == mb]
            print(f"| {level} | {mb} | {med(rows, 'tok_s'):.1f} | {med(rows, 'req_s'):.2f} | "
                  f"{med(rows, 'e2e_p50') * 1000:.0f} | {med(rows, 'e2e_p95') * 1000:.0f} | "
                  f"{med(rows, 'ttft_p50') * 1000:.0f} | {med(rows, 'ttft_p95') * 1000:.0f} | "
                  f"{med(rows, 'mean_batch'):.2f} | {ratio(rows, level, 'tok_s'):.2f} | "
                  f"{med(rows, 'decode_tok_s'):.1f} / {med(rows, 'decode_merge_tok_s'):.1f} | "
                  f"{ratio(rows, level, 'decode_tok_s'):.2f} / {ratio(rows, level, 'decode_merge_tok_s'):.2f} | "
                  f"{100 * med(rows, 'member_share'):.1f}% | {1000 * med(rows, 'itl_p50'):.0f} / "
                  f"{1000 * med(rows, 'itl_p95'):.0f} / {1000 * med(rows, 'itl_p99'):.0f} / "
                  f"{1000 * med(rows, 'itl_max'):.0f} | {med(rows, 'foreign_cores'):.2f} |")
    m = merges[0]
    print(f"\n{m['rows']} rows x {m['positions']} positions: merge_caches (a re-merge) {med(merges, 'merge_ms'):.2f} ms; "
          f"one row leaving + one joining the {m['batch']} {med(merges, 'swap_ms'):.2f} ms; one decode step of "
          f"{m['rows']} rows {med(merges, 'step_batch_ms'):.2f} ms, of 1 row {med(merges, 'step_single_ms'):.2f} ms; "
          f"re-merge / batched step = {med(merges, 'merge_per_step'):.2f}, leave + join / batched step = "
          f"{med(merges, 'swap_per_step'):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
