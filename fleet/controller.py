"""The fleet controller: the other end of the agents' topics.

    FleetController(settings).start()   subscribe to every device's state, telemetry, OTA status
                                        and chunk requests; keep the registry and latency store
    .offer(device, bundle_dir, ...)     publish a signed offer (retained) and serve its chunks
    .set_desired(device, settings)      publish a desired config (retained, versioned)

paho callbacks only parse and store; a malformed message is counted (`rejected_messages`) and
logged, never raised. The chunk server answers from the offers table, so offers made by another
process (`edgeglm fleet offer`) are served too.

Telemetry, the one high-rate stream, does not touch SQLite on paho's network thread: the callback
parses it and puts a row on a queue; a writer thread takes everything queued and stores it in one
transaction (many rows per commit under load, one at a time when idle), and prunes rows past the
retention once a minute. Measured with benchmarks/fleet_scale.py (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from agent.topics import (DesiredConfig, ReportedState, TelemetryReport, controller_subscriptions, desired_topic,
                          ota_offer_topic, split_topic)
from fleet.store import Store, telemetry_row
from ota.bundle import open_bundle
from ota.offers import make_offer
from ota.signing import read_signature
from ota.transfer import ChunkRequest, ChunkSource

log = logging.getLogger("edgeglm.fleet")
MAX_PAYLOAD = 1 << 20
MAX_BATCH = 5000  # telemetry rows per transaction
PRUNE_EVERY_S = 60.0


def offerable_bundle(bundle_dir: str | Path):
    """The bundle at `bundle_dir` if the controller may offer it, else a BundleError/SignatureError:
    every file matches its manifest and manifest.sig is there (the agents verify it against their
    trusted keys). `offer`, `edgeglm fleet offer` and `edgeglm fleet rollout` all check this."""
    bundle = open_bundle(bundle_dir)  # the controller never offers files that fail their manifest
    read_signature(bundle.root)  # nor an unsigned bundle, which no agent would activate
    return bundle


@dataclass
class ControllerSettings:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    db: Path = Path("fleet.db")
    fleet: str = "+"  # "+" = every fleet on the broker
    client_id: str = "edgeglm-controller"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    protocol: str = "5"
    # QoS of the telemetry subscription. Devices publish at QoS 1 (the broker holds a report until
    # it has it); on the broker -> controller leg QoS 1 lets only max_inflight_messages (Mosquitto:
    # 20) reports travel unacknowledged, so a controller that is descheduled for a moment stalls the
    # whole stream (measured: ~700 reports/s on a busy 2-core box, benchmarks/fleet_scale.py).
    # The controller's session ends when it disconnects, so QoS 1 saves nothing across a restart.
    telemetry_qos: int = 0


class FleetController:
    def __init__(self, settings: ControllerSettings):
        self.settings = settings
        self.store = Store(settings.db)
        self.chunks = ChunkSource()
        self.connected = threading.Event()
        protocol = paho.MQTTv311 if settings.protocol == "3.1.1" else paho.MQTTv5
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=protocol)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.ca_file:
            self.client.tls_set(ca_certs=settings.ca_file)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 30)
        self._telemetry: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_telemetry, name="fleet-telemetry-writer", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "FleetController":
        """Connect and subscribe; returns once the broker has acknowledged the subscriptions, so
        everything devices publish from then on reaches the controller."""
        self._writer.start()
        self.client.connect_async(self.settings.broker_host, self.settings.broker_port)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise ConnectionError(f"no connection to the broker {self.settings.broker_host}:"
                                  f"{self.settings.broker_port} with its subscriptions acknowledged within {timeout:g} s")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        if self._writer.is_alive():
            self._telemetry.put(None)  # what is queued before it is still written
            self._writer.join(30)
        self.store.close()

    @property
    def queued_telemetry(self) -> int:
        """Reports received and not yet stored."""
        return self._telemetry.qsize()

    def _write_telemetry(self) -> None:
        last_prune = 0.0
        while True:
            rows, done = [self._telemetry.get()], False
            while len(rows) < MAX_BATCH:
                try:
                    rows.append(self._telemetry.get_nowait())
                except queue.Empty:
                    break
            if None in rows:
                rows, done = [r for r in rows if r is not None], True
            try:
                if rows:
                    self.store.add_telemetry_many(rows)
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    self.store.prune()
                    last_prune = time.monotonic()
            except Exception:  # a full disk must not kill the writer; the rows are lost, and logged
                log.exception("telemetry batch of %d report(s) not stored", len(rows))
            if done:
                return

    # --- callbacks: parse, store, count -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the controller: %s", reason_code)
            return
        # one SUBSCRIBE for every topic filter, so that its SUBACK (_on_subscribe) means all are in place;
        # telemetry at the settings' QoS (default 0): see ControllerSettings.telemetry_qos
        client.subscribe([(topic, self.settings.telemetry_qos if topic.endswith("/telemetry") else 1)
                          for topic in controller_subscriptions(self.settings.fleet)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [t for t, rc in zip(controller_subscriptions(self.settings.fleet), reason_codes) if rc.is_failure]
        if refused:
            log.warning("broker refused the controller's subscription(s) to %s", ", ".join(refused))
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            fleet, device, rest = split_topic(msg.topic)
            if len(msg.payload) > MAX_PAYLOAD:
                raise ValueError(f"{len(msg.payload)} bytes, over the {MAX_PAYLOAD} limit")
            if rest == "state":
                self.store.upsert_state(fleet, ReportedState.model_validate_json(msg.payload).model_dump())
            elif rest == "telemetry":
                report = TelemetryReport.model_validate_json(msg.payload)
                if report.device != device:
                    raise ValueError(f"report of device {report.device!r} on the topic of {device!r}")
                self._telemetry.put(telemetry_row(fleet, report.model_dump()))
            elif rest == "ota/status":
                if msg.payload:
                    self.store.add_ota_status(fleet, device, json.loads(msg.payload))
            elif rest == "ota/chunk/request":
                self._serve_chunk(msg)
        except (ValueError, ValidationError, KeyError) as exc:  # never crash on what a device sends
            self.store.count("rejected_messages")
            log.warning("message on %s ignored: %s", msg.topic, str(exc).splitlines()[0])

    def _serve_chunk(self, msg) -> None:
        req = ChunkRequest.model_validate_json(msg.payload)
        if req.update_id not in self.chunks.bundles:
            for update_id, bundle in self.store.offers().items():
                self.chunks.add(update_id, bundle)
        props = Properties(PacketTypes.PUBLISH)
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if correlation:
            props.CorrelationData = correlation
        topic = (getattr(msg.properties, "ResponseTopic", None) if msg.properties else None) or req.reply_to
        if not topic:
            raise ValueError("chunk request names no response topic")
        self.client.publish(topic, self.chunks.serve(req).model_dump_json(), qos=1, properties=props)

    # --- commands ---------------------------------------------------------------------------
    def offer(self, fleet: str, device: str, bundle_dir: Path, update_id: str | None = None,
              rollback_key=None) -> str:
        bundle = offerable_bundle(bundle_dir)
        update_id = update_id or f"{bundle.manifest.name}-{bundle.manifest.version}-{int(time.time() * 1000)}"
        self.store.add_offer(update_id, Path(bundle_dir).resolve(), bundle.manifest.version)
        self.chunks.add(update_id, bundle_dir)
        offer = make_offer(bundle, update_id, {"type": "mqtt"}, rollback_key=rollback_key)
        self.client.publish(ota_offer_topic(fleet, device), offer.model_dump_json(), qos=1,
                            retain=True).wait_for_publish(10)
        return update_id

    def set_desired(self, fleet: str, device: str, settings: dict, version: int | None = None) -> int:
        version = version if version is not None else int(time.time() * 1000)
        payload = DesiredConfig(version=version, settings=settings).model_dump_json()
        self.client.publish(desired_topic(fleet, device), payload, qos=1, retain=True).wait_for_publish(10)
        return version


def format_status(store: Store, fleet: str | None = None, since_s: float = 3600) -> str:
    """The status table: one row per device, then one per model version, then the rollouts."""
    now = time.time()
    rows = []
    for d in store.devices(fleet):
        lat = store.latency(d["fleet"], d["device"], now - since_s, d["model_version"])
        rows.append((d["fleet"], d["device"], "yes" if d["online"] else "NO", f"{now - d['last_seen']:.0f}s",
                     f"{d['model_name'] or '-'} {d['model_version'] or ''}".strip(), d["execution_path"] or "-",
                     _ms(lat.get("ttft_p50_ms")), _ms(lat.get("ttft_p95_ms")), _ms(lat.get("token_p50_ms")),
                     _ms(lat.get("token_p95_ms")), f"{lat['tokens_per_s']:.1f}" if lat.get("tokens_per_s") else "-",
                     _config_cell(d)))
    head = ("fleet", "device", "online", "seen", "model", "path", "ttft p50", "ttft p95", "tok p50", "tok p95",
            "tok/s", "config")
    text = _table(head, rows) + f"\n{len(rows)} device(s); rejected messages: {store.counter('rejected_messages')}"
    for d in store.devices(fleet):  # a refused desired config is news, not a detail of --json
        if d["last_config_error"]:
            text += (f"\nconfig REFUSED by {d['fleet']}/{d['device']} (it keeps config version "
                     f"{d['applied_config_version'] if d['applied_config_version'] is not None else '-'}): "
                     f"{d['last_config_error']}")
    text += "\n\n" + format_versions(store.versions(fleet, now - since_s), since_s)
    from fleet.rollout import load_rollouts

    for r in load_rollouts(store):
        last = r.data["report"][-1] if r.data["report"] else ""
        target = r.fleet if not r.group else f"group {r.group} of {r.fleet}"
        text += f"\nrollout {r.id} ({r.bundle.name} -> {target}): {r.phase}  {last}"
    return text


def _config_cell(d: dict) -> str:
    """The applied config version, and REFUSED while the device refuses the latest desired config."""
    applied = str(d["applied_config_version"]) if d["applied_config_version"] is not None else "-"
    return f"{applied} REFUSED" if d["last_config_error"] else applied


def format_versions(versions: list[dict], since_s: float) -> str:
    """The per-model-version table of `Store.versions`."""
    rows = [(v["model_version"] or "-", ",".join(v["model_names"]) or "-", str(v["devices"]), str(v["online"]),
             _ms(v["ttft_p50_ms"]), _ms(v["ttft_p95_ms"]), _ms(v["token_p50_ms"]), _ms(v["token_p95_ms"]),
             "-" if v["tokens_per_s"] is None else f"{v['tokens_per_s']:.1f}", str(v["requests"]),
             "-" if v["error_rate"] is None else f"{100 * v['error_rate']:.1f}%") for v in versions]
    head = ("version", "model", "devices", "online", "ttft p50", "ttft p95", "tok p50", "tok p95", "tok/s",
            "requests", "errors")
    return _table(head, rows) + f"\nper model version: telemetry of the last {since_s / 60:g} min, request-weighted"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def _table(head: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def _version_metrics(versions: list[dict]) -> list[str]:
    """The per-model-version rows of `fleet status` as gauges labelled by model_version."""
    series = [("edgeglm_fleet_version_devices", "Devices on each model version, by online state.", None),
              ("edgeglm_fleet_version_ttft_ms", "Time to first token of each model version (last hour, "
               "request-weighted mean of the window percentiles).", ("ttft_p50_ms", "ttft_p95_ms")),
              ("edgeglm_fleet_version_token_ms", "Per-token latency of each model version (last hour, "
               "request-weighted mean of the window percentiles).", ("token_p50_ms", "token_p95_ms")),
              ("edgeglm_fleet_version_tokens_per_second", "Decode speed of each model version (last hour).",
               "tokens_per_s"),
              ("edgeglm_fleet_version_requests", "Requests served by each model version (last hour).", "requests"),
              ("edgeglm_fleet_version_error_ratio", "errors / (requests + errors) of each model version "
               "(last hour).", "error_rate")]
    lines = []
    for name, help_text, key in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for v in versions:
            label = f'model_version="{v["model_version"] or ""}"'
            if key is None:
                lines += [f'{name}{{{label},online="true"}} {v["online"]}',
                          f'{name}{{{label},online="false"}} {v["devices"] - v["online"]}']
            elif isinstance(key, tuple):
                lines += [f'{name}{{{label},quantile="{q}"}} {v[k]:.3f}' for q, k in zip(("0.5", "0.95"), key)
                          if v[k] is not None]
            elif v[key] is not None:
                lines.append(f"{name}{{{label}}} {v[key]:.6g}")
    return lines


def prometheus_metrics(store: Store, connected: bool, queued: int | None = None) -> str:
    """Fleet aggregates in the Prometheus text format."""
    from fleet.rollout import load_rollouts

    devices = store.devices()
    lines = ["# HELP edgeglm_fleet_devices Devices known to the controller, by online state.",
             "# TYPE edgeglm_fleet_devices gauge"]
    for online in (1, 0):
        n = sum(1 for d in devices if d["online"] == online)
        lines.append(f'edgeglm_fleet_devices{{online="{"true" if online else "false"}"}} {n}')
    lines += ["# HELP edgeglm_fleet_token_p95_ms p95 per-token latency of each device over the last hour.",
              "# TYPE edgeglm_fleet_token_p95_ms gauge"]
    since = time.time() - 3600
    for d in devices:
        lat = store.latency(d["fleet"], d["device"], since)
        if lat.get("token_p95_ms") is not None:
            lines.append(f'edgeglm_fleet_token_p95_ms{{fleet="{d["fleet"]}",device="{d["device"]}",'
                         f'model_version="{d["model_version"] or ""}"}} {lat["token_p95_ms"]:.3f}')
    lines += _version_metrics(store.versions(since=since))
    lines += ["# HELP edgeglm_fleet_telemetry_reports_total Telemetry reports stored.",
              "# TYPE edgeglm_fleet_telemetry_reports_total counter",
              f"edgeglm_fleet_telemetry_reports_total {store.counter('telemetry_reports')}"]
    if queued is not None:
        lines += ["# HELP edgeglm_fleet_telemetry_queued Telemetry reports received and not yet stored.",
                  "# TYPE edgeglm_fleet_telemetry_queued gauge", f"edgeglm_fleet_telemetry_queued {queued}"]
    lines += ["# HELP edgeglm_fleet_rejected_messages_total Device messages that did not parse.",
              "# TYPE edgeglm_fleet_rejected_messages_total counter",
              f"edgeglm_fleet_rejected_messages_total {store.counter('rejected_messages')}",
              "# HELP edgeglm_fleet_rollouts Rollouts by phase.", "# TYPE edgeglm_fleet_rollouts gauge"]
    phases: dict[str, int] = {}
    for r in load_rollouts(store):
        phases[r.phase] = phases.get(r.phase, 0) + 1
    lines += [f'edgeglm_fleet_rollouts{{phase="{p}"}} {n}' for p, n in sorted(phases.items())]
    lines += ["# HELP edgeglm_fleet_broker_connected 1 while the controller is connected to the broker.",
              "# TYPE edgeglm_fleet_broker_connected gauge", f"edgeglm_fleet_broker_connected {int(connected)}"]
    return "\n".join(lines) + "\n"


def serve_http(controller: FleetController, host: str, port: int):
    """/healthz (200 while connected to the broker) and /metrics, on a background thread."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            connected = controller.client.is_connected()
            if self.path == "/healthz":
                code, body, ctype = (200 if connected else 503), (b"ok\n" if connected else b"broker down\n"), \
                    "text/plain"
            elif self.path == "/metrics":
                code, body, ctype = 200, prometheus_metrics(reader, connected,
                                                            controller.queued_telemetry).encode(), \
                    "text/plain; version=0.0.4"
            else:
                code, body, ctype = 404, b"not found\n", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    reader = Store(controller.settings.db)  # its own connection: a scrape never waits for the writer
    threading.Thread(target=server.serve_forever, name="fleet-http", daemon=True).start()
    return server
