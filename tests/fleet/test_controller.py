"""The fleet controller against a real Mosquitto, with devices speaking the agents' protocol."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import MqttSession, MqttSettings
from agent.topics import (DeviceHealth, LatencyPercentiles, ReportedState, TelemetryReport, chunk_response_topic,
                          chunk_request_topic, health_topic, ota_offer_topic, telemetry_topic)
from fleet.controller import ControllerSettings, FleetController, format_status, prometheus_metrics
from fleet.store import Store
from ota.transfer import ChunkRequest, ChunkResponse
from ota.update import Offer
from waiting import until

FLEET = "plant7"




def device_state(device: str, version: str = "1.0.0") -> ReportedState:
    return ReportedState(device=device, online=True, agent_version="0.1.0", execution_path="onnxruntime:cpu",
                         model={"name": "tiny", "version": version, "sha256": "0" * 64}, active_slot="a",
                         uptime_s=1.0, ts=time.time())


def session(mosquitto, device: str) -> MqttSession:
    s = MqttSession(MqttSettings(enabled=True, port=mosquitto.port, reconnect_min_delay_s=0.1),
                    fleet=FLEET, device=device, state_fn=lambda online=True: device_state(device))
    s.start()
    assert s.wait_connected(10)
    return s


@pytest.fixture
def controller(mosquitto, tmp_path):
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET))
    ctl.start()
    yield ctl
    ctl.stop()


def test_registry_follows_state_and_the_will(controller, mosquitto, tmp_path):
    a = session(mosquitto, "dev-a")
    # dev-b dies without a goodbye: a process killed with SIGKILL, so only the broker's Will speaks
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path.parents[0])!r})
        from agent.mqtt import MqttSession, MqttSettings
        from agent.topics import ReportedState
        st = lambda online=True: ReportedState(device="dev-b", online=online, agent_version="0.1.0", uptime_s=0,
                                               ts=time.time())
        s = MqttSession(MqttSettings(enabled=True, port={mosquitto.port}, keepalive_s=5), fleet={FLEET!r},
                        device="dev-b", state_fn=st).start()
        s.wait_connected(10)
        print("up", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    until(lambda: {d["device"]: d["online"] for d in controller.store.devices(FLEET)} == {"dev-a": 1, "dev-b": 1})
    proc.kill()
    proc.wait()
    until(lambda: {d["device"]: d["online"] for d in controller.store.devices(FLEET)}.get("dev-b") == 0)
    row = next(d for d in controller.store.devices(FLEET) if d["device"] == "dev-a")
    assert row["model_version"] == "1.0.0" and row["execution_path"] == "onnxruntime:cpu"
    a.close()
    until(lambda: next(d for d in controller.store.devices(FLEET) if d["device"] == "dev-a")["online"] == 0)


def test_a_will_made_before_an_update_does_not_take_the_registry_back_to_the_old_model(controller, mosquitto,
                                                                                       tmp_path):
    """The broker's Will is the state of the device when it connected: after an OTA update on the same connection,
    a crash had the registry list the device under the model it served at connect (and `fleet serve` log a model
    change). Offline, the device keeps what it last reported."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path.parents[0])!r})
        from agent.mqtt import MqttSession, MqttSettings
        from agent.topics import ReportedState
        version = ["1.0.0"]
        st = lambda online=True: ReportedState(device="dev-w", online=online, agent_version="0.1.0", uptime_s=0,
                                               model={{"name": "tiny", "version": version[0], "sha256": "0" * 64}},
                                               execution_path="onnxruntime:cpu", ts=time.time())
        s = MqttSession(MqttSettings(enabled=True, port={mosquitto.port}, keepalive_s=5), fleet={FLEET!r},
                        device="dev-w", state_fn=st).start()
        s.wait_connected(10)
        version[0] = "1.1.0"  # an update committed on this connection: the Will still says 1.0.0
        s.publish_state().wait_for_publish(10)
        print("up", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    until(lambda: [(d["online"], d["model_version"]) for d in controller.store.devices(FLEET)] == [(1, "1.1.0")])
    proc.kill()
    proc.wait()
    until(lambda: controller.store.devices(FLEET)[0]["online"] == 0)
    row = controller.store.devices(FLEET)[0]
    assert row["model_version"] == "1.1.0" and row["execution_path"] == "onnxruntime:cpu", row


def test_an_agents_own_offline_state_is_taken_whole_and_an_older_will_is_not(tmp_path):
    """The agent's offline state at a clean stop is newer than all it said (a model changed while the controller
    was away is in it); the broker's Will, older than the states after it, only says the device is gone."""
    store = Store(tmp_path / "fleet.db")
    state = lambda version, online, ts: {**device_state("dev-s", version).model_dump(mode="json"),  # noqa: E731
                                         "online": online, "ts": ts}
    store.upsert_state(FLEET, state("1.0.0", True, 100.0))
    store.upsert_state(FLEET, state("1.1.0", False, 500.0))  # a clean stop, serving 1.1.0
    assert [(d["online"], d["model_version"]) for d in store.devices(FLEET)] == [(0, "1.1.0")]
    store.upsert_state(FLEET, state("1.1.0", True, 600.0))
    store.upsert_state(FLEET, state("1.0.0", False, 550.0))  # the Will made at its connect: older
    assert [(d["online"], d["model_version"]) for d in store.devices(FLEET)] == [(0, "1.1.0")]


def test_states_of_one_agent_run_are_ordered_by_uptime_not_by_the_device_clock(tmp_path):
    """A box that booted with its clock ahead (no RTC battery) made its Will at connect with that clock; NTP then set
    it back, and it committed an update and lost power. By `ts` the Will looked newer than the states after it and
    the registry went back to the model it served at connect. States of one agent run (`hardware.run`) are ordered
    by `uptime_s` (monotonic); a clean stop whose `ts` is earlier than the stored state's is still taken whole."""
    store = Store(tmp_path / "fleet.db")

    def state(version, online, ts, uptime, run="run-1"):
        s = device_state("dev-c", version).model_dump(mode="json")
        return {**s, "online": online, "ts": ts, "uptime_s": uptime, "hardware": {**s["hardware"], "run": run}}
    rows = lambda: [(d["online"], d["model_version"]) for d in store.devices(FLEET)]  # noqa: E731
    store.upsert_state(FLEET, state("1.0.0", True, 9_000.0, 5.0))  # online at boot, the clock an hour ahead
    store.upsert_state(FLEET, state("1.1.0", True, 5_500.0, 600.0))  # NTP set it back; 1.1.0 committed
    store.upsert_state(FLEET, state("1.0.0", False, 9_000.0, 4.0))  # the Will from connect time: power lost
    assert rows() == [(0, "1.1.0")]
    store.upsert_state(FLEET, state("1.1.0", True, 9_500.0, 7.0, run="run-2"))  # the next boot, ahead again
    store.upsert_state(FLEET, state("1.2.0", False, 6_000.0, 900.0, run="run-2"))  # a clean stop after NTP
    assert rows() == [(0, "1.2.0")]
    # another run's offline state (a Will of an older connection, handed over late): by `ts`, as before
    store.upsert_state(FLEET, state("1.2.0", True, 6_100.0, 3.0, run="run-3"))
    store.upsert_state(FLEET, state("1.0.0", False, 6_050.0, 2_000.0, run="run-2"))
    assert rows() == [(0, "1.2.0")]


def test_telemetry_is_aggregated_and_malformed_messages_are_counted(controller, mosquitto):
    dev = session(mosquitto, "dev-t")
    until(lambda: controller.store.devices(FLEET))
    now = time.time()
    for i, (p50, p95) in enumerate([(10.0, 20.0), (30.0, 40.0)]):
        dev.publish_telemetry(TelemetryReport(
            device="dev-t", window_start=now - 10, window_end=now + i, count=1 + i,
            ttft_ms=LatencyPercentiles(p50=p50, p95=p95, p99=p95), per_token_ms=LatencyPercentiles(p50=p50 / 10,
            p95=p95 / 10, p99=p95 / 10), tokens_per_s=50.0, model_version="1.0.0"))
    raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.port)
    raw.loop_start()
    for junk in (b"not json", json.dumps({"device": "dev-t", "count": "many"}).encode(), b"\xff" * 10):
        raw.publish(telemetry_topic(FLEET, "dev-t"), junk, qos=1).wait_for_publish(5)
    until(lambda: controller.store.counter("rejected_messages") == 3)
    until(lambda: controller.store.latency(FLEET, "dev-t", now - 60)["requests"] == 3)
    lat = controller.store.latency(FLEET, "dev-t", now - 60)
    assert lat["ttft_p50_ms"] == pytest.approx((10 * 1 + 30 * 2) / 3)  # request-weighted
    assert lat["token_p95_ms"] == pytest.approx((2 * 1 + 4 * 2) / 3)
    table = format_status(controller.store, FLEET)
    assert "dev-t" in table and "rejected messages: 3" in table
    raw.loop_stop()
    dev.close()


