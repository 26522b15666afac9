"""OTA transfer over MQTT: chunk request/response throughput against plain mosquitto_pub/mosquitto_sub.

Run from the repository root (Mosquitto and mosquitto-clients installed):

    python benchmarks/ota_transfer.py                          # 100 MB, 1 and 20 agents, 256 KiB chunks
    python benchmarks/ota_transfer.py --mb 20 --agents 1,5 --repeats 3 --json > ota.json

One run starts a Mosquitto on a free loopback port (tests/broker.py, plus `log_type subscribe`
to know when subscribers are in place and `max_queued_messages 0` so that the push comparison
below cannot lose messages), writes a file of --mb MB (10^6 bytes) of random bytes (cached in
--workdir), and starts max(--agents) fetcher processes. Then it makes --repeats passes; in each,
for each agent count N, three candidates run one after the other (their order rotates between
passes):

  * edgeglm: the agent's transfer path. A chunk server in this process (a paho MQTT 5 client
    answering `ota/chunk/request` with `ota.transfer.ChunkSource`, exactly like the controller
    in tests/agent/test_daemon.py: base64 in JSON, correlation data copied) and N fetcher
    processes, each with its own `agent.mqtt.MqttSession` (as the agent has) pulling every chunk
    in order through `ota.transfer.MqttChunkFetcher` (on a stand-in offer that carries only the
    update id) and checking each chunk's sha256, one request in flight per agent, as the
    agent's updater does (the session sets TCP_NODELAY on its socket after each connect, as the
    agent's does). The updater's disk writes and fsyncs are not part of this;
  * edgeglm, Nagle on: the same with TCP_NODELAY cleared on each fetcher's socket for the run
    (paho's default, and the agent's before it set the option): what that one socket option
    changes. The chunk server's socket is left as it is;
  * mosquitto whole: one `mosquitto_pub -q 1 -f FILE` message of the whole file, N
    `mosquitto_sub -q 1 -C 1 -N` subscribers, each piped into a process that checks the sha256;
  * mosquitto chunked: the same chunks pushed (no request/response) as base64 lines by one
    `mosquitto_pub -q 1 -l` (binary chunks cannot go through -l, and one mosquitto_pub process
    per chunk would measure process start-up), N `mosquitto_sub -C CHUNKS` subscribers, each piped
    into a process that decodes the lines and checks the sha256.

Per candidate: MB/s per agent (file MB / time from the start signal to that agent's last
verified byte), in total (N x file MB / time to the last agent), the broker's peak RSS (VmHWM,
reset before each candidate through /proc/PID/clear_refs when allowed), the CPU used by the
broker, the chunk server, the fetchers / mosquitto clients, and by processes outside the
benchmark ("foreign CPU", the noise indicator), all in cores (CPU seconds per second). Tables
report medians over the passes; nothing asserts on them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from _args import Parser, int_list, positive_float, positive_int  # noqa: E402
from procstats import cpu_model, proc_cpu_s, proc_status_kb, reset_peak_rss, system_busy_s  # noqa: E402

HOST = "127.0.0.1"
FLEET = "bench"
UPDATE_ID = "bench-update"
BLOB = "model.bin"
MQTT_MAX_PAYLOAD = 268_435_455 - 1024  # MQTT's largest packet, less the headers
NAGLE = "edgeglm, Nagle on"


# --- /proc helpers ------------------------------------------------------------------------------

def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


# --- the payload --------------------------------------------------------------------------------

def make_payload(workdir: Path, mb: float, chunk_size: int) -> dict:
    """The random file (kept between runs), its chunk hashes and its base64-lines twin."""
    root = workdir / f"payload-{mb:g}MB"
    blob = root / BLOB
    size = int(mb * 1_000_000)
    if not blob.is_file() or blob.stat().st_size != size:
        print(f"writing {size} random bytes to {blob}", file=sys.stderr)
        root.mkdir(parents=True, exist_ok=True)
        with open(blob, "wb") as f:
            left = size
            while left:
                f.write(os.urandom(min(left, 1 << 24)))
                left -= min(left, 1 << 24)
    whole, chunks = hashlib.sha256(), []
    lines = workdir / f"lines-{mb:g}MB-{chunk_size}.b64"
    write_lines = not lines.is_file()
    with open(blob, "rb") as f, (open(lines, "wb") if write_lines else open(os.devnull, "wb")) as out:
        while data := f.read(chunk_size):
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
            out.write(base64.b64encode(data) + b"\n")
    spec = workdir / f"chunks-{mb:g}MB-{chunk_size}.json"
    spec.write_text(json.dumps({"update_id": UPDATE_ID, "path": BLOB, "chunk_size": chunk_size, "chunks": chunks}))
    payload_manifest(root, chunk_size, whole.hexdigest())
    return {"root": root, "blob": blob, "size": size, "sha256": whole.hexdigest(), "chunks": len(chunks),
            "spec": spec, "lines": lines}


def payload_manifest(root: Path, chunk_size: int, sha256: str) -> None:
    """A manifest listing the payload at `chunk_size` (the controller's chunk server serves a bundle's files at its
    manifest's chunk size only): a stand-in model, never loaded, signed by nobody."""
    from ota.bundle import MANIFEST, read_manifest, write_manifest

    try:
        manifest = read_manifest(root).manifest
        if manifest.chunk_size == chunk_size and [f.sha256 for f in manifest.files] == [sha256]:
            return
    except Exception:  # noqa: BLE001: none yet, or another run's: written anew
        pass
    (root / MANIFEST).unlink(missing_ok=True)
    arch = {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 16,
            "max_position_embeddings": 16}
    golden = {"prompt_ids": [1], "reference": {"tokens": [1], "margins": [1.0]}, "backends": {}, "tolerance": 0.0}
    write_manifest(root, {"name": "ota-transfer-payload", "version": "1.0.0", "min_agent_version": "0.0.0",
                          "architecture": arch, "precision": "fp32", "golden": golden,
                          "backends": {"onnxruntime": {"entry": BLOB, "weights": "fp32", "scheme": "payload"}}},
                   chunk_size)


# --- broker -------------------------------------------------------------------------------------

def bench_broker(workdir: Path):
    from broker import Mosquitto

    class BenchMosquitto(Mosquitto):
        def _write_conf(self) -> None:
            super()._write_conf()
            with open(self.conf, "a") as f:
                f.write("log_type subscribe\nmax_queued_messages 0\n")

        @property
        def pid(self) -> int:
            return self._proc.pid

        def wait_subscribed(self, client_ids: list[str], topic: str, timeout: float = 30.0) -> None:
            deadline = time.monotonic() + timeout
            want = {f" {cid} 1 {topic}" for cid in client_ids}
            while time.monotonic() < deadline:
                text = self.log.read_text(errors="replace")
                if all(w in text for w in want):
                    return
                time.sleep(0.02)
            raise TimeoutError(f"not every subscriber subscribed to {topic} within {timeout:.0f} s")

    return BenchMosquitto(workdir)


def set_nodelay(client, on: bool) -> None:
    """TCP_NODELAY on a connected paho client's socket (paho leaves Nagle's algorithm on; agent.mqtt turns it off
    after each connect)."""
    import socket

    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))


