"""Where edgeglm's ONNX Runtime time goes: op-type profile of prefill and decode steps.

    python benchmarks/_peers_profile.py BUNDLE [--threads 2] [--prompt-tokens 512] [--steps 32]

Loads the bundle's ONNX Runtime engine (runtime/engine.py), swaps its session for an identical
one with ONNX Runtime's profiler on, runs one prefill of --prompt-tokens random ids and --steps
greedy decode steps, and prints, for the prefill and for the mean decode step: wall time of the
run (session.run as the profiler saw it), the summed kernel time per op type, the number of
kernel launches, and what is left outside the kernels (session/framework overhead). Profiling
adds a little per node; compare shares, not absolute times, with the benchmark's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def profiled_engine(bundle: Path, threads: int, prefix: str):
    """The bundle's engine with its decode session (and prefill session, if the bundle has a prefill
    graph) replaced by identical ones with the profiler on."""
    import onnxruntime as ort

    from agent.model import load_model

    engine = load_model(bundle, "onnxruntime", threads).engine

    def profiled(name: str, signed: bool = False):
        import tempfile

        from runtime.engine import signed_weight_graph

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling, opts.profile_file_prefix = True, f"{prefix}-{Path(name).stem}"
        with tempfile.TemporaryDirectory() as tmp:  # int8 weights where the engine runs them (VNNI CPUs)
            path = signed_weight_graph(bundle / "onnxruntime" / name, Path(tmp)) if signed else None
            session = ort.InferenceSession(str(path or bundle / "onnxruntime" / name), opts,
                                           providers=["CPUExecutionProvider"])
        return type(engine._decode)(session, engine.arch)

    engine._decode = profiled("model.onnx")
    engine._prefill = profiled(engine.prefill_graph, engine.signed_weights) if engine.prefill_graph else engine._decode
    return engine


def split_runs(events: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each model_run event with the kernel events inside its interval."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [(r, [n for n in nodes if r["ts"] <= n["ts"] <= r["ts"] + r["dur"]]) for r in runs]


def summarize(label: str, runs: list[tuple[dict, list[dict]]]) -> None:
    n = len(runs)
    wall = sum(r["dur"] for r, _ in runs) / n
    per_op, count = defaultdict(float), defaultdict(int)
    for _, nodes in runs:
        for e in nodes:
            per_op[e["args"]["op_name"]] += e["dur"] / n
            count[e["args"]["op_name"]] += 1
    kernels = sum(per_op.values())
    print(f"\n{label}: {wall / 1e3:.3f} ms per run (mean of {n}), kernels {kernels / 1e3:.3f} ms, "
          f"{sum(count.values()) // n} kernel launches, outside kernels {(wall - kernels) / 1e3:.3f} ms")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:<34}{us / 1e3:>9.3f} ms {100 * us / wall:>6.1f}%  x{count[op] // n}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    from runtime.generate import decode_one_token, prefill

    engine = profiled_engine(Path(args.bundle), args.threads, "/tmp/edgeglm-ort-profile")
    vocab = engine.arch.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_tokens).tolist()
    logits, cache = prefill(engine, prompt)
    token = int(np.argmax(logits))
    for i in range(args.steps):
        logits, cache = decode_one_token(engine, token, len(prompt) + i, cache)
        token = int(np.argmax(logits))
    runs = split_runs(json.loads(Path(engine._decode.session.end_profiling()).read_text()))
    if engine._prefill is not engine._decode:  # the prompt ran on the prefill graph's session
        runs = split_runs(json.loads(Path(engine._prefill.session.end_profiling()).read_text())) + runs
    summarize(f"prefill ({args.prompt_tokens} tokens, {engine.prefill_graph or 'model.onnx'})", runs[:1])
    summarize(f"decode step (context {args.prompt_tokens}..{args.prompt_tokens + args.steps})", runs[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
