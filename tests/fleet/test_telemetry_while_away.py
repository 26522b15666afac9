"""Telemetry devices send while the controller is away is stored when it is back.

`fleet serve` keeps a persistent broker session (`[mqtt] session_expiry_s`) and subscribes to telemetry and
latency histograms at QoS 1 (`[mqtt] telemetry_qos`): the broker queues what devices send while the
controller restarts, or while it is still reconnecting after a broker restart (a broker with persistence keeps
the session; agents reconnect in a second or two, the controller backs off up to 30 s), and delivers it when
the controller is back. Before, it subscribed at QoS 0 with a session that ended with its connection: those
reports were lost, and nothing counted them. Real Mosquitto (with persistence, as the K3s broker), the agent's
own MQTT session and telemetry window, the controller's store read back.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import MqttSession, MqttSettings
from agent.telemetry import LatencyWindow
from agent.topics import ReportedState, TelemetryReport, state_topic, telemetry_topic
from fleet.controller import ControllerSettings, FleetController
from waiting import until
from witness import Witness, clear_presence

FLEET = "away"
DEVICE = "box-1"


class Device:
    """An agent's MQTT session and latency window: `serve(n)` records n answers, `report()` sends the window."""

    def __init__(self, port: int):
        self.window = LatencyWindow(label=("1.0.0", "onnxruntime:cpu"))
        self.session = MqttSession(MqttSettings(enabled=True, port=port, reconnect_min_delay_s=0.1,
                                                reconnect_max_delay_s=0.3), fleet=FLEET, device=DEVICE,
                                   state_fn=lambda: ReportedState(device=DEVICE, online=True, agent_version="test",
                                                                    uptime_s=1.0, ts=time.time()))
        self.session.start()
        self.sent: list[float] = []  # window_end of every busy report sent

    def report(self, answers: int) -> None:
        for i in range(answers):
            self.window.record(0.05 + 0.001 * i, [0.02] * 4, 5, 0.08)
        for r in self.window.take(DEVICE):
            self.session.publish_telemetry(r)
            if r.count:
                self.sent.append(r.window_end)

    def close(self) -> None:
        self.session.close()


def stored(db) -> dict[float, tuple[int, bool]]:
    """window_end -> (request count, has histograms) of the device's stored reports."""
    with sqlite3.connect(db) as con:
        counts = dict(con.execute("SELECT window_end, count FROM telemetry WHERE device = ?", (DEVICE,)))
        with_histograms = {r[0] for r in con.execute("SELECT window_end FROM latency WHERE device = ?", (DEVICE,))}
    return {end: (n, end in with_histograms) for end, n in counts.items()}


def settings(mosquitto, tmp_path, **kw) -> ControllerSettings:
    return ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET, **kw)


@pytest.mark.parametrize("qos", [1, 0])
def test_reports_sent_while_the_controller_restarts_are_stored_when_it_is_back(mosquitto, tmp_path, qos):
    db = tmp_path / "fleet.db"
    first = FleetController(settings(mosquitto, tmp_path, telemetry_qos=qos)).start()
    device = Device(mosquitto.port)
    again = None
    try:
        until(lambda: device.session.connected)
        device.report(2)
        until(lambda: len(stored(db)) == 1)
        first.stop()  # the controller's pod is replaced: three windows of traffic meanwhile
        # (once the broker has seen it go: a message on its way to the closing connection stays in the session)
        until(lambda: "Client edgeglm-controller disconnected" in mosquitto.log_text())
        # an agent from before the controller's presence (cleared here) publishes while the controller is away
        # (a current one holds its reports: tests/fleet/test_telemetry_gaps.py): the broker's queue keeps them
        until(lambda: device.session.controller_away)
        clear_presence(mosquitto.port, FLEET)
        until(lambda: not device.session.controller_away)
        witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))
        for answers in (3, 1, 4):
            device.report(answers)
        until(lambda: witness.field("count") == [3, 1, 4])  # at the broker (the agent publishes in the background)
        witness.close()
        again = FleetController(settings(mosquitto, tmp_path, telemetry_qos=qos)).start()
        if qos == 0:  # the broker queues no QoS 0 message for a session away
            device.report(5)
            until(lambda: len(stored(db)) == 2)
            assert sorted(n for n, _ in stored(db).values()) == [2, 5]
            return
        until(lambda: len(stored(db)) == 4)
        got = stored(db)
        assert sorted(got) == sorted(device.sent) and sorted(n for n, _ in got.values()) == [1, 2, 3, 4]
        assert all(h for _, h in got.values())  # each window's histograms came with it
    finally:
        device.close()
        first.stop()
        if again is not None:
            again.stop()


