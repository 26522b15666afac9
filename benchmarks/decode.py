"""Decode benchmark: every backend side by side on one checkpoint, against the memory roofline.

Run from the repository root (torch, onnx and both runtimes installed):

    python benchmarks/decode.py                     # glm-s, 512-token prompt, 128 new tokens, 3 repeats
    python benchmarks/decode.py --shape glm-m --threads 2 --json > glm-m.json

It builds (or reuses, under --workdir) a random-init checkpoint of the shape and its fp32 and
int8 bundles, loads five candidates once each (ONNX Runtime fp32/int8, OpenVINO fp32/int8 and
the PyTorch eager reference with its KV cache; where onnxruntime-gpu sees a GPU also ONNX Runtime
fp32/int8 on CUDA, on the bundles' GPU graph, unless --no-gpu; their roofline column is "-", the
roof being the CPU memory's), warms each up with one short run, then makes
--repeats interleaved passes over all candidates. Per pass and candidate it measures:

  * TTFT: prefill of --prompt-tokens random token ids up to the first logits;
  * decode tokens/s: --new-tokens greedy steps against the KV cache (only these steps are timed).

The table reports per-candidate medians. Around the timed passes the machine's memory read bandwidth
is measured with numpy, and for each exported model the weight bytes read per decoded token (the
files of the graph the candidate runs minus the fp32 embedding table, which is only gathered one row
per token; lm_head is read in full; for ONNX Runtime the graph is model.onnx on CPU, gpu.onnx on
CUDA, plus only the external-data bytes that graph's initializers reference and the embedding table
file it names, not every file under onnxruntime/) give a roofline fraction = bytes/token * tokens/s
/ bandwidth. Random weights decode as fast as trained ones: the work per token does not depend on
the values. Timings are wall-clock on a shared machine; nothing here asserts on them.

Each engine candidate runs in its own worker process (so where one lands its weight memory does
not affect another's). `--baseline-src DIR` adds the same engine candidates built from another
source tree (e.g. `git archive <rev> | tar -x -C DIR`), labelled "before:", with their bundles
from `--baseline-workdir` (built by that tree's exporter); they are interleaved in the same
passes, which is the only fair way to compare two versions on a noisy, shared machine. After the table
it prints each candidate against its "before:" twin: the median (and range) of the per-pass decode
ratios, and the ratio of median TTFTs (`vs_before` in --json).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _args import Parser, choice_list, positive_int  # noqa: E402  (benchmarks/ is on sys.path as a script)
from procstats import cpu_model  # noqa: E402

PRECISIONS = ("fp32", "int8")

GPU_GRAPH_FILE = "gpu.onnx"  # runtime.engine.GPU_GRAPH_FILE: the graph the CUDA candidates run

EAGER = "pytorch-eager fp32"


def exporter_key() -> str:
    """A short hash of the exporter's source: cached bundles are keyed by it, so a changed graph writer
    re-exports them instead of measuring the graphs an older one wrote."""
    import hashlib

    import models.export
    import models.onnx_graph

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                   for m in (models.onnx_graph, models.export))).hexdigest()[:10]


def prepare(shape: str, workdir: Path, precisions=("fp32", "int8")) -> tuple[Path, dict[str, Path]]:
    """The checkpoint and the fp32/int8 bundles of `shape`, built only when missing."""
    from models.export import ExportOptions, export_bundle
    from models.tiny import make_checkpoint

    root = workdir / shape
    ckpt = root / "checkpoint"
    if not (ckpt / "config.json").is_file():
        print(f"building random-init {shape} checkpoint in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, shape=shape, train_steps=0)
    exporter = exporter_key()
    bundles = {}
    for precision in precisions:
        bundles[precision] = root / f"bundle-{precision}-{exporter}"
        if not (bundles[precision] / "manifest.json").is_file():
            print(f"exporting {precision} bundle to {bundles[precision]}", file=sys.stderr)
            export_bundle(ckpt, bundles[precision], ExportOptions(precision=precision, force=True))
    return ckpt, bundles


def read_bandwidth(threads: int, size_mb: int = 1024, tries: int = 5) -> float:
    """Memory READ bandwidth in GB/s: bytes read / time of a sum over a float64 array of size_mb
    (far larger than any cache), split over `threads` workers (numpy releases the GIL inside the
    reduction), best of `tries`. A sum reads each byte once and writes nothing, so it matches the
    access pattern of decode, which streams the weights once per token."""
    data = np.ones(size_mb * (1 << 20) // 8)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


class WorkerRunner:
    """An EngineRunner in a child process (optionally importing from another source tree)."""

    def __init__(self, bundle: Path, backend: str, threads: int, src: Path | None = None, device: str = "auto"):
        env = dict(os.environ)
        if src is not None:  # PYTHONPATH comes before the editable install of this tree
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(Path(bundle).resolve()), backend,
               str(threads), device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=str(src) if src else None)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"decode.py: the worker for {bundle} ({backend}) exited with code {self.proc.wait()} "
                             "before it was ready (its error is above)")
        self.runtime_file = json.loads(line)["runtime"]

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["ttft"], out["decode"], out["tokens"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def worker_main(bundle: str, backend: str, threads: str, device: str = "auto") -> int:
    import runtime.engine

    runner = EngineRunner(Path(bundle), backend, int(threads), device)
    print(json.dumps({"runtime": runtime.engine.__file__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ttft, decode, tokens = runner.run(req["prompt"], req["new_tokens"])
        print(json.dumps({"ttft": ttft, "decode": decode, "tokens": tokens}), flush=True)
    return 0


class EngineRunner:
    """An edge engine driven through runtime.generate: prefill, then greedy decode steps."""

    def __init__(self, bundle: Path, backend: str, threads: int, device: str = "auto"):
        from agent.model import load_model

        self.engine = load_model(bundle, backend, threads, device=device).engine

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        from runtime.generate import decode_one_token, prefill

        t0 = time.perf_counter()
        logits, cache = prefill(self.engine, prompt)
        ttft = time.perf_counter() - t0
        tokens = [int(np.argmax(logits))]
        t0 = time.perf_counter()
        for i in range(new_tokens):
            logits, cache = decode_one_token(self.engine, tokens[-1], len(prompt) + i, cache)
            tokens.append(int(np.argmax(logits)))
        return ttft, time.perf_counter() - t0, tokens


class EagerRunner:
    """The PyTorch reference model with its (k, v) cache, fp32, inference mode."""

    def __init__(self, ckpt: Path, threads: int):
        import torch

        from models.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        _, self.model = load_checkpoint(ckpt)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, past = self.model(torch.tensor([prompt]))
            tokens = [int(logits[0, -1].argmax())]
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(new_tokens):
                logits, past = self.model(torch.tensor([[tokens[-1]]]), past=past, start_pos=len(prompt) + i)
                tokens.append(int(logits[0, -1].argmax()))
            return ttft, time.perf_counter() - t0, tokens


def cuda_available() -> bool:
    """Whether ONNX Runtime here has its CUDA provider (onnxruntime-gpu): then CUDA candidates are added."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


