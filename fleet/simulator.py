"""Simulated agents: many devices in one process, speaking the agents' exact MQTT protocol.

Each `SimDevice` uses the agent's own `MqttSession` (state + Will, desired config, OTA offers,
telemetry) but no model: an offer is "installed" by reading the version from the offered
manifest. Signatures are not verified, but the version order is checked as the real updater
checks it (ota.versions.check_upgrade: a plain offer not newer than the serving version is
refused as a downgrade; the same manifest offered again is a no-op "committed"), and a rollback
offer is refused unless its `rollback_terms` name this fleet and device and replace the version it
serves (ota/update.py `_check_rollback`, less the signature and expiry). The OTA statuses the real
updater sends are reported, and telemetry is drawn from a per-version
latency profile. For controller tests and the fleet-scale benchmark.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass, field

from agent import __version__
from agent.mqtt import MqttSession, MqttSettings, Received
from agent import histogram
from agent.topics import (DesiredConfig, DeviceHealth, LatencyHistogram, LatencyHistograms, LatencyPercentiles,
                          ModelRef, ReportedState, TelemetryReport, desired_topic, health_topic, ota_offer_topic,
                          ota_status_topic)
from ota.errors import VersionError
from ota.update import Offer
from ota.versions import check_upgrade


@dataclass
class SimProfile:
    per_token_ms: dict[str, float] = field(default_factory=dict)  # by model version; default 10 ms
    fail_self_test: set[str] = field(default_factory=set)  # versions whose self-test fails
    requests_per_report: int = 5
    errors_per_report: int = 0
    rss_mb: dict[str, float] = field(default_factory=dict)  # agent RSS by model version; default 200 MiB
    free_mb: dict[str, float] = field(default_factory=dict)  # memory it can still take, by version; default 2 GiB
    health: bool = True  # a DeviceHealth with each report (False: an agent from before health, or with it off)
    histograms: bool = True  # latency histograms with each report (False: an agent from before them, or with them off)


class SimDevice:
    def __init__(self, mqtt: MqttSettings, fleet: str, device: str, version: str = "1.0.0",
                 profile: SimProfile | None = None, seed: int = 0):
        self.fleet, self.device, self.version = fleet, device, version
        self.profile = profile or SimProfile()
        self.rng = random.Random(seed)
        self.applied_config: int | None = None
        self.started = time.monotonic()  # uptime survives a wall clock stepped back
        self.session = MqttSession(mqtt, fleet=fleet, device=device, state_fn=self.state)
        self.session.subscribe(ota_offer_topic(fleet, device), Offer, empty_ok=True)
        self.session.subscribe(desired_topic(fleet, device), DesiredConfig, empty_ok=True)
        self._seen: set[str] = set()
        self.offers: list[Offer] = []  # every offer acted on (taken or refused), in order
        self.manifest_sha256: str | None = None  # of the manifest it last installed (None: the one it started with)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sim-{device}", daemon=True)

    def state(self, online: bool = True) -> ReportedState:
        return ReportedState(device=self.device, online=online, agent_version=f"{__version__}+sim",
                             execution_path="onnxruntime:cpu",
                             model=ModelRef(name="sim", version=self.version, sha256="0" * 64), active_slot="a",
                             applied_config_version=self.applied_config, uptime_s=time.monotonic() - self.started,
                             ts=time.time())

    def start(self) -> "SimDevice":
        self.session.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.session.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            event = self.session.get_event(timeout=0.1)
            if isinstance(event, Received) and isinstance(event.payload, Offer):
                self._update(event.payload)
            elif isinstance(event, Received) and isinstance(event.payload, DesiredConfig):
                self.applied_config = event.payload.version
                self.session.publish_state()

    def _status(self, offer: Offer, **fields) -> None:
        body = {"update_id": offer.update_id, "ts": time.time(), **fields}
        self.session.publish(ota_status_topic(self.fleet, self.device), json.dumps(body).encode(), retain=True)

    def _update(self, offer: Offer) -> None:
        if offer.update_id in self._seen:
            return
        self._seen.add(offer.update_id)
        self.offers.append(offer)
        raw = offer.manifest_bytes()
        version = json.loads(raw)["version"]
        problem = self._refusal(offer, raw, version)
        if problem == "serving":  # the manifest it serves, offered again: done (the real agent's ALREADY_SERVING)
            self._status(offer, state="reporting", result="committed")
            return
        if problem:
            self._status(offer, state="offered")
            self._status(offer, state="reporting", result="failed", reason=f"offered: {problem}")
            return
        for state in ("offered", "downloading", "verifying", "installing", "self_test"):
            self._status(offer, state=state)
        if version in self.profile.fail_self_test:
            self._status(offer, state="reporting", result="failed", reason="self_test: golden check failed")
        else:
            self.version, self.manifest_sha256 = version, hashlib.sha256(raw).hexdigest()
            self.session.publish_state()
            self._status(offer, state="reporting", result="committed")

    def _refusal(self, offer: Offer, raw: bytes, version: str) -> str | None:
        """Why the real agent would refuse this offer before downloading it (None: it takes it; "serving": the
        manifest it serves)."""
        if not offer.rollback and hashlib.sha256(raw).hexdigest() == self.manifest_sha256:
            return "serving"
        if offer.rollback:
            terms = offer.rollback_terms
            if not offer.rollback_signature or terms is None:
                return "rollback offer carries no rollback_signature or terms; refused"
            if (terms.fleet, terms.device) != (self.fleet, self.device):
                return (f"rollback statement is for device {terms.fleet}/{terms.device}, this device is "
                        f"{self.fleet}/{self.device}; refused")
            if terms.replaces != self.version:
                return (f"rollback statement replaces version {terms.replaces or '(no model)'}, this device serves "
                        f"{self.version or 'no model'}; refused (issue one for the version it serves)")
        try:
            check_upgrade(self.version, version, rollback=offer.rollback)
        except VersionError as exc:
            return str(exc)
        return None

    def report(self, window_s: float = 1.0) -> None:
        """Publish one telemetry window drawn from the latency profile of the current version."""
        base = self.profile.per_token_ms.get(self.version, 10.0)
        samples = sorted(base * self.rng.uniform(0.9, 1.1) for _ in range(20))
        now = time.time()
        report = TelemetryReport(
            device=self.device, window_start=now - window_s, window_end=now, count=self.profile.requests_per_report,
            ttft_ms=LatencyPercentiles(p50=base * 5, p95=base * 6, p99=base * 7),
            per_token_ms=LatencyPercentiles(p50=samples[10], p95=samples[18], p99=samples[19]),
            tokens_per_s=1000.0 / base, errors=self.profile.errors_per_report, model_version=self.version,
            execution_path="onnxruntime:cpu")
        if report.count and self.profile.histograms:  # as an agent's: every latency counted (here the samples)
            report._histograms = LatencyHistograms(
                device=self.device, window_end=now, model_version=self.version,
                ttft_ms=LatencyHistogram(bins=histogram.bins(histogram.count([base * 5e-3] * report.count))),
                per_token_ms=LatencyHistogram(bins=histogram.bins(histogram.count(s / 1000 for s in samples))))
        self.session.publish_telemetry(report)
        # and a health snapshot with it, as agents send one (every telemetry.health_interval_s)
        if not self.profile.health:
            return
        self.session.publish_snapshot(health_topic(self.fleet, self.device), DeviceHealth(
            device=self.device, ts=now, uptime_s=time.monotonic() - self.started,
            rss_bytes=int(self.profile.rss_mb.get(self.version, 200.0) * 2**20),
            memory_available_bytes=int(self.profile.free_mb.get(self.version, 2048.0) * 2**20),
            cpu_seconds=1.0, cpus=4, disk_free_bytes=8 << 30))


class SimSwarm:
    """Many simulated devices in one process, for load: one MQTT connection per device, all
    driven by one thread over a selector (paho's external-loop API: `loop_read`/`loop_write`/
    `loop_misc`, no thread per client), so a process holds thousands.

    Each device connects with the agents' Will (`online: false`, retained), publishes its retained
    state, then one `TelemetryReport` every `interval_s` (the devices' phases spread evenly over
    the interval), QoS 1, on its own telemetry topic: the topics and payload models are the
    agents' own. `window_end` is the time of publishing, so `stored - window_end` in the
    controller's database is the ingest lag. With `health`, each report is followed by a `DeviceHealth` at
    QoS 0 on the health topic, as agents send it; with `histograms`, each is preceded by its window's
    `LatencyHistograms` (QoS 1, latency topic: 5 requests of 40 tokens), as agents send them. It does not
    answer offers or configs (SimDevice does).
    """

    def __init__(self, host: str, port: int, fleet: str, devices: list[str], interval_s: float = 1.0,
                 version: str = "1.0.0", per_token_ms: float = 10.0, seed: int = 0, health: bool = False,
                 histograms: bool = False):
        self.host, self.port, self.fleet = host, port, fleet
        self.health, self.histograms = health, histograms
        self.devices, self.interval_s, self.version = devices, interval_s, version
        self.per_token_ms = per_token_ms
        self.rng = random.Random(seed)
        self.sent = 0
        self.clients: dict[str, object] = {}

    def _client(self, device: str):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.topics import state_topic

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.fleet}-{device}", protocol=paho.MQTTv5)
        will = self._state(device, online=False).model_dump_json()
        client.will_set(state_topic(self.fleet, device), will, qos=1, retain=True)
        client.connect(self.host, self.port, keepalive=60)
        client.publish(state_topic(self.fleet, device), self._state(device, True).model_dump_json(), qos=1,
                       retain=True)
        return client

    def _state(self, device: str, online: bool) -> ReportedState:
        return ReportedState(device=device, online=online, agent_version=f"{__version__}+sim", execution_path="onnxruntime:cpu",
                             model=ModelRef(name="sim", version=self.version, sha256="0" * 64), active_slot="a",
                             uptime_s=0.0, ts=time.time())

    def _report(self, device: str) -> tuple[bytes, bytes | None]:
        """The report, and its histograms with `histograms`."""
        base = self.per_token_ms * self.rng.uniform(0.9, 1.1)
        now = time.time()
        hist = None
        if self.histograms:
            ttft = histogram.count(base * 5e-3 * self.rng.uniform(0.8, 1.3) for _ in range(5))
            gaps = histogram.count(base * 1e-3 * self.rng.uniform(0.9, 1.3) for _ in range(5 * 39))
            hist = LatencyHistograms(device=device, window_end=now, model_version=self.version,
                                     ttft_ms=LatencyHistogram(bins=histogram.bins(ttft)),
                                     per_token_ms=LatencyHistogram(bins=histogram.bins(gaps))
                                     ).model_dump_json().encode()
        return TelemetryReport(
            device=device, window_start=now - self.interval_s, window_end=now, count=5,
            ttft_ms=LatencyPercentiles(p50=base * 5, p95=base * 6, p99=base * 7),
            per_token_ms=LatencyPercentiles(p50=base, p95=base * 1.2, p99=base * 1.3),
            tokens_per_s=1000.0 / base, model_version=self.version,
            execution_path="onnxruntime:cpu").model_dump_json().encode(), hist

    def _health(self, device: str) -> bytes:
        return DeviceHealth(device=device, ts=time.time(), uptime_s=60.0, rss_bytes=self.rng.randrange(200, 400) << 20,
                            memory_available_bytes=2 << 30, cpu_seconds=10.0, load_1m=0.5, cpus=4,
                            disk_free_bytes=20 << 30, temperature_c=55.0).model_dump_json().encode()

    def connect(self) -> None:
        """Open every device's connection (blocking TCP connects, CONNACKs read by `run`)."""
        for device in self.devices:
            self.clients[device] = self._client(device)

    def run(self, duration_s: float, stop: threading.Event | None = None) -> int:
        """Serve the connections and publish telemetry for `duration_s`; reports sent in this run."""
        import selectors

        from agent.topics import health_topic, latency_topic, telemetry_topic

        sel = selectors.DefaultSelector()
        for device, client in self.clients.items():
            sel.register(client.socket(), selectors.EVENT_READ, client)
        topics = {d: telemetry_topic(self.fleet, d) for d in self.devices}
        health_topics = {d: health_topic(self.fleet, d) for d in self.devices}
        latency_topics = {d: latency_topic(self.fleet, d) for d in self.devices}
        n = len(self.devices)
        start = time.time()
        due = [(start + self.interval_s * i / n, d) for i, d in enumerate(self.devices)]  # sorted by time
        sent, nxt, last_misc = 0, 0, 0.0
        pending: set = set()  # clients with bytes the socket did not take yet
        end = start + duration_s
        try:
            while time.time() < end and not (stop and stop.is_set()):
                now = time.time()
                for _ in range(200):  # what is due (a bounded batch), then back to the sockets
                    if due[nxt][0] > now:
                        break
                    t, d = due[nxt]
                    client = self.clients[d]
                    report, hist = self._report(d)
                    if hist is not None:
                        client.publish(latency_topics[d], hist, qos=1)
                    client.publish(topics[d], report, qos=1)
                    if self.health:
                        client.publish(health_topics[d], self._health(d), qos=0)
                    if client.want_write():
                        pending.add(client)
                    sent += 1
                    due[nxt] = (t + self.interval_s, d)
                    nxt = (nxt + 1) % n
                wait = max(0.0, min(due[nxt][0] - time.time(), 0.05))
                for key, _ in sel.select(wait):
                    key.data.loop_read(100)
                if now - last_misc > 1.0:  # keepalive pings and PUBACK bookkeeping
                    for client in self.clients.values():
                        client.loop_misc()
                        if client.want_write():
                            pending.add(client)
                    last_misc = now
                for client in list(pending):
                    client.loop_write()
                    if not client.want_write():
                        pending.discard(client)
        finally:
            sel.close()
        self.sent += sent
        return sent

    def close(self) -> None:
        """Clean disconnects: the broker drops the Wills (the controller sees them as gone only if killed)."""
        for client in self.clients.values():
            client.disconnect()
