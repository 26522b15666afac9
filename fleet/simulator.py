"""Simulated agents: many devices in one process, speaking the agents' exact MQTT protocol.

Each `SimDevice` uses the agent's own `MqttSession` (state + Will, desired config, OTA offers,
telemetry) but no model: an offer is "installed" by reading the version from the offered
manifest (signature and version checks as the real updater does them are not repeated here),
the OTA statuses the real updater sends are reported, and telemetry is drawn from a per-version
latency profile. For controller tests and the fleet-scale benchmark.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field

from agent.mqtt import MqttSession, MqttSettings, Received
from agent.topics import (DesiredConfig, LatencyPercentiles, ModelRef, ReportedState, TelemetryReport,
                          desired_topic, ota_offer_topic, ota_status_topic)
from ota.update import Offer


@dataclass
class SimProfile:
    per_token_ms: dict[str, float] = field(default_factory=dict)  # by model version; default 10 ms
    fail_self_test: set[str] = field(default_factory=set)  # versions whose self-test fails
    requests_per_report: int = 5


class SimDevice:
    def __init__(self, mqtt: MqttSettings, fleet: str, device: str, version: str = "1.0.0",
                 profile: SimProfile | None = None, seed: int = 0):
        self.fleet, self.device, self.version = fleet, device, version
        self.profile = profile or SimProfile()
        self.rng = random.Random(seed)
        self.applied_config: int | None = None
        self.started = time.time()
        self.session = MqttSession(mqtt, fleet=fleet, device=device, state_fn=self.state)
        self.session.subscribe(ota_offer_topic(fleet, device), Offer, empty_ok=True)
        self.session.subscribe(desired_topic(fleet, device), DesiredConfig, empty_ok=True)
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sim-{device}", daemon=True)

    def state(self, online: bool = True) -> ReportedState:
        return ReportedState(device=self.device, online=online, agent_version="0.1.0-sim",
                             execution_path="onnxruntime:cpu",
                             model=ModelRef(name="sim", version=self.version, sha256="0" * 64), active_slot="a",
                             applied_config_version=self.applied_config, uptime_s=time.time() - self.started,
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
        version = json.loads(offer.manifest_bytes())["version"]
        for state in ("offered", "downloading", "verifying", "installing", "self_test"):
            self._status(offer, state=state)
        if version in self.profile.fail_self_test:
            self._status(offer, state="reporting", result="failed", reason="self_test: golden check failed")
        else:
            self.version = version
            self.session.publish_state()
            self._status(offer, state="reporting", result="committed")

    def report(self, window_s: float = 1.0) -> None:
        """Publish one telemetry window drawn from the latency profile of the current version."""
        base = self.profile.per_token_ms.get(self.version, 10.0)
        samples = sorted(base * self.rng.uniform(0.9, 1.1) for _ in range(20))
        now = time.time()
        self.session.publish_telemetry(TelemetryReport(
            device=self.device, window_start=now - window_s, window_end=now, count=self.profile.requests_per_report,
            ttft_ms=LatencyPercentiles(p50=base * 5, p95=base * 6, p99=base * 7),
            per_token_ms=LatencyPercentiles(p50=samples[10], p95=samples[18], p99=samples[19]),
            tokens_per_s=1000.0 / base, model_version=self.version, execution_path="onnxruntime:cpu"))
