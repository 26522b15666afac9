"""Inference over MQTT (`infer/request` -> the requester's response topic) as a careful operator meets it:
hostile or mistaken requests, a retained request, a request in flight at shutdown, chat requests read as
the HTTP API reads them. A real agent (in this process, so that its shutdown can be driven) serving the
signed int8 bundle, a real Mosquitto, a plain paho MQTT 5 client as the requester.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import urllib.request

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import load_config
from agent.daemon import Agent
from agent.topics import (desired_topic, infer_request_topic, infer_response_topic, ota_status_topic,
                          state_topic)
from waiting import StepGate, until

FLEET, DEVICE = "plant-3", "box-9"
REPLIES = "test/replies"
WAIT = 120.0  # generous: a wait that times out is a failure, never a measurement


class Requester:
    """A paho MQTT 5 client that sends inference requests and records everything under edgeglm/ and test/."""

    def __init__(self, port: int):
        self.messages: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="requester", protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("edgeglm/#", 1), ("test/#", 1)])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)

    def ask(self, payload, response_topic: str | None = REPLIES, correlation: bytes | None = None,
            retain: bool = False, expiry_s: int | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation:
            props.CorrelationData = correlation
        raw = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        self.client.publish(infer_request_topic(FLEET, DEVICE), raw, qos=1, retain=retain,
                            properties=props).wait_for_publish(10)

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [json.loads(m.payload) for m in self.messages if m.topic == topic and m.payload]

    def answers(self, request_id: str, topic: str = REPLIES) -> list[dict]:
        return [a for a in self.on(topic) if a.get("id") == request_id]

    def answer(self, request_id: str, topic: str = REPLIES) -> dict:
        until(lambda: self.answers(request_id, topic), timeout=WAIT)
        return self.answers(request_id, topic)[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RunningAgent:
    def __init__(self, broker, signed_bundles, state_dir, **settings):
        self.agent = Agent(load_config(None, {
            "device.id": DEVICE, "device.fleet": FLEET, "model.bundle": str(signed_bundles["v1"]),
            "model.backend": "onnxruntime", "model.slots_dir": str(state_dir), "http.port": 0,
            "ota.trusted_keys": str(signed_bundles["keys"]), "telemetry.interval_s": 3600.0,
            "mqtt.enabled": True, "mqtt.port": broker.port, "mqtt.reconnect_min_delay_s": 0.1,
            "mqtt.reconnect_max_delay_s": 0.5, **settings}))
        self.agent.start()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.agent.session.wait_connected(30)
        self.closed = False

    def shutdown(self, deadline: float = 5.0) -> None:
        if not self.closed:
            self.closed = True
            self.stop.set()
            self.thread.join(30)
            self.agent.shutdown(deadline)


@pytest.fixture
def served(mosquitto, signed_bundles, tmp_path):
    running = RunningAgent(mosquitto, signed_bundles, tmp_path / "state")
    requester = Requester(mosquitto.port)
    yield running, requester
    requester.close()
    running.shutdown()


def warned(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def no_traceback(caplog) -> bool:
    return not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_a_malformed_request_with_an_over_long_id_gets_an_error_answer_not_a_traceback(served, caplog):
    """The error answer's id is limited to 128 characters: an id over that (in the payload, or MQTT 5
    correlation data where the payload is not JSON) raised in the agent's loop, and nothing was answered."""
    running, requester = served
    requester.ask({"id": "x" * 200, "reply_to": REPLIES, "prompt": 1}, response_topic=None)
    requester.ask(b"not json", correlation=b"y" * 300)
    until(lambda: len(requester.answers("unknown")) == 2, timeout=WAIT)
    first, second = requester.answers("unknown")
    assert first["error"]["code"] == "bad_request" and "'id'" in first["error"]["message"]
    assert "at most 128 characters" in first["error"]["message"] and "'prompt'" in first["error"]["message"]
    assert second["error"]["code"] == "bad_request" and "Invalid JSON" in second["error"]["message"]
    assert no_traceback(caplog), [r.getMessage() for r in caplog.records]


def test_the_brokers_own_topics_are_refused_as_response_topics():
    """`$SYS/...`, `$share/...`, `$CONTROL/...` were published (Mosquitto discarded them): never a requester's."""
    from agent.topics import infer_response_problem

    for topic in ("$SYS/x/evil", "$share/g/test/replies", "$CONTROL/dynamic-security/v1"):
        assert "topics beginning with '$' are the broker's" in infer_response_problem(FLEET, DEVICE, topic)
    assert infer_response_problem(FLEET, DEVICE, "test/replies") is None
    assert infer_response_problem(FLEET, DEVICE, infer_response_topic(FLEET, DEVICE, "me")) is None


