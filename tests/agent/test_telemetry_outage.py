"""Telemetry through a broker outage, end to end: a real agent process serving a real bundle.

The broker is stopped while the agent keeps serving HTTP requests, then started again. Reports
are windows that follow each other without gaps (each starts where the previous one ended), so
the controller can check that none is missing: every window arrives, and the requests counted
in them add up to the requests made, including those served while the broker was down. With a
buffer too small for the outage, the loss is not silent: the next report says how many were dropped.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import urllib.request

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.topics import controller_presence_topic, latency_topic, state_topic, telemetry_topic
from broker import free_port

FLEET, DEVICE = "fleet1", "tdev"


class TelemetryCollector:
    """A controller's telemetry subscription with a persistent session (the broker queues for it)."""

    def __init__(self, port: int):
        self.reports: queue.Queue = queue.Queue()
        self.online: queue.Queue = queue.Queue()
        self.histograms: dict[float, dict] = {}  # window_end -> LatencyHistograms, in arrival order
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="telemetry-collector",
                                  protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(telemetry_topic(FLEET, DEVICE), 1), (state_topic(FLEET, DEVICE), 1), (latency_topic(FLEET, DEVICE), 1)])
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _message(self, client, userdata, msg) -> None:
        if not msg.payload:
            return
        data = json.loads(msg.payload)
        if msg.topic == latency_topic(FLEET, DEVICE):
            self.histograms[data["window_end"]] = data
            return
        (self.reports if msg.topic == telemetry_topic(FLEET, DEVICE) else self.online).put(data)

    def wait_online(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.online.get(timeout=0.5).get("online"):
                    return
            except queue.Empty:
                pass
        raise AssertionError("the agent did not report itself online")

    def collect_until(self, done, timeout: float = 90.0) -> list[dict]:
        """Reports until `done(reports)`; a QoS 1 second copy (the broker resends a report whose PUBACK it had not
        read when it stopped) counts once, as the fleet controller's store counts it (one row per window_end)."""
        got: list[dict] = []
        seen: set[tuple] = set()
        deadline = time.monotonic() + timeout
        while not done(got):
            assert time.monotonic() < deadline, f"telemetry incomplete after {timeout} s: {summary(got)}"
            try:
                report = self.reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if (report["window_start"], report["window_end"]) not in seen:
                seen.add((report["window_start"], report["window_end"]))
                got.append(report)
        return got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def summary(reports: list[dict]) -> list[tuple]:
    return [(r["window_start"], r["window_end"], r["count"], r["dropped_reports"]) for r in reports]


def start_agent(tmp_path, bundle, keys, broker_port: int, buffer: int, histograms: bool = True):
    http_port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[device]
id = "{DEVICE}"
fleet = "{FLEET}"

[model]
bundle = "{bundle}"
slots_dir = "{tmp_path / 'state'}"

[http]
port = {http_port}

[telemetry]
interval_s = 0.3
histograms = {str(histograms).lower()}

[mqtt]
enabled = true
port = {broker_port}
reconnect_min_delay_s = 0.2
reconnect_max_delay_s = 0.5
telemetry_buffer = {buffer}

[ota]
trusted_keys = "{keys}"
""")
    log = open(tmp_path / "agent.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, http_port


GENERATED: list[int] = []  # completion_tokens of every answer `complete` got, in order


def complete(port: int) -> None:
    body = json.dumps({"prompt": "def main(", "max_tokens": 3}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        tokens = json.loads(resp.read())["usage"]["completion_tokens"]
        assert tokens >= 1
        GENERATED.append(tokens)


def wait_ready(port: int, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the agent never became ready")


@pytest.fixture
def outage(mosquitto, signed_bundles, tmp_path):
    """Run: (buffer size) -> (reports from the first one on, requests made); the broker goes down mid-way."""
    procs, collectors = [], []

    def run(buffer: int, outage_requests: int, spacing_s: float = 1.0) -> tuple[list[dict], int]:
        collector = TelemetryCollector(mosquitto.port)
        collectors.append(collector)
        run.collector = collector
        GENERATED.clear()
        proc, http_port = start_agent(tmp_path, signed_bundles["v1"], signed_bundles["keys"], mosquitto.port, buffer)
        procs.append(proc)
        wait_ready(http_port, proc)
        collector.wait_online()
        for _ in range(2):
            complete(http_port)
        mosquitto.stop()
        for _ in range(outage_requests):  # served while the broker is down, in several windows (0.3 s each) with
            complete(http_port)  # idle ones between them: these must still be reported. Counted, not timed: a
            time.sleep(spacing_s)  # loaded box fitted fewer requests (and windows) into a fixed outage
        mosquitto.start()
        complete(http_port)
        made = 2 + outage_requests + 1
        after = time.time()
        reports = collector.collect_until(
            lambda got: sum(r["count"] for r in got) >= made and any(r["window_end"] > after for r in got)
            or (buffer < 10 and any(r["dropped_reports"] for r in got) and any(r["window_end"] > after for r in got)))
        return reports, made

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for collector in collectors:
        collector.close()


def test_no_telemetry_report_is_lost_through_a_broker_restart(outage):
    reports, made = outage(buffer=100, outage_requests=5)
    reports.sort(key=lambda r: r["window_start"])
    gaps = [(a["window_end"], b["window_start"]) for a, b in zip(reports, reports[1:])
            if b["window_start"] != a["window_end"]]
    assert not gaps, f"windows missing between reports: {gaps}"
    assert sum(r["count"] for r in reports) == made, summary(reports)
    assert not any(r["dropped_reports"] for r in reports)
    busy = [r for r in reports if r["count"]]
    assert len(busy) >= 4  # the outage's requests came in several windows, all delivered (idle ones between them
    # are buffered as one report each stretch: they still cover the time without a gap, checked above)
    # each busy window's latency histograms came too (buffered with its report, sent just before it), and they
    # count every latency: one TTFT per request, one per-token gap per token after an answer's first
    histograms = outage.collector.histograms
    assert all(r["window_end"] in histograms for r in busy), (sorted(histograms), summary(busy))
    counted = lambda h, kind: sum(c for _, c in (h[kind] or {"bins": []})["bins"])  # noqa: E731
    assert [counted(histograms[r["window_end"]], "ttft_ms") for r in busy] == [r["count"] for r in busy]
    assert sum(counted(histograms[r["window_end"]], "per_token_ms") for r in busy) == sum(t - 1 for t in GENERATED)
    assert not set(histograms) - {r["window_end"] for r in busy}  # none for an idle window


def test_a_buffer_overflow_during_an_outage_is_counted_not_silent(outage):
    reports, made = outage(buffer=2, outage_requests=5, spacing_s=0.7)
    reports.sort(key=lambda r: r["window_start"])
    dropped = sum(r["dropped_reports"] for r in reports)
    gaps = [b["window_start"] - a["window_end"] for a, b in zip(reports, reports[1:])
            if b["window_start"] != a["window_end"]]
    assert dropped >= 1 and gaps, summary(reports)  # reports were lost, and the next one says so


def test_telemetry_histograms_false_sends_the_reports_alone(mosquitto, signed_bundles, tmp_path):
    """`telemetry.histograms = false` (a metered link): the reports, no latency topic."""
    collector = TelemetryCollector(mosquitto.port)
    proc, http_port = start_agent(tmp_path, signed_bundles["v1"], signed_bundles["keys"], mosquitto.port, 100,
                                  histograms=False)
    try:
        wait_ready(http_port, proc)
        collector.wait_online()
        complete(http_port)
        complete(http_port)
        reports = collector.collect_until(lambda got: sum(r["count"] for r in got) >= 2)
        # a window's histograms go out before its report, on the same connection: by now they would be here
        assert sum(r["count"] for r in reports) == 2 and collector.histograms == {}
    finally:
        proc.kill()
        proc.wait()
        collector.close()


def _held(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("edgeglm_mqtt_telemetry_held_reports "):
                return float(line.split()[1])
    raise AssertionError("no edgeglm_mqtt_telemetry_held_reports on /metrics")


def test_the_agent_holds_its_telemetry_while_the_controller_says_it_is_away(mosquitto, signed_bundles, tmp_path):
    """The fleet controller's presence (retained, published here as `fleet serve` does): while it says offline
    the agent serves on and holds its reports (/metrics says how many), with nothing on the telemetry topic; once
    it says online they all come, in order, without a gap, counting every request."""
    collector = TelemetryCollector(mosquitto.port)
    presence = paho.Client(CallbackAPIVersion.VERSION2, client_id="the-controller", protocol=paho.MQTTv5)
    presence.connect("127.0.0.1", mosquitto.port)
    presence.loop_start()
    say = lambda online: presence.publish(  # noqa: E731
        controller_presence_topic(FLEET), json.dumps({"online": online}), 1, retain=True).wait_for_publish(10)
    proc, http_port = start_agent(tmp_path, signed_bundles["v1"], signed_bundles["keys"], mosquitto.port, 100)
    try:
        say(True)
        wait_ready(http_port, proc)
        collector.wait_online()
        complete(http_port)
        before = collector.collect_until(lambda got: sum(r["count"] for r in got) >= 1)
        say(False)
        deadline = time.monotonic() + 60
        while _held(http_port) < 1:  # (an idle window taken after the agent heard it)
            assert time.monotonic() < deadline, "the agent held no report"
            time.sleep(0.2)
        for _ in range(3):
            complete(http_port)
        while _held(http_port) < 2:  # the windows with the requests are held too (idle ones merge into one)
            assert time.monotonic() < deadline, "the agent did not hold the reports of its requests"
            time.sleep(0.2)
        while not collector.reports.empty():  # (idle reports sent before the agent heard it: still on their way)
            before.append(collector.reports.get())
        assert sum(r["count"] for r in before) == 1, summary(before)  # none of the requests while it is away
        say(True)
        after = collector.collect_until(lambda got: sum(r["count"] for r in got) >= 3)
        reports = sorted(before + after, key=lambda r: r["window_start"])
        assert [b["window_start"] - a["window_end"] for a, b in zip(reports, reports[1:])
                if b["window_start"] != a["window_end"]] == [], summary(reports)
        assert sum(r["count"] for r in reports) == 4 and not any(r["dropped_reports"] for r in reports)
        deadline = time.monotonic() + 60
        while _held(http_port):
            assert time.monotonic() < deadline, "reports still held after the controller came back"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
        collector.close()
        presence.loop_stop()
        presence.disconnect()
