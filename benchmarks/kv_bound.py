"""The KV bound under a memory limit: the agent with `batching.max_kv_mb` off against "auto", side by side.

Run from the repository root, as root (it makes a memory cgroup, v2 or v1), the factory extra installed
when the bundle must be built:

    python benchmarks/kv_bound.py                          # glm-s int8, 650 MiB limit, 8 x (3000 + 600) tokens
    python benchmarks/kv_bound.py --limit-mb 900 --requests 8 --prompt-tokens 3000 --max-tokens 600
    python benchmarks/kv_bound.py --bundle B --modes off,auto,128 --json

For each mode (`off` is a bound too large to matter, then "auto" or a number of MiB) one agent
(`edgeglm agent run --bundle B`, MQTT off, prefix cache off, ONNX Runtime) starts inside a new memory
cgroup of --limit-mb, and --requests completions of --prompt-tokens random token ids and --max-tokens
new tokens are sent at once over HTTP (token ids drawn below the bundle's vocab_size). Per mode it prints how
many requests were answered in full (to --max-tokens, or ended early at an end-of-sequence token: counted
apart), the HTTP error statuses and the dropped connections apart, the cgroup's peak usage (page cache of
the bundle included) and OOM kills, the wall time, whether the agent was still running and its exit code
after SIGTERM, the KV bound the agent logged, and answered and peak against the `off` mode of the same run
as ratios (the modes run side by side, one after the other). A box whose agent
is OOM-killed loses every request in flight, and a model on probation counts the death against itself.
Numbers and the machine go to docs/performance.md ("KV bound").
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _args import Parser, positive_int  # noqa: E402
from agent_load import prepare  # noqa: E402


def prompt_ids(i: int, n: int, vocab_size: int) -> list[int]:
    """Request i's prompt: n seeded random token ids, all below the bundle's vocab_size (the agent answers
    400 to an id outside the vocabulary), above the first 10 (special tokens) where the vocabulary allows."""
    rng = random.Random(i)
    low = 10 if vocab_size > 20 else 0
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def tally(answers: list, max_tokens: int) -> dict:
    """Answers of one mode: answered (a whole completion: to max_tokens, or ended at EOS, counted apart as
    eos_early), HTTP error statuses by code, and dropped connections by exception (the agent killed)."""
    out = {"answered": 0, "eos_early": 0, "http_errors": {}, "dropped": {}}
    for a in answers:
        if isinstance(a, dict) and a.get("status") == 200:
            out["answered"] += 1
            out["eos_early"] += a["tokens"] < max_tokens
        elif isinstance(a, dict) and "status" in a:
            out["http_errors"][str(a["status"])] = out["http_errors"].get(str(a["status"]), 0) + 1
        else:
            name = a.get("dropped") if isinstance(a, dict) else str(a)
            out["dropped"][name] = out["dropped"].get(name, 0) + 1
    return out


def vs_off(results: list[dict], key: str) -> list[float | None]:
    """Each mode's `key` over the `off` mode's of the same run (None without an `off` mode or a 0/None)."""
    off = next((r for r in results if r["mode"] == "off"), None)
    base = off.get(key) if off else None
    return [r[key] / base if base and r.get(key) is not None else None for r in results]


def parse_modes(text: str) -> list[str]:
    """'off,auto,128' -> ['off', 'auto', '128']; ValueError unless each is off, auto or a whole number > 0."""
    modes = [m.strip() for m in text.split(",")]
    for m in modes:
        if m not in ("off", "auto") and not (m.isdigit() and int(m) > 0):
            raise ValueError(m)
    if len(set(modes)) != len(modes):
        raise ValueError(text)
    return modes


def cgroup_root() -> tuple[Path, bool]:
    """(directory to make cgroups in, cgroup v2?)"""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text().split():
        return Path("/sys/fs/cgroup"), True
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").is_file():
        return v1, False
    raise SystemExit("kv_bound.py: no memory cgroup controller here (/sys/fs/cgroup/memory or cgroup v2)")


class Cgroup:
    def __init__(self, limit_mb: int):
        root, self.v2 = cgroup_root()
        self.path = root / f"edgeglm-kv-bound-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.path.mkdir()
        except PermissionError:
            raise SystemExit(f"kv_bound.py: cannot make a cgroup in {root}: run as root") from None
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit_mb << 20))
        if not self.v2:
            try:
                (self.path / "memory.swappiness").write_text("0")
            except OSError:
                pass

    def peak_mb(self) -> float | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return round(int(f.read_text()) / 2**20, 1) if f.is_file() else None

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        m = re.search(r"oom_kill (\d+)", text)
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edgeglm() -> list[str]:
    exe = Path(sys.executable).with_name("edgeglm")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "agent.cli"]


def run_mode(bundle: Path, mode: str, args, vocab_size: int) -> dict:
    cg, port, state = Cgroup(args.limit_mb), free_port(), Path(tempfile.mkdtemp(prefix="edgeglm-kv-bound-"))
    env = dict(os.environ, EDGEGLM_MQTT__ENABLED="false", EDGEGLM_OTA__REQUIRE_SIGNATURE="false",
               EDGEGLM_MODEL__BACKEND="onnxruntime", EDGEGLM_CACHE__MAX_MB="0",
               EDGEGLM_BATCHING__MAX_BATCH=str(max(8, args.requests)),
               EDGEGLM_BATCHING__MAX_KV_MB="1000000" if mode == "off" else mode,
               EDGEGLM_HTTP__MAX_CONCURRENT=str(max(8, args.requests)))
    procs = cg.path / "cgroup.procs"
    cmd = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *edgeglm(), "agent", "run", "--bundle",
           str(bundle), "--port", str(port), "--state-dir", str(state)]
    log = (state / "agent.log").open("w")
    agent = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and agent.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit(f"kv_bound.py: the agent ({mode}) did not become ready; log: {state / 'agent.log'}")
        answers: list = [None] * args.requests

        def ask(i: int) -> None:
            body = json.dumps({"prompt": prompt_ids(i, args.prompt_tokens, vocab_size),
                               "max_tokens": args.max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3600) as r:
                    out = json.load(r)
                answers[i] = {"status": 200, "tokens": out["usage"]["completion_tokens"],
                              "finish": out["choices"][0].get("finish_reason")}
            except urllib.error.HTTPError as exc:  # the agent answered, with an error status
                answers[i] = {"status": exc.code, "detail": exc.read(300).decode(errors="replace")}
            except Exception as exc:  # the agent killed: the connection drops
                answers[i] = {"dropped": type(exc).__name__}

        t0 = time.monotonic()
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(args.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        alive = agent.poll() is None
        if alive:
            agent.terminate()
        code = agent.wait(60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        log.close()
    text = (state / "agent.log").read_text(errors="replace")
    bound = re.search(r'max_kv_mb = "auto": ([^\n]*)', text)
    result = {"mode": mode, **tally(answers, args.max_tokens), "requests": args.requests, "answers": answers,
              "cgroup_peak_mb": cg.peak_mb(), "oom_kills": cg.oom_kills(),
              "wall_s": round(wall, 1), "alive_after": alive, "exit_code": code,
              "kv_waits_logged": text.count("batching: a request of up to"),
              "auto_bound": bound.group(1) if bound else None}
    cg.remove()
    shutil.rmtree(state, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="an int8 bundle (default: glm-s built or reused under --workdir)")
    ap.add_argument("--shape", default="glm-s", choices=("tiny", "glm-s", "glm-m"),
                    help="the bundle built when --bundle is not given")
    ap.add_argument("--workdir", default=".bench/serve", help="where benchmarks/agent_load.py keeps bundles")
    ap.add_argument("--limit-mb", type=positive_int, default=650, help="the memory cgroup's limit, MiB")
    ap.add_argument("--requests", type=positive_int, default=8)
    ap.add_argument("--prompt-tokens", type=positive_int, default=3000)
    ap.add_argument("--max-tokens", type=positive_int, default=600)
    ap.add_argument("--modes", default="off,auto", help="comma-separated: off, auto, or a number of MiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        modes = parse_modes(args.modes)
    except ValueError:
        ap.error(f"--modes {args.modes} is invalid: must be off, auto or a whole number of MiB > 0, "
                 "comma-separated (no repeats), e.g. off,auto,128")
    from ota.bundle import open_bundle
    from ota.errors import BundleError

    if args.bundle:
        try:
            open_bundle(Path(args.bundle), verify=False)
        except BundleError as exc:
            ap.error(f"--bundle {args.bundle}: {exc}")
    cgroup_root()  # no memory cgroup here: say so before a bundle is built
    bundle = Path(args.bundle) if args.bundle else prepare(args.shape, Path(args.workdir))
    arch = open_bundle(bundle, verify=False).manifest.architecture
    vocab_size = int(arch["vocab_size"])
    context = arch.get("max_position_embeddings")
    if context and args.prompt_tokens + args.max_tokens > context:
        ap.error(f"--prompt-tokens {args.prompt_tokens} + --max-tokens {args.max_tokens}: the bundle's context "
                 f"window is {context} positions; give fewer tokens")
    results = []
    for mode in modes:
        print(f"[kv_bound] {mode}: {args.requests} x ({args.prompt_tokens} + {args.max_tokens}) tokens under "
              f"{args.limit_mb} MiB", file=sys.stderr, flush=True)
        results.append(run_mode(bundle, mode, args, vocab_size))
    for r, a, p in zip(results, vs_off(results, "answered"), vs_off(results, "cgroup_peak_mb")):
        r["answered_vs_off"], r["peak_vs_off"] = a, p
    if args.json:
        print(json.dumps({"bundle": str(bundle), "limit_mb": args.limit_mb, "vocab_size": vocab_size,
                          "results": results}, indent=2))
        return 0

    def ratio(x):
        return "n/a" if x is None else f"{x:.2f}x"

    print(f"bundle {bundle}, cgroup limit {args.limit_mb} MiB, {args.requests} requests of "
          f"{args.prompt_tokens} + {args.max_tokens} tokens at once; ratios against max_kv_mb=off in this run")
    print(f"{'max_kv_mb':<10} {'answered':>9} {'vs off':>7} {'EOS early':>9} {'HTTP errors':>12} {'dropped':>8} "
          f"{'peak MiB':>9} {'vs off':>7} {'OOM kills':>9} {'wall s':>7} {'exit':>5}  bound")
    for r in results:
        http = ", ".join(f"{k}: {v}" for k, v in r["http_errors"].items()) or "0"
        print(f"{r['mode']:<10} {r['answered']:>4} of {r['requests']:<2} {ratio(r['answered_vs_off']):>7} "
              f"{r['eos_early']:>9} {http:>12} {sum(r['dropped'].values()):>8} {r['cgroup_peak_mb']!s:>9} "
              f"{ratio(r['peak_vs_off']):>7} {r['oom_kills']:>9} {r['wall_s']:>7} {r['exit_code']!s:>5}  "
              f"{r['auto_bound'] or ''}{'; ' if r['auto_bound'] else ''}{r['kv_waits_logged']} wait(s) logged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
