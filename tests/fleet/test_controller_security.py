"""What one device can do to the fleet controller, for real: Mosquitto runs the ACL and the packet limit
shipped in k3s/base/core/broker-config.yaml (users: the controller and two devices, `mallory` and `victim`, each
with its own password), and a real FleetController serves fleet "default" (the fleet that ACL names).

Mallory may publish only on its own device topics; everything here is something the broker lets it do.
"Nothing else arrived" is never a sleep: after the message under test, the controller publishes a
sentinel the reader may read; QoS 1 from one publisher arrives in order, so anything routed before it
has arrived by then.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.topics import (ModelRef, ReportedState, TelemetryReport, chunk_request_topic, chunk_response_topic,
                          desired_topic, ota_status_topic, state_topic, telemetry_topic)
from broker import Mosquitto, find_mosquitto, free_port
from bundles import PLACEHOLDER_ARCHITECTURE
from fleet.controller import (ControllerSettings, FleetController, PacketTooLarge, format_status, offerable_bundle,
                              prometheus_metrics, read_metrics_token, serve_http)
from fleet.rollout import RolloutDriver, create_rollout, load_rollouts
from fleet.store import Store, telemetry_row
from ota.bundle import open_bundle, write_manifest
from ota.errors import BundleError
from ota.signing import generate_keypair, load_private_key, sign_bundle
from ota.transfer import MAX_CHUNK_SIZE, MAX_RESPONSE_BYTES, ChunkRequest, ChunkResponse, ChunkSource
from waiting import until

ROOT = Path(__file__).resolve().parents[2]
BROKER_CONFIG = yaml.safe_load((ROOT / "k3s/base/core/broker-config.yaml").read_text())["data"]
FLEET = "default"  # the fleet of the shipped ACL's controller lines
CONTROLLER = "edgeglm-controller"
USERS = {CONTROLLER: "pw-controller", "mallory": "pw-mallory", "victim": "pw-victim"}
WAIT = 15.0


def shipped_option(name: str) -> str:
    for line in BROKER_CONFIG["mosquitto.conf"].splitlines():
        if line.strip().startswith(name + " "):
            return line.split(None, 1)[1].strip()
    raise AssertionError(f"{name} not in the shipped mosquitto.conf")


class ShippedAclMosquitto(Mosquitto):
    """The test broker with the shipped acl.conf (verbatim), max_packet_size and username-as-client-id."""

    def _write_conf(self) -> None:
        super()._write_conf()
        acl = self.workdir / "acl.conf"
        acl.write_text(BROKER_CONFIG["acl.conf"])
        with open(self.conf, "a") as f:
            f.write(f"acl_file {acl}\nmax_packet_size {shipped_option('max_packet_size')}\n"
                    f"use_username_as_clientid {shipped_option('use_username_as_clientid')}\n")


@pytest.fixture
def broker(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    b = ShippedAclMosquitto(tmp_path / "mosquitto", users=USERS).start()
    yield b
    b.stop()


class Client:
    """A device (or observer) on the broker: its messages land in a queue."""

    def __init__(self, broker, user: str, topics: tuple[str, ...] = ()):
        self.user, self.messages = user, queue.Queue()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=paho.MQTTv5)
        self.c.username_pw_set(user, USERS[user])
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        subscribed = []
        self.c.on_subscribe = lambda *a: subscribed.append(1)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        if topics:
            self.c.subscribe([(t, 1) for t in topics])
            until(lambda: subscribed, WAIT)

    def publish(self, topic: str, payload, retain: bool = False, properties=None) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(WAIT)
        assert info.rc == 0

    def next(self, topic: str | None = None, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic is None or m.topic == topic:
                return m

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def state(device: str, version: str = "1.0.0", **changes) -> ReportedState:
    fields = dict(device=device, online=True, agent_version="0.1.0", execution_path="onnxruntime:cpu",
                  model=ModelRef(name="tiny", version=version, sha256="0" * 64), active_slot="a", uptime_s=1.0,
                  ts=time.time())
    return ReportedState(**{**fields, **changes})


def start_controller(broker, db: Path, **settings) -> FleetController:
    return FleetController(ControllerSettings(broker_port=broker.port, db=db, fleet=FLEET, client_id=CONTROLLER,
                                              username=CONTROLLER, password=USERS[CONTROLLER], **settings)).start()


@pytest.fixture
def controller(broker, tmp_path):
    ctl = start_controller(broker, tmp_path / "fleet.db")
    yield ctl
    ctl.stop()


def make_bundle(root: Path, key, big_bytes: int = 3 << 20, chunk_size: int = 256 * 1024, version="1.1.0") -> Path:
    """A signed bundle (no real model: the controller never loads one) with one file of `big_bytes`."""
    root.mkdir(parents=True)
    (root / "tokenizer.json").write_text("{}")
    (root / "model.onnx").write_bytes(os.urandom(big_bytes))
    write_manifest(root, dict(name="tiny", version=version, min_agent_version="0.1.0",
                              architecture=PLACEHOLDER_ARCHITECTURE,
                              precision="fp32", backends={"onnxruntime": {"entry": "model.onnx", "weights": "fp32",
                                                                          "scheme": "none"}},
                              golden={"prompt_ids": [1], "reference": {"tokens": [1], "margins": [1.0]},
                                      "backends": {}, "tolerance": 0.0}), chunk_size=chunk_size)
    sign_bundle(open_bundle(root), key)
    return root


@pytest.fixture
def key(tmp_path):
    return load_private_key(generate_keypair(tmp_path / "keys", "fleet").private_path)


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stored_devices(ctl) -> dict[str, dict]:
    return {d["device"]: d for d in ctl.store.devices(FLEET)}


# --- 1: no device message stops the controller ---------------------------------------------------

def test_poison_ota_status_neither_stops_the_controller_nor_a_restarted_one(broker, tmp_path):
    mallory, victim = Client(broker, "mallory"), Client(broker, "victim")
    status = ota_status_topic(FLEET, "mallory")
    mallory.publish(status, b"[" * 50_000, retain=True)  # json.loads: RecursionError; retained for the next one
    db, rejected = tmp_path / "fleet.db", 0
    for round_ in range(2):  # the second controller gets the retained poison too
        ctl = start_controller(broker, db)
        http = serve_http(ctl, "127.0.0.1", port := free_port())
        try:
            rejected += 1  # the retained poison
            if round_ == 0:
                for payload in (b'"x"', b"[1]", b"{}", b"null", b"[" * 80_000):  # str/list: AttributeError in .get
                    mallory.publish(status, payload)
                mallory.publish(telemetry_topic(FLEET, "mallory"),  # NaN: SQLite's NULL, the batch would fail
                                b'{"device":"mallory","window_start":NaN,"window_end":1,"count":1}')
                rejected += 6
            victim.publish(state_topic(FLEET, "victim"), state("victim", uptime_s=float(round_)).model_dump_json())
            until(lambda: "victim" in stored_devices(ctl) and ctl.store.counter("rejected_messages") >= rejected
                  and json.loads(ctl.store._exec("SELECT state FROM devices WHERE device='victim'").fetchone()[0])
                  ["uptime_s"] == round_, WAIT)
            assert ctl.store.counter("rejected_messages") == rejected
            assert health(port) == (200, "ok\n")
            # a valid status from the same device is still stored
            mallory.publish(status, json.dumps({"update_id": "u1", "ts": time.time(), "state": "reporting",
                                                "result": "committed"}))
            until(lambda: ctl.store.last_result(FLEET, "mallory", "u1") is not None, WAIT)
        finally:
            http.shutdown()
            ctl.stop()
    mallory.close()
    victim.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_healthz_fails_when_the_network_thread_is_dead(controller, broker):
    http = serve_http(controller, "127.0.0.1", port := free_port())
    victim = Client(broker, "victim")
    try:
        assert health(port) == (200, "ok\n")

        def boom(*args):
            raise RuntimeError("a bug in a callback")

        controller.client.on_message = boom  # what an uncaught exception in _on_message did
        victim.publish(state_topic(FLEET, "victim"), state("victim").model_dump_json())
        until(lambda: health(port)[0] == 503, WAIT)
        assert health(port) == (503, "MQTT network thread stopped\n")
        assert controller.client.is_connected()  # what /healthz used to look at
        metrics = prometheus_metrics(controller.store, controller.health()[0])
        assert "edgeglm_fleet_broker_connected 0" in metrics
    finally:
        http.shutdown()
        victim.close()


# --- 3: a device reports only for itself ----------------------------------------------------------

def test_a_device_cannot_write_another_devices_state(controller, broker):
    mallory = Client(broker, "mallory")
    mallory.publish(state_topic(FLEET, "mallory"), state("victim", version="9.9.9").model_dump_json())
    mallory.publish(state_topic(FLEET, "mallory"), state("mallory").model_dump_json())
    until(lambda: "mallory" in stored_devices(controller), WAIT)
    assert "victim" not in stored_devices(controller)
    assert controller.store.counter("rejected_messages") == 1
    mallory.close()


# --- 4: /metrics label values ---------------------------------------------------------------------

EVIL = 'x"} 1\nedgeglm_fleet_devices{online="true"} 999\n#'
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\\n])*",?)*\})? \S+$')


def check_exposition(text: str) -> list[dict[str, str]]:
    """Every line is a comment or one well-formed sample; the label sets, unescaped."""
    labels = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert SAMPLE.match(line), line
        labels.append({k: re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), v)
                       for k, v in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"', line)})
    return labels


def test_model_versions_are_checked_on_ingest(controller, broker):
    mallory = Client(broker, "mallory")
    now = time.time()
    bad_state = state("mallory").model_dump(mode="json")
    bad_state["model"]["version"] = EVIL
    mallory.publish(state_topic(FLEET, "mallory"), json.dumps(bad_state))
    bad_report = TelemetryReport(device="mallory", window_start=now - 1, window_end=now, count=1,
                                 per_token_ms={"p50": 1, "p95": 2, "p99": 3}).model_dump(mode="json")
    bad_report["model_version"] = EVIL
    mallory.publish(telemetry_topic(FLEET, "mallory"), json.dumps(bad_report))
    until(lambda: controller.store.counter("rejected_messages") == 2, WAIT)
    mallory.publish(state_topic(FLEET, "mallory"), state("mallory", version="1.0.0-rc.1").model_dump_json())
    until(lambda: stored_devices(controller).get("mallory", {}).get("model_version") == "1.0.0-rc.1", WAIT)
    assert controller.store.counter("rejected_messages") == 2
    assert controller.store.counter("telemetry_reports") == 0
    check_exposition(prometheus_metrics(controller.store, True))
    mallory.close()


def test_metrics_escape_label_values(tmp_path):
    """A value that got into the database some other way (an older controller) cannot forge a sample."""
    store = Store(tmp_path / "fleet.db")
    store.upsert_state(FLEET, {"device": "d1", "online": True, "model": {"name": "m", "version": EVIL}})
    now = time.time()
    store.add_telemetry_many([telemetry_row(FLEET, {"device": "d1", "window_end": now, "count": 2,
                                                    "per_token_ms": {"p50": 1.0, "p95": 2.0},
                                                    "model_version": EVIL})])
    text = prometheus_metrics(store, True)
    labels = check_exposition(text)
    assert {"fleet": FLEET, "device": "d1", "model_version": EVIL} in labels
    assert not [line for line in text.splitlines() if line.startswith('edgeglm_fleet_devices{online="true"} 999')]
    store.close()


def test_a_devices_latency_sample_is_of_the_version_it_is_labelled_with(tmp_path):
    """Right after an update, /metrics labelled the device's latency of the last hour, all of it on the old version,
    with the new version: `fleet status` showed "-" while Prometheus saw the old model's numbers as the new one's."""
    store = Store(tmp_path / "fleet.db")
    now = time.time()
    store.add_telemetry_many([telemetry_row(FLEET, {"device": "d1", "window_end": now, "count": 2,
                                                    "per_token_ms": {"p50": 1.0, "p95": 2.052},
                                                    "model_version": "1.0.0"})])
    store.upsert_state(FLEET, {"device": "d1", "online": True, "model": {"name": "m", "version": "1.1.0"}})
    samples = [line for line in prometheus_metrics(store, True).splitlines()
               if line.startswith("edgeglm_fleet_token_p95_ms{")]
    assert samples == []
    store.add_telemetry_many([telemetry_row(FLEET, {"device": "d1", "window_end": now + 1, "count": 2,
                                                    "per_token_ms": {"p50": 1.0, "p95": 3.5},
                                                    "model_version": "1.1.0"})])
    samples = [line for line in prometheus_metrics(store, True).splitlines()
               if line.startswith("edgeglm_fleet_token_p95_ms{")]
    assert samples == [f'edgeglm_fleet_token_p95_ms{{fleet="{FLEET}",device="d1",model_version="1.1.0"}} 3.500']
    store.close()


def _get(port: int, path: str, token: str | None = None) -> tuple[int, dict, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_metrics_need_the_bearer_token_when_one_is_configured(controller, tmp_path):
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret-token\n")  # as `openssl rand -hex 32 > file` leaves it
    http = serve_http(controller, "127.0.0.1", port := free_port(), metrics_token=read_metrics_token(token_file))
    try:
        for token in (None, "wrong", "s3cret-token ", "s3cret-tokenx", ""):
            code, headers, body = _get(port, "/metrics", token)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), (token, code)
            assert "edgeglm_fleet" not in body and "http.metrics_token_file" in body
        code, _, body = _get(port, "/metrics", "s3cret-token")
        assert code == 200 and "edgeglm_fleet_broker_connected 1" in body
        assert _get(port, "/healthz")[:1] == (200,)  # probes send no token
    finally:
        http.shutdown()
    open_http = serve_http(controller, "127.0.0.1", port := free_port())  # no token configured: open
    try:
        assert _get(port, "/metrics")[0] == 200
    finally:
        open_http.shutdown()


def _raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """`request` sent as it is; what comes back until the server closes the connection."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_the_controllers_http_bounds_slow_and_many_connections(controller, monkeypatch):
    """A client that sent half a request held a thread and a file handle for good: 57 of them took the last file
    handles of a `fleet serve` (ulimit 64), the kubelet's /healthz timed out and the MQTT reconnect waited. Now a
    silent connection is closed after HTTP_TIMEOUT_S, and past HTTP_MAX_CONNECTIONS open ones an answer is 503 at
    once; the probe answers again as soon as one goes."""
    import socket

    import fleet.controller as fc
    monkeypatch.setattr(fc, "HTTP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(fc, "HTTP_MAX_CONNECTIONS", 2)
    http = serve_http(controller, "127.0.0.1", port := free_port())
    try:
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # never the blank line
        def answer() -> bytes:
            try:
                return _raw(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            except OSError:  # (a connection reset while the server is busy: asked again)
                return b""
        until(lambda: answer().startswith(b"HTTP/1.1 503"), 5)
        assert _raw(port, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"too many connections\n")
        for sock in slow:  # closed by the server: recv returns b"" (it waited forever before: socket.timeout here)
            sock.settimeout(30)
            while sock.recv(65536):
                pass
            sock.close()
        until(lambda: answer().startswith(b"HTTP/1.0 200") or answer().startswith(b"HTTP/1.1 200"), 10)
    finally:
        http.shutdown()


def test_the_controllers_http_takes_queries_head_any_bearer_case_and_refuses_other_methods(controller, tmp_path):
    """`/metrics?x=1` was 404, HEAD (uptime checkers) and POST were 501 (a server error), and the scheme of
    "bearer TOKEN" was compared case-sensitively (RFC 7235: it is not)."""
    http = serve_http(controller, "127.0.0.1", port := free_port(), metrics_token="s3cret")
    try:
        ok = urllib.request.Request(f"http://127.0.0.1:{port}/metrics?x=1", headers={"Authorization": "bearer s3cret"})
        with urllib.request.urlopen(ok, timeout=5) as r:
            assert r.status == 200 and "edgeglm_fleet_broker_connected 1" in r.read().decode()
        assert _get(port, "/healthz?probe=1")[0] == 200
        head = _raw(port, b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
        assert head.endswith(b"\r\n\r\n")  # headers only
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            answer = _raw(port, f"{method} /metrics HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                          .encode())
            assert b" 405 " in answer.split(b"\r\n")[0] and b"Allow: GET, HEAD" in answer, answer
    finally:
        http.shutdown()


def test_a_metrics_scrape_the_database_cannot_answer_is_a_500_and_one_log_line(controller, tmp_path, caplog):
    """A broken database (a table gone, a disk error) sent an empty reply (curl: "Empty reply from server") and a
    traceback to stderr."""
    import sqlite3
    http = serve_http(controller, "127.0.0.1", port := free_port())
    try:
        db = sqlite3.connect(str(tmp_path / "fleet.db"))
        db.execute("DROP TABLE health")
        db.commit()
        db.close()
        with caplog.at_level(logging.ERROR, logger="edgeglm.fleet"):
            code, _, body = _get(port, "/metrics")
        assert code == 500 and "the fleet database could not be read (OperationalError)" in body
        (line,) = [r.getMessage() for r in caplog.records if "/metrics failed" in r.getMessage()]
        assert str(tmp_path / "fleet.db") in line and "no such table: health" in line
        assert _get(port, "/healthz")[0] == 200
    finally:
        http.shutdown()


@pytest.mark.parametrize("content,problem", [("", "empty"), ("two words", "contains whitespace"),
                                             (None, "cannot read it")])
def test_a_bad_metrics_token_file_stops_fleet_serve_before_it_connects(tmp_path, content, problem):
    token_file = tmp_path / "metrics-token"
    if content is not None:
        token_file.write_text(content)
    (tmp_path / "fleet.toml").write_text(f'[http]\nmetrics_token_file = "{token_file}"\n')
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(tmp_path / "fleet.toml"),
                          "--broker", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "fleet.db")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"http.metrics_token_file {token_file}: {problem}" in out.stderr
    assert "the controller did not start" in out.stderr


# --- 5: telemetry without percentiles; a failing rollout step -----------------------------------

def test_telemetry_without_percentiles_breaks_neither_status_nor_metrics_nor_a_rollout(controller, broker, tmp_path):
    mallory, victim = Client(broker, "mallory"), Client(broker, "victim")
    mallory.publish(state_topic(FLEET, "mallory"), state("mallory").model_dump_json())
    victim.publish(state_topic(FLEET, "victim"), state("victim").model_dump_json())
    now = time.time()
    with_p = TelemetryReport(device="mallory", window_start=now - 2, window_end=now - 1, count=2,
                             ttft_ms={"p50": 50, "p95": 60, "p99": 70}, per_token_ms={"p50": 8, "p95": 10, "p99": 12},
                             model_version="1.0.0")
    # what an agent sends for a window of one-token answers: requests, no per-token gaps
    without = TelemetryReport(device="mallory", window_start=now - 1, window_end=now, count=3,
                              ttft_ms={"p50": 50, "p95": 60, "p99": 70}, model_version="1.0.0")
    bare = TelemetryReport(device="mallory", window_start=now - 0.5, window_end=now - 0.25, count=4,
                           model_version="1.0.0")
    for r in (with_p, without, bare):
        mallory.publish(telemetry_topic(FLEET, "mallory"), r.model_dump_json())
    # the victim's only report has requests and no percentile at all (every answer was empty)
    victim.publish(telemetry_topic(FLEET, "victim"), bare.model_copy(update={"device": "victim"}).model_dump_json())
    until(lambda: controller.store.counter("telemetry_reports") == 4, WAIT)
    assert controller.store.latency(FLEET, "victim", now - 60) == {
        "requests": 4, "errors": 0, "tokens_per_s": None, "ttft_p50_ms": None, "ttft_p95_ms": None,
        "token_p50_ms": None, "token_p95_ms": None, "percentiles": "window means",
        "means": {"ttft_p50_ms": None, "ttft_p95_ms": None, "token_p50_ms": None, "token_p95_ms": None}}
    lat = controller.store.latency(FLEET, "mallory", now - 60)
    assert lat["requests"] == 9
    assert lat["token_p95_ms"] == pytest.approx(10.0)  # weighted by the 2 requests that have it, not 9
    assert lat["ttft_p50_ms"] == pytest.approx(50.0)
    assert "mallory" in format_status(controller.store, FLEET) and "victim" in format_status(controller.store, FLEET)
    check_exposition(prometheus_metrics(controller.store, True))
    rid = create_rollout(controller.store, tmp_path / "gone", FLEET, min_requests=1, canary_pct=100, window_s=1.0)

    class Offers:
        def offer(self, fleet, device, bundle, rollback_key=None):
            return "u-1"

    RolloutDriver(controller.store, Offers()).tick()
    r = next(r for r in load_rollouts(controller.store) if r.id == rid)
    assert r.phase == "canary_wait" and r.data["canaries"] == ["mallory", "victim"]
    mallory.close()
    victim.close()


def test_a_failing_rollout_step_is_logged_and_the_others_go_on(tmp_path, caplog):
    store = Store(tmp_path / "fleet.db")
    for fleet in ("f1", "f2"):
        store.upsert_state(fleet, {"device": "d", "online": True, "model": None})
    broken = create_rollout(store, tmp_path / "deleted-bundle", "f1", canary_pct=100)
    fine = create_rollout(store, tmp_path / "bundle", "f2", canary_pct=100)

    class Offers:
        def offer(self, fleet, device, bundle, rollback_key=None):
            if fleet == "f1":  # what FleetController.offer raises for a bundle deleted after `fleet rollout`
                raise BundleError(f"{bundle}: bundle directory not found")
            return "u-1"

    driver = RolloutDriver(store, Offers())
    with caplog.at_level(logging.ERROR, logger="edgeglm.fleet"):
        driver.tick()
        driver.tick()
    phases = {r.id: r.phase for r in load_rollouts(store)}
    assert phases == {broken: "canary", fine: "canary_wait"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"rollout {broken}" in errors[0].getMessage()
    assert "bundle directory not found" in errors[0].getMessage()
    store.close()


def test_one_telemetry_row_the_database_refuses_costs_only_itself(tmp_path):
    ctl = FleetController(ControllerSettings(db=tmp_path / "fleet.db"))
    now = time.time()
    good = [telemetry_row("f", {"device": "d1", "window_end": now + i, "count": 1}) for i in range(2)]
    bad = ("f", "d2", None, None, 1, None, None, None, None, None, 0, 0)  # window_end NULL: NOT NULL fails
    ctl._store_rows([good[0], bad, good[1]])
    assert ctl.store.counter("telemetry_reports") == 2
    ctl.store.close()


# --- 2 and 6: the chunk server ---------------------------------------------------------------------

def chunk_request(update_id: str, path: str, index: int, chunk_size: int) -> bytes:
    return ChunkRequest(id=uuid.uuid4().hex, update_id=update_id, path=path, index=index,
                        chunk_size=chunk_size).model_dump_json().encode()


def test_chunk_answers_go_to_the_requesters_own_topic_and_only_for_its_offers(controller, broker, tmp_path, key):
    bundle = make_bundle(tmp_path / "b", key)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "model.onnx")
    mine = controller.offer(FLEET, "mallory", bundle)
    theirs = controller.offer(FLEET, "victim", bundle)
    mallory = Client(broker, "mallory", (chunk_response_topic(FLEET, "mallory"),))
    victim = Client(broker, "victim", (desired_topic(FLEET, "victim"), chunk_response_topic(FLEET, "victim")))
    until(lambda: victim.messages.qsize() == 0, WAIT)
    # the request names the victim's desired-config topic, as MQTT 5 response topic and as reply_to
    target = desired_topic(FLEET, "victim")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = target, b"c-1"
    req = json.loads(chunk_request(mine, "model.onnx", 1, manifest["chunk_size"]))
    req["reply_to"] = target
    mallory.publish(chunk_request_topic(FLEET, "mallory"), json.dumps(req), properties=props)
    answer = mallory.next(chunk_response_topic(FLEET, "mallory"))
    assert answer.properties.CorrelationData == b"c-1"
    data = base64.b64decode(ChunkResponse.model_validate_json(answer.payload).data_b64)
    assert hashlib.sha256(data).hexdigest() == entry["chunks"][1]
    # an update offered to the victim only
    mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(theirs, "model.onnx", 0,
                                                                         manifest["chunk_size"]))
    refused = ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)
    assert refused.data_b64 is None and f"not offered to {FLEET}/mallory" in refused.error
    # sentinel: the controller's next message on the victim's topic; nothing it sent before may precede it
    controller.set_desired(FLEET, "victim", {"sampling": {"top_k": 3}}, version=7)
    first = victim.next()
    assert first.topic == target and json.loads(first.payload)["version"] == 7, first.payload[:200]
    mallory.close()
    victim.close()


def test_offers_in_one_millisecond_get_their_own_update_ids(controller, tmp_path, key, monkeypatch):
    """Update ids were name-version-<ms>: two offers in one millisecond (a rollout offering its devices) shared
    one, and the chunk server then answered one device's requests for the other's update. Now in microseconds,
    and never one the controller gave before (here: the clock stands still)."""
    import fleet.controller as fc

    bundle = make_bundle(tmp_path / "b", key)
    frozen = time.time_ns()
    monkeypatch.setattr(fc.time, "time_ns", lambda: frozen)
    ids = [controller.offer(FLEET, device, bundle) for device in ("d1", "d2", "d3")]
    assert len(set(ids)) == 3 and all(re.fullmatch(r"tiny-1\.1\.0-\d+", i) for i in ids), ids
    assert controller.store.offered_to(ids[1], FLEET, "d2") and not controller.store.offered_to(ids[1], FLEET, "d1")


def test_a_bundle_changed_after_its_offer_is_an_error_answer_and_one_log_line(controller, broker, tmp_path, key,
                                                                              caplog):
    """A bundle directory truncated, copied over or exported again in place after the offer: the controller sent
    whatever the files held, every device refused those chunks (their hashes are the offered manifest's), and
    nothing on the controller's side said why. Now the answer names what changed, and the log says it once per
    update; a file that turned into a directory or unreadable is said the same way."""
    bundle = make_bundle(tmp_path / "b", key, big_bytes=1 << 20)
    size = json.loads((bundle / "manifest.json").read_text())["chunk_size"]
    mallory = Client(broker, "mallory", (chunk_response_topic(FLEET, "mallory"),))

    def ask(update_id: str, index: int = 1) -> ChunkResponse:
        mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "model.onnx", index, size))
        return ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)

    first = controller.offer(FLEET, "mallory", bundle)
    assert ask(first).error is None
    with open(bundle / "model.onnx", "r+b") as f:  # truncated: chunk 1 is short
        f.truncate(size + 100)
    for _ in range(2):
        answer = ask(first)
        assert answer.data_b64 is None and f"update {first} cannot be served: the bundle directory: chunk 1 of " \
            "model.onnx does not match the bundle's manifest: the file changed after the offer" in answer.error
        assert str(tmp_path) not in answer.error  # where the controller keeps bundles is its log's, not the devices'
    logged = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    assert len(logged) == 1 and f"bundle {bundle.resolve()} cannot be served (update {first} to {FLEET}/mallory): " \
        "chunk 1 of model.onnx does not match" in logged[0], logged
    assert controller.store.counter("chunk_answers_unservable") == 2  # (/metrics: ..._unservable_total)
    (bundle / "model.onnx").unlink()
    (bundle / "model.onnx").mkdir()  # not a file any more
    assert "model.onnx is no longer a file inside the bundle directory" in ask(first).error
    shutil.rmtree(bundle)  # exported again, another version, in the same directory
    make_bundle(bundle, key, big_bytes=1 << 20, version="1.2.0")
    answer = ask(first, 0)
    assert "the bundle directory holds version 1.2.0 now, the update offered 1.1.0: it was exported again over the " \
        "offered bundle" in answer.error, answer.error
    second = controller.offer(FLEET, "mallory", bundle)
    assert ask(second, 0).error is None  # offered again: served
    for chunk_size in (256 * 1024, 128 * 1024):  # exported again in place at the same version: served, and a
        shutil.rmtree(bundle)  # new chunk size read as the device's fault ("chunk_size ... differs")
        make_bundle(bundle, key, big_bytes=1 << 20, version="1.2.0", chunk_size=chunk_size)
        answer = ask(second, 0)
        assert answer.data_b64 is None and f"update {second} cannot be served: the bundle directory: its " \
            "manifest.json is not the one offered (version 1.2.0 still, other contents): it was exported again in " \
            "place after the offer" in answer.error, answer.error
    mallory.close()


