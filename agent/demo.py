"""`edgeglm demo`: the whole product on one machine, on embedded defaults.

1. train a tiny GLM on Python standard-library text (or reuse it), export two signed INT8
   bundles (v1.0.0 and v1.1.0);
2. start an MQTT broker (embedded amqtt on loopback, unless `--broker HOST:PORT` is given),
   a fleet controller and three agents with empty model slots;
3. roll v1 out (canary first, gated by latency), answer chat requests through the agents'
   OpenAI-compatible HTTP API, roll v2 out the same way, print the fleet status table.

The embedded broker speaks MQTT 3.1.1 only, so everyone connects with 3.1.1 (the protocol's
fallbacks carry reply topics and correlation ids in the payloads).
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

FLEET = "demo"


class EmbeddedBroker:
    """amqtt on 127.0.0.1:port in a background thread (zero setup; the demo's default only)."""

    def __init__(self, port: int):
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise RuntimeError("the embedded broker needs amqtt: pip install 'edgeglm[demo]', or pass "
                               "--broker HOST:PORT of a running MQTT broker") from None
        self.port = port
        self.loop = asyncio.new_event_loop()
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.broker = Broker(config, loop=self.loop)
            self.loop.run_until_complete(self.broker.start())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="embedded-broker", daemon=True).start()
        if not started.wait(30):
            raise RuntimeError(f"the embedded MQTT broker did not start on 127.0.0.1:{port}")

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop)
        try:
            fut.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(port: int, text: str, max_tokens: int = 24) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def _build_bundles(work: Path, steps: int, say) -> tuple[Path, Path, Path]:
    from models import export, tiny
    from ota.bundle import open_bundle
    from ota.signing import generate_keypair, load_private_key, sign_bundle

    ckpt, keys = work / "checkpoint", work / "keys"
    if not (ckpt / "config.json").is_file():
        say(f"training a tiny GLM ({tiny.SHAPES['tiny'][1]} layers) on Python stdlib text -> {ckpt}")
        tiny.make_checkpoint(ckpt, "tiny", train_steps=steps, progress=True)  # its "train" bar
    else:
        say(f"reusing the trained checkpoint {ckpt}")
    if not (keys / "demo.key").is_file():
        generate_keypair(keys, "demo")
    key = load_private_key(keys / "demo.key")
    bundles = []
    for version in ("1.0.0", "1.1.0"):
        out = work / f"bundle-{version}"
        if not (out / "manifest.sig").is_file():
            say(f"exporting and signing bundle {version} (INT8, OpenVINO + ONNX Runtime) -> {out}")
            export.export_bundle(ckpt, out, export.ExportOptions(name="demo-tiny", version=version, force=True))
            sign_bundle(open_bundle(out), key)
        bundles.append(out)
    return bundles[0], bundles[1], keys


def explain_report_line(line: str) -> str:
    """A rollout report line as the demo prints it: the latency gate's p95 changes in words.

    The gate compares each canary's p95 per-token latency before and after; on the first rollout
    the canaries served nothing before, so there is no baseline and the report's dict is empty.
    """
    # after the report's HH:MM:SS; the canaries whose latency was not compared, then their memory
    m = re.fullmatch(r"(.*?)latency gate passed \((\{.*?\})\)(?:; under --min-delta-ms ([\d.]+): (.*?))?"
                     r"(?:; latency not compared for (.*?))?(; memory: .*)?", line)
    if m is None:
        return line
    try:
        changes = ast.literal_eval(m.group(2))
    except (ValueError, SyntaxError):
        return line
    if not isinstance(changes, dict):
        return line
    memory = m.group(6) or ""  # each canary's rss and free memory before -> after, from its health snapshots
    uncompared = f" (not compared: {m.group(5)})" if m.group(5) else ""
    floored = (f" ({m.group(4)}: under the {m.group(3)} ms floor, --min-delta-ms, not a regression)"
               if m.group(3) else "")
    if not changes:
        return (f"{m.group(1)}latency gate passed: no baseline latency to compare with yet{uncompared}; the "
                f"canaries' telemetry on the new version arrived with no new errors{memory}")
    return f"{m.group(1)}latency gate passed: p95 per-token latency " + ", ".join(
        f"{device} {change:+.1f}%" for device, change in changes.items()) + floored + uncompared + memory


DEMO_MIN_DELTA_MS = 5.0  # the latency gate's absolute floor in the demo (`fleet rollout --min-delta-ms`)
DEMO_MIN_REQUESTS = 3  # the demo's windows are seconds long, with a chat every half second (`--min-requests`)


def _rollout(controller, driver, agents, bundle: Path, say, window_s: float = 3.0, timeout_s: float = 120.0) -> str:
    from fleet.rollout import create_rollout, load_rollouts

    # the tiny demo model decodes a token in well under a millisecond: a scheduling hiccup on a busy box moves its
    # p95 by a millisecond or two, which the default 1 ms floor would take for a regression of several 100 %
    rid = create_rollout(controller.store, bundle, FLEET, canary_pct=33, max_regression_pct=50, window_s=window_s,
                         min_delta_ms=DEMO_MIN_DELTA_MS, min_requests=DEMO_MIN_REQUESTS)
    seen, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        driver.tick()
        r = next(r for r in load_rollouts(controller.store) if r.id == rid)
        for line in r.data["report"][seen:]:
            say(f"  rollout {rid}: {explain_report_line(line)}")
        seen = len(r.data["report"])
        if r.phase in ("done", "halted"):
            return r.phase
        for agent in agents:  # some traffic, so that the canaries report latency on the new version
            if agent.model is not None:
                try:
                    _chat(agent.http.port, "ping", max_tokens=4)
                except OSError:
                    pass
        time.sleep(0.5)
    raise RuntimeError(f"rollout {rid} did not finish within {timeout_s:g} s")


