"""Telemetry that never reached the controller is counted, not silently missing.

Within one run of an agent its reporting windows follow each other without gaps (agent.telemetry): each starts
where the one before ended. The controller compares each report with the device's last one, in the order they
come, and where both come from the same run of the agent (the run id its state names) and there is time between
them, stores that gap with the report: `fleet status` says "telemetry MISSING for N s in K gap(s)", `--json` has
`missing_gaps` / `missing_s` per device, /metrics `edgeglm_fleet_telemetry_missing_seconds`. Before, reports the
broker never delivered (a broker that forgot the controller's session, its queue overflowing, QoS 0 while the
controller was away) left a hole in a device's latency that looked like an idle box. An agent's restart is no
gap; a window held back at a model switch (sent after the one that follows it) closes the gap it left.
Real Mosquitto, the agent's own MQTT session and telemetry window, the controller's store read back.
"""

from __future__ import annotations

import secrets
import sqlite3
import time

import pytest

from agent.mqtt import MqttSession, MqttSettings
from agent.telemetry import LatencyWindow
from agent.topics import ReportedState, telemetry_topic
from fleet import controller
from fleet.controller import ControllerSettings, FleetController, format_status, prometheus_metrics
from fleet.store import Store, telemetry_row, with_gap
from waiting import until
from witness import Witness, clear_presence

FLEET = "gaps"
DEVICE = "box-1"
LABEL = ("1.0.0", "onnxruntime:cpu")


class Agent:
    """One run of an agent, connected to the broker: its MQTT session (its state names a run id, as the agent's
    daemon does), its latency window; `report(n)` records n answers and sends the window. `windows` holds every (start, end) sent."""

    def __init__(self, port: int, slow_start_s: float = 0.0, ahead_s: float = 0.0):
        """`slow_start_s`: the run began that long before its first window (an agent before 2026-11-29 probed the
        hardware in between); `ahead_s`: the box's clock is that far ahead."""
        self.run, self.started, self.ahead_s = secrets.token_hex(8), time.monotonic(), ahead_s
        time.sleep(slow_start_s)
        self.window = LatencyWindow(label=LABEL)
        self.session = MqttSession(
            MqttSettings(enabled=True, port=port, reconnect_min_delay_s=0.1, reconnect_max_delay_s=0.3), fleet=FLEET,
            device=DEVICE, state_fn=lambda: ReportedState(
                device=DEVICE, online=True, agent_version="test", hardware={"run": self.run},
                uptime_s=time.monotonic() - self.started, ts=time.time() + self.ahead_s))
        self.session.start()
        self.windows: list[tuple[float, float]] = []
        until(lambda: self.session.connected)

    def report(self, answers: int = 1, send: bool = True) -> None:
        """Records `answers` and takes the window; sends it unless `send` is False (lost on the way)."""
        time.sleep(0.05)  # (windows of some length: the gaps are their seconds)
        for i in range(answers):
            self.window.record(0.05 + 0.001 * i, [0.02] * 4, 5, 0.08)
        for r in self.window.take(DEVICE, now=time.time() + self.ahead_s):
            if send:
                self.session.publish_telemetry(r)
            self.windows.append((r.window_start, r.window_end))

    def past_first_window(self) -> None:
        """Waits until a window that starts now is not taken for the run's first (RUN_START_SLACK_S)."""
        time.sleep(max(0.0, self.started + controller.RUN_START_SLACK_S - time.monotonic()))

    def close(self) -> None:
        self.session.close()


@pytest.fixture(autouse=True)
def short_first_window(monkeypatch):
    """A run's first window is told within 1 s of its start here (5 s in the product: the tests wait past it)."""
    monkeypatch.setattr(controller, "RUN_START_SLACK_S", 1.0)


def settings(mosquitto, tmp_path, **kw) -> ControllerSettings:
    return ControllerSettings(broker_port=mosquitto.port, db=tmp_path / "fleet.db", fleet=FLEET, **kw)