def test_chunks_are_cut_at_the_manifest_size_and_fit_the_brokers_packet_limit(controller, broker, tmp_path, key):
    bundle = make_bundle(tmp_path / "b", key, big_bytes=3 << 20)
    update_id = controller.offer(FLEET, "mallory", bundle)
    mallory = Client(broker, "mallory", (chunk_response_topic(FLEET, "mallory"),))
    size = json.loads((bundle / "manifest.json").read_text())["chunk_size"]
    # 4 MiB asked: the whole 3 MiB file would be a 4 MiB answer, over the broker's 2 MiB max_packet_size
    mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "model.onnx", 0, 4 << 20))
    refused = ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)
    assert refused.data_b64 is None and f"differs from the manifest's {size}" in refused.error
    for bad_index in (12, 10**9):  # past the end of the file (12 chunks: 0..11)
        mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "model.onnx", bad_index, size))
        assert "chunk(s)" in ChunkResponse.model_validate_json(
            mallory.next(chunk_response_topic(FLEET, "mallory")).payload).error
    mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "manifest.sig", 0, size))
    assert "not part of update" in ChunkResponse.model_validate_json(
        mallory.next(chunk_response_topic(FLEET, "mallory")).payload).error
    mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "model.onnx", 11, size))
    last = ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)
    assert len(base64.b64decode(last.data_b64)) == size
    assert controller.health() == (True, "ok")
    assert "Client edgeglm-controller disconnected" not in broker.log_text()
    mallory.close()