@pytest.mark.parametrize("where", ["config/desired", "state", "ota/status", "reply_to config/desired"])
def test_an_answer_is_never_published_on_the_devices_own_protocol_topics(served, caplog, where):
    """A response topic is the requester's: one naming the device's own `config/desired` made the device
    read its answer as a desired config and report it as its config error; one naming `state` or
    `ota/status` put an inference answer where the controller reads the device's state."""
    running, requester = served
    topic = {"config/desired": desired_topic(FLEET, DEVICE), "state": state_topic(FLEET, DEVICE),
             "ota/status": ota_status_topic(FLEET, DEVICE)}[where.removeprefix("reply_to ")]
    if where.startswith("reply_to"):
        requester.ask({"id": "abuse", "reply_to": topic, "prompt": "x", "max_tokens": 1}, response_topic=None)
    else:
        requester.ask({"id": "abuse", "prompt": "x", "max_tokens": 1}, response_topic=topic)
    until(lambda: warned(caplog, f"response topic {topic!r} is refused"), timeout=WAIT)
    # a request that names its own topic under the device's infer/response/ is answered there
    mine = infer_response_topic(FLEET, DEVICE, "requester")
    requester.ask({"id": "fine", "prompt": "x", "max_tokens": 1}, response_topic=mine)
    assert requester.answer("fine", mine)["text"] is not None
    assert requester.answers("abuse", topic) == [] and running.agent.last_config_error is None
    assert no_traceback(caplog)


def test_a_retained_request_is_not_answered_again_at_each_reconnect(served, mosquitto, caplog):
    """The broker hands a retained message again at every subscription, i.e. every reconnect of the agent:
    a request published retained by mistake was run and answered once more after each broker restart."""
    running, requester = served
    requester.ask({"id": "kept", "prompt": "x", "max_tokens": 1}, retain=True)
    assert requester.answer("kept")["text"] is not None  # delivered live (not as retained): answered
    connects = running.agent.session.stats.connects
    mosquitto.restart()
    until(lambda: running.agent.session.stats.connects > connects and running.agent.session.connected, timeout=WAIT)
    until(lambda: warned(caplog, "is a retained message"), timeout=WAIT)
    requester2 = Requester(mosquitto.port)  # the first one's connection went with the broker
    try:
        requester2.ask({"id": "after", "prompt": "x", "max_tokens": 1})
        assert requester2.answer("after")["text"] is not None
        assert requester2.answers("kept") == []
        # cleared as the warning says: the empty message is no request to refuse or answer
        requester2.client.publish(infer_request_topic(FLEET, DEVICE), b"", qos=1, retain=True).wait_for_publish(10)
        requester2.ask({"id": "cleared", "prompt": "x", "max_tokens": 1})
        assert requester2.answer("cleared")["text"] is not None
        assert not warned(caplog, "not a valid InferenceRequest") and running.agent.session.stats.payload_errors == 0
    finally:
        requester2.close()
    assert no_traceback(caplog)


def test_a_request_in_flight_at_shutdown_is_answered_before_the_session_closes(served):
    """Shutdown let HTTP requests finish (or cut them, with an answer) but not MQTT ones: the session closed
    at once and a requester waited for an answer that never came."""
    running, requester = served
    requester.ask({"id": "long", "prompt": "def f(", "max_tokens": 4000})
    until(lambda: _in_flight(running.agent.http.port) >= 1, timeout=WAIT)  # it is generating
    running.shutdown(deadline=0.2)
    answer = requester.answer("long")
    assert answer["text"] is not None or (answer["error"]["code"] == "model_unavailable"
                                          and "shutting down" in answer["error"]["message"]), answer


def _in_flight(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith("edgeglm_inference_in_flight ")))


