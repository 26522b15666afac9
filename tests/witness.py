"""A plain paho subscriber to one topic: the JSON payloads the broker passed on, in order. Tests wait on it to
know that what an agent publishes in the background (its MQTT session's thread) has reached the broker."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Witness:
    def __init__(self, port: int, topic: str):
        self.payloads: list[dict] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="witness", protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.payloads.append(json.loads(m.payload))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(10)

    def field(self, name: str) -> list:
        """`name` of every payload seen so far."""
        return [p[name] for p in list(self.payloads)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def clear_presence(port: int, fleet: str) -> None:
    """Clear the fleet controller's retained presence: agents then send their telemetry while it is away, as
    agents (or a controller) from before the presence topic do."""
    from agent.topics import controller_presence_topic

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="clear-presence", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(controller_presence_topic(fleet), b"", 1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