@pytest.fixture
def start_controller(mosquitto, tmp_path):
    """Start a controller on the test's broker and database (`start_controller(**settings)`); each one started is
    stopped after the test (a second stop does nothing)."""
    started: list[FleetController] = []

    def start(**kw) -> FleetController:
        started.append(FleetController(settings(mosquitto, tmp_path, **kw)).start())
        return started[-1]
    yield start
    for ctl in started:
        ctl.stop()


@pytest.fixture
def reporting(mosquitto, tmp_path, start_controller):
    """A controller and an agent that has seen its presence, the agent's first report stored: (controller, agent).
    The agent is closed after the test."""
    ctl = start_controller()
    agent = Agent(mosquitto.port)
    try:
        until(lambda: agent.session.controller_said)
        agent.report()
        until(lambda: len(stored_ends(tmp_path / "fleet.db")) == 1)
        yield ctl, agent
    finally:
        agent.close()


def stored_ends(db) -> set[float]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT window_end FROM telemetry WHERE device = ?", (DEVICE,))}


def losses(db) -> dict:
    store = Store(db)
    try:
        return store.telemetry_losses(FLEET, 0).get((FLEET, DEVICE), {"missing_gaps": 0, "missing_s": 0.0})
    finally:
        store.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_reports_lost_while_the_controller_was_away_show_as_missing_time(mosquitto, tmp_path, qos,
                                                                         start_controller):
    """At `telemetry_qos = 0` the broker queues nothing for a controller away (the same as a broker that forgot
    its session): the windows sent meanwhile are missing, and said to be, with their seconds. At QoS 1 they come
    when it is back, and nothing is missing."""
    db = tmp_path / "fleet.db"
    first = start_controller(telemetry_qos=qos)
    agent = Agent(mosquitto.port)
    try:
        agent.report()
        until(lambda: len(stored_ends(db)) == 1)
        first.stop()
        until(lambda: "Client edgeglm-controller disconnected" in mosquitto.log_text())
        # a controller from before the presence topic (cleared here): the agent sends while it is away
        until(lambda: agent.session.controller_away)
        clear_presence(mosquitto.port, FLEET)
        until(lambda: not agent.session.controller_away)
        witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))
        agent.past_first_window()
        for _ in range(3):
            agent.report()
        until(lambda: len(witness.field("window_end")) == 3)  # at the broker
        witness.close()
        start_controller(telemetry_qos=qos)
        agent.report()
        until(lambda: agent.windows[-1][1] in stored_ends(db))
        if qos == 1:
            until(lambda: len(stored_ends(db)) == 5)
            assert losses(db)["missing_gaps"] == 0
            assert "MISSING" not in format_status(Store(db, read_only=True), FLEET)
            return
        assert len(stored_ends(db)) == 2  # the first and the last
        lost = agent.windows[1:4]  # what the controller never got: from the first's end to the last's start
        got = losses(db)
        assert got["missing_gaps"] == 1
        assert got["missing_s"] == pytest.approx(lost[-1][1] - lost[0][0], abs=1e-6)
        assert agent.windows[-1][0] - agent.windows[0][1] == pytest.approx(got["missing_s"], abs=1e-6)
        store = Store(db, read_only=True)
        text = format_status(store, FLEET)
        assert f"device {FLEET}/{DEVICE} telemetry MISSING for {got['missing_s']:.0f} s in 1 gap(s)" in text
        metrics = prometheus_metrics(store, True)
        assert f'edgeglm_fleet_telemetry_missing_seconds{{fleet="{FLEET}",device="{DEVICE}"}} ' \
               f'{got["missing_s"]:.3f}' in metrics
        store.close()
    finally:
        agent.close()


