"""Soak test: the agent under a mixed load for a long time, sampled for anything that grows.

Run from the repository root (the factory extra installed: the tiny bundles are built here):

    python benchmarks/soak.py --minutes 10
    python benchmarks/soak.py --minutes 60 --sample-s 10 --workdir /tmp/soak --json > soak.json
    # isolating a growth: leave load kinds out, change the agent's environment, or profile it
    python benchmarks/soak.py --minutes 8 --skip ota,config --agent-env EDGEGLM_CACHE__MAX_MB=0
    python benchmarks/soak.py --minutes 8 --skip stream-completion,completion,chat,stream-chat,disconnect,\
        bad-request,mqtt-infer,config --ota-every-s 20                     # OTA updates/rollbacks alone
    python benchmarks/soak.py --minutes 15 --agent-env MALLOC_ARENA_MAX=2   # glibc malloc arenas capped
    python benchmarks/soak.py --agent-wrapper tracemalloc_edgeglm.py        # a script calling agent.cli.main

It starts the real pieces on loopback, as an operator does:

  * a Mosquitto broker on a free port (tests/broker.py, persistence on, as shipped);
  * `edgeglm fleet serve --broker ... --db fleet.db` (the controller: state, telemetry, chunk server);
  * `edgeglm agent --config agent.toml` with empty model slots, signature checks on, MQTT on;
    the first model comes over the air: `edgeglm fleet offer` of a signed tiny GLM bundle 1.0.0
    (built in seconds with the functions the tests use: models.tiny.make_checkpoint,
    models.export.export_bundle, tests/bundles.py `variant` to sign 1.0.0 and 1.1.0).

Then, for --minutes, one thread per kind of load, each in a loop with pauses:

  stream-completion, completion, chat, stream-chat   OpenAI-compatible HTTP requests (keep-alive
                                                     connections; prompts share a long prefix, so the
                                                     prefix cache fills, evicts and persists)
  disconnect       a streaming request whose client closes the socket after the first event
  bad-request      malformed JSON, out-of-range fields, unsupported options, unknown paths
  mqtt-infer       MQTT 5 inference requests (unique ids; every 5th one sent twice, every 10th malformed)
  scrape           GET /metrics and /healthz on a fresh connection each
  config           `edgeglm fleet config set` toggling sampling, batching, cache and telemetry settings
  ota              `edgeglm fleet offer` of a new version 1.k.0 (a bundle rolled back from is withdrawn on
                   the agent: offering it again is refused), then `edgeglm fleet rollback --to 1.0.0`, in turn

and every --sample-s seconds it reads, for the agent (and the broker and controller): RSS, VmHWM and
(agent) RssAnon/RssFile (/proc/PID/status), open file descriptors by kind (/proc/PID/fd), threads
(/proc/PID/task), the byte size and file count of each entry of the agent's state dir (slots a/b,
current, prefix-cache, autotune, update/probation/rollback/desired-config files), the size of each
log and of the controller's fleet.db, and the agent's own gauges from /metrics (prefix-cache bytes,
requests in flight and queued).

The report gives, per quantity, the value after the warm-up (--warmup-frac of the run, default 0.2),
at the end, end/warm-up, and the growth slope per hour from a least-squares line over the second half
of the run. Nothing passes or fails: a slope is a measurement of one run on one machine (note the load
of a shared machine), to be read against the load that ran (the request counts are printed too).
The work dir (bundles, broker, fleet database, agent state and log, samples.json) is kept.
"""

from __future__ import annotations

import http.client
from argparse import ArgumentTypeError
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _args import Parser, nonneg_float, positive_float  # noqa: E402
from procstats import cpu_model, proc_cpu_s, proc_status_kb, system_busy_s  # noqa: E402

HOST = "127.0.0.1"
FLEET, DEVICE = "soak", "box1"
LOAD_KINDS = ("stream-completion", "completion", "chat", "stream-chat", "disconnect", "bad-request", "scrape",
              "mqtt-infer", "config", "ota")
SYSTEM_PROMPT = ("You are a careful assistant on an edge box. Answer briefly, in plain words, and never "
                 "invent facts. The plant runs three lines; line two is down for maintenance until Friday. ") * 2