# --- the controller's chunk server (in this process) --------------------------------------------

class ChunkServer:
    """A paho MQTT 5 client answering chunk requests like the controller of tests/agent/test_daemon.py."""

    def __init__(self, port: int, bundle_dir: Path):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.topics import chunk_request_topic
        from ota.transfer import ChunkSource

        self.source = ChunkSource()
        self.source.add(UPDATE_ID, bundle_dir)
        self.bytes_out = self.served = 0
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-controller", protocol=paho.MQTTv5)
        self.client.on_message = self.on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(HOST, port)
        self.client.loop_start()
        self.client.subscribe(chunk_request_topic(FLEET, "x").replace("/x/", "/+/"), qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the chunk server's subscription was not acknowledged")

    def on_message(self, client, userdata, msg) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from ota.transfer import ChunkRequest

        req = ChunkRequest.model_validate_json(msg.payload)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        topic = getattr(msg.properties, "ResponseTopic", None) or req.reply_to
        payload = self.source.serve(req).model_dump_json()
        self.bytes_out += len(payload)
        self.served += 1
        client.publish(topic, payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- fetcher processes (one per agent) ----------------------------------------------------------

def fetch_main(port: str, device: str, spec_path: str) -> int:
    """`--fetch PORT DEVICE SPEC`: one agent's MQTT session; a JSON line on stdin starts a full transfer."""
    from agent import __version__
    from agent.mqtt import MqttSession, MqttSettings
    from agent.topics import ReportedState, chunk_request_topic, chunk_response_topic
    from ota.transfer import MqttChunkFetcher

    spec = json.loads(Path(spec_path).read_text())
    settings = MqttSettings(enabled=True, host=HOST, port=int(port), client_id=f"bench-{device}")
    session = MqttSession(settings, fleet=FLEET, device=device, state_fn=lambda: ReportedState(
        device=device, online=True, agent_version=__version__, uptime_s=0.0, ts=time.time()))
    session.start()
    if not session.wait_connected(60):
        print(json.dumps({"error": "not connected"}), flush=True)
        return 1
    fetcher = MqttChunkFetcher(lambda req: session.request(chunk_request_topic(FLEET, device), req,
                                                           response_topic=chunk_response_topic(FLEET, device)),
                               timeout_s=60.0, give_up_s=600.0)
    offer = SimpleNamespace(update_id=spec["update_id"])  # all that read_chunk reads of an Offer
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        set_nodelay(session._client, json.loads(line)["nodelay"])
        reset_peak_rss("self")
        start, cpu0 = time.time(), time.process_time()
        size = bad = 0
        for i, want in enumerate(spec["chunks"]):
            data = fetcher.read_chunk(offer, spec["path"], i, spec["chunk_size"])
            bad += hashlib.sha256(data).hexdigest() != want
            size += len(data)
        print(json.dumps({"start": start, "end": time.time(), "bytes": size, "bad_chunks": bad,
                          "cpu": time.process_time() - cpu0,
                          "peak_rss_mb": (proc_status_kb(os.getpid(), "VmHWM") or 0) / 1024}), flush=True)
    logging.disable(logging.ERROR)  # paho logs "not connected" from its loop thread after a clean disconnect
    session.close()
    return 0


class Fetcher:
    def __init__(self, port: int, device: str, spec: Path):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--fetch", str(port), device,
                                      str(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(ROOT))

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a fetcher exited with code {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"a fetcher failed: {out['error']}")
        return out

    def go(self, nodelay: bool) -> None:
        self.proc.stdin.write(json.dumps({"nodelay": nodelay}) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- mosquitto_sub consumers ----------------------------------------------------------------------

def consume_main(mode: str, sha256: str) -> int:
    """`--consume whole|lines SHA256`: hash what mosquitto_sub writes to our stdin (lines: base64 each)."""
    startup_cpu = time.process_time()
    print(json.dumps({"ready": True}), flush=True)
    h, size = hashlib.sha256(), 0
    stdin = sys.stdin.buffer
    if mode == "whole":
        while data := stdin.read(1 << 20):
            h.update(data)
            size += len(data)
    else:
        for line in stdin:
            data = base64.b64decode(line.strip())
            h.update(data)
            size += len(data)
    print(json.dumps({"end": time.time(), "bytes": size, "ok": h.hexdigest() == sha256,
                      "cpu": time.process_time() - startup_cpu, "startup_cpu": startup_cpu}), flush=True)
    return 0


# --- candidates ---------------------------------------------------------------------------------

class Watch:
    """CPU of the broker, this process, given pids, and everything else, over one candidate."""

    def __init__(self, broker_pid: int, pids: list[int]):
        self.broker_pid, self.pids = broker_pid, pids
        self.peak_reset = reset_peak_rss(broker_pid)
        self.t0 = time.time()
        self.busy0, self.broker0 = system_busy_s(), proc_cpu_s(broker_pid)
        self.self0, self.pids0, self.children0 = time.process_time(), sum(proc_cpu_s(p) for p in pids), children_cpu_s()

    def stop(self, t_end: float, extra_own_cpu: float = 0.0) -> dict:
        """`extra_own_cpu`: CPU of reaped children that was spent before the window (to leave out)."""
        dt = max(t_end - self.t0, 1e-9)
        broker = proc_cpu_s(self.broker_pid) - self.broker0
        me = time.process_time() - self.self0
        pids = sum(proc_cpu_s(p) for p in self.pids) - self.pids0
        children = children_cpu_s() - self.children0 - extra_own_cpu
        busy = system_busy_s() - self.busy0
        return {"broker_cores": broker / dt, "server_cores": me / dt, "clients_cores": (pids + children) / dt,
                "foreign_cores": max(0.0, busy - broker - me - pids - children) / dt,
                "broker_peak_rss_mb": (proc_status_kb(self.broker_pid, "VmHWM") or 0) / 1024,
                "broker_peak_rss_since": "candidate start" if self.peak_reset else "broker start"}


def summarize(name: str, n: int, size: int, t0: float, ends: list[float], extra: dict) -> dict:
    per_agent = [size / 1e6 / (e - t0) for e in ends]
    wall = max(ends) - t0
    return {"candidate": name, "agents": n, "seconds": wall, "mb_s_per_agent_median": statistics.median(per_agent),
            "mb_s_per_agent_min": min(per_agent), "mb_s_total": n * size / 1e6 / wall, **extra}


def run_edgeglm(n: int, fetchers: list[Fetcher], server: ChunkServer, broker, payload: dict,
                nodelay: bool = True) -> dict:
    active = fetchers[:n]
    watch = Watch(broker.pid, [f.proc.pid for f in active])
    served0, bytes0 = server.served, server.bytes_out
    t0 = time.time()
    for f in active:
        f.go(nodelay)
    results = [f.read() for f in active]
    ends = [r["end"] for r in results]
    cpu = watch.stop(max(ends))
    cpu["clients_cores"] = sum(r["cpu"] for r in results) / (max(ends) - t0)  # the fetchers' own accounts
    bad = sum(r["bad_chunks"] for r in results) + sum(r["bytes"] != payload["size"] for r in results)
    wire = server.bytes_out - bytes0
    return summarize("edgeglm" if nodelay else NAGLE, n, payload["size"], t0, ends, {
        **cpu, "verified": bad == 0, "messages": server.served - served0,
        "wire_bytes_over_file_bytes": wire / (n * payload["size"]),
        "fetcher_peak_rss_mb": max(r["peak_rss_mb"] for r in results)})


def run_mosquitto(mode: str, n: int, broker, payload: dict, run_id: str, timeout: float) -> dict | None:
    whole = mode == "whole"
    if whole and payload["size"] > MQTT_MAX_PAYLOAD:
        return None
    topic = f"bench/raw/{run_id}"
    port = str(broker.port)
    subs, consumers, ids = [], [], []
    for k in range(n):
        cid = f"raw-{run_id}-{k}"
        ids.append(cid)
        sub = subprocess.Popen(["mosquitto_sub", "-h", HOST, "-p", port, "-q", "1", "-i", cid, "-t", topic, "-C",
                                "1" if whole else str(payload["chunks"])] + (["-N"] if whole else []),
                               stdout=subprocess.PIPE)
        consumers.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--consume", mode,
                                           payload["sha256"]], stdin=sub.stdout, stdout=subprocess.PIPE, text=True))
        sub.stdout.close()
        subs.append(sub)
    procs = subs + consumers
    killer = threading.Timer(timeout, lambda: [p.kill() for p in procs if p.poll() is None])
    killer.start()
    try:
        for c in consumers:
            json.loads(c.stdout.readline())  # ready
        broker.wait_subscribed(ids, topic)
        watch = Watch(broker.pid, [])
        t0 = time.time()
        if whole:
            pub = subprocess.Popen(["mosquitto_pub", "-h", HOST, "-p", port, "-q", "1", "-t", topic, "-f",
                                    str(payload["blob"])])
        else:
            with open(payload["lines"], "rb") as lines:
                pub = subprocess.Popen(["mosquitto_pub", "-h", HOST, "-p", port, "-q", "1", "-t", topic, "-l"],
                                       stdin=lines)
        procs.append(pub)
        results = []
        for c in consumers:
            line = c.stdout.readline()
            if not line:
                raise RuntimeError(f"mosquitto {mode}: a subscriber ended without the data (timeout {timeout:g} s?)")
            results.append(json.loads(line))
        for p in procs:
            p.wait()
        ends = [r["end"] for r in results]
        cpu = watch.stop(max(ends), extra_own_cpu=sum(r["startup_cpu"] for r in results))
    finally:
        killer.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ok = all(r["ok"] and r["bytes"] == payload["size"] for r in results)
    return summarize(f"mosquitto {mode}", n, payload["size"], t0, ends, {
        **cpu, "verified": ok, "messages": 1 if whole else payload["chunks"],
        "wire_bytes_over_file_bytes": 1.0 if whole else payload["lines"].stat().st_size / payload["size"]})