def test_telemetry_is_held_while_the_controller_is_away_and_sent_when_it_is_back(mosquitto, tmp_path,
                                                                                  start_controller):
    """A stopping controller says it is offline (retained, on its presence topic): the agent holds its telemetry
    (up to mqtt.telemetry_buffer reports) instead of publishing into a broker session that may not be kept (here
    telemetry_qos = 0, of which the broker queues nothing: as a broker that forgot the session), and sends it once
    the next controller says it is online, after its subscriptions are in place: nothing lost, nothing missing."""
    db = tmp_path / "fleet.db"
    first = start_controller(telemetry_qos=0)
    agent = Agent(mosquitto.port)
    try:
        until(lambda: agent.session.controller_said)
        agent.report()
        until(lambda: len(stored_ends(db)) == 1)
        first.stop()
        until(lambda: agent.session.controller_away)
        agent.past_first_window()
        for _ in range(3):
            agent.report()
        assert agent.session.held_reports == 3
        start_controller(telemetry_qos=0)
        until(lambda: len(stored_ends(db)) == 4)
        assert agent.session.held_reports == 0 and not agent.session.controller_away
        agent.report()
        until(lambda: len(stored_ends(db)) == 5)
        assert losses(db)["missing_gaps"] == 0
        assert stored_ends(db) == {end for _, end in agent.windows}
    finally:
        agent.close()


def test_after_a_broker_restart_without_persistence_telemetry_waits_for_the_controller(mosquitto, tmp_path,
                                                                                       reporting):
    """A broker restarted without persistence forgot the controller's session and its retained presence: what
    agents publish before the controller has subscribed again is lost (agents reconnect within a second or two,
    the controller backs off up to 30 s). An agent that saw the controller's presence holds its telemetry after a
    reconnect until the controller says again that it is online (PRESENCE_WAIT_S at most)."""
    db, (ctl, agent) = tmp_path / "fleet.db", reporting
    connects = agent.session.stats.connects
    ctl.client.loop_stop()  # the controller is not back before the agent (paho reconnects it once restarted)
    mosquitto.stop()
    (mosquitto.workdir / "mosquitto.db").unlink(missing_ok=True)  # no persistence: sessions, retained gone
    mosquitto.start()
    until(lambda: agent.session.stats.connects > connects and agent.session.connected)
    agent.past_first_window()
    agent.report()
    assert agent.session.held_reports == 1 and agent.session.controller_away
    ctl.client.loop_start()
    until(lambda: len(stored_ends(db)) == 2)
    assert losses(db)["missing_gaps"] == 0 and agent.session.held_reports == 0


def test_a_report_the_broker_never_acknowledged_waits_for_the_controller_too(mosquitto, tmp_path, reporting):
    """A report handed to a broker that never acknowledged it (it hung, then restarted without persistence): paho
    sent it again by itself at the next CONNACK, before the agent knew where the controller was, to a broker the
    controller had not subscribed to yet: lost (helper-165). It goes back to the agent's buffer when the
    connection ends, and is sent with the held ones once the controller is back."""
    import signal

    db, (ctl, agent) = tmp_path / "fleet.db", reporting
    connects = agent.session.stats.connects
    ctl.client.loop_stop()  # (back after the agent: paho reconnects it once restarted)
    mosquitto._proc.send_signal(signal.SIGSTOP)  # hung: it takes the report, acknowledges nothing
    agent.past_first_window()
    agent.report()
    mosquitto._proc.send_signal(signal.SIGKILL)
    mosquitto._proc.wait()
    mosquitto._proc = None
    (mosquitto.workdir / "mosquitto.db").unlink(missing_ok=True)  # restarted without persistence
    mosquitto.start()
    until(lambda: agent.session.stats.connects > connects and agent.session.connected)
    assert agent.session.held_reports == 1 and agent.session.controller_away
    agent.report()
    ctl.client.loop_start()
    until(lambda: len(stored_ends(db)) == 3)
    assert stored_ends(db) == {end for _, end in agent.windows}
    assert losses(db)["missing_gaps"] == 0 and agent.session.held_reports == 0