# what the demo keeps in its working directory: a directory holding anything else is not the demo's
DEMO_ENTRY = re.compile(r"checkpoint|keys|agents|bundle-1\.[01]\.0|fleet\.db(-wal|-shm|-journal)?")


def run_demo(workdir: str | Path, steps: int = 300, broker: str | None = None, n_agents: int = 3) -> int:
    from agent.config import load_config
    from agent.daemon import Agent
    from fleet.controller import ControllerSettings, FleetController, format_status
    from fleet.rollout import RolloutDriver

    import logging

    logging.basicConfig(level=logging.WARNING, format="    (%(name)s: %(message)s)")
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # its shutdown chatter is not the demo's news
    logging.getLogger("edgeglm.mqtt.paho").setLevel(logging.ERROR)  # paho notes publishes racing the disconnect
    t0 = time.monotonic()
    work = Path(workdir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only place
        why = "it is a file, not a directory" if work.exists() and not work.is_dir() else (exc.strerror or str(exc))
        raise RuntimeError(f"--workdir {work}: cannot be used as the demo's working directory ({why}); "
                           "give another one") from None
    names = {p.name for p in work.iterdir()}
    foreign = sorted(n for n in names if not DEMO_ENTRY.fullmatch(n))
    if names and not names & {"checkpoint", "keys", "agents"}:  # e.g. a fleet.db of `fleet serve` run there
        foreign = sorted(names)
    if foreign:  # the demo deletes and rewrites fleet.db, agents/ and unsigned bundle-*/ there
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RuntimeError(f"--workdir {work}: holds files that are not the demo's ({shown}); the demo replaces "
                           "fleet.db, agents/ and bundle-*/ in its working directory: give a new or empty directory "
                           "(default edgeglm-demo)")

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {text}", flush=True)

    if broker:  # checked before any work is done
        host, _, port_text = broker.removeprefix("mqtt://").rstrip("/").rpartition(":")
        if not host or not port_text.isdigit():
            raise RuntimeError(f"--broker {broker!r} is not HOST:PORT or mqtt://HOST:PORT")
        port = int(port_text)
    v1, v2, keys = _build_bundles(work, steps, say)
    embedded = None
    if not broker:
        host, port = "127.0.0.1", _free_port()
        say(f"starting the embedded MQTT broker on {host}:{port}")
        embedded = EmbeddedBroker(port)
    (work / "fleet.db").unlink(missing_ok=True)
    controller = FleetController(ControllerSettings(broker_host=host, broker_port=port, db=work / "fleet.db",
                                                    fleet=FLEET, protocol="3.1.1")).start()
    driver = RolloutDriver(controller.store, controller)
    stop, agents, threads = threading.Event(), [], []
    try:
        for i in range(1, n_agents + 1):
            state = work / "agents" / f"box{i}"
            import shutil

            shutil.rmtree(state, ignore_errors=True)
            cfg = load_config(None, {
                "device": {"id": f"box{i}", "fleet": FLEET}, "model": {"slots_dir": str(state)},
                "http": {"port": 0}, "telemetry": {"interval_s": 1.0, "health_interval_s": 1.0},
                "mqtt": {"enabled": True, "host": host, "port": port, "protocol": "3.1.1",
                         "reconnect_min_delay_s": 0.2, "reconnect_max_delay_s": 2.0},
                "ota": {"trusted_keys": str(keys / "demo.pub"), "chunk_timeout_s": 5.0}})
            agent = Agent(cfg)
            agent.start()
            thread = threading.Thread(target=agent.run, args=(stop,), name=f"agent-box{i}", daemon=True)
            thread.start()
            agents.append(agent)
            threads.append(thread)
            say(f"agent box{i}: HTTP API on {agent.http.url}, no model yet")
        deadline = time.monotonic() + 30
        while len(controller.store.devices(FLEET)) < n_agents and time.monotonic() < deadline:
            time.sleep(0.1)
        say(f"fleet controller sees {len(controller.store.devices(FLEET))} device(s); rolling out v1.0.0")
        phase = _rollout(controller, driver, agents, v1, say)
        say(f"v1.0.0 rollout: {phase}")
        for agent, question in zip(agents, ("Write a function that parses a line.", "What does a queue do?",
                                            "def main(argv=None):")):
            if agent.model is not None:
                say(f"chat with {agent.cfg.device.id}: {question!r} -> {_chat(agent.http.port, question)!r}")
        say("rolling out v1.1.0 with a canary and the latency gate")
        phase = _rollout(controller, driver, agents, v2, say)
        say(f"v1.1.0 rollout: {phase}")
        time.sleep(1.5)  # the last state and telemetry reports
        print(format_status(controller.store, FLEET), flush=True)
        say("done; shutting down")
    finally:
        stop.set()
        for agent in agents:
            agent.shutdown(deadline=5.0)
        controller.stop()
        if embedded is not None:
            embedded.stop()
    return 0