def test_a_bundle_whose_offer_does_not_fit_a_message_is_not_offered(tmp_path, key, monkeypatch):
    """The offer carries the whole manifest (a sha256 per transfer chunk): over OFFER_MAX_BYTES the agents
    would refuse it; the controller says so, and how to fix it, instead of sending it."""
    import fleet.controller as controller_module
    monkeypatch.setattr(controller_module, "OFFER_MAX_BYTES", 16 << 10)  # as a multi-GB bundle would meet 2 MiB
    bundle = make_bundle(tmp_path / "b", key, big_bytes=1 << 20, chunk_size=4096)
    with pytest.raises(BundleError, match=r"its offer would be about \d+ bytes \(257 transfer chunks of 4 KiB.*"
                                          r"over the 16384 bytes an agent takes.*--chunk-kib 512"):
        offerable_bundle(bundle)
    offerable_bundle(make_bundle(tmp_path / "c", key, big_bytes=1 << 20, chunk_size=256 << 10))


def test_a_bundle_whose_chunks_do_not_fit_a_message_is_neither_offered_nor_served(tmp_path, key):
    bundle = make_bundle(tmp_path / "b", key, big_bytes=2 << 20, chunk_size=2 * MAX_CHUNK_SIZE)
    with pytest.raises(BundleError, match=f"chunk_size {2 * MAX_CHUNK_SIZE} is over the {MAX_CHUNK_SIZE}"):
        offerable_bundle(bundle)
    source = ChunkSource()
    source.add("u", bundle)
    answer = source.serve(ChunkRequest(id="1", update_id="u", path="model.onnx", index=0,
                                       chunk_size=2 * MAX_CHUNK_SIZE))
    assert answer.data_b64 is None and "over the" in answer.error
    fits = make_bundle(tmp_path / "c", key, big_bytes=MAX_CHUNK_SIZE, chunk_size=MAX_CHUNK_SIZE)
    source.add("v", fits)
    full = source.serve(ChunkRequest(id="x" * 128, update_id="v", path="model.onnx", index=0,
                                     chunk_size=MAX_CHUNK_SIZE))
    assert len(full.model_dump_json()) <= MAX_RESPONSE_BYTES and full.error is None