def test_after_a_reconnect_telemetry_waits_for_the_presence_a_bounded_time(mosquitto, tmp_path, monkeypatch):
    """A presence that never comes again after a reconnect (a controller downgraded to one from before it, a
    presence cleared by hand, a controller gone for good) holds the agent's reports PRESENCE_WAIT_S at most
    (1 s here), then they go as they would without one."""
    import agent.mqtt

    monkeypatch.setattr(agent.mqtt, "PRESENCE_WAIT_S", 1.0)
    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    box = Agent(mosquitto.port)
    try:
        until(lambda: box.session.controller_said)
        connects = box.session.stats.connects
        ctl.client.loop_stop()  # gone, without its Will (the broker restarts below and forgets everything)
        mosquitto.stop()
        (mosquitto.workdir / "mosquitto.db").unlink(missing_ok=True)
        mosquitto.start()
        witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))
        until(lambda: box.session.stats.connects > connects and box.session.connected)
        box.report()
        until(lambda: not box.session.controller_away)
        assert box.session.held_reports in (0, 1)  # (held, unless the wait ended before it was taken)
        box.report()
        until(lambda: len(witness.field("window_end")) == 2)
        assert witness.field("window_end") == [end for _, end in box.windows]
        witness.close()
    finally:
        box.close()
        ctl.client.loop_start()
        ctl.stop()


def test_an_agent_restart_is_no_missing_telemetry(mosquitto, tmp_path):
    """Between two runs of the agent no window was open: time passes, nothing is missing. Both while the
    controller runs (even where the new run's first window never came: counted from the old run's end, the gap
    would be the time the agent was down), and across a controller restart during which the agent restarted (its
    new state is queued for the controller ahead of its reports)."""
    db = tmp_path / "fleet.db"
    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    agent = Agent(mosquitto.port)
    try:
        agent.report()
        agent.report()
        until(lambda: len(stored_ends(db)) == 2)
        agent.close()
        time.sleep(0.3)
        agent = Agent(mosquitto.port)  # a new run, later
        agent.past_first_window()
        agent.window.take(DEVICE)  # its first window: never sent
        agent.report()
        agent.report()
        until(lambda: len(stored_ends(db)) == 4)
        assert losses(db)["missing_gaps"] == 0
        ctl.stop()
        until(lambda: "Client edgeglm-controller disconnected" in mosquitto.log_text())
        agent.close()
        # restarted while the controller was away, its first window a while after its start (as an agent
        # that probed the hardware in between): the gap was counted from the old run's last report, downtime and all
        agent = Agent(mosquitto.port, slow_start_s=2 * controller.RUN_START_SLACK_S)
        until(lambda: agent.session.controller_away)  # (its reports queued at the broker: as with a controller
        clear_presence(mosquitto.port, FLEET)  # from before the presence topic; with one they wait at the agent)
        until(lambda: not agent.session.controller_away)
        witness = Witness(mosquitto.port, telemetry_topic(FLEET, DEVICE))
        agent.report()
        until(lambda: len(witness.field("window_end")) == 1)
        witness.close()
        ctl = FleetController(settings(mosquitto, tmp_path)).start()
        agent.report()
        until(lambda: len(stored_ends(db)) == 6)
        assert losses(db)["missing_gaps"] == 0
    finally:
        agent.close()
        ctl.stop()


def test_a_window_held_back_at_a_model_switch_closes_the_gap_it_left(mosquitto, tmp_path):
    """A request still running on the old model at a switch holds that model's window back (agent.telemetry):
    the new model's window is sent first, and looks like a gap until the held one comes. Once stored, it is not
    missing; a window lost after it still is."""
    db = tmp_path / "fleet.db"
    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    agent = Agent(mosquitto.port)
    try:
        agent.report()
        until(lambda: len(stored_ends(db)) == 1)
        agent.past_first_window()
        with agent.window.serving(LABEL) as w:
            agent.window.record(0.05, [0.02] * 4, 5, 0.08, label=LABEL, window=w)
            agent.window.switch(("2.0.0", "onnxruntime:cpu"))
            agent.report()  # the new model's window; the old one waits for the request
            until(lambda: len(stored_ends(db)) == 2)
            held = losses(db)
            assert held["missing_gaps"] == 1  # until the held window comes
        agent.report()  # the held window, then the next
        until(lambda: len(stored_ends(db)) == 4)
        assert losses(db)["missing_gaps"] == 0
        assert agent.windows[1][0] > agent.windows[2][0]  # (it did come after the later one)
    finally:
        agent.close()
        ctl.stop()


