"""MqttSession against a real Mosquitto (tests/broker.py), with a plain paho client as the controller.

No timing asserts: every wait is for an event, with a generous timeout.
"""

from __future__ import annotations

import contextlib

import json
import logging
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import PayloadError
from agent.mqtt import (Connected, Disconnected, MqttSession, MqttSettings, PayloadRejected, Received, backoff_delay)
from agent.topics import (DesiredConfig, ErrorInfo, InferenceRequest, InferenceResponse, ReportedState,
                          TelemetryReport, chunk_request_topic, chunk_response_topic, desired_topic,
                          infer_request_topic, infer_response_topic, ota_status_topic, state_topic, telemetry_topic)
from ota.transfer import ChunkRequest
from broker import Mqtt311OnlyProxy, make_test_certs

FLEET = "plant-7"
WAIT = 15.0  # generous: a wait that times out is a failure, never a measurement


def fake_state(device: str) -> ReportedState:
    return ReportedState(device=device, online=True, agent_version="0.1.0", hardware={"cores": 2},
                         execution_path="onnxruntime:cpu", uptime_s=1.0, ts=time.time())


def make_session(broker, device="box-1", **settings) -> MqttSession:
    s = MqttSettings(enabled=True, host=broker.host, port=broker.port, reconnect_min_delay_s=0.05,
                     reconnect_max_delay_s=0.5, **settings)
    return MqttSession(s, fleet=FLEET, device=device, state_fn=lambda: fake_state(device), rng=random.Random(0))


_skipped: dict[int, list] = {}  # events next_event passed over, per session, for later calls


def next_event(session: MqttSession, kind, where=lambda e: True, timeout: float = WAIT):
    backlog = _skipped.setdefault(id(session), [])
    for event in backlog:
        if isinstance(event, kind) and where(event):
            backlog.remove(event)
            return event
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = session.get_event(timeout=0.1)
        if isinstance(event, kind) and where(event):
            return event
        if event is not None:
            backlog.append(event)
    raise AssertionError(f"no {kind.__name__} event within {timeout} s")


def wait_until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout} s")


class Controller:
    """A plain paho client playing the fleet controller; keeps what it receives in a queue."""

    def __init__(self, broker, protocol=paho.MQTTv5, client_id="controller", persistent=False):
        self.messages: queue.Queue = queue.Queue()
        self.backlog: list = []
        self.connected = threading.Event()
        self.subacks: queue.Queue = queue.Queue()
        v5 = protocol == paho.MQTTv5
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  clean_session=None if v5 else not persistent)
        self.client.on_connect = self.on_connect
        self.client.on_disconnect = self.on_disconnect
        self.client.on_message = self.on_message
        self.client.on_subscribe = self.on_subscribe
        self.client.reconnect_delay_set(0.05, 0.5)
        properties = None
        if v5 and persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        kw = {"clean_start": not persistent, "properties": properties} if v5 else {}
        self.client.connect(broker.host, broker.port, keepalive=30, **kw)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "controller could not connect"

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.connected.set()

    def on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()

    def on_message(self, client, userdata, msg):
        self.messages.put(msg)

    def on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.put(mid)

    def subscribe(self, *filters: str) -> None:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert self.subacks.get(timeout=WAIT) == mid

    def publish(self, topic, payload, retain=False, properties=None) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(WAIT)

    def expect(self, topic: str, where=lambda data, msg: True, timeout: float = WAIT):
        """The next message on `topic` whose JSON payload satisfies `where`: (data, message)."""
        def matches(msg) -> bool:
            return msg.topic == topic and where(json.loads(msg.payload) if msg.payload else None, msg)

        for msg in self.backlog:  # messages that earlier calls skipped, in arrival order
            if matches(msg):
                self.backlog.remove(msg)
                return json.loads(msg.payload) if msg.payload else None, msg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if matches(msg):
                return json.loads(msg.payload) if msg.payload else None, msg
            self.backlog.append(msg)
        raise AssertionError(f"controller got no matching message on {topic} within {timeout} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class EchoResponder:
    """The agent's loop in miniature: answers InferenceRequests, errors for bad ones, keeps the rest."""

    def __init__(self, session: MqttSession):
        self.session = session
        self.received: list = []
        self.rejected: list[PayloadRejected] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()

    def run(self) -> None:
        while not self._stop.is_set():
            event = self.session.get_event(timeout=0.05)
            if isinstance(event, Received) and isinstance(event.payload, InferenceRequest):
                req = event.payload
                self.session.respond(event.message, InferenceResponse(id=req.id, text=req.prompt.upper()))
            elif isinstance(event, Received):
                self.received.append(event)
            elif isinstance(event, PayloadRejected):
                self.rejected.append(event)
                target = self.session.reply_target(event.message)
                if target is not None and target.id is not None:
                    error = ErrorInfo(code="bad_request", message=event.error.problem)
                    self.session.respond(event.message, InferenceResponse(id=target.id, error=error))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)


@pytest.fixture
def controller(mosquitto):
    c = Controller(mosquitto)
    yield c
    c.close()


# -- retained state, desired config, the Will ---------------------------------------------------