def test_a_report_delivered_twice_counts_once(controller, mosquitto):
    """QoS 1 may deliver a report twice, and an agent re-sends what it buffered during an outage: the second
    copy must not count twice in the latency, the request counts, /metrics and the rollout gate."""
    dev = session(mosquitto, "dev-d")
    until(lambda: controller.store.devices(FLEET))
    now = time.time()
    report = TelemetryReport(device="dev-d", window_start=now - 10, window_end=now, count=4,
                             ttft_ms=LatencyPercentiles(p50=10.0, p95=20.0, p99=20.0),
                             per_token_ms=LatencyPercentiles(p50=1.0, p95=2.0, p99=2.0), tokens_per_s=50.0,
                             model_version="1.0.0")
    later = report.model_copy(update={"window_start": now, "window_end": now + 10, "count": 1,
                                      "per_token_ms": LatencyPercentiles(p50=5.0, p95=8.0, p99=8.0)})
    for r in (report, report, later, report):
        dev.publish_telemetry(r)
    until(lambda: controller.store.counter("telemetry_reports") + controller.store.counter("telemetry_duplicates")
          == 4)
    assert (controller.store.counter("telemetry_reports"), controller.store.counter("telemetry_duplicates")) == (2, 2)
    lat = controller.store.latency(FLEET, "dev-d", now - 60)
    assert lat["requests"] == 5 and lat["token_p95_ms"] == pytest.approx((2 * 4 + 8 * 1) / 5)
    dev.close()


def test_offer_is_retained_and_its_chunks_are_served(controller, mosquitto, signed_bundles):
    dev = session(mosquitto, "dev-o")
    offers = []
    dev.subscribe(ota_offer_topic(FLEET, "dev-o"), Offer)
    update_id = controller.offer(FLEET, "dev-o", signed_bundles["v2"])
    until(lambda: (ev := dev.get_event(0.2)) is not None and getattr(ev, "payload", None) is not None
          and offers.append(ev.payload) is None)
    offer = offers[0]
    assert offer.update_id == update_id and offer.source == {"type": "mqtt"}
    manifest = json.loads(offer.manifest_bytes())
    entry = next(f for f in manifest["files"] if f["path"] == "openvino/openvino_model.bin")
    req = ChunkRequest(id=uuid.uuid4().hex, update_id=update_id, path=entry["path"], index=1,
                       chunk_size=manifest["chunk_size"])
    reply = dev.request(chunk_request_topic(FLEET, "dev-o"), req,
                        response_topic=chunk_response_topic(FLEET, "dev-o")).result(timeout=10)
    data = base64.b64decode(ChunkResponse.model_validate_json(reply.payload).data_b64)
    assert hashlib.sha256(data).hexdigest() == entry["chunks"][1]
    bad = ChunkRequest(id=uuid.uuid4().hex, update_id="nope", path=entry["path"], index=0, chunk_size=4096)
    reply = dev.request(chunk_request_topic(FLEET, "dev-o"), bad,
                        response_topic=chunk_response_topic(FLEET, "dev-o")).result(timeout=10)
    assert "not offered" in ChunkResponse.model_validate_json(reply.payload).error
    dev.close()


def test_many_offers_of_one_bundle_share_one_manifest_and_a_removal_stops_the_chunks(controller, mosquitto,
                                                                                     signed_bundles, tmp_path,
                                                                                     monkeypatch):
    """A rollout offers one bundle under a new update id per device: the chunk server parsed and kept the
    bundle's manifest once per update id (~160 KiB each for a 300 MB bundle: 1,500 devices held ~240 MB
    for ever), and remembered every (update, device) it had answered, so `fleet device remove` run beside
    `fleet serve` did not stop the chunks of a device that had started downloading."""
    import ota.transfer as transfer

    parsed = []
    real = transfer.read_manifest
    monkeypatch.setattr(transfer, "read_manifest", lambda root: parsed.append(root) or real(root))
    devices = [f"dev-m{i}" for i in range(40)]
    updates = {d: controller.offer(FLEET, d, signed_bundles["v2"]) for d in devices}
    manifest = json.loads((signed_bundles["v2"] / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "openvino/openvino_model.bin")

    def ask(dev, device):
        req = ChunkRequest(id=uuid.uuid4().hex, update_id=updates[device], path=entry["path"], index=0,
                           chunk_size=manifest["chunk_size"])
        reply = dev.request(chunk_request_topic(FLEET, device), req,
                            response_topic=chunk_response_topic(FLEET, device)).result(timeout=10)
        return ChunkResponse.model_validate_json(reply.payload)

    for device in devices[:20]:
        dev = session(mosquitto, device)
        answer = ask(dev, device)
        assert hashlib.sha256(base64.b64decode(answer.data_b64)).hexdigest() == entry["chunks"][0]
        dev.close()
    assert len(parsed) == 1  # one bundle, one parse, however many update ids

    dev = session(mosquitto, devices[0])
    other = Store(tmp_path / "fleet.db")  # `fleet device remove --force` in another process
    assert other.remove_device(FLEET, devices[0])["offer_targets"] == 1
    other.close()
    monkeypatch.setattr("fleet.controller.OFFERED_CHECK_S", 0.0)  # the check's age has passed
    assert "not offered" in ask(dev, devices[0]).error
    dev.close()


def test_status_cli(controller, mosquitto, tmp_path):
    dev = session(mosquitto, "dev-s")
    until(lambda: controller.store.devices(FLEET))
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "status", "--db", str(tmp_path / "fleet.db"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)["devices"]
    assert [d["device"] for d in devices] == ["dev-s"] and devices[0]["model_version"] == "1.0.0"
    dev.close()


def health(device: str, ts: float, **values) -> DeviceHealth:
    base = dict(uptime_s=60.0, rss_bytes=300 << 20, memory_available_bytes=3 << 30, cpu_seconds=12.5, load_1m=0.5,
                cpus=4, disk_free_bytes=20 << 30, temperature_c=61.0, kv_waits=2, kv_bound_bytes=175 << 20)
    return DeviceHealth(device=device, ts=ts, **{**base, **values})


def test_device_health_is_kept_per_device_and_shown_in_status_json_and_metrics(controller, mosquitto, tmp_path):
    """What a box has left (memory, disk) reaches the operator: the latest snapshot received per device (the
    device's clock orders nothing), never one device's on another's row; gone with the device."""
    devs = {name: session(mosquitto, name) for name in ("dev-h1", "dev-h2")}
    until(lambda: len(controller.store.devices(FLEET)) == 2)
    now = time.time()
    devs["dev-h1"].publish_snapshot(health_topic(FLEET, "dev-h1"), health("dev-h1", now, disk_free_bytes=900 << 20))
    devs["dev-h2"].publish_snapshot(health_topic(FLEET, "dev-h2"), health("dev-h2", now, rss_bytes=1536 << 20))
    until(lambda: len(controller.store.health(FLEET)) == 2)
    # a device's clock ten years ahead (no RTC, NTP not synced yet), then set right: its later snapshots count
    devs["dev-h1"].publish_snapshot(health_topic(FLEET, "dev-h1"), health("dev-h1", now + 3e8, disk_free_bytes=1))
    until(lambda: controller.store.health(FLEET)[(FLEET, "dev-h1")]["disk_free_bytes"] == 1)
    devs["dev-h1"].publish_snapshot(health_topic(FLEET, "dev-h1"), health("dev-h1", now, disk_free_bytes=900 << 20))
    # one device's snapshot on another's topic, and junk, are refused and counted
    devs["dev-h1"].publish_snapshot(health_topic(FLEET, "dev-h2"), health("dev-h1", now + 1))
    raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    raw.connect("127.0.0.1", mosquitto.port)
    raw.loop_start()
    raw.publish(health_topic(FLEET, "dev-h1"), json.dumps({"device": "dev-h1", "rss_bytes": -1}), qos=1).wait_for_publish(5)
    until(lambda: controller.store.counter("rejected_messages") == 2)
    until(lambda: controller.queued_telemetry == 0 and not controller._health)  # all that came is stored
    assert controller.store.health(FLEET)[(FLEET, "dev-h1")]["disk_free_bytes"] == 900 << 20
    devs["dev-h1"].publish_snapshot(health_topic(FLEET, "dev-h1"), health("dev-h1", now + 2, disk_free_bytes=800 << 20))
    until(lambda: controller.store.health(FLEET)[(FLEET, "dev-h1")]["disk_free_bytes"] == 800 << 20)
    assert controller.store.health(FLEET)[(FLEET, "dev-h2")]["rss_bytes"] == 1536 << 20

    table = format_status(controller.store, FLEET)
    head, _, row1, row2 = table.splitlines()[:4]
    cols = head.split()
    assert "rss" in cols and "disk" in cols
    assert "300M" in row1.split() and "3.0G" in row1.split() and "800M" in row1.split()
    assert "1.5G" in row2.split() and "20G" in row2.split()

    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "status", "--db", str(tmp_path / "fleet.db"),
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    by_name = {d["device"]: d for d in json.loads(out.stdout)["devices"]}
    assert by_name["dev-h1"]["health"]["disk_free_bytes"] == 800 << 20
    assert by_name["dev-h2"]["health"]["kv_waits"] == 2 and by_name["dev-h2"]["health"]["received"] >= now - 5

    metrics = prometheus_metrics(controller.store, True)
    assert f'edgeglm_fleet_device_disk_free_bytes{{fleet="{FLEET}",device="dev-h1"}} {800 << 20}' in metrics
    assert f'edgeglm_fleet_device_resident_memory_bytes{{fleet="{FLEET}",device="dev-h2"}} {1536 << 20}' in metrics
    assert f'edgeglm_fleet_device_temperature_celsius{{fleet="{FLEET}",device="dev-h2"}} 61' in metrics
    assert "# TYPE edgeglm_fleet_device_kv_waits_total counter" in metrics
    received = controller.store.health(FLEET)[(FLEET, "dev-h1")]["received"]
    assert f'edgeglm_fleet_device_health_received_timestamp_seconds{{fleet="{FLEET}",device="dev-h1"}} ' \
           f'{received!r}' in metrics

    # a box gone offline: its last figures are no longer shown as current, nor exported (an alert on them would
    # keep firing for a box that is off); the snapshot stays for --json, with its received time
    devs["dev-h1"].close()
    until(lambda: next(d for d in controller.store.devices(FLEET) if d["device"] == "dev-h1")["online"] == 0)
    row1 = format_status(controller.store, FLEET).splitlines()[2].split()
    assert row1[1] == "dev-h1" and row1[-4:] == ["-", "-", "-", "-"], row1
    assert 'device="dev-h1"' not in prometheus_metrics(controller.store, True)

    controller.store.remove_device(FLEET, "dev-h2")
    assert (FLEET, "dev-h2") not in controller.store.health(FLEET)
    assert "dev-h2" not in prometheus_metrics(controller.store, True)
    raw.loop_stop()
    devs["dev-h2"].close()


def test_a_snapshot_whose_next_one_is_overdue_is_not_shown_as_the_box_now(tmp_path):
    """An online box whose agent stopped sending health (the fleet set health_interval_s = 0, or the agent is
    stuck) kept showing its last figures as current, for ever. Each snapshot says when the next is due
    (`next_s`): past twice that (+30 s) the figures are not shown; the received time stays exported, so an
    alert on the age can fire. A fresh one is shown again."""
    db = tmp_path / "fleet.db"
    now = time.time()
    Store(db).upsert_state(FLEET, device_state("dev-o").model_dump(mode="json"))
    Store(db, clock=lambda: now - 100).put_health([(FLEET, health("dev-o", now - 100, next_s=5.0).model_dump())])
    store = Store(db)
    assert format_status(store, FLEET).splitlines()[2].split()[-4:] == ["-", "-", "-", "-"]
    metrics = prometheus_metrics(store, True)
    assert "edgeglm_fleet_device_resident_memory_bytes{" not in metrics
    received = float(next(line for line in metrics.splitlines()
                          if line.startswith("edgeglm_fleet_device_health_received_timestamp_seconds{")).split()[-1])
    assert received == pytest.approx(now - 100, abs=0.01)  # every digit: an alert on time() - this works
    store.put_health([(FLEET, health("dev-o", now, next_s=5.0).model_dump())])
    assert "300M" in format_status(store, FLEET).splitlines()[2].split()
    assert 'edgeglm_fleet_device_resident_memory_bytes{fleet="plant7",device="dev-o"} 314572800' in \
        prometheus_metrics(store, True)


def test_a_device_that_sends_no_health_shows_dashes(controller, mosquitto):
    """An agent older than the health topic: its row has no memory or disk figures, and nothing fails."""
    dev = session(mosquitto, "dev-old")
    until(lambda: controller.store.devices(FLEET))
    row = format_status(controller.store, FLEET).splitlines()[2].split()
    assert row[-4:] == ["-", "-", "-", "-"]  # rss, mem free, disk free, config
    dev.close()


# --- staged rollouts with simulated devices ---------------------------------------------------

from fleet.rollout import RolloutDriver, create_rollout, load_rollouts  # noqa: E402
from fleet.simulator import SimDevice, SimProfile  # noqa: E402


def run_rollout(controller, devices, rollout_id, until_phase, window_s, max_s=60.0):
    driver = RolloutDriver(controller.store, controller)
    deadline = time.monotonic() + max_s
    sent = controller.store.counter("telemetry_reports")
    while True:
        t0 = time.time()
        for dev in devices:
            dev.report()
        # tick on what the controller has stored: a report still on its way would leave the baseline
        # or the canary window without telemetry, however long the window
        sent += len(devices)
        until(lambda: controller.store.counter("telemetry_reports") >= sent)
        if all(dev.profile.health for dev in devices):  # and their health snapshots (the memory gate's "before")
            until(lambda: sum(h["received"] >= t0 for (fleet, _), h in controller.store.health().items()
                              if fleet in {dev.fleet for dev in devices}) >= len(devices))
        driver.tick()
        r = next(r for r in load_rollouts(controller.store) if r.id == rollout_id)
        if r.phase in until_phase:
            return r
        assert time.monotonic() < deadline, f"rollout stuck in {r.phase}: {r.data['report']}"
        time.sleep(0.2)


@pytest.fixture
def fleet_of_four(mosquitto):
    profile = SimProfile(per_token_ms={"1.0.0": 10.0, "1.1.0": 10.2})
    devs = [SimDevice(MqttSettings(enabled=True, port=mosquitto.port), FLEET, f"sim-{i}", profile=profile).start()
            for i in range(4)]
    yield devs, profile
    for d in devs:
        d.stop()


def test_rollout_proceeds_when_latency_holds(controller, fleet_of_four, signed_bundles):
    devs, profile = fleet_of_four
    profile.rss_mb["1.1.0"] = 260.0  # the new model takes more memory: said in the report, not a halt (no floor)
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, max_regression_pct=20,
                         window_s=1.0)
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "done", r.data["report"]
    assert r.data["canaries"] == ["sim-0"] and r.data["rest"] == ["sim-1", "sim-2", "sim-3"]
    gate = next(line for line in r.data["report"] if "latency gate passed" in line)
    assert "; memory: sim-0 rss 200 MiB -> 260 MiB, free 2048 MiB -> 2048 MiB" in gate, gate
    until(lambda: {d["model_version"] for d in controller.store.devices(FLEET)} == {"1.1.0"})


