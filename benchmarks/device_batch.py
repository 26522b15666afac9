"""Rows joining and leaving a batch whose KV cache lives in device memory: one row written in place
against the whole batch rebuilt, side by side.

Run from the repository root (the factory extra installed when the bundle must be built):

    python benchmarks/device_batch.py --bundle B                       # CUDA: 8 and 32 rows
    python benchmarks/device_batch.py --shape tiny --provider CPUExecutionProvider --rows 8   # same code, CPU

On a GPU the ONNX Runtime engine serves the bundle's GPU graph with each cache in device memory, and
concurrent requests share a `runtime.engine.DeviceRaggedBatch`. A row joining a free slot, or the last
row moving into the slot of one that left, is written in place by `runtime/kv_write.onnx` (mode
`inplace`, the product); without that graph every join and leave builds new buffers for the whole
batch with `runtime/kv_copy.onnx` (mode `rebuild`, what happens when kv_write.onnx is missing).

Each mode runs in its own process (ONNX Runtime's CUDA arenas keep what a process took, so memory is
only comparable between processes), the modes alternating --repeats times. A process prefills a pool
of 40 prompts of 50 to 1700 random tokens, then for each --rows R runs 3 rounds of: R rows join, 5
batched steps, 2R churns (a random row leaves, a pool row joins, one batched step), every row leaves.
It reports the median and p90 time of a leave + join, the median batched step, and the GPU memory
used after each round (nvidia-ml-py's figure for the whole GPU, when that package and a GPU are
there). The summary gives rebuild / inplace ratios of the medians over the processes. Nothing
asserts on the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:  # `python benchmarks/device_batch.py` from anywhere
        sys.path.insert(0, str(p))

MODES = ("inplace", "rebuild")


def gpu_memory_gib():
    """A function giving the GPU's used memory in GiB, or None without nvidia-ml-py or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # not installed, no driver, no GPU
        return None
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30


def child(bundle_dir: str, mode: str, provider: str, rows_list: list[int], seed: int) -> dict:
    import numpy as np

    from ota.bundle import open_bundle
    from runtime.engine import CacheRow, ModelArch, load_engine
    from runtime.generate import prefill

    bundle = open_bundle(bundle_dir)
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    engine = load_engine("onnxruntime", bundle.path(bundle.manifest.backends["onnxruntime"].entry), arch,
                         gpu_graph=True, provider=provider)
    if mode == "rebuild":
        engine._kv_write = None  # as when runtime/kv_write.onnx is missing: every change rebuilds the batch
    memory = gpu_memory_gib()
    rng = np.random.default_rng(seed)
    longest = min(1700, arch.max_positions // 2)
    pool = [prefill(engine, rng.integers(10, arch.vocab_size - 10, int(n)).tolist())[1]
            for n in rng.integers(min(50, longest // 2), longest, 40)]
    out = {"mode": mode, "batch": type(engine.new_batch()).__name__,
           "gib_loaded": round(memory(), 2) if memory else None}
    for rows in rows_list:
        batch = engine.new_batch()
        swaps, steps, gib = [], [], []
        for rnd in range(3):
            for i in range(rows):
                batch.add(CacheRow(pool[(i + rnd) % len(pool)]))
            for _ in range(5):
                batch.step(np.full(batch.rows, 7))
            for _ in range(2 * rows):
                t0 = time.perf_counter()
                batch.remove(int(rng.integers(0, batch.rows)))
                batch.add(CacheRow(pool[int(rng.integers(0, len(pool)))]))
                t1 = time.perf_counter()
                batch.step(np.full(batch.rows, 7))
                steps.append(time.perf_counter() - t1)
                swaps.append(t1 - t0)
            while batch.rows:
                batch.remove(batch.rows - 1)
            gib.append(round(memory(), 2) if memory else None)
        out[str(rows)] = {"leave_join_ms": statistics.median(swaps) * 1e3,
                          "leave_join_p90_ms": sorted(swaps)[int(0.9 * len(swaps))] * 1e3,
                          "step_ms": statistics.median(steps) * 1e3, "gib_after_rounds": gib}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm-m", help="random-init bundle to build when --bundle is not given")
    p.add_argument("--bundle", help="an existing bundle with a GPU graph (any bundle this version exports)")
    p.add_argument("--provider", default="CUDAExecutionProvider",
                   help="ONNX Runtime provider the cache lives on (CPUExecutionProvider runs the same code)")
    p.add_argument("--rows", default="8,32", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="processes per mode, alternating")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "serve")
    p.add_argument("--json", action="store_true",
                   help="print every process's result as JSON on stdout (the table goes to stderr)")
    p.add_argument("--child", nargs=2, metavar=("BUNDLE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        rows = [int(x) for x in args.rows.split(",")]
        if not rows or min(rows) < 1 or args.repeats < 1:
            raise ValueError
    except ValueError:
        p.error(f"--rows {args.rows!r} / --repeats {args.repeats}: give positive integers (rows comma-separated)")
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.provider, rows, seed=0)))
        return 0

    import onnxruntime as ort

    if args.provider not in ort.get_available_providers():
        p.error(f"--provider {args.provider}: not in this onnxruntime ({', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu on a GPU machine, or give --provider CPUExecutionProvider")
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from agent_load import prepare
        bundle = prepare(args.shape, args.workdir)
    results: list[dict] = []
    for rep in range(args.repeats):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            cmd = [sys.executable, __file__, "--child", str(bundle), mode, "--provider", args.provider,
                   "--rows", args.rows]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"device_batch: the {mode} process failed (exit {done.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"pass {rep} {mode}: " + json.dumps({k: v for k, v in results[-1].items() if k != "mode"}),
                  file=sys.stderr)
    if args.json:  # stdout holds the JSON alone (`--json > r.json`); the table goes to stderr
        print(json.dumps(results, indent=2), flush=True)
        sys.stdout = sys.stderr
    print(f"\n{bundle} on {args.provider}; batch class {results[0]['batch']}; {args.repeats} process(es) per mode\n")
    print("| rows | mode | leave + join ms (median / p90) | batched step ms | GPU GiB after each round "
          "(first process) |")
    print("|--:|---|--:|--:|---|")
    med = {}
    for r in rows:
        for mode in MODES:
            mine = [x[str(r)] for x in results if x["mode"] == mode]
            med[r, mode] = statistics.median(m["leave_join_ms"] for m in mine)
            p90 = statistics.median(m["leave_join_p90_ms"] for m in mine)
            step = statistics.median(m["step_ms"] for m in mine)
            gib = mine[0]["gib_after_rounds"]
            print(f"| {r} | {mode} | {med[r, mode]:.2f} / {p90:.2f} | {step:.2f} | "
                  f"{' / '.join(f'{g:.2f}' for g in gib) if gib[0] is not None else 'n/a'} |")
    print()
    for r in rows:
        print(f"{r} rows: a leave + join rebuilding the batch takes {med[r, 'rebuild'] / med[r, 'inplace']:.2f}x "
              f"the in-place write's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