@pytest.mark.parametrize("presence", [True, False])
def test_reports_flushed_before_the_controller_reconnects_after_a_broker_restart_are_stored(mosquitto, tmp_path,
                                                                                             presence):
    """`presence`: the agent holds its reports until the controller says it is back (its Will said offline when
    the broker went down); else (an agent from before the controller's presence, cleared here) it sends them, and
    the broker queues them in the controller's persistent session."""
    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    device = Device(mosquitto.port)
    try:
        until(lambda: device.session.connected)
        device.report(1)
        until(lambda: len(stored(tmp_path / "fleet.db")) == 1)
        # the controller's backoff outlasts the agent's (paho's doubles up to 30 s; the agent's is a second or
        # two): here made certain, the broker's restart takes the controller 3 s to notice
        ctl.client.reconnect_delay_set(3, 3)
        mosquitto.stop()
        device.report(2)  # held by the agent while the broker is away
        mosquitto.start()
        until(lambda: device.session.connected)
        if presence:
            device.report(3)
            assert device.session.controller_away and device.session.held_reports == 2
            assert not ctl.client.is_connected()  # (else this test would not show what it is about)
        else:
            clear_presence(mosquitto.port, FLEET)
            until(lambda: not device.session.controller_away)
            witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))  # sees the last report reach the broker (the one held came before it)
            device.report(3)  # flushed and sent before the controller is back
            until(lambda: witness.field("count") == [3])
            witness.close()
            assert not ctl.client.is_connected()  # (else this test would not show what it is about)
        until(lambda: len(stored(tmp_path / "fleet.db")) == 3, timeout=30)
        got = stored(tmp_path / "fleet.db")
        assert sorted(n for n, _ in got.values()) == [1, 2, 3] and all(h for _, h in got.values())
    finally:
        device.close()
        ctl.stop()


def test_reports_a_controller_had_not_stored_when_it_was_killed_come_again(mosquitto, tmp_path):
    """A report is acknowledged to the broker once it is stored: here the database is locked by another process
    (a slow disk, a long `fleet` command) while reports come, and `fleet serve` is killed (the OOM killer, a node
    lost) with them in its writer's queue. The next controller gets them again. (Acknowledged on receipt, as paho
    does by itself, they were gone: the broker had handed them over.)"""
    db = tmp_path / "fleet.db"
    config = serve_config(tmp_path, mosquitto)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(config)],
                             stdout=log, stderr=subprocess.STDOUT)
    device = Device(mosquitto.port)
    again = lock = None
    try:
        until(lambda: "fleet controller" in (tmp_path / "serve.log").read_text())
        until(lambda: device.session.connected)
        device.report(1)
        until(lambda: len(stored(db)) == 1)
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # the writer waits for it (busy timeout) holding what it took
        witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))
        for answers in (2, 3, 4, 5):
            device.report(answers)
        until(lambda: witness.field("count") == [2, 3, 4, 5])  # at the broker, and on to the controller at once (its
        witness.close()  # window is 1000 unacknowledged messages)
        time.sleep(0.5)
        serve.kill()
        serve.wait()
        lock.rollback()
        lock.close()
        lock = None
        again = FleetController(settings(mosquitto, tmp_path)).start()
        until(lambda: len(stored(db)) == 5)
        assert sorted(n for n, _ in stored(db).values()) == [1, 2, 3, 4, 5]
    finally:
        if lock is not None:
            lock.close()
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()
        device.close()
        if again is not None:
            again.stop()


def serve_config(tmp_path, mosquitto, fleet: str = FLEET) -> Path:
    (tmp_path / "fleet.toml").write_text(f"""
[fleet]
id = "{fleet}"
[database]
path = "{tmp_path / 'fleet.db'}"
[http]
port = 0
[mqtt]
port = {mosquitto.port}
client_id = "edgeglm-controller"
""")
    return tmp_path / "fleet.toml"


def test_a_state_subscription_a_killed_controller_left_in_its_session_goes(mosquitto, tmp_path):
    """A device that reports but is not registered has its state topic subscribed alone until its state comes.
    A controller killed before then left that subscription in the session the broker keeps, and every later
    controller got each state of the device twice, for good. Now a state that comes through it (MQTT 5 says so:
    a subscription identifier) unsubscribes it."""
    config = serve_config(tmp_path, mosquitto)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet", "serve", "--config", str(config)],
                             stdout=log, stderr=subprocess.STDOUT)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="ghost", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    again = None
    try:
        until(lambda: "fleet controller" in (tmp_path / "serve.log").read_text())
        now = time.time()
        pub.publish(telemetry_topic(FLEET, "ghost"), TelemetryReport(
            device="ghost", window_start=now - 30, window_end=now, count=0).model_dump_json(), qos=1)
        until(lambda: "ghost reports but is not registered" in (tmp_path / "serve.log").read_text())
        time.sleep(0.3)  # (the SUBSCRIBE went out with that line)
        serve.kill()
        serve.wait()
        again = FleetController(settings(mosquitto, tmp_path))
        delivered = []
        handle = again.client.on_message
        again.client.on_message = lambda c, u, m: (delivered.append(m.topic), handle(c, u, m))
        again.start()
        state = ReportedState(device="ghost", online=True, agent_version="test", uptime_s=1.0, ts=time.time())
        for _ in range(2):  # not retained: each comes once per subscription that matches it
            delivered.clear()
            pub.publish(state_topic(FLEET, "ghost"), state.model_dump_json(), qos=1).wait_for_publish(10)
            witness_topic = telemetry_topic(FLEET, "ghost")  # a message after it, on another topic: in order
            pub.publish(witness_topic, TelemetryReport(device="ghost", window_start=now, window_end=time.time(),
                                                       count=0).model_dump_json(), qos=1).wait_for_publish(10)
            until(lambda: witness_topic in delivered)
            first = delivered.count(state_topic(FLEET, "ghost"))
        assert first == 1  # the second state came once: the kept subscription is gone
    finally:
        pub.loop_stop()
        pub.disconnect()
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        log.close()
        if again is not None:
            again.stop()