def test_devices_already_on_the_version_are_neither_canaries_nor_offered(controller, mosquitto, signed_bundles):
    profile = SimProfile(per_token_ms={"1.0.0": 10.0, "1.1.0": 10.2})
    devs = [SimDevice(MqttSettings(enabled=True, port=mosquitto.port), FLEET, f"sim-{i}",
                      version="1.1.0" if i == 0 else "1.0.0", profile=profile).start() for i in range(4)]
    try:
        until(lambda: len(controller.store.devices(FLEET)) == 4)
        rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0)
        r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
        assert r.phase == "done", r.data["report"]
        assert r.data["already"] == ["sim-0"] and r.data["canaries"] == ["sim-1"] and r.data["rest"] == ["sim-2",
                                                                                                          "sim-3"]
        assert devs[0].offers == [] and all(len(d.offers) == 1 for d in devs[1:])
        assert any("1 already run 1.1.0, not offered: ['sim-0']" in line for line in map(str, r.data["report"]))
        # a second rollout of the same version finds nothing to do and offers nothing
        rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0)
        r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
        assert r.phase == "done" and "every online device of fleet plant7 already runs 1.1.0" in str(r.data["report"])
        assert devs[0].offers == [] and all(len(d.offers) == 1 for d in devs[1:])
    finally:
        for d in devs:
            d.stop()


def test_devices_on_a_newer_version_are_neither_canaries_nor_offered(controller, mosquitto, signed_bundles):
    """A pilot box given 1.2.0 by `fleet offer` was picked as the canary of a rollout to 1.1.0 (only the same
    version was left out): its agent refused the downgrade, and the refused canary halted the rollout."""
    profile = SimProfile(per_token_ms={"1.0.0": 10.0, "1.1.0": 10.2})
    devs = [SimDevice(MqttSettings(enabled=True, port=mosquitto.port), FLEET, f"sim-{i}",
                      version="1.2.0" if i in (0, 3) else "1.0.0", profile=profile).start() for i in range(4)]
    try:
        until(lambda: len(controller.store.devices(FLEET)) == 4)
        rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0)
        r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
        assert r.phase == "done", r.data["report"]
        assert r.data["newer"] == ["sim-0", "sim-3"] and r.data["canaries"] == ["sim-1"]
        assert r.data["rest"] == ["sim-2"]
        assert devs[0].offers == [] and devs[3].offers == [] and all(len(d.offers) == 1 for d in devs[1:3])
        assert any("2 run a version newer than 1.1.0, not offered" in line for line in map(str, r.data["report"]))
    finally:
        for d in devs:
            d.stop()


def test_rollout_halts_on_a_latency_regression_and_rolls_canaries_back(controller, fleet_of_four, signed_bundles):
    devs, profile = fleet_of_four
    profile.per_token_ms["1.1.0"] = 25.0  # the new model is 2.5x slower
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=50, max_regression_pct=20,
                         window_s=1.0, previous_bundle=signed_bundles["v1"],
                         key=signed_bundles["root"] / "keys" / "fleet.key")
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "halted"
    assert any("latency gate failed" in line and "p95 per-token latency" in line for line in r.data["report"])
    until(lambda: {d["model_version"] for d in controller.store.devices(FLEET)} == {"1.0.0"})
    assert [d.version for d in devs] == ["1.0.0"] * 4  # canaries went back; the rest never moved
    # `fleet status` showed only the last line ("halted; canaries [...] offered a signed rollback"): not why
    status = format_status(controller.store, FLEET).splitlines()
    line = next(i for i, x in enumerate(status) if x.startswith(f"rollout {rid} ("))
    assert status[line].startswith(f"rollout {rid} (v2 1.1.0 -> {FLEET}): halted"), status[line]
    assert status[line + 1].startswith("  halted because: latency gate failed: sim-") and \
        "p95 per-token latency" in status[line + 1], status[line:]
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "status", "--db",
                          str(controller.settings.db), "--json"], capture_output=True, text=True)
    rollout = next(x for x in json.loads(out.stdout)["rollouts"] if x["id"] == rid)
    assert rollout["phase"] == "halted" and rollout["version"] == "1.1.0", rollout
    assert rollout["halt_reason"].startswith("latency gate failed") and rollout["report"] == r.data["report"]