# --- the benchmark ------------------------------------------------------------------------------

def benchmark(args) -> dict:
    agents = args.agents
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    payload = make_payload(workdir, args.mb, args.chunk_kib * 1024)
    broker_dir = workdir / f"broker-{os.getpid()}"
    shutil.rmtree(broker_dir, ignore_errors=True)
    broker = bench_broker(broker_dir).start()
    load_before = os.getloadavg()
    fetchers: list[Fetcher] = []
    server = None
    rows = []
    try:
        server = ChunkServer(broker.port, payload["root"])
        print(f"broker on port {broker.port}; starting {max(agents)} fetcher processes", file=sys.stderr)
        fetchers = [Fetcher(broker.port, f"agent-{k}", payload["spec"]) for k in range(max(agents))]
        for f in fetchers:
            f.read()  # ready: connected and subscribed
        names = ["edgeglm", "nagle", "whole", "chunked"]
        run = 0
        for p in range(args.repeats):
            for n in agents:
                k = (p + agents.index(n)) % len(names)
                for name in names[k:] + names[:k]:
                    run += 1
                    if name in ("edgeglm", "nagle"):
                        row = run_edgeglm(n, fetchers, server, broker, payload, nodelay=name == "edgeglm")
                    else:
                        row = run_mosquitto(name, n, broker, payload, f"{os.getpid()}-{run}", args.timeout)
                        if row is None:
                            print(f"skipped mosquitto {name}: {args.mb:g} MB is over MQTT's largest message",
                                  file=sys.stderr)
                            continue
                    row["pass"] = p + 1
                    rows.append(row)
                    print(f"pass {p + 1}/{args.repeats} {row['candidate']} x{n}: {row['mb_s_total']:.1f} MB/s total, "
                          f"{row['mb_s_per_agent_median']:.1f} MB/s per agent (min {row['mb_s_per_agent_min']:.1f}), "
                          f"{row['seconds']:.1f} s, broker peak RSS {row['broker_peak_rss_mb']:.0f} MB, CPU cores: "
                          f"broker {row['broker_cores']:.2f}, server {row['server_cores']:.2f}, clients "
                          f"{row['clients_cores']:.2f}, foreign {row['foreign_cores']:.2f}; verified {row['verified']}",
                          file=sys.stderr)
    finally:
        for f in fetchers:
            f.close()
        if server is not None:
            server.close()
        broker.stop()
        shutil.rmtree(broker_dir, ignore_errors=True)

    summary = []
    for n in agents:
        base = None
        for name in ("edgeglm", NAGLE, "mosquitto whole", "mosquitto chunked"):
            rs = [r for r in rows if r["agents"] == n and r["candidate"] == name]
            if not rs:
                continue
            row = {"candidate": name, "agents": n, "passes": len(rs), "verified": all(r["verified"] for r in rs)}
            for key in ("mb_s_total", "mb_s_per_agent_median", "mb_s_per_agent_min", "seconds", "broker_peak_rss_mb",
                        "broker_cores", "server_cores", "clients_cores", "foreign_cores",
                        "wire_bytes_over_file_bytes"):
                vals = [r[key] for r in rs]
                row[key] = statistics.median(vals)
                row[key + "_range"] = [min(vals), max(vals)]
            if name.startswith("edgeglm"):
                row["fetcher_peak_rss_mb"] = max(r["fetcher_peak_rss_mb"] for r in rs)
            if name == "edgeglm":
                base = row
            elif base is not None:  # same-pass ratios: edgeglm total MB/s / this candidate's
                ratios = [e["mb_s_total"] / r["mb_s_total"] for r in rs for e in rows
                          if e["candidate"] == "edgeglm" and e["agents"] == n and e["pass"] == r["pass"]]
                row["edgeglm_over_this"] = statistics.median(ratios) if ratios else None
                row["edgeglm_over_this_range"] = [min(ratios), max(ratios)] if ratios else None
            summary.append(row)
    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "mosquitto": mosquitto_version(broker.binary)},
        "settings": {"mb": args.mb, "bytes": payload["size"], "chunk_kib": args.chunk_kib, "chunks": payload["chunks"],
                     "agents": agents, "repeats": args.repeats},
        "summary": summary,
        "runs": rows,
    }


