"""The KV bound under a memory limit: the agent with `batching.max_kv_mb` off against "auto", side by side.

Run from the repository root, as root (it makes a memory cgroup, v2 or v1), the factory extra installed
when the bundle must be built:

    python benchmarks/kv_bound.py                          # glm-s int8, 650 MiB limit, 8 x (3000 + 600) tokens
    python benchmarks/kv_bound.py --limit-mb 900 --requests 8 --prompt-tokens 3000 --max-tokens 600
    python benchmarks/kv_bound.py --bundle B --modes off,auto,128 --json

For each mode (`off` is a bound too large to matter, then "auto" or a number of MiB) one agent
(`edgeglm agent run --bundle B`, MQTT off, prefix cache off, ONNX Runtime) starts inside a new memory
cgroup of --limit-mb, and --requests completions of --prompt-tokens random token ids and --max-tokens
new tokens are sent at once over HTTP. Per mode it prints how many requests were answered in full, the
cgroup's peak usage (page cache of the bundle included) and OOM kills, the wall time, whether the agent
was still running and its exit code after SIGTERM, and the KV bound the agent logged. A box whose agent
is OOM-killed loses every request in flight, and a model on probation counts the death against itself.
Numbers and the machine go to docs/performance.md ("KV bound").
"""

from __future__ import annotations

import argparse
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_load import prepare  # noqa: E402


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


def run_mode(bundle: Path, mode: str, args) -> dict:
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
            rng = random.Random(i)
            body = json.dumps({"prompt": [rng.randrange(10, 4000) for _ in range(args.prompt_tokens)],
                               "max_tokens": args.max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3600) as r:
                    answers[i] = json.load(r)["usage"]["completion_tokens"]
            except Exception as exc:  # the agent killed: the connection drops
                answers[i] = type(exc).__name__

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
    result = {"mode": mode, "answered": sum(a == args.max_tokens for a in answers), "requests": args.requests,
              "answers": answers, "cgroup_peak_mb": cg.peak_mb(), "oom_kills": cg.oom_kills(),
              "wall_s": round(wall, 1), "alive_after": alive, "exit_code": code,
              "kv_waits_logged": text.count("batching: a request of up to"),
              "auto_bound": bound.group(1) if bound else None}
    cg.remove()
    shutil.rmtree(state, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="an int8 bundle (default: glm-s built or reused under --workdir)")
    ap.add_argument("--shape", default="glm-s", help="the bundle built when --bundle is not given")
    ap.add_argument("--workdir", default=".bench/serve", help="where benchmarks/agent_load.py keeps bundles")
    ap.add_argument("--limit-mb", type=int, default=650, help="the memory cgroup's limit, MiB")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=600)
    ap.add_argument("--modes", default="off,auto", help="comma-separated: off, auto, or a number of MiB")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else prepare(args.shape, Path(args.workdir))
    results = []
    for mode in args.modes.split(","):
        print(f"[kv_bound] {mode}: {args.requests} x ({args.prompt_tokens} + {args.max_tokens}) tokens under "
              f"{args.limit_mb} MiB", file=sys.stderr, flush=True)
        results.append(run_mode(bundle, mode.strip(), args))
    if args.json:
        print(json.dumps({"bundle": str(bundle), "limit_mb": args.limit_mb, "results": results}, indent=2))
        return 0
    print(f"bundle {bundle}, cgroup limit {args.limit_mb} MiB, {args.requests} requests of "
          f"{args.prompt_tokens} + {args.max_tokens} tokens at once")
    print(f"{'max_kv_mb':<10} {'answered':>9} {'peak MiB':>9} {'OOM kills':>9} {'wall s':>7} {'exit':>5}  bound")
    for r in results:
        print(f"{r['mode']:<10} {r['answered']:>4} of {r['requests']:<2} {r['cgroup_peak_mb']!s:>9} "
              f"{r['oom_kills']:>9} {r['wall_s']:>7} {r['exit_code']:>5}  "
              f"{r['auto_bound'] or ''}{'; ' if r['auto_bound'] else ''}{r['kv_waits_logged']} wait(s) logged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
