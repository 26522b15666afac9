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

import json
import sqlite3
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt import MqttSession, MqttSettings
from agent.telemetry import LatencyWindow
from agent.topics import ReportedState, telemetry_topic
from fleet.controller import ControllerSettings, FleetController
from waiting import until

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


class Witness:
    """A plain paho subscriber to the device's telemetry: the request counts of the reports it saw."""

    def __init__(self, port: int):
        self.counts: list[int] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="witness", protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.counts.append(json.loads(m.payload)["count"])
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(telemetry_topic(FLEET, DEVICE), 1)
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
        for answers in (3, 1, 4):
            device.report(answers)
        again = FleetController(settings(mosquitto, tmp_path, telemetry_qos=qos)).start()
        if qos == 0:  # the session ended with the connection: nothing was kept for it
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


def test_reports_flushed_before_the_controller_reconnects_after_a_broker_restart_are_stored(mosquitto, tmp_path):
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
        witness = Witness(mosquitto.port)  # sees the last report reach the broker (the one held came before it)
        device.report(3)  # flushed and sent before the controller is back
        until(lambda: witness.counts == [3])
        witness.close()
        assert not ctl.client.is_connected()  # (else this test would not show what it is about)
        until(lambda: len(stored(tmp_path / "fleet.db")) == 3, timeout=30)
        got = stored(tmp_path / "fleet.db")
        assert sorted(n for n, _ in got.values()) == [1, 2, 3] and all(h for _, h in got.values())
    finally:
        device.close()
        ctl.stop()
