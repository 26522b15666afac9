"""Agent HTTP API under load: throughput, latency, TTFT and memory of `edgeglm agent`, and its overhead.

Run from the repository root (the factory extra installed when the bundle must be built):

    python benchmarks/agent_load.py                                  # glm-s int8, concurrency 1,4,8
    python benchmarks/agent_load.py --shape tiny --seconds 5 --repeats 2
    python benchmarks/agent_load.py --bundle path/to/bundle --concurrency 1,2,4,8,16 --json > load.json

It starts the agent exactly as an operator does (`edgeglm agent --bundle B --port P`, with
`EDGEGLM_OTA__REQUIRE_SIGNATURE=false` so an unsigned benchmark bundle loads, MQTT off), waits for
/readyz, and then makes --repeats passes. Each pass has:

  * overhead rounds at concurrency 1: the same prompt and max_tokens (greedy) through
    `runtime.generate` called directly in a separate worker process, through the agent
    (POST /v1/completions), and through the agent streaming; the three alternate, the order
    rotating each round, so they see the same machine load, and each timed request follows an
    untimed one through the same path (warm caches for both processes). Reported as agent /
    direct ratios of the end-to-end time (and of TTFT for the streaming request), median over
    all rounds;
  * one load level per --concurrency value (their order rotates between passes): N client
    threads, each with its own keep-alive `http.client` connection, send streaming completions
    back to back for --seconds. A request counts when its stream ends; requests still running
    at the deadline are finished and counted, and the level's time runs until the last one
    ends. Per level: requests/s, generated tokens/s (from the streamed usage), p50/p95
    end-to-end latency and TTFT (first text event), errors by status, the agent's peak RSS
    (VmHWM, reset before each level through /proc/PID/clear_refs when allowed) and the CPU
    that processes other than the benchmark's used meanwhile ("foreign CPU", in cores: the
    noise indicator on a shared machine). Throughput against the first --concurrency level is
    also given as the median of same-pass ratios, which cancels most of the drift between passes.

The prompt is --prompt-tokens token ids (sent as a token-id list), chosen so that greedy
generation runs to --max-tokens without meeting an end-of-sequence token, so every request does
the same work. Tables report medians over the passes (and the spread); nothing asserts on them.
Bundles built here are cached in --workdir (default .bench/serve/<shape>/).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:  # `python benchmarks/agent_load.py` from anywhere
        sys.path.insert(0, str(_p))

from _args import Parser, int_list, positive_float, positive_int  # noqa: E402
from procstats import cpu_model, proc_cpu_s, proc_status_kb, reset_peak_rss, system_busy_s  # noqa: E402

HOST = "127.0.0.1"


# --- bundle -------------------------------------------------------------------------------------

def _loads(bundle: Path) -> bool:
    """True when this tree's runtime loads the bundle (an older exporter's graph does not)."""
    from agent.model import load_model
    from ota.errors import BundleError
    from runtime.errors import RuntimeUserError

    try:
        load_model(bundle)
    except (BundleError, RuntimeUserError) as exc:
        print(f"{bundle}: {exc}; exporting it again", file=sys.stderr)
        return False
    return True


def prepare(shape: str, workdir: Path) -> Path:
    """A random-init int8 bundle of `shape` (both backends), built only when missing or stale: it is kept
    under a name keyed by the exporter's source (benchmarks/decode.py), so a changed graph writer exports
    it again (a reused older bundle measured MergedBatch where this tree's graphs batch row-aligned)."""
    from decode import exporter_key

    root = workdir / shape
    ckpt, bundle = root / "checkpoint", root / f"bundle-int8-{exporter_key()}"
    if (bundle / "manifest.json").is_file() and _loads(bundle):
        return bundle
    from models.export import ExportOptions, export_bundle
    from models.tiny import make_checkpoint

    if not (ckpt / "config.json").is_file():
        print(f"building random-init {shape} checkpoint in {ckpt}", file=sys.stderr)
        make_checkpoint(ckpt, shape=shape, train_steps=0)
    print(f"exporting int8 bundle to {bundle}", file=sys.stderr)
    export_bundle(ckpt, bundle, ExportOptions(precision="int8", name=f"bench-{shape}", version="1.0.0", force=True),
                  show_progress=False)
    return bundle


# --- /proc helpers ------------------------------------------------------------------------------

class CpuWatch:
    """CPU used by the machine minus the benchmark's own processes over an interval, in cores."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), system_busy_s(), sum(proc_cpu_s(p) for p in self.pids)

    def stop(self) -> dict:
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self._start
        dt = max(t1 - t0, 1e-9)
        return {"own_cores": (own1 - own0) / dt, "foreign_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / dt}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --- the direct-runtime worker ------------------------------------------------------------------

def worker_main(bundle: str, backend: str) -> int:
    """`--worker BUNDLE BACKEND`: load the model once, then answer JSON lines on stdin."""
    from agent.model import load_model
    from runtime.generate import SamplingParams, generate

    model = load_model(bundle, backend)
    print(json.dumps({"backend": model.backend, "vocab": model.arch.vocab_size}), flush=True)

    def run(prompt: list[int], max_tokens: int) -> dict:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        t0 = time.perf_counter()
        ttft, n = None, 0
        for _ in generate(model.engine, prompt, params):
            if ttft is None:
                ttft = time.perf_counter() - t0
            n += 1
        return {"e2e": time.perf_counter() - t0, "ttft": ttft, "tokens": n}

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "pick_prompt":  # a prompt whose greedy continuation runs to max_tokens
            best = None
            for seed in range(20):
                prompt = np.random.default_rng(seed).integers(0, model.arch.vocab_size, req["n"]).tolist()
                out = run(prompt, req["max_tokens"])
                if best is None or out["tokens"] > best[1]:
                    best = (prompt, out["tokens"], seed)
                if out["tokens"] == req["max_tokens"]:
                    break
            print(json.dumps({"prompt": best[0], "tokens": best[1], "seed": best[2]}), flush=True)
        else:
            print(json.dumps(run(req["prompt"], req["max_tokens"])), flush=True)
    return 0


class WorkerError(RuntimeError):
    """The direct-runtime worker died; the message ends with the last line it wrote to stderr (its reason)."""


class DirectWorker:
    def __init__(self, bundle: Path, backend: str):
        import tempfile

        self._err = tempfile.TemporaryFile("w+")  # the worker's stderr: its reason when it dies
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(bundle), backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     cwd=str(ROOT))
        try:
            self.info = self._read()
        except BaseException:
            self.close()
            raise

    def last_error(self) -> str:
        self._err.seek(0)
        lines = [x.strip() for x in self._err.read().splitlines() if x.strip()]
        return lines[-1] if lines else "(nothing on its stderr)"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"the direct-runtime worker exited with code {self.proc.wait()}: {self.last_error()}")
        return json.loads(line)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:  # it died: the pipe is broken
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


# --- the agent process and its clients ----------------------------------------------------------

class AgentProcess:
    def __init__(self, bundle: Path, backend: str, max_concurrent: int | None, log_path: Path):
        self.port = free_port()
        exe = Path(sys.executable).with_name("edgeglm")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
        cmd += ["agent", "--bundle", str(bundle), "--port", str(self.port), "--backend", backend]
        env = dict(os.environ, EDGEGLM_OTA__REQUIRE_SIGNATURE="false", EDGEGLM_MQTT__ENABLED="false")
        if max_concurrent is not None:
            env["EDGEGLM_HTTP__MAX_CONCURRENT"] = str(max_concurrent)
        self.command = " ".join(cmd)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with code {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the agent was not ready within {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Client:
    """One keep-alive connection; `complete` sends one /v1/completions request and times it."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=600)

    def complete(self, prompt: list[int], max_tokens: int, stream: bool) -> dict:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            if resp.status != 200:
                resp.read()
                return {"status": resp.status, "e2e": time.perf_counter() - t0}
            ttft, tokens = None, 0
            if stream:
                while line := resp.readline():
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        resp.read()
                        return {"status": "stream-error", "e2e": time.perf_counter() - t0}
                    if ttft is None and event.get("choices") and event["choices"][0].get("text"):
                        ttft = time.perf_counter() - t0
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                resp.read()  # the last chunk of the chunked body; the connection is reused
            else:
                tokens = json.loads(resp.read())["usage"]["completion_tokens"]
            return {"status": 200, "e2e": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=600)
            return {"status": type(exc).__name__, "e2e": time.perf_counter() - t0}

    def close(self) -> None:
        self.conn.close()


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def load_level(agent: AgentProcess, clients: list[Client], prompt: list[int], max_tokens: int, seconds: float,
               own_pids: list[int]) -> dict:
    """len(clients) threads sending streaming requests back to back for `seconds`."""
    results: list[list[dict]] = [[] for _ in clients]
    peak_reset = reset_peak_rss(agent.pid)
    cpu = CpuWatch(own_pids)
    agent_cpu0 = proc_cpu_s(agent.pid)
    start = time.perf_counter()
    deadline = start + seconds

    def drive(i: int) -> None:
        while time.perf_counter() < deadline:
            r = clients[i].complete(prompt, max_tokens, stream=True)
            r["done"] = time.perf_counter()
            results[i].append(r)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [r for rs in results for r in rs]
    end = max((r["done"] for r in flat), default=time.perf_counter())
    elapsed = end - start
    ok = [r for r in flat if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in flat:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": len(clients), "seconds": elapsed, "requests": len(ok), "errors": errors,
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": tokens / elapsed,
        "tokens_per_request": tokens / len(ok) if ok else None,
        "e2e_p50_ms": pct([r["e2e"] * 1e3 for r in ok], 50), "e2e_p95_ms": pct([r["e2e"] * 1e3 for r in ok], 95),
        "ttft_p50_ms": pct([r["ttft"] * 1e3 for r in ok if r["ttft"] is not None], 50),
        "ttft_p95_ms": pct([r["ttft"] * 1e3 for r in ok if r["ttft"] is not None], 95),
        "agent_peak_rss_mb": (proc_status_kb(agent.pid, "VmHWM") or 0) / 1024,
        "peak_rss_since": "level start" if peak_reset else "agent start",
        "agent_cpu_cores": (proc_cpu_s(agent.pid) - agent_cpu0) / elapsed,
        **cpu.stop(),
    }


def overhead_round(order: list[str], client: Client, worker: DirectWorker, prompt: list[int],
                   max_tokens: int) -> dict:
    """One timed request per path, each right after an untimed one through the same path.

    The warm-up matters: the other process's run evicts this one's weights from the L3 cache
    (glm-s int8 is about 29 MB against a 32 MiB L3 here), which otherwise penalizes whichever
    path runs after a switch of process, i.e. mostly the direct one."""
    out = {}
    for name in order:
        for timed in (False, True):
            if name == "direct":
                r = worker.call(op="run", prompt=prompt, max_tokens=max_tokens)
            else:
                c0 = time.process_time()  # the client's own CPU (this process is otherwise idle now)
                r = client.complete(prompt, max_tokens, stream=name == "agent-stream")
                r["client_cpu"] = time.process_time() - c0
                if r["status"] != 200:
                    raise RuntimeError(f"the agent answered {r['status']} to a concurrency-1 request")
            if timed:
                out[name] = r
    return out


# --- the benchmark ------------------------------------------------------------------------------

def open_manifest(bundle: Path):
    """The bundle's manifest (unverified); BundleError / RuntimeUserError when it is no bundle."""
    from ota.bundle import open_bundle

    return open_bundle(bundle, verify=False).manifest


def benchmark(args, bundle: Path | None = None, manifest=None) -> dict:
    levels = args.concurrency
    if bundle is None:
        bundle = Path(args.bundle) if args.bundle else prepare(args.shape, Path(args.workdir))
    bundle = bundle.resolve()
    if manifest is None:
        manifest = open_manifest(bundle)
    load_before = os.getloadavg()

    print("starting the direct-runtime worker", file=sys.stderr)
    worker = DirectWorker(bundle, args.backend)
    try:
        picked = worker.call(op="pick_prompt", n=args.prompt_tokens, max_tokens=args.max_tokens)
    except BaseException:
        worker.close()
        raise
    prompt = picked["prompt"]
    if picked["tokens"] < args.max_tokens:
        print(f"note: no prompt among 20 tried runs to {args.max_tokens} tokens; the best makes {picked['tokens']}",
              file=sys.stderr)
    max_concurrent = max(levels) if max(levels) > 8 else None  # the agent's default (8) suffices otherwise
    try:
        agent = AgentProcess(bundle, args.backend, max_concurrent, Path(args.workdir) / "agent.log")
    except BaseException:
        worker.close()
        raise
    print(f"starting the agent: {agent.command} (log {agent.log_path})", file=sys.stderr)
    try:
        agent.wait_ready()
        idle_rss = (proc_status_kb(agent.pid, "VmHWM") or 0) / 1024
        own = [os.getpid(), agent.pid, worker.proc.pid]
        warm = Client(agent.port)
        for stream in (False, True):  # warm-up, untimed
            warm.complete(prompt, args.max_tokens, stream)
        worker.call(op="run", prompt=prompt, max_tokens=args.max_tokens)
        warm.close()

        rounds, passes = [], []
        names = ["direct", "agent", "agent-stream"]
        for p in range(args.repeats):
            client = Client(agent.port)
            cpu = CpuWatch(own)
            for r in range(args.overhead_rounds):
                k = (p * args.overhead_rounds + r) % 3
                rounds.append(overhead_round(names[k:] + names[:k], client, worker, prompt, args.max_tokens))
            client.close()
            ocpu = cpu.stop()
            last = {n: statistics.median(x[n]["e2e"] for x in rounds[-args.overhead_rounds:]) * 1e3 for n in names}
            print(f"pass {p + 1}/{args.repeats} overhead: direct {last['direct']:.1f} ms, "
                  f"agent {last['agent']:.1f} ms, "
                  f"stream {last['agent-stream']:.1f} ms (foreign CPU {ocpu['foreign_cores']:.2f} cores)",
                  file=sys.stderr)
            results = {}
            for c in levels[p % len(levels):] + levels[:p % len(levels)]:
                clients = [Client(agent.port) for _ in range(c)]
                res = load_level(agent, clients, prompt, args.max_tokens, args.seconds, own)
                for cl in clients:
                    cl.close()
                results[c] = res
                print(f"pass {p + 1}/{args.repeats} concurrency {c}: {res['requests_per_s']:.2f} req/s, "
                      f"{res['tokens_per_s']:.1f} tok/s, e2e p50 {res['e2e_p50_ms']:.0f} ms, TTFT p50 "
                      f"{res['ttft_p50_ms']:.0f} ms, errors {res['errors'] or 0}, peak RSS "
                      f"{res['agent_peak_rss_mb']:.0f} MB, foreign CPU {res['foreign_cores']:.2f} cores",
                      file=sys.stderr)
            passes.append(results)
        worker_hwm = (proc_status_kb(worker.proc.pid, "VmHWM") or 0) / 1024
    finally:
        agent.stop()
        worker.close()

    def ratio(a: str, b: str, key: str = "e2e") -> dict:
        vals = [x[a][key] / x[b][key] for x in rounds if x[a].get(key) and x[b].get(key)]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}

    def med(name: str, key: str) -> float:
        return statistics.median(x[name][key] for x in rounds if x[name].get(key) is not None) * 1e3

    summary = []
    for c in levels:
        per = [ps[c] for ps in passes]
        row = {"concurrency": c, "passes": per}
        for key in ("requests_per_s", "tokens_per_s", "e2e_p50_ms", "e2e_p95_ms", "ttft_p50_ms", "ttft_p95_ms",
                    "agent_peak_rss_mb", "agent_cpu_cores", "foreign_cores", "tokens_per_request"):
            vals = [x[key] for x in per if x[key] is not None]
            row[key] = statistics.median(vals) if vals else None
            row[key + "_range"] = [min(vals), max(vals)] if vals else None
        if c != levels[0]:  # throughput against the first level, within each pass (same machine state)
            vs = [ps[c]["requests_per_s"] / ps[levels[0]]["requests_per_s"] for ps in passes]
            row["requests_per_s_vs_first"] = statistics.median(vs)
            row["requests_per_s_vs_first_range"] = [min(vs), max(vs)]
        row["requests"] = sum(x["requests"] for x in per)
        errors: dict[str, int] = {}
        for x in per:
            for k, v in x["errors"].items():
                errors[k] = errors.get(k, 0) + v
        row["errors"] = errors
        summary.append(row)
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "settings": {"bundle": str(bundle), "model": f"{manifest.name} {manifest.version} ({manifest.precision})",
                     "backend": worker.info["backend"], "prompt_tokens": len(prompt),
                     "prompt_greedy_tokens": picked["tokens"], "max_tokens": args.max_tokens,
                     "seconds": args.seconds, "repeats": args.repeats, "overhead_rounds": args.overhead_rounds,
                     "concurrency": levels, "agent_command": agent.command,
                     "max_concurrent": max_concurrent or 8},
        "overhead": {
            "rounds": len(rounds),
            "direct_e2e_ms": med("direct", "e2e"), "agent_e2e_ms": med("agent", "e2e"),
            "agent_stream_e2e_ms": med("agent-stream", "e2e"),
            "direct_ttft_ms": med("direct", "ttft"), "agent_stream_ttft_ms": med("agent-stream", "ttft"),
            "client_cpu_ms": {"agent": med("agent", "client_cpu"), "agent_stream": med("agent-stream", "client_cpu")},
            "agent_over_direct": ratio("agent", "direct"),
            "agent_stream_over_direct": ratio("agent-stream", "direct"),
            "agent_stream_ttft_over_direct": ratio("agent-stream", "direct", "ttft"),
            "samples": rounds,
        },
        "memory": {"agent_idle_peak_rss_mb": idle_rss, "direct_worker_peak_rss_mb": worker_hwm},
        "levels": summary,
    }


