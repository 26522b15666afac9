"""Long prompts through ONNX Runtime: the whole prompt in one run against runs of at most N tokens, side by
side, in time and in memory.

Run from the repository root (the factory extra installed when the bundle must be built):

    python benchmarks/long_prompt.py --bundle B                    # this CPU: prompts of 512..3000 tokens
    python benchmarks/long_prompt.py --bundle B --device CUDA      # the bundle's GPU graph, KV in GPU memory
    python benchmarks/long_prompt.py --shape glm-s --tokens 1024,3000 --pieces 256,512,1024

The engine runs the bundle as the agent serves it on that device (`agent.model.load_model`: on the CPU
the decode graph with the W8A8 prefill graph where memory allows, on CUDA the GPU graph), and a prompt
longer than `OnnxRuntimeEngine.prompt_run_tokens` (runtime.engine.PROMPT_RUN_TOKENS, the product's
default) runs as several runs, each attending over the cache so far. ONNX Runtime's arenas (CPU and
CUDA) keep every block a run took for the life of the process, so the largest run decides what the
process holds from then on.

Each mode (`whole`, and each --pieces N) runs in its own process, the modes alternating --repeats times.
A process loads the engine, warms it up, then for each prompt length (ascending) prefills --runs random
prompts, timing each, and samples the memory in use every 10 ms (on CUDA the GPU's, through
nvidia-ml-py when that package is there; else this process's resident memory): it reports the median time and
the peak above the loaded model. The summary gives each mode's time and memory against `whole`'s.
Nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:  # `python benchmarks/long_prompt.py` from anywhere
        sys.path.insert(0, str(p))

from _args import Parser, int_list, positive_int  # noqa: E402


def memory_reader(device: str):
    """(a function giving used memory in bytes, what it measures)."""
    if device.upper() != "CPU":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return (lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used), "GPU memory used (whole GPU)"
        except Exception:  # not installed, no driver, no GPU
            pass

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, "resident memory of the process"


def child(bundle_dir: str, pieces: int, device: str, lengths: list[int], runs: int, seed: int) -> dict:
    import numpy as np

    from agent.model import load_model
    from ota.errors import BundleError
    from runtime.errors import RuntimeUserError
    from runtime.generate import prefill

    try:
        model = load_model(bundle_dir, "onnxruntime", device=device)
    except (RuntimeUserError, BundleError) as exc:  # BackendUnavailable above all: a device this box lacks
        print(f"long_prompt.py: error: --device {device}: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    engine, arch = model.engine, model.arch
    engine.prompt_run_tokens = pieces or None
    used, what = memory_reader(device)
    rng = np.random.default_rng(seed)
    prompt = lambda n: rng.integers(10, arch.vocab_size - 10, n).tolist()  # noqa: E731
    prefill(engine, prompt(16))
    loaded = used()
    peak, stop = [loaded], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = {"pieces": pieces, "memory": what, "graph": engine.gpu_graph or engine.prefill_graph or "model.onnx", "loaded_mib": loaded / 2**20, "lengths": {}}
    for n in lengths:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            prefill(engine, prompt(n))  # the logits are copied to the host: the run has finished
            times.append(time.perf_counter() - t0)
        time.sleep(0.03)
        out["lengths"][str(n)] = {"ms": statistics.median(times) * 1e3, "first_ms": times[0] * 1e3,
                                  "peak_over_loaded_mib": (peak[0] - loaded) / 2**20}
    stop.set()
    sampler.join()
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm-m", choices=("tiny", "glm-s", "glm-m"),
                   help="random-init bundle to build when --bundle is not given")
    p.add_argument("--bundle", help="an existing INT8 or fp32 bundle")
    p.add_argument("--device", default="CPU", help="ONNX Runtime device, as model.device: CPU (default) or CUDA")
    p.add_argument("--tokens", default="512,1024,2048,3000", type=int_list, help="prompt lengths, comma-separated")
    p.add_argument("--pieces", default="512", type=int_list,
                   help="run sizes to compare with the whole prompt, comma-separated")
    p.add_argument("--runs", type=positive_int, default=3, help="prompts per length in each process")
    p.add_argument("--repeats", type=positive_int, default=2, help="processes per mode, alternating")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "serve")
    p.add_argument("--json", action="store_true",
                   help="print every process's result as JSON on stdout (the table goes to stderr)")
    p.add_argument("--child", nargs=2, metavar=("BUNDLE", "PIECES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths, pieces = sorted(args.tokens), args.pieces
    tokens_arg = ",".join(map(str, lengths))
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device, lengths, args.runs, seed=0)))
        return 0
    from ota.bundle import open_bundle
    from ota.errors import BundleError

    if args.bundle:
        bundle = Path(args.bundle)
        try:
            open_bundle(bundle, verify=False)
        except BundleError as exc:
            p.error(f"--bundle {args.bundle}: {exc}")
    else:
        from agent_load import prepare
        bundle = prepare(args.shape, args.workdir)

    context = open_bundle(bundle).manifest.architecture.get("max_position_embeddings")
    if context and max(lengths) > context - 1:
        p.error(f"--tokens {tokens_arg}: the bundle's context window is {context} positions; give shorter prompts")
    modes = [0] + pieces
    results: list[dict] = []
    for rep in range(args.repeats):
        for mode in (modes if rep % 2 == 0 else modes[::-1]):
            cmd = [sys.executable, __file__, "--child", str(bundle), str(mode), "--device", args.device,
                   "--tokens", tokens_arg, "--runs", str(args.runs)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode == 2:  # a user error (the device, the bundle): the child's one line, no traceback
                lines = [x for x in done.stderr.splitlines() if x.strip()]
                print(lines[-1] if lines else f"long_prompt.py: error: --device {args.device}: the process failed",
                      file=sys.stderr)
                return 2
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"long_prompt: the process with pieces={mode} failed (exit {done.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"pass {rep} {'whole' if not mode else f'pieces of {mode}'}: loaded "
                  f"{results[-1]['loaded_mib']:.0f} MiB; " + json.dumps(results[-1]["lengths"]), file=sys.stderr)
    if args.json:  # stdout holds the JSON alone (`--json > r.json`); the table goes to stderr
        print(json.dumps(results, indent=2), flush=True)
        sys.stdout = sys.stderr
    print(f"\n{bundle} on {args.device} ({results[0]['graph']}); memory: {results[0]['memory']}; {args.repeats} process(es) per mode, "
          f"{args.runs} prompt(s) per length\n")
    print("| prompt tokens | runs of | prefill ms (median) | first prompt ms | peak above the loaded model, MiB | "
          "time vs whole | memory vs whole |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for n in lengths:
        med = {}
        for mode in modes:
            mine = [r["lengths"][str(n)] for r in results if r["pieces"] == mode]
            med[mode] = (statistics.median(m["ms"] for m in mine), statistics.median(m["first_ms"] for m in mine),
                         statistics.median(m["peak_over_loaded_mib"] for m in mine))
        for mode in modes:
            ms, first, mib = med[mode]
            ratio_t = ms / med[0][0] if med[0][0] else float("nan")
            ratio_m = f"{mib / med[0][2]:.2f}x" if med[0][2] > 1 else "n/a"
            print(f"| {n} | {'whole' if not mode else mode} | {ms:.1f} | {first:.1f} | {mib:.0f} | {ratio_t:.2f}x | "
                  f"{ratio_m} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