def _http_chat(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_a_chat_request_is_answered_as_the_http_chat_api_answers_it(served):
    """`messages` over MQTT ran on past GLM's end-of-turn tokens (<|user|>, <|observation|>) into the next
    turn, where the HTTP chat API stops: sampled at a high temperature, some answers reach such a token."""
    running, requester = served
    messages = [{"role": "user", "content": "def f("}]
    compared = 0
    for seed in range(60):
        params = {"max_tokens": 48, "temperature": 100.0, "seed": seed}
        http = _http_chat(running.agent.http.port, {"messages": messages, **params})
        if http["choices"][0]["finish_reason"] != "stop":
            continue  # ran to max_tokens: nothing to compare about where it ends
        requester.ask({"id": f"chat-{seed}", "messages": messages, **params})
        answer = requester.answer(f"chat-{seed}")
        assert (answer["text"], answer["finish_reason"], answer["usage"]["completion_tokens"]) == (
            http["choices"][0]["message"]["content"], "stop", http["usage"]["completion_tokens"]), seed
        compared += 1
        if compared == 3:
            break
    assert compared, "no sampled chat answer ended before max_tokens"


def test_a_developer_message_is_read_as_the_http_chat_api_reads_it(served):
    """OpenAI's newer clients send the system prompt as role "developer": the HTTP API reads it as a system
    message, MQTT refused the whole request ("Input should be 'system', 'user' or 'assistant')."""
    running, requester = served
    messages = [{"role": "developer", "content": "Answer in Python."}, {"role": "user", "content": "def f("}]
    http = _http_chat(running.agent.http.port, {"messages": messages, "max_tokens": 12})
    as_system = _http_chat(running.agent.http.port, {"messages": [{**messages[0], "role": "system"}, messages[1]],
                                                     "max_tokens": 12})
    requester.ask({"id": "dev", "messages": messages, "max_tokens": 12})
    answer = requester.answer("dev")
    assert answer["text"] == http["choices"][0]["message"]["content"] == as_system["choices"][0]["message"]["content"]


def test_an_empty_stop_string_is_refused_naming_it(served):
    """`stop: [""]` matched at once: every answer was empty, finish_reason "stop", and no error said why."""
    running, requester = served
    requester.ask({"id": "empty-stop", "prompt": "def f(", "max_tokens": 5, "stop": ["\n", ""]})
    answer = requester.answer("empty-stop")
    assert answer["error"]["code"] == "bad_request" and "'stop'" in answer["error"]["message"], answer


@pytest.mark.parametrize("reply_to", ["test/a\u0001b", "test/a\u007fb", "test/a\u0085b", "test/a\ufffeb"])
def test_a_response_topic_the_broker_would_refuse_does_not_cut_the_agent_off(served, caplog, reply_to):
    """Mosquitto drops a client whose PUBLISH topic holds a control character or a Unicode non-character
    (a malformed packet): one request naming such a `reply_to` cut the device off the broker, and again
    after every reconnect, as paho sent the QoS 1 answer again each time."""
    running, requester = served
    connects = running.agent.session.stats.connects
    requester.ask({"id": "bad-topic", "reply_to": reply_to, "prompt": "x", "max_tokens": 1}, response_topic=None)
    until(lambda: warned(caplog, f"it holds {reply_to[-2]!a}, a control character or Unicode non-character"),
          timeout=WAIT)
    requester.ask({"id": "next", "prompt": "x", "max_tokens": 1})
    assert requester.answer("next")["text"] is not None
    assert running.agent.session.stats.connects == connects and running.agent.session.connected


def test_a_response_topic_of_more_levels_than_the_broker_takes_does_not_cut_the_agent_off(served, caplog):
    """Mosquitto drops a client that publishes to a topic of over 200 levels ("protocol error"): the answer to one
    such request cut the device off, and again after every reconnect (paho sends the QoS 1 answer first)."""
    running, requester = served
    connects = running.agent.session.stats.connects
    requester.ask({"id": "deep-topic", "prompt": "x", "max_tokens": 1}, response_topic="test/" + "a/" * 300 + "b")
    until(lambda: warned(caplog, "levels, more than the 200 the broker takes"), timeout=WAIT)
    requester.ask({"id": "next", "prompt": "x", "max_tokens": 1})
    assert requester.answer("next")["text"] is not None
    assert running.agent.session.stats.connects == connects and running.agent.session.connected


def test_json_nested_past_pythons_limit_neither_kills_the_session_nor_goes_unanswered(served, mosquitto, caplog):
    """`[[[...]]]` 100,000 deep: json.loads raised RecursionError inside paho's callback on a response topic (its
    network thread ended: the session went silently dead), and in the agent's loop for a request (no answer)."""
    from agent.topics import chunk_response_topic

    running, requester = served
    deep = "[" * 100000 + "]" * 100000
    requester.ask(deep, correlation=b"deep-1")
    answer = requester.answer("deep-1")
    assert answer["error"]["code"] == "bad_request", answer
    running.agent.session._response_topics.add(chunk_response_topic(FLEET, DEVICE))  # as after an MQTT download
    running.agent.session.subscribe(chunk_response_topic(FLEET, DEVICE))
    requester.client.publish(chunk_response_topic(FLEET, DEVICE), deep, qos=1).wait_for_publish(10)
    requester.ask({"id": "after", "prompt": "x", "max_tokens": 1})
    assert requester.answer("after")["text"] is not None  # the session still delivers
    assert not [r for r in caplog.records if "RecursionError" in (r.getMessage() + str(r.exc_info))]


def test_requests_that_come_while_the_agent_stops_are_answered_not_lost(served, caplog):
    """Requests arriving during the shutdown's drain were acknowledged to the broker and queued, then lost with
    the process: no answer, and none after the restart either. They get model_unavailable (retryable) now."""
    running, requester = served
    scheduler = running.agent.http._scheduler
    gate = StepGate(scheduler.on_step).arm()  # the long request decodes until the late ones are answered
    scheduler.on_step = gate
    requester.ask({"id": "long", "prompt": "def f(", "max_tokens": 4000})
    until(lambda: _in_flight(running.agent.http.port) >= 1, timeout=WAIT)
    assert gate.held.wait(WAIT)
    running.stop.set()
    running.thread.join(30)
    stopper = threading.Thread(target=running.agent.shutdown, args=(60.0,))
    stopper.start()
    try:
        for n in range(3):
            requester.ask({"id": f"late-{n}", "prompt": "x", "max_tokens": 1})
        answers = [requester.answer(f"late-{n}") for n in range(3)]
    finally:
        gate.release()
        stopper.join(60)
        running.closed = True
    for answer in answers:
        assert answer["error"]["code"] == "model_unavailable" and "shutting down" in answer["error"]["message"], answer


def _generated(running) -> int:
    """Requests generated since the last call (the agent's telemetry window, taken)."""
    return sum(r.count for r in running.agent.window.take(DEVICE))


def test_a_second_copy_of_a_request_is_not_generated_twice(served, caplog):
    """QoS 1 is at-least-once: after a reconnect the broker hands a request again, and a requester that missed
    the answer asks again with the same id. Each copy was generated anew and answered again (twice the work on
    a small box, two different answers to one question with sampling). A copy of a request still running is
    dropped, one of a request answered gets the same answer again; the same id with another payload is a new
    request."""
    caplog.set_level(logging.INFO, logger="edgeglm.agent")
    running, requester = served
    _generated(running)
    request = {"id": "dup", "prompt": "def f(", "max_tokens": 48, "temperature": 1.5}  # no seed: every run differs
    requester.ask(request)
    requester.ask(request)
    first = requester.answer("dup")
    until(lambda: "came again" in caplog.text, timeout=WAIT)
    requester.ask(request)  # asked again after the answer
    # the second copy was dropped (it came while the first ran) or answered again (it came after)
    expected = 2 if "while it is answered" in caplog.text else 3
    until(lambda: len(requester.answers("dup")) == expected, timeout=WAIT)
    answers = requester.answers("dup")
    assert all(a == first for a in answers) and first["text"], answers
    assert _generated(running) == 1
    requester.ask({**request, "max_tokens": 5})  # the same id, another request: generated and answered
    until(lambda: len(requester.answers("dup")) == expected + 1, timeout=WAIT)
    assert requester.answers("dup")[-1]["usage"]["completion_tokens"] <= 5
    assert _generated(running) == 1
    assert no_traceback(caplog)


def test_a_clients_mistakes_are_not_the_models_errors_in_telemetry(served):
    """Over MQTT every error answer counted in telemetry's `errors` (a bad request, a malformed payload), over HTTP
    only 5xx: the rollout gate's error rate depended on the transport, and a client sending garbage to a canary
    could halt a rollout. Both count only what the agent failed now."""
    running, requester = served
    running.agent.window.take(DEVICE)
    requester.ask({"id": "bad-stop", "prompt": "def f(", "max_tokens": 5, "stop": [""]})
    requester.ask(b"not json", correlation=b"garbage")
    requester.ask({"id": "fine", "prompt": "def f(", "max_tokens": 2})
    assert requester.answer("bad-stop")["error"]["code"] == "bad_request"
    assert requester.answer("garbage")["error"]["code"] == "bad_request"
    assert "text" in requester.answer("fine")
    reports = running.agent.window.take(DEVICE)
    assert (sum(r.count for r in reports), sum(r.errors for r in reports)) == (1, 0)


def test_mqtt_ttft_counts_from_the_requests_arrival_as_http_does(served):
    """TTFT over MQTT started after tokenisation, at the submission to the scheduler, and over HTTP at the request's
    arrival: the same wait (a queue, a model being loaded) showed on one transport and not the other. Both count
    from arrival now: a request that sat 2 s in the agent before it was taken has a TTFT of 2 s or more."""
    import time

    from agent.mqtt import Message
    from agent.topics import InferenceRequest

    running, requester = served
    running.agent.window.take(DEVICE)
    payload = json.dumps({"id": "waited", "prompt": "def f(", "max_tokens": 2}).encode()
    arrived = time.perf_counter()
    assert 0 <= Message("t", b"").received - arrived < 1.0  # stamped when the client thread builds it
    message = Message(infer_request_topic(FLEET, DEVICE), payload, 1, False, REPLIES, None, received=arrived - 2.0)
    running.agent._infer(message, InferenceRequest.model_validate_json(payload))
    assert "text" in requester.answer("waited")
    reports = [r for r in running.agent.window.take(DEVICE) if r.count]
    assert len(reports) == 1 and reports[0].ttft_ms.p50 >= 2000.0, reports


def test_an_answer_over_the_brokers_packet_limit_becomes_an_error_answer(signed_bundles, tmp_path, caplog):
    """An answer over the broker's maximum packet size (hosted brokers: 128-256 KB) was logged and dropped: the
    requester heard nothing, as from a lost device, and a retry got the same silence. It gets a small error
    answer naming both sizes; an answer that fits is sent as it is."""
    from broker import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found")
    broker = Mosquitto(tmp_path / "small", options=("max_packet_size 1500",)).start()
    running = requester = None
    try:
        running = RunningAgent(broker, signed_bundles, tmp_path / "state")
        requester = Requester(broker.port)
        tag = b"c" * 600  # MQTT 5 correlation data, echoed with the answer: the whole answer is over 1500 bytes
        requester.ask({"id": "long", "prompt": "def main():", "max_tokens": 1000, "stop": []}, correlation=tag)
        answer = requester.answer("long")
        assert (answer.get("error") or {}).get("code") == "too_large" and "over the broker's maximum packet size of 1500 bytes" \
            in answer["error"]["message"] and "ask for fewer max_tokens" in answer["error"]["message"], \
            (len(json.dumps(answer)), answer)
        requester.ask({"id": "short", "prompt": "def main():", "max_tokens": 4}, correlation=tag)
        assert requester.answer("short").get("text") is not None
        assert running.agent.session.stats.too_large == 0  # nothing was dropped
    finally:
        if requester is not None:
            requester.close()
        if running is not None:
            running.shutdown()
        broker.stop()


def test_a_request_past_its_timeout_stops_generating_and_frees_its_place(served):
    """A requester that went away kept its generation running to max_tokens, holding a place (MQTT shows no
    requester leaving): `timeout_s` stops it and answers `timeout`; a request without it runs to the end."""
    running, requester = served
    requester.ask({"id": "late", "prompt": "def main():", "max_tokens": 1000, "stop": [], "timeout_s": 0.001})
    answer = requester.answer("late")
    assert answer["error"]["code"] == "timeout", answer
    assert "no answer within the request's timeout_s=0.001" in answer["error"]["message"]
    until(lambda: _in_flight(running.agent.http.port) == 0, timeout=WAIT)
    requester.ask({"id": "patient", "prompt": "def main():", "max_tokens": 8, "timeout_s": 600})
    assert requester.answer("patient")["finish_reason"] == "length"


@pytest.fixture
def long_served(mosquitto, signed_bundles, trained_checkpoint, tmp_path, request):
    """An agent serving the trained tiny model with a context window of 65,536 tokens: its answer to a request
    with no stop runs for many seconds (the 4,096 of the shared bundle take 0.85 s here, as long as the shortest
    MQTT expiry, 1 s: a race that either side won)."""
    from bundles import variant
    from models.export import ExportOptions, export_bundle

    checkpoint = shutil.copytree(trained_checkpoint, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 65536}))
    export_bundle(checkpoint, tmp_path / "export", ExportOptions(precision="int8", name="tiny", version="1.0.0"),
                  show_progress=False)
    bundles = {"v1": variant(tmp_path / "export", tmp_path / "v1", signed_bundles["key"]),
               "keys": signed_bundles["keys"]}
    running = RunningAgent(mosquitto, bundles, tmp_path / "state", **getattr(request, "param", {}))
    requester = Requester(mosquitto.port)
    yield running, requester
    requester.close()
    running.shutdown()


