"""Transparent huge pages for the model's memory: `edgeglm bench` with and without
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, side by side.

Run from the repository root:

    python benchmarks/hugepages.py --bundle B                    # ONNX Runtime, 512 + 128 tokens, 3 pairs
    python benchmarks/hugepages.py --bundle B --backend openvino --concurrency 8

With that glibc tunable, malloc asks the kernel for transparent huge pages (madvise) for its large
allocations, where ONNX Runtime keeps the prepacked weights it reads at every decode step: one TLB
entry per 2 MiB instead of per 4 KiB. The kernel must allow it (/sys/kernel/mm/transparent_hugepage/
enabled: `madvise` or `always`; with `always` every process gets them anyway and the tunable changes
nothing). Nothing in the project sets the tunable (neither the installer's systemd unit nor the
K3s manifests): an operator can put GLIBC_TUNABLES in agent.env and measure with this benchmark
(docs/performance.md: it changed nothing measurable there).

Each mode runs `edgeglm bench --json` in its own process (glibc reads the tunable at start), the
modes alternating --repeats times; the process also reports how much of its memory is in huge pages
(AnonHugePages of /proc/self/smaps_rollup, read after the bench). The summary gives medians and the
median of the per-pair ratios (huge pages / default). Nothing asserts on the numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/hugepages.py` from anywhere
from _args import Parser, positive_int  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TUNABLE = "glibc.malloc.hugetlb=1"
CHILD = """
import contextlib, io, json, sys
from agent import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = cli.main(sys.argv[1:])
report = json.loads(out.getvalue())
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
report["anon_huge_mb"] = int(huge[0].split()[1]) / 1024 if huge else None
print(json.dumps(report))
"""


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"))
    p.add_argument("--prompt-tokens", type=positive_int, default=512)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--concurrency", type=positive_int, default=1)
    p.add_argument("--runs", type=positive_int, default=3, help="runs per bench process")
    p.add_argument("--repeats", type=positive_int, default=3, help="processes per mode, alternating")
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    if not (Path(args.bundle) / "manifest.json").is_file():
        p.error(f"--bundle {args.bundle} is invalid: must be a bundle directory (with manifest.json)")
    bench = ["bench", "--bundle", str(Path(args.bundle).resolve()), "--backend", args.backend, "--prompt-tokens", str(args.prompt_tokens),
             "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--json"]
    if args.concurrency > 1:
        bench += ["--concurrency", str(args.concurrency)]
    if args.threads:
        bench += ["--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    results: dict[str, list[dict]] = {"default": [], "huge": []}
    for rep in range(args.repeats):
        for mode in (("default", "huge") if rep % 2 == 0 else ("huge", "default")):
            mode_env = {**env, "GLIBC_TUNABLES": TUNABLE} if mode == "huge" else env
            done = subprocess.run([sys.executable, "-c", CHILD, *bench], capture_output=True, text=True,
                                  env=mode_env, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"hugepages: the {mode} bench failed (exit {done.returncode})", file=sys.stderr)
                return 1
            r = json.loads(done.stdout.strip().splitlines()[-1])
            s, c = r["single_stream"], r.get("concurrency") or {}
            row = {"ttft_ms": s["ttft_ms"]["median"], "decode_tok_s": s["decode_tok_s"]["median"],
                   "aggregate_tok_s": (c.get("aggregate_tok_s") or {}).get("median") if c else None,
                   "peak_rss_mb": r["peak_rss_mb"], "anon_huge_mb": r["anon_huge_mb"]}
            results[mode].append(row)
            print(f"pass {rep} {mode}: {json.dumps(row)}", file=sys.stderr)
    print(f"\n{args.bundle}, {args.backend}; transparent huge pages: {thp_mode()}; {args.repeats} process(es) per "
          f"mode, {args.prompt_tokens} + {args.new_tokens} tokens\n")
    keys = ["ttft_ms", "decode_tok_s"] + (["aggregate_tok_s"] if args.concurrency > 1 else []) + \
        ["peak_rss_mb", "anon_huge_mb"]
    print("| | " + " | ".join(keys) + " |")
    print("|---|" + "--:|" * len(keys))
    for mode in ("default", "huge"):
        print(f"| {mode} | " + " | ".join(f"{statistics.median(r[k] for r in results[mode]):.1f}" for k in keys) + " |")
    for k in keys[:-2]:
        ratios = [h[k] / d[k] for d, h in zip(results["default"], results["huge"]) if d[k]]
        print(f"{k}: huge pages / default, median of the pairs: {statistics.median(ratios):.2f}x "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