def edgeglm_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("edgeglm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- bundles ------------------------------------------------------------------------------------

def build_bundles(work: Path) -> dict:
    """A tiny int8 GLM bundle signed as 1.0.0 and 1.1.0 (the tests' signed_bundles fixture, untrained)."""
    from bundles import variant
    from models.export import ExportOptions, export_bundle
    from models.tiny import make_checkpoint
    from ota.signing import generate_keypair, load_private_key

    root = work / "bundles"
    if (root / "v2" / "manifest.sig").is_file():
        return {"keys": root / "keys", "key": root / "keys" / "fleet.key", "v1": root / "v1", "v2": root / "v2"}
    shutil.rmtree(root, ignore_errors=True)
    ckpt = make_checkpoint(root / "ckpt", "tiny", train_steps=30, seed=0)
    base = root / "int8"
    export_bundle(ckpt, base, ExportOptions(precision="int8", name="soak-tiny", version="1.0.0"), show_progress=False)
    pair = generate_keypair(root / "keys", "fleet")
    key = load_private_key(pair.private_path)
    v1 = variant(base, root / "v1", key, version="1.0.0")
    v2 = variant(base, root / "v2", key, version="1.1.0")
    return {"keys": root / "keys", "key": pair.private_path, "v1": v1, "v2": v2}


# --- /proc sampling -----------------------------------------------------------------------------

def fd_kinds(pid: int) -> Counter:
    kinds: Counter = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon:" + target[len("anon_inode:"):].strip("[]")] += 1
        elif target.startswith("/dev/"):
            kinds["dev"] += 1
        else:
            kinds["file"] += 1
    return kinds


def fd_targets(pid: int) -> Counter:
    """Open files by path (sockets and pipes by kind): for the diagnosis at the end."""
    out: Counter = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for n in names:
        try:
            t = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        out[re.sub(r"\[\d+\]", "", t) if t.startswith(("socket:", "pipe:")) else t] += 1
    return out


def thread_names(pid: int) -> Counter:
    out: Counter = Counter()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            out[Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()] += 1
        except OSError:
            pass
    return out


def tree_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under path (a file: itself)."""
    if path.is_file():
        try:
            return path.stat().st_size, 1
        except OSError:
            return 0, 0
    size = files = 0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            try:
                size += os.lstat(os.path.join(dirpath, f)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def proc_sample(pid: int, prefix: str) -> dict:
    kinds = fd_kinds(pid)
    try:
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        threads = 0
    out = {f"{prefix}.rss_mb": (proc_status_kb(pid, "VmRSS") or 0) / 1024,
           f"{prefix}.hwm_mb": (proc_status_kb(pid, "VmHWM") or 0) / 1024,
           f"{prefix}.fds": sum(kinds.values()), f"{prefix}.threads": threads,
           f"{prefix}.cpu_s": proc_cpu_s(pid)}
    if prefix == "agent":  # anonymous memory (heap, malloc arenas, KV) apart from mapped libraries and weights
        out["agent.rss_anon_mb"] = (proc_status_kb(pid, "RssAnon") or 0) / 1024
        out["agent.rss_file_mb"] = (proc_status_kb(pid, "RssFile") or 0) / 1024
        for k in ("socket", "pipe", "file", "dev"):
            out[f"agent.fds.{k}"] = kinds.get(k, 0)
        out["agent.fds.anon"] = sum(v for k, v in kinds.items() if k.startswith("anon:"))
    return out


class Sampler(threading.Thread):
    METRICS = ("edgeglm_prefix_cache_bytes", "edgeglm_inference_in_flight", "edgeglm_inference_queue_depth")

    def __init__(self, procs: dict[str, int], state_dir: Path, logs: dict[str, Path], every_s: float,
                 stop: threading.Event, http_port: int | None = None):
        super().__init__(name="sampler", daemon=True)
        self.http_port = http_port
        self.procs, self.state_dir, self.logs, self.every_s, self.stop = procs, state_dir, logs, every_s, stop
        self.samples: list[dict] = []
        self.names: list[dict] = []  # the agent's threads by name, per sample (for the diagnosis)
        self.t0 = time.monotonic()
        self.state_entries: set[str] = set()

    def sample(self) -> dict:
        s = {"t": time.monotonic() - self.t0}
        for name, pid in self.procs.items():
            s.update(proc_sample(pid, name))
        total_b = total_f = 0
        if self.state_dir.is_dir():
            for entry in sorted(self.state_dir.iterdir()):
                if entry.is_symlink():  # `current` -> a slot: that slot is counted under slots/ already
                    continue
                b, f = tree_usage(entry)
                total_b, total_f = total_b + b, total_f + f
                key = entry.name if entry.is_dir() else "(top-level files)"
                s[f"state/{key}.kb"] = s.get(f"state/{key}.kb", 0) + b / 1024
                s[f"state/{key}.files"] = s.get(f"state/{key}.files", 0) + f
        s["state.total_kb"], s["state.total_files"] = total_b / 1024, total_f
        for name, path in self.logs.items():  # logs, and the controller's database (with its WAL)
            size = 0
            for f in (path, path.with_name(path.name + "-wal")):
                try:
                    size += f.stat().st_size
                except OSError:
                    pass
            s[f"{name}_kb" if name.endswith(".db") else f"{name}.log_kb"] = size / 1024
        if self.http_port is not None:  # what the agent says it holds: the prefix cache's KV bytes above all
            try:
                _, body = http_get(self.http_port, "/metrics")
                for line in body.decode().splitlines():
                    name, _, value = line.partition(" ")
                    if name in self.METRICS:
                        s["metric." + name.removeprefix("edgeglm_") + (".mb" if name.endswith("_bytes") else "")] = \
                            float(value) / (1 << 20 if name.endswith("_bytes") else 1)
            except (OSError, http.client.HTTPException, ValueError):
                pass
        s["machine.busy_s"] = system_busy_s()
        return s

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            self.names.append(dict(thread_names(self.procs["agent"])))
            if self.stop.wait(self.every_s):
                return


# --- the pieces ---------------------------------------------------------------------------------

class Proc:
    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})), start_new_session=True)
        self.pid = self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def run_cli(args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    r = subprocess.run(edgeglm_cmd() + args, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    return r.returncode, (r.stdout + r.stderr).strip()


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(pred, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:  # noqa: BLE001
            v = None
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class Fleet:
    """The operator's view: the fleet database (read-only) and the `edgeglm fleet` commands."""

    def __init__(self, broker_port: int, db: Path, key: Path):
        self.broker, self.db, self.key = f"{HOST}:{broker_port}", db, key

    def device(self) -> dict | None:
        from fleet.store import Store

        if not self.db.is_file():
            return None
        store = Store(self.db)
        try:
            return next((d for d in store.devices(FLEET) if d["device"] == DEVICE), None)
        finally:
            store.close()

    def last_result(self) -> dict | None:
        from fleet.store import Store

        store = Store(self.db)
        try:
            return store.last_results(FLEET).get((FLEET, DEVICE))
        finally:
            store.close()

    def cli(self, *args: str) -> tuple[int, str]:
        return run_cli(["fleet", *args, "--broker", self.broker, "--db", str(self.db)])


# --- load ---------------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.counts[(kind, outcome)] += 1


def _prompt(rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "delta", "line", "pump", "valve", "sensor", "reading", "status"]
    return SYSTEM_PROMPT + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))


