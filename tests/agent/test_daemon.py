"""`edgeglm agent` end to end: a real agent process, a real Mosquitto, a controller played by paho.

The agent starts with empty model slots, is offered a signed bundle whose chunks it pulls over
MQTT from the controller's chunk server, commits it, then serves HTTP and MQTT inference,
applies desired config live (refusing an invalid one), reports telemetry, and on SIGTERM
publishes its offline state and exits 0.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
import urllib.request

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.topics import (chunk_request_topic, desired_topic, health_topic, infer_request_topic, ota_offer_topic,
                          ota_status_topic, state_topic, telemetry_topic)
from broker import free_port
from waiting import until as wait_until
from ota.bundle import open_bundle
from ota.offers import make_offer
from ota.transfer import ChunkRequest, ChunkSource

FLEET, DEVICE = "fleet1", "dev1"


class Controller:
    """A paho MQTT 5 client with a chunk server, collecting what the device publishes."""

    def __init__(self, port: int, chunk_delay_s: float = 0.0):
        self.chunks = ChunkSource()
        self.chunk_delay_s = chunk_delay_s
        self.answer_chunks = True  # False: chunk requests are recorded and left unanswered (a stalled server)
        self.requested: list[tuple[str, int]] = []
        self.messages: dict[str, queue.Queue] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="controller", protocol=paho.MQTTv5)
        self.client.on_message = self.on_message
        self.client.on_connect = self.on_connect
        self.topics = (state_topic(FLEET, DEVICE), telemetry_topic(FLEET, DEVICE), ota_status_topic(FLEET, DEVICE),
                       chunk_request_topic(FLEET, DEVICE), health_topic(FLEET, DEVICE), "test/replies")
        self.messages = {topic: queue.Queue() for topic in self.topics}
        self.subscribed = threading.Event()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def on_connect(self, client, userdata, flags, reason_code, properties):
        for topic in self.topics:  # again after every reconnect: a clean session forgets them
            client.subscribe(topic, qos=1)
        self.subscribed.set()

    def on_message(self, client, userdata, msg):
        if msg.topic == chunk_request_topic(FLEET, DEVICE):
            req = ChunkRequest.model_validate_json(msg.payload)
            self.requested.append((req.path, req.index))
            if not self.answer_chunks:
                self.messages[msg.topic].put(msg)
                return
            time.sleep(self.chunk_delay_s)  # a slow link, so that the test can cut it mid-transfer
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = msg.properties.CorrelationData
            topic = getattr(msg.properties, "ResponseTopic", None) or req.reply_to
            client.publish(topic, self.chunks.serve(req).model_dump_json(), qos=1, properties=props)
        self.messages[msg.topic].put(msg)

    def wait(self, topic: str, predicate, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.messages[topic].get(timeout=0.5)
            except queue.Empty:
                continue
            data = json.loads(msg.payload) if msg.payload else None
            if data is not None and predicate(data, msg):
                return data
        raise AssertionError(f"nothing on {topic} matched within {timeout} s")

    def publish(self, topic: str, payload: str, retain: bool = False, props: Properties | None = None):
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

    def offer(self, update_id: str, bundle) -> None:
        """Serve `bundle`'s chunks under `update_id` and publish its offer (retained, as the controller does)."""
        self.chunks.add(update_id, bundle)
        self.publish(ota_offer_topic(FLEET, DEVICE),
                     make_offer(open_bundle(bundle), update_id, {"type": "mqtt"}).model_dump_json(), retain=True)

    def install(self, update_id: str, bundle) -> dict:
        """Offer `bundle` and wait for the update's result; the final OTA status."""
        self.offer(update_id, bundle)
        return self.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: d.get("update_id") == update_id and "result" in d)