def test_a_regression_under_the_absolute_floor_passes_and_says_so(controller, fleet_of_four, signed_bundles):
    """A canary 50% slower by under --min-delta-ms passes, as it should (jitter of a tiny model), but the report
    said only "latency gate passed ({'sim-0': 50.0})", which reads as a pass by mistake."""
    devs, profile = fleet_of_four
    profile.per_token_ms["1.1.0"] = 15.0
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, max_regression_pct=20,
                         window_s=1.0, min_delta_ms=50.0)
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "done", r.data["report"]
    gate = next(line for line in r.data["report"] if "latency gate passed" in line)
    assert re.search(r"latency gate passed \(\{'sim-0': [\d.]+\}\); under --min-delta-ms 50: sim-0 \+[\d.]+ ms",
                     gate), gate
    from agent.demo import explain_report_line

    said = explain_report_line(gate)
    assert re.search(r"p95 per-token latency sim-0 \+[\d.]+% \(sim-0 \+[\d.]+ ms: under the 50 ms floor, "
                     r"--min-delta-ms, not a regression\)", said), said


def test_rollout_halts_when_a_canary_cannot_take_the_memory_floor_on_the_new_version(controller, fleet_of_four,
                                                                                     signed_bundles):
    """A bundle that fits but leaves a box with almost no memory (the next long prompt OOM-kills it): with
    --min-free-memory-mb the canaries' health snapshots on the new version halt the rollout and roll them back."""
    devs, profile = fleet_of_four
    profile.rss_mb["1.1.0"], profile.free_mb["1.1.0"] = 1900.0, 40.0
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0,
                         previous_bundle=signed_bundles["v1"], key=signed_bundles["root"] / "keys" / "fleet.key",
                         min_free_mb=64)
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "halted", r.data["report"]
    halt = next(line for line in r.data["report"] if "gate failed" in line)
    assert "latency gate failed" not in halt, halt  # the latency held: memory alone halted it
    assert "memory gate failed: sim-0: can still take 40 MiB of memory on the new version (was 2048 MiB), below " \
           "--min-free-memory-mb 64" in halt, halt
    until(lambda: {d["model_version"] for d in controller.store.devices(FLEET)} == {"1.0.0"})


def test_the_memory_gate_does_not_pass_a_canary_it_cannot_measure(controller, fleet_of_four, signed_bundles):
    """--min-free-memory-mb with canaries that send no health (agents from before it, or a health interval longer
    than the window): one more window, then the gate fails saying why, instead of passing blind."""
    devs, profile = fleet_of_four
    profile.health = False
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0, min_free_mb=64)
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "halted", r.data["report"]
    report = "\n".join(r.data["report"])
    assert "no health snapshot with free memory yet from ['sim-0']; waiting one more window" in report, report
    assert "memory gate failed: sim-0: no health snapshot in the window to judge its memory by" in report, report


def test_rollout_halts_when_a_canary_fails_its_self_test(controller, fleet_of_four, signed_bundles):
    devs, profile = fleet_of_four
    profile.fail_self_test.add("1.1.0")
    until(lambda: len(controller.store.devices(FLEET)) == 4)
    rid = create_rollout(controller.store, signed_bundles["v2"], FLEET, canary_pct=25, window_s=1.0)
    r = run_rollout(controller, devs, rid, ("done", "halted"), 1.0)
    assert r.phase == "halted" and any("canary update failed" in line for line in r.data["report"])
    assert all(d.version == "1.0.0" for d in devs)


class OfferRecorder:
    """Stands in for FleetController.offer: the driver's decisions without a broker."""

    def __init__(self):
        self.offers: list[tuple[str, str]] = []

    def offer(self, fleet, device, bundle, rollback_key=None) -> str:
        self.offers.append((device, bundle.name))
        return f"update-{len(self.offers)}"


def report(device: str, window_end: float, version: str, per_token_ms: float = 10.0, count: int = 5,
           errors: int = 0) -> dict:
    return {"device": device, "window_start": window_end - 1, "window_end": window_end, "count": count,
            "ttft_ms": {"p50": 50.0, "p95": 60.0, "p99": 70.0} if count else None,
            "per_token_ms": {"p50": per_token_ms, "p95": per_token_ms, "p99": per_token_ms} if count else None,
            "tokens_per_s": 100.0 if count else None, "errors": errors, "model_version": version}


def put(store, r: dict, skew_s: float = 0.0) -> None:
    """Store report `r` as the controller does when it arrives at the end of its window by the controller's
    clock; `skew_s`: how far the device's clock (its window times) is off the controller's."""
    arrived = r["window_end"]
    store.clock = lambda: arrived
    try:
        store.add_telemetry(FLEET, {**r, "window_start": r["window_start"] + skew_s,
                                    "window_end": r["window_end"] + skew_s})
    finally:
        store.clock = time.time


def _gate(tmp_path, base_errors: int = 0, skew_s: float = 0.0, min_requests: int = 1):
    """Two devices on 1.0.0 with a baseline, a rollout to 1.1.0 whose canary d0 has committed: the store,
    t0 and tick(now) -> the rollout (explicit clock values, no broker). `min_requests` 1: one report decides."""
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), float(int(time.time()))
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        for i in range(-(-min_requests // 5)):  # a baseline of at least min_requests requests (5 per report)
            put(store, report(d, t0 - 5 - i, "1.0.0", errors=base_errors if i == 0 else 0), skew_s)
    driver = RolloutDriver(store, OfferRecorder())
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')  # all the driver reads of it (OfferRecorder)
    rid = create_rollout(store, bundle, FLEET, canary_pct=50, window_s=10.0, min_requests=min_requests)

    def tick(now: float):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    r = tick(t0)
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "state": "reporting",
                                       "result": "committed"})
    assert tick(t0 + 1).phase == "canary_window"
    return store, t0, tick


def test_the_gate_counts_windows_where_every_request_failed(tmp_path):
    """An agent reports a window in which every request failed as count 0, errors N: `fleet status` counted
    those errors and the gate did not (a canary failing 50 requests and serving 5 passed)."""
    store, t0, tick = _gate(tmp_path)
    put(store, report("d0", t0 + 3, "1.1.0", count=0, errors=50))
    put(store, report("d0", t0 + 6, "1.1.0"))
    r = tick(t0 + 12)
    assert r.phase == "halting" and "d0: errors 0.0% -> 90.9% of requests (0 -> 50)" in r.data["report"][-1]


def put_after_gap(store, r: dict, gap: tuple[float, float]) -> None:
    """Store report `r` as the controller does where the reports of `gap` (the device's clock) never came."""
    from fleet.store import telemetry_row, with_gap

    arrived = r["window_end"]
    store.clock = lambda: arrived
    try:
        store.add_telemetry_many([with_gap(telemetry_row(FLEET, r), gap)])
    finally:
        store.clock = time.time


def test_the_gate_does_not_pass_a_canary_whose_telemetry_of_the_window_is_missing(tmp_path):
    """The gate read only what came: a canary whose reports of most of the window were lost on the way (a broker
    that forgot the controller's session) passed on the one that came (docs/fleet.md "Missing telemetry")."""
    store, t0, tick = _gate(tmp_path)
    put(store, report("d0", t0 + 2, "1.1.0"))
    put_after_gap(store, report("d0", t0 + 11, "1.1.0"), (t0 + 2, t0 + 10))  # 8 s of the window never came
    r = tick(t0 + 12)
    assert r.phase == "canary_window"  # one more window: a held window closes its gap when it comes
    assert "telemetry missing from {'d0': '8 s in 1 gap(s)'}; waiting one more window" in r.data["report"][-1]
    r = tick(t0 + 22)
    assert r.phase == "halting", r.data["report"]
    assert "latency gate failed: d0: telemetry missing for 8 s of the 21 s window: the gate does not pass what it " \
           "did not see" in r.data["report"][-1]


def test_the_gate_passes_a_canary_with_little_telemetry_missing_and_says_so(tmp_path):
    store, t0, tick = _gate(tmp_path)
    put(store, report("d0", t0 + 2, "1.1.0"))
    put_after_gap(store, report("d0", t0 + 11, "1.1.0"), (t0 + 9, t0 + 10))
    assert tick(t0 + 12).phase == "canary_window"
    r = tick(t0 + 22)
    assert r.phase == "rest", r.data["report"]
    assert "telemetry missing from {'d0': '1 s in 1 gap(s)'} (at most 10% of the window)" in r.data["report"][-1]


def test_the_gate_measures_only_the_new_versions_telemetry(tmp_path):
    """A canary that committed and then came back on 1.0.0 (a slot fallback, a manual rollback) reports on
    1.0.0: that is silence on the new version, not a pass."""
    store, t0, tick = _gate(tmp_path)
    store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    for i in range(5):
        put(store, report("d0", t0 + 2 + i, "1.0.0"))
    assert tick(t0 + 12).phase == "canary_window"
    r = tick(t0 + 22)
    assert r.phase == "halting" and "no telemetry on the new version" in r.data["report"][-1]


def test_a_canary_that_goes_back_by_itself_after_committing_halts_the_rollout_at_once(tmp_path):
    """The canary committed 1.1.0, then its agent kept dying while 1.1.0 was on probation and it went back to
    1.0.0 by itself (a second result for the same update: rolled_back). The rollout halts on that result with
    its reason, at once, instead of measuring the window and failing on silence."""
    store, t0, tick = _gate(tmp_path)
    r = tick(t0 + 2)
    assert r.phase == "canary_window"
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 3, "state": "reporting",
                                       "result": "rolled_back", "reason": "probation: the agent ended without a "
                                       "clean stop 3 times"})
    r = tick(t0 + 4)
    assert r.phase == "halting", r.data["report"]
    assert "canary update undone after it committed: {'d0': 'rolled_back'}" in r.data["report"][-1]
    assert "without a clean stop 3 times" in r.data["report"][-1]