EMBEDDINGS_KEY = "edgeglm.embeddings"  # runtime.engine.EMBEDDINGS_KEY: the graph's fp32 embedding table file


def onnx_graph_bytes(graph: Path) -> int:
    """Bytes of one ONNX graph's weights: its own file (graph and inline initializers), the external-data
    bytes ITS initializers reference, each (location, offset) counted once, and the fp32 embedding table
    file its metadata names (embed_tokens.npy beside the graph: the engine gathers rows from it, and
    weight_bytes_per_token subtracts the table as for every backend). A bundle's onnxruntime/ directory
    holds several graphs (model.onnx, gpu.onnx, prefill.onnx) over one shared data file, so summing the
    directory would count tensors the running graph never reads."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    seen: set[tuple[str, int]] = set()
    total = graph.stat().st_size
    table = {p.key: p.value for p in model.metadata_props}.get(EMBEDDINGS_KEY)
    if table and (graph.parent / table).is_file():  # older bundles keep the table inside the graph instead
        total += (graph.parent / table).stat().st_size
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location, offset = info["location"], int(info.get("offset", 0))
        if (location, offset) in seen:
            continue
        seen.add((location, offset))
        if "length" in info:
            total += int(info["length"])
        else:  # no length: the tensor runs to the end of its file
            total += (graph.parent / location).stat().st_size - offset
    return total


def weight_bytes_per_token(files: list[Path], cfg: dict) -> int:
    """Bytes of weights streamed per decoded token: the files the candidate runs minus the fp32 embedding
    table. An .onnx file counts as the graph plus only the external data its initializers reference
    (onnx_graph_bytes); any other file (OpenVINO IR, safetensors) by its size."""
    total = sum(onnx_graph_bytes(p) if p.suffix == ".onnx" else p.stat().st_size for p in files)
    return total - cfg["vocab_size"] * cfg["hidden_size"] * 4


_BASELINE_PREPARE = """
import inspect, json, sys
from pathlib import Path
src, shape, workdir, precisions = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
sys.path[:0] = [str(src), str(src / "benchmarks")]
import decode
if len(inspect.signature(decode.prepare).parameters) >= 3:
    _, bundles = decode.prepare(shape, workdir, tuple(precisions))