@pytest.mark.parametrize("before, now", [(FLEET, "two"), ("+", "two"), ("two", "+")])
def test_a_controller_given_another_fleet_under_the_same_client_id_leaves_the_old_one(mosquitto, tmp_path, before,
                                                                                      now):
    """The broker keeps a session's subscriptions: `fleet serve --fleet two` under the client id that served another
    fleet (set in fleet.toml, or the K3s broker's username) still got that fleet's devices, and registered them;
    one that served every fleet ("+") before or after one fleet got each message twice (every chunk request served
    twice), for good. Each message is handled once now, and only the fleet served."""
    first = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "first.db", fleet=before,
                                               client_id="ctl"))
    first.start()
    first.stop()
    ctl = FleetController(ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=now,
                                             client_id="ctl"))
    handled = []
    handle = ctl._handle
    ctl._handle = lambda msg: (handled.append(msg.topic), handle(msg))  # (counts what is handled)
    ctl.start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="devices", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        for round_ in range(2):  # the first round may come through what the broker kept; the second may not
            handled.clear()
            for fleet, device in ((FLEET, "old-box"), ("two", "new-box"), ("two", "marker")):  # in this order
                pub.publish(state_topic(fleet, device), ReportedState(
                    device=device, online=True, agent_version="test", uptime_s=1.0, ts=time.time()
                ).model_dump_json(), qos=1).wait_for_publish(10)
            # (the broker sends each message's copies before it takes the next message: a second copy of the
            # first two would come before the marker)
            until(lambda: state_topic("two", "marker") in handled)
            if round_ == 1:
                expected = [state_topic(f, d) for f, d in ((FLEET, "old-box"), ("two", "new-box"), ("two", "marker"))
                            if now == "+" or f == now]
                assert handled == expected
        registered = sorted(d["device"] for d in ctl.store.devices())
        assert registered == (["marker", "new-box", "old-box"] if now == "+" else ["marker", "new-box"])
    finally:
        pub.loop_stop()
        pub.disconnect()
        ctl.stop()


def test_telemetry_qos_is_taken_from_the_environment(monkeypatch):
    from fleet.config import load_fleet_config

    monkeypatch.setenv("EDGEGLM_MQTT__TELEMETRY_QOS", "0")
    assert load_fleet_config(None, {}).mqtt.telemetry_qos == 0
    monkeypatch.setenv("EDGEGLM_MQTT__TELEMETRY_QOS", "2")
    with pytest.raises(Exception, match="telemetry_qos"):
        load_fleet_config(None, {})


def test_a_database_that_refuses_writes_is_one_line_a_minute_not_a_traceback_a_batch(mosquitto, tmp_path, caplog):
    """A full volume (SQLite's own limit on the database's pages here: the same "database or disk is full") lost
    each telemetry batch with a traceback, one a second at a busy fleet. Now one error line per
    STORE_FAILURE_LOG_S names the database, the reason, the free space and what to do, and counts the reports
    lost since the line before."""
    import logging

    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    device = Device(mosquitto.port)
    try:
        until(lambda: device.session.connected and not device.session.controller_away)
        device.report(1)
        until(lambda: len(stored(tmp_path / "fleet.db")) == 1)
        pages = ctl.store.db.execute("PRAGMA page_count").fetchone()[0]
        ctl.store.db.execute(f"PRAGMA max_page_count = {pages}")  # (this connection: the writer's)
        with caplog.at_level(logging.ERROR, logger="edgeglm.fleet"):
            sent = 0
            while "refuses writes" not in caplog.text:  # until the pages left are used up
                assert sent < 5000, "the database never refused a write"
                device.report(1 + sent % 7)
                sent += 1
                time.sleep(0.01)
            for answers in range(1, 30):  # more batches
                device.report(answers)
                time.sleep(0.05)
            until(lambda: device.session.stats.connects and not device.session.held_reports)
        lines = [r for r in caplog.records if "refuses writes" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None, caplog.text
        assert "database or disk is full" in lines[0].getMessage() and "MB free there" in lines[0].getMessage()
        assert str(tmp_path / "fleet.db") in lines[0].getMessage()
    finally:
        device.close()
        ctl.stop()
