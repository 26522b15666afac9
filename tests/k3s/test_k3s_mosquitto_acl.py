"""The broker's ACL, for real: Mosquitto runs the mosquitto.conf and acl.conf of the ConfigMap in
k3s/base/core/broker-config.yaml (acl.conf verbatim; in mosquitto.conf only the listener, the file
paths and the log destination are rewritten for a free loopback port and a temp dir), with a
password file made by `mosquitto_passwd -b`.

How denial shows: a refused PUBLISH gets PUBACK "Not authorized" (0x87, MQTT 5) and reaches no
one. A SUBSCRIBE is never refused by Mosquitto's acl_file (its SUBACK grants the QoS; upstream:
eclipse-mosquitto/mosquitto#2042); "read" is checked message by message at delivery, retained
messages included. So a subscription to another device's topics is tested by what arrives, and
its SUBACK code is only checked to be one of the two Mosquitto can answer.

"Nothing arrived" is never a sleep: after the messages under test, each reader is sent a
sentinel it may read, from a publisher whose earlier PUBACKs have come back, so anything the
broker routed to that reader was queued before the sentinel (QoS 1, in order per client).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from k3s_manifests import find, rendered
from paho.mqtt.enums import CallbackAPIVersion

from agent.topics import (controller_presence_topic, controller_subscriptions, desired_topic, device_subscriptions,
                          ota_offer_topic, state_topic)
from broker import BrokerCerts, find_mosquitto, free_port, make_test_certs, wait_for_port

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

WAIT = 10.0  # a wait that runs out is a failure, never a measurement
NOT_AUTHORIZED = 0x87
REWRITTEN = ("listener", "certfile", "keyfile", "password_file", "acl_file", "persistence_location", "log_dest")


def _site() -> tuple[str, str, str, dict[str, str]]:
    """(fleet id, controller username, operator username, the broker ConfigMap's files) from the rendered
    base: fleet.toml is `fleet serve`'s config, fleet-cli.toml the operator commands' (`kubectl exec`)."""
    resources = rendered("base")
    configs = find(resources, "ConfigMap", "edgeglm-controller-config")["data"]
    fleet, cli = tomllib.loads(configs["fleet.toml"]), tomllib.loads(configs["fleet-cli.toml"])
    files = find(resources, "ConfigMap", "edgeglm-broker-config")["data"]
    return fleet["fleet"]["id"], fleet["mqtt"]["username"], cli["mqtt"]["username"], files


FLEET, CONTROLLER, OPERATOR, BROKER_FILES = _site()
F = f"edgeglm/v1/{FLEET}"


def derive_conf(conf: str, *, port: int, workdir: Path, tls: BrokerCerts | None) -> str:
    """The ConfigMap's mosquitto.conf with paths and listener made local; everything else kept."""
    seen, out = set(), []
    for line in conf.splitlines():
        option = line.split(" ", 1)[0] if line.strip() and not line.lstrip().startswith("#") else None
        if option in REWRITTEN:
            seen.add(option)
        if option == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif option in ("certfile", "keyfile"):
            if tls is not None:
                out.append(f"{option} {tls.cert_file if option == 'certfile' else tls.key_file}")
        elif option == "password_file":
            out.append(f"password_file {workdir / 'passwords'}")
        elif option == "acl_file":
            out.append(f"acl_file {workdir / 'acl.conf'}")
        elif option == "persistence_location":
            out.append(f"persistence_location {workdir}/")
        elif option == "log_dest":
            out.append(f"log_dest file {workdir / 'mosquitto.log'}")
        else:
            out.append(line)
    missing = set(REWRITTEN) - seen
    assert not missing, f"mosquitto.conf in the ConfigMap has no {sorted(missing)}: update this test's REWRITTEN"
    if os.geteuid() == 0:  # as root Mosquitto drops to user "mosquitto", who cannot read the temp dir
        out.append("user root")
    return "\n".join(out) + "\n"


class Broker:
    def __init__(self, workdir: Path, users: dict[str, str], tls: BrokerCerts | None = None):
        binary, passwd = find_mosquitto(), shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if binary is None or not Path(passwd).exists():
            pytest.skip("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.port, self.tls, self.passwd = workdir, free_port(), tls, passwd
        (workdir / "acl.conf").write_text(BROKER_FILES["acl.conf"])
        for i, (user, password) in enumerate(users.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run([passwd, *create, "-b", str(workdir / "passwords"), user, password], check=True,
                           capture_output=True)
        conf = workdir / "mosquitto.conf"
        conf.write_text(derive_conf(BROKER_FILES["mosquitto.conf"], port=self.port, workdir=workdir, tls=tls))
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port("127.0.0.1", self.port, WAIT, alive=lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            pytest.fail(f"mosquitto did not start with the ConfigMap's config: {exc}\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


class Client:
    """A paho MQTT 5 client that records what it receives and the reason code of every ack."""

    def __init__(self, broker: Broker, user: str, password: str, client_id: str | None = None,
                 ca_file: Path | None = None):
        self.user = user
        self.messages: queue.Queue = queue.Queue()
        self._acks: dict[int, object] = {}
        self._cond = threading.Condition()
        self.connack = None
        self.disconnected = threading.Event()
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=paho.MQTTv5)
        self.paho.username_pw_set(user, password)
        if ca_file is not None:
            self.paho.tls_set(ca_certs=str(ca_file))
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()
        self.paho.on_message = lambda c, u, msg: self.messages.put((msg.topic, msg.payload.decode()))
        self.paho.on_publish = lambda c, u, mid, rc, props: self._ack(mid, rc)
        self.paho.on_subscribe = lambda c, u, mid, rcs, props: self._ack(mid, rcs)
        self.paho.connect("127.0.0.1", broker.port)
        self.paho.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, WAIT), f"{user}: no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.connack = reason_code
            self._cond.notify_all()

    def _ack(self, mid, value):
        with self._cond:
            self._acks[mid] = value
            self._cond.notify_all()

    def _wait_ack(self, mid: int, what: str):
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, WAIT), f"{self.user}: no ack for {what}"
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: str, retain: bool = False) -> bool:
        """True if the broker took it (PUBACK < 0x80), False for "Not authorized"."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        rc = self._wait_ack(info.mid, f"PUBLISH {topic}")
        assert rc.value < 0x80 or rc.value == NOT_AUTHORIZED, f"{self.user} PUBLISH {topic}: {rc}"
        return rc.value < 0x80

    def subscribe(self, *topics: str) -> list[int]:
        _, mid = self.paho.subscribe([(t, 1) for t in topics])
        return [rc.value for rc in self._wait_ack(mid, f"SUBSCRIBE {topics}")]

    def received_until(self, sentinel: tuple[str, str]) -> set[tuple[str, str]]:
        """Everything received before `sentinel` (which must arrive)."""
        got = set()
        while True:
            try:
                message = self.messages.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"{self.user}: sentinel {sentinel} did not arrive; got {sorted(got)}") from None
            if message == sentinel:
                return got
            got.add(message)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


PASSWORDS = {"dev1": "pw-dev1", "dev2": "pw-dev2", "dev3": "pw-dev3", CONTROLLER: "pw-controller",
             OPERATOR: "pw-operator"}


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker", PASSWORDS)
    yield b
    b.stop()


@pytest.fixture
def connect(broker):
    clients: list[Client] = []

    def make(user: str, **kw) -> Client:
        clients.append(Client(broker, user, PASSWORDS[user], **kw))
        assert clients[-1].connack.value == 0, f"{user} refused: {clients[-1].connack}\n{broker.log()}"
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def sentinels(dev1: Client, dev2: Client, controller: Client) -> dict[str, tuple[str, str]]:
    """One message each reader may receive, sent after everything before it was acknowledged."""
    out = {"dev1": (f"{F}/dev1/config/desired", "sentinel"), "dev2": (f"{F}/dev2/config/desired", "sentinel"),
           "controller": (f"{F}/dev1/telemetry", "sentinel")}
    assert controller.publish(*out["dev1"]) and controller.publish(*out["dev2"]) and dev1.publish(*out["controller"])
    return out


# (publisher, topic, allowed to publish, who receives it among the three subscribed to '#')
MATRIX = [
    ("dev1", f"{F}/dev1/state", True, {"controller"}),
    ("dev1", f"{F}/dev1/telemetry", True, {"controller"}),
    ("dev1", f"{F}/dev1/health", True, {"controller"}),
    ("dev1", f"{F}/dev1/latency", True, {"controller"}),
    ("dev1", f"{F}/dev1/ota/status", True, {"controller"}),
    ("dev1", f"{F}/dev1/ota/chunk/request", True, {"controller"}),
    ("dev1", f"{F}/dev1/infer/response/{CONTROLLER}", True, {"controller"}),
    ("dev1", f"{F}/dev1/infer/response/another-requester", False, set()),  # a topic per requester: retained junk
    ("dev1", f"{F}/dev2/state", False, set()),
    ("dev1", f"{F}/dev2/telemetry", False, set()),
    ("dev1", f"{F}/dev2/health", False, set()),
    ("dev1", f"{F}/dev2/latency", False, set()),
    ("dev1", f"{F}/dev2/ota/status", False, set()),
    ("dev1", f"{F}/dev2/ota/chunk/request", False, set()),
    ("dev1", f"{F}/dev2/infer/request", False, set()),
    ("dev1", f"{F}/dev1/config/desired", False, set()),  # desired config: written only by the controller
    ("dev1", f"{F}/dev1/ota/offer", False, set()),
    ("dev1", f"{F}/dev1/ota/chunk/response", False, set()),
    ("dev1", f"{F}/dev1/infer/request", False, set()),
    ("dev1", "edgeglm/v1/another-fleet/dev1/state", False, set()),  # its own id, in a fleet of its choosing
    ("dev1", "elsewhere/dev1", False, set()),
    ("dev2", f"{F}/dev2/state", True, {"controller"}),
    ("dev2", f"{F}/dev1/state", False, set()),
    ("controller", f"{F}/dev1/config/desired", True, {"dev1"}),
    ("controller", f"{F}/dev2/config/desired", True, {"dev2"}),
    ("controller", f"{F}/dev1/ota/offer", True, {"dev1"}),
    ("controller", f"{F}/dev1/ota/chunk/response", True, {"dev1"}),
    ("controller", f"{F}/dev2/infer/request", True, {"dev2"}),
    ("controller", f"{F}/dev1/state", False, set()),  # the controller cannot forge a device's state
    ("controller", f"{F}/dev1/telemetry", False, set()),
    ("controller", f"{F}/dev1/health", False, set()),
    ("controller", f"{F}/dev1/latency", False, set()),
    ("controller", "edgeglm/v1/another-fleet/dev1/config/desired", False, set()),
    # the controller's presence: read by every device, written by the controller alone (a device that could
    # say "offline" would have the whole fleet hold its telemetry)
    ("controller", controller_presence_topic(FLEET), True, {"dev1", "dev2", "controller"}),
    ("dev1", controller_presence_topic(FLEET), False, set()),
    ("dev1", controller_presence_topic("+"), False, set()),
    ("controller", controller_presence_topic("another-fleet"), False, set()),
    ("controller", controller_presence_topic("+"), False, set()),  # (read by every device: written by nobody)
]


def test_who_may_publish_and_receive_what(connect):
    clients = {"dev1": connect("dev1"), "dev2": connect("dev2"), "controller": connect(CONTROLLER)}
    for c in clients.values():
        assert c.subscribe("#") == [1]  # granted; the ACL filters at delivery
    expected = {name: set() for name in clients}
    for i, (publisher, topic, allowed, readers) in enumerate(MATRIX):
        payload = f"row-{i}"
        assert clients[publisher].publish(topic, payload) is allowed, \
            f"{publisher} PUBLISH {topic}: expected {'allowed' if allowed else 'Not authorized'}"
        for reader in readers:
            expected[reader].add((topic, payload))
    for reader, sentinel in sentinels(clients["dev1"], clients["dev2"], clients["controller"]).items():
        got = clients[reader].received_until(sentinel)
        assert got == expected[reader], f"{reader} received {sorted(got - expected[reader])} it must not, " \
                                        f"missed {sorted(expected[reader] - got)}"


def test_a_device_gets_nothing_of_another_device(connect):
    dev1, dev2, controller = connect("dev1"), connect("dev2"), connect(CONTROLLER)
    assert controller.publish(f"{F}/dev2/config/desired", "retained-for-dev2", retain=True)
    assert dev2.subscribe(*device_subscriptions(FLEET, "dev2")) == [1] * 4
    dev2_topics = [f"{F}/dev2/{s}" for s in ("state", "telemetry", "health", "latency", "ota/status",
                                             "ota/chunk/request", "config/desired", "ota/offer", "ota/chunk/response",
                                             "infer/request")]
    codes = dev1.subscribe(*dev2_topics, f"{F}/dev2/#", f"edgeglm/v1/+/dev2/#", *controller_subscriptions(FLEET),
                           f"{F}/dev1/config/desired")
    assert set(codes) <= {1, NOT_AUTHORIZED}, codes
    for topic in dev2_topics[:6]:
        assert dev2.publish(topic, f"from dev2: {topic}")
    for topic in dev2_topics[6:]:
        assert controller.publish(topic, f"to dev2: {topic}")
    got = dev1.received_until(sentinels(dev1, dev2, controller)["dev1"])
    assert got == set(), f"dev1 received dev2's messages: {sorted(got)}"
    got = dev2.received_until(sentinels(dev1, dev2, controller)["dev2"])
    assert {t for t, _ in got} == set(dev2_topics[6:]), "dev2 itself received what was sent to it"


def test_the_controller_reads_every_device_state(connect):
    devices = {name: connect(name) for name in ("dev1", "dev2", "dev3")}
    for name, client in devices.items():
        assert client.publish(state_topic(FLEET, name), f"state of {name}", retain=True)
    controller = connect(CONTROLLER)
    assert controller.subscribe(*controller_subscriptions(FLEET)) == [1] * len(controller_subscriptions(FLEET))
    got = controller.received_until(sentinels(devices["dev1"], devices["dev2"], controller)["controller"])
    assert got == {(state_topic(FLEET, n), f"state of {n}") for n in devices}


def test_a_device_cannot_take_over_another_devices_session(connect):
    dev1 = connect("dev1")
    connect("dev2", client_id="dev1")  # use_username_as_clientid: it becomes "dev2"
    controller = connect(CONTROLLER)
    controller.subscribe(state_topic(FLEET, "dev1"))
    assert dev1.publish(state_topic(FLEET, "dev1"), "still here")
    assert not dev1.disconnected.is_set(), "dev1 was disconnected by a client claiming its id"
    assert controller.messages.get(timeout=WAIT) == (state_topic(FLEET, "dev1"), "still here")


# The operator commands' user (fleet-cli.toml): it publishes retained offers and desired configs, and
# empty retained messages that clear them (`fleet device remove`); (topic, allowed) with every reader on '#'.
OPERATOR_MATRIX = [
    (f"{F}/dev1/config/desired", True),
    (f"{F}/dev2/config/desired", True),
    (f"{F}/dev1/ota/offer", True),
    (f"{F}/dev2/ota/offer", True),
    (f"{F}/dev1/state", False),  # it cannot forge a device's reports
    (f"{F}/dev1/telemetry", False),
    (f"{F}/dev1/health", False),
    (f"{F}/dev1/ota/status", False),
    (f"{F}/dev1/ota/chunk/request", False),
    (f"{F}/dev1/infer/response/{CONTROLLER}", False),
    (f"{F}/dev1/ota/chunk/response", False),  # chunks are `fleet serve`'s (edgeglm-controller)
    (f"{F}/dev1/infer/request", False),
    ("edgeglm/v1/another-fleet/dev1/config/desired", False),
    ("edgeglm/v1/another-fleet/dev1/ota/offer", False),
    ("elsewhere/dev1", False),
]


def test_the_operator_may_only_publish_offers_and_desired_configs_and_reads_nothing(connect):
    clients = {"dev1": connect("dev1"), "dev2": connect("dev2"), "controller": connect(CONTROLLER)}
    operator = connect(OPERATOR)
    # retained messages of every kind it could want: a device's state, a desired config, an offer
    assert clients["dev1"].publish(state_topic(FLEET, "dev1"), "retained state", retain=True)
    assert clients["controller"].publish(f"{F}/dev2/config/desired", "retained desired", retain=True)
    assert operator.publish(f"{F}/dev2/ota/offer", "retained offer", retain=True)
    expected = {"dev1": set(), "dev2": {(f"{F}/dev2/config/desired", "retained desired"),
                                        (f"{F}/dev2/ota/offer", "retained offer")},
                "controller": {(state_topic(FLEET, "dev1"), "retained state")}}
    for c in (*clients.values(), operator):
        assert c.subscribe("#") == [1]  # granted; the ACL filters at delivery
    for i, (topic, allowed) in enumerate(OPERATOR_MATRIX):
        payload = f"operator-{i}"
        assert operator.publish(topic, payload, retain=True) is allowed, \
            f"{OPERATOR} PUBLISH {topic}: expected {'allowed' if allowed else 'Not authorized'}"
        if allowed:  # edgeglm/v1/<fleet>/<device>/...: for that device only
            expected[topic.split("/")[3]].add((topic, payload))
    for reader, sentinel in sentinels(clients["dev1"], clients["dev2"], clients["controller"]).items():
        got = clients[reader].received_until(sentinel)
        assert got == expected[reader], f"{reader} received {sorted(got - expected[reader])} it must not, " \
                                        f"missed {sorted(expected[reader] - got)}"
    # The operator has no read line. Its one readable topic is that of a device named like it (the %u
    # patterns apply to every user; no node may be called edgeglm-operator, docs/deploy-k3s.md): the sentinel.
    sentinel = (desired_topic(FLEET, OPERATOR), "sentinel")
    assert clients["controller"].publish(*sentinel)
    got = operator.received_until(sentinel)
    assert got == set(), f"{OPERATOR} received {sorted(got)}"


def test_the_operator_clears_retained_offers_and_desired_configs(broker, connect):
    """`fleet device remove` publishes empty retained messages on the removed device's two topics."""
    operator, controller = connect(OPERATOR), connect(CONTROLLER)
    topics = (desired_topic(FLEET, "dev3"), ota_offer_topic(FLEET, "dev3"))
    for topic in topics:
        assert operator.publish(topic, "for dev3", retain=True)

    def retained_for_dev3() -> set[tuple[str, str]]:
        dev3 = Client(broker, "dev3", PASSWORDS["dev3"])
        try:
            assert dev3.subscribe(*device_subscriptions(FLEET, "dev3")) == [1] * 4
            sentinel = (f"{F}/dev3/ota/chunk/response", "sentinel")
            assert controller.publish(*sentinel)
            return dev3.received_until(sentinel)
        finally:
            dev3.close()

    assert retained_for_dev3() == {(t, "for dev3") for t in topics}
    for topic in topics:
        assert operator.publish(topic, "", retain=True)
    assert retained_for_dev3() == set()


def test_an_operator_command_leaves_the_serving_controller_connected(broker, connect):
    """use_username_as_clientid: the broker replaces a client id by the username, so a connection as the
    controller's user takes over its session. The operator's user does not, whatever client id it sends:
    the CLI's `<client_id>-cli-<pid>`, or even the controller's own."""
    controller = connect(CONTROLLER)
    assert controller.subscribe(*controller_subscriptions(FLEET)) == [1] * len(controller_subscriptions(FLEET))
    dev1 = connect("dev1")
    assert dev1.subscribe(*device_subscriptions(FLEET, "dev1")) == [1] * 4
    sent = set()
    for client_id in (f"{OPERATOR}-cli-4242", CONTROLLER):
        operator = connect(OPERATOR, client_id=client_id)
        assert operator.publish(desired_topic(FLEET, "dev1"), f"as {client_id}", retain=True)
        sent.add((desired_topic(FLEET, "dev1"), f"as {client_id}"))
        operator.close()
    marks = sentinels(dev1, connect("dev2"), controller)
    assert dev1.received_until(marks["dev1"]) == sent
    assert controller.received_until(marks["controller"]) == set()
    assert dev1.publish(state_topic(FLEET, "dev1"), "still served")
    assert controller.messages.get(timeout=WAIT) == (state_topic(FLEET, "dev1"), "still served")
    assert not controller.disconnected.is_set(), f"the controller was disconnected\n{broker.log()}"
    assert "already connected" not in broker.log(), broker.log()


def test_a_second_connection_as_the_controller_takes_its_session_over(connect):
    """Why operator commands must not log in as edgeglm-controller (fleet.toml): the broker makes the
    username the client id, so the serving controller is disconnected (the control for the test above)."""
    controller = connect(CONTROLLER)
    controller.paho.reconnect_delay_set(WAIT, WAIT)  # no reconnect to kick the newcomer off in turn
    connect(CONTROLLER, client_id=f"{CONTROLLER}-cli-4242")
    assert controller.disconnected.wait(WAIT), "a second connection as the controller did not take over"


def test_an_operator_command_as_shipped_publishes_beside_the_serving_controller(broker, connect, tmp_path):
    """`edgeglm fleet config set --config fleet-cli.toml` (the ConfigMap's, password from its
    password_file; only the broker address, TLS and database are local) publishes the desired config
    as edgeglm-operator while a client of the controller's user stays connected."""
    from agent.cli import main

    text = find(rendered("base"), "ConfigMap", "edgeglm-controller-config")["data"]["fleet-cli.toml"]
    assert tomllib.loads(text)["mqtt"]["username"] == OPERATOR
    password_file = tmp_path / "operator-mqtt" / "password"
    password_file.parent.mkdir()
    password_file.write_text(PASSWORDS[OPERATOR] + "\n")  # as `openssl rand -hex 24 > FILE` leaves it
    lines, in_tls = [], False
    for line in text.splitlines():
        if line.startswith("["):
            in_tls = line.strip() == "[mqtt.tls]"  # the test broker speaks plain MQTT
        if in_tls:
            continue
        lines.append(f'password_file = "{password_file}"' if line.startswith("password_file") else line)
    conf = tmp_path / "fleet-cli.toml"
    conf.write_text("\n".join(lines) + "\n")

    controller = connect(CONTROLLER)
    assert controller.subscribe(*controller_subscriptions(FLEET)) == [1] * len(controller_subscriptions(FLEET))
    dev1 = connect("dev1")
    assert dev1.subscribe(*device_subscriptions(FLEET, "dev1")) == [1] * 4
    from fleet.store import Store

    store = Store(tmp_path / "fleet.db")  # the serving controller's registry, which knows dev1 (as in the pod)
    store.upsert_state(FLEET, {"device": "dev1", "online": True, "model": None})
    store.close()
    rc = main(["fleet", "config", "set", "--config", str(conf), "--broker", f"127.0.0.1:{broker.port}",
               "--db", str(tmp_path / "fleet.db"), "--fleet", FLEET, "--device", "dev1", "sampling.max_tokens=64"])
    assert rc == 0, broker.log()
    topic, payload = dev1.messages.get(timeout=WAIT)
    assert topic == desired_topic(FLEET, "dev1") and json.loads(payload)["settings"] == {"sampling": {"max_tokens": 64}}
    assert dev1.publish(state_topic(FLEET, "dev1"), "still served")
    assert controller.messages.get(timeout=WAIT) == (state_topic(FLEET, "dev1"), "still served")
    assert not controller.disconnected.is_set(), f"the controller was disconnected\n{broker.log()}"
    log = broker.log()
    assert "already connected" not in log, log
    assert re.search(rf"New client connected from \S+ as {re.escape(OPERATOR)} ", log), log


def test_the_broker_listens_only_where_configured(broker):
    """One listener: an option placed before it would open a plain-text default listener on 1883."""
    ports = re.findall(r"Opening ipv[46] listen socket on port (\d+)", broker.log())
    assert ports and set(ports) == {str(broker.port)}, broker.log()


@pytest.mark.parametrize("user,password", [("dev1", "wrong"), ("nobody", "x"), (None, None)])
def test_unknown_users_and_wrong_passwords_are_refused(broker, user, password):
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=paho.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)
    result: queue.Queue = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: result.put(rc)
    client.connect("127.0.0.1", broker.port)
    for _ in range(int(WAIT / 0.05)):  # no loop thread: it would retry after the refusal
        client.loop(0.05)
        if not result.empty():
            break
    client.disconnect()
    rc = result.get_nowait()
    assert rc.is_failure and rc.value in (0x86, 0x87), rc  # bad user name or password / not authorized