def kill_agent(proc: subprocess.Popen) -> None:
    """Kill an agent process a test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def start_agent(mosquitto, signed_bundles, tmp_path, extra: str = ""):
    http_port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[device]
id = "{DEVICE}"
fleet = "{FLEET}"

[model]
slots_dir = "{tmp_path / 'state'}"

[http]
port = {http_port}

[telemetry]
interval_s = 1.0
health_interval_s = 1.0

[mqtt]
enabled = true
port = {mosquitto.port}
reconnect_min_delay_s = 0.2
reconnect_max_delay_s = 1.0

[ota]
trusted_keys = "{signed_bundles['keys']}"
max_latency_ratio = 100.0  # these tests are not about the latency budget (tests/agent/test_selftest.py is)
{extra}
""")
    log = open(tmp_path / "agent.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, http_port, tmp_path / "agent.log"


@pytest.fixture
def agent_process(mosquitto, signed_bundles, tmp_path):
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path)
    yield proc, http_port, log
    kill_agent(proc)


def http_json(port: int, path: str, body: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_agent_end_to_end_over_mqtt(agent_process, mosquitto, signed_bundles):
    proc, http_port, log = agent_process
    ctl = Controller(mosquitto.port)
    state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
    assert state["model"] is None and state["agent_version"] and state["hardware"]["cores"] >= 1

    # OTA: a signed bundle pulled chunk by chunk over MQTT, verified, self-tested, committed
    v1 = open_bundle(signed_bundles["v1"])
    ctl.chunks.add("install-v1", signed_bundles["v1"])
    offer = make_offer(v1, "install-v1", {"type": "mqtt"})
    ctl.publish(ota_offer_topic(FLEET, DEVICE), offer.model_dump_json(), retain=True)
    final = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: d.get("state") == "reporting" and "result" in d)
    assert final["result"] == "committed", final
    assert ctl.messages[chunk_request_topic(FLEET, DEVICE)].qsize() >= 1  # chunks did travel over MQTT
    state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["model"] is not None)
    assert state["model"] == {"name": v1.manifest.name, "version": "1.0.0", "sha256": v1.sha256}
    # backend "auto": autotune picks the faster measured path, either backend of the bundle
    assert state["active_slot"] == "a" and re.fullmatch(r"(onnxruntime|openvino):[a-z0-9.]+", state["execution_path"]), \
        state["execution_path"]

    # the HTTP API serves the model that came over the air
    assert http_json(http_port, "/readyz")["status"] == "ready"
    out = http_json(http_port, "/v1/completions", {"prompt": "def main(", "max_tokens": 6})
    assert out["usage"]["completion_tokens"] == 6

    # desired config: applied live and acknowledged; an invalid one refused with the reason
    ctl.publish(desired_topic(FLEET, DEVICE), json.dumps({"version": 3, "settings": {"sampling": {"max_tokens": 4}}}),
                retain=True)
    ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["applied_config_version"] == 3)
    assert http_json(http_port, "/v1/completions", {"prompt": "x = "})["usage"]["completion_tokens"] == 4
    ctl.publish(desired_topic(FLEET, DEVICE),
                json.dumps({"version": 4, "settings": {"sampling": {"temperature": -1}}}), retain=True)
    state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["last_config_error"] is not None)
    assert "temperature" in state["last_config_error"] and state["applied_config_version"] == 3
    # the operator clears the refused config (an empty retained message): version 3 stays, the refusal is not news
    ctl.publish(desired_topic(FLEET, DEVICE), b"", retain=True)
    state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["last_config_error"] is None)
    assert state["applied_config_version"] == 3

    # inference over MQTT 5 request/response, and a malformed request gets an error answer
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = "test/replies", b"req-1"
    ctl.publish(infer_request_topic(FLEET, DEVICE), json.dumps({"id": "req-1", "prompt": "def f(", "max_tokens": 5}),
                props=props)
    answer = ctl.wait("test/replies", lambda d, m: d.get("id") == "req-1")
    assert answer["text"] is not None and answer["usage"]["completion_tokens"] == 5
    props.CorrelationData = b"req-2"
    ctl.publish(infer_request_topic(FLEET, DEVICE), json.dumps({"id": "req-2", "prompt": 42}), props=props)
    error = ctl.wait("test/replies", lambda d, m: d.get("id") == "req-2")
    assert error["error"]["code"] == "bad_request" and "prompt" in error["error"]["message"]

    # telemetry: the requests above show up in a report
    report = ctl.wait(telemetry_topic(FLEET, DEVICE), lambda d, m: d["count"] >= 1)
    assert report["model_version"] == "1.0.0" and report["per_token_ms"]["p50"] > 0

    # SIGTERM: offline state published, exit code 0; made by the same run as the states before it, and later
    # by its uptime (what the controller orders one run's states by)
    run, uptime = state["hardware"]["run"], state["uptime_s"]
    assert re.fullmatch(r"[0-9a-f]{16}", run)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    offline = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"] is False)
    assert offline["hardware"]["run"] == run and offline["uptime_s"] > uptime