def test_a_bundle_directory_replaced_in_place_is_served_from_its_new_manifest(tmp_path, key):
    """The chunk server keeps parsed manifests by bundle directory. A directory deleted and unpacked again
    from an archive with fixed mtimes (a reproducible build) got manifest.json the freed inode, the same size
    and mtime: the old manifest's chunk list was served for the new files."""
    import io
    import tarfile

    def archive(version: str) -> io.BytesIO:
        bundle = make_bundle(tmp_path / f"src-{version}", key, big_bytes=(3 if version == "1.2.0" else 2) << 18,
                             version=version)
        manifest = bundle / "manifest.json"  # both the same length (the chunk server reads it, never verifies)
        manifest.write_text(manifest.read_text().ljust(4096))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(bundle.rglob("*")):
                info = tar.gettarinfo(f, arcname="bundle/" + str(f.relative_to(bundle)))
                info.mtime = 1_700_000_000
                tar.addfile(info, f.open("rb") if f.is_file() else None)
        buf.seek(0)
        return buf

    first, second = archive("1.1.0"), archive("1.2.0")
    with tarfile.open(fileobj=first) as tar:
        tar.extractall(tmp_path / "live", filter="data")
    root = tmp_path / "live" / "bundle"
    assert (root / "manifest.json").stat().st_size == 4096
    source = ChunkSource()
    ask = lambda i: source.serve(ChunkRequest(id="r", update_id="u", path="model.onnx", index=i,  # noqa: E731
                                              chunk_size=256 * 1024), root)
    assert ask(1).error is None and "the file has 2 chunk(s)" in ask(2).error
    shutil.rmtree(root)
    with tarfile.open(fileobj=second) as tar:
        tar.extractall(tmp_path / "live", filter="data")
    assert ask(2).error is None and ask(2).data_b64


