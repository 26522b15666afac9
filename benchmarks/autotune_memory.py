"""Memory of the execution-path autotune: what measuring every path costs the process, side by side with
loading the chosen path alone.

    python benchmarks/autotune_memory.py --bundle B            # glm-m: about a minute
    python benchmarks/autotune_memory.py --bundle B --json

Each mode runs in a fresh child process (peaks do not carry over):

- `serve only`: load the bundle on its default ONNX Runtime CPU path, one 64-token prompt (the baseline);
- `autotune together`: measure every CPU path this machine has for the bundle, loaded together (what the
  autotune does when they fit in half the available memory), then load the chosen path to serve;
- `autotune one at a time`: the same with one path loaded at a time (what it does on a small box).

For each: peak RSS (VmHWM), RSS once the autotune has returned, and RSS once the chosen path serves; the
ratios are against `serve only`. The autotune's cache goes to a temporary directory, so every run
measures. Nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("serve only", "autotune together", "autotune one at a time")


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
    import numpy as np

    import runtime.autotune as autotune
    from agent.model import choose_path, load_model
    from ota.bundle import open_bundle
    from runtime.generate import prefill

    out = {"mode": mode, "start_mb": rss_mb()["VmRSS"]}
    with tempfile.TemporaryDirectory(prefix="edgeglm-atm-") as cache:
        if mode == "serve only":
            model = load_model(bundle, "onnxruntime", None)
        else:
            if mode == "autotune one at a time":
                autotune._groups = lambda bundle, cands, available, prefill="on": [[c] for c in cands]
            b = open_bundle(bundle)
            path, tuning = choose_path(b, "auto", cache_dir=Path(cache))
            out["paths_measured"] = sum(t.status == "measured" for t in tuning.trials)
            out["after_autotune_mb"] = rss_mb()["VmRSS"]
            model = load_model(b, "auto", None, cache_dir=Path(cache))  # from the cache just written
        out["path"] = model.path.describe()
        prompt = np.random.default_rng(0).integers(0, model.arch.vocab_size, 64).tolist()
        prefill(model.engine, prompt)
        now = rss_mb()
        out["serving_mb"], out["peak_mb"] = now["VmRSS"], now["VmHWM"]
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
          "| vs serve only |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        after = f"{r['after_autotune_mb']:.0f}" if "after_autotune_mb" in r else "-"
        print(f"| {r['mode']} | {r.get('paths_measured', '-')} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f}x | {after} | {r['serving_mb']:.0f} | "
              f"{r['serving_mb'] / base['serving_mb']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
