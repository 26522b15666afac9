"""The agent's MQTT session: one paho client kept connected, feeding the agent's loop through a queue.

    session = MqttSession(settings, fleet="plant-7", device="box-12", state_fn=current_state)
    session.subscribe(desired_topic("plant-7", "box-12"), DesiredConfig)
    session.start()
    while running:
        event = session.get_event(timeout=1.0)   # Connected | Disconnected | Received | PayloadRejected | None
        ...
    session.close()                              # retained `online: false`, then a clean DISCONNECT

Three threads touch a session. paho's network thread (one per connection, `loop_start`) runs the
callbacks, which only put events on queues. A supervisor thread connects, waits out the backoff,
and after each CONNACK subscribes, publishes the retained state and flushes what was held while
offline. The agent's thread calls everything public and decodes payloads in `get_event`.

Protocol: "5", "3.1.1", or "auto": MQTT 5 first and 3.1.1 when the broker refuses protocol level 5
(a CONNACK "unsupported protocol version", or the connection closed before any CONNACK); once a
connection succeeds its protocol is kept. Request/response works over both: MQTT 5 sends the
response topic and correlation data as properties, and every request also carries `reply_to`
and `id` in its payload, which is all that a 3.1.1 hop keeps.

Nothing is lost across a broker restart: QoS 1, a persistent session (clean start off, session
expiry for MQTT 5; clean session off for 3.1.1), messages published while offline held and sent
in order after reconnect (telemetry in a bounded buffer whose overflow is counted in the next
report's `dropped_reports`), and the state re-published on every connect.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator,
                      model_validator)

from agent.errors import PayloadError
from agent.topics import ReportedState, TelemetryReport, broker_packet_limit, check_publish_topic, parse_payload, \
    latency_topic, presence_online, presence_topics, publish_packet_bytes, state_topic, telemetry_topic

log = logging.getLogger("edgeglm.mqtt")


class _PahoLoopNoise(logging.Filter):
    """Drops paho's "Client is not connected" error (its network thread logs it when it runs once
    more after a disconnect has closed the socket, i.e. at every normal close) and its "failed to receive on
    socket" (a reset connection); connection losses are reported by the session itself (`Disconnected` events,
    the agent's log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # and "failed to receive on socket": a connection reset, which the session reports as a lost connection
        return not str(record.msg).startswith(("Client is not connected", "failed to receive on socket"))


PAHO_LOG = logging.getLogger("edgeglm.mqtt.paho")  # paho's own messages
PAHO_LOG.addFilter(_PahoLoopNoise())

UNSUPPORTED_PROTOCOL = 132  # CONNACK reason; paho maps a 3.1.1 broker's return code 1 to it
BACKSTOP_SHORT_CONNECTIONS = 5  # short connections in a row after which the paho client (its queue) is replaced
# after a reconnect, telemetry waits this long at most for the controller's presence (where one was seen before)
PRESENCE_WAIT_S = 120.0
SENT_REPORTS_KEPT = 10_000  # reports remembered until acknowledged (beyond: paho sends them again itself)
MIN_HEALTHY_CONNECTION_S = 10.0  # a connection up at least this long (and a keepalive) resets the backoff
PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}


def _no_empty_path(value):
    if isinstance(value, str) and not value.strip():  # Path("") is ".": the working directory, silently
        raise ValueError("is empty; set a path, or leave the setting out")
    return value


# a path setting: "" (an empty environment variable, `key = ""`) is refused, not taken as the working directory
SetPath = Annotated[Path, BeforeValidator(_no_empty_path)]


class MqttTls(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ca_file: SetPath | None = None  # None: the system's CA store
    cert_file: SetPath | None = None  # client certificate, with key_file
    key_file: SetPath | None = None
    insecure: bool = False  # skip the host name check (never in production)

    @model_validator(mode="after")
    def _pair(self) -> "MqttTls":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: give both or neither")
        return self

    def unreadable(self) -> list[str]:
        """`mqtt.tls.FIELD = PATH: why` for each file set that cannot be read or used (checked before connecting:
        paho's own error names no file, and the session would retry a configuration error forever): a missing
        or unreadable file, a CA file holding no certificate, a client certificate and key that do not load
        together (not PEM, not a pair, or a key protected by a passphrase, which the agent has no way to ask for)."""
        import ssl

        problems = []
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is None:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append(f"mqtt.tls.{name} = {path}: {exc.strerror or exc}")
        if problems:
            return problems
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_file))
            except ssl.SSLError as exc:
                problems.append(f"mqtt.tls.ca_file = {self.ca_file}: holds no PEM CA certificate ({_ssl_reason(exc)})")
        if self.cert_file is not None:
            try:  # an empty passphrase, never OpenSSL's terminal prompt (a daemon would hang on it)
                context.load_cert_chain(str(self.cert_file), str(self.key_file), password=b"")
            except ssl.SSLError as exc:
                problems.append(f"mqtt.tls.cert_file = {self.cert_file} and mqtt.tls.key_file = {self.key_file}: "
                                f"not a PEM certificate and its unencrypted private key ({_ssl_reason(exc)})")
            else:
                problems += self._out_of_date()
        return problems

    def _out_of_date(self) -> list[str]:
        """The client certificate outside its validity dates: the broker refuses the handshake, and the agent saw
        only "the network connection ended before CONNACK", naming no file (with `protocol = "auto"` it even took
        that for a protocol refusal)."""
        import datetime as dt

        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
        except (OSError, ValueError):
            return []  # (loaded by ssl above: a form this check does not read is left to the broker)
        now = dt.datetime.now(dt.timezone.utc)
        if cert.not_valid_after_utc < now:
            return [f"mqtt.tls.cert_file = {self.cert_file}: the certificate expired on "
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; the broker would refuse it: install a renewed "
                    "one (and check the box's clock)"]
        if cert.not_valid_before_utc > now:
            return [f"mqtt.tls.cert_file = {self.cert_file}: the certificate is not valid before "
                    f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC and the clock says {now:%Y-%m-%d %H:%M}: "
                    "set the box's clock (NTP) or install a certificate valid now"]
        return []