until = partial(wait_until, timeout=120.0)


def _proc_status(pid: int) -> dict[str, int]:
    """/proc/PID/status' kB lines (VmRSS, ...) in bytes, and CPU seconds from /proc/PID/stat, as read by the test."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                out[key] = int(value.split()[0]) * 1024
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    out["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def test_the_agent_sends_its_health_every_telemetry_interval(mosquitto, signed_bundles, tmp_path):
    """Memory, disk, CPU and the KV bound of the box reach the controller on the health topic: not retained, one
    per telemetry interval, the numbers those the test reads from /proc and the file system itself."""
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra="[batching]\nmax_kv_mb = 48\n")
    try:
        ctl = Controller(mosquitto.port)
        assert ctl.install("install-v1", signed_bundles["v1"])["result"] == "committed"
        topic = health_topic(FLEET, DEVICE)
        first = ctl.wait(topic, lambda d, m: d["kv_bound_bytes"] > 0 and not m.retain)
        seen = _proc_status(proc.pid)
        assert first["device"] == DEVICE and first["kv_bound_bytes"] == 48 << 20
        assert first["next_s"] == 1.0  # health_interval_s 1 with a report every 1 s: the controller knows when
        assert 0.5 * seen["VmRSS"] <= first["rss_bytes"] <= 2 * seen["VmRSS"], (first, seen["VmRSS"])
        assert first["cpus"] == len(os.sched_getaffinity(proc.pid))
        assert abs(first["disk_free_bytes"] - shutil.disk_usage(tmp_path / "state").free) < 512 << 20
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        assert 0 < first["memory_available_bytes"] <= total
        assert first["load_1m"] == pytest.approx(os.getloadavg()[0], abs=4.0)
        second = ctl.wait(topic, lambda d, m: d["ts"] > first["ts"])
        assert 0.5 <= second["ts"] - first["ts"] <= 30 and second["uptime_s"] > first["uptime_s"]
        assert first["cpu_seconds"] <= second["cpu_seconds"] <= _proc_status(proc.pid)["cpu_seconds"] + 0.05
        # the fleet turns the snapshots off: telemetry goes on, health stops
        ctl.publish(desired_topic(FLEET, DEVICE), json.dumps({"version": 1, "settings": {
            "telemetry": {"health_interval_s": 0}}}), retain=True)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["applied_config_version"] == 1)
        # a snapshot sent by a tick that read the interval before the change comes before the next report (one
        # client's messages arrive in order): wait for a report from after the change, then forget what came
        applied = time.time()
        ctl.wait(telemetry_topic(FLEET, DEVICE), lambda d, m: d["window_end"] > applied + 1)
        while not ctl.messages[topic].empty():
            ctl.messages[topic].get()
        since = time.time()
        ctl.wait(telemetry_topic(FLEET, DEVICE), lambda d, m: d["window_end"] > since + 2)
        assert ctl.messages[topic].empty(), "health sent after the fleet set health_interval_s = 0"
    finally:
        kill_agent(proc)


def test_transfer_survives_a_broker_restart_and_an_agent_kill(mosquitto, signed_bundles, tmp_path):
    """Mid-download the broker restarts, then the agent is SIGKILLed: the update still commits,
    and after the kill the transfer resumes from the last verified chunk instead of chunk 0."""
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "chunk_timeout_s = 1.0")
    try:
        ctl = Controller(mosquitto.port, chunk_delay_s=0.15)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        v1 = open_bundle(signed_bundles["v1"])
        total = sum(len(f.chunks) for f in v1.manifest.files)
        ctl.chunks.add("install-v1", signed_bundles["v1"])
        ctl.publish(ota_offer_topic(FLEET, DEVICE), make_offer(v1, "install-v1", {"type": "mqtt"}).model_dump_json(),
                    retain=True)
        until(lambda: len(ctl.requested) >= 2)
        mosquitto.restart()  # the broker goes away mid-transfer (persistent sessions, retained offer)
        until(lambda: len(set(ctl.requested)) >= total // 2)
        proc.kill()  # a power cut in DOWNLOADING
        proc.wait()
        done_before = len(set(ctl.requested))
        ctl.requested.clear()
        proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "chunk_timeout_s = 1.0")
        final = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: d.get("state") == "reporting" and "result" in d)
        assert final["result"] == "committed", (final, log.read_text()[-3000:])
        assert len(set(ctl.requested)) < total, "after the restart the transfer started again from chunk 0"
        assert len(set(ctl.requested)) + done_before >= total
        state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["model"] is not None)
        assert state["model"]["version"] == "1.0.0"
    finally:
        kill_agent(proc)


def test_an_agent_stopped_mid_download_resumes_the_download_at_its_next_start(mosquitto, signed_bundles, tmp_path):
    """SIGTERM (systemctl restart) mid-download: closing the MQTT session cancelled the chunk being waited for, and
    the update failed with "CancelledError": its chunks were removed and the offer's id counted as done, so the
    retained offer was not taken again after the restart. It stops where it is now, and resumes."""
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "chunk_timeout_s = 1.0")
    try:
        ctl = Controller(mosquitto.port, chunk_delay_s=0.1)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        total = sum(len(f.chunks) for f in open_bundle(signed_bundles["v1"]).manifest.files)
        ctl.offer("install-v1", signed_bundles["v1"])
        until(lambda: len(set(ctl.requested)) >= 3)
        ctl.answer_chunks = False  # a chunk is being waited for when the agent stops
        until(lambda: len(ctl.requested) > len(set(ctl.requested)) or len(set(ctl.requested)) >= 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        data = json.loads((tmp_path / "state" / "update.json").read_text())
        assert data["state"] == "downloading" and not data.get("reason"), data
        assert "CancelledError" not in log.read_text() and "resumes at the next start" in log.read_text()
        done_before = len(set(ctl.requested)) - 1  # the one waited for was not answered
        ctl.requested.clear()
        ctl.answer_chunks = True
        proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "chunk_timeout_s = 1.0")
        final = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: d.get("update_id") == "install-v1" and
                         "result" in d)
        assert final["result"] == "committed", (final, log.read_text()[-3000:])
        assert len(set(ctl.requested)) <= total - done_before, "the download started again from chunk 0"
    finally:
        kill_agent(proc)


def test_an_update_resumed_after_a_kill_keeps_the_old_model_serving_and_after_it_fails(mosquitto, signed_bundles,
                                                                                      tmp_path):
    """SIGKILL mid-download of v1.1.0 on a box serving v1.0.0: after the restart, v1.0.0 serves while the download
    resumes, and still serves when the resumed update fails (it was served by nothing until the next restart)."""
    extra = "chunk_timeout_s = 1.0"
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
    try:
        ctl = Controller(mosquitto.port, chunk_delay_s=0.15)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        assert ctl.install("install-v1", signed_bundles["v1"])["result"] == "committed"
        ctl.requested.clear()
        ctl.offer("u2", signed_bundles["v2"])
        until(lambda: len(ctl.requested) >= 2)
        ctl.answer_chunks = False  # the controller stalls: the download cannot finish before the checks below
        # the stall shows in the agent's log (it said nothing while asking again and again)
        until(lambda: "no answer from the controller for" in log.read_text())
        assert "is `edgeglm fleet serve` running" in log.read_text()
        proc.kill()  # a power cut in DOWNLOADING
        proc.wait()
        assert json.loads((tmp_path / "state" / "update.json").read_text())["state"] == "downloading"

        proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
        until(lambda: _ready(http_port))
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.0.0"
        assert json.loads((tmp_path / "state" / "update.json").read_text())["state"] == "downloading"
        assert http_json(http_port, "/v1/completions", {"prompt": "def f(", "max_tokens": 3})["usage"][
            "completion_tokens"] == 3

        ctl.chunks.bundles.pop("u2")  # the controller no longer serves it: the resumed update fails
        ctl.answer_chunks = True
        final = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: d.get("update_id") == "u2" and "result" in d)
        assert final["result"] == "failed", final
        assert _ready(http_port), log.read_text()[-3000:]
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.0.0"
        state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"] and d["model"] is not None, timeout=30)
        assert state["model"]["version"] == "1.0.0"
    finally:
        kill_agent(proc)


def _ready(port: int) -> bool:
    try:
        return http_json(port, "/readyz")["status"] == "ready"
    except (OSError, ValueError):  # not listening yet, or 503
        return False


def test_an_offer_that_comes_while_an_update_runs_is_taken_after_it(mosquitto, signed_bundles, tmp_path):
    """v1.1.0 is offered, and while it downloads the controller offers v1.2.0 (replacing the retained offer,
    which the broker does not send again): v1.1.0 finishes, then v1.2.0 is installed. The second offer used to
    be dropped ("ignored: an update is running") and the box stayed on v1.1.0 until its next reconnect."""
    from bundles import variant

    v3 = variant(signed_bundles["v2"], tmp_path / "v3", signed_bundles["key"], version="1.2.0")
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "chunk_timeout_s = 1.0")
    try:
        ctl = Controller(mosquitto.port, chunk_delay_s=0.05)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        ctl.answer_chunks = False  # u2 stays in DOWNLOADING until the second offer has reached the agent
        for update_id, bundle in (("u2", signed_bundles["v2"]), ("u3", v3)):
            ctl.offer(update_id, bundle)
            until(lambda: update_id in log.read_text())  # the agent took u2 / saw u3
        ctl.answer_chunks = True
        results = {}
        while len(results) < 2:
            status = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: "result" in d)
            results[status["update_id"]] = status["result"]
        assert results == {"u2": "committed", "u3": "committed"}, log.read_text()[-3000:]
        state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: (d["model"] or {}).get("version") == "1.2.0")
        assert state["online"]
    finally:
        kill_agent(proc)


def test_an_offer_too_large_to_take_is_reported_failed_not_dropped(mosquitto, signed_bundles, tmp_path):
    """An offer over what the agent takes in one message (OFFER_MAX_BYTES: the manifest of a bundle of some
    GB in small chunks) used to be dropped without a word, and a rollout waited for this device forever:
    the agent reports it failed, with the update id and the reason."""
    from ota.transfer import OFFER_MAX_BYTES

    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path)
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        offer = make_offer(open_bundle(signed_bundles["v2"]), "u-huge", {"type": "mqtt", "pad": "x" * OFFER_MAX_BYTES})
        ctl.publish(ota_offer_topic(FLEET, DEVICE), offer.model_dump_json(), retain=True)
        status = ctl.wait(ota_status_topic(FLEET, DEVICE), lambda d, m: "result" in d)
        assert status["update_id"] == "u-huge" and status["result"] == "failed"
        assert f"more than the {OFFER_MAX_BYTES}-byte limit" in status["reason"], status
    finally:
        kill_agent(proc)


def test_the_wall_clock_set_back_keeps_the_agent_reporting_and_reconnecting(mosquitto, tmp_path, monkeypatch):
    """The box's clock is stepped back an hour after the agent started (NTP correcting a clock that ran ahead):
    its state stays valid (uptime_s counts on the monotonic clock; it went negative and failed validation) and
    it reconnects after a broker restart (the Will could not be built, so the agent never reconnected)."""
    from agent.config import load_config
    from agent.daemon import Agent

    agent = Agent(load_config(None, {"model.slots_dir": str(tmp_path / "state"), "http.port": 0, "mqtt.enabled": True,
                                     "mqtt.port": mosquitto.port, "device.id": DEVICE, "device.fleet": FLEET,
                                     "mqtt.reconnect_min_delay_s": 0.2, "mqtt.reconnect_max_delay_s": 1.0}))
    stop = threading.Event()
    agent.start()
    loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    loop.start()
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"], timeout=30)
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() - 3600.0)
        assert agent.reported_state().uptime_s >= 0
        connects = agent.session.stats.connects
        mosquitto.restart()
        until(lambda: agent.session.stats.connects > connects)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"] and d["ts"] < wall() - 1800, timeout=30)
    finally:
        stop.set()
        loop.join(10)
        agent.shutdown(5)


def test_a_second_agent_on_the_same_state_directory_stops_with_one_line(agent_process, mosquitto, tmp_path):
    """A second `edgeglm agent run` with the same config started, and the two took the device's MQTT session from
    each other in turn (the log said only "the network connection ended") and ran the updater on the same slots."""
    proc, http_port, log = agent_process
    ctl = Controller(mosquitto.port)
    ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
    second = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--config", str(tmp_path / "agent.toml"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"model.slots_dir {tmp_path / 'state'}: in use by another edgeglm agent (pid {proc.pid})" in second.stderr
    assert proc.poll() is None  # the first one serves on
    assert "already connected" not in mosquitto.log_text()


@pytest.mark.parametrize("case", ["slots_dir is a file", "slots_dir under a file", "empty --config"])
def test_a_state_dir_or_config_path_that_cannot_be_used_is_one_line(tmp_path, case):
    """`model.slots_dir` naming a file said "cannot be created ([Errno 17] File exists)" after a prefix-cache
    warning (two lines); `--config ''` read "." and said "Is a directory"."""
    (tmp_path / "file").write_text("x")
    slots = {"slots_dir is a file": tmp_path / "file", "slots_dir under a file": tmp_path / "file" / "state"}
    args = ["--config", ""] if case == "empty --config" else []
    env = {**os.environ, "EDGEGLM_MODEL__SLOTS_DIR": str(slots.get(case, tmp_path / "state")),
           "EDGEGLM_MQTT__ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "agent", *args, "--port", "0"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    expected = {"slots_dir is a file": f"model.slots_dir {tmp_path / 'file'}: exists and is not a directory",
                "slots_dir under a file": f"model.slots_dir {tmp_path / 'file' / 'state'}: cannot be created (Not a "
                                          "directory)",
                "empty --config": "config file '': an empty path; give the config file's path"}[case]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_committed_model_whose_agent_keeps_dying_goes_back_by_itself(mosquitto, signed_bundles, tmp_path):
    """v1.1.0 passes its self-test and commits; then the agent process dies (SIGKILL here: what a native crash in
    the engine, the OOM killer or a power cut looks like from the next start) before v1.1.0 has served its
    probation. Clean stops (SIGTERM) do not count; at the second death (`ota.probation_deaths = 2`) the agent goes
    back to v1.0.0 before loading v1.1.0 again, and reports the update rolled back on its retained OTA status."""
    extra = "probation_deaths = 2\nprobation_s = 3600.0"

    def start():
        proc, port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
        until(lambda: _ready(port) or proc.poll() is not None)
        return proc, port, log

    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        for update_id, bundle in (("install-v1", "v1"), ("u2", "v2")):
            final = ctl.install(update_id, signed_bundles[bundle])
            assert final["result"] == "committed", final
        for _ in range(2):  # clean stops: no deaths
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            proc, http_port, log = start()
            assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.1.0"
        proc.kill()  # death 1: the next start serves v1.1.0 again
        proc.wait()
        proc, http_port, log = start()
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.1.0"
        assert "ended without a clean stop 1 time(s)" in log.read_text()
        proc.kill()  # death 2: back to v1.0.0 at the start
        proc.wait()
        proc, http_port, log = start()
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.0.0", log.read_text()[-3000:]
        final = ctl.wait(ota_status_topic(FLEET, DEVICE),
                         lambda d, m: d.get("update_id") == "u2" and d.get("result") == "rolled_back")
        assert "ended without a clean stop 2 times" in final["reason"] and final["active_slot"] == "a"
        assert "OTA update u2 rolled back: probation" in log.read_text()
        state = ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"] and d["model"] is not None, timeout=30)
        assert state["model"]["version"] == "1.0.0"
    finally:
        kill_agent(proc)


def test_an_outcome_the_broker_never_had_is_published_at_the_next_start(mosquitto, signed_bundles, tmp_path):
    """The agent goes back from v1.1.0 at a start while the broker is away, then is killed before the broker comes
    back: the rollback's report was held in the MQTT session's memory and died with the process (the fleet never
    heard why the box serves v1.0.0). It is kept in the state dir until the broker acknowledges it, and the next
    start publishes it; once acknowledged the record goes."""
    extra = "probation_deaths = 1\nprobation_s = 3600.0"
    kept = tmp_path / "state" / "ota-report.json"
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        for update_id, bundle in (("install-v1", "v1"), ("u2", "v2")):
            assert ctl.install(update_id, signed_bundles[bundle])["result"] == "committed"
        until(lambda: not kept.exists())  # u2's outcome acknowledged: its record went
        proc.kill()  # a death on probation
        proc.wait()
        mosquitto.stop()
        proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
        until(lambda: _ready(http_port) or proc.poll() is not None)
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.0.0", log.read_text()[-3000:]
        assert json.loads(kept.read_text())["result"] == "rolled_back"
        proc.kill()  # before the broker is back: the report held in memory dies with the process
        proc.wait()
        mosquitto.start()
        ctl = Controller(mosquitto.port)
        proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, extra)
        final = ctl.wait(ota_status_topic(FLEET, DEVICE),
                         lambda d, m: d.get("update_id") == "u2" and d.get("result") == "rolled_back")
        assert "ended without a clean stop 1 times" in final["reason"] and final["active_slot"] == "a"
        assert "(rolled_back) had not reached the broker when the agent stopped; published again" in log.read_text()
        until(lambda: not kept.exists())
        assert http_json(http_port, "/v1/models")["data"][0]["id"] == "tiny-1.0.0"
    finally:
        kill_agent(proc)


def test_a_kept_outcome_is_dropped_when_the_agent_runs_without_mqtt(tmp_path):
    """With `mqtt.enabled = false` nobody takes an outcome: kept, it was published, stale, by the first start with
    MQTT on, and the controller read it as the device's latest."""
    from agent.config import load_config
    from agent.daemon import Agent

    kept = tmp_path / "state" / "ota-report.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({"update_id": "u2", "ts": 1.0, "state": "reporting", "result": "rolled_back"}))
    agent = Agent(load_config(None, {"model.slots_dir": str(tmp_path / "state"), "http.port": 0,
                                     "ota.require_signature": False}))
    agent.start()
    try:
        assert not kept.exists()
    finally:
        agent.shutdown(5)


