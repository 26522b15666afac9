"""OpenVINO models loaded and let go: what each load leaves behind, and what the runtime cache buys.

    python benchmarks/ov_reload.py --bundle BUNDLE [--rounds 6] [--passes 3]

An agent loads an OpenVINO model at every OTA switch, self-test and autotune trial, and lets the
old one go. With the CPU plugin's runtime cache on (its default, CPU_RUNTIME_CACHE_CAPACITY 5000)
each compiled model stayed alive after it was released; edgeglm turns the cache off
(runtime/engine.py OpenVinoEngine). Side by side, each setting in a fresh process of its own:

  leak      --rounds times: load, serve one request (a 128-token prompt, 64 decode steps), let go;
            threads and RSS after the first round and after the last, per further round
  speed     --passes interleaved passes (one load per setting per pass): a 256-token prompt's
            prefill and 128 decode steps, best of three each; the ratio off / on

Numbers and the machine go to docs/performance.md ("OpenVINO reloads").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _args import Parser, int_at_least, positive_int

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, os, sys, time
import numpy as np
import openvino as ov
setting, bundle_dir, mode, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if setting == "on":  # the plugin's default: take out what the engine sets
    original = ov.Core.compile_model
    def compile_model(self, model, device=None, config=None):
        return original(self, model, device, {k: v for k, v in (config or {}).items()
                                              if k != "CPU_RUNTIME_CACHE_CAPACITY"})
    ov.Core.compile_model = compile_model
from ota.bundle import open_bundle
from runtime.engine import ModelArch, load_engine
bundle = open_bundle(bundle_dir)
arch = ModelArch.from_manifest(bundle.manifest.architecture)
entry = bundle.path(bundle.manifest.backends["openvino"].entry)
rng = np.random.default_rng(0)

def serve(engine, prompt, steps):
    ids = rng.integers(1, 1000, (1, prompt)).astype(np.int64)
    t0 = time.perf_counter()
    logits, cache = engine.forward(ids, np.arange(prompt, dtype=np.int64)[None], np.ones((1, prompt), np.int64),
                                   engine.new_cache())
    t1 = time.perf_counter()
    for i in range(steps):
        p = prompt + i
        token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        logits, cache = engine.forward(np.array([[token]], np.int64), np.array([[p]], np.int64),
                                       np.ones((1, p + 1), np.int64), cache)
    return t1 - t0, steps / (time.perf_counter() - t1)

def state():
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return len(os.listdir("/proc/self/task")), rss / 2**20

if mode == "leak":
    seen = []
    for _ in range(rounds):
        engine = load_engine("openvino", entry, arch, 2)
        serve(engine, 128, 64)
        del engine
        gc.collect()
        seen.append(state())
    print(json.dumps({"threads": [s[0] for s in seen], "rss_mb": [round(s[1], 1) for s in seen]}))
else:
    engine = load_engine("openvino", entry, arch, 2)
    runs = [serve(engine, 256, 128) for _ in range(3)]
    print(json.dumps({"prefill_ms": 1e3 * min(r[0] for r in runs), "decode_tok_s": max(r[1] for r in runs)}))
"""


def child(setting: str, bundle: Path, mode: str, rounds: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, setting, str(bundle), mode, str(rounds)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"the {mode} run with the runtime cache {setting} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path, help="a bundle with an OpenVINO model")
    ap.add_argument("--rounds", type=int_at_least(2), default=6,
                    help="load-serve-release rounds per setting (>= 2)")
    ap.add_argument("--passes", type=positive_int, default=3, help="interleaved speed passes")
    args = ap.parse_args()
    args.bundle = args.bundle.resolve()  # the children run from the repository root: a relative path from anywhere
    if not (args.bundle / "manifest.json").is_file():
        ap.error(f"--bundle {args.bundle}: no manifest.json there; give a bundle directory")
    print(f"bundle {args.bundle}; {os.cpu_count()} cores; OpenVINO CPU, 2 threads")
    for setting in ("on", "off"):
        r = child(setting, args.bundle, "leak", args.rounds)
        n = args.rounds - 1
        print(f"runtime cache {setting:3}: threads {r['threads'][0]} -> {r['threads'][-1]} "
              f"({(r['threads'][-1] - r['threads'][0]) / n:+.2f} per load), RSS {r['rss_mb'][0]} -> {r['rss_mb'][-1]} MB "
              f"({(r['rss_mb'][-1] - r['rss_mb'][0]) / n:+.1f} MB per load)", flush=True)
    speed = {"on": [], "off": []}
    for _ in range(args.passes):
        for setting in ("on", "off"):
            speed[setting].append(child(setting, args.bundle, "speed", 0))
    for key, label in (("prefill_ms", "256-token prefill ms"), ("decode_tok_s", "decode tok/s")):
        on = sorted(s[key] for s in speed["on"])[len(speed["on"]) // 2]
        off = sorted(s[key] for s in speed["off"])[len(speed["off"]) // 2]
        print(f"{label}: cache on {on:.1f}, off {off:.1f}: off/on {off / on:.2f} (median of {args.passes} passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