def test_a_rollout_whose_every_device_was_a_canary_ends_in_words(tmp_path):
    """Every member a canary: the rest is empty, and the rollout ended "rollout finished: 0/0 of the rest
    committed; {}"."""
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), float(int(time.time()))
    store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    put(store, report("d0", t0 - 5, "1.0.0"))
    driver = RolloutDriver(store, OfferRecorder())
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')
    rid = create_rollout(store, bundle, FLEET, min_requests=1, canary_pct=100, window_s=10.0)

    def tick(now: float):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    r = tick(t0)
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "result": "committed"})
    assert tick(t0 + 1).phase == "canary_window"
    put(store, report("d0", t0 + 5, "1.1.0"))
    for now in (t0 + 12, t0 + 13, t0 + 14):
        r = tick(now)
    assert r.phase == "done", r.data["report"]
    assert r.data["report"][-1].endswith("rollout finished: no device besides the canaries needed it")


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0, -9 * 86400.0])
def test_the_gate_reads_the_controllers_clock_not_the_devices(tmp_path, skew_s):
    """An edge box's clock may be hours or days off (no RTC, NTP not synced after a boot). The gate read its
    windows on the reports' window_end: a canary an hour behind had every report on the new version fall
    before the window, so a 3x slower model was never compared (the gate waited, then halted on "no
    telemetry"). The windows are the controller's: what was stored in them, whatever the device's clock says."""
    store, t0, tick = _gate(tmp_path, skew_s=skew_s)
    for i in range(5):
        put(store, report("d0", t0 + 2 + i, "1.1.0", per_token_ms=30.0), skew_s)
    r = tick(t0 + 12)
    assert r.phase == "halting", r.data["report"][-1]
    assert "d0: p95 per-token latency 10.00 -> 30.00 ms (+200% > 20%)" in r.data["report"][-1]


def test_the_gate_compares_error_rates_not_counts(tmp_path):
    """Baseline 1 error in 6 requests; on the new version 2 errors in 102 (busier, and better): no halt."""
    store, t0, tick = _gate(tmp_path, base_errors=1)
    for i in range(20):
        put(store, report("d0", t0 + 1.5 + i * 0.4, "1.1.0", errors=1 if i in (3, 9) else 0))
    r = tick(t0 + 12)
    assert r.phase == "rest", r.data["report"][-1]


def test_an_older_rollouts_table_is_brought_up_to_date(tmp_path):
    """A database from before min_delta_ms: `fleet status`, /metrics and the driver used to fail on it."""
    import sqlite3

    from fleet.store import Store
    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("""CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, bundle TEXT NOT NULL, fleet TEXT NOT NULL, canary_pct REAL NOT NULL,
        max_regression_pct REAL NOT NULL, window_s REAL NOT NULL, previous_bundle TEXT, key TEXT,
        phase TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
        INSERT INTO rollouts VALUES (1, 'b', 'plant7', 10, 20, 300, NULL, NULL, 'done', '{"report": []}', 1, 1);""")
    db.commit()
    db.close()
    store = Store(tmp_path / "old.db")
    [r] = load_rollouts(store)
    assert r.phase == "done" and r.min_delta_ms == 1.0 and r.group is None
    assert r.min_requests == 1  # the gate it was started with: no minimum
    store.close()


def test_the_gate_decides_on_at_least_min_requests_per_canary(tmp_path):
    """A canary that served 5 requests on the new version decided the gate on those 5 (one slow request's
    tokens could pass or halt a fleet's rollout). By default the gate wants 10 per canary: with fewer after the
    window it waits one more window, and with fewer after that it halts, saying how many and what to do."""
    store, t0, tick = _gate(tmp_path, min_requests=10)
    put(store, report("d0", t0 + 3, "1.1.0"))  # 5 requests
    r = tick(t0 + 12)
    assert r.phase == "canary_window", r.data["report"]
    assert "fewer than 10 requests yet on the new version from {'d0': 5}; waiting one more window" \
        in r.data["report"][-1]
    r = tick(t0 + 22)
    assert r.phase == "halting", r.data["report"]
    assert "d0: 5 request(s) on the new version in 21 s, fewer than the 10 the gate decides on: send it traffic, " \
        "give a longer --window or a lower --min-requests" in r.data["report"][-1]


def test_a_canary_that_reaches_min_requests_in_the_second_window_is_compared(tmp_path):
    store, t0, tick = _gate(tmp_path, min_requests=10)
    put(store, report("d0", t0 + 3, "1.1.0", per_token_ms=30.0))
    assert tick(t0 + 12).phase == "canary_window"
    put(store, report("d0", t0 + 15, "1.1.0", per_token_ms=30.0))  # 10 in all: a 3x slower model is seen
    r = tick(t0 + 22)
    assert r.phase == "halting", r.data["report"]
    assert "d0: p95 per-token latency 10.00 -> 30.00 ms (+200% > 20%)" in r.data["report"][-1]


def test_a_baseline_with_too_few_requests_is_waited_for_then_not_compared(tmp_path):
    """A canary that served 5 requests before the update (fewer than --min-requests 10): the rollout waits up
    to two windows for more, then goes on, and the gate says its latency was not compared instead of comparing
    against 5 requests."""
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), float(int(time.time()))
    store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    put(store, report("d0", t0 - 5, "1.0.0"))
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')
    rid = create_rollout(store, bundle, FLEET, canary_pct=100, window_s=10.0)  # the default minimum: 10
    driver = RolloutDriver(store, OfferRecorder())

    def tick(now: float):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    r = tick(t0)
    assert r.phase == "canary" and r.data["report"][-1].endswith("waiting for baseline latency from ['d0'] "
                                                                "(10 requests each)"), r.data["report"]
    r = tick(t0 + 21)
    assert r.phase == "canary_wait", r.data["report"]
    assert "too few requests before the update to compare latency with ({'d0': 5}, fewer than 10)" \
        in r.data["report"][-1]
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 22, "state": "reporting",
                                       "result": "committed"})
    assert tick(t0 + 22).phase == "canary_window"
    for i in range(3):
        put(store, report("d0", t0 + 24 + i, "1.1.0", per_token_ms=30.0))
    r = tick(t0 + 33)
    assert r.phase == "rest", r.data["report"]
    assert "latency not compared for d0 (only 5 request(s) before the update)" in r.data["report"][-1]


@pytest.mark.parametrize("late_report", [True, False])
def test_a_silent_canary_gets_one_more_window_then_fails_the_gate(tmp_path, late_report):
    """Driven with explicit clock values: a canary whose first report lands in the second window
    proceeds; one silent for two windows halts the rollout, naming the missing telemetry."""
    from fleet.store import Store

    store, t0, window = Store(tmp_path / "fleet.db"), float(int(time.time())), 10.0  # exact sums
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        put(store, report(d, t0 - 5, "1.0.0"))
    driver = RolloutDriver(store, OfferRecorder())
    rid = create_rollout(store, tmp_path / "bundle-1.1.0", FLEET, min_requests=1, canary_pct=50, window_s=window)

    def tick(now: float):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)

    r = tick(t0)
    assert r.phase == "canary_wait" and r.data["canaries"] == ["d0"]
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "state": "reporting",
                                       "result": "committed"})
    assert tick(t0 + 1).phase == "canary_window"  # the window starts at t0 + 1
    put(store, report("d0", t0 + 0.5, "1.0.0"))  # before the window: not on the new version
    r = tick(t0 + 11)  # one window
    assert r.phase == "canary_window" and "no telemetry yet from ['d0']" in r.data["report"][-1]
    notes = len(r.data["report"])
    assert len(tick(t0 + 16).data["report"]) == notes  # said once
    if late_report:
        put(store, report("d0", t0 + 17, "1.1.0", per_token_ms=10.5))
        r = tick(t0 + 18)
        assert r.phase == "rest" and "latency gate passed" in r.data["report"][-1], r.data["report"]
    else:
        assert tick(t0 + 20).phase == "canary_window"
        r = tick(t0 + 21)  # two windows
        assert r.phase == "halting", r.data["report"]
        assert "latency gate failed: d0: no telemetry on the new version in the window" in r.data["report"][-1]
    store.close()