def _sse(resp) -> tuple[int, str | None]:
    """Read a stream to [DONE]: (events, error message or None)."""
    events = 0
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        events += 1
        if b'"error"' in payload[:20]:
            resp.read()
            return events, payload.decode(errors="replace")[:200]
    resp.read()
    return events, None


class HttpLoad:
    def __init__(self, port: int, stats: Stats, stop: threading.Event):
        self.port, self.stats, self.stop = port, stats, stop

    def _conn(self):
        return http.client.HTTPConnection(HOST, self.port, timeout=60)

    def openai_loop(self, kind: str, pause_s: float, seed: int) -> None:
        rng = random.Random(seed)
        conn = self._conn()
        chat, stream = "chat" in kind, kind.startswith("stream")
        while not self.stop.is_set():
            max_tokens = rng.randint(4, 40)
            if chat:
                body = {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": _prompt(rng)[len(SYSTEM_PROMPT):]}],
                        "max_tokens": max_tokens}
                path = "/v1/chat/completions"
            else:
                body, path = {"prompt": _prompt(rng), "max_tokens": max_tokens}, "/v1/completions"
            if rng.random() < 0.5:
                body.update(temperature=0.8, seed=rng.randint(0, 1000), top_k=rng.choice([0, 20]))
            if rng.random() < 0.2:
                body["stop"] = ["\n\n"]
            if stream:
                body.update(stream=True, stream_options={"include_usage": rng.random() < 0.5})
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    self.stats.add(kind, str(resp.status))
                elif stream:
                    _, err = _sse(resp)
                    self.stats.add(kind, "stream-error" if err else "ok")
                else:
                    json.loads(resp.read())
                    self.stats.add(kind, "ok")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.stats.add(kind, type(exc).__name__)
                conn.close()
                conn = self._conn()
            self.stop.wait(pause_s * rng.uniform(0.5, 1.5))
        conn.close()

    def disconnect_loop(self, pause_s: float) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            chat = rng.random() < 0.5
            body = {"max_tokens": 200, "stream": True, "temperature": 0.7, "seed": rng.randint(0, 99)}
            if chat:
                body["messages"] = [{"role": "user", "content": _prompt(rng)}]
            else:
                body["prompt"] = _prompt(rng)
            sock = socket.create_connection((HOST, self.port), timeout=30)
            try:
                data = json.dumps(body).encode()
                path = "/v1/chat/completions" if chat else "/v1/completions"
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                got = b""
                while b"data: " not in got:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                self.stats.add("disconnect", "cut" if b"data: " in got else "no-event")
            except OSError as exc:
                self.stats.add("disconnect", type(exc).__name__)
            finally:
                if rng.random() < 0.5:  # half reset (RST), half closed (FIN)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
            self.stop.wait(pause_s * rng.uniform(0.5, 1.5))

    BAD = [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": 500}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "model": "no-such-model"}).encode()),
        ("/v1/completions", json.dumps({"prompt": list(range(100000))}).encode()),  # beyond the context window
        ("/v1/nothing", b"{}"),
        ("/v1/completions", b"[1, 2]"),
    ]

    def bad_loop(self, pause_s: float) -> None:
        rng = random.Random(3)
        conn = self._conn()
        while not self.stop.is_set():
            path, data = rng.choice(self.BAD)
            try:
                conn.request("POST", path, data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.stats.add("bad-request", str(resp.status))
                if resp.will_close:
                    conn.close()
                    conn = self._conn()
            except (OSError, http.client.HTTPException) as exc:
                self.stats.add("bad-request", type(exc).__name__)
                conn.close()
                conn = self._conn()
            self.stop.wait(pause_s * rng.uniform(0.5, 1.5))
        conn.close()

    def scrape_loop(self, pause_s: float) -> None:
        i = 0
        while not self.stop.is_set():
            path = ("/metrics", "/healthz", "/readyz", "/v1/models")[i % 4]
            i += 1
            try:
                status, _ = http_get(self.port, path)
                self.stats.add("scrape", str(status))
            except (OSError, http.client.HTTPException) as exc:
                self.stats.add("scrape", type(exc).__name__)
            self.stop.wait(pause_s)


class MqttLoad:
    """MQTT 5 inference requests with a response topic and correlation data, as docs/mqtt.md describes."""

    def __init__(self, broker_port: int, stats: Stats, stop: threading.Event):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.topics import infer_request_topic, infer_response_topic

        self.stats, self.stop = stats, stop
        self.request_topic = infer_request_topic(FLEET, DEVICE)
        self.response_topic = infer_response_topic(FLEET, DEVICE, "soak")
        self.pending: dict[str, float] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"soak-requester-{os.getpid()}",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(self.response_topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(HOST, broker_port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            self.stats.add("mqtt-infer", "unparsable-answer")
            return
        with self.lock:
            self.pending.pop(data.get("id"), None)
        self.stats.add("mqtt-infer", "answer-error:" + data["error"]["code"] if data.get("error") else "answer-ok")

    def _publish(self, payload: bytes, rid: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = self.response_topic, rid.encode()
        self.client.publish(self.request_topic, payload, qos=1, properties=props)

    def loop(self, pause_s: float) -> None:
        rng = random.Random(11)
        n = 0
        while not self.stop.is_set():
            n += 1
            rid = f"soak-{n}-{uuid.uuid4().hex[:8]}"
            if n % 10 == 0:
                payload = json.dumps({"id": rid, "prompt": "x", "max_tokens": "many"}).encode()  # malformed
                self.stats.add("mqtt-infer", "sent-malformed")
            else:
                req = {"id": rid, "reply_to": self.response_topic, "max_tokens": rng.randint(4, 24)}
                if n % 3 == 0:
                    req["messages"] = [{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": "status of line two?"}]
                else:
                    req["prompt"] = _prompt(rng)
                payload = json.dumps(req).encode()
                self.stats.add("mqtt-infer", "sent")
            with self.lock:
                self.pending[rid] = time.monotonic()
            self._publish(payload, rid)
            if n % 5 == 0:  # a second copy: answered once (or the same answer again), not generated twice
                self.stop.wait(0.5)
                self._publish(payload, rid)
                self.stats.add("mqtt-infer", "sent-copy")
            self.stop.wait(pause_s * rng.uniform(0.5, 1.5))

    def close(self) -> int:
        self.client.disconnect()
        self.client.loop_stop()
        with self.lock:
            now = time.monotonic()
            return sum(1 for t in self.pending.values() if now - t > 30)


CONFIG_STEPS = [
    ["sampling.top_k=40", "sampling.temperature=0.7"],
    ["cache.max_mb=16", "batching.max_batch=4"],
    ["sampling.top_k=0", "sampling.temperature=0", "cache.block_tokens=16"],
    ["cache.max_mb=0"],                                   # the prefix cache off (emptied)
    ["cache.max_mb=64", "cache.block_tokens=32", "batching.max_batch=8", "batching.window_ms=5"],
    ["telemetry.interval_s=2", "sampling.max_tokens=64"],
    ["cache.persist=false"],
    ["cache.persist=true", "telemetry.interval_s=5", "batching.window_ms=0", "sampling.max_tokens=256"],
]


def config_loop(fleet: Fleet, stats: Stats, stop: threading.Event, pause_s: float) -> None:
    i = 0
    while not stop.wait(pause_s):
        rc, out = fleet.cli("config", "set", "--fleet", FLEET, "--device", DEVICE, *CONFIG_STEPS[i % len(CONFIG_STEPS)])
        stats.add("config", "published" if rc == 0 else f"exit-{rc}")
        if rc != 0:
            log(f"config set failed: {out[-300:]}")
        i += 1


def ota_loop(fleet: Fleet, bundles: dict, stats: Stats, stop: threading.Event, pause_s: float,
             timeout_s: float) -> None:
    """Offer a new version 1.k.0, wait for its result; roll back to 1.0.0 (signed statement), wait; and again.
    A new version each round: a bundle rolled back from is withdrawn on the agent, which refuses a plain offer of
    it again (docs/ota.md), so offering 1.1.0 every round measured one update and then only refusals."""
    from bundles import variant
    from ota.signing import load_private_key

    up, k, key = True, 1, load_private_key(bundles["key"])
    made: list[Path] = []
    while not stop.wait(pause_s):
        before = (fleet.last_result() or {}).get("update_id")
        if up:
            k += 1
            dst = bundles["v2"].parent / f"soak-1.{k}.0"
            shutil.rmtree(dst, ignore_errors=True)  # left by an earlier run
            bundle = variant(bundles["v2"], dst, key, version=f"1.{k}.0")
            made.append(bundle)
            while len(made) > 2:  # the one being downloaded and the one before it (a chunk answered late)
                shutil.rmtree(made.pop(0), ignore_errors=True)
            rc, out = fleet.cli("offer", "--fleet", FLEET, "--device", DEVICE, "--bundle", str(bundle))
            kind = "update"
        else:
            rc, out = fleet.cli("rollback", "--group", FLEET, "--key", str(bundles["key"]), "--to", "1.0.0")
            kind = "rollback"
        if rc != 0:
            stats.add("ota", f"{kind}-exit-{rc}")
            log(f"fleet {kind} failed: {out[-300:]}")
            continue
        try:
            res = wait_until(lambda: (lambda r: r if r and r.get("update_id") != before and r.get("result")
                                      else None)(fleet.last_result()), timeout_s, f"the {kind}'s result")
            stats.add("ota", f"{kind}-{res['result']}")
            if res["result"] != "committed":
                log(f"{kind} {res.get('update_id')}: {res['result']}: {res.get('reason')}")
            else:
                up = not up
        except TimeoutError as exc:
            stats.add("ota", f"{kind}-timeout")
            log(str(exc))


# --- analysis -----------------------------------------------------------------------------------

def warmup_index(samples: list[dict], warmup_frac: float) -> int:
    """The sample taken as 'after warm-up': the first at or after warmup_frac of the run (the report's
    "after warm-up at t=..." line, the table's column and the thread diagnosis all use this one)."""
    t = [s["t"] for s in samples]
    return min(len(t) - 1, int(np.searchsorted(t, t[-1] * warmup_frac)))


def summarize(samples: list[dict], warmup_frac: float) -> list[dict]:
    t = np.array([s["t"] for s in samples])
    end_t = t[-1]
    warm_i = warmup_index(samples, warmup_frac)
    half = t >= end_t / 2
    keys = []
    for s in samples:
        for k in s:
            if k not in keys and k not in ("t", "machine.busy_s") and not k.endswith(".cpu_s"):
                keys.append(k)
    rows = []
    for k in keys:
        v = np.array([s.get(k, 0.0) for s in samples], dtype=float)
        th, vh = t[half], v[half]
        slope = float(np.polyfit(th, vh, 1)[0]) * 3600 if len(th) >= 3 and np.ptp(th) > 0 else float("nan")
        w, e = float(v[warm_i]), float(v[-1])
        rows.append({"quantity": k, "after_warmup": w, "end": e, "min": float(v.min()), "max": float(v.max()),
                     "ratio": e / w if w else float("nan"), "slope_per_h": slope})
    return rows


def fmt(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_report(rep: dict) -> None:
    m = rep["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; load average {m['loadavg_before'][0]:.2f} before, "
          f"{m['loadavg_after'][0]:.2f} after; machine busy {m['busy_cores']:.2f} cores on average, of which "
          f"the agent {m['agent_cores']:.2f}")
    s = rep["settings"]
    print(f"run: {s['minutes']:g} min, sampled every {s['sample_s']:g} s ({s['samples']} samples); warm-up = first "
          f"{s['warmup_frac']:.0%}, value 'after warm-up' at t={s['warmup_t']:.0f} s; slope: least squares over "
          f"t >= {s['half_t']:.0f} s, per hour")
    print(f"agent: {s['agent_command']}  (pid {s['agent_pid']}, state dir {s['state_dir']})"
          + (f"; environment {' '.join(s['agent_env'])}" if s["agent_env"] else "")
          + (f"; load kinds left out: {s['skip']}" if s["skip"] else "") + "\n")
    head = ("quantity", "after warm-up", "end", "end/warm-up", "min", "max", "slope /h")
    rows = [(r["quantity"], fmt(r["after_warmup"]), fmt(r["end"]), fmt(r["ratio"]), fmt(r["min"]), fmt(r["max"]),
             ("+" if r["slope_per_h"] > 0 else "") + fmt(r["slope_per_h"])) for r in rep["quantities"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    print("\nload (kind: outcome count):")
    by_kind: dict[str, list[str]] = {}
    for key, n in sorted(rep["load"].items()):
        kind, outcome = key.split(" ", 1)
        by_kind.setdefault(kind, []).append(f"{outcome} {n}")
    for kind, parts in by_kind.items():
        print(f"  {kind}: {', '.join(parts)}")
    d = rep["diagnosis"]
    print(f"\nagent threads by name, after warm-up -> end: {d['threads_warm']} -> {d['threads_end']}")
    print(f"agent open files at the end: {d['fds_end']}")
    print(f"agent exit code {rep['exit']['agent']}, controller {rep['exit']['controller']}; MQTT requests unanswered "
          f"after 30 s: {rep['exit']['mqtt_unanswered']}")


# --- main ---------------------------------------------------------------------------------------

def soak(args) -> dict:
    from broker import Mosquitto, free_port

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgeglm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}")
    t_build = time.monotonic()
    bundles = build_bundles(work)
    log(f"bundles ready in {time.monotonic() - t_build:.0f} s: {bundles['v1']}, {bundles['v2']}")

    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-", dir=work))
    db = run_dir / "fleet.db"
    state_dir = run_dir / "state"
    # --agent-wrapper: a Python script that runs `edgeglm` itself (agent.cli.main) under a profiler, e.g. tracemalloc
    agent_cmd = ([sys.executable, args.agent_wrapper] if args.agent_wrapper else edgeglm_cmd()) + \
        ["agent", "--config", str(run_dir / "agent.toml")]
    env = dict(e.split("=", 1) for e in args.agent_env)  # checked in main(): each is K=V
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}  # checked in main(): known kinds
    stop = threading.Event()
    stats = Stats()
    threads: list[threading.Thread] = []
    sampler = mqtt = broker = ctl = agent = None
    load_before = os.getloadavg()
    try:  # every piece started in here is stopped in the finally, whatever fails
        broker = Mosquitto(run_dir / "mosquitto").start()
        log(f"mosquitto on {broker.host}:{broker.port}")
        fleet = Fleet(broker.port, db, bundles["key"])
        ctl = Proc("controller", edgeglm_cmd() + ["fleet", "serve", "--broker", f"{HOST}:{broker.port}", "--db",
                                                  str(db), "--http-port", "0"], run_dir / "controller.log")
        http_port = free_port()
        cfg = run_dir / "agent.toml"
        cfg.write_text(f"""
[device]
id = "{DEVICE}"
fleet = "{FLEET}"

[model]
slots_dir = "{state_dir}"

[http]
port = {http_port}

[telemetry]
interval_s = 5.0

[mqtt]
enabled = true
port = {broker.port}

[ota]
trusted_keys = "{bundles['keys']}"
max_latency_ratio = 100.0  # a shared 2-core box: the self-test's latency budget is not what is soaked here
""")
        agent = Proc("agent", agent_cmd, run_dir / "agent.log", env)
        log(f"agent pid {agent.pid}: {' '.join(agent_cmd)}")
        wait_until(lambda: agent.proc.poll() is None and http_get(http_port, "/healthz")[0] == 200, 120,
                   "the agent's /healthz")
        wait_until(lambda: fleet.device(), 60, "the agent's state in the fleet database")
        rc, out = fleet.cli("offer", "--fleet", FLEET, "--device", DEVICE, "--bundle", str(bundles["v1"]))
        if rc != 0:
            raise RuntimeError(f"fleet offer failed: {out}")
        res = wait_until(lambda: (lambda r: r if r and r.get("result") else None)(fleet.last_result()), 300,
                         "the first install's result")
        if res["result"] != "committed":
            raise RuntimeError(f"the first install did not commit: {res}")
        wait_until(lambda: http_get(http_port, "/readyz")[0] == 200, 120, "/readyz")
        log("1.0.0 installed over the air and serving; load starts")

        sampler = Sampler({"agent": agent.pid, "broker": broker._proc.pid, "controller": ctl.pid}, state_dir,
                          {"agent": agent.log_path, "controller": ctl.log_path, "broker": broker.log,
                           "controller.fleet.db": db},
                          args.sample_s, stop, http_port)
        t_start = time.monotonic()
        sampler.start()
        busy0, agent_cpu0 = system_busy_s(), proc_cpu_s(agent.pid)
        h = HttpLoad(http_port, stats, stop)
        mqtt = MqttLoad(broker.port, stats, stop)
        p = args.pause_scale
        jobs = [(h.openai_loop, ("stream-completion", 0.3 * p, 1)), (h.openai_loop, ("completion", 0.5 * p, 2)),
                (h.openai_loop, ("chat", 0.7 * p, 4)), (h.openai_loop, ("stream-chat", 0.5 * p, 5)),
                (h.disconnect_loop, (1.0 * p,)), (h.bad_loop, (0.5 * p,)), (h.scrape_loop, (1.0 * p,)),
                (mqtt.loop, (0.7 * p,)), (config_loop, (fleet, stats, stop, args.config_every_s))]
        if args.ota_every_s > 0:
            jobs.append((ota_loop, (fleet, bundles, stats, stop, args.ota_every_s, 300.0)))
        jobs = [j for name, j in zip(LOAD_KINDS, jobs) if name not in skip]
        for fn, a in jobs:
            threads.append(threading.Thread(target=fn, args=a, daemon=True))
            threads[-1].start()
        deadline = t_start + args.minutes * 60
        last = 0.0
        while time.monotonic() < deadline:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"the agent exited with code {agent.proc.returncode}; see {agent.log_path}")
            time.sleep(1.0)
            if time.monotonic() - last >= 60:
                last = time.monotonic()
                s = sampler.samples[-1]
                log(f"t={s['t']:.0f}s agent rss {s['agent.rss_mb']:.0f} MB, fds {s['agent.fds']}, threads "
                    f"{s['agent.threads']}, state {s['state.total_files']} files / {s['state.total_kb']:.0f} KiB, "
                    f"requests {sum(n for (k, o), n in stats.counts.items() if o in ('ok', 'answer-ok'))}")
        elapsed = time.monotonic() - t_start
        busy = (system_busy_s() - busy0) / elapsed
        agent_cores = (proc_cpu_s(agent.pid) - agent_cpu0) / elapsed
        threads_end, fds_end = thread_names(agent.pid), fd_targets(agent.pid)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
        if sampler is not None:
            sampler.join(timeout=30)
        unanswered = mqtt.close() if mqtt else None
        rc_agent = agent.stop() if agent else None
        rc_ctl = ctl.stop() if ctl else None
        if broker is not None:
            broker.stop()
    samples = sampler.samples
    warm_i = warmup_index(samples, args.warmup_frac)  # the same sample as summarize()'s "after warm-up"
    warm_sample = samples[warm_i]
    rep = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "busy_cores": busy, "agent_cores": agent_cores},
        "settings": {"minutes": args.minutes, "sample_s": args.sample_s, "samples": len(samples),
                     "warmup_frac": args.warmup_frac, "warmup_t": warm_sample["t"], "half_t": samples[-1]["t"] / 2,
                     "agent_command": " ".join(agent_cmd), "skip": args.skip, "agent_env": args.agent_env,
                     "agent_pid": agent.pid, "state_dir": str(state_dir),
                     "work_dir": str(run_dir)},
        "quantities": summarize(samples, args.warmup_frac),
        "load": {f"{k} {o}": n for (k, o), n in sorted(stats.counts.items())},
        "diagnosis": {"threads_warm": sampler.names[warm_i], "threads_end": dict(threads_end),
                      "fds_end": dict(fds_end.most_common(12))},
        "exit": {"agent": rc_agent, "controller": rc_ctl, "mqtt_unanswered": unanswered},
        "samples": samples,
    }
    (run_dir / "samples.json").write_text(json.dumps(rep, indent=1))
    log(f"samples and report: {run_dir / 'samples.json'}")
    return rep


def warmup_fraction(text: str) -> float:
    """A share of the run: a number >= 0 and < 1."""
    value = nonneg_float(text)
    if value >= 1:
        raise ArgumentTypeError(f"{text} is invalid: must be a number >= 0 and < 1")
    return value


def main(argv=None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=positive_float, default=10.0,
                    help="how long the load runs (after the first install)")
    ap.add_argument("--sample-s", type=positive_float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup-frac", type=warmup_fraction, default=0.2, help="share of the run taken as warm-up")
    ap.add_argument("--pause-scale", type=positive_float, default=1.0, help="multiplies every load loop's pause")
    ap.add_argument("--config-every-s", type=positive_float, default=20.0,
                    help="seconds between desired-config changes")
    ap.add_argument("--ota-every-s", type=nonneg_float, default=90.0,
                    help="seconds between OTA steps (update to 1.1.0, rollback to 1.0.0, ...); 0: none")
    ap.add_argument("--skip", default="", help="comma-separated load kinds left out (to isolate a growth): "
                    f"{', '.join(LOAD_KINDS)}")
    ap.add_argument("--agent-env", action="append", default=[], metavar="EDGEGLM_X__Y=V",
                    help="environment of the agent (its config over agent.toml), e.g. EDGEGLM_CACHE__MAX_MB=0")
    ap.add_argument("--agent-wrapper", metavar="SCRIPT", help="run the agent as `python SCRIPT agent --config ...` "
                    "(a script that calls agent.cli.main under a profiler) instead of `edgeglm agent --config ...`")
    ap.add_argument("--workdir", help="bundles are built (once) and each run's files kept here "
                                      "(default: a new mktemp -d directory)")
    ap.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = ap.parse_args(argv)
    for e in args.agent_env:  # checked before anything starts
        name, eq, _ = e.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            ap.error(f"--agent-env {e} is invalid: must be NAME=VALUE (NAME an environment variable name), "
                     "e.g. EDGEGLM_CACHE__MAX_MB=0")
    unknown = sorted({k.strip() for k in args.skip.split(",") if k.strip()} - set(LOAD_KINDS))
    if unknown:
        ap.error(f"--skip {args.skip} is invalid: unknown kind(s) {', '.join(unknown)}; "
                 f"allowed: {', '.join(LOAD_KINDS)}")
    if args.agent_wrapper and not Path(args.agent_wrapper).is_file():
        ap.error(f"--agent-wrapper {args.agent_wrapper} is invalid: no such script")
    rep = soak(args)
    if args.json:
        json.dump({k: v for k, v in rep.items() if k != "samples"}, sys.stdout, indent=2)
        print()
    else:
        print_report(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
