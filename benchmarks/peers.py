"""edgeglm against its peers: llama.cpp (q8_0 GGUF) and OpenVINO GenAI (int8), side by side.

Run from the repository root (the factory extra and the peers extra installed):

    pip install -e '.[factory,peers]'     # llama-cpp-python compiles llama.cpp: set
                                          # CMAKE_ARGS="-DGGML_NATIVE=ON" for a build for this CPU
    python benchmarks/peers.py            # glm-s and glm-m, all cores, 3 passes, 512 + 128 tokens
    python benchmarks/peers.py --shapes glm-s --threads 2 --runs 5 --json > peers.json

For each shape it builds or reuses (see benchmarks/decode.py) the random-init checkpoint and
edgeglm's int8 bundle under --workdir/<shape>/, and the peers' files under --workdir/peers/<shape>/:

  * llama.cpp: `q8_0.gguf`, written by llama.cpp's own converter (convert_hf_to_gguf.py, which
    takes GlmForCausalLM as its "chatglm" architecture), run by benchmarks/_peers_gguf.py. The
    converter is not in the llama-cpp-python wheel: it is taken from --llama-cpp-dir (a llama.cpp
    source tree) or, by default, from the sdist of the installed llama-cpp-python version, which
    pip downloads once into --workdir/peers/src. The tokenizer detail is in that helper.
  * OpenVINO GenAI: `ov-genai/`, edgeglm's own int8 OpenVINO IR adapted to what LLMPipeline
    expects (benchmarks/_peers_ovgenai.py says how and why not optimum-intel), plus the
    tokenizer IRs from openvino_tokenizers.

Then it loads every candidate in its own worker process, all with --threads threads:

  * edgeglm onnxruntime int8 and edgeglm openvino int8: runtime engines driven by
    runtime.generate's prefill / decode_one_token, greedy (as benchmarks/decode.py);
  * llama.cpp q8_0: llama_cpp.Llama (n_threads = n_threads_batch = --threads, flash attention
    on, the whole prompt in one batch), Llama.eval on the prompt, then one token per eval,
    argmax over its logits;
  * OpenVINO GenAI int8: LLMPipeline.generate on the prompt's token ids (TokenizedInputs), its
    default CPU pipeline (paged attention; prefix caching off, the prompt in one step), greedy,
    min_new_tokens = max_new_tokens so an EOS does not stop it; a streamer's write() timestamps
    every token. (Its stateful "SDPA" backend fails on edgeglm's graph: see the helper.)

All get the same prompts: --prompt-tokens random token ids (so exactly that many tokens, no
tokenizer on the timed path), a fresh prompt for every pass (GenAI's prefix cache is off as
well, and llama.cpp's context is reset, so no run reuses another's prompt KV). TTFT is prompt
in -> first token out; decode tok/s is --new-tokens further tokens / their time. After one
untimed warm-up each, --runs passes go over all candidates in turn (interleaved, so each pass
sees the same machine load; every worker process is stopped with SIGSTOP outside its own runs, so
threads a runtime leaves spinning after a run, as llama.cpp's pool does, cannot slow the next
candidate). The table shows medians, and for each pair edgeglm / peer three ratios: the median of
the per-pass ratios (the estimator docs/performance.md quotes: same-pass ratios cancel drift), the
min-max of those per-pass ratios, and the ratio of the two medians (what the listed medians divide
to; it need not equal the median of ratios, and the JSON carries all three plus the per-pass
ratios). It also shows the numpy memory read bandwidth measured just before and just after the
passes. Sanity columns: `cos` is the cosine between a candidate's
first-token logits and the PyTorch fp32 reference's (models/glm.py; GenAI exposes no logits),
`agree` how many greedy tokens from the start equal the reference's (int8 rounding on random
weights flips near-ties early, so a low count alone means little; a low cos would mean a
different model). `TTFT cpu ms` and `cpu ms/tok` are the CPU time the candidate's process used
(all its threads, time.process_time) for the prefill and per decoded token: on a machine that
others are using, wall time measures the share of the cores a process got, CPU time the work it
did (spin-waiting threads included, which is a real cost on a shared box). With --threads 1 the
CPU time is close to the work alone. Nothing here asserts on timings.

A peer that is not installed is skipped with one line saying how to install it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from decode import prepare, read_bandwidth  # noqa: E402  (benchmarks/ is on sys.path as a script)
from procstats import cpu_model  # noqa: E402

HERE = Path(__file__).resolve().parent
EDGE_ORT, EDGE_OV = "edgeglm onnxruntime int8", "edgeglm openvino int8"
LLAMA, GENAI = "llama.cpp q8_0", "openvino-genai int8"
PEER_PACKAGES = {LLAMA: "llama_cpp", GENAI: "openvino_genai"}
INSTALL_HINT = {
    LLAMA: "pip install llama-cpp-python gguf (compiles llama.cpp; CMAKE_ARGS=\"-DGGML_NATIVE=ON\" builds "
           "for this CPU), or pip install -e '.[peers]'",
    GENAI: "pip install openvino-genai==<openvino's version> openvino-tokenizers==<same>, "
           "or pip install -e '.[peers]'",
}


# ----------------------------------------------------------------------------- runners (in workers)

class Clock:
    """Wall and CPU time (this process, all its threads) to the first token and after it."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def first_token(self) -> None:
        self.t1, self.c1 = time.perf_counter(), time.process_time()

    def done(self, tokens: list[int], logits) -> dict:
        t2, c2 = time.perf_counter(), time.process_time()
        return {"ttft": self.t1 - self.t0, "decode": t2 - self.t1, "ttft_cpu": self.c1 - self.c0,
                "decode_cpu": c2 - self.c1, "tokens": tokens, "logits": logits}


