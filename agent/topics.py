"""The MQTT topic tree (version 1) and the JSON payloads that travel on it.

Every topic of a device sits under `edgeglm/v1/<fleet>/<device>/`; `TOPICS` lists them with
direction, retain flag and QoS, and docs/mqtt.md shows that table and the payload schemas,
both generated from this module:

    python -m agent.topics --write-docs docs/mqtt.md   # rewrite the generated section
    python -m agent.topics --check docs/mqtt.md        # exit 1 if it is out of date

Payloads are pydantic models that reject unknown fields and carry a version field `v`; a
change that old readers could not parse bumps `v` (and a change of the tree bumps `v1`).
`parse_payload` turns received bytes into a model or raises `PayloadError` naming the topic and
the problem. The OTA offer/status and chunk payloads belong to ota/ and are not defined here.

What a device sends is read by the controller, so the device -> controller models are strict:
floats must be finite (JSON's NaN/Infinity extensions are refused), integers fit SQLite's
64 bits, and model versions follow the bundle manifest's rule (`ota.bundle.VERSION_RE`, e.g.
1.2.3): a version ends up in /metrics labels and in SQL, and an agent only ever reports the
version of a manifest it verified.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from agent.errors import PayloadError
from agent.histogram import LATENCY_MS_MAX, MAX_INDEX, MIN_INDEX, RELATIVE_ACCURACY
from ota.bundle import VERSION_RE

VERSION_PATTERN = VERSION_RE.pattern
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # as ota.bundle.Manifest.name
INT64_MAX = (1 << 63) - 1  # what SQLite stores as an INTEGER
# a count one telemetry report may carry: far beyond a window's (30 s), small enough that the controller's sums over
# a fleet's reports stay inside SQLite's INTEGER (two reports of 2^62 overflowed SUM(), and status and /metrics failed)
REPORT_COUNT_MAX = (1 << 31) - 1
# LATENCY_MS_MAX (agent.histogram): a day; beyond it a percentile is a broken clock, and sums of them stay finite
TOKENS_PER_S_MAX = 1e9

ROOT = "edgeglm/v1"
# topic levels built from fleet/device/requester ids: no '/', '+', '#', spaces; as in agent.config
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ID = re.compile(ID_PATTERN)


def _level(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value) or len(value) > 128:
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level: use 1-128 of A-Z a-z 0-9 . _ - "
                         f"(not starting with . _ -)")
    return value


def device_root(fleet: str, device: str) -> str:
    return f"{ROOT}/{_level(fleet, 'fleet id')}/{_level(device, 'device id')}"


def state_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/state"


def desired_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/config/desired"


def telemetry_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/telemetry"


def health_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/health"


def latency_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/latency"


def ota_offer_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/ota/offer"


def ota_status_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/ota/status"


def chunk_request_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/ota/chunk/request"


def chunk_response_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/ota/chunk/response"


def infer_request_topic(fleet: str, device: str) -> str:
    return f"{device_root(fleet, device)}/infer/request"


def infer_response_topic(fleet: str, device: str, requester: str) -> str:
    """Where `requester` (a client id) wants the answers of `device`; it subscribes to it."""
    return f"{device_root(fleet, device)}/infer/response/{_level(requester, 'requester id')}"


def infer_response_problem(fleet: str, device: str, topic: str) -> str | None:
    """Why `device` must not publish an inference answer on `topic` (a request's response topic or
    `reply_to`); None when it may. Inside the protocol's tree (`edgeglm/...`) a device answers only
    on its own `infer/response/<requester>`: a request naming the device's `config/desired` made it
    refuse its own answer as a desired config (and report that as its config error), one naming
    `state`, `ota/status` or `ota/chunk/request` had it publish a stray payload where the
    controller reads state. Topics outside the tree are the requester's business, but for the broker's own
    (`$SYS/...`, `$share/...`: never a requester's)."""
    if topic.startswith("$"):
        return f"response topic {topic!r} is refused: topics beginning with '$' are the broker's"
    if topic.split("/", 1)[0] != ROOT.split("/", 1)[0]:
        return None
    prefix = f"{device_root(fleet, device)}/infer/response/"
    rest = topic[len(prefix):] if topic.startswith(prefix) else None
    if rest is not None and _ID.fullmatch(rest) and len(rest) <= 128:
        return None
    return (f"response topic {topic!r} is refused: inside {ROOT.split('/', 1)[0]}/ a device answers only on its own "
            f"{prefix}<requester> (a requester id of 1-128 of A-Z a-z 0-9 . _ -)")


@dataclass(frozen=True)
class TopicSpec:
    """One row of the tree: `suffix` follows `edgeglm/v1/<fleet>/<device>/`."""

    suffix: str
    direction: str
    retained: bool
    qos: int
    payload: str
    note: str = ""


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("state", "device → all", True, 1, "ReportedState",
              "also the Will (`online: false`); re-published on every connect"),
    TopicSpec("config/desired", "controller → device", True, 1, "DesiredConfig",
              "written only by the controller"),
    TopicSpec("telemetry", "device → controller", False, 1, "TelemetryReport",
              "buffered while offline, sent in order after reconnect"),
    TopicSpec("health", "device → controller", False, 0, "DeviceHealth",
              "memory, disk, CPU, KV waits; with a telemetry report every telemetry.health_interval_s while "
              "online, not buffered (a snapshot: the next replaces it); a topic of its own, so controllers that "
              "predate it never see it"),
    TopicSpec("latency", "device → controller", False, 1, "LatencyHistograms",
              "the histograms of a telemetry window with requests, sent just before its report (buffered with it); "
              "a topic of its own, so controllers that predate it never see it; telemetry.histograms = false: not "
              "sent"),
    TopicSpec("ota/offer", "controller → device", True, 1, "ota offer (ota/)", "cleared by an empty retained message"),
    TopicSpec("ota/status", "device → controller", True, 1, "ota status (ota/)", ""),
    TopicSpec("ota/chunk/request", "device → controller", False, 1, "chunk request (ota/)", "request/response"),
    TopicSpec("ota/chunk/response", "controller → device", False, 1, "chunk response (ota/)", ""),
    TopicSpec("infer/request", "any client → device", False, 1, "InferenceRequest", "request/response"),
    TopicSpec("infer/response/<requester>", "device → requester", False, 1, "InferenceResponse",
              "the requester's own topic, named in the request"),
)