def test_an_mqtt5_message_expiry_stops_the_generation_as_timeout_s_does(long_served):
    """MQTT 5's own way to say "useless after N s", the Message Expiry Interval of the request, was not read: a
    request with 1 s of expiry ran to max_tokens. The sooner of it and `timeout_s` applies."""
    running, requester = long_served
    requester.ask({"id": "expiring", "prompt": "def main():", "max_tokens": 100_000, "stop": [], "timeout_s": 600},
                  expiry_s=1)
    answer = requester.answer("expiring")
    assert (answer["error"] or {}).get("code") == "timeout", {**answer, "text": (answer.get("text") or "")[:80]}
    assert "no answer within its MQTT message expiry (1 s left when it arrived)" in answer["error"]["message"]
    until(lambda: _in_flight(running.agent.http.port) == 0, timeout=WAIT)
    requester.ask({"id": "roomy", "prompt": "def main():", "max_tokens": 8, "timeout_s": 600}, expiry_s=600)
    assert requester.answer("roomy")["finish_reason"] == "length"


@pytest.mark.parametrize("long_served", [{"batching.max_batch": 1}], indirect=True)
@pytest.mark.parametrize("limit", ["timeout_s", "expiry"])
def test_a_request_waiting_behind_long_answers_is_answered_timeout_when_its_limit_passes(long_served, limit):
    """One request decodes at a time here and a long answer runs: a request queued behind it with a limit of
    1 s was answered `timeout` only once the long one had ended (seconds later), prefilled first, holding a place
    of http.max_concurrent all along. Its limit now holds while it waits: it is answered when the limit passes,
    with nothing generated, while the long answer still runs."""
    running, requester = long_served
    requester.ask({"id": "long", "prompt": "def main():", "max_tokens": 100_000, "stop": [], "timeout_s": 60})
    until(lambda: _in_flight(running.agent.http.port) == 1, timeout=WAIT)
    if limit == "timeout_s":
        requester.ask({"id": "queued", "prompt": "def f():", "max_tokens": 4, "timeout_s": 1})
    else:
        requester.ask({"id": "queued", "prompt": "def f():", "max_tokens": 4, "timeout_s": 600}, expiry_s=1)
    answer = requester.answer("queued")
    assert (answer.get("error") or {}).get("code") == "timeout", answer
    assert "0 token(s) were generated" in answer["error"]["message"], answer
    assert not requester.answers("long")  # the long answer was still running when it was answered