def test_a_halted_rollout_offers_each_canary_a_rollback_bound_to_the_version_it_serves(tmp_path, signed_bundles):
    """The halt path signs one statement per canary that committed the new version (or sent no result): its fleet
    and device, the version it serves (the rollout's for a canary that committed it), valid 24 h. A canary whose
    update failed serves the version it served before: it is offered none."""
    from fleet.rollout import ROLLBACK_VALID_S, RolloutDriver, create_rollout, load_rollouts
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), time.time()
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        put(store, report(d, t0 - 5, "1.0.0"))  # a baseline: the canaries are offered at once
    calls: list[dict] = []

    class Offers:  # FleetController.offer as the driver calls it, recording the offer as the controller does
        def offer(self, fleet, device, bundle, rollback_key=None, replaces=None, not_after=None):
            update_id = f"u-{len(calls)}"
            version = "1.1.0" if bundle == signed_bundles["v2"] else "1.0.0"
            store.add_offer(update_id, bundle, version, fleet, device)
            calls.append({"device": device, "version": version, "rollback": rollback_key is not None,
                          "replaces": replaces, "not_after": not_after})
            return update_id

    rid = create_rollout(store, signed_bundles["v2"], FLEET, min_requests=1, canary_pct=100, window_s=10.0,
                         previous_bundle=signed_bundles["v1"], key=signed_bundles["root"] / "keys" / "fleet.key")
    driver = RolloutDriver(store, Offers())
    driver.tick(t0)
    r = next(r for r in load_rollouts(store) if r.id == rid)
    assert r.phase == "canary_wait" and r.data["canaries"] == ["d0", "d1"]
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "result": "committed"})
    store.add_ota_status(FLEET, "d1", {"update_id": r.data["offers"]["d1"], "ts": t0 + 1, "result": "failed"})
    driver.tick(t0 + 1)
    driver.tick(t0 + 2)
    r = next(r for r in load_rollouts(store) if r.id == rid)
    assert r.phase == "halted", r.data["report"]
    rollbacks = [c for c in calls if c["rollback"]]
    # d1's update failed: it still serves 1.0.0, and a rollback "from 1.0.0" would only make it install 1.0.0 again
    assert [(c["device"], c["version"], c["replaces"]) for c in rollbacks] == [("d0", "1.0.0", "1.1.0")]
    assert "d1 (failed) already serve(s) the model from before the rollout" in r.data["report"][-1]
    assert all(abs(c["not_after"] - (time.time() + ROLLBACK_VALID_S)) < 60 for c in rollbacks)
    # a halt while a canary is still updating waits for its result: a rollback signed for the version it
    # serves now (1.0.0) would be refused once its update commits 1.1.0
    first = len(calls)
    rid = create_rollout(store, signed_bundles["v2"], FLEET, min_requests=1, canary_pct=100, window_s=10.0,
                         previous_bundle=signed_bundles["v1"], key=signed_bundles["root"] / "keys" / "fleet.key")
    driver.tick(t0 + 10)
    r = next(r for r in load_rollouts(store) if r.id == rid)
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 11, "result": "failed"})
    driver.tick(t0 + 11)
    driver.tick(t0 + 12)
    r = next(r for r in load_rollouts(store) if r.id == rid)
    assert r.phase == "halting" and "waiting for the update of ['d1'] to end" in r.data["report"][-1]
    assert not [c for c in calls[first:] if c["rollback"]]
    store.add_ota_status(FLEET, "d1", {"update_id": r.data["offers"]["d1"], "ts": t0 + 13, "result": "committed"})
    driver.tick(t0 + 14)
    rollbacks = [(c["device"], c["replaces"]) for c in calls[first:] if c["rollback"]]
    assert next(r for r in load_rollouts(store) if r.id == rid).phase == "halted"
    assert rollbacks == [("d1", "1.1.0")]
    store.close()


def test_a_halt_offers_no_rollback_to_a_canary_that_went_back_by_itself(controller, mosquitto, signed_bundles,
                                                                        tmp_path):
    """Canary d0 committed 1.1.0, then its agent kept dying while 1.1.0 was on probation and it went back to 1.0.0
    by itself (result rolled_back; the slot of 1.1.0 cleared). The halt offers the other canary, d1, its signed
    rollback, but none to d0: it serves 1.0.0 already, and the offer made it download 1.0.0 again into the cleared
    slot and switch to it (a second model on probation), and replaced its ROLLED BACK result in `fleet status`."""
    from agent.topics import ota_offer_topic, split_topic

    store, t0 = controller.store, float(int(time.time()))
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        put(store, report(d, t0 - 5, "1.0.0"))
    rid = create_rollout(store, signed_bundles["v2"], FLEET, min_requests=1, canary_pct=100, window_s=10.0,
                         previous_bundle=signed_bundles["v1"], key=signed_bundles["root"] / "keys" / "fleet.key")
    driver = RolloutDriver(store, controller)

    def tick(now: float):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    r = tick(t0)
    assert r.phase == "canary_wait" and r.data["canaries"] == ["d0", "d1"]
    for d in ("d0", "d1"):
        store.add_ota_status(FLEET, d, {"update_id": r.data["offers"][d], "ts": t0 + 1, "state": "reporting",
                                        "result": "committed"})
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.1.0"}})
    assert tick(t0 + 1).phase == "canary_window"
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 3, "state": "reporting",
                                       "result": "rolled_back", "reason": "probation: the agent ended without a "
                                       "clean stop 2 times"})
    store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    assert tick(t0 + 4).phase == "halting"
    r = tick(t0 + 5)
    assert r.phase == "halted", r.data["report"]
    offered = store._exec("SELECT t.device, o.version FROM offers o JOIN offer_targets t ON t.update_id = "
                          "o.update_id ORDER BY o.created").fetchall()
    assert offered == [("d0", "1.1.0"), ("d1", "1.1.0"), ("d1", "1.0.0")]  # no rollback offer to d0
    assert "d0 (rolled_back)" in r.data["report"][-1] and "['d1']" in r.data["report"][-1]
    got: dict[str, bytes] = {}  # what the broker holds for each device: d0 still has the offer of its update
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    sub.on_message = lambda c, u, m: got.__setitem__(m.topic, m.payload)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe([(ota_offer_topic(FLEET, d), 1) for d in ("d0", "d1")])
    sub.loop_start()
    try:
        until(lambda: len(got) == 2)
    finally:
        sub.loop_stop()
        sub.disconnect()
    retained = {split_topic(t)[1]: Offer.model_validate_json(p) for t, p in got.items()}
    assert retained["d0"].update_id == r.data["offers"]["d0"] and not retained["d0"].rollback
    assert retained["d1"].rollback and retained["d1"].rollback_terms.replaces == "1.1.0"
    assert f"update {r.data['offers']['d0']} ROLLED BACK on {FLEET}/d0" in format_status(store, FLEET)


def test_rollout_continues_after_a_controller_restart(mosquitto, tmp_path, fleet_of_four, signed_bundles):
    devs, _ = fleet_of_four
    settings = ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET)
    first = FleetController(settings).start()
    until(lambda: len(first.store.devices(FLEET)) == 4)
    rid = create_rollout(first.store, signed_bundles["v2"], FLEET, canary_pct=50, window_s=1.0)
    r = run_rollout(first, devs, rid, ("canary_window", "rest", "rest_wait"), 1.0)
    first.stop()  # the controller goes away mid-rollout
    second = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db",
                                                fleet=FLEET, client_id="edgeglm-controller-2")).start()
    try:
        r = run_rollout(second, devs, rid, ("done", "halted"), 1.0)
        assert r.phase == "done", r.data["report"]
        until(lambda: all(d.version == "1.1.0" for d in devs))
    finally:
        second.stop()