def test_state_is_retained_desired_config_arrives_and_close_publishes_offline(mosquitto, controller):
    state, desired = state_topic(FLEET, "box-1"), desired_topic(FLEET, "box-1")
    controller.publish(desired, DesiredConfig(version=3, settings={"telemetry": {"interval_s": 5}})
                       .model_dump_json(), retain=True)
    controller.subscribe(state)
    session = make_session(mosquitto)
    session.subscribe(desired, DesiredConfig)
    session.start()

    connected = next_event(session, Connected)
    assert connected.protocol == "5"
    got = next_event(session, Received)
    assert isinstance(got.payload, DesiredConfig) and got.payload.version == 3 and got.message.retain
    data, _ = controller.expect(state)
    assert data["online"] is True and data["device"] == "box-1"
    ReportedState.model_validate(data)

    late = Controller(mosquitto, client_id="late")  # subscribes after the fact: gets the retained copy
    late.subscribe(state)
    data, msg = late.expect(state)
    assert msg.retain and data["online"] is True
    late.close()

    session.close()
    controller.expect(state, lambda d, m: d["online"] is False)
    assert next_event(session, Disconnected, lambda e: e.retry_in_s is None)
    later = Controller(mosquitto, client_id="later")
    later.subscribe(state)
    data, msg = later.expect(state)
    assert msg.retain and data["online"] is False
    later.close()


AGENT_SCRIPT = """
import sys, time
from agent.mqtt import MqttSession, MqttSettings
from agent.topics import ReportedState
host, port = sys.argv[1], int(sys.argv[2])
state = lambda: ReportedState(device="doomed", online=True, agent_version="0.1.0", uptime_s=0, ts=time.time())
session = MqttSession(MqttSettings(host=host, port=port, keepalive_s=60), fleet="plant-7", device="doomed",
                      state_fn=state).start()
assert session.wait_connected(15)
print("connected", flush=True)
time.sleep(600)
"""


