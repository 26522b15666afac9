"""How many devices reporting telemetry every second one fleet controller keeps up with.

    python benchmarks/fleet_scale.py                        # N = 500, 1000, 2000, 4000 (stops past the ceiling)
    python benchmarks/fleet_scale.py --steps 2000 --duration 30
    python benchmarks/fleet_scale.py --controller-src /tmp/old   # the controller of another checkout (before/after)
    python benchmarks/fleet_scale.py --steps 500,1000 --health both   # each step without, then with device health
    python benchmarks/fleet_scale.py --steps 500,1000 --histograms both   # without, then with latency histograms
    python benchmarks/fleet_scale.py --steps 500,1000 --telemetry-qos both   # the controller at QoS 0, then 1

One run starts a loopback Mosquitto and `edgeglm fleet serve` (its own process), then for each N
starts simulated devices (fleet.simulator.SimSwarm: one MQTT connection per device, the agents'
topics and payload models, up to --per-process devices per worker process) that each publish
a TelemetryReport every second. Per step it prints:

  lag p50/p95/max   `stored - window_end` of every report published in the measured window
                    (window_end is set when the device publishes; `stored` when the controller's
                    batch is written); reports still unstored 10 s after the window count as lost
  fresh             worst `now - newest stored window_end`, sampled twice a second (works with
                    any controller version, also one whose database has no `stored` column)
  msg/s             reports stored per second of the window, and what the devices sent
  CPU% / RSS        of the controller, the broker and all device workers (100% = one core),
                    and how busy the whole machine was (other work on it shows there)
  us/msg            CPU microseconds the controller / the broker spent per stored report: on a
                    shared machine the lag shows the CPU share the processes got, this shows
                    the work they need (one core / us/msg = the rate one core could sustain)

The ceiling is the first N whose p95 lag passes 1 s, that loses more than 1% of reports, or whose
fresh max passes 2 s; the run stops after it (the line says which of them tripped). Numbers and the machine
go to docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import Parser, int_list, nonneg_float, positive_float, positive_int  # noqa: E402
from procstats import cpu_model, proc_cpu_s, proc_status_kb, system_busy_s  # noqa: E402

FLEET = "bench"


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the broker and the workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def start_broker(work: Path, queue: int) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = work / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true", "persistence false",
             "max_connections -1", f"max_queued_messages {queue}", f"log_dest file {work / 'mosquitto.log'}", "log_type error", "log_type warning"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
    except BaseException:  # not left running
        proc.kill()
        proc.wait()
        raise
    return proc, port


def start_controller(work: Path, port: int, src: str | None, qos: int | None = None) -> subprocess.Popen:
    """`fleet serve` in its own process; `qos`: its [mqtt] telemetry_qos (None: its default, and no config file,
    which a controller before the setting would refuse), under a client id of its own."""
    env = dict(os.environ, PYTHONPATH=src or str(Path(__file__).resolve().parents[1]))
    log = work / "controller.log"
    config = []
    if qos is not None:
        (work / "fleet.toml").write_text(f'[mqtt]\ntelemetry_qos = {qos}\nclient_id = "bench-qos{qos}"\n')
        config = ["--config", str(work / "fleet.toml")]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--broker", f"127.0.0.1:{port}",
                                 "--db", str(work / "fleet.db"), "--http-port", "0", *config], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "fleet controller" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:  # not left running
                proc.kill()
                proc.wait()
            raise SystemExit(f"the controller did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return proc


def check_alive(proc: subprocess.Popen, what: str, log: Path) -> None:
    if proc.poll() is not None:
        raise SystemExit(f"the {what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")


def worker(args) -> int:
    """One device process: connect its devices, say so, publish until told the duration is over."""
    from fleet.simulator import SimSwarm

    swarm = SimSwarm("127.0.0.1", args.port, FLEET, [f"d{i:05d}" for i in range(args.first, args.first + args.count)],
                     seed=args.first, health=args.health == "on", histograms=args.histograms == "on")
    swarm.connect()
    swarm.run(0.5)  # read the CONNACKs
    print("connected", flush=True)
    sys.stdin.readline()  # "go"
    sent = swarm.run(args.duration)
    swarm.close()
    print(json.dumps({"sent": sent}), flush=True)
    return 0


def start_workers(port: int, n: int, per_process: int, duration: float, health: bool = False,
                  histograms: bool = False) -> list[subprocess.Popen]:
    procs = []
    for first in range(0, n, per_process):
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--port", str(port), "--first", str(first),
                                       "--count", str(min(per_process, n - first)), "--duration", str(duration)]
                                      + (["--health", "on"] if health else [])
                                      + (["--histograms", "on"] if histograms else []),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        if p.stdout.readline().strip() != "connected":
            raise SystemExit("a device worker did not connect (see its stderr)")
    return procs


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] if s else float("nan")


def measure_step(n: int, port: int, db: Path, controller: subprocess.Popen, broker: subprocess.Popen,
                 args, health: bool = False, histograms: bool = False, qos: int | None = None) -> dict:
    warmup = args.warmup
    workers = start_workers(port, n, args.per_process, warmup + args.duration, health, histograms)
    read = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    has_stored = "stored" in {r[1] for r in read.execute("PRAGMA table_info(telemetry)")}
    for w in workers:
        w.stdin.write("go\n")
        w.stdin.flush()
    time.sleep(warmup)
    pids = {"controller": controller.pid, "broker": broker.pid}
    cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
    sims0 = sum(proc_cpu_s(w.pid) for w in workers)
    busy0, t0 = system_busy_s(), time.time()
    fresh = []
    while time.time() < t0 + args.duration:
        newest = read.execute("SELECT MAX(window_end) FROM telemetry").fetchone()[0]
        fresh.append(time.time() - newest if newest else float("nan"))
        time.sleep(0.5)
    t1 = time.time()
    wall = t1 - t0
    cpu_s = {k: proc_cpu_s(p) - cpu0[k] for k, p in pids.items()}
    cpu = {k: 100 * v / wall for k, v in cpu_s.items()}
    sims = 100 * (sum(proc_cpu_s(w.pid) for w in workers) - sims0) / wall
    busy = 100 * (system_busy_s() - busy0) / wall
    rss = {k: (proc_status_kb(p, "VmRSS") or 0) / 1024 for k, p in pids.items()}
    sent = sum(json.loads(w.stdout.readline())["sent"] for w in workers)
    for w in workers:
        w.wait()
    count = lambda: read.execute("SELECT COUNT(*) FROM telemetry WHERE window_end>=?", (t0 - warmup - 5,)).fetchone()[0]  # noqa: E731
    deadline = time.time() + 10
    while count() < sent and time.time() < deadline:  # let a backlog drain: late, not lost
        time.sleep(0.5)
    stored_all = count()
    in_window = read.execute("SELECT COUNT(*) FROM telemetry WHERE window_end BETWEEN ? AND ?", (t0, t1)).fetchone()[0]
    lags = [r[0] for r in read.execute("SELECT stored - window_end FROM telemetry WHERE window_end BETWEEN ? AND ?",
                                       (t0, t1))] if has_stored else []
    read.close()
    return {"n": n, "health": "on" if health else "off", "histograms": "on" if histograms else "off",
            "qos": "-" if args.telemetry_qos is None else str(qos), "lag_p50": percentile(lags, 50), "lag_p95": percentile(lags, 95),
            "lag_max": max(lags) if lags else float("nan"), "fresh_max": max(fresh) if fresh else float("nan"),
            "stored_per_s": in_window / wall, "sent_per_s": sent / (warmup + args.duration),
            "lost_pct": 100 * max(0, sent - stored_all) / sent if sent else 0.0,
            "us_controller": 1e6 * cpu_s["controller"] / in_window if in_window else float("nan"),
            "us_broker": 1e6 * cpu_s["broker"] / in_window if in_window else float("nan"),
            "cpu_controller": cpu["controller"], "cpu_broker": cpu["broker"], "cpu_devices": sims,
            "cpu_machine": busy, "rss_controller": rss["controller"], "rss_broker": rss["broker"]}


def print_row(r: dict, header: bool = False) -> None:
    cols = [("N", "n", "{:d}"), ("health", "health", "{}"), ("histograms", "histograms", "{}"), ("qos", "qos", "{}"),
            ("lag p50", "lag_p50", "{:.3f}s"), ("lag p95", "lag_p95", "{:.3f}s"),
            ("lag max", "lag_max", "{:.3f}s"), ("fresh max", "fresh_max", "{:.2f}s"),
            ("stored/s", "stored_per_s", "{:.0f}"), ("sent/s", "sent_per_s", "{:.0f}"), ("lost", "lost_pct", "{:.1f}%"),
            ("ctl CPU", "cpu_controller", "{:.0f}%"), ("ctl us/msg", "us_controller", "{:.0f}"), ("ctl RSS", "rss_controller", "{:.0f}MB"),
            ("broker CPU", "cpu_broker", "{:.0f}%"), ("brk us/msg", "us_broker", "{:.0f}"), ("broker RSS", "rss_broker", "{:.0f}MB"),
            ("devices CPU", "cpu_devices", "{:.0f}%"), ("machine", "cpu_machine", "{:.0f}%")]
    widths = [max(len(h), 9) for h, _, _ in cols]
    if header:
        print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)), flush=True)
    print("  ".join(f.format(r[k]).rjust(w) for (_, k, f), w in zip(cols, widths)), flush=True)


def ratio_text(num: float, den: float) -> str:
    """num / den as '1.23x', or 'n/a' where the denominator is 0 or NaN (e.g. a broker that used no measurable
    CPU in the window) or the numerator is NaN."""
    if not den or den != den or num != num:
        return "n/a"
    return f"{num / den:.2f}x"


def ceiling_reasons(row: dict) -> list[str]:
    """Which of the ceiling's conditions a step trips (NaN trips none)."""
    out = []
    if row["lag_p95"] > 1.0:
        out.append(f"p95 lag {row['lag_p95']:.2f} s over 1 s")
    if row["lost_pct"] > 1.0:
        out.append(f"{row['lost_pct']:.1f}% of reports lost, over 1%")
    if row["fresh_max"] > 2.0:
        out.append(f"fresh max {row['fresh_max']:.2f} s over 2 s")
    return out


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="500,1000,2000,4000", type=int_list, help="device counts, comma-separated")
    ap.add_argument("--duration", type=positive_float, default=20.0, help="measured seconds per step")
    ap.add_argument("--warmup", type=nonneg_float, default=5.0, help="seconds of publishing before measuring")
    ap.add_argument("--per-process", type=positive_int, default=1000, help="devices per worker process")
    ap.add_argument("--controller-src", help="PYTHONPATH of the controller to run (default: this checkout)")
    ap.add_argument("--broker-queue", type=positive_int, default=1000,
                    help="mosquitto max_queued_messages (its default 1000; the controller's backlog beyond it is "
                         "dropped by the broker)")
    ap.add_argument("--health", choices=("off", "on", "both"), default="off",
                    help="devices also send a DeviceHealth (QoS 0) after each report, as agents do; both: each step "
                         "without, then with, and the ratio of the controller's CPU per report")
    ap.add_argument("--histograms", choices=("off", "on", "both"), default="off",
                    help="devices also send their window's LatencyHistograms (QoS 1) before each report, as agents "
                         "do; both: each step without, then with, and the ratio of the controller's CPU per report")
    ap.add_argument("--telemetry-qos", choices=("0", "1", "both"),
                    help="the controller's [mqtt] telemetry_qos (default: its own default); both: each step at 0, "
                         "then at 1 (a controller restarted for each), and the ratio of the controller's CPU per "
                         "report")
    ap.add_argument("--keep-going", action="store_true", help="run every step even past the ceiling")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    steps = args.steps
    if args.controller_src and not (Path(args.controller_src) / "agent" / "cli.py").is_file():
        ap.error(f"--controller-src {args.controller_src} is invalid: must be an edgeglm source tree "
                 "(a directory with agent/cli.py)")
    nofile = raise_fd_limit()
    if max(steps) + 100 > nofile:
        ap.error(f"--steps {max(steps)}: the broker needs a socket per device and RLIMIT_NOFILE is {nofile}; "
                 f"raise it (ulimit -n) or use fewer devices")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; RLIMIT_NOFILE {nofile}; telemetry every 1 s per device; "
          f"{args.duration:g} s measured per step after {args.warmup:g} s warm-up", flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        work = Path(tmp)
        broker = controller = None
        try:
            broker, port = start_broker(work, args.broker_queue)
            qos_ways = {None: [None], "0": [0], "1": [1], "both": [0, 1]}[args.telemetry_qos]
            running_qos = qos_ways[0]
            controller = start_controller(work, port, args.controller_src, running_qos)
            for i, n in enumerate(steps):
                rows = []
                ways = {"off": [False], "on": [True], "both": [False, True]}
                for qos in qos_ways:
                    if qos != running_qos:  # a controller subscribed at the other QoS
                        stop_process(controller, 30)
                        controller, running_qos = start_controller(work, port, args.controller_src, qos), qos
                    for health in ways[args.health]:
                        for histograms in ways[args.histograms]:
                            rows.append(measure_step(n, port, work / "fleet.db", controller, broker, args, health,
                                                     histograms, qos))
                            check_alive(controller, "controller", work / "controller.log")
                            print_row(rows[-1], header=i == 0 and len(rows) == 1)
                if len(rows) == 2:
                    what = "with health / without" if args.health == "both" else "with histograms / without" \
                        if args.histograms == "both" else "at telemetry QoS 1 / at QoS 0"
                    print(f"  {n} devices: controller CPU per report {what}: "
                          f"{ratio_text(rows[1]['us_controller'], rows[0]['us_controller'])}; broker "
                          f"{ratio_text(rows[1]['us_broker'], rows[0]['us_broker'])}", flush=True)
                reasons = ceiling_reasons(rows[-1])
                if reasons and not args.keep_going:
                    print(f"ceiling: {n} devices ({'; '.join(reasons)}; the ceiling is p95 lag over 1 s, over 1% "
                          f"of reports lost, or fresh max over 2 s)")
                    break
            else:
                if not args.keep_going:
                    print(f"no ceiling up to {steps[-1]} devices")
        finally:
            for proc, wait_s in ((controller, 30), (broker, 10)):
                stop_process(proc, wait_s)
    return 0


def stop_process(proc: subprocess.Popen | None, wait_s: float) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