def test_a_device_added_with_sighup_can_connect(broker, connect):
    """docs/deploy-k3s.md adds a device without a restart: new password file, then SIGHUP."""
    PASSWORDS["dev9"] = "pw-dev9"
    try:
        subprocess.run([broker.passwd, "-b", str(broker.workdir / "passwords"), "dev9", PASSWORDS["dev9"]],
                       check=True, capture_output=True)
        controller = connect(CONTROLLER)
        broker.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while "Reloading config" not in broker.log():
            assert time.monotonic() < deadline, broker.log()
            time.sleep(0.02)
        dev9 = connect("dev9")
        assert dev9.publish(state_topic(FLEET, "dev9"), "new box")
        assert not controller.disconnected.is_set(), "a reload keeps the connections"
    finally:
        del PASSWORDS["dev9"]


def test_the_agent_connects_over_tls_with_the_shipped_config(tmp_path):
    """The agent's own MqttSession, TLS as in agent.toml, against the config as shipped."""
    from agent.mqtt import Connected, MqttSession, MqttSettings
    from agent.topics import ReportedState

    certs = make_test_certs(tmp_path / "pki")
    tls_broker = Broker(tmp_path / "broker", PASSWORDS, tls=certs)
    session = None
    try:
        controller = Client(tls_broker, CONTROLLER, PASSWORDS[CONTROLLER], ca_file=certs.ca_file)
        controller.subscribe(*controller_subscriptions(FLEET))
        settings = MqttSettings(enabled=True, host="127.0.0.1", port=tls_broker.port, username="dev1",
                                password=PASSWORDS["dev1"], tls={"ca_file": certs.ca_file}, protocol="5")
        state = ReportedState(device="dev1", online=True, agent_version="0.1.0", uptime_s=0.0, ts=time.time())
        session = MqttSession(settings, fleet=FLEET, device="dev1", state_fn=lambda: state).start()
        deadline = time.monotonic() + WAIT
        while not isinstance(session.get_event(timeout=0.1), Connected):
            assert time.monotonic() < deadline, f"the agent did not connect\n{tls_broker.log()}"
        topic, payload = controller.messages.get(timeout=WAIT)
        assert topic == state_topic(FLEET, "dev1") and '"online":true' in payload.replace(" ", "")
        controller.close()
    finally:
        if session is not None:
            session.close()
        tls_broker.stop()


def test_the_acl_lets_every_device_topic_of_the_protocol_through():
    """Each device -> controller topic of agent.topics.TOPICS has a device write line and a controller read line
    (a topic added to the protocol without them was dropped by the broker: the latency histograms)."""
    from agent.topics import TOPICS

    lines = {line.strip() for line in BROKER_FILES["acl.conf"].splitlines()}
    for spec in TOPICS:
        if spec.direction == "device → controller":
            assert f"pattern write {F}/%u/{spec.suffix}" in lines, spec.suffix
            assert f"topic read {F}/+/{spec.suffix}" in lines, spec.suffix
        elif spec.direction == "controller → device":
            assert f"pattern read {F}/%u/{spec.suffix}" in lines, spec.suffix