def device_subscriptions(fleet: str, device: str) -> list[str]:
    """What the agent subscribes to (all QoS 1)."""
    return [desired_topic(fleet, device), ota_offer_topic(fleet, device), chunk_response_topic(fleet, device),
            infer_request_topic(fleet, device)]


# the fleet controller's presence: retained, `{"online": true|false, ...}`, under a level no fleet id can take
# (ids start with a letter or digit). `fleet serve` publishes online once its subscriptions are in place, offline
# when it stops, and has the broker publish offline for it (its Will) when its connection is lost; agents that have
# seen it hold their telemetry while it says offline (agent.mqtt). Its own fleet's where it serves one fleet
# (`--fleet F`), PRESENCE_ALL_FLEETS where it serves every fleet.
PRESENCE_ROOT = f"{ROOT}/_controller"
PRESENCE_ALL_FLEETS = "_all"


def controller_presence_topic(fleet: str = "+") -> str:
    """Where the controller serving `fleet` ("+": every fleet) says whether it is online."""
    return f"{PRESENCE_ROOT}/{PRESENCE_ALL_FLEETS if fleet == '+' else _level(fleet, 'fleet id')}"


def presence_topics(fleet: str) -> list[str]:
    """The presence topics of the controllers that may serve a device of `fleet` (the agent subscribes to both)."""
    return [controller_presence_topic(fleet), controller_presence_topic("+")]


def presence_payload(online: bool) -> bytes:
    return json.dumps({"online": online, "ts": round(time.time(), 3)}).encode()