def print_table(rep: dict) -> None:
    m, s, o = rep["machine"], rep["settings"], rep["overhead"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; load average {m['loadavg_before'][0]:.2f} before, "
          f"{m['loadavg_after'][0]:.2f} after")
    print(f"agent: {s['agent_command']} -- {s['model']} on {s['backend']}")
    print(f"prompt {s['prompt_tokens']} token ids, max_tokens {s['max_tokens']} greedy (the prompt's greedy "
          f"continuation makes {s['prompt_greedy_tokens']} tokens); {s['seconds']:g} s per level, median of "
          f"{s['repeats']} passes (range in brackets)\n")
    head = ("concurrency", "req/s", f"req/s vs {rep['levels'][0]['concurrency']}", "tok/s", "e2e p50 ms",
            "e2e p95 ms", "TTFT p50 ms", "TTFT p95 ms", "peak RSS MB", "agent CPU", "foreign CPU", "requests", "errors")
    print(" | ".join(head))
    for r in rep["levels"]:
        rr = r["requests_per_s_range"]
        print(" | ".join([
            f"{r['concurrency']}", f"{r['requests_per_s']:.2f} [{rr[0]:.2f}-{rr[1]:.2f}]",
            f"{r['requests_per_s_vs_first']:.2f} [{r['requests_per_s_vs_first_range'][0]:.2f}-"
            f"{r['requests_per_s_vs_first_range'][1]:.2f}]" if "requests_per_s_vs_first" in r else "",
            f"{r['tokens_per_s']:.0f}", f"{r['e2e_p50_ms']:.0f}", f"{r['e2e_p95_ms']:.0f}",
            f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}", f"{r['agent_peak_rss_mb']:.0f}",
            f"{r['agent_cpu_cores']:.2f}", f"{r['foreign_cores']:.2f}", f"{r['requests']}",
            ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"]))
    mem = rep["memory"]
    print(f"\nagent peak RSS after load+golden check, before traffic: {mem['agent_idle_peak_rss_mb']:.0f} MB; "
          f"direct-runtime worker peak RSS: {mem['direct_worker_peak_rss_mb']:.0f} MB")

    def fmt(x):
        return f"{x['median']:.3f} [{x['min']:.3f}-{x['max']:.3f}]"

    print(f"\noverhead at concurrency 1, {o['rounds']} interleaved rounds (medians; ratios: median of per-round "
          f"ratios [range]):")
    print(f"  runtime.generate direct: e2e {o['direct_e2e_ms']:.1f} ms, TTFT {o['direct_ttft_ms']:.1f} ms")
    print(f"  agent, non-streaming:    e2e {o['agent_e2e_ms']:.1f} ms, ratio {fmt(o['agent_over_direct'])}")
    print(f"  agent, streaming:        e2e {o['agent_stream_e2e_ms']:.1f} ms, ratio "
          f"{fmt(o['agent_stream_over_direct'])}; TTFT {o['agent_stream_ttft_ms']:.1f} ms, ratio "
          f"{fmt(o['agent_stream_ttft_over_direct'])}")
    print(f"  the client's own CPU per request (on the same cores): non-streaming "
          f"{o['client_cpu_ms']['agent']:.1f} ms, streaming {o['client_cpu_ms']['agent_stream']:.1f} ms")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(*sys.argv[2:4])
    ap = Parser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="serve this bundle (default: a random-init int8 bundle of --shape)")
    src.add_argument("--shape", default="glm-s", choices=("tiny", "glm-s", "glm-m"))
    ap.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "openvino"),
                    help="auto, onnxruntime or openvino (agent and direct alike)")
    ap.add_argument("--concurrency", default="1,4,8", type=int_list, help="comma-separated client counts")
    ap.add_argument("--seconds", type=positive_float, default=15.0, help="duration of each load level")
    ap.add_argument("--max-tokens", type=positive_int, default=64)
    ap.add_argument("--prompt-tokens", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=3, help="interleaved passes")
    ap.add_argument("--overhead-rounds", type=positive_int, default=8, help="direct/agent/stream rounds per pass")
    ap.add_argument("--workdir", default=".bench/serve", help="bundle cache and agent log")
    ap.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    args = ap.parse_args(argv)
    from ota.errors import BundleError
    from runtime.errors import RuntimeUserError

    bundle = manifest = None
    if args.bundle:  # a missing or broken bundle: the message, before any process starts
        bundle = Path(args.bundle).resolve()
        try:
            manifest = open_manifest(bundle)
        except (BundleError, RuntimeUserError) as exc:
            ap.error(f"--bundle {args.bundle}: {exc}")
    try:
        report = benchmark(args, bundle, manifest)
    except WorkerError as exc:  # e.g. a backend the bundle lacks: the worker's own reason, in one line
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