else:  # an older tree: fp32 and int8 always
    _, bundles = decode.prepare(shape, workdir)
print(json.dumps({p: str(Path(b).resolve()) for p, b in bundles.items()}))
"""


def baseline_bundles(src: Path, workdir: Path, shape: str, precisions: list[str]) -> dict[str, Path]:
    """The baseline tree's bundles of `shape`, exported by THAT tree's exporter: its own
    benchmarks/decode.py `prepare` run in a subprocess with the tree first on PYTHONPATH (it builds them
    only when missing, under its own exporter key). Where that fails, the newest `bundle-{precision}-*`
    (or an older tree's `bundle-{precision}`) under workdir/shape; SystemExit in one line when none."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    print(f"preparing the baseline's bundles in {workdir / shape} with {src}'s exporter", file=sys.stderr)
    done = subprocess.run([sys.executable, "-c", _BASELINE_PREPARE, str(src), shape, str(workdir),
                           ",".join(precisions)], cwd=str(src), env=env, capture_output=True, text=True)
    sys.stderr.write(done.stderr if done.returncode == 0 else "")
    if done.returncode == 0:
        try:
            built = {p: Path(b) for p, b in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            if all((built.get(p, Path("/nonexistent")) / "manifest.json").is_file() for p in precisions):
                return {p: built[p] for p in precisions}
        except (ValueError, IndexError, AttributeError):
            pass
    reason = ([x for x in done.stderr.splitlines() if x.strip()] or ["no error output"])[-1].strip()
    out, missing = {}, []
    for p in precisions:  # bundles exported there before (e.g. by hand with that tree's exporter)
        found = [d for d in (workdir / shape).glob(f"bundle-{p}*") if (d / "manifest.json").is_file()
                 and (d.name == f"bundle-{p}" or d.name.startswith(f"bundle-{p}-"))]
        if found:
            out[p] = max(found, key=lambda d: (d / "manifest.json").stat().st_mtime)
            print(f"note: the baseline's prepare failed ({reason}); using {out[p]}", file=sys.stderr)
        else:
            missing.append(p)
    if missing:
        print(
            f"decode.py: error: --baseline-workdir {workdir} has no {'/'.join(missing)} bundle of {shape} "
            f"(bundle-PRECISION-* under {workdir / shape}) and {src}'s own prepare failed: {reason}; build them "
            f"with that tree: cd {src} && PYTHONPATH={src} {sys.executable} -c \"import sys; "
            f"sys.path[:0] = ['benchmarks']; from pathlib import Path; from decode import prepare; "
            f"prepare('{shape}', Path('{workdir}'))\"", file=sys.stderr)
        raise SystemExit(2)
    return out


def benchmark(args) -> dict:
    trees = []
    if args.baseline_src:  # first: a baseline without bundles stops the run before this tree's are built
        src = Path(args.baseline_src).resolve()
        trees.append(("before: ", src, baseline_bundles(src, Path(args.baseline_workdir).resolve(), args.shape,
                                                         args.precisions)))
    ckpt, bundles = prepare(args.shape, Path(args.workdir), args.precisions)
    cfg = json.loads((ckpt / "config.json").read_text())
    trees.append(("", None, bundles))
    candidates, weight_files, on_gpu = {}, {}, set()
    try:
        return _measure(args, ckpt, cfg, bundles, trees, candidates, weight_files, on_gpu)
    finally:  # nothing left running, whatever happened
        for runner in candidates.values():
            if isinstance(runner, WorkerRunner):
                runner.close()


def _measure(args, ckpt, cfg, bundles, trees, candidates, weight_files, on_gpu) -> dict:
    for backend, sub in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        for precision in args.precisions:
            for label, src, bdirs in trees:
                name = f"{label}{backend} {precision}"
                print(f"loading {name}", file=sys.stderr)
                candidates[name] = WorkerRunner(bdirs[precision], backend, args.threads, src)
                print(f"  runtime from {candidates[name].runtime_file}", file=sys.stderr)
                if backend == "onnxruntime":  # the CPU decode graph and the external data it references
                    weight_files[name] = [bdirs[precision] / sub / "model.onnx"]
                else:
                    weight_files[name] = sorted(p for p in (bdirs[precision] / sub).rglob("*") if p.is_file())
    for precision in args.precisions if cuda_available() and args.gpu else ():
        name = f"onnxruntime {precision} cuda"  # the bundle's GPU graph, its KV cache in device memory
        print(f"loading {name}", file=sys.stderr)
        candidates[name] = WorkerRunner(bundles[precision], "onnxruntime", args.threads, device="cuda")
        weight_files[name] = [bundles[precision] / "onnxruntime" / GPU_GRAPH_FILE]  # the graph CUDA runs
        on_gpu.add(name)
    print(f"loading {EAGER}", file=sys.stderr)
    candidates[EAGER] = EagerRunner(ckpt, args.threads)
    weight_files[EAGER] = sorted(ckpt.glob("*.safetensors"))

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg["vocab_size"], args.prompt_tokens).tolist()
    for runner in candidates.values():  # warm-up: one short run, untimed
        runner.run(prompt[:16], 4)

    bw_before = read_bandwidth(args.threads)
    samples = {name: {"ttft": [], "decode": [], "tokens": None} for name in candidates}
    for r in range(args.repeats):
        for name, runner in candidates.items():
            ttft, decode, tokens = runner.run(prompt, args.new_tokens)
            s = samples[name]
            s["ttft"].append(ttft)
            s["decode"].append(args.new_tokens / decode)
            s["tokens"] = s["tokens"] or tokens
            print(f"pass {r + 1}/{args.repeats} {name}: TTFT {ttft * 1e3:.1f} ms, "
                  f"{args.new_tokens / decode:.1f} tok/s", file=sys.stderr)
    bw_after = read_bandwidth(args.threads)
    bandwidth = max(bw_before, bw_after)  # the attainable roof: the better of the two

    eager = statistics.median(samples[EAGER]["decode"])
    best = max(statistics.median(s["decode"]) for s in samples.values())
    rows = []
    for name, s in samples.items():
        tps = statistics.median(s["decode"])
        nbytes = weight_bytes_per_token(weight_files[name], cfg)
        ref = samples[EAGER]["tokens"]
        rows.append({
            "candidate": name,
            "ttft_ms": statistics.median(s["ttft"]) * 1e3,
            "decode_tok_s": tps,
            "vs_eager": tps / eager,
            "vs_best": tps / best,
            "bytes_per_token": nbytes,
            "roofline": None if name in on_gpu else nbytes * tps / (bandwidth * 1e9),  # CPU memory's roof
            # greedy tokens equal to the eager reference's, from the start (a sanity check: fp32
            # should agree for long, int8 and random weights leave near-ties that may flip)
            "tokens_agree": next((i for i, (a, b) in enumerate(zip(s["tokens"], ref)) if a != b), len(ref)),
            "ttft_ms_all": [t * 1e3 for t in s["ttft"]],
            "decode_tok_s_all": s["decode"],
        })
        before = samples.get(f"before: {name}")
        if before is not None:  # --baseline-src: the same candidate of the other tree, ran in the same passes
            ratios = [a / b for a, b in zip(s["decode"], before["decode"])]
            rows[-1]["vs_before"] = {"decode_median": statistics.median(ratios), "decode_min": min(ratios),
                                     "decode_max": max(ratios),
                                     "ttft": statistics.median(s["ttft"]) / statistics.median(before["ttft"])}
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                    "read_bandwidth_gb_s": {"before": bw_before, "after": bw_after}},
        "settings": {"shape": args.shape, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "repeats": args.repeats},
        "parameters": {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")},
        "results": rows,
    }