def test_a_model_that_served_its_probation_is_off_probation(mosquitto, signed_bundles, tmp_path):
    """Once the committed model has served `ota.probation_s` in one run, the agent ends its probation (the file
    goes): a crash after that is no longer taken for the model's fault."""
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path, "probation_s = 2.0")
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        assert ctl.install("install-v1", signed_bundles["v1"])["result"] == "committed"
        probation = tmp_path / "state" / "probation.json"
        until(lambda: not probation.exists())
        assert "model 1.0.0 (update install-v1) passed its probation" in log.read_text()
    finally:
        kill_agent(proc)


def test_telemetry_reports_each_request_under_the_model_that_served_it_across_an_update(mosquitto, signed_bundles,
                                                                                      tmp_path):
    """HTTP clients keep the agent busy while v1.1.0 replaces v1.0.0. Every request is counted in a report tagged
    with the version that answered it (the answer's `model` field says which), requests still running on v1.0.0 at
    the switch included: the window that held the switch used to go out tagged 1.1.0 with v1.0.0's requests and
    the 503s of the switch in it, and a rollout's gate compared them as the new version's."""
    proc, http_port, log = start_agent(mosquitto, signed_bundles, tmp_path)
    try:
        ctl = Controller(mosquitto.port)
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"])
        assert ctl.install("install-v1", signed_bundles["v1"])["result"] == "committed"
        until(lambda: _ready(http_port))

        answered: dict[str, int] = {}  # model id -> successful answers
        failed: list[int] = []  # HTTP status of each answer that was a server error
        stop, counting = threading.Event(), threading.Lock()  # three clients count: no lost increment

        def client():
            while not stop.is_set():
                try:
                    out = http_json(http_port, "/v1/completions", {"prompt": "def main(", "max_tokens": 24})
                    with counting:
                        answered[out["model"]] = answered.get(out["model"], 0) + 1
                except urllib.error.HTTPError as exc:
                    failed.append(exc.code)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for c in clients:
            c.start()
        try:
            until(lambda: sum(answered.values()) >= 10)
            final = ctl.install("u2", signed_bundles["v2"])
            assert final["result"] == "committed", final
            until(lambda: answered.get("tiny-1.1.0", 0) >= 10)
        finally:
            stop.set()
            for c in clients:
                c.join(60)
        proc.send_signal(signal.SIGTERM)  # its last report goes out before the offline state
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        ctl.wait(state_topic(FLEET, DEVICE), lambda d, m: d["online"] is False)
        reports = {}
        while True:  # every report is in by now (QoS 1, published before the offline state)
            try:
                msg = ctl.messages[telemetry_topic(FLEET, DEVICE)].get(timeout=1.0)
            except queue.Empty:
                break
            r = json.loads(msg.payload)
            reports[r["window_end"]] = r  # (a QoS 1 second copy counts once, as the controller counts it)
        counted, errors = {}, {}
        for r in reports.values():
            counted[r["model_version"]] = counted.get(r["model_version"], 0) + r["count"]
            errors[r["model_version"]] = errors.get(r["model_version"], 0) + r["errors"]
        assert answered.get("tiny-1.0.0", 0) >= 10 and answered["tiny-1.1.0"] >= 10
        assert counted.get("1.1.0") == answered["tiny-1.1.0"], (counted, answered, failed)
        assert counted.get("1.0.0") == answered["tiny-1.0.0"], (counted, answered, failed)
        assert not errors.get("1.1.0"), (errors, failed)  # the switch's 503s are not the new model's
        assert sum(errors.values()) == len(failed), (errors, failed)
        ordered = sorted(reports.values(), key=lambda r: r["window_start"])  # still windows without gaps
        assert all(a["window_end"] == b["window_start"] for a, b in zip(ordered, ordered[1:])), ordered
    finally:
        kill_agent(proc)