def test_fleet_serve_with_a_config_file_health_metrics_and_config_set(mosquitto, tmp_path):
    import urllib.request

    from broker import free_port

    http_port = free_port()
    (tmp_path / "fleet.toml").write_text(f"""
[fleet]
id = "{FLEET}"
[http]
port = {http_port}
[database]
path = "{tmp_path / 'f.db'}"
[mqtt]
port = {mosquitto.port}
""")
    serve = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(tmp_path / "fleet.toml")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dev = SimDevice(MqttSettings(enabled=True, port=mosquitto.port), FLEET, "sim-cli").start()
    try:
        early = [serve.stdout.readline()]  # devices may be logged before the banner (they connect at once)
        while "fleet controller" not in early[-1] and early[-1]:
            early.append(serve.stdout.readline())
        assert "fleet controller" in early[-1], early
        later: list[str] = []  # the rest of its log, read as it comes (a debug log would fill the pipe)
        reader = threading.Thread(target=lambda: later.extend(serve.stdout), daemon=True)
        reader.start()

        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()

        assert get("/healthz") == (200, "ok\n")
        until(lambda: 'edgeglm_fleet_devices{online="true"} 1' in get("/metrics")[1])
        out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "config", "set", "--config",
                              str(tmp_path / "fleet.toml"), "--fleet", FLEET, "--device", "sim-cli",
                              "sampling.max_tokens=64"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        until(lambda: dev.applied_config is not None)
        table = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "status", "--db", str(tmp_path / "f.db")],
                               capture_output=True, text=True).stdout
        assert "sim-cli" in table and "sim 1.0.0" in table
        bad = subprocess.run([sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "fleet config file not found" in bad.stderr
        # `systemctl reload` (SIGHUP; it used to end the controller, then was ignored): fleet.toml is read again
        (tmp_path / "token").write_text("s3cret\n")
        (tmp_path / "fleet.toml").write_text(f"""
log_level = "debug"
[fleet]
id = "{FLEET}"
[http]
port = {http_port}
metrics_token_file = "{tmp_path / 'token'}"
[database]
path = "{tmp_path / 'f.db'}"
retention_s = 3600
[mqtt]
port = {mosquitto.port + 1}
""")
        serve.send_signal(subprocess.signal.SIGHUP)

        def scrape(token=None):
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/metrics",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        until(lambda: scrape() == 401)  # the token applies at once ...
        assert scrape("s3cret") == 200 and get("/healthz") == (200, "ok\n")  # ... the broker port at a restart
        (tmp_path / "fleet.toml").write_text("[http\n")  # a broken file changes nothing
        serve.send_signal(subprocess.signal.SIGHUP)
        until(lambda: any("SIGHUP: fleet.toml not applied" in line for line in list(later)))
        assert serve.poll() is None and scrape("s3cret") == 200
        mosquitto.restart()  # the broker goes away and comes back: said once each in the log

        def healthy():
            try:
                return get("/healthz") == (200, "ok\n")
            except urllib.error.HTTPError:
                return False

        until(healthy)
    finally:
        dev.stop()
        serve.send_signal(subprocess.signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
        reader.join(10)
        log = "".join(early + later)
        assert f"INFO edgeglm.fleet: SIGHUP: {tmp_path / 'fleet.toml'} read again; applied: database.retention_s, " \
               "http.metrics_token_file, log_level" in log  # and fleet.toml's log_level reaches the log now
        assert "WARNING edgeglm.fleet: SIGHUP: mqtt.port changed in fleet.toml: applied at the next restart" in log
        assert "SIGHUP: fleet.toml not applied, the running config is kept" in log
        # what happens in the fleet is in the log at INFO (it had nothing but the SIGHUP lines)
        assert f"INFO edgeglm.fleet: device {FLEET}/sim-cli registered (online, serving 1.0.0)" in log, log
        assert log.count(f"WARNING edgeglm.fleet: lost the broker 127.0.0.1:{mosquitto.port}") == 1, log
        assert log.count(f"INFO edgeglm.fleet: connected to the broker 127.0.0.1:{mosquitto.port} again after") == 1


def test_config_set_publishes_everything_set_so_far_unless_replaced(controller, mosquitto, tmp_path):
    """Agents take a desired config as the fleet's whole layer over their own config (the broker keeps
    only the latest), so each one the controller publishes carries what was set before for that device
    (kept in its database, across restarts); `replace` starts again from the settings given."""
    from agent.mqtt import Received
    from agent.topics import DesiredConfig, desired_topic

    controller.set_desired(FLEET, "dev-c", {"sampling": {"max_tokens": 7, "top_k": 5}}, version=1)
    _, merged = controller.set_desired(FLEET, "dev-c", {"telemetry": {"interval_s": 10.0}, "sampling": {"top_k": 3}},
                                       version=2)
    want = {"sampling": {"max_tokens": 7, "top_k": 3}, "telemetry": {"interval_s": 10.0}}
    assert merged == want
    dev = session(mosquitto, "dev-c")  # connects now: gets the retained, whole config
    try:
        dev.subscribe(desired_topic(FLEET, "dev-c"), DesiredConfig)
        got = None
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            event = dev.get_event(timeout=0.2)
            if isinstance(event, Received) and isinstance(event.payload, DesiredConfig):
                got = event.payload
        assert got is not None and (got.version, got.settings) == (2, want)
    finally:
        dev.close()
    controller.stop()
    again = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET))
    again.start()
    try:
        assert again.set_desired(FLEET, "dev-c", {"cache": {"max_mb": 8}}, version=3)[1] == {**want, "cache": {"max_mb": 8}}
        assert again.set_desired(FLEET, "dev-c", {"sampling": {"top_k": 1}}, version=4, replace=True)[1] == \
            {"sampling": {"top_k": 1}}
        assert again.store.desired(FLEET, "dev-c") == {"sampling": {"top_k": 1}}
    finally:
        again.stop()


def test_a_config_set_cut_off_after_the_broker_took_it_is_still_what_the_next_one_merges_over(controller):
    """The desired config was recorded after it was published: Ctrl-C (or a crash) between the two left the agents
    applying settings the store lacked, and the next `config set` for the device silently took them back."""
    controller.set_desired(FLEET, "dev-k", {"sampling": {"top_k": 5}}, version=1)
    publish = controller._publish_retained

    def published_then_interrupted(*args):
        publish(*args)  # the broker has it (retained): the agents apply it
        raise KeyboardInterrupt
    controller._publish_retained = published_then_interrupted
    with pytest.raises(KeyboardInterrupt):
        controller.set_desired(FLEET, "dev-k", {"cache": {"max_mb": 8}}, version=2)
    controller._publish_retained = publish
    assert controller.set_desired(FLEET, "dev-k", {"sampling": {"max_tokens": 9}}, version=3)[1] == \
        {"sampling": {"top_k": 5, "max_tokens": 9}, "cache": {"max_mb": 8}}


def test_a_rollout_step_during_a_broker_outage_offers_once_when_it_is_back(mosquitto, tmp_path, signed_bundles):
    """While the broker is away an offer is refused at once (nothing recorded, nothing queued): paho used to
    queue each try, and the step, retried every tick with a new update id, reached the device N times."""
    import paho.mqtt.client as paho_client
    from paho.mqtt.packettypes import PacketTypes as Packets
    from paho.mqtt.properties import Properties as Props

    from agent.topics import ota_offer_topic
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET)).start()
    got = []
    dev = paho_client.Client(CallbackAPIVersion.VERSION2, client_id="plant7-d0", protocol=paho_client.MQTTv5)
    dev.on_message = lambda c, u, m: got.append(m.payload)
    subscribed = threading.Event()
    dev.on_subscribe = lambda *a: subscribed.set()
    props = Props(Packets.CONNECT)
    props.SessionExpiryInterval = 3600
    dev.reconnect_delay_set(0.2, 1)
    dev.connect("127.0.0.1", mosquitto.port, clean_start=False, properties=props)
    dev.subscribe(ota_offer_topic(FLEET, "d0"), 1)
    dev.loop_start()
    # the broker must hold the subscription in the device's session before it stops (paho does not subscribe
    # again after a reconnect): without this wait a busy machine stopped the broker first and no offer came
    assert subscribed.wait(10)
    try:
        t0 = time.time()
        ctl.store.upsert_state(FLEET, {"device": "d0", "online": True, "model": {"name": "m", "version": "1.0.0"}})
        ctl.store.add_telemetry(FLEET, report("d0", t0 - 5, "1.0.0"))
        rid = create_rollout(ctl.store, signed_bundles["v2"], FLEET, min_requests=1, canary_pct=100, window_s=10)
        driver = RolloutDriver(ctl.store, ctl)
        mosquitto.stop()
        until(lambda: not ctl.client.is_connected())
        for _ in range(5):
            driver.tick()
        assert ctl.store._exec("SELECT COUNT(*) FROM offer_targets").fetchone()[0] == 0
        mosquitto.start()
        until(lambda: ctl.client.is_connected(), 40)
        driver.tick()
        assert next(r for r in load_rollouts(ctl.store) if r.id == rid).phase == "canary_wait"
        until(lambda: len(got) >= 1)
        # a marker from the controller's own client, after the step: anything it had queued or sent again arrives
        # before it (one publisher, one subscriber: the broker keeps their order)
        marker = b'{"marker": "after the step"}'
        ctl.client.publish(ota_offer_topic(FLEET, "d0"), marker, qos=1)
        until(lambda: marker in got)
        assert len(got) == 2 and ctl.store._exec("SELECT COUNT(*) FROM offer_targets").fetchone()[0] == 1, got
    finally:
        dev.loop_stop()
        ctl.stop()


def _driven_rollout(tmp_path, online: dict[str, bool]):
    """Devices (name -> online) on 1.0.0 with a baseline and a rollout to 1.1.0 (50% canary, 10 s window), driven
    with explicit clock values and no broker: (store, t0, the offers made, the bundle, tick(now[, rollout id]))."""
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), float(int(time.time()))
    for d, up in online.items():
        store.upsert_state(FLEET, {"device": d, "online": up, "model": {"name": "m", "version": "1.0.0"}})
        put(store, report(d, t0 - 5, "1.0.0"))
    recorder = OfferRecorder()
    driver = RolloutDriver(store, recorder)
    bundle = tmp_path / "bundle-1.1.0"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"version": "1.1.0"}')
    first = create_rollout(store, bundle, FLEET, min_requests=1, canary_pct=50, window_s=10.0)

    def tick(now: float, rid: int = first):
        driver.tick(now)
        return next(r for r in load_rollouts(store) if r.id == rid)
    return store, t0, recorder, bundle, tick


def test_a_device_offline_through_a_rollout_neither_blocks_it_nor_is_left_out(tmp_path):
    """d2 is offline when the canaries are picked and never comes back: it is still offered the bundle with the
    rest (the retained offer waits for it), and the rollout ends once the others answered and the result
    wait (an hour, or four windows) is over, instead of staying active and blocking every new rollout."""
    from fleet.rollout import RESULT_WAIT_MIN_S

    store, t0, recorder, _, tick = _driven_rollout(tmp_path, {"d0": True, "d1": True, "d2": False})

    def commit(r, d, ts):
        store.add_ota_status(FLEET, d, {"update_id": r.data["offers"][d], "ts": ts, "state": "reporting",
                                        "result": "committed"})
    r = tick(t0)
    assert r.data["canaries"] == ["d0"] and r.data["rest"] == ["d1"]
    commit(r, "d0", t0 + 1)
    tick(t0 + 1)
    for i in range(3):
        put(store, report("d0", t0 + 3 + i, "1.1.0"))
    assert tick(t0 + 12).phase == "rest"
    r = tick(t0 + 13)
    assert r.phase == "rest_wait" and r.data["rest"] == ["d1", "d2"] and "1 offline" in r.data["report"][-1]
    assert [d for d, _ in recorder.offers] == ["d0", "d1", "d2"]
    commit(r, "d1", t0 + 20)
    assert tick(t0 + 30).phase == "rest_wait"  # d2 may still come
    r = tick(t0 + 13 + RESULT_WAIT_MIN_S + 1)
    assert r.phase == "done" and "no result from ['d2']" in r.data["report"][-1]
    store.close()


def test_a_rollout_whose_rest_failed_says_why_once_per_reason(tmp_path):
    """The bundle changed on the controller after the canary took it: every other device failed with "cannot be
    served", and the rollout ended "rollout finished: 0/2 of the rest committed; {'d1': 'failed', ...}" with no word
    of why. The reasons are summed up, one line per reason with its count (update ids and chunk numbers aside)."""
    store, t0, recorder, _, tick = _driven_rollout(tmp_path, {"d0": True, "d1": True, "d2": False})
    r = tick(t0)
    assert r.data["canaries"] == ["d0"]
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "state": "reporting",
                                       "result": "committed"})
    tick(t0 + 1)
    for i in range(3):
        put(store, report("d0", t0 + 3 + i, "1.1.0"))
    assert tick(t0 + 12).phase == "rest"
    r = tick(t0 + 13)
    assert r.phase == "rest_wait" and r.data["rest"] == ["d1", "d2"]
    for i, d in enumerate(("d1", "d2")):
        u = r.data["offers"][d]
        store.add_ota_status(FLEET, d, {"update_id": u, "ts": t0 + 14, "state": "reporting", "result": "failed",
                                        "reason": f"chunk {i + 3} of model.onnx: the controller cannot serve it: update "
                                                  f"{u} cannot be served: the bundle directory: its manifest.json is "
                                                  f"not the one offered"})
    r = tick(t0 + 15)
    assert r.phase == "done", r.data["report"]
    assert "rollout finished: 0/2 of the rest committed; {'d1': 'failed', 'd2': 'failed'}; why not: 2 x chunk N of " \
        "model.onnx: the controller cannot serve it: update U cannot be served: the bundle directory: its " \
        "manifest.json is not the one offered" in r.data["report"][-1], r.data["report"][-1]
    store.close()


