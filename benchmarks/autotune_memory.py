"""Memory of the execution-path autotune: what measuring every path costs, side by side with loading the
chosen path alone.

    python benchmarks/autotune_memory.py --bundle B            # glm-m: about two minutes
    python benchmarks/autotune_memory.py --bundle B --json

Each mode runs in a fresh process (peaks do not carry over):

- `serve only`: load the bundle on its default ONNX Runtime CPU path, one 64-token prompt (the baseline);
- `in process, together` / `in process, one at a time`: measure every CPU path this machine has for the
  bundle in the serving process (`autotune(isolate=False)`), loaded together (what the autotune does when
  they fit in half the available memory) or one at a time (on a small box), then load the chosen path and
  run the prompt;
- `child, together` / `child, one at a time`: the same measured in a child process (`isolate=True`, what
  the agent and the CLI do).

For each: the serving process's peak RSS (VmHWM), its RSS once the autotune has returned and once the
chosen path serves, and the measuring child's peak (the largest child's ru_maxrss); ratios against `serve
only`. The autotune's cache goes to a temporary directory, so every run measures. Nothing asserts on the
numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("serve only", "in process, together", "in process, one at a time", "child, together",
         "child, one at a time")


def rss_mb() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0]) / 1024
    return fields


def child(bundle: Path, mode: str) -> dict:
    """One mode, in this (fresh) process."""
    import resource

    import numpy as np

    import runtime.autotune as autotune
    from agent.model import load_model
    from ota.bundle import open_bundle
    from runtime.generate import prefill
    from runtime.probe import MemoryInfo, probe_hardware

    out = {"mode": mode, "start_mb": rss_mb()["VmRSS"]}
    with tempfile.TemporaryDirectory(prefix="edgeglm-atm-") as cache:
        if mode == "serve only":
            model = load_model(bundle, "onnxruntime", None)
        else:
            b = open_bundle(bundle)
            hw = probe_hardware()
            prefill_mode = autotune.choose_prefill_graph("auto", b, hw.memory).mode  # as load_model decides
            if mode.endswith("one at a time"):  # as on a box with little memory available (child too)
                hw = replace(hw, memory=MemoryInfo(hw.memory.total_bytes, 1 << 20, None))
            tuning = autotune.autotune(b, hw, cache_dir=Path(cache), prefill=prefill_mode,
                                       isolate=mode.startswith("child"))
            out["paths_measured"] = sum(t.status == "measured" for t in tuning.trials)
            out["after_autotune_mb"] = rss_mb()["VmRSS"]
            model = load_model(b, "auto", None, cache_dir=Path(cache))  # from the cache just written
        out["path"] = model.path.describe()
        prompt = np.random.default_rng(0).integers(0, model.arch.vocab_size, 64).tolist()
        prefill(model.engine, prompt)
        now = rss_mb()
        out["serving_mb"], out["peak_mb"] = now["VmRSS"], now["VmHWM"]
        out["child_peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle.resolve(), args.child)))
        return 0
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--bundle", str(args.bundle), "--child", mode],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    base = rows[0]
    print(f"bundle {args.bundle}; chosen path: {rows[1].get('path')}")
    print("| mode | paths measured | peak RSS MB | vs serve only | RSS after the autotune MB | RSS serving MB "
          "| vs serve only | measuring child's peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        after = f"{r['after_autotune_mb']:.0f}" if "after_autotune_mb" in r else "-"
        print(f"| {r['mode']} | {r.get('paths_measured', '-')} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f}x | {after} | {r['serving_mb']:.0f} | "
              f"{r['serving_mb'] / base['serving_mb']:.2f}x | {r['child_peak_mb'] or 0:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