def test_a_late_window_closes_what_it_covers_of_a_gap(tmp_path):
    """The store's side: a window that comes after a later one takes its time off the gap it falls in (whole, at
    either end); one stored twice takes nothing twice."""
    store = Store(tmp_path / "fleet.db")

    def row(start: float, end: float, gap=None, late: bool = False) -> tuple:
        r = {"device": DEVICE, "window_start": start, "window_end": end, "count": 1}
        return with_gap(telemetry_row(FLEET, r), gap, late_start=start if late else None)

    def missing() -> float:
        return store.telemetry_losses(FLEET, 0).get((FLEET, DEVICE), {}).get("missing_s", 0.0)

    store.add_telemetry_many([row(0, 10), row(40, 50, gap=(10, 40))])
    assert missing() == 30
    store.add_telemetry_many([row(10, 20, late=True)])  # the gap's start
    assert missing() == 20
    store.add_telemetry_many([row(30, 40, late=True)])  # its end
    assert missing() == 10
    store.add_telemetry_many([row(30, 40, late=True)])  # the same again: a second copy
    assert missing() == 10 and store.counter("telemetry_duplicates") == 1
    store.add_telemetry_many([row(20, 30, late=True)])  # the rest
    assert missing() == 0 and store.telemetry_losses(FLEET, 0) == {}
    store.close()


def test_a_new_run_whose_clock_is_behind_the_old_runs_last_window_is_compared_with_itself(mosquitto, tmp_path):
    """A box that booted with its clock an hour ahead reported windows ending an hour ahead; NTP set it back,
    the agent restarted: every window of the new run ends before the old run's last one. They were all taken for
    windows held back at a model switch, and a window lost in the new run was never counted."""
    db = tmp_path / "fleet.db"
    ctl = FleetController(settings(mosquitto, tmp_path)).start()
    agent = Agent(mosquitto.port, ahead_s=3600)
    try:
        agent.report()
        agent.report()
        until(lambda: len(stored_ends(db)) == 2)
        agent.close()
        agent = Agent(mosquitto.port)  # set right, restarted
        agent.past_first_window()
        agent.report()
        agent.report(send=False)
        agent.report()
        until(lambda: len(stored_ends(db)) == 4)
        got = losses(db)
        lost = agent.windows[1]
        assert got["missing_gaps"] == 1 and got["missing_s"] == pytest.approx(lost[1] - lost[0], abs=1e-6)
    finally:
        agent.close()
        ctl.stop()


def test_missing_time_counts_within_the_range(tmp_path):
    """A gap of five hours (a broker that lost the controller's session for that long) is at most the hour
    `fleet status` and /metrics read, not five."""
    now = time.time()
    store = Store(tmp_path / "fleet.db", clock=lambda: now)
    row = with_gap(telemetry_row(FLEET, {"device": DEVICE, "window_start": now - 30, "window_end": now,
                                         "count": 1}), (now - 5 * 3600 - 30, now - 30))
    store.add_telemetry_many([row])
    assert store.telemetry_losses(FLEET, now - 3600)[(FLEET, DEVICE)]["missing_s"] == pytest.approx(3600)
    assert store.telemetry_losses(FLEET, now - 86400)[(FLEET, DEVICE)]["missing_s"] == pytest.approx(5 * 3600)
    store.close()


def test_the_run_of_a_device_removed_from_the_registry_is_still_known(tmp_path):
    """A device removed (`fleet device remove`) while its agent runs: after a controller restart its run was
    unknown (its registry row was gone) until its next state, which a running agent sends only when something
    changes, so no gap of it was counted meanwhile."""
    store = Store(tmp_path / "fleet.db")
    store.upsert_state(FLEET, {"device": DEVICE, "online": True, "agent_version": "test", "hardware": {"run": "r1"},
                               "uptime_s": 10.0, "ts": 1000.0})
    assert store.device_run(FLEET, DEVICE) == ("r1", 990.0)
    store.remove_device(FLEET, DEVICE)
    assert store.device_run(FLEET, DEVICE) == ("r1", 990.0)
    assert store.device_run(FLEET, "never-seen") is None
    store.close()