class EdgeRunner:
    """An edgeglm engine through runtime.generate's prefill / decode_one_token, greedy."""

    def __init__(self, bundle: str, backend: str, threads: int):
        from agent.model import load_model

        self.engine = load_model(Path(bundle), backend, threads).engine

    def run(self, prompt: list[int], new_tokens: int, want_logits: bool):
        from runtime.generate import decode_one_token, prefill

        clock = Clock()
        logits, cache = prefill(self.engine, prompt)
        tokens = [int(np.argmax(logits))]
        clock.first_token()
        first = logits.tolist() if want_logits else None
        for i in range(new_tokens):
            logits, cache = decode_one_token(self.engine, tokens[-1], len(prompt) + i, cache)
            tokens.append(int(np.argmax(logits)))
        return clock.done(tokens, first)


class LlamaRunner:
    """llama.cpp through llama-cpp-python: Llama.eval on the prompt, then one token per eval."""

    def __init__(self, gguf: str, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                         n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)

    def _last_logits(self) -> np.ndarray:
        """The last evaluated position's logits, read in place (Llama.eval keeps no copy unless
        logits_all, which would copy every prompt row)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self, prompt: list[int], new_tokens: int, want_logits: bool):
        llm = self.llm
        llm.reset()  # start every run from an empty context (no prefix reuse)
        clock = Clock()
        llm.eval(prompt)
        tokens = [int(np.argmax(self._last_logits()))]
        clock.first_token()
        logits = self._last_logits().tolist() if want_logits else None
        for _ in range(new_tokens):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(self._last_logits())))
        return clock.done(tokens, logits)


class GenAIRunner:
    """OpenVINO GenAI's LLMPipeline, greedy, fed token ids; a streamer timestamps each token."""

    def __init__(self, folder: str, threads: int, max_tokens: int):
        import openvino_genai as genai

        self.genai = genai
        sched = genai.SchedulerConfig()  # GenAI's CPU default is its paged-attention pipeline; keep
        sched.enable_prefix_caching = False  # that, but never reuse one run's prompt KV in the next
        sched.cache_size = 1  # GB of KV blocks, far more than one sequence needs
        sched.max_num_batched_tokens = max_tokens  # the whole prompt in one step, as the others do
        self.pipe = genai.LLMPipeline(folder, "CPU", scheduler_config=sched, INFERENCE_NUM_THREADS=threads)

    def run(self, prompt: list[int], new_tokens: int, want_logits: bool):
        import openvino as ov

        genai, tokens, clock = self.genai, [], Clock()

        class Stamp(genai.StreamerBase):
            def write(self, token):
                if not tokens:
                    clock.first_token()
                tokens.extend(token if isinstance(token, (list, tuple)) else [token])
                return genai.StreamingStatus.RUNNING

            def end(self):
                pass

        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = new_tokens + 1
        cfg.do_sample = False
        ids = np.asarray([prompt], np.int64)
        inputs = genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        clock.__init__()
        self.pipe.generate(inputs, cfg, Stamp())
        if len(tokens) != new_tokens + 1:
            raise RuntimeError(f"GenAI streamed {len(tokens)} tokens, expected {new_tokens + 1}")
        return clock.done([int(t) for t in tokens], None)