def test_a_canary_that_never_answers_halts_the_rollout_after_the_result_wait(tmp_path):
    from fleet.rollout import RESULT_WAIT_MIN_S
    from fleet.store import Store

    store, t0 = Store(tmp_path / "fleet.db"), float(int(time.time()))
    for d in ("d0", "d1"):
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.0.0"}})
        put(store, report(d, t0 - 5, "1.0.0"))
    driver = RolloutDriver(store, OfferRecorder())
    rid = create_rollout(store, tmp_path / "bundle-1.1.0", FLEET, min_requests=1, canary_pct=50, window_s=10.0)
    driver.tick(t0)
    driver.tick(t0 + 600)
    assert next(r for r in load_rollouts(store) if r.id == rid).phase == "canary_wait"
    driver.tick(t0 + RESULT_WAIT_MIN_S + 1)
    r = next(r for r in load_rollouts(store) if r.id == rid)
    assert r.phase in ("halting", "halted") and "no result from ['d0']" in " ".join(r.data["report"])
    store.close()


def test_devices_removed_during_a_rollout_are_neither_offered_nor_waited_for(tmp_path):
    """`fleet device remove` clears a device's retained offer: the rest step offered it again (from the device list
    taken when the canaries were picked, with the chunk server answering it again), and a removed canary was
    waited for an hour, then halted the rollout and got a signed rollback."""
    store, t0, recorder, bundle, tick = _driven_rollout(tmp_path, {d: True for d in ("d0", "d1", "d2", "d3")})
    r = tick(t0)
    assert r.data["canaries"] == ["d0", "d1"] and r.data["rest"] == ["d2", "d3"]
    store.remove_device(FLEET, "d1")  # a canary, before its result
    store.remove_device(FLEET, "d3")  # one of the rest
    store.add_ota_status(FLEET, "d0", {"update_id": r.data["offers"]["d0"], "ts": t0 + 1, "result": "committed"})
    r = tick(t0 + 1)
    assert r.phase == "canary_window" and r.data["canaries"] == ["d0"], r.data["report"]
    assert "canaries ['d1'] were removed from the registry" in " ".join(r.data["report"])
    for i in range(3):
        put(store, report("d0", t0 + 3 + i, "1.1.0"))
    assert tick(t0 + 12).phase == "rest"
    r = tick(t0 + 13)
    assert r.data["rest"] == ["d2"] and [d for d, _ in recorder.offers] == ["d0", "d1", "d2"]
    store.add_ota_status(FLEET, "d2", {"update_id": r.data["offers"]["d2"], "ts": t0 + 14, "result": "committed"})
    assert tick(t0 + 15).phase == "done"
    # every canary removed: the rollout halts at once, and no rollback goes to a removed device
    for d in ("d0", "d2"):  # on the new version now
        store.upsert_state(FLEET, {"device": d, "online": True, "model": {"name": "m", "version": "1.1.0"}})
    second = create_rollout(store, bundle, FLEET, min_requests=1, canary_pct=50, window_s=10.0)
    store.upsert_state(FLEET, {"device": "d4", "online": True, "model": {"name": "m", "version": "1.0.0"}})
    put(store, report("d4", t0 + 20, "1.0.0"))
    r = tick(t0 + 21, second)
    assert r.data["canaries"] == ["d4"]
    store.remove_device(FLEET, "d4")
    tick(t0 + 22, second)
    r = tick(t0 + 23, second)
    assert r.phase == "halted" and "every canary was removed from the registry (['d4'])" in " ".join(r.data["report"])
    store.close()


def test_an_idle_canary_is_told_apart_from_a_silent_one(tmp_path):
    """A canary that reported on the new version but served no request halted the rollout with "no telemetry on
    the new version", which sent the operator looking for a broken agent instead of missing traffic."""
    store, t0, tick = _gate(tmp_path)
    for i in range(2):
        put(store, report("d0", t0 + 3 + i, "1.1.0", count=0))
    assert tick(t0 + 12).phase == "canary_window"
    r = tick(t0 + 22)
    assert r.phase == "halting", r.data["report"]
    assert "d0: no requests served on the new version in the window (2 telemetry report(s), all idle)" \
        in r.data["report"][-1]


def test_a_device_whose_state_the_broker_dropped_is_registered_when_it_reports(make_mosquitto, tmp_path):
    """10,000 devices connecting at once (a broker restart) or a controller restarting on their retained states:
    the broker drops what is beyond its queue for the controller (max_queued_messages), and those devices never
    appeared in the registry (no rollout picked them) though their telemetry was stored. A device that reports
    but is not registered now has its retained state asked for again."""
    from agent.topics import state_topic

    # the queue a burst overflows, made small; and the controller's window of unacknowledged messages (beyond
    # which the broker queues) at Mosquitto's own default, 20: its default of 1000 takes a burst of 120 at once
    broker = make_mosquitto(options=("max_queued_messages 2",))
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    devices = [f"burst-{i:03d}" for i in range(120)]
    try:
        for d in devices:
            pub.publish(state_topic(FLEET, d), device_state(d).model_dump_json(), qos=1,
                        retain=True).wait_for_publish(10)
        ctl = FleetController(ControllerSettings(broker_port=broker.port, db=tmp_path / "fleet.db", fleet=FLEET,
                                                 receive_maximum=20))
        ctl.start()
        try:
            time.sleep(2.0)  # the retained states the broker could hand over are in
            registered = {d["device"] for d in ctl.store.devices(FLEET)}
            assert len(registered) < len(devices), "the broker dropped nothing: the test shows nothing"
            for d in devices:
                now = time.time()
                pub.publish(telemetry_topic(FLEET, d), TelemetryReport(
                    device=d, window_start=now - 10, window_end=now, count=0).model_dump_json(), qos=0)
                time.sleep(0.02)  # (devices report spread over their interval)
            until(lambda: len(ctl.store.devices(FLEET)) == len(devices), timeout=30)
        finally:
            ctl.stop()
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_a_state_the_controller_refuses_is_asked_for_again_three_times_at_most(mosquitto, tmp_path, monkeypatch):
    """A newer agent's state (a field this controller does not know) or none retained: asked for again every
    minute for as long as the device reported, each time delivered and refused again (10,000 subscriptions and
    warnings a minute with version skew across a fleet)."""
    import fleet.controller as fc
    from agent.topics import state_topic

    monkeypatch.setattr(fc, "STATE_ASK_AGAIN_S", 0.2)
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    newer = json.loads(device_state("newer").model_dump_json()) | {"field_of_a_newer_agent": 1}
    pub.publish(state_topic(FLEET, "newer"), json.dumps(newer), qos=1, retain=True).wait_for_publish(10)
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET))
    ctl.start()
    asked, dropped = [], []
    subscribe, unsubscribe = ctl.client.subscribe, ctl.client.unsubscribe
    monkeypatch.setattr(ctl.client, "subscribe", lambda topic, *a, **k: (asked.append(topic), subscribe(topic, *a, **k))[1])
    monkeypatch.setattr(ctl.client, "unsubscribe", lambda topic, *a, **k: (dropped.append(topic),
                                                                           unsubscribe(topic, *a, **k))[1])
    try:
        for _ in range(15):
            now = time.time()
            for d in ("newer", "silent"):
                pub.publish(telemetry_topic(FLEET, d), TelemetryReport(
                    device=d, window_start=now - 1, window_end=now, count=0).model_dump_json()).wait_for_publish(10)
            time.sleep(0.3)
        until(lambda: asked.count(state_topic(FLEET, "newer")) == 3 and asked.count(state_topic(FLEET, "silent")) == 3)
        # one report of a third device, sent after all the others: once it is asked for, the controller has
        # handled every report before it (one publisher, one subscriber: the broker keeps their order)
        now = time.time()
        pub.publish(telemetry_topic(FLEET, "marker"), TelemetryReport(
            device="marker", window_start=now - 1, window_end=now, count=0).model_dump_json()).wait_for_publish(10)
        until(lambda: state_topic(FLEET, "marker") in asked)
        asked.remove(state_topic(FLEET, "marker"))
        assert sorted(asked) == sorted([state_topic(FLEET, "newer")] * 3 + [state_topic(FLEET, "silent")] * 3), asked
        assert ctl.store.devices(FLEET) == []
        # every one-device subscription is gone: each refused state ended its own, and the device with no retained
        # state has its last one dropped once it reports again a minute (here 0.2 s) after the last ask
        now = time.time()
        pub.publish(telemetry_topic(FLEET, "silent"), TelemetryReport(
            device="silent", window_start=now - 1, window_end=now, count=0).model_dump_json()).wait_for_publish(10)
        until(lambda: dropped.count(state_topic(FLEET, "silent")) == 1)
        assert sorted(dropped) == sorted([state_topic(FLEET, "newer")] * 3 + [state_topic(FLEET, "silent")]), dropped
    finally:
        ctl.stop()
        pub.publish(state_topic(FLEET, "newer"), b"", qos=1, retain=True).wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()