def test_a_reload_asked_while_the_agent_still_starts_does_not_end_it(tmp_path):
    """`systemctl reload` is accepted as soon as the process runs (Type=exec); SIGHUP's default action ended an
    agent still reading its config or importing its runtime, which systemd takes for a clean exit (no restart).
    Here the SIGHUP comes while the config is read (that read then fails, to end the run where it stands)."""
    script = ("import os, signal, sys\n"
              "import agent.config\n"
              "from agent.errors import ConfigError\n"
              "def reading(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n"
              "    raise ConfigError('the config was being read')\n"
              "agent.config.load_config = reading\n"
              "from agent.cli import main\n"
              "sys.exit(main(['agent', '--port', '0']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # (-1: ended by the SIGHUP)
    assert "edgeglm agent: error: the config was being read" in proc.stderr


def test_sighup_reads_the_config_file_again_and_applies_what_applies_live(signed_bundles, tmp_path):
    """SIGHUP (`systemctl reload edgeglm-agent`) killed the agent without its clean shutdown (a model on probation
    counted it as a death). Now the file is read again: sampling applies at once, the HTTP port keeps its running
    value until a restart (a warning names it), and a file that no longer loads keeps the running config."""
    port = free_port()

    def config(max_tokens: int, http_port: int, extra: str = "") -> str:
        return (f'[model]\nbundle = "{signed_bundles["v1"]}"\nslots_dir = "{tmp_path / "state"}"\n'
                f'[http]\nport = {http_port}\n[sampling]\nmax_tokens = {max_tokens}\n'
                f'[ota]\ntrusted_keys = "{signed_bundles["keys"]}"\n{extra}')
    path = tmp_path / "agent.toml"
    path.write_text(config(7, port))
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(path)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _ready(port), 120)

        def tokens() -> int:  # greedy, without max_tokens: the config's default decides
            answer = http_json(port, "/v1/completions", {"prompt": "import os\n", "temperature": 0})
            assert answer["choices"][0]["finish_reason"] == "length", answer
            return answer["usage"]["completion_tokens"]
        assert tokens() == 7
        path.write_text(config(3, free_port()))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: tokens() == 3, 30)
        assert proc.poll() is None and _ready(port)  # alive, on the same port
        wait_until(lambda: "http.port changed; applied at the next restart" in log.read_text(), 10)
        path.write_text(config(5, port, "[sampling.oops]\n"))  # broken: refused, the running config stays
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reload refused, the running config is kept" in log.read_text(), 10)
        assert tokens() == 3 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_agent(proc)