def worker_main(spec: str) -> int:
    """One candidate in this process: a JSON spec in, then one JSON line per request."""
    s = json.loads(spec)
    kind = s["kind"]
    if kind == "edgeglm":
        runner = EdgeRunner(s["path"], s["backend"], s["threads"])
    elif kind == "llama.cpp":
        runner = LlamaRunner(s["path"], s["threads"], s["n_ctx"])
    else:
        runner = GenAIRunner(s["path"], s["threads"], s["n_ctx"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(runner.run(req["prompt"], req["new_tokens"], req.get("logits", False))), flush=True)
    return 0


class Worker:
    """A candidate in a child process (its own memory, thread pools and allocator)."""

    def __init__(self, spec: dict):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {spec['kind']} {spec['path']} exited while loading (see above)")
        self.pause()  # until its first run (see run)

    def run(self, prompt: list[int], new_tokens: int, logits: bool = False) -> dict:
        """One timed run; the worker runs only meanwhile: it is stopped (SIGSTOP) between its runs, so that
        threads a runtime leaves spinning after its work (llama.cpp's thread pool polls for the next graph)
        take no CPU from the candidate measured next (that raised edgeglm's glm-s TTFT from ~80 to ~120 ms
        when it ran right after llama.cpp; 2026-11-27)."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens, "logits": logits}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        finally:
            self.pause()
        if not line:
            raise RuntimeError("worker died during a run (see above)")
        return json.loads(line)

    def pause(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- building the peers' files

def missing_peers() -> dict[str, str]:
    """Peers whose Python package is not importable, with the line that says how to install it."""
    return {name: INSTALL_HINT[name] for name, mod in PEER_PACKAGES.items() if importlib.util.find_spec(mod) is None}


def llama_cpp_source(workdir: Path, given: str | None) -> Path:
    """A llama.cpp source tree holding convert_hf_to_gguf.py: --llama-cpp-dir, or the converter
    files from the sdist of the installed llama-cpp-python (pip downloads it once)."""
    if given:
        root = Path(given)
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"--llama-cpp-dir {given}: no convert_hf_to_gguf.py there; give a llama.cpp "
                             "source tree (llama-cpp-python's sdist has one in vendor/llama.cpp)")
        return root
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    src = workdir / "peers" / "src" / f"llama.cpp-{ver}"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    dl = src.parent / "sdist"
    print(f"fetching llama-cpp-python {ver} sdist for llama.cpp's converter (pip download)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "-d", str(dl), f"llama-cpp-python=={ver}"], check=True)
    sdist = next(dl.glob(f"llama_cpp_python-{ver}.tar.gz"))
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = src.with_name(src.name + ".tmp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(keep) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(src)
    return src


def build_gguf(ckpt: Path, out: Path, llama_dir: Path) -> Path:
    if out.is_file():
        return out
    print(f"converting {ckpt} to {out} with llama.cpp's converter", file=sys.stderr)
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(HERE / "_peers_gguf.py"), str(llama_dir), str(ckpt), str(tmp), "q8_0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"GGUF conversion of {ckpt} failed:\n{proc.stderr[-3000:]}")
    tmp.rename(out)
    return out


def build_genai(bundle: Path, ckpt: Path, out: Path) -> Path:
    if (out / "openvino_model.xml").is_file() and (out / "source").is_file() \
            and (out / "source").read_text() == str(bundle.resolve()):
        return out
    from _peers_ovgenai import make_genai_folder

    print(f"adapting {bundle} for OpenVINO GenAI in {out}", file=sys.stderr)
    make_genai_folder(bundle, ckpt, out)
    (out / "source").write_text(str(bundle.resolve()))
    return out


def reference_logits(ckpt: Path, prompt: list[int], n: int, threads: int) -> tuple[np.ndarray, list[int]]:
    """First-token logits and n + 1 greedy tokens of the PyTorch fp32 reference."""
    from decode import EagerRunner

    runner = EagerRunner(ckpt, threads)
    torch = runner.torch
    with torch.inference_mode():
        logits, _ = runner.model(torch.tensor([prompt]))
    _, _, tokens = runner.run(prompt, n)
    return logits[0, -1].numpy(), tokens


# ----------------------------------------------------------------------------- measuring

def candidates_for(shape: str, args, skipped: dict[str, str]) -> tuple[dict[str, dict], Path]:
    workdir = Path(args.workdir)
    ckpt, bundles = prepare(shape, workdir, ("int8",))
    bundle = bundles["int8"]
    peers = workdir / "peers" / shape
    specs = {
        EDGE_ORT: {"kind": "edgeglm", "path": str(bundle), "backend": "onnxruntime"},
        EDGE_OV: {"kind": "edgeglm", "path": str(bundle), "backend": "openvino"},
    }
    if LLAMA not in skipped:
        gguf = build_gguf(ckpt, peers / "q8_0.gguf", llama_cpp_source(workdir, args.llama_cpp_dir))
        specs[LLAMA] = {"kind": "llama.cpp", "path": str(gguf)}
    if GENAI not in skipped:
        specs[GENAI] = {"kind": "genai", "path": str(build_genai(bundle, ckpt, peers / "ov-genai"))}
    for spec in specs.values():
        spec["threads"], spec["n_ctx"] = args.threads, args.prompt_tokens + args.new_tokens + 16
    return specs, ckpt


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def measure_shape(shape: str, args, skipped: dict[str, str]) -> dict:
    specs, ckpt = candidates_for(shape, args, skipped)
    cfg = json.loads((ckpt / "config.json").read_text())
    rng = np.random.default_rng(0)  # one prompt for the warm-up and one per pass, the same for all
    prompts = [rng.integers(0, cfg["vocab_size"], args.prompt_tokens).tolist() for _ in range(args.runs + 1)]
    ref_logits, ref_tokens = reference_logits(ckpt, prompts[0], args.new_tokens, args.threads)
    workers = {}
    try:  # workers are stopped between runs (Worker.run): close them whatever happens
        for name, spec in specs.items():
            print(f"[{shape}] loading {name}", file=sys.stderr)
            workers[name] = Worker(spec)
        samples = {name: {"ttft": [], "tok_s": [], "ttft_cpu": [], "cpu_per_token": []} for name in workers}
        for name, w in workers.items():  # warm-up (untimed) on prompts[0]: logits and tokens for the sanity check
            out = w.run(prompts[0], args.new_tokens, logits=True)
            samples[name]["cos"] = cosine(out["logits"], ref_logits) if out["logits"] else None
            samples[name]["tokens"] = out["tokens"]
        bw_before = read_bandwidth(args.threads)
        for r in range(args.runs):
            for name, w in workers.items():
                out = w.run(prompts[r + 1], args.new_tokens)
                s = samples[name]
                s["ttft"].append(out["ttft"] * 1e3)
                s["tok_s"].append(args.new_tokens / out["decode"])
                s["ttft_cpu"].append(out["ttft_cpu"] * 1e3)
                s["cpu_per_token"].append(out["decode_cpu"] * 1e3 / args.new_tokens)
                print(f"[{shape}] pass {r + 1}/{args.runs} {name}: TTFT {out['ttft'] * 1e3:.1f} ms, "
                      f"{args.new_tokens / out['decode']:.1f} tok/s, CPU {out['ttft_cpu'] * 1e3:.0f} ms + "
                      f"{out['decode_cpu'] * 1e3 / args.new_tokens:.2f} ms/token", file=sys.stderr)
        bw_after = read_bandwidth(args.threads)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for name, s in samples.items():
        agree = next((i for i, (a, b) in enumerate(zip(s["tokens"], ref_tokens)) if a != b), len(ref_tokens))
        rows.append({"candidate": name, "ttft_ms": statistics.median(s["ttft"]),
                     "decode_tok_s": statistics.median(s["tok_s"]), "logits_cos": s["cos"],
                     "tokens_agree": agree, "ttft_cpu_ms": statistics.median(s["ttft_cpu"]),
                     "decode_cpu_ms_per_token": statistics.median(s["cpu_per_token"]),
                     "ttft_ms_all": s["ttft"], "decode_tok_s_all": s["tok_s"]})
    return {"shape": shape, "read_bandwidth_gb_s": {"before": bw_before, "after": bw_after},
            "results": rows, "ratios": ratios(samples)}


def ratios(samples: dict) -> list[dict]:
    """edgeglm / peer for each pair, three ways (decode tok/s and TTFT alike):

    `decode` / `ttft`: the median of the per-pass ratios (same-pass ratios cancel most of the
    machine's load drift: the estimator the docs quote); `decode_range` / `ttft_range`: the
    [min, max] of those per-pass ratios; `decode_of_medians` / `ttft_of_medians`: the ratio of the
    two candidates' medians, which is what the listed medians divide to. The median of ratios and
    the ratio of medians need not agree (they can even fall on opposite sides of 1), so both are
    reported for readers to cross-check.
    """
    out = []
    for edge in (EDGE_ORT, EDGE_OV):
        for peer in (LLAMA, GENAI, EDGE_OV if edge == EDGE_ORT else None):
            if peer is None or peer not in samples:
                continue
            e, p = samples[edge], samples[peer]
            row = {"edgeglm": edge, "peer": peer}
            for key, series in (("decode", "tok_s"), ("ttft", "ttft")):
                per_pass = [a / b for a, b in zip(e[series], p[series])]
                row[key] = statistics.median(per_pass)
                row[f"{key}_range"] = [min(per_pass), max(per_pass)]
                row[f"{key}_of_medians"] = statistics.median(e[series]) / statistics.median(p[series])
                row[f"{key}_per_pass"] = per_pass
            out.append(row)
    return out


# ----------------------------------------------------------------------------- report

def print_report(report: dict) -> None:
    m, st = report["machine"], report["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {st['threads']} threads; {st['prompt_tokens']}-token prompt, "
          f"{st['new_tokens']} new tokens, median of {st['runs']} interleaved passes")
    for name, hint in report["skipped"].items():
        print(f"skipped {name}: not installed ({hint})")
    for sh in report["shapes"]:
        bw = sh["read_bandwidth_gb_s"]
        print(f"\n{sh['shape']}: numpy read bandwidth {bw['before']:.1f} GB/s before, {bw['after']:.1f} GB/s after")
        print(f"{'candidate':<26}{'TTFT ms':>10}{'decode tok/s':>14}{'TTFT cpu ms':>13}{'cpu ms/tok':>12}"
              f"{'cos':>9}{'agree':>7}")
        for r in sh["results"]:
            cos = f"{r['logits_cos']:.4f}" if r["logits_cos"] is not None else "-"
            print(f"{r['candidate']:<26}{r['ttft_ms']:>10.1f}{r['decode_tok_s']:>14.1f}{r['ttft_cpu_ms']:>13.1f}"
                  f"{r['decode_cpu_ms_per_token']:>12.2f}{cos:>9}{r['tokens_agree']:>7}")
        print("ratios edgeglm / peer: median of per-pass ratios [per-pass min-max], then ratio of the medians\n"
              "  above (the two need not agree; decode > 1 and TTFT < 1 favour edgeglm)")
        for q in sh["ratios"]:
            dlo, dhi = q["decode_range"]
            tlo, thi = q["ttft_range"]
            print(f"  {q['edgeglm']:<26} / {q['peer']:<22} decode {q['decode']:.2f}x [{dlo:.2f}-{dhi:.2f}], "
                  f"of medians {q['decode_of_medians']:.2f}x   TTFT {q['ttft']:.2f}x [{tlo:.2f}-{thi:.2f}], "
                  f"of medians {q['ttft_of_medians']:.2f}x")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="glm-s,glm-m", help="comma-separated: tiny, glm-s, glm-m")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", type=int, default=3, help="interleaved timed passes (median reported)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workdir", default=".bench", help="checkpoints, bundles and peers/ cache")
    ap.add_argument("--llama-cpp-dir", help="llama.cpp source tree with convert_hf_to_gguf.py "
                                            "(default: the installed llama-cpp-python's sdist)")
    ap.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    from models.tiny import SHAPES

    bad = [s for s in shapes if s not in SHAPES]
    if bad or args.threads < 1 or args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 1:
        print(f"peers.py: invalid arguments (unknown shape(s) {bad} or a count below 1); shapes are "
              f"{', '.join(SHAPES)}; nothing was run", file=sys.stderr)
        return 2
    skipped = missing_peers()
    for name, hint in skipped.items():
        print(f"skipping {name}: not installed ({hint})", file=sys.stderr)
    report = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "settings": {"threads": args.threads, "runs": args.runs, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens},
        "skipped": skipped,
        "shapes": [measure_shape(shape, args, skipped) for shape in shapes],
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