def _ssl_reason(exc) -> str:
    """OpenSSL's reason, e.g. 'X509: NO_CERTIFICATE_OR_CRL_FOUND', without the C source location."""
    library, reason = getattr(exc, "library", None), getattr(exc, "reason", None)
    return f"{library}: {reason}" if library and reason else str(exc)


def broker_host_problem(host: str) -> str | None:
    """Why `host` is no broker host name or address (None: it is one). A URL there ("mqtt://broker:1883") was
    taken as a name and retried forever ("gaierror ... retrying in 15 s"), the port appended a second time."""
    if "://" in host or "/" in host:
        return "give a host name or address, not a URL (the port goes in port, TLS in the tls section)"
    if any(c.isspace() for c in host):
        return "a host name has no spaces"
    name, sep, port = host.rpartition(":")
    if sep and name and ":" not in name and port.isdigit():  # ("::1" and other IPv6 addresses pass)
        return f"give the port in port (here {port}), not after the host"
    return None


def _broker_host(host: str) -> str:
    problem = broker_host_problem(host)
    if problem:
        raise ValueError(problem)
    return host


# the agent's [mqtt] host and the fleet's
BrokerHost = Annotated[str, Field(min_length=1), AfterValidator(_broker_host)]


class MqttSettings(BaseModel):
    """Connection to the fleet's broker; `enabled: false` runs the agent without MQTT."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = False
    host: BrokerHost = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, min_length=1, max_length=128)  # None: the device id
    username: str | None = None
    password: SecretStr | None = None
    tls: MqttTls | None = None  # None: plain TCP
    keepalive_s: int = Field(30, ge=5, le=65535)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    reconnect_min_delay_s: float = Field(1.0, gt=0.0, le=3600.0)
    reconnect_max_delay_s: float = Field(60.0, gt=0.0, le=86400.0)
    connect_timeout_s: float = Field(10.0, gt=0.0, le=300.0)  # TCP + TLS + CONNACK
    qos: int = Field(1, ge=0, le=2)  # MQTT QoS 0, 1 or 2 (an int, so that EDGEGLM_MQTT__QOS=2 parses)
    session_expiry_s: int = Field(7 * 86400, ge=0, le=0xFFFFFFFF)  # MQTT 5; 3.1.1 sessions: the broker's rule
    telemetry_buffer: int = Field(100, ge=1, le=100_000)  # reports kept while offline
    held_messages: int = Field(1000, ge=1, le=1_000_000)  # other messages kept while offline
    max_payload_bytes: int = Field(1024 * 1024, ge=1024, le=256 << 20)  # default limit of a subscription

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # TOML `protocol = 5`

    @model_validator(mode="after")
    def _consistent(self) -> "MqttSettings":
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError(f"reconnect_max_delay_s ({self.reconnect_max_delay_s}) is below "
                             f"reconnect_min_delay_s ({self.reconnect_min_delay_s})")
        if self.password is not None and self.username is None:
            raise ValueError("mqtt.password is set but mqtt.username is not: set both")
        return self


# ---------------------------------------------------------------------------------------------
# Events on the agent's queue


@dataclass(frozen=True)
class Message:
    """A message as received; `get_event` turns it into Received or PayloadRejected."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None  # MQTT 5 property
    correlation_data: bytes | None = None  # MQTT 5 property
    # MQTT 5 Message Expiry Interval as the broker delivered it: the seconds the publisher's expiry had left
    expiry_s: int | None = None
    # time.perf_counter() when the client thread took it from the socket: an inference request's TTFT counts from
    # here, as an HTTP request's counts from its arrival (queueing, waiting for the model, tokenisation included)
    received: float = field(default_factory=time.perf_counter, compare=False)


@dataclass(frozen=True)
class Received:
    message: Message
    payload: BaseModel | None  # None: a raw subscription, or an empty (cleared) message where allowed


@dataclass(frozen=True)
class PayloadRejected:
    message: Message
    error: PayloadError


@dataclass(frozen=True)
class Connected:
    protocol: str  # "5" or "3.1.1"
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str
    retry_in_s: float | None  # None: the session is closing


Event = Union[Received, PayloadRejected, Connected, Disconnected]


@dataclass(frozen=True)
class ReplyTarget:
    topic: str
    correlation_data: bytes | None
    id: str | None


@dataclass
class SessionStats:
    connects: int = 0
    payload_errors: int = 0
    last_payload_error: str | None = None
    dropped_reports: int = 0  # telemetry reports pushed out of the offline buffer, in all
    dropped_messages: int = 0  # other messages pushed out of the offline hold, in all
    too_large: int = 0  # messages not sent: over the broker's maximum packet size
    client_resets: int = 0  # paho clients replaced, their queued messages dropped (BACKSTOP_SHORT_CONNECTIONS)


@dataclass(frozen=True)
class _Subscription:
    topic_filter: str
    model: type[BaseModel] | None
    max_bytes: int
    empty_ok: bool