def print_table(rep: dict) -> None:
    m, s = rep["machine"], rep["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; load average {m['loadavg_before'][0]:.2f} before, "
          f"{m['loadavg_after'][0]:.2f} after; {m['mosquitto']}")
    print(f"file {s['mb']:g} MB ({s['bytes']} bytes, {s['chunks']} chunks of {s['chunk_kib']} KiB); median of "
          f"{s['repeats']} passes, range in brackets; CPU in cores\n")
    head = ("candidate", "agents", "MB/s total", "MB/s per agent (min)", "s", "edgeglm / this", "wire/file",
            "broker peak RSS MB", "broker CPU", "server CPU", "clients CPU", "foreign CPU", "verified")
    print(" | ".join(head))
    for r in rep["summary"]:
        tr = r["mb_s_total_range"]
        ratio = f"{r['edgeglm_over_this']:.2f} [{r['edgeglm_over_this_range'][0]:.2f}-" \
                f"{r['edgeglm_over_this_range'][1]:.2f}]" if r.get("edgeglm_over_this") else ""
        print(" | ".join([
            r["candidate"], str(r["agents"]), f"{r['mb_s_total']:.1f} [{tr[0]:.1f}-{tr[1]:.1f}]",
            f"{r['mb_s_per_agent_median']:.1f} ({r['mb_s_per_agent_min']:.1f})", f"{r['seconds']:.1f}", ratio,
            f"{r['wire_bytes_over_file_bytes']:.3f}", f"{r['broker_peak_rss_mb']:.0f}", f"{r['broker_cores']:.2f}",
            f"{r['server_cores']:.2f}", f"{r['clients_cores']:.2f}", f"{r['foreign_cores']:.2f}",
            "yes" if r["verified"] else "NO"]))
    fetch = [r for r in rep["summary"] if r["candidate"].startswith("edgeglm")]
    if fetch:
        print(f"\nfetcher (agent session) peak RSS: {max(r['fetcher_peak_rss_mb'] for r in fetch):.0f} MB")


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--fetch":
        return fetch_main(*sys.argv[2:5])
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--consume":
        return consume_main(*sys.argv[2:4])
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=positive_float, default=100.0, help="file size in MB (10^6 bytes)")
    ap.add_argument("--agents", type=int_list, default=[1, 20], help="comma-separated agent (subscriber) counts")
    ap.add_argument("--chunk-kib", type=positive_int, default=256,
                    help="chunk size in KiB (the manifest's default is 256; 4 to 512)")
    ap.add_argument("--repeats", type=positive_int, default=2, help="interleaved passes")
    ap.add_argument("--timeout", type=positive_float, default=900.0,
                    help="give up on a mosquitto_pub/sub candidate after this")
    ap.add_argument("--workdir", default=".bench/ota", help="the random file, its chunk list, broker files")
    ap.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    args = ap.parse_args(argv)
    if not 4 <= args.chunk_kib <= 512:  # a manifest's smallest chunk; the chunk server's largest message
        ap.error(f"--chunk-kib {args.chunk_kib} is invalid: must be in [4, 512]")
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            ap.error(f"{tool} not found: it is the broker and the comparison's client here (apt-get install "
                     "mosquitto mosquitto-clients)")
    report = benchmark(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