def print_table(report: dict) -> None:
    m, st = report["machine"], report["settings"]
    bw = m["read_bandwidth_gb_s"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; numpy read bandwidth "
          f"{bw['before']:.1f} GB/s before, {bw['after']:.1f} GB/s after")
    print(f"shape {st['shape']}: prompt {st['prompt_tokens']} tokens, {st['new_tokens']} new tokens, "
          f"median of {st['repeats']} interleaved passes\n")
    head = ("candidate", "TTFT ms", "decode tok/s", "vs eager", "vs best", "MB/token", "roofline", "agree")
    print(f"{head[0]:<28}" + "".join(f"{h:>13}" for h in head[1:]))
    for r in report["results"]:
        print(f"{r['candidate']:<28}{r['ttft_ms']:>13.1f}{r['decode_tok_s']:>13.1f}{r['vs_eager']:>12.2f}x"
              f"{r['vs_best']:>12.2f}x{r['bytes_per_token'] / 1e6:>13.1f}"
              f"{'-' if r['roofline'] is None else format(r['roofline'], '.2f'):>13}"
              f"{r['tokens_agree']:>13}")
    paired = [r for r in report["results"] if "vs_before" in r]
    if paired:  # --baseline-src
        print("\nafter / before (--baseline-src), each candidate against its 'before:' twin of the same passes:")
        print(f"{'candidate':<28}{'decode (median of per-pass ratios)':>36}{'range':>16}{'TTFT (of medians)':>20}")
        for r in paired:
            v = r["vs_before"]
            print(f"{r['candidate']:<28}{v['decode_median']:>35.2f}x{v['decode_min']:>9.2f}-{v['decode_max']:.2f}x"
                  f"{v['ttft']:>19.2f}x")


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="glm-s", choices=("tiny", "glm-s", "glm-m"))
    ap.add_argument("--prompt-tokens", type=positive_int, default=512)
    ap.add_argument("--new-tokens", type=positive_int, default=128)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    ap.add_argument("--precisions", default="fp32,int8", type=choice_list(PRECISIONS),
                    help="comma-separated: fp32,int8")
    ap.add_argument("--no-gpu", dest="gpu", action="store_false",
                    help="leave out the ONNX Runtime CUDA candidates (added where onnxruntime-gpu sees a GPU)")
    ap.add_argument("--baseline-src", help="source tree of the version to compare against (interleaved)")
    ap.add_argument("--baseline-workdir", default=".bench",
                    help="where the baseline tree's bundles are (built there by that tree's exporter when missing)")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(*sys.argv[2:6])
    args = ap.parse_args(argv)
    if args.baseline_src and not (Path(args.baseline_src) / "runtime" / "engine.py").is_file():
        ap.error(f"--baseline-src {args.baseline_src} is invalid: must be an edgeglm source tree "
                 "(a directory with runtime/engine.py)")
    if args.baseline_src and not (Path(args.baseline_src) / "benchmarks" / "decode.py").is_file():
        ap.error(f"--baseline-src {args.baseline_src} is invalid: it has no benchmarks/decode.py to export its bundles")
    report = benchmark(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