def _samples(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def test_mqtt_inference_is_on_the_agents_metrics(served):
    """A box that serves only MQTT showed no request on its own /metrics (only the batch gauges moved), and its
    busy or bad_request answers were seen nowhere but the log. Its answers, tokens and latencies are counted
    under endpoint "mqtt", beside the HTTP API's, and the MQTT session's counters are there too."""
    running, requester = served
    port = running.agent.http.port
    requester.ask({"id": "one", "prompt": "def main():", "max_tokens": 6, "stop": []})
    ok = requester.answer("one")
    requester.ask(b"{not json")  # no id: answered on the response topic with id "unknown"
    requester.answer("unknown")
    requester.ask({"id": "late", "prompt": "def main():", "max_tokens": 1000, "stop": [], "timeout_s": 0.001})
    requester.answer("late")
    m = _samples(port)
    assert m['edgeglm_mqtt_inference_answers_total{outcome="ok"}'] == 1
    assert m['edgeglm_mqtt_inference_answers_total{outcome="bad_request"}'] == 1
    assert m['edgeglm_mqtt_inference_answers_total{outcome="timeout"}'] == 1
    assert m['edgeglm_completion_tokens_total{endpoint="mqtt"}'] >= ok["usage"]["completion_tokens"] == 6
    assert m['edgeglm_prompt_tokens_total{endpoint="mqtt"}'] >= ok["usage"]["prompt_tokens"] > 0
    assert m['edgeglm_time_to_first_token_seconds_count{endpoint="mqtt"}'] >= 1
    assert m['edgeglm_inter_token_latency_seconds_count{endpoint="mqtt"}'] >= 5
    assert m['edgeglm_request_duration_seconds_count{endpoint="mqtt"}'] == 2  # generated ones (not the malformed)
    assert m['edgeglm_mqtt_session_events_total{event="connects"}'] == 1
    assert m['edgeglm_mqtt_session_events_total{event="payload_errors"}'] == 1
    assert not any('endpoint="mqtt"' in k and k.startswith("edgeglm_http_") for k in m)