class Delivery:
    """What became of one publish (`MqttSession.publish(..., delivery=Delivery())`): `delivered()` is true once the
    broker acknowledged it (PUBACK at QoS 1; written to the socket at QoS 0). A message held while offline gets its
    paho handle when it is sent at the next connect; one dropped (the offline hold full, over the broker's packet
    limit) or still unacknowledged when the session closes never counts as delivered."""

    def __init__(self):
        self.info: paho.MQTTMessageInfo | None = None

    def delivered(self) -> bool:
        info = self.info
        if info is None:
            return False
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            # paho raises for a message handed over as the connection dropped (rc NO_CONN: sent again after the
            # reconnect) and keeps raising after the broker acknowledged that resend: its own flag says then
            return bool(getattr(info, "_published", False))


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    delivery: Delivery | None = None


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half of min_s * 2**attempt (capped) plus a random half.

    The random half spreads a fleet's reconnects after a broker restart; the fixed half keeps a
    single device from retrying in a tight loop.
    """
    cap = min(max_s, min_s * 2 ** min(attempt, 32))
    return cap / 2 + rng.uniform(0.0, cap / 2)


def _no_delay(client: paho.Client) -> None:
    """TCP_NODELAY on the client's socket: request/response traffic (OTA chunks, inference) sends
    small messages back to back, which Nagle + delayed ACKs hold ~40 ms each (measured: 8x on a
    one-agent chunk transfer, benchmarks/ota_transfer.py)."""
    sock = client.socket()
    raw = getattr(sock, "_sock", sock)  # paho may wrap the socket (TLS)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. websockets/unix): nothing to tune


_UNKNOWN = object()  # what `_oldest_unacknowledged` says where paho keeps its queue elsewhere


def _oldest_unacknowledged(client: paho.Client):
    """The message id of the oldest QoS 1/2 message `client` still holds for the broker (paho sends it again at
    each reconnect), None when it holds none; read once its network thread has ended."""
    out = getattr(client, "_out_messages", None)
    if out is None:
        return _UNKNOWN
    try:
        return next((mid for mid, m in list(out.items()) if m.qos > 0), None)
    except RuntimeError:  # changed while read
        return _UNKNOWN


_QOS2_UNSENT = {getattr(paho, "mqtt_ms_publish", None), getattr(paho, "mqtt_ms_queued", None)}


def _qos2_sent(message) -> bool:
    """Whether paho holds `message` as a QoS 2 publish it has sent (the broker may hold its half of the exchange)."""
    return message is not None and getattr(message, "qos", 0) == 2 and getattr(message, "state", None) not in \
        _QOS2_UNSENT


def _acknowledged(info: paho.MQTTMessageInfo | None) -> bool:
    """Whether the broker acknowledged a message (None: never sent, over the broker's packet limit: nothing to
    wait for). One paho refused to send (not connected: its rc) is not; is_published() raises for it."""
    if info is None:
        return True
    if info.rc != paho.MQTT_ERR_SUCCESS:
        return False
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def _idle(report: TelemetryReport) -> bool:
    """A report of a window in which nothing was served or failed (its percentiles are all None)."""
    return not (report.count or report.errors or report.dropped_reports)


def _encode(payload: BaseModel | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else payload.model_dump_json().encode()


class MqttSession:
    """See the module docstring. `state_fn` returns the current ReportedState (any thread)."""

    def __init__(self, settings: MqttSettings, *, fleet: str, device: str, state_fn: Callable[[], ReportedState],
                 events: queue.Queue | None = None, rng: random.Random | None = None):
        self.settings = settings
        self.fleet, self.device = fleet, device
        self.client_id = settings.client_id or device
        self.state_fn = state_fn
        self.events: queue.Queue = events if events is not None else queue.Queue()
        self.stats = SessionStats()
        self._rng = rng or random.Random()
        self._state_topic = state_topic(fleet, device)
        self._telemetry_topic = telemetry_topic(fleet, device)
        self._latency_topic = latency_topic(fleet, device)
        self._protocol = PROTOCOLS.get(settings.protocol, paho.MQTTv5)
        self._protocol_fixed = settings.protocol != "auto"
        self._client: paho.Client | None = None
        self._client_protocol: int | None = None
        self._max_packet: int | None = None  # the broker's maximum packet size (its CONNACK), None: not said
        self._losses = 0  # connections ended (paho's thread counts them)
        self._control: queue.Queue = queue.Queue()  # callbacks → supervisor
        self._lock = threading.Lock()  # subscriptions, offline buffers and the online flag
        self._online = threading.Event()
        self._subs: dict[str, _Subscription] = {}
        self._held: deque[_Outgoing] = deque()
        self._outbox: deque[TelemetryReport] = deque()
        self._dropped_unreported = 0
        self._pending: dict[str, Future] = {}
        self._pending_lock = threading.Lock()
        self._response_topics: set[str] = set()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._up_since: float | None = None  # time.monotonic() of the current connection's CONNACK (accepted)
        self._held_at_end = None  # `_oldest_unacknowledged` when the last connection ended
        # the fleet controller's presence (agent.topics.presence_topics): topic -> online, as said on this connection
        # (report as sent, its messages' paho handles) until the broker acknowledged them: `_reclaim_unacknowledged`
        self._sent_reports: deque[tuple[TelemetryReport, list]] = deque()
        self._reclaimed: set[float] = set()  # window_end of the held reports sent once (the controller may have them)
        self._presence_topics = presence_topics(fleet)
        self._presence: dict[str, bool] = {}
        self._presence_seen = False  # a controller that says where it is was seen in this run
        self._presence_wait_until: float | None = None  # after a reconnect: hold until it says, at most this long

    # -- paho callbacks: thin, they only hand events on -------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # the largest packet the broker takes (MQTT 5 CONNACK); set before any publish of this connection
        self._max_packet = broker_packet_limit(properties)
        with self._lock:  # the presence is said again (retained) after the SUBSCRIBE; until then, where a controller
            self._presence.clear()  # said it before, telemetry is held (a broker restarted without persistence
            # forgot the controller's session: reports published before it subscribes again are lost)
            self._presence_wait_until = time.monotonic() + PRESENCE_WAIT_S if self._presence_seen else None
        self._control.put(("connack", reason_code, flags.session_present, self._losses))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._losses += 1  # before the flag: _after_connect compares it after setting the flag (no lock here)
        self._online.clear()
        from_broker = flags.is_disconnect_packet_from_server
        self._control.put(("closed", f"the broker disconnected us: {reason_code}" if from_broker else
                           "the network connection ended"))

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        self._control.put(("suback", mid, reason_code_list))

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        try:
            props = msg.properties
            message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain),
                              getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None),
                              getattr(props, "MessageExpiryInterval", None))
            if msg.topic in self._response_topics and self._resolve(message):
                return
            if msg.topic in self._presence_topics:
                self._on_presence(msg.topic, message.payload)
                return
            self.events.put(message)
        except Exception:  # noqa: BLE001: an exception here ends paho's network thread, and the session with it
            # (silently: `connected` still True, nothing delivered again); log it and drop the message
            log.exception("MQTT message on %s dropped: handling it failed", getattr(msg, "topic", "?"))

    def _on_presence(self, topic: str, payload: bytes) -> None:
        """(paho's thread) The controller says it is online or offline (or the message was cleared): telemetry is
        held while every controller that said where it is says offline, and what was held goes once one is back."""
        online = presence_online(payload)
        with self._lock:
            away = self._controller_away()
            if online is None:  # cleared: no controller says where it is here (nor waits to, after a reconnect)
                self._presence.pop(topic, None)
                self._presence_wait_until = None
            else:
                self._presence[topic], self._presence_seen, self._presence_wait_until = online, True, None
            if away and not self._controller_away():
                held = len(self._outbox)
                if self._online.is_set() and self._client is not None:
                    self._flush_outbox(self._client)
                log.info("MQTT: the fleet controller is online (%s)%s", topic,
                         f": {held} telemetry report(s) held meanwhile are sent" if held else "")
            elif not away and self._controller_away():
                log.warning("MQTT: the fleet controller says it is offline (%s): telemetry reports are held here (up "
                            "to mqtt.telemetry_buffer = %d) until it is back", topic, self.settings.telemetry_buffer)

    def _controller_away(self) -> bool:
        """(under the lock) Whether telemetry waits for the controller: every controller that said where it is says
        offline, or, after a reconnect, one said where it is before and has not said it again yet (at most
        PRESENCE_WAIT_S: a controller downgraded to one that never says, a presence cleared by hand)."""
        if self._presence:
            return not any(self._presence.values())
        return self._presence_wait_until is not None and time.monotonic() < self._presence_wait_until

    def _flush_outbox(self, client: paho.Client) -> None:
        """(under the lock) The held telemetry reports, oldest first."""
        while self._outbox:
            self._send_report(client, self._outbox.popleft())

    def _send_report(self, client: paho.Client, report: TelemetryReport) -> None:
        """(under the lock) Hand a report (and its histograms) to paho, and remember it until the broker has
        acknowledged it (`_reclaim_unacknowledged`)."""
        while self._sent_reports and all(_acknowledged(i) for i in self._sent_reports[0][1]):
            self._sent_reports.popleft()
        report, messages = self._telemetry_messages(report)
        self._reclaimed.discard(report.window_end)  # (put back again by the next reclaim if not acknowledged)
        infos = [self._send(client, out) for out in messages]
        if len(self._sent_reports) < SENT_REPORTS_KEPT:
            self._sent_reports.append((report, infos))

    def _drop_report(self, window_end: float) -> None:
        """The backstop found this held report unacknowledged at the end of every short connection (a broker that
        refuses it and closes the connection, over a packet limit it did not announce): dropped, and counted."""
        with self._lock:
            stuck = [r for r in self._outbox if r.window_end == window_end]
            for report in stuck:
                self._drop_held(report)
        if stuck:
            log.error("MQTT: the telemetry report of the window ending at %.3f was dropped: the broker took no "
                      "connection's copy of it", window_end)

    def _reclaim_unacknowledged(self, client: paho.Client) -> None:
        """(the connection ended, paho's thread stopped) Reports the broker had not acknowledged go back to the
        front of the buffer, out of paho's queue: paho would send them again by itself at the next CONNACK, before
        the controller's presence is known (a broker restarted without persistence: to nobody). From the buffer
        they go when the controller is there, as the held ones do. (Where paho keeps its queue elsewhere, it
        sends them again itself, as before.)"""
        out, mutex = getattr(client, "_out_messages", None), getattr(client, "_out_message_mutex", None)
        with self._lock:
            sent, self._sent_reports = self._sent_reports, deque()
            if out is None or mutex is None:
                return
            with mutex:
                # (a QoS 2 message once sent stays with paho, which finishes it under its id: sent again under
                # another, the broker kept the first unreleased in the session, against its quota, until it refused
                # every QoS 2 message: helper-167)
                back = [(report, infos) for report, infos in sent if not all(_acknowledged(i) for i in infos)
                        and not any(i is not None and _qos2_sent(out.get(i.mid)) for i in infos)]
                for _, infos in back:  # (the list made first: nothing leaves paho's queue without coming back here)
                    for info in infos:
                        if info is not None:
                            out.pop(info.mid, None)
            if back and self._held_at_end in {i.mid for i in back[0][1] if i is not None}:
                # the oldest message left unacknowledged was this report's: the backstop (`_supervise`) follows the
                # report across connections, where it goes out under another message id each time
                self._held_at_end = ("report", back[0][0].window_end)
            self._outbox.extendleft(reversed([report for report, _ in back]))
            self._reclaimed.update(report.window_end for report, _ in back)
            while len(self._outbox) > self.settings.telemetry_buffer:  # (as a full buffer drops: publish_telemetry)
                idle = next((r for r in self._outbox if _idle(r)), None)
                self._drop_held(idle if idle is not None else self._outbox[0])

    def _drop_held(self, report: TelemetryReport) -> None:
        """(under the lock) A held report out of the buffer, counted for the next report sent: with the losses it
        carried (a report sent once and put back by `_reclaim_unacknowledged` carries those before it)."""
        self._outbox.remove(report)
        self._reclaimed.discard(report.window_end)
        self._dropped_unreported += 1 + report.dropped_reports
        self.stats.dropped_reports += 1

    def _resolve(self, message: Message) -> bool:
        """Complete the pending request this response answers; False if none waits for it."""
        key = message.correlation_data.decode(errors="replace") if message.correlation_data else None
        if key is None:
            key = self._payload_field(message, "id")
        with self._pending_lock:
            future = self._pending.pop(key, None) if key else None
        if future is None or not future.set_running_or_notify_cancel():
            return False
        future.set_result(message)
        return True

    # -- wiring -----------------------------------------------------------------------------

    def _make_client(self, protocol: int) -> paho.Client:
        s = self.settings
        v5 = protocol == paho.MQTTv5
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                             clean_session=None if v5 else False, reconnect_on_failure=False)
        client.enable_logger(PAHO_LOG)
        client.connect_timeout = s.connect_timeout_s
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls is not None:
            client.tls_set(ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
                           certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                           keyfile=str(s.tls.key_file) if s.tls.key_file else None)
            client.tls_insecure_set(s.tls.insecure)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
        client.connect_async(s.host, s.port, s.keepalive_s,
                             clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)
        return client

    def start(self) -> "MqttSession":
        """Connect in the background; Connected arrives on the queue once the broker accepts."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name=f"mqtt-{self.client_id}", daemon=True)
            self._supervisor.start()
        return self

    # -- the supervisor: connect, serve until the connection ends, back off, again ------------
    #
    # Our own loop rather than paho's reconnect_delay_set: paho doubles the delay without jitter,
    # so a fleet would reconnect in lockstep after a broker restart; the fallback from MQTT 5 to
    # 3.1.1 needs a new paho Client (the protocol is fixed when one is made, and paho only
    # downgrades 3.1.1 to 3.1); the work after each CONNACK runs here, not in a callback; and
    # close() ends a backoff wait at once. Each connection still gets paho's own network thread
    # (loop_start), which is what makes publish() from other threads safe.

    def _supervise(self) -> None:
        failures = 0  # attempts failed since the last connection that was up
        short = 0  # connections in a row that ended soon after their CONNACK
        stuck, last_held = 0, None  # ... of them, in a row, that ended holding the same unacknowledged message
        while not self._stop.is_set():
            try:
                was_up, reason, retry_now = self._connect_once()
            except Exception as exc:  # refused, unreachable, TLS, or state_fn failed: reported, then retried
                was_up, reason, retry_now = False, f"{type(exc).__name__}: {exc}", False
                if type(exc).__name__ == "SSLCertVerificationError":  # the broker's certificate, checked here
                    reason += ("; check mqtt.tls.ca_file (the CA that signed the broker's certificate), that "
                               "mqtt.host is a name or address the certificate names, and the box's clock")
                if not isinstance(exc, OSError):
                    log.exception("MQTT connection attempt to %s:%s failed", self.settings.host, self.settings.port)
            if self._stop.is_set():
                break
            # a connection that ends soon after its CONNACK (another client with this client id taking the
            # session over, a broker that drops it) keeps backing off like a failed attempt
            lasted = time.monotonic() - self._up_since if was_up and self._up_since is not None else 0.0
            healthy = was_up and lasted >= max(self.settings.keepalive_s, MIN_HEALTHY_CONNECTION_S)
            failures = 0 if healthy else failures + 1
            short = 0 if healthy or not was_up else short + 1
            if was_up:  # a short connection that ended holding the message the one before ended holding
                held = self._held_at_end if not healthy else None
                stuck = 0 if held is None else stuck + 1 if held == last_held else 1  # (another one held: its first)
                last_held = held
            if short == 3 or "taken over" in str(reason).lower():
                log.error("MQTT: connections as client id %r keep ending soon after the broker accepts them: "
                          "another client may be taking this session over (two boxes with the same device.id, "
                          "e.g. a cloned image: set a unique device.id), or the broker keeps restarting or dropping "
                          "this client (the broker's log says which)", self.client_id)
            if stuck >= BACKSTOP_SHORT_CONNECTIONS and "taken over" not in str(reason).lower():
                # the backstop: a message the broker refuses (over a max_packet_size it did not announce, as MQTT
                # 3.1.1 brokers cannot) ends every connection, and paho sends its queued QoS 1 messages again
                # after each reconnect: the box would be off the broker for good. A new client has none queued.
                # Only when the same message was still unacknowledged at the end of each: a broker restarting
                # every few seconds acknowledges what was sent again, and its client keeps its queue
                log.error("MQTT: %d connections in a row ended soon after the broker accepted them, each with the "
                          "same message unacknowledged; a queued message the broker refuses is sent again at every "
                          "reconnect: the messages queued in the MQTT client (not yet acknowledged by the broker) "
                          "are dropped, and a new client connects", stuck)
                self.stats.client_resets += 1
                if isinstance(last_held, tuple):  # a telemetry report (`_reclaim_unacknowledged`): dropped too
                    self._drop_report(last_held[1])
                self._client, short, stuck, last_held = None, 0, 0, None
            delay = 0.0 if retry_now else backoff_delay(failures, self.settings.reconnect_min_delay_s,
                                                        self.settings.reconnect_max_delay_s, self._rng)
            log.warning("MQTT %s:%s: %s; retrying in %.2f s", self.settings.host, self.settings.port, reason, delay)
            self.events.put(Disconnected(reason, delay))
            self._stop.wait(delay)
        self.events.put(Disconnected("session closed", None))

    def _connect_once(self) -> tuple[bool, str, bool]:
        """One connection from CONNECT to its end: (it was up, why it ended, retry at once)."""
        if self._client is None or self._client_protocol != self._protocol:
            self._client, self._client_protocol = self._make_client(self._protocol), self._protocol
        client = self._client
        client.will_set(self._state_topic, _encode(self._state(online=False)), qos=self.settings.qos, retain=True)
        while not self._control.empty():  # signals of the previous connection
            self._control.get_nowait()
        if self._stop.is_set():  # close() came first (its "stop" signal may just have been drained)
            return False, "closing", False
        client.reconnect()  # TCP (+ TLS) and CONNECT; raises OSError when the broker is not there
        _no_delay(client)
        client.loop_start()
        try:
            signal = self._next_signal(self.settings.connect_timeout_s)
            if signal is None:
                client.disconnect()
                return False, f"no CONNACK within {self.settings.connect_timeout_s:g} s", False
            if signal[0] == "stop":
                client.disconnect()
                return False, "closing", False
            if signal[0] == "closed":  # no answer to CONNECT: a broker that does not speak this protocol closes
                # like that, and so does a proxy or load balancer with no broker behind it yet
                return False, f"{signal[1]} before CONNACK", self._refused_protocol("closed the connection before "
                                                                                    "its CONNACK")
            _, reason, session_present, losses = signal
            if reason.is_failure:
                self._next_signal(2.0)  # the broker closes the connection after a refusal
                retry_now = reason.value == UNSUPPORTED_PROTOCOL and self._refused_protocol("refused protocol")
                return False, f"broker refused the connection: {reason}", retry_now
            self._protocol_fixed = True
            self._up_since = time.monotonic()  # accepted: a connection that ends soon after is a short one
            subscribed, ended = self._subscribe_all(client)
            if ended is not None:  # (paho sends its queued messages right after the CONNACK: one the broker
                return True, ended, False  # refuses ends the connection before the SUBACK)
            self._after_connect(client, session_present, subscribed, losses)
            while True:
                signal = self._next_signal(None)
                if signal[0] == "closed":
                    return True, signal[1], False
                if signal[0] == "stop":
                    # close() has normally sent DISCONNECT already; if it found us not yet online,
                    # this one ends the connection (a second DISCONNECT does no harm)
                    client.disconnect()
                elif signal[0] == "suback":  # of a subscribe() made while online
                    for rc in signal[2]:
                        if rc.is_failure:
                            log.warning("MQTT broker refused a subscription: %s", rc)
        finally:
            client.loop_stop()
            self._held_at_end = _oldest_unacknowledged(client)
            self._reclaim_unacknowledged(client)

    def _next_signal(self, timeout: float | None) -> tuple | None:
        try:
            return self._control.get(timeout=timeout)
        except queue.Empty:
            return None

    def _refused_protocol(self, how: str) -> bool:
        """In auto mode before any success, switch protocol after a refusal; True when switched to 3.1.1."""
        if self._protocol_fixed:
            return False
        self._protocol = paho.MQTTv311 if self._protocol == paho.MQTTv5 else paho.MQTTv5
        tried = "3.1.1" if self._protocol == paho.MQTTv5 else "5"
        if how == "refused protocol":
            log.info("MQTT broker %s:%s refused protocol %s; trying %s", self.settings.host, self.settings.port,
                     tried, self.protocol)
        else:
            log.info("MQTT %s:%s %s with protocol %s (a broker that does not speak it, or no broker behind the "
                     "address yet); trying %s", self.settings.host, self.settings.port, how, tried, self.protocol)
        return self._protocol == paho.MQTTv311

    def _filters(self) -> list[str]:
        return list(self._subs) + [t for t in self._response_topics if t not in self._subs] + [
            t for t in self._presence_topics if t not in self._subs]

    def _subscribe_all(self, client: paho.Client) -> tuple[set[str], str | None]:
        """Subscribe to every registered filter and wait for the SUBACK, so that "connected" means
        "subscribed". Returns the filters sent, and why the connection ended if it did meanwhile."""
        with self._lock:
            filters = self._filters()
        if not filters:
            return set(), None
        _, mid = client.subscribe([(f, self.settings.qos) for f in filters])
        while True:
            signal = self._next_signal(self.settings.connect_timeout_s)
            if signal is None:
                log.warning("MQTT: no SUBACK within %g s; carrying on", self.settings.connect_timeout_s)
                return set(filters), None
            if signal[0] == "closed":
                return set(filters), signal[1]
            if signal[0] == "stop":
                client.disconnect()
            elif signal[0] == "suback" and signal[1] == mid:
                for f, rc in zip(filters, signal[2]):
                    if rc.is_failure:
                        log.warning("MQTT broker refused the subscription to %s: %s", f, rc)
                return set(filters), None

    def _after_connect(self, client: paho.Client, session_present: bool, subscribed: set[str], losses: int) -> None:
        """Publish the retained state, then what was held while offline, in order; then go online, unless the
        connection ended meanwhile (`losses`: the count of ended connections at its CONNACK): the flag set after
        paho's thread cleared it stayed set through the reconnect backoff, and publishes went to paho's unbounded
        queue instead of the bounded offline buffers."""
        qos = self.settings.qos
        with self._lock:
            late = [(f, qos) for f in self._filters() if f not in subscribed]  # added during the SUBACK wait
            if late:
                client.subscribe(late)
            self._send(client, _Outgoing(self._state_topic, _encode(self._state(online=True)), qos, True))
            while self._held:
                self._send(client, self._held.popleft())
            if not self._controller_away():
                self._flush_outbox(client)
            self.stats.connects += 1  # counted before anyone waiting for "connected" can read it
            self._online.set()
            if self._losses != losses:  # ended while the above ran (its "closed" signal is queued)
                self._online.clear()
        log.info("MQTT connected to %s:%s with protocol %s (session present: %s)", self.settings.host,
                 self.settings.port, self.protocol, session_present)
        self.events.put(Connected(self.protocol, session_present))

    def _send(self, client: paho.Client, out: _Outgoing) -> paho.MQTTMessageInfo | None:
        """Hand `out` to paho; None (logged, counted, not sent) when it is over the broker's maximum packet size:
        the broker would close the connection over it, and paho would send it again after every reconnect."""
        limit = self._max_packet
        if limit is not None:
            size = publish_packet_bytes(out.topic, out.payload, out.qos, mqtt5=self._client_protocol == paho.MQTTv5,
                                        response_topic=out.response_topic, correlation_data=out.correlation_data)
            if size > limit:
                self.stats.too_large += 1
                log.error("MQTT message to %s not sent: %d bytes, over the broker's maximum packet size of %d bytes "
                          "(its max_packet_size), which would close the connection; raise that limit", out.topic,
                          size, limit)
                return None
        properties = None
        if self._client_protocol == paho.MQTTv5 and (out.response_topic or out.correlation_data):
            properties = Properties(PacketTypes.PUBLISH)
            if out.response_topic:
                properties.ResponseTopic = out.response_topic
            if out.correlation_data:
                properties.CorrelationData = out.correlation_data
        info = client.publish(out.topic, out.payload, out.qos, out.retain, properties)
        if out.delivery is not None:
            out.delivery.info = info
        return info

    def _state(self, online: bool) -> ReportedState:
        return self.state_fn().model_copy(update={"online": online, "ts": time.time()})

    # -- public API -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    @property
    def controller_away(self) -> bool:
        """Whether telemetry is held for the fleet controller (it says it is offline; or, after a reconnect, it said
        where it is before and has not said it again yet)."""
        with self._lock:
            return self._controller_away()

    @property
    def controller_said(self) -> bool:
        """Whether a fleet controller said where it is (online or offline) in this run of the session."""
        with self._lock:
            return self._presence_seen

    @property
    def held_reports(self) -> int:
        """Telemetry reports held (offline, or the controller away), not sent yet."""
        with self._lock:
            return len(self._outbox)

    @property
    def protocol(self) -> str:
        """"5" or "3.1.1": the protocol of the current (or next) connection."""
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._online.wait(timeout)

    def subscribe(self, topic_filter: str, model: type[BaseModel] | None = None, *, max_bytes: int | None = None,
                  empty_ok: bool = False) -> None:
        """Subscribe now and after every reconnect; `get_event` decodes its messages as `model`.

        `empty_ok`: an empty payload (a cleared retained message) arrives as Received(payload=None)
        rather than as an error.
        """
        sub = _Subscription(topic_filter, model, max_bytes or self.settings.max_payload_bytes, empty_ok)
        with self._lock:
            self._subs[topic_filter] = sub
            if self._online.is_set():
                self._client.subscribe(topic_filter, self.settings.qos)

    def publish(self, topic: str, payload: BaseModel | bytes, qos: int | None = None, retain: bool = False, *,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                delivery: Delivery | None = None) -> paho.MQTTMessageInfo | None:
        """Publish now, or hold it (in order, up to `held_messages`) until the next connect: then None. A
        `delivery` given follows the message through the hold: its `delivered()` says when the broker has it."""
        out = _Outgoing(check_publish_topic(topic), _encode(payload), self.settings.qos if qos is None else qos,
                        retain, response_topic, correlation_data, delivery)
        with self._lock:
            if self._online.is_set():
                return self._send(self._client, out)
            if len(self._held) >= self.settings.held_messages:
                lost = self._held.popleft()
                self.stats.dropped_messages += 1
                log.warning("MQTT offline: hold of %d messages full, dropped the oldest (to %s)",
                            self.settings.held_messages, lost.topic)
            self._held.append(out)
            return None

    def publish_state(self) -> paho.MQTTMessageInfo | None:
        """Publish state_fn()'s state, retained; offline this is a no-op (every connect sends it)."""
        with self._lock:
            if not self._online.is_set():
                return None
            out = _Outgoing(self._state_topic, _encode(self._state(online=True)), self.settings.qos, True)
            return self._send(self._client, out)

    def publish_snapshot(self, topic: str, payload: BaseModel) -> bool:
        """Publish at QoS 0, not retained, if online; offline it is dropped, not held: a snapshot (DeviceHealth)
        that the next one replaces. Whether it was handed to the network."""
        with self._lock:
            if not self._online.is_set():
                return False
            self._send(self._client, _Outgoing(check_publish_topic(topic), _encode(payload), 0, False))
            return True

    def publish_telemetry(self, report: TelemetryReport) -> None:
        """Send a report, or buffer it while offline. An idle report (no request, no error) that follows an idle
        one of the same model in the buffer extends that one's window instead of taking a place, and a full buffer
        drops its oldest idle report, else its oldest: a long outage of an idle box filled the buffer with empty
        windows, and the ones that carried requests were dropped first."""
        with self._lock:
            if self._online.is_set() and not self._controller_away():
                self._flush_outbox(self._client)  # (held while the controller was away: the wait after a reconnect)
                self._send_report(self._client, report)
                return
            last = self._outbox[-1] if self._outbox else None
            # (not into a report sent once: the controller may have it, under the window it had then)
            if last is not None and _idle(last) and _idle(report) and last.window_end == report.window_start and \
                    (last.model_version, last.execution_path) == (report.model_version, report.execution_path) and \
                    last.window_end not in self._reclaimed:
                self._outbox[-1] = last.model_copy(update={"window_end": report.window_end})
                return
            if len(self._outbox) >= self.settings.telemetry_buffer:
                idle = next((r for r in self._outbox if _idle(r)), None)  # an empty window goes before one with data
                self._drop_held(idle if idle is not None else self._outbox[0])
            self._outbox.append(report)

    def _telemetry_messages(self, report: TelemetryReport) -> tuple[TelemetryReport, list[_Outgoing]]:
        """The report's histograms (where it has them) on the latency topic, then the report: a controller
        has a window's histograms by the time its report arrives. With the report as sent (the first after a loss
        carries the count)."""
        # the first report sent after a loss says how many were lost (not one sent once before: where the
        # controller stored that copy, it ignores this one, count and all)
        if self._dropped_unreported and report.window_end not in self._reclaimed:
            report = report.model_copy(update={"dropped_reports": report.dropped_reports + self._dropped_unreported})
            self._dropped_unreported = 0
        out = []
        if report._histograms is not None:
            histograms = report._histograms.model_copy(update={"window_end": report.window_end})
            out.append(_Outgoing(self._latency_topic, _encode(histograms), self.settings.qos, False))
        return report, out + [_Outgoing(self._telemetry_topic, _encode(report), self.settings.qos, False)]

    def get_event(self, timeout: float | None = None) -> Event | None:
        """The next event, payloads decoded; None after `timeout` seconds without one. Never raises
        for a bad payload: that comes as PayloadRejected (and is counted in `stats`)."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if not isinstance(event, Message):
            return event
        try:
            return Received(event, self.decode(event))
        except PayloadError as exc:
            return PayloadRejected(event, exc)

    def decode(self, message: Message) -> BaseModel | None:
        """The payload as its subscription's model (None for raw subscriptions); PayloadError if invalid."""
        with self._lock:
            subs = list(self._subs.values())
        sub = next((s for s in subs if paho.topic_matches_sub(s.topic_filter, message.topic)), None)
        if sub is None or sub.model is None or (sub.empty_ok and not message.payload):
            return None
        try:
            return parse_payload(sub.model, message.payload, sub.max_bytes, message.topic)
        except PayloadError as exc:
            self.stats.payload_errors += 1
            self.stats.last_payload_error = str(exc)
            log.warning("%s; it is not acted on%s", exc, " (an inference request gets a bad_request answer where "
                        "it names a response topic)" if message.topic.endswith("/infer/request") else "")
            raise

    def request(self, topic: str, request: BaseModel, *, response_topic: str) -> Future:
        """Send a request (a model with `id` and `reply_to`); the Future gets the response Message.

        The response is matched by MQTT 5 correlation data, or by the `id` in its payload. Use
        `future.result(timeout)`, and `future.cancel()` when giving up so that nothing is kept.
        """
        request_id = request.id
        request = request.model_copy(update={"reply_to": check_publish_topic(response_topic)})
        future: Future = Future()
        with self._pending_lock:
            self._pending[request_id] = future
        future.add_done_callback(lambda f: self._forget(request_id, f))
        with self._lock:
            if response_topic not in self._response_topics:
                self._response_topics.add(response_topic)
                if self._online.is_set():
                    self._client.subscribe(response_topic, self.settings.qos)
        self.publish(topic, request, response_topic=response_topic, correlation_data=request_id.encode())
        return future

    def _forget(self, request_id: str, future: Future) -> None:
        with self._pending_lock:
            if self._pending.get(request_id) is future:
                del self._pending[request_id]
        if future.cancelled():
            # given up while the broker was away (an OTA chunk request past ota.chunk_timeout_s): a request still
            # held would otherwise be sent at reconnect beside the one that replaced it, once per timeout
            correlation = request_id.encode()
            with self._lock:
                if any(m.correlation_data == correlation for m in self._held):
                    self._held = deque(m for m in self._held if m.correlation_data != correlation)

    def reply_target(self, message: Message) -> ReplyTarget | None:
        """Where and how to answer `message`: MQTT 5 properties first, then `reply_to`/`id` in the
        payload (read leniently, so that a malformed request can still get an error answer)."""
        topic = message.response_topic or self._payload_field(message, "reply_to")
        if topic is None:
            return None
        try:
            check_publish_topic(topic)
        except ValueError:
            return None
        request_id = self._payload_field(message, "id")
        correlation = message.correlation_data or (request_id.encode() if request_id else None)
        if request_id is None and correlation is not None:
            request_id = correlation.decode(errors="replace")
        return ReplyTarget(topic, correlation, request_id)

    def response_topic_problem(self, message: Message) -> str | None:
        """Why the response topic `message` names (MQTT 5 property, else `reply_to`) cannot be published to;
        None when it can or when it names none."""
        topic = message.response_topic or self._payload_field(message, "reply_to")
        try:
            check_publish_topic(topic) if topic is not None else None
        except ValueError as exc:
            return str(exc)
        return None

    def respond(self, request: Message, response: BaseModel | bytes) -> paho.MQTTMessageInfo | None:
        """Publish `response` where `request` asked for it, with its correlation data."""
        target = self.reply_target(request)
        if target is None:
            raise PayloadError(request.topic, "the request names no response topic (neither the MQTT 5 "
                                              "property nor reply_to in the payload); no answer is sent")
        return self.publish(target.topic, response, correlation_data=target.correlation_data)

    def answer_over_limit(self, request: Message, response: BaseModel | bytes) -> tuple[int, int] | None:
        """(the answer's packet bytes, the broker's maximum packet size) when the answer to `request` would be over
        it (it would be logged and dropped, and the requester would hear nothing), else None."""
        target, limit = self.reply_target(request), self._max_packet
        if target is None or limit is None:
            return None
        size = publish_packet_bytes(target.topic, _encode(response), self.settings.qos,
                                    mqtt5=self._client_protocol == paho.MQTTv5,
                                    correlation_data=target.correlation_data)
        return (size, limit) if size > limit else None

    def _payload_field(self, message: Message, name: str) -> str | None:
        if not message.payload or len(message.payload) > self.settings.max_payload_bytes:
            return None
        try:
            data = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past Python's limit
            return None
        value = data.get(name) if isinstance(data, dict) else None
        return value if isinstance(value, str) and value else None

    def _publish_offline_state(self, client: paho.Client, timeout: float) -> bool:
        """Publish the retained offline state and wait for its PUBACK; False if it did not come."""
        info = self._send(client, _Outgoing(self._state_topic, _encode(self._state(online=False)),
                                            self.settings.qos, True))
        if info is None:  # over the broker's maximum packet size (logged): the Will says offline instead
            return False
        try:
            info.wait_for_publish(timeout)
            if info.is_published():
                return True
            problem = f"no PUBACK within {timeout:g} s"
        except (RuntimeError, ValueError) as exc:  # paho: not connected, or its queue is full
            problem = str(exc)
        log.warning("MQTT: offline state not confirmed (%s); disconnecting with the Will instead", problem)
        return False

    def close(self, publish_offline: bool = True, timeout: float = 5.0) -> None:
        """Publish the retained offline state (unless told not to), disconnect, stop the threads."""
        if self._stop.is_set():
            return
        self._stop.set()
        client = self._client
        with self._lock:
            online = self._online.is_set()
        if online:
            reason = None
            if publish_offline and not self._publish_offline_state(client, timeout):
                if self._client_protocol == paho.MQTTv5:  # then the broker still says offline
                    reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            client.disconnect(reasoncode=reason)
        self._control.put(("stop",))
        if self._supervisor is not None:
            self._supervisor.join(timeout)
            if self._supervisor.is_alive():
                log.warning("MQTT supervisor thread did not stop within %.1f s", timeout)
        with self._pending_lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            future.cancel()