def presence_online(payload: bytes) -> bool | None:
    """What a presence message says: True (online), False (offline), None (empty: cleared, or not a presence
    message: an agent then goes by the other topic, or sends as if there were no presence)."""
    try:
        value = json.loads(payload) if payload else None
    except ValueError:
        return None
    online = value.get("online") if isinstance(value, dict) else None
    return online if isinstance(online, bool) else None


def controller_subscriptions(fleet: str = "+") -> list[str]:
    """The controller's wildcards: every device of `fleet` ("+": of every fleet)."""
    fleet = fleet if fleet == "+" else _level(fleet, "fleet id")
    return [f"{ROOT}/{fleet}/+/{s}" for s in ("state", "telemetry", "latency", "health", "ota/status",
                                                                  "ota/chunk/request")]


def shared_subscription(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker hands each message to one member of `group`."""
    return f"$share/{_level(group, 'share group')}/{topic_filter}"


def split_topic(topic: str) -> tuple[str, str, str]:
    """`edgeglm/v1/<fleet>/<device>/<rest>` → (fleet, device, rest); ValueError for other topics."""
    parts = topic.split("/", 4)
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or not parts[4]:
        raise ValueError(f"topic {topic!r} is not under {ROOT}/<fleet>/<device>/")
    return _level(parts[2], "fleet id"), _level(parts[3], "device id"), parts[4]


def _unsafe_in_topic(ch: str) -> bool:
    """A code point MQTT says a string should not hold (control characters, surrogates, non-characters):
    Mosquitto takes a PUBLISH whose topic holds one as a malformed packet and drops the connection."""
    c = ord(ch)
    return c <= 0x1F or 0x7F <= c <= 0x9F or 0xD800 <= c <= 0xDFFF or 0xFDD0 <= c <= 0xFDEF or c & 0xFFFE == 0xFFFE


MAX_TOPIC_LEVELS = 200  # Mosquitto's limit on a topic's levels (TOPIC_HIERARCHY_LIMIT); a publish past it ends the
# connection, and paho sends a QoS 1 answer again after every reconnect: the device was cut off for good


def _varint_bytes(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def publish_packet_bytes(topic: str, payload: bytes | str | int, qos: int = 1, *, mqtt5: bool = True,
                         response_topic: str | None = None, correlation_data: bytes | None = None) -> int:
    """The size of the MQTT PUBLISH packet that carries `payload` to `topic`: what a broker compares with its
    maximum packet size (Mosquitto's `max_packet_size`; an MQTT 5 broker announces it in its CONNACK). A broker
    closes the connection of a client that sends a larger one, and the client's session would send the same
    QoS 1 message again after every reconnect. `payload`: the payload, or its size in bytes."""
    size = payload if isinstance(payload, int) else len(payload.encode() if isinstance(payload, str) else payload)
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + size
    if mqtt5:
        props = (3 + len(response_topic.encode()) if response_topic else 0) + \
            (3 + len(correlation_data) if correlation_data else 0)
        rest += _varint_bytes(props) + props
    return 1 + _varint_bytes(rest) + rest


def broker_packet_limit(properties) -> int | None:
    """The maximum packet size an MQTT 5 broker announced in its CONNACK properties; None when it announced none
    (no limit said; MQTT 3.1.1 has no way to say it)."""
    limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
    return limit if isinstance(limit, int) and limit > 0 else None


def check_publish_topic(topic: str) -> str:
    """A topic a client may publish to: non-empty, no wildcards, at most 65535 bytes, no control characters
    or Unicode non-characters (a response topic with one, e.g. `reply_to` "a\\u0001b", got the device
    disconnected by the broker at once, and again after every reconnect: paho sends the QoS 1 answer again)."""
    bad = next((ch for ch in topic if _unsafe_in_topic(ch)), None) if isinstance(topic, str) else None
    if bad is not None:
        raise ValueError(f"{topic!r} is not a topic one can publish to: it holds {bad!a}, a control character or "
                         "Unicode non-character, which the broker refuses")
    if not topic or "+" in topic or "#" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"{topic!r} is not a topic one can publish to (empty, a wildcard or too long)")
    levels = topic.count("/") + 1
    if levels > MAX_TOPIC_LEVELS:  # Mosquitto disconnects a client that publishes to one ("protocol error")
        raise ValueError(f"{topic[:64]!r}... is not a topic one can publish to: {levels} levels, more than the "
                         f"{MAX_TOPIC_LEVELS} the broker takes")
    return topic


# ---------------------------------------------------------------------------------------------
# Payloads


class Payload(BaseModel):
    """Base of every payload: unknown fields are refused, `v` versions the shape."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    v: Literal[1] = 1

    @field_validator("v", mode="before")
    @classmethod
    def _v_is_a_number(cls, value):
        if isinstance(value, bool):  # Literal[1] takes true (True == 1), even strictly
            raise ValueError(f"{json.dumps(value)} is not a payload format version (the number 1)")
        return value


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=128, pattern=MODEL_NAME_PATTERN, description="the bundle manifest's name")
    version: str = Field(max_length=64, pattern=VERSION_PATTERN, description="the bundle manifest's version")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the bundle's manifest.json")


class ReportedState(Payload):
    """The device's retained state; `online: false` in the Will and on a clean shutdown."""

    device: str = Field(pattern=ID_PATTERN, max_length=128)
    online: bool
    agent_version: str
    hardware: dict[str, Any] = Field(default_factory=dict, description=(
        "summary of runtime.probe; also `execution` (the path serving), `model_error` (why the active slot's model "
        "is not served), `run` (random at each agent start: two states of one run are ordered by uptime_s) and "
        "`keys`: {trusted, serving, rollback, required}, the ids of the signing keys the box trusts and of those that "
        "sign the model it serves and the model a rollback goes back to (null: none there), and whether the box "
        "requires a trusted signature (ota.require_signature)"))
    execution_path: str | None = Field(None, description="the backend/device serving, e.g. 'onnxruntime:cpu'")
    model: ModelRef | None = None
    active_slot: Literal["a", "b"] | None = None
    applied_config_version: int | None = Field(None, ge=0, le=INT64_MAX,
                                              description="version of the last desired config applied")
    last_config_error: str | None = Field(None, description="why the last desired config was refused, if it was")
    uptime_s: float = Field(ge=0)
    ts: float = Field(description="unix time, seconds, when the state was made")


class DesiredConfig(Payload):
    """Config the controller wants; `settings` is validated by agent.config, not here."""

    version: int = Field(ge=0, le=INT64_MAX)
    settings: dict[str, Any] = Field(default_factory=dict)


class LatencyPercentiles(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    p50: float = Field(ge=0, le=LATENCY_MS_MAX)
    p95: float = Field(ge=0, le=LATENCY_MS_MAX)
    p99: float = Field(ge=0, le=LATENCY_MS_MAX)

    @model_validator(mode="after")
    def _ordered(self) -> "LatencyPercentiles":
        if not self.p50 <= self.p95 <= self.p99:
            raise ValueError(f"percentiles must grow: p50={self.p50} p95={self.p95} p99={self.p99}")
        return self


class TelemetryReport(Payload):
    """Latency of the requests served in one window. A percentile is None when the window has no sample of
    it: no requests (count 0), or requests without one (a one-token answer has no per-token gap). Windows
    follow each other without gaps; a model switch cuts one, and each request and error is reported under
    the model version that served it (one still running on the old model when the new one took over
    included: that window is sent once it has finished)."""

    # model_version is a field, not pydantic API: pydantic 2.7-2.9 (pyproject allows 2.7) warned about its
    # "model_" prefix on stderr at every import, ahead of each command's one-line error
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    device: str = Field(pattern=ID_PATTERN, max_length=128)
    window_start: float = Field(description="unix time, seconds")
    window_end: float = Field(description="unix time, seconds")
    count: int = Field(ge=0, le=REPORT_COUNT_MAX, description="requests answered whole in the window")
    ttft_ms: LatencyPercentiles | None = Field(None, description="time to first token")
    per_token_ms: LatencyPercentiles | None = Field(None, description="time per generated token after the first")
    tokens_per_s: float | None = Field(None, ge=0, le=TOKENS_PER_S_MAX)
    errors: int = Field(0, ge=0, le=REPORT_COUNT_MAX,
                        description="requests the agent failed (HTTP 5xx; MQTT model_unavailable or internal)")
    dropped_reports: int = Field(0, ge=0, le=REPORT_COUNT_MAX, description="earlier reports lost from the offline buffer")
    model_version: str | None = Field(None, max_length=64, pattern=VERSION_PATTERN)
    execution_path: str | None = None
    # the window's LatencyHistograms, which the agent sends on the latency topic just before the report (not a
    # field: never in the report's JSON)
    _histograms: "LatencyHistograms | None" = PrivateAttr(None)

    @model_validator(mode="after")
    def _window(self) -> "TelemetryReport":
        if self.window_end < self.window_start:
            raise ValueError(f"window_end {self.window_end} is before window_start {self.window_start}")
        return self


Bin = tuple[int, int]


class LatencyHistogram(BaseModel):
    """Latencies counted in log buckets (agent.histogram): `bins` are (index, count) pairs, indices ascending.
    Bucket i holds the latencies x (ms) with GAMMA**(i-1) < x <= GAMMA**i, GAMMA = 1.01 / 0.99 (1% relative
    accuracy); its value is 2 * GAMMA**i / (GAMMA + 1)."""

    model_config = ConfigDict(extra="forbid")
    bins: list[Bin] = Field(max_length=MAX_INDEX - MIN_INDEX + 1)

    @field_validator("bins")
    @classmethod
    def _bins(cls, bins: list[Bin]) -> list[Bin]:
        last = MIN_INDEX - 1
        for i, c in bins:
            if not MIN_INDEX <= i <= MAX_INDEX:
                raise ValueError(f"bucket index {i} is outside {MIN_INDEX}..{MAX_INDEX}")
            if i <= last:
                raise ValueError(f"bucket indices must ascend, each once: {i} after {last}")
            if not 1 <= c <= REPORT_COUNT_MAX:
                raise ValueError(f"bucket {i} has count {c}: counts are 1..{REPORT_COUNT_MAX} (an empty bucket is "
                                 "left out)")
            last = i
        return bins

    @property
    def count(self) -> int:
        return sum(c for _, c in self.bins)


class LatencyHistograms(Payload):
    """The latencies of one telemetry window counted in log buckets, so that a controller can add windows and
    devices up and read true percentiles (within 1%) off the sum. It names its window by the `window_end` of the
    TelemetryReport it belongs to (sent just before it); every latency is counted, not a sample."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    device: str = Field(pattern=ID_PATTERN, max_length=128)
    window_end: float = Field(description="unix time, seconds: the window's TelemetryReport.window_end")
    model_version: str | None = Field(None, max_length=64, pattern=VERSION_PATTERN)
    relative_accuracy: Literal[0.01] = Field(RELATIVE_ACCURACY, description="the bucket scheme: 1% log buckets")
    ttft_ms: LatencyHistogram | None = Field(None, description="time to first token")
    per_token_ms: LatencyHistogram | None = Field(None, description="time per generated token after the first")


class DeviceHealth(Payload):
    """What the box has left and how the agent's process fares, sampled when sent. Counters (`cpu_seconds`,
    `kv_waits`) run from the agent's start, so a lost snapshot loses nothing; a reading the box does not
    offer (no thermal zone, not Linux) is None."""

    device: str = Field(pattern=ID_PATTERN, max_length=128)
    ts: float = Field(description="unix time, seconds, when sampled")
    uptime_s: float = Field(ge=0, description="seconds since the agent started")
    rss_bytes: int | None = Field(None, ge=0, le=INT64_MAX, description="resident memory of the agent's process")
    memory_available_bytes: int | None = Field(
        None, ge=0, le=INT64_MAX, description="memory the agent can still take: MemAvailable, or less under a "
        "cgroup limit")
    cpu_seconds: float = Field(ge=0, description="user + system CPU time of the agent's process")
    load_1m: float | None = Field(None, ge=0, description="the box's 1-minute load average")
    cpus: int = Field(ge=1, le=1 << 20, description="CPUs the agent may run on")
    disk_free_bytes: int | None = Field(
        None, ge=0, le=INT64_MAX, description="free bytes on the file system of the state directory (where "
        "updates are downloaded)")
    temperature_c: float | None = Field(None, ge=-273.15, le=1000, description="the hottest thermal zone")
    in_flight: int = Field(0, ge=0, le=INT64_MAX, description="inference requests in the batch now")
    queued: int = Field(0, ge=0, le=INT64_MAX, description="inference requests waiting for a place")
    kv_waits: int = Field(0, ge=0, le=INT64_MAX, description="requests that waited for batching.max_kv_mb, "
                          "since the agent started")
    kv_bound_bytes: int = Field(0, ge=0, le=INT64_MAX, description="batching.max_kv_mb as applied; 0: no bound")
    prefix_cache_bytes: int = Field(0, ge=0, le=INT64_MAX, description="KV held by the prefix cache")
    next_s: float | None = Field(None, gt=0, le=10 * 86400.0,
                                 description="seconds until the next snapshot is due (the controller takes this one "
                                             "as current until about twice that has passed)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # developer: read as system (as the HTTP API does)
    content: str


class InferenceRequest(Payload):
    """A generation request. Sampling fields left out take the agent's configured defaults.

    `id` is the correlation id: MQTT 5 requesters also send it as correlation data with a
    response topic; `reply_to` carries the response topic for MQTT 3.1.1, where there are no
    properties. Requesters set both, so a device reached over either protocol can answer.
    """

    id: str = Field(min_length=1, max_length=128)
    reply_to: str | None = Field(None, description="response topic (MQTT 3.1.1 has no response-topic property)")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0: the most likely token only
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    timeout_s: float | None = Field(None, gt=0.0, le=86400.0, description=(
        "seconds from the request's arrival after which its generation stops and it is answered with error "
        "code 'timeout' (a requester that gave up frees its place; default: none); an MQTT 5 Message Expiry "
        "Interval on the request applies the same way (the sooner of the two)"))

    @field_validator("reply_to")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        return None if v is None else check_publish_topic(v)

    @model_validator(mode="after")
    def _one_input(self) -> "InferenceRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="e.g. bad_request, busy, model_unavailable, internal")
    message: str


class InferenceResponse(Payload):
    """The answer to one InferenceRequest (same `id`): `text` or `error`, never both."""

    id: str = Field(min_length=1, max_length=128)
    text: str | None = None
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None

    @model_validator(mode="after")
    def _text_or_error(self) -> "InferenceResponse":
        if (self.text is None) == (self.error is None):
            raise ValueError("give exactly one of text and error")
        return self


PAYLOAD_MODELS: tuple[type[Payload], ...] = (ReportedState, DesiredConfig, TelemetryReport, LatencyHistograms,
                                             DeviceHealth, InferenceRequest, InferenceResponse)


def payload_schemas() -> dict[str, dict]:
    """JSON schema of every payload model, by model name."""
    return {m.__name__: m.model_json_schema() for m in PAYLOAD_MODELS}


M = TypeVar("M", bound=BaseModel)


def _describe(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        where = ".".join(str(x) for x in e["loc"])
        got = "" if e["type"] in ("missing", "json_invalid") else f" (got {repr(e.get('input'))[:60]})"
        parts.append(f"{'field ' + repr(where) + ': ' if where else ''}{e['msg']}{got}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# the JSON reader's errors inside one value (not a cut payload, not a missing `,` between fields)
VALUE_PROBLEM = re.compile(r"^(?!EOF).*(number|escape|surrogate|unicode|control character|invalid value)", re.I)


def json_path_at(raw: bytes, line: int, column: int) -> str | None:
    """The field (`sampling.seed`, `messages[2]`) whose value holds `line`:`column` (1-based, as the JSON
    reader's "at line L column C", the column in bytes) of the JSON `raw`; None at the top level or where that
    cannot be told. The reader's errors in a value (a number out of range, a lone surrogate in a string) name no
    field. Scanned as bytes: the structural characters are ASCII, and a UTF-8 byte of other text never is."""
    lines = raw.split(b"\n")
    if not 1 <= line <= len(lines):
        return None
    end = sum(len(x) + 1 for x in lines[:line - 1]) + column - 1
    stack: list[list] = []  # [is_object, key or index]
    in_string = escaped = False
    start, key = 0, None
    for i, c in enumerate(raw[:end + 1]):
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # the closing quote
                in_string, key = False, raw[start + 1:i].decode("utf-8", "replace")
        elif c == 0x22:
            in_string, start = True, i
        elif c in b"{[":
            stack.append([c == 0x7B, None if c == 0x7B else 0])
        elif c in b"}]" and stack:
            stack.pop()
        elif c == 0x3A and stack and stack[-1][0]:  # ':'
            stack[-1][1] = key
        elif c == 0x2C and stack:  # ','
            stack[-1][1] = None if stack[-1][0] else stack[-1][1] + 1
    path = ""
    for is_object, name in stack:
        if name is None:
            return path.lstrip(".") or None  # between an object's fields: the problem is no field's value
        path += f".{name}" if is_object else f"[{name}]"
    return path.lstrip(".") or None


def parse_payload(model_cls: type[M], raw: bytes, max_bytes: int, topic: str = "?") -> M:
    """`raw` as a `model_cls`, or PayloadError naming the topic and what is wrong. Read strictly: JSON types must
    be the fields' own (`"version": "7"` or `true` is no integer, `"max_tokens": 5.0` is no count), as the HTTP
    API and the config files read them, instead of being converted silently."""
    if len(raw) > max_bytes:
        raise PayloadError(topic, f"payload is {len(raw)} bytes, more than the {max_bytes}-byte limit "
                                  f"for {model_cls.__name__}")
    try:
        return model_cls.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        problem = _describe(exc)
        first = exc.errors()[0]
        where = re.search(r"at line (\d+) column (\d+)", first["msg"]) if (
            first["type"] == "json_invalid" and VALUE_PROBLEM.search(first["msg"])) else None
        field = where and json_path_at(raw, int(where[1]), int(where[2]))
        if field:  # a number out of range, a lone surrogate: the reader says where, not which field
            problem = f"field {field!r}: {problem}"
        raise PayloadError(topic, f"not a valid {model_cls.__name__}: {problem}") from None


# ---------------------------------------------------------------------------------------------
# docs/mqtt.md: the generated section

BEGIN_MARK = "<!-- BEGIN GENERATED: python -m agent.topics --write-docs docs/mqtt.md -->"
END_MARK = "<!-- END GENERATED -->"


def render_docs_section() -> str:
    """The topic table and the payload schemas, as markdown."""
    lines = [f"All topics are under `{ROOT}/<fleet>/<device>/`.", "",
             "| topic | direction | retained | QoS | payload | note |", "|---|---|---|---|---|---|"]
    for t in TOPICS:
        lines.append(f"| `{t.suffix}` | {t.direction} | {'yes' if t.retained else 'no'} | {t.qos} | "
                     f"{t.payload} | {t.note} |")
    lines += ["", "### Payload schemas", ""]
    for name, schema in payload_schemas().items():
        lines += [f"#### {name}", "", "```json", json.dumps(schema, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def replace_generated(text: str, section: str) -> str:
    """`text` with what lies between BEGIN_MARK and END_MARK replaced by `section`."""
    start, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if start < 0 or end < start:
        raise ValueError(f"markers not found: put {BEGIN_MARK!r} and {END_MARK!r} around the generated section")
    return text[:start + len(BEGIN_MARK)] + "\n" + section + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.topics", description="write or check docs/mqtt.md")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-docs", type=Path, metavar="MD", help="rewrite the generated section of MD")
    group.add_argument("--check", type=Path, metavar="MD", help="exit 1 if MD's generated section is stale")
    args = ap.parse_args(argv)
    path = args.write_docs or args.check
    text = path.read_text(encoding="utf-8")
    try:
        new = replace_generated(text, render_docs_section())
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path} is out of date: run python -m agent.topics --write-docs {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