def test_will_marks_the_device_offline_when_the_agent_process_is_killed(mosquitto, controller):
    topic = state_topic(FLEET, "doomed")
    controller.subscribe(topic)
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, mosquitto.host, str(mosquitto.port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        data, _ = controller.expect(topic, lambda d, m: d["online"] is True)
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker sends the Will
        proc.wait(WAIT)
        data, msg = controller.expect(topic, lambda d, m: d["online"] is False)
        assert data["device"] == "doomed"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# -- request/response --------------------------------------------------------------------------


def test_mqtt5_request_response_uses_response_topic_and_correlation_data(mosquitto, controller):
    session = make_session(mosquitto, protocol="5")
    session.subscribe(infer_request_topic(FLEET, "box-1"), InferenceRequest)
    session.start()
    responder = EchoResponder(session)
    assert session.wait_connected(WAIT)
    reply = infer_response_topic(FLEET, "box-1", "controller")
    controller.subscribe(reply)

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = b"\x00corr-1"
    # a pure MQTT 5 requester: no reply_to in the payload, only the properties
    controller.publish(infer_request_topic(FLEET, "box-1"), InferenceRequest(id="q1", prompt="hello")
                       .model_dump_json(), properties=props)
    data, msg = controller.expect(reply)
    assert InferenceResponse.model_validate(data) == InferenceResponse(id="q1", text="HELLO")
    assert msg.properties.CorrelationData == b"\x00corr-1"
    responder.stop()
    session.close()


def test_mqtt311_request_response_carries_reply_to_and_id_in_the_payload(mosquitto):
    controller = Controller(mosquitto, protocol=paho.MQTTv311)
    session = make_session(mosquitto, protocol="3.1.1")
    session.subscribe(infer_request_topic(FLEET, "box-1"), InferenceRequest)
    session.start()
    assert next_event(session, Connected).protocol == "3.1.1"
    responder = EchoResponder(session)
    reply = infer_response_topic(FLEET, "box-1", "controller")
    controller.subscribe(reply)

    request = InferenceRequest(id="q-311", reply_to=reply, prompt="over 3.1.1")
    controller.publish(infer_request_topic(FLEET, "box-1"), request.model_dump_json())
    data, msg = controller.expect(reply)
    assert data["id"] == "q-311" and data["text"] == "OVER 3.1.1"
    assert not hasattr(msg.properties, "CorrelationData")
    responder.stop()
    session.close()
    controller.close()


@pytest.mark.parametrize("requester_protocol, responder_protocol", [("5", "5"), ("3.1.1", "3.1.1"), ("5", "3.1.1")])
def test_session_request_helper(mosquitto, requester_protocol, responder_protocol):
    responder_session = make_session(mosquitto, "box-1", protocol=responder_protocol)
    responder_session.subscribe(infer_request_topic(FLEET, "box-1"), InferenceRequest)
    responder_session.start()
    responder = EchoResponder(responder_session)
    requester = make_session(mosquitto, "box-2", protocol=requester_protocol).start()
    assert responder_session.wait_connected(WAIT) and requester.wait_connected(WAIT)

    futures = [requester.request(infer_request_topic(FLEET, "box-1"), InferenceRequest(id=f"r{i}", prompt=f"p{i}"),
                                 response_topic=infer_response_topic(FLEET, "box-1", "box-2")) for i in range(3)]
    for i, future in enumerate(futures):
        message = future.result(WAIT)
        assert InferenceResponse.model_validate_json(message.payload) == InferenceResponse(id=f"r{i}", text=f"P{i}")
        if requester_protocol == responder_protocol == "5":
            assert message.correlation_data == f"r{i}".encode()
    assert requester._pending == {}
    responder.stop()
    requester.close()
    responder_session.close()


# -- protocol fallback ---------------------------------------------------------------------------


def test_auto_protocol_falls_back_to_311_when_the_broker_refuses_5(mosquitto, controller):
    proxy = Mqtt311OnlyProxy(mosquitto.host, mosquitto.port)
    controller.subscribe(state_topic(FLEET, "box-1"))
    session = make_session(proxy, protocol="auto").start()
    try:
        assert next_event(session, Connected).protocol == "3.1.1"
        assert proxy.refused_v5 == 1 and session.protocol == "3.1.1"
        data, _ = controller.expect(state_topic(FLEET, "box-1"), lambda d, m: d["online"] is True)
    finally:
        session.close()
        proxy.close()


# -- broker restart: reconnect, state, offline buffers -------------------------------------------


def report(i: int) -> TelemetryReport:
    return TelemetryReport(device="box-1", window_start=float(i), window_end=float(i) + 1, count=i)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_reconnects_republishes_state_and_flushes_buffers_in_order(mosquitto, protocol):
    paho_protocol = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    controller = Controller(mosquitto, protocol=paho_protocol, persistent=True)
    state, telemetry, status = (state_topic(FLEET, "box-1"), telemetry_topic(FLEET, "box-1"),
                                ota_status_topic(FLEET, "box-1"))
    controller.subscribe(state, telemetry, status)
    session = make_session(mosquitto, protocol=protocol, telemetry_buffer=5).start()
    assert next_event(session, Connected).session_present is False
    controller.expect(state, lambda d, m: d["online"] is True)
    session.publish_telemetry(report(0))
    data, _ = controller.expect(telemetry)
    assert data["count"] == 0

    mosquitto.stop()
    assert next_event(session, Disconnected).retry_in_s is not None
    assert not session.connected
    for i in range(1, 8):  # 7 reports into a buffer of 5: reports 1 and 2 are dropped
        session.publish_telemetry(report(i))
    assert session.publish(status, b'{"phase": "idle"}') is None  # held, not lost
    assert session.stats.dropped_reports == 2

    mosquitto.restart()
    assert next_event(session, Connected).session_present is True
    controller.expect(state, lambda d, m: d["online"] is True)  # re-published, not the retained copy
    received = []
    while len(received) < 5:  # QoS 1 may deliver twice, report 0 too (unacked when the broker stopped)
        data, _ = controller.expect(telemetry)
        if data["count"] not in [0] + [r["count"] for r in received]:
            received.append(data)
    assert [r["count"] for r in received] == [3, 4, 5, 6, 7]
    assert [r["dropped_reports"] for r in received] == [2, 0, 0, 0, 0]
    data, _ = controller.expect(status)
    assert data == {"phase": "idle"}
    session.close()
    controller.close()


def test_a_request_given_up_while_offline_is_not_sent_at_reconnect(mosquitto):
    """The OTA download asks for a chunk again every ota.chunk_timeout_s; while the broker is away each request
    used to wait in the offline hold and all of them went out at reconnect. A cancelled one is dropped."""
    controller = Controller(mosquitto, persistent=True)  # its subscription outlives the broker restart
    request_topic = chunk_request_topic(FLEET, "box-1")
    controller.subscribe(request_topic, ota_status_topic(FLEET, "box-1"))
    session = make_session(mosquitto).start()
    assert session.wait_connected(WAIT)
    mosquitto.stop()
    assert next_event(session, Disconnected)

    def ask(i: int):
        return session.request(request_topic, ChunkRequest(id=f"c{i}", update_id="u1", path="model.onnx", index=0,
                                                           chunk_size=262144),
                               response_topic=chunk_response_topic(FLEET, "box-1"))

    for i in range(3):  # three timeouts in a row while offline, as ChunkFetcher.read_chunk does
        ask(i).cancel()
    last = ask(3)
    assert session.publish(ota_status_topic(FLEET, "box-1"), b'{"phase": "downloading"}') is None  # held too
    mosquitto.restart()
    data, _ = controller.expect(request_topic)
    assert data["id"] == "c3"
    assert controller.expect(ota_status_topic(FLEET, "box-1"))[0] == {"phase": "downloading"}  # the rest of the hold
    # nothing else: c0-c2 were dropped from the hold (they were held before c3 and the status, which arrived, and
    # the broker keeps one publisher's order: had they been sent, they would be queued here already)
    with pytest.raises(AssertionError, match="no matching message"):
        controller.expect(request_topic, timeout=0.1)
    assert not last.done()
    session.close()
    controller.close()


def test_close_while_the_broker_is_unreachable_returns(mosquitto):
    session = make_session(mosquitto)
    mosquitto.stop()
    session.start()
    assert next_event(session, Disconnected).retry_in_s is not None
    session.publish_telemetry(report(1))
    session.close()
    assert next_event(session, Disconnected, lambda e: e.retry_in_s is None)
    assert not session._supervisor.is_alive()


def test_username_and_password(make_mosquitto):
    broker = make_mosquitto(users={"box-1": "s3cret"})
    intruder = make_session(broker, username="box-1", password="guess").start()
    refused = next_event(intruder, Disconnected)
    assert "Not authorized" in refused.reason or "Bad user name or password" in refused.reason
    assert refused.retry_in_s is not None and not intruder.connected
    intruder.close()

    session = make_session(broker, username="box-1", password="s3cret").start()
    assert next_event(session, Connected).protocol == "5"
    session.close()


def test_tls_with_the_fleet_ca(make_mosquitto, tmp_path):
    certs = make_test_certs(tmp_path / "pki")
    broker = make_mosquitto(tls=certs)
    session = make_session(broker, tls={"ca_file": certs.ca_file}).start()
    assert next_event(session, Connected).protocol == "5"
    session.close()

    untrusting = make_session(broker, tls={}).start()  # the system CAs do not know the fleet CA
    failed = next_event(untrusting, Disconnected)
    assert "CERTIFICATE_VERIFY_FAILED" in failed.reason and failed.retry_in_s is not None
    assert "check mqtt.tls.ca_file (the CA that signed the broker's certificate)" in failed.reason  # names no setting
    untrusting.close()


# -- bad payloads --------------------------------------------------------------------------------


def test_bad_payloads_are_counted_reported_and_the_consumer_carries_on(mosquitto, controller):
    desired, infer = desired_topic(FLEET, "box-1"), infer_request_topic(FLEET, "box-1")
    reply = infer_response_topic(FLEET, "box-1", "controller")
    session = make_session(mosquitto)
    session.subscribe(desired, DesiredConfig, max_bytes=4096)
    session.subscribe(infer, InferenceRequest)
    session.start()
    responder = EchoResponder(session)
    assert session.wait_connected(WAIT)
    controller.subscribe(reply)

    controller.publish(desired, b"not json")
    controller.publish(desired, b'{"v": 1, "version": "three"}')
    controller.publish(desired, b'{"v": 1, "version": 1, "settings": {"pad": "' + b"x" * 5000 + b'"}}')
    controller.publish(infer, json.dumps({"id": "bad-1", "reply_to": reply}).encode())  # neither prompt nor messages
    controller.publish(infer, b'{"id": 5, "prompt": [1]}')
    controller.publish(desired, DesiredConfig(version=4).model_dump_json())
    controller.publish(infer, InferenceRequest(id="good-1", reply_to=reply, prompt="ok").model_dump_json())

    data, _ = controller.expect(reply, lambda d, m: d["id"] == "bad-1")
    assert data["error"]["code"] == "bad_request" and "exactly one of prompt and messages" in data["error"]["message"]
    data, _ = controller.expect(reply, lambda d, m: d["id"] == "good-1")
    assert data["text"] == "OK"
    wait_until(lambda: len(responder.received) == 1, what="the valid desired config")
    assert responder.received[0].payload == DesiredConfig(version=4)

    problems = [str(r.error) for r in responder.rejected]
    assert len(problems) == 5 and session.stats.payload_errors == 5
    assert all(f"payload on '{desired}' rejected" in p for p in problems[:3])
    assert "Invalid JSON" in problems[0]
    assert "field 'version': Input should be a valid integer" in problems[1]
    assert "more than the 4096-byte limit for DesiredConfig" in problems[2]
    assert f"payload on '{infer}' rejected" in problems[3]
    assert "field 'id'" in problems[4] and session.stats.last_payload_error == problems[4]
    responder.stop()
    session.close()


def test_parse_payload_error_names_topic_and_problem():
    from agent.topics import parse_payload

    with pytest.raises(PayloadError) as err:
        parse_payload(DesiredConfig, b'{"v": 1, "version": -1}', 1024, "edgeglm/v1/f/d/config/desired")
    assert err.value.topic == "edgeglm/v1/f/d/config/desired"
    assert "field 'version': Input should be greater than or equal to 0 (got -1)" in str(err.value)
    assert str(err.value).endswith("(got -1)")  # what happens next is the receiver's to say (an answer, or none)


@pytest.mark.parametrize("raw,field", [
    (b'{"v": 1, "id": "a", "prompt": "x", "seed": ' + b"9" * 4400 + b"}", "'seed'"),
    (b'{"v": 1, "id": "a", "prompt": "say \\"hi\\": \\ud800"}', "'prompt'"),
    (b'{"v": 1, "id": "a",\n "prompt": "x", "stop": ["a", "\\udc00"]}', "'stop[1]'"),
    # the reader's column counts bytes: non-ASCII text before the value named the wrong field ('id'), or none
    ('{"v": 1, "messages": [{"role": "user", "content": "Привет, как дела?"}], "stop": ["\\ud800"], '
     '"id": "r-1"}'.encode(), "'stop[0]'"),
    ('{"v": 1, "messages": [{"role": "user", "content": "你好，今天过得怎么样"}], "stop": ["\\ud800"], '
     '"id": "r-1"}'.encode(), "'stop[0]'"),
])
def test_a_value_the_json_reader_refuses_is_named(raw, field):
    """A 4400-digit seed or a lone surrogate in a string said only "Invalid JSON: ... at line 1 column N": the
    reader stops in the value, before any field is checked."""
    from agent.topics import parse_payload

    with pytest.raises(PayloadError, match="Invalid JSON") as err:
        parse_payload(InferenceRequest, raw, 1 << 20, "edgeglm/v1/f/d/infer/request")
    assert f"not a valid InferenceRequest: field {field}: Invalid JSON: " in str(err.value), str(err.value)


def test_json_that_breaks_between_fields_names_none():
    from agent.topics import parse_payload

    for raw in (b'{"v": 1,', b'{"v" 1}', b'{"v": 1, "id": "a"', b'{"v": 1, "id": "a" x}'):
        with pytest.raises(PayloadError, match="Invalid JSON") as err:
            parse_payload(InferenceRequest, raw, 1 << 20, "t")
        assert "field" not in str(err.value), str(err.value)


@pytest.mark.parametrize("raw,problem", [
    (b'{"version": "7"}', "field 'version': Input should be a valid integer (got '7')"),
    (b'{"version": true}', "field 'version': Input should be a valid integer (got True)"),
    (b'{"version": 7.0}', "field 'version': Input should be a valid integer (got 7.0)"),
    (b'{"v": true, "version": 7, "settings": {}}', "field 'v': Value error, true is not a payload format version"),
])
def test_payload_numbers_must_be_json_numbers_of_the_fields_type(raw, problem):
    """A desired config's version "7" or true was read as 7 or 1 (and true compared as version 1 against the
    applied one); MQTT inference took "max_tokens": "5" that the HTTP API refuses. Wire payloads are read
    strictly; a float field still takes a JSON integer."""
    from agent.topics import InferenceRequest, parse_payload

    with pytest.raises(PayloadError) as err:
        parse_payload(DesiredConfig, raw, 1024, "t")
    assert problem in str(err.value)
    with pytest.raises(PayloadError, match="field 'max_tokens': Input should be a valid integer"):
        parse_payload(InferenceRequest, b'{"id": "a", "prompt": "x", "max_tokens": "5"}', 1024, "t")
    req = parse_payload(InferenceRequest, b'{"id": "a", "prompt": "x", "max_tokens": 5, "temperature": 1}', 1024, "t")
    assert (req.max_tokens, req.temperature) == (5, 1.0)
    assert parse_payload(DesiredConfig, b'{"version": 7, "settings": {"a.b": 1}}', 1024, "t").version == 7


# -- settings and backoff ------------------------------------------------------------------------


def test_settings_validation():
    assert MqttSettings(protocol=5).protocol == "5"
    assert MqttSettings(password="x", username="u").password.get_secret_value() == "x"
    for bad, text in [({"reconnect_min_delay_s": 5, "reconnect_max_delay_s": 1}, "reconnect_max_delay_s (1.0)"),
                      ({"password": "x"}, "mqtt.password is set but mqtt.username is not"),
                      ({"tls": {"cert_file": "c.pem"}}, "tls.cert_file and tls.key_file go together"),
                      ({"protocol": "4"}, "protocol"),
                      ({"hots": "x"}, "hots")]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
            MqttSettings(**bad)
    assert "secret" not in repr(MqttSettings(username="u", password="secret"))


def test_backoff_grows_to_the_cap_with_jitter_in_the_upper_half():
    rng = random.Random(1)
    for attempt in range(12):
        cap = min(8.0, 0.5 * 2 ** attempt)
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


def test_session_socket_has_tcp_nodelay(mosquitto):
    """Small request/response messages must not wait for Nagle (a ~40 ms stall per OTA chunk)."""
    import socket

    session = make_session(mosquitto).start()
    try:
        assert session.wait_connected(10)
        sock = session._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        session.close()


def test_closing_sessions_leaves_no_paho_error_in_the_log(mosquitto, caplog):
    """paho's network thread logs "Client is not connected" (ERROR) when it runs once more after a
    disconnect closed the socket; the session's logger drops exactly that message, so a normal
    close leaves no error in an operator's log, while paho's other messages still come through."""
    from agent.mqtt import PAHO_LOG

    noise = logging.LogRecord(PAHO_LOG.name, logging.ERROR, __file__, 0,
                              "Client is not connected. Socket: None). Last known Connection State: "
                              "MQTT_CS_DISCONNECTED", None, None)
    reset = logging.LogRecord(PAHO_LOG.name, logging.ERROR, __file__, 0, "failed to receive on socket: %s",
                              ("[Errno 104] Connection reset by peer",), None)  # a loss the session reports itself
    other = logging.LogRecord(PAHO_LOG.name, logging.ERROR, __file__, 0, "Caught exception in on_message: x", None,
                              None)
    assert not PAHO_LOG.filter(noise) and not PAHO_LOG.filter(reset) and PAHO_LOG.filter(other)
    with caplog.at_level(logging.DEBUG, logger=PAHO_LOG.name):
        for i in range(3):
            session = make_session(mosquitto, device=f"box-{i}")
            session.start()
            next_event(session, Connected)
            session.close()
    paho_records = [r for r in caplog.records if r.name == PAHO_LOG.name]
    assert any("CONNECT" in r.getMessage() for r in paho_records)  # paho's debug log still arrives
    assert not [r.getMessage() for r in paho_records if r.levelno >= logging.ERROR]


def test_a_connection_taken_over_at_once_backs_off_and_says_why(mosquitto, caplog):
    """Two boxes with one device.id (a cloned image: it defaults to the host name) take each other's session
    over. A connection dropped right after its CONNACK no longer resets the backoff: the pair backs off
    instead of reconnecting several times a second forever, and the log names the cause."""
    settings = MqttSettings(enabled=True, port=mosquitto.port, client_id="box-1", reconnect_min_delay_s=0.2,
                            reconnect_max_delay_s=60.0)
    a = MqttSession(settings, fleet="f", device="box-1", state_fn=lambda: fake_state("box-1")).start()
    b = MqttSession(settings, fleet="f", device="box-1", state_fn=lambda: fake_state("box-1")).start()
    try:
        time.sleep(6)
        total = a.stats.connects + b.stats.connects
    finally:
        a.close()
        b.close()
    assert total <= 16, f"{total} connects in 6 s: the backoff resets after every taken-over connection"
    assert "another client may be taking this session over" in caplog.text and "'box-1'" in caplog.text


def test_idle_reports_of_an_outage_share_one_place_in_the_buffer(mosquitto):
    """An idle box through a long outage filled its telemetry buffer with empty windows, and the reports that
    carried requests were the ones dropped (500 requests lost for 20 idle reports kept). Consecutive idle windows of
    one model now extend one buffered report; the windows still follow each other without a gap."""
    session = make_session(mosquitto, telemetry_buffer=3)  # never started: offline, everything is buffered
    t = 1000.0

    def window(count: int, version: str = "1.0.0") -> TelemetryReport:
        nonlocal t
        t += 30
        return TelemetryReport(device="box-1", window_start=t - 30, window_end=t, count=count, model_version=version)

    session.publish_telemetry(window(5))
    for _ in range(40):
        session.publish_telemetry(window(0))
    session.publish_telemetry(window(7))
    for _ in range(3):
        session.publish_telemetry(window(0, "1.1.0"))
    kept = list(session._outbox)
    # the 40 idle windows were one report, dropped (counted) when the buffer was full, before any with requests
    assert [(r.count, r.model_version) for r in kept] == [(5, "1.0.0"), (7, "1.0.0"), (0, "1.1.0")]
    assert session.stats.dropped_reports == 1
    assert kept[2].window_end - kept[2].window_start == 3 * 30 and kept[2].window_start == kept[1].window_end


def test_a_message_over_the_brokers_packet_limit_is_not_sent_and_the_session_stays_up(tmp_path):
    """A broker closes the connection of a client that sends a packet over its max_packet_size, and paho sends the
    QoS 1 message again after every reconnect: the device was off the broker for good. The session reads the
    limit from the broker's CONNACK and does not send such a message (logged, counted); the next one goes out
    on the same connection."""
    from broker import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    broker = Mosquitto(tmp_path / "small", options=("max_packet_size 4096",)).start()
    try:
        controller = Controller(broker)
        controller.subscribe(telemetry_topic(FLEET, "box-1"))
        session = make_session(broker).start()
        assert session.wait_connected(WAIT)
        assert session.publish(telemetry_topic(FLEET, "box-1"), b"x" * 5000) is None
        assert session.stats.too_large == 1
        session.publish(telemetry_topic(FLEET, "box-1"), b'{"small": 1}')
        data, _ = controller.expect(telemetry_topic(FLEET, "box-1"))
        assert data == {"small": 1}
        assert session.stats.connects == 1 and session.connected
        assert "box-1 disconnected" not in broker.log_text()
        session.close()
        controller.close()
    finally:
        broker.stop()


def test_a_connection_lost_while_going_online_does_not_leave_the_session_online(mosquitto):
    """paho's thread clears the online flag when the connection ends, without the session's lock; a loss while
    the session published its state after the CONNACK was followed by the flag being set, and it stayed set
    through the whole reconnect backoff: publishes went to paho's unbounded queue instead of the bounded
    offline buffers. Here the loss is reported (as paho's thread would) while the state is being published."""
    from paho.mqtt.client import DisconnectFlags
    from paho.mqtt.reasoncodes import ReasonCode

    calls = []

    def state_fn():
        calls.append(1)
        if len(calls) == 2:  # 1: the Will, made before CONNECT; 2: the online state, after the CONNACK
            session._on_disconnect(session._client, None, DisconnectFlags(False),
                                   ReasonCode(PacketTypes.DISCONNECT, identifier=0), None)
        return fake_state("box-1")

    settings = MqttSettings(enabled=True, host=mosquitto.host, port=mosquitto.port, reconnect_min_delay_s=60.0,
                            reconnect_max_delay_s=60.0)
    session = MqttSession(settings, fleet=FLEET, device="box-1", state_fn=state_fn, rng=random.Random(0))
    session.start()
    try:
        next_event(session, Connected)
        next_event(session, Disconnected)  # the supervisor saw the loss: a minute of backoff starts
        assert not session.connected
        assert session.publish(telemetry_topic(FLEET, "box-1"), b"{}") is None  # held for the next connection
    finally:
        session.close(publish_offline=False)


def test_an_address_that_closes_before_connack_is_not_said_to_refuse_a_protocol(caplog):
    """A load balancer whose broker is down accepts TCP and closes: the log said "refused protocol 5; trying
    3.1.1", then "refused protocol 3.1.1; trying 5", and paho added "failed to receive on socket" at ERROR."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []

    def accept_and_close():
        while len(accepted) < 2:
            conn, _ = server.accept()
            conn.recv(1024)  # the CONNECT
            accepted.append(1)
            conn.close()
    threading.Thread(target=accept_and_close, daemon=True).start()
    caplog.set_level(logging.INFO)
    settings = MqttSettings(enabled=True, host="127.0.0.1", port=port, reconnect_min_delay_s=0.05,
                            reconnect_max_delay_s=0.1)
    session = MqttSession(settings, fleet=FLEET, device="box-1", state_fn=lambda: fake_state("box-1"),
                          rng=random.Random(0)).start()
    try:
        wait_until(lambda: len(accepted) == 2, what="two connection attempts")
        wait_until(lambda: "trying 5" in caplog.text, what="the second attempt's log line")
    finally:
        session.close(publish_offline=False)
        server.close()
    assert "refused protocol" not in caplog.text
    assert f"MQTT 127.0.0.1:{port} closed the connection before its CONNACK with protocol 5 (a broker that does " \
           "not speak it, or no broker behind the address yet); trying 3.1.1" in caplog.text
    assert "failed to receive on socket" not in caplog.text


@pytest.fixture
def refusing(tmp_path, caplog):
    """An MQTT 3.1.1 session (which cannot learn the broker's packet limit) on a broker that closes the connection
    over any packet past 2,000 bytes, and a controller subscribed to its telemetry: (session, controller)."""
    from broker import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    broker = Mosquitto(tmp_path / "small", options=("max_packet_size 2000",)).start()
    session = controller = None
    try:
        controller = Controller(broker)
        controller.subscribe(telemetry_topic(FLEET, "box-1"))
        caplog.set_level(logging.INFO, logger="edgeglm.mqtt")
        session = make_session(broker, protocol="3.1.1").start()
        next_event(session, Connected)
        yield session, controller
    finally:
        if controller is not None:
            controller.close()
        if session is not None:
            session.close()
        broker.stop()


def test_a_queued_message_the_broker_keeps_refusing_does_not_keep_the_box_off_for_good(refusing, caplog):
    """An MQTT 3.1.1 broker cannot announce its packet limit: a message over it got the connection closed, paho
    sent it again after every reconnect, and the box was off the broker for good. After a few connections in a
    row that end right after the CONNACK, the session drops the client's queued messages and connects anew."""
    session, controller = refusing
    session.publish(telemetry_topic(FLEET, "box-1"), b"x" * 5000)  # the broker closes the connection over it
    wait_until(lambda: session.stats.client_resets == 1, timeout=60, what="the client replaced")
    next_event(session, Connected, timeout=30)
    session.publish(telemetry_topic(FLEET, "box-1"), b'{"small": 1}')
    data, _ = controller.expect(telemetry_topic(FLEET, "box-1"))
    assert data == {"small": 1}
    assert "the messages queued in the MQTT client (not yet acknowledged by the broker) are dropped" in caplog.text


def test_a_telemetry_report_the_broker_keeps_refusing_is_dropped_and_counted_not_sent_for_good(refusing, caplog):
    """The same for a telemetry report: one the broker had not acknowledged goes back to the agent's buffer at
    the connection's end (`_reclaim_unacknowledged`) and out again under a new message id, so the backstop, which
    follows the same message across connections, never fired and the box reconnected 2.5 times a second for good
    (helper-166). It follows the report now: the client is replaced, the report dropped and counted in the next
    report's dropped_reports."""
    session, controller = refusing
    session.publish_telemetry(TelemetryReport(device="box-1", window_start=0.0, window_end=1.0, count=1,
                                              execution_path="x" * 5000))  # over the broker's limit
    wait_until(lambda: session.stats.client_resets == 1, timeout=60, what="the client replaced")
    assert session.stats.dropped_reports == 1 and session.held_reports == 0
    session.publish_telemetry(TelemetryReport(device="box-1", window_start=1.0, window_end=2.0, count=1))
    data, _ = controller.expect(telemetry_topic(FLEET, "box-1"))
    assert data["window_end"] == 2.0 and data["dropped_reports"] == 1
    assert "the broker took no connection's copy of it" in caplog.text


def test_a_broker_restarting_every_few_seconds_keeps_the_clients_queue(mosquitto, caplog):
    """Connections that end within 10 s of their CONNACK counted toward the backstop above whatever ended them: a
    broker restarting every few seconds (a crash-looping pod) made the session drop its queued messages, answers
    and OTA statuses the broker had not acknowledged yet, at the fifth restart. Only connections that end with the
    same message unacknowledged each time count now."""
    from agent.mqtt import BACKSTOP_SHORT_CONNECTIONS, Delivery

    caplog.set_level(logging.INFO, logger="edgeglm.mqtt")
    session = make_session(mosquitto).start()
    try:
        for i in range(BACKSTOP_SHORT_CONNECTIONS + 2):
            next_event(session, Connected, timeout=30)
            delivery = Delivery()
            session.publish(telemetry_topic(FLEET, "box-1"), json.dumps({"n": i}).encode(), delivery=delivery)
            wait_until(delivery.delivered, what=f"message {i} acknowledged")
            mosquitto.restart()
        next_event(session, Connected, timeout=30)
        assert session.stats.client_resets == 0, caplog.text
        assert "are dropped, and a new client connects" not in caplog.text
        assert "the broker keeps restarting or dropping this client" in caplog.text  # said, among the causes
    finally:
        session.close()


def test_a_delivery_handed_over_as_the_connection_dropped_is_pending_not_an_error():
    """paho raises from `is_published()` for a message handed over while the connection dropped (rc NO_CONN), and
    keeps raising after the resend is acknowledged: the agent's loop, which asks, died with a traceback (an unclean
    stop: a death of the model on probation)."""
    import paho.mqtt.client as paho_client

    from agent.mqtt import Delivery
    delivery = Delivery()
    assert delivery.delivered() is False  # held: no paho handle yet
    delivery.info = paho_client.MQTTMessageInfo(7)
    delivery.info.rc = paho_client.MQTT_ERR_NO_CONN
    with pytest.raises(RuntimeError):
        delivery.info.is_published()  # (what paho does)
    assert delivery.delivered() is False
    delivery.info._set_as_published()  # the resend after the reconnect was acknowledged
    assert delivery.delivered() is True


def test_reports_published_as_the_connection_ends_all_go_back_to_the_buffer():
    """paho closes its socket before it calls on_disconnect: a report published in between is refused by paho
    (not connected: its rc) and kept in its queue, and asking its handle whether it was published raises. The
    reclaim at the connection's end raised there, after taking the reports before it out of paho's queue and
    before putting them back in the buffer: lost (helper-166). Here that window is made by hand."""
    with connected_by_hand() as (session, client, a):
        client._sock = a  # connected, as far as paho knows
        session._online.set()
        session.publish_telemetry(report(1))  # sent; the broker has not acknowledged it
        client._sock = None  # paho's thread closed the socket; on_disconnect has not run yet
        session.publish_telemetry(report(2))  # refused by paho: not connected
        session._reclaim_unacknowledged(client)
        assert [r.count for r in session._outbox] == [1, 2] and session.held_reports == 2
        assert not [m for m in client._out_messages.values() if m.topic.endswith("/telemetry")]


def test_losses_a_reclaimed_report_carried_are_still_told_when_it_is_dropped_too():
    """The first report sent after a loss carries the count (`dropped_reports`); put back into a full buffer by
    the reclaim and dropped again, it took that count with it: 3 reports lost, 1 told (helper-167). Every loss
    is told, in the next report sent."""
    with connected_by_hand(telemetry_buffer=3) as (session, client, a):
        for i in range(1, 6):  # offline: a buffer of 3 drops 2
            session.publish_telemetry(report(i))
        client._sock = a
        session._online.set()
        session.publish_telemetry(report(6))  # the 3 held (the first with dropped_reports = 2), then this one
        client._sock = None
        session._online.clear()
        session._reclaim_unacknowledged(client)  # none acknowledged: 4 back into a buffer of 3
        assert session.stats.dropped_reports == 3 and session.held_reports == 3
        told = sum(r.dropped_reports for r in session._outbox) + session._dropped_unreported
        assert told == 3


def test_a_qos2_report_once_sent_stays_with_paho_at_the_connections_end():
    """At mqtt.qos = 2 a sent report may be half-way through its exchange at the broker (PUBREC pending): sent
    again under another id, the broker kept the first unreleased in the session against its quota, and once ~20
    were there it refused every QoS 2 message while paho counted them delivered (helper-167). paho keeps such a
    message and finishes it under its own id; one never sent is still put back in the buffer."""
    with connected_by_hand(qos=2) as (session, client, a):
        client._sock = a
        session._online.set()
        session.publish_telemetry(report(1))  # sent: PUBREC pending
        sent = [mid for mid, m in client._out_messages.items() if m.topic.endswith("/telemetry")]
        client._sock = None
        session.publish_telemetry(report(2))  # refused by paho (not connected): never sent
        session._reclaim_unacknowledged(client)
        assert [r.count for r in session._outbox] == [2]
        assert [mid for mid, m in client._out_messages.items() if m.topic.endswith("/telemetry")] == sent


@contextlib.contextmanager
def connected_by_hand(**settings):
    """A session whose paho client is "connected" to one end of a socket pair, no broker (what it sends goes
    nowhere, nothing is acknowledged): (session, client). Closing a connection's socket by hand (client._sock =
    None) makes the window in which paho has closed it and on_disconnect has not run yet."""
    import socket

    session = MqttSession(MqttSettings(enabled=True, host="127.0.0.1", port=1, **settings), fleet=FLEET,
                          device="box-1", state_fn=lambda: ReportedState(device="box-1", online=True,
                                                                         agent_version="t", uptime_s=0, ts=time.time()))
    client = session._make_client(paho.MQTTv5)
    session._client, session._client_protocol = client, paho.MQTTv5
    a, b = socket.socketpair()
    try:
        yield session, client, a
    finally:
        a.close()
        b.close()