def test_chunk_requests_are_rate_limited_per_device(broker, tmp_path):
    ctl = start_controller(broker, tmp_path / "fleet.db", chunk_requests_per_s=0.5, chunk_burst=3)
    mallory = Client(broker, "mallory", (chunk_response_topic(FLEET, "mallory"),))
    victim = Client(broker, "victim", (chunk_response_topic(FLEET, "victim"),))
    try:
        started = time.monotonic()
        for _ in range(10):
            mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request("nope", "model.onnx", 0, 4096))
        until(lambda: mallory.messages.qsize() + ctl.store.counter("chunk_requests_limited") == 10, WAIT)
        took = time.monotonic() - started
        answered = mallory.messages.qsize()
        # the burst, and at most the tokens that came back in the time the 10 took (a loaded machine: seconds)
        assert 3 <= answered <= 3 + math.ceil(0.5 * took), (answered, took)
        victim.publish(chunk_request_topic(FLEET, "victim"), chunk_request("nope", "model.onnx", 0, 4096))
        assert "not offered" in ChunkResponse.model_validate_json(victim.next().payload).error  # its own bucket
        assert "chunk_requests_limited_total" in prometheus_metrics(ctl.store, True)
    finally:
        mallory.close()
        victim.close()
        ctl.stop()


def test_a_broker_whose_packet_limit_is_below_the_chunk_answers_keeps_the_controller(tmp_path, key):
    """A broker that takes packets of at most 100,000 bytes (a hosted one, a lowered max_packet_size) closed the
    controller's connection over a 350 KB chunk answer, and paho sent the answer again after every reconnect:
    the controller was off the broker for good (no state, telemetry or health of any device), and the device only
    saw "no answer". The controller reads the limit from the broker's CONNACK: an offer whose chunk answers would
    be over it is refused, naming the chunk size that fits, and a chunk asked for anyway gets an error answer."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    small = Mosquitto(tmp_path / "small", users=USERS, options=("max_packet_size 100000",)).start()
    ctl = None
    try:
        ctl = start_controller(small, tmp_path / "fleet.db")
        assert ctl.max_packet == 100000
        bundle = make_bundle(tmp_path / "b", key, big_bytes=1 << 20)  # 256 KiB chunks: answers of ~350 KB
        with pytest.raises(PacketTooLarge, match=r"its chunk answers \(256 KiB chunks\) are up to \d+ bytes, over "
                                                 r"the maximum packet size .*\(100000 bytes, its max_packet_size\).*"
                                                 r"--chunk-kib 72` or less.*nothing was offered"):
            ctl.offer(FLEET, "mallory", bundle)
        assert ctl.store._exec("SELECT COUNT(*) FROM offers").fetchone()[0] == 0
        # offered while the broker took larger packets: its chunks are asked for now
        ctl.store.add_offer("u-big", bundle, "1.1.0", FLEET, "mallory")
        mallory = Client(small, "mallory", (chunk_response_topic(FLEET, "mallory"),))
        mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request("u-big", "model.onnx", 0, 256 << 10))
        answer = ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)
        assert answer.data_b64 is None and "over the broker's maximum packet size of 100000 bytes" in answer.error
        assert "--chunk-kib 72` or less" in answer.error
        # chunks that fit are offered and served on the same connection
        fits = make_bundle(tmp_path / "c", key, big_bytes=1 << 20, chunk_size=64 << 10)
        update_id = ctl.offer(FLEET, "mallory", fits)
        mallory.publish(chunk_request_topic(FLEET, "mallory"), chunk_request(update_id, "model.onnx", 0, 64 << 10))
        served = ChunkResponse.model_validate_json(mallory.next(chunk_response_topic(FLEET, "mallory")).payload)
        assert served.error is None and len(base64.b64decode(served.data_b64)) == 64 << 10
        assert ctl.health() == (True, "ok")
        assert f"Client {CONTROLLER} disconnected" not in small.log_text()
        assert ctl.store.counter("chunk_answers_too_large") == 1
        mallory.close()
    finally:
        if ctl is not None:
            ctl.stop()
        small.stop()


def test_a_bundle_is_hashed_once_for_many_offers_and_again_when_a_file_changes(tmp_path, key, monkeypatch):
    """A rollout offers one bundle to each device in turn: every offer hashed the whole bundle again (0.1-0.2 s
    per device for 90 MB, on the loop that serves the rollouts). It is checked again when a file changed."""
    import fleet.controller as controller_module

    opened = []
    real = controller_module.open_bundle
    monkeypatch.setattr(controller_module, "open_bundle", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    ctl = FleetController(ControllerSettings(broker_port=free_port(), db=tmp_path / "fleet.db"))  # never connected
    bundle = make_bundle(tmp_path / "b", key, big_bytes=1 << 20)
    for device in ("d1", "d2", "d3"):
        with pytest.raises(ConnectionError, match="nothing was offered"):  # checked, then nothing to publish to
            ctl.offer(FLEET, device, bundle)
    assert len(opened) == 1
    model = bundle / "model.onnx"
    before = model.stat()
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF  # same size, new content, and the old mtime kept (as `cp -p`, `rsync -a` and tar do)
    model.write_bytes(bytes(data))
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(BundleError, match="model.onnx"):
        ctl.offer(FLEET, "d4", bundle)
    assert len(opened) == 2
    ctl.store.close()


def test_an_offer_message_over_the_brokers_packet_limit_is_refused_and_not_recorded(tmp_path, key):
    """The offer carries the whole manifest (a sha256 per transfer chunk): with small chunks it outgrew a broker
    limit of 20,000 bytes. It was refused only after being recorded, so the phantom offer became the device's
    newest in the database (and the retention could then delete the one the device really holds)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    small = Mosquitto(tmp_path / "small", users=USERS, options=("max_packet_size 20000",)).start()
    ctl = None
    try:
        ctl = start_controller(small, tmp_path / "fleet.db")
        bundle = make_bundle(tmp_path / "b", key, big_bytes=1 << 20, chunk_size=4 << 10)  # 257 chunk hashes
        with pytest.raises(PacketTooLarge, match=r"the offer of .* is \d+ bytes \(it carries the manifest: 25\d "
                                                 r"transfer chunks of 4 KiB\), over the maximum packet size .*"
                                                 r"--chunk-kib 512.*nothing was offered"):
            ctl.offer(FLEET, "mallory", bundle)
        assert ctl.store._exec("SELECT COUNT(*) FROM offers").fetchone()[0] == 0
        assert ctl.store._exec("SELECT COUNT(*) FROM offer_targets").fetchone()[0] == 0
        assert ctl.health() == (True, "ok")
    finally:
        if ctl is not None:
            ctl.stop()
        small.stop()
