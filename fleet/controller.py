"""The fleet controller: the other end of the agents' topics.

    FleetController(settings).start()   subscribe to every device's state, telemetry, OTA status
                                        and chunk requests; keep the registry and latency store
    .offer(device, bundle_dir, ...)     publish a signed offer (retained) and serve its chunks
    .set_desired(device, settings)      publish a desired config (retained, versioned)
    .clear_retained(fleet, device)      clear a removed device's retained desired config and offer

paho callbacks only parse and store. Every device message is read as what its topic says
(`PAYLOAD_LIMITS` caps its size; ReportedState, TelemetryReport, `OtaStatus`, ChunkRequest check
its shape) and must name the device of its topic; anything else, and any error while handling it,
is counted (`rejected_messages`), logged with the device and topic, and dropped: paho's network
thread never sees an exception (one that escaped would stop it for good while the connection
stays up, and a retained message would do it again to every restarted controller). /healthz
fails if that thread or the telemetry writer is gone anyway.

The chunk server answers on the requesting device's own `ota/chunk/response` topic, whatever
response topic the request names, and only for an update that was offered to that device (the
offers table, so offers made by another process, `edgeglm fleet offer`, are served too); it
cuts chunks at the manifest's size (ota/transfer.py) and answers at most `chunk_requests_per_s`
requests of one device per second (the rest are dropped and counted; the agent asks again).

Telemetry, the one high-rate stream, does not touch SQLite on paho's network thread: the callback
parses it and puts a row on a queue; a writer thread takes everything queued and stores it in one
transaction (many rows per commit under load, one at a time when idle), and prunes rows past the
retention once a minute. Measured with benchmarks/fleet_scale.py (docs/scaling.md).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import AgentError, PayloadError
from agent.topics import (DesiredConfig, DeviceHealth, LatencyHistograms, ReportedState, TelemetryReport,
                          broker_packet_limit, chunk_response_topic, controller_presence_topic,
                          controller_subscriptions, desired_topic, ota_offer_topic, presence_payload,
                          publish_packet_bytes, split_topic, state_topic)
from agent.metrics import format_value
from fleet.store import SILENT_AFTER_S, LatencyRow, Store, latency_row, state_run, telemetry_row, with_gap
from ota.bundle import open_bundle
from ota.errors import BundleError
from ota.fsutil import FileKeyedCache
from ota.offers import make_offer
from ota.signing import read_signature
from ota.transfer import CANNOT_SERVE, MAX_CHUNK_SIZE, OFFER_MAX_BYTES, ChunkRequest, ChunkResponse, ChunkSource
from ota.update import ROLLBACK_FORMAT, RollbackTerms

log = logging.getLogger("edgeglm.fleet")
# the largest payload read on each device topic; anything bigger is dropped unread
PAYLOAD_LIMITS = {"state": 256 * 1024, "telemetry": 64 * 1024, "latency": 64 * 1024, "health": 8 * 1024,
                  "ota/status": 64 * 1024, "ota/chunk/request": 8 * 1024}
HEALTH_FLUSH_S = 1.0  # device health snapshots wait at most this long for the writer's next telemetry batch
MAX_BATCH = 5000  # telemetry rows per transaction
# a device's latency histograms wait (in paho's thread, in memory) for the telemetry report of their window, which
# its agent sends right after them; at most this many per device (the oldest goes): one that never finds its report
# (a device sending histograms of windows it does not report) is never stored
PENDING_HISTOGRAMS = 4
PRUNE_EVERY_S = 60.0
STORE_FAILURE_LOG_S = 60.0  # a database refusing writes is logged once per this
# a report that starts this soon after its agent's run did (by the device's clock) is the run's first window: no
# gap before it (an agent's first window starts as its run does: within microseconds since 2026-11-29, after its
# hardware probe before, a second or more on a small board)
PRESENCE_PUBLISH_S = 2.0  # how long a stopping controller waits for the broker to take its "offline"
RUN_START_SLACK_S = 5.0
STATE_ASK_AGAIN_S = 60.0  # how often the state of a device that reports but is not registered is asked for
STATE_ASKS_MAX = 3  # and how many times at most (a state this controller refuses would come back every minute)
ASKED_STATE_SUBSCRIPTION = 1  # MQTT 5 subscription identifier of a state topic subscribed alone
# and of the fleet's own filters: one per fleet served ("+" too), so that a filter a kept session holds from a run
# that served another fleet under the same client id is told apart (it may overlap ours: "+" and one fleet)
SUBSCRIPTION_ID_MAX = 268_435_455
OFFERED_CHECK_S = 30.0  # how long the chunk server trusts the offers table's answer for one device and update
OFFERED_KEPT = 4096  # (update, device) answers kept; more are asked of the table again
UNSERVABLE_LOG_S = 600.0  # a bundle directory that cannot be served is logged again after this, with a count
PUBLISH_TIMEOUT_S = 10.0  # how long a command waits for the broker to acknowledge a retained message


Word = Annotated[str, Field(max_length=32, pattern=r"^[a-z][a-z_]*$")]  # a state, event or result name


class OtaStatus(BaseModel):
    """What an agent's updater reports on `ota/status` (ota/update.py `Updater._report`), as the
    controller reads it: a JSON object whose known fields are type-checked; unknown fields are dropped
    (not stored), and state names are checked for shape only, so that a newer agent's report still
    counts (a rollout waits for its `result`)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    update_id: str | None = Field(None, min_length=1, max_length=128)
    ts: float
    state: Word
    event: Word | None = None
    from_: Word | None = Field(None, alias="from")
    reason: str | None = Field(None, max_length=8192)
    progress: float | None = Field(None, ge=0, le=100)
    self_test: dict[str, Any] | None = None
    result: Word | None = None  # committed, rolled_back, failed
    active_slot: Word | None = None
    history: list[Word] | None = Field(None, max_length=4096)

    def body(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class _RateLimit:
    """A token bucket per key: `rate` per second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._buckets: dict[Any, tuple[float, float]] = {}

    def allow(self, key, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, section by section (a value that is not a table replaces the old one; None takes the
    key out: `config set KEY=null` drops one setting the fleet set, e.g. one a box refused)."""
    out = dict(base)
    for key, value in update.items():
        if value is None:
            out.pop(key, None)
            continue
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return {k: v for k, v in out.items() if v != {}}  # a section left empty goes too


def offerable_bundle(bundle_dir: str | Path):
    """The bundle at `bundle_dir` if the controller may offer it, else a BundleError/SignatureError:
    every file matches its manifest and manifest.sig is there (the agents verify it against their
    trusted keys). `offer`, `edgeglm fleet offer` and `edgeglm fleet rollout` all check this."""
    bundle = open_bundle(bundle_dir, chunks=True)  # never files that fail their manifest, whole or by chunk
    read_signature(bundle.root)  # nor an unsigned bundle, which no agent would activate
    bundle.check_complete()  # nor files beside it that the manifest does not list (they would not be sent)
    if bundle.manifest.chunk_size > MAX_CHUNK_SIZE:  # nor one whose chunks do not fit in a message
        raise BundleError(f"{bundle.root}: chunk_size {bundle.manifest.chunk_size} is over the {MAX_CHUNK_SIZE} "
                          f"bytes the chunk server sends in one MQTT message; export the bundle with a smaller "
                          f"chunk size")
    offer_bytes = 4 * -(-len(bundle.manifest_bytes) // 3) + 4096  # the manifest in base64, and the rest
    if offer_bytes > OFFER_MAX_BYTES:  # nor one whose offer (the whole manifest) is over what agents take
        chunks = sum(len(f.chunks) for f in bundle.manifest.files)
        bigger = "re-export it with --chunk-kib 512" if bundle.manifest.chunk_size < MAX_CHUNK_SIZE else \
            "split the model or raise the broker's and agents' limits together"
        raise BundleError(f"{bundle.root}: its offer would be about {offer_bytes} bytes ({chunks} transfer chunks "
                          f"of {bundle.manifest.chunk_size // 1024} KiB listed in the manifest), over the "
                          f"{OFFER_MAX_BYTES} bytes an agent takes in one MQTT message; {bigger}")
    return bundle


@dataclass
class ControllerSettings:
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    db: Path = Path("fleet.db")
    fleet: str = "+"  # "+" = every fleet on the broker
    client_id: str = "edgeglm-controller"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    protocol: str = "5"
    # QoS of the telemetry (and latency histogram) subscription. Devices publish at QoS 1 (the broker holds a
    # report until it has it); at QoS 1 on the broker -> controller leg too, with the persistent session below,
    # the broker queues what devices send while the controller is away (its restart, a broker restart with
    # persistence) and delivers it when it is back. Mosquitto lets a QoS 1 subscriber have only
    # max_inflight_messages (20) unacknowledged messages: a controller descheduled for a moment stalled the
    # whole stream at 1000 devices; an MQTT 5 controller raises its own window (receive_maximum). 0: what
    # devices send while the controller is away is lost (docs/scaling.md)
    telemetry_qos: int = 1
    # the broker keeps the controller's session (its subscriptions and the QoS 1 messages queued for it) this
    # long after it disconnects; 0 ends it with the connection (MQTT 3.1.1: clean session; the broker's
    # persistent_client_expiration then bounds a kept one)
    session_expiry_s: int = 3600
    # MQTT 5: QoS 1 messages the broker may send the controller before it acknowledges one (a broker caps
    # it at its own max_inflight_messages only for MQTT 3.1.1 clients)
    receive_maximum: int = 1000
    # chunk requests answered per device and second (bursts up to chunk_burst); the rest are dropped and
    # counted (chunk_requests_limited): the agent asks again after ota.chunk_timeout_s. One agent keeps one
    # request in flight, about 170 chunks/s on loopback (docs/performance.md)
    chunk_requests_per_s: float = 400.0
    chunk_burst: int = 400
    retention_s: float = 7 * 86400.0  # telemetry kept ([database] retention_s)
    silent_after_s: float = SILENT_AFTER_S  # a device heard nothing from this long counts offline ([fleet])
    # False: publish only (the CLI's offer / config set / rollback): no subscriptions, so a short command
    # neither stores every device's retained status again nor answers chunk requests meant for `fleet serve`
    listen: bool = True


def served_subscription_id(fleet: str) -> int:
    """The MQTT 5 subscription identifier of the filters of `fleet` ("+": every fleet's): 2 .. SUBSCRIPTION_ID_MAX."""
    return 2 + zlib.crc32(fleet.encode()) % (SUBSCRIPTION_ID_MAX - 1)


def subscription_ids(msg) -> list[int]:
    """The MQTT 5 subscription identifiers a message came with (none over MQTT 3.1.1, or through a filter without)."""
    return getattr(getattr(msg, "properties", None), "SubscriptionIdentifier", None) or []


class WithHistograms(tuple):
    """(LatencyRow, telemetry row): a report and its window's histograms, one item of the writer's queue."""

    def __new__(cls, row: tuple, histograms: LatencyRow):
        return super().__new__(cls, (histograms, row))


class Delivered(tuple):
    """(item, (mid, connection)): a queued report with the QoS 1 delivery the writer acknowledges once it is
    stored."""

    def __new__(cls, item, delivery: tuple[int, int]):
        return super().__new__(cls, (item, delivery))

    item = property(lambda self: self[0])
    delivery = property(lambda self: self[1])


class FleetController:
    def __init__(self, settings: ControllerSettings):
        self.settings = settings
        self.store = Store(settings.db, settings.retention_s)
        self.store.silent_after_s = settings.silent_after_s
        self.chunks = ChunkSource()
        self.connected = threading.Event()
        self._ids_lock, self._last_id_us = threading.Lock(), 0
        protocol = paho.MQTTv311 if settings.protocol == "3.1.1" else paho.MQTTv5
        # `fleet serve` keeps its broker session across reconnects and restarts (session_expiry_s); a command
        # (listen = False) starts a clean one and leaves none behind
        self._keeps_session = settings.listen and settings.session_expiry_s > 0
        # a report is acknowledged to the broker once it is stored (the telemetry writer acks it), not when paho
        # has handed it over: one only in the writer's queue at a crash (a slow disk, a SIGKILL) is sent again
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=protocol,
                                  clean_session=not self._keeps_session if protocol == paho.MQTTv311 else None,
                                  manual_ack=settings.listen)
        self._connection = 0  # counts the connections: an ack is for the connection that delivered the message
        self._ack_now = True  # (paho's thread) False once _handle handed the message's ack to the writer
        self._delivery: tuple[int, int] | None = None  # (paho's thread) (mid, connection) of a QoS 1 message
        self._served_id = served_subscription_id(settings.fleet)
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.ca_file:
            try:
                self.client.tls_set(ca_certs=settings.ca_file)
            except OSError as exc:  # (ssl.SSLError too) a missing file, or one that holds no CA certificate
                why = f"{exc.library}: {exc.reason}" if getattr(exc, "reason", None) else (exc.strerror or str(exc))
                raise ConnectionError(f"mqtt.tls.ca_file = {settings.ca_file}: cannot be used as the broker's CA "
                                      f"certificate ({why}); the controller cannot connect over TLS without it") \
                    from None
        # `fleet serve` says it is online (retained) once its subscriptions are in place, and offline when it stops
        # or (its Will, published by the broker) when its connection is lost: agents hold their telemetry while it
        # is away instead of publishing into a session the broker may not keep (agent.mqtt, docs/mqtt.md)
        self._presence_topic = controller_presence_topic(settings.fleet) if settings.listen else None
        self._subscribe_mid: int | None = None  # the SUBSCRIBE of the served topics, whose SUBACK says online
        if self._presence_topic:
            self.client.will_set(self._presence_topic, presence_payload(False), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self._lost_at: float | None = None  # monotonic time the broker connection was lost, while it is
        self._stopping = False
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 30)
        self._telemetry: queue.SimpleQueue = queue.SimpleQueue()
        self._refused: str | None = None  # the broker's reason when it refused the last connection
        # the largest packet the broker takes (its CONNACK's Maximum Packet Size; None: it said none): a larger one
        # gets the connection closed, and paho sends a QoS 1 message again after each reconnect, for good
        self.max_packet: int | None = None
        self._too_large_logged: OrderedDict[str, None] = OrderedDict()  # update ids whose chunks were over it
        # bundle directories that cannot be served: (when last logged, the devices that asked since)
        self._unservable: OrderedDict[Path, tuple[float, set]] = OrderedDict()
        # the latest DeviceHealth of each device not yet stored (a newer one replaces it): written by the writer
        self._health: dict[tuple[str, str], dict] = {}
        self._health_lock = threading.Lock()
        # (fleet, device) -> {window_end: (LatencyRow, TTFT count)} waiting for their report (paho's thread only)
        self._pending_histograms: dict[tuple[str, str], dict[float, tuple[LatencyRow, int]]] = {}
        # (paho's thread only) (fleet, device) -> the run its agent's last state named (store.state_run), and ->
        # (the latest window_end of its reports, the run then): what `_with_gap` compares each report with
        self._runs: dict[tuple[str, str], tuple[str, float] | None] = {}
        self._last_window: dict[tuple[str, str], tuple[float, tuple[str, float] | None]] = {}
        self._writer = threading.Thread(target=self._write_telemetry, name="fleet-telemetry-writer", daemon=True)
        self._chunk_limit = _RateLimit(settings.chunk_requests_per_s, settings.chunk_burst)
        self._limited_logged: dict[tuple[str, str], float] = {}
        # the devices in the registry (None: not read yet), and those whose state was asked for again: a device
        # heard from (telemetry, health, OTA status) but not registered lost its state to the broker's queue limit
        # (a fleet connecting at once, the controller's retained states after a restart): it is asked for again
        self._registered: set[tuple[str, str]] | None = None
        self._asked_state: dict[tuple[str, str], list] = {}  # -> [when asked last, times asked, still subscribed]
        self._left_fleets: set[str] = set()  # fleets whose subscriptions from an earlier run were dropped
        # (update, fleet, device) -> (bundle, when checked): the offers table's answer, kept OFFERED_CHECK_S and for
        # the OFFERED_KEPT most recent only (a rollout makes one update id per device; a removal is seen in time)
        self._offered: OrderedDict[tuple[str, str, str], tuple[Path, float]] = OrderedDict()
        self._offered_lock = threading.Lock()
        # bundle directory -> (its files' sizes and mtimes, the checked bundle): `_offerable`
        self._checked = FileKeyedCache(CHECKED_KEPT)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "FleetController":
        """Connect and subscribe; returns once the broker has acknowledged the subscriptions, so
        everything devices publish from then on reaches the controller."""
        where = f"{self.settings.broker_host}:{self.settings.broker_port}"
        try:  # the first connection at once, so that a refused port, a wrong name or a TLS failure says why
            if self.settings.protocol == "3.1.1":
                self.client.connect(self.settings.broker_host, self.settings.broker_port)
            else:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.settings.session_expiry_s if self._keeps_session else 0
                if self.settings.listen:
                    props.ReceiveMaximum = self.settings.receive_maximum
                # never a clean start where the session is kept: paho's default cleans at the first connect,
                # which would throw away what the broker queued while this controller was away
                self.client.connect(self.settings.broker_host, self.settings.broker_port,
                                    clean_start=not self._keeps_session, properties=props)
        except (OSError, ValueError) as exc:  # (ssl.SSLError and socket.gaierror are OSErrors)
            self._abandon()
            why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise ConnectionError(f"cannot connect to the broker {where}: {why}") from None
        self._writer.start()
        self.client.loop_start()  # from here paho reconnects by itself
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            refused = self._refused
            if refused is not None or time.monotonic() > deadline:
                self._abandon()
                if refused is not None:
                    hint = "" if "authori" not in refused.lower() and "password" not in refused.lower() else \
                        "; check the MQTT username and password ([mqtt] username and password or password_file of " \
                        "the fleet config)" if self.settings.username else \
                        "; no MQTT username is set ([mqtt] username of the fleet config) and the broker wants one"
                    raise ConnectionError(f"the broker {where} refused the connection: {refused}{hint}")
                raise ConnectionError(f"no answer from the broker {where} within {timeout:g} s"
                                      + (" (connection and subscriptions)" if self.settings.listen else ""))
        return self

    def _abandon(self) -> None:
        """A start that failed: nothing left running or open (the database's -wal/-shm files go with it)."""
        self._stopping = True
        self.client.loop_stop()
        self.client.disconnect()
        if self._writer.is_alive():
            self._telemetry.put(None)
            self._writer.join(30)
        self.store.close()

    def stop(self) -> None:
        self._stopping = True
        # state topics still asked for alone go, not kept in the session for the next run (MQTT 5 tells their
        # messages apart anyway: _state_answered)
        asked = [state_topic(f, d) for (f, d), entry in list(self._asked_state.items()) if entry[2]]
        if asked and self.client.is_connected():
            self.client.unsubscribe(asked)
        if self._presence_topic and self.client.is_connected():  # agents hold their telemetry from now on
            info = self.client.publish(self._presence_topic, presence_payload(False), qos=1, retain=True)
            try:
                info.wait_for_publish(PRESENCE_PUBLISH_S)
            except (RuntimeError, ValueError):  # the connection went meanwhile: the broker publishes the Will
                pass
        if self._writer.is_alive():  # what is queued before it is still written, and acknowledged while connected
            self._telemetry.put(None)  # (a report that comes after it is not: the broker keeps it for the next start)
            self._writer.join(30)
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): connected to the broker, with paho's network thread and the telemetry
        writer running. A network thread that died (an exception in a callback) leaves the connection
        open, so `client.is_connected()` alone would still say yes while nothing is processed."""
        loop = getattr(self.client, "_thread", None)  # paho's loop_start thread (None once stopped)
        if loop is None or not loop.is_alive():
            return False, "MQTT network thread stopped"
        if not self._writer.is_alive():
            return False, "telemetry writer stopped"
        if not self.client.is_connected():
            return False, "broker down"
        return True, "ok"

    @property
    def queued_telemetry(self) -> int:
        """Reports received and not yet stored."""
        return self._telemetry.qsize()

    def _write_telemetry(self) -> None:
        last_prune = 0.0
        while True:
            try:
                rows, done = [self._telemetry.get(timeout=HEALTH_FLUSH_S)], False
            except queue.Empty:  # device health waiting with no telemetry coming: written now
                rows, done = [], False
            while len(rows) < MAX_BATCH:
                try:
                    rows.append(self._telemetry.get_nowait())
                except queue.Empty:
                    break
            if None in rows:
                rows, done = [r for r in rows if r is not None], True
            deliveries = [r.delivery for r in rows if isinstance(r, Delivered)]
            rows = [r.item if isinstance(r, Delivered) else r for r in rows]
            rows = [part for r in rows for part in (r if isinstance(r, WithHistograms) else (r,))]
            try:
                self._store_health()
                if rows:
                    self._store_rows(rows)
            except sqlite3.OperationalError as exc:  # a full disk must not kill the writer; the rows are lost
                self._store_failed(len(rows), exc)
            except Exception:  # (anything else: with its traceback)
                log.exception("telemetry batch of %d report(s) not stored", len(rows))
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                try:
                    self.store.prune()
                    self.store.roll_up()  # (fleet status and /metrics read the rollups of whole spans: store.py)
                except Exception as exc:  # tried again in a minute; the reads fall back on the reports meanwhile
                    log.warning("retention or rollup of the fleet database failed: %s: %s", type(exc).__name__, exc)
            # stored (or refused by the database, logged): the broker may forget them now
            for delivery in deliveries:
                self._ack(delivery)
            if done:
                return

    def _store_failed(self, rows: int, exc: sqlite3.OperationalError) -> None:
        """(the writer) One line per STORE_FAILURE_LOG_S for a database that refuses writes (a full disk, a
        read-only or vanished volume), with the free space: a traceback per batch (one a second) filled the log."""
        self._lost_rows = getattr(self, "_lost_rows", 0) + rows
        last = getattr(self, "_store_failure_logged", None)
        if last is not None and time.monotonic() - last < STORE_FAILURE_LOG_S:
            return
        self._store_failure_logged = time.monotonic()
        try:
            free = f"{shutil.disk_usage(self.store.path.parent).free / 1e6:.0f} MB free there"
        except OSError as err:
            free = f"its directory cannot be read: {err.strerror or err}"
        log.error("the fleet database %s refuses writes (%s; %s): %d telemetry report(s) and health snapshot(s) "
                  "lost since the last such line; free space on its volume (or raise it: docs/scaling.md, "
                  "\"Database size\"), or shorten [database] retention_s", self.store.path, exc, free,
                  self._lost_rows)
        self._lost_rows = 0

    def _ack(self, delivery: tuple[int, int]) -> None:
        """Acknowledge a QoS 1 message to the broker (PUBACK), unless it came on an earlier connection: that one
        the broker sends again on this one (a copy the store drops)."""
        mid, connection = delivery
        if connection == self._connection:
            try:
                self.client.ack(mid, 1)
            except Exception as exc:  # (paho queues it; nothing expected) the broker sends it again: dropped then
                log.debug("ack of message %s not sent: %s", mid, exc)

    def _store_health(self) -> None:
        with self._health_lock:
            snapshots, self._health = self._health, {}
        if snapshots:
            try:
                self.store.put_health([(fleet, h) for (fleet, _), h in snapshots.items()])
            except Exception as exc:  # as telemetry: logged, and the next snapshots come anyway
                log.warning("health of %d device(s) not stored: %s", len(snapshots), exc)

    def _store_rows(self, rows: list[tuple]) -> None:
        """One transaction; if it fails, row by row, so that one row the database refuses costs only itself.
        Latency histograms (LatencyRow) first, in their own transaction: a window's report finds them stored."""
        histograms = [r for r in rows if isinstance(r, LatencyRow)]
        if histograms:
            rows = [r for r in rows if not isinstance(r, LatencyRow)]
            try:
                self.store.add_latency_many(histograms)
            except Exception as exc:  # the reports are stored anyway: their windows' percentiles are means then
                log.warning("latency histograms of %d window(s) not stored: %s", len(histograms), exc)
            if not rows:
                return
        try:
            self.store.add_telemetry_many(rows)
            self._log_returned()
            return
        except Exception:
            if len(rows) == 1:
                raise
        for row in rows:
            try:
                self.store.add_telemetry_many([row])
                self._log_returned()
            except Exception as exc:
                log.warning("telemetry report of device %s (fleet %s) not stored: %s", row[1], row[0], exc)

    def _log_returned(self) -> None:
        for fleet, device in self.store.returned:
            log.warning("device %s (fleet %s) was removed but its agent still sends telemetry: registered again "
                        "with the state it had when it was removed (stop its agent and revoke its broker "
                        "credentials to keep it out)", device, fleet)

    # --- callbacks: parse, store, count -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        where = f"{self.settings.broker_host}:{self.settings.broker_port}"
        if reason_code.is_failure:
            if self.connected.is_set() and self._refused is None:  # (at the start, start() says it: once is enough)
                log.warning("the broker %s refused the connection: %s", where, reason_code)
            self._refused = str(reason_code)
            return
        self.max_packet = broker_packet_limit(properties) if self.settings.protocol != "3.1.1" else None
        resumed = self._keeps_session and flags.session_present
        self._connection += 1
        if self._lost_at is not None:
            log.info("connected to the broker %s again after %.0f s%s", where, time.monotonic() - self._lost_at,
                     ("; it kept this controller's session: what devices sent meanwhile comes now" if
                      self.settings.telemetry_qos else "; it kept this controller's session: states and OTA "
                      "statuses sent meanwhile come now, telemetry (telemetry_qos = 0) does not") if resumed else
                     "" if not self._keeps_session else "; it did not keep this controller's session (a broker "
                     "restarted without persistence, the session's expiry passed, or another client connected "
                     "with its client id and a clean session): what devices sent meanwhile is lost")
            self._lost_at = None
        elif resumed and not self.connected.is_set():
            log.info("the broker %s kept this controller's session (client id %s): %s", where,
                     self.settings.client_id, "what devices sent while it was away comes now" if
                     self.settings.telemetry_qos else "the states and OTA statuses devices sent while it was away "
                     "come now, not their telemetry (telemetry_qos = 0)")
        self._refused = None
        if not self.settings.listen:
            self.connected.set()
            return
        # one SUBSCRIBE for every topic filter, so that its SUBACK (_on_subscribe) means all are in place;
        # telemetry at the settings' QoS (default 1): see ControllerSettings.telemetry_qos
        props = None
        if self.settings.protocol != "3.1.1":  # what comes through these filters says so (_from_leftover_filter)
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = self._served_id
        _, self._subscribe_mid = client.subscribe(
            [(topic, self.settings.telemetry_qos if topic.endswith(("/telemetry", "/latency")) else
              0 if topic.endswith("/health") else 1) for topic in controller_subscriptions(self.settings.fleet)],
            properties=props)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        """Once per loss: the log says the broker went away and (in _on_connect) when it is back; paho reconnects."""
        if self._stopping or self._lost_at is not None or not self.connected.is_set():
            return
        self._lost_at = time.monotonic()
        kept = ("the broker queues what devices send meanwhile for this controller's session (if the broker "
                "restarts, only a broker with persistence keeps it)" if self._keeps_session and
                self.settings.telemetry_qos else "what devices publish meanwhile is not delivered to it: telemetry "
                "of that time is lost; retained states and OTA statuses come again")
        log.warning("lost the broker %s:%s (%s); reconnecting (%s). Client id %s: a second client connecting with "
                    "it takes this session over (another `fleet serve` with the same [mqtt] client_id)",
                    self.settings.broker_host, self.settings.broker_port, reason_code, kept,
                    self.settings.client_id)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [t for t, rc in zip(controller_subscriptions(self.settings.fleet), reason_codes) if rc.is_failure]
        if refused:
            log.warning("broker refused the controller's subscription(s) to %s", ", ".join(refused))
        if self._presence_topic and mid == self._subscribe_mid:  # what devices send from now on reaches it
            client.publish(self._presence_topic, presence_payload(True), qos=1, retain=True)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        # paho's network thread: nothing may escape (see the module docstring)
        self._delivery = (msg.mid, self._connection) if msg.qos and self.settings.listen else None
        self._ack_now = True
        try:
            if not self._from_leftover_filter(msg):
                self._handle(msg)
        except Exception as exc:
            self._reject(msg.topic, exc)
        finally:
            if msg.topic.endswith("/state"):
                asked = ASKED_STATE_SUBSCRIPTION in subscription_ids(msg)  # (MQTT 5: a state topic subscribed alone)
                if asked or self._asked_state:
                    self._state_answered(msg.topic, asked)
            # handled here (a state, a status, a chunk request, latency histograms waiting for their report, a
            # message refused): acknowledged now; a report is acknowledged by the writer once stored
            if self._delivery is not None and self._ack_now:
                self._ack(self._delivery)

    def _state_answered(self, topic: str, asked_subscription: bool = False) -> None:
        """A state came on a topic asked for alone (taken or not: a state this controller refuses, a cleared
        one): that subscription has done its job. One that came through such a subscription this run did not
        make (the broker kept the session of a controller stopped before its answer came, or an unsubscribe
        was lost with the connection) goes too: it would deliver each state of the device twice, for good."""
        try:
            fleet, device, _ = split_topic(topic)
        except ValueError:
            return
        entry = self._asked_state.get((fleet, device))
        if entry is not None and entry[2]:
            entry[2] = False
            self.client.unsubscribe(topic)
        elif asked_subscription:
            self.client.unsubscribe(topic)

    def _reject(self, topic: str, exc: Exception) -> None:
        try:
            fleet, device, rest = split_topic(topic)
            source = f"device {device} (fleet {fleet}) on {rest}"
        except ValueError:
            source = f"topic {topic!r}"
        expected = isinstance(exc, (ValueError, ValidationError, PayloadError, UnicodeDecodeError))
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if expected:
            log.warning("message from %s dropped: %s", source, text[:500])
        else:  # a bug or the database: the message is dropped, the controller goes on
            log.error("message from %s dropped: %s: %s", source, type(exc).__name__, text[:500], exc_info=exc)
        try:
            self.store.count("rejected_messages")
        except Exception:
            log.exception("rejected_messages not counted")

    def _handle(self, msg) -> None:
        fleet, device, rest = split_topic(msg.topic)
        if self.settings.fleet != "+" and fleet != self.settings.fleet:
            self._leave_fleet(fleet)
            return
        limit = PAYLOAD_LIMITS.get(rest)
        if limit is None:
            raise ValueError(f"no device topic {rest!r}")
        if len(msg.payload) > limit:
            raise ValueError(f"payload of {len(msg.payload)} bytes, over the {limit}-byte limit of {rest}")
        if rest == "state":
            if not msg.payload:  # a cleared retained state
                return
            state = ReportedState.model_validate_json(msg.payload)
            if (msg.retain or not state.online) and self.store.is_removed(fleet, device):
                # a removed device (`fleet device remove`): the broker's copy of its last state, or its will
                # when its agent stops, is no reason to list it again; a state it publishes online is
                log.debug("%s/%s: removed from the registry: its %s state is not taken", fleet, device,
                          "retained" if msg.retain else "offline")
                return
            body = state.model_dump(mode="json")
            before = self.store.upsert_state(fleet, body, device=device)  # refuses another's
            self._runs[(fleet, device)] = state_run(body)
            _log_state_change(fleet, device, before, state)
            self._now_registered(fleet, device)
        elif rest == "telemetry":
            report = TelemetryReport.model_validate_json(msg.payload)
            if report.device != device:
                raise ValueError(f"report of device {report.device!r} on the topic of {device!r}")
            row = self._with_gap(fleet, device, report, telemetry_row(fleet, report.model_dump()))
            waiting = self._pending_histograms.get((fleet, device))
            histograms = waiting.pop(report.window_end, None) if waiting else None
            # stored with the report they belong to, and only if they count no more requests than it does
            item = row if histograms is None or histograms[1] > report.count else WithHistograms(row, histograms[0])
            if self._delivery is not None:
                item, self._ack_now = Delivered(item, self._delivery), False
            self._telemetry.put(item)
            self._ask_state_if_unknown(fleet, device)
        elif rest == "latency":
            histograms = LatencyHistograms.model_validate_json(msg.payload)
            if histograms.device != device:
                raise ValueError(f"latency histograms of device {histograms.device!r} on the topic of {device!r}")
            waiting = self._pending_histograms.setdefault((fleet, device), {})
            waiting[histograms.window_end] = (latency_row(fleet, histograms.model_dump()),
                                              histograms.ttft_ms.count if histograms.ttft_ms else 0)
            while len(waiting) > PENDING_HISTOGRAMS:
                del waiting[next(iter(waiting))]
        elif rest == "health":
            health = DeviceHealth.model_validate_json(msg.payload)
            if health.device != device:
                raise ValueError(f"health of device {health.device!r} on the topic of {device!r}")
            self._ask_state_if_unknown(fleet, device)
            with self._health_lock:  # stored with the next telemetry batch (HEALTH_FLUSH_S at the latest)
                self._health[(fleet, device)] = health.model_dump(mode="json")
        elif rest == "ota/status":
            if msg.payload:  # empty: the retained status was cleared
                body = OtaStatus.model_validate_json(msg.payload).body()
                # logged once per update and device: the idle status after REPORTING repeats the result, a retained
                # one comes again at each reconnect, and the one a controller that was away gets is the retained idle
                new_result = body.get("result") and self.store.last_result(
                    fleet, device, body.get("update_id")) is None
                self.store.add_ota_status(fleet, device, body)
                if new_result:
                    ok = body["result"] == "committed"
                    (log.info if ok else log.warning)(
                        "device %s/%s: update %s %s%s", fleet, device, body.get("update_id"),
                        "committed" if ok else str(body["result"]).upper().replace("_", " "),
                        f": {body['reason']}" if body.get("reason") else "")
        elif rest == "ota/chunk/request":
            if not self._chunk_limit.allow((fleet, device)):
                self._chunk_limited(fleet, device)
                return
            self._serve_chunk(fleet, device, msg)

    def _with_gap(self, fleet: str, device: str, report: TelemetryReport, row: tuple) -> tuple:
        """`row` with the gap before `report` (store.with_gap): the time since the device's last report, where both
        come from the same run of its agent (the run its state named when each came), this one is not the run's
        first window (it starts more than RUN_START_SLACK_S after the run did) and it does not start where that one
        ended. A report of the same run that came after a later one (a window held back at a model switch; a second
        copy) closes the gap it falls in instead. A report of another run (or of a run not known) starts the
        comparison again: the time between two runs is none of the agent's (it was down), and a new run's clock
        may be behind the old one's last window (a box set back by NTP, then restarted)."""
        key = (fleet, device)
        if key not in self._runs:  # the first message of the device since the controller started
            self._runs[key] = self.store.device_run(fleet, device)
        run = self._runs[key]
        last = self._last_window.get(key)
        if last is None:
            end = self.store.last_window_end(fleet, device)
            # the stored report is of the run the device's state names only where that run began before it ended
            # (the device's clock); else of an earlier run (the agent restarted while the controller was away)
            last = None if end is None else (end, run if run is not None and run[1] < end else None)
        if last is None or run is None or last[1] is None or last[1][0] != run[0]:
            self._last_window[key] = (report.window_end, run)
            return row
        if report.window_end <= last[0]:
            return with_gap(row, late_start=report.window_start)
        self._last_window[key] = (report.window_end, run)
        if report.window_start <= last[0] or report.window_start - run[1] <= RUN_START_SLACK_S:
            return row
        return with_gap(row, (last[0], report.window_start))

    def _now_registered(self, fleet: str, device: str) -> None:
        if self._registered is not None:
            self._registered.add((fleet, device))
        entry = self._asked_state.pop((fleet, device), None)
        if entry is not None:
            if entry[2]:  # the one-device subscription did its job
                self.client.unsubscribe(state_topic(fleet, device))
            log.info("device %s/%s: registered from its state asked for again (it had been lost on the way)",
                     fleet, device)

    def _from_leftover_filter(self, msg) -> bool:
        """(MQTT 5) Whether the message came only through a filter of the kept session that this run did not make
        (neither the fleet's own filters nor a state topic asked for alone): an earlier run under this client id
        served another fleet ("+" and one fleet overlap: every message came twice, every chunk request was served
        twice, for good). That copy is dropped (ours comes too, where it is ours) and those filters go."""
        if self.settings.protocol == "3.1.1" or not self.settings.listen:
            return False
        ids = subscription_ids(msg)
        if self._served_id in ids or ASKED_STATE_SUBSCRIPTION in ids:
            return False
        try:
            fleet = split_topic(msg.topic)[0]
        except ValueError:
            return True
        # the filters it may have come through: another fleet's, or every fleet's where this one serves one fleet
        # (every fleet's own are this run's where it serves "+": the same filters, replaced by its SUBSCRIBE)
        stale = [] if fleet == self.settings.fleet else [fleet]
        if self.settings.fleet != "+":
            stale.append("+")
        for old in stale:
            self._leave_fleet(old)
        return True

    def _leave_fleet(self, fleet: str) -> None:
        """A message of a fleet this controller does not serve: the broker kept the subscriptions of an earlier run
        of this client id that served it (`--fleet` changed, a client id set in fleet.toml, or the K3s broker's
        username as client id). Dropped, and those subscriptions go (once per fleet and run)."""
        if fleet in self._left_fleets:
            return
        self._left_fleets.add(fleet)
        log.info("messages came through subscriptions to fleet %s, which this controller (fleet %s) does not serve, "
                 "that the broker kept for client id %s from an earlier run: unsubscribed", fleet,
                 self.settings.fleet, self.settings.client_id)
        self.client.unsubscribe(controller_subscriptions(fleet))

    def _ask_state_if_unknown(self, fleet: str, device: str) -> None:
        """A device heard from but not in the registry: subscribe to its state topic alone, which has the broker
        send its retained state again (at most once a minute per device; never for one `fleet device remove`
        took out). Its state was dropped by the broker (max_queued_messages: a fleet connecting at once)."""
        if self._registered is None:
            self._registered = {(d["fleet"], d["device"]) for d in self.store.devices()}
        key, now = (fleet, device), time.monotonic()
        entry = self._asked_state.get(key)
        if entry is not None and entry[2] and entry[1] >= STATE_ASKS_MAX and now - entry[0] >= STATE_ASK_AGAIN_S:
            entry[2] = False  # the last ask got no state in a minute: none is retained; its subscription goes
            self.client.unsubscribe(state_topic(fleet, device))
        if key in self._registered or entry is not None and (
                now - entry[0] < STATE_ASK_AGAIN_S or entry[1] >= STATE_ASKS_MAX):
            return
        if self.store.is_removed(fleet, device):
            return
        if self.store.has_device(fleet, device):  # registered by another controller on this database
            self._now_registered(fleet, device)
            return
        if entry is None:
            entry = self._asked_state[key] = [now, 0, False]
        entry[0], entry[1], entry[2] = now, entry[1] + 1, True
        props = None
        if self.settings.protocol != "3.1.1":  # its messages say it: one from an earlier run can be told apart
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = ASKED_STATE_SUBSCRIPTION
        self.client.subscribe(state_topic(fleet, device), 1, properties=props)
        if entry[1] == 1:
            log.info("device %s/%s reports but is not registered (its state was lost on the way: the broker's "
                     "queue limit, max_queued_messages?): its retained state is asked for again", fleet, device)
        elif entry[1] == STATE_ASKS_MAX:
            log.warning("device %s/%s reports but its state was not taken after %d asks (no retained state, or one "
                        "this controller refuses: a newer agent? see rejected messages); not asked again until the "
                        "controller restarts", fleet, device, entry[1])

    def _chunk_limited(self, fleet: str, device: str) -> None:
        self.store.count("chunk_requests_limited")
        now = time.monotonic()
        if now - self._limited_logged.get((fleet, device), -1e9) > 10.0:  # at most every 10 s per device
            self._limited_logged[(fleet, device)] = now
            log.warning("chunk requests of device %s (fleet %s) over %g/s: dropped", device, fleet,
                        self.settings.chunk_requests_per_s)

    def _offered_bundle(self, update_id: str, fleet: str, device: str) -> tuple[Path, str | None, str | None] | None:
        """The bundle of `update_id`, the version it was offered as and the sha256 of the manifest offered, if the
        offers table says it was offered to this device (asked again after OFFERED_CHECK_S: `fleet device remove`
        in another process stops the answers)."""
        key, now = (update_id, fleet, device), time.monotonic()
        with self._offered_lock:
            hit = self._offered.get(key)
            if hit is not None and now - hit[3] < OFFERED_CHECK_S:
                self._offered.move_to_end(key)
                return hit[0], hit[1], hit[2]
        bundle = self.store.offered_to(update_id, fleet, device)
        version, sha = (self.store.offered_manifest(update_id) or (None, None)) if bundle is not None else (None, None)
        with self._offered_lock:
            if bundle is None:
                self._offered.pop(key, None)
                return None
            self._offered[key] = (bundle.resolve(), version, sha, now)
            self._offered.move_to_end(key)
            while len(self._offered) > OFFERED_KEPT:
                self._offered.popitem(last=False)
        return bundle.resolve(), version, sha

    def _serve_chunk(self, fleet: str, device: str, msg) -> None:
        req = ChunkRequest.model_validate_json(msg.payload)
        # the answer goes to the requesting device's own response topic, never to a topic the request names:
        # the controller may publish where devices may not (config/desired, ota/offer of every device)
        topic = chunk_response_topic(fleet, device)
        offered = self._offered_bundle(req.update_id, fleet, device)
        if offered is not None:
            response = self.chunks.serve(req, offered[0], version=offered[1], manifest_sha256=offered[2])
            if response.error and CANNOT_SERVE in response.error:
                self.store.count("chunk_answers_unservable")
                self._log_unservable(offered[0], req.update_id, f"{fleet}/{device}",
                                     response.error.split(CANNOT_SERVE, 1)[1])
                # the device (and whoever reads its status) gets what changed, not where the controller keeps bundles
                response = response.model_copy(update={"error": response.error.replace(str(offered[0]),
                                                                                       "the bundle directory")})
        else:
            response = ChunkResponse(id=req.id, update_id=req.update_id, path=req.path, index=req.index,
                                     error=f"update {req.update_id!r} is not offered to {fleet}/{device} by this "
                                           f"controller")
        props = Properties(PacketTypes.PUBLISH)
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if correlation and len(correlation) <= 256:
            props.CorrelationData = correlation
        payload = response.model_dump_json()
        size = publish_packet_bytes(topic, payload, 1, correlation_data=props.CorrelationData if correlation and
                                    len(correlation) <= 256 else None)
        if self.max_packet is not None and size > self.max_packet:
            # sent, the broker would close the connection, and paho would send it again after every reconnect:
            # the controller cut off from every device. The device gets the reason instead, and reports it
            why = (f"the answer to chunk {req.index} of {req.path} is {size} bytes, over the broker's maximum packet "
                   f"size of {self.max_packet} bytes (its max_packet_size): raise that limit, or export the bundle "
                   f"with smaller chunks ({chunk_kib_hint(self.max_packet)})")
            if req.update_id not in self._too_large_logged:
                self._too_large_logged[req.update_id] = None
                while len(self._too_large_logged) > OFFERED_KEPT:
                    self._too_large_logged.popitem(last=False)
                log.error("update %s to %s/%s cannot be served: %s", req.update_id, fleet, device, why)
            self.store.count("chunk_answers_too_large")
            payload = ChunkResponse(id=req.id, update_id=req.update_id, path=req.path, index=req.index,
                                    error=why).model_dump_json()
        self.client.publish(topic, payload, qos=1, properties=props)

    def _log_unservable(self, root: Path, update_id: str, device: str, problem: str) -> None:
        """One error line per bundle directory that cannot be served, again at most every UNSERVABLE_LOG_S with the
        number of devices that asked meanwhile: a rollout makes one update per device, and a line per update was
        2,000 lines for 2,000 devices, each saying the same."""
        now = time.monotonic()
        last, asked = self._unservable.get(root, (None, set()))
        asked.add(device)
        if last is not None and now - last < UNSERVABLE_LOG_S:
            self._unservable[root] = (last, asked)
            return
        others = len(asked - {device})
        self._unservable[root] = (now, set())
        self._unservable.move_to_end(root)
        while len(self._unservable) > OFFERED_KEPT:
            self._unservable.popitem(last=False)
        problem = problem.removeprefix(f"{root}: ").removeprefix(f"{root} ")  # (named first in the line)
        log.error("bundle %s cannot be served (update %s to %s%s): %s", root, update_id, device,
                  f"; {others} other device(s) asked since the last line" if others else "", problem)

    # --- commands ---------------------------------------------------------------------------
    def _require_connected(self, what: str) -> None:
        """ConnectionError while the broker is away: paho would queue the publish and deliver it after the
        reconnect, while the caller (a rollout step retried every tick) made another one each time."""
        if not self.client.is_connected():
            raise ConnectionError(f"not connected to the broker {self.settings.broker_host}:"
                                  f"{self.settings.broker_port}: {what}")

    def _publish_retained(self, topic: str, payload, what: str) -> None:
        """Publish at QoS 1, retained, and wait for the broker's acknowledgement: ConnectionError if it does
        not come (the broker went away) within PUBLISH_TIMEOUT_S, naming `what` was not confirmed;
        PacketTooLarge, before publishing, if it is over the broker's maximum packet size."""
        size = publish_packet_bytes(topic, payload, 1)
        if self.max_packet is not None and size > self.max_packet:
            raise PacketTooLarge(f"{what} is {size} bytes, over the maximum packet size of the broker "
                                 f"{self.settings.broker_host}:{self.settings.broker_port} ({self.max_packet} bytes, "
                                 f"its max_packet_size), which would close the connection over it: raise that limit; "
                                 f"nothing was published")
        try:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
            confirmed = info.is_published()
        except (RuntimeError, ValueError) as exc:  # paho: not connected, queue full
            raise ConnectionError(f"the broker {self.settings.broker_host}:{self.settings.broker_port} did not "
                                  f"take {what} ({exc})") from None
        if not confirmed:
            raise ConnectionError(f"the broker {self.settings.broker_host}:{self.settings.broker_port} did not "
                                  f"acknowledge {what} within {PUBLISH_TIMEOUT_S:g} s")

    def offer(self, fleet: str, device: str, bundle_dir: Path, update_id: str | None = None,
              rollback_key=None, replaces: str | None = None, not_after: int | None = None) -> str:
        """Offer a bundle to one device. With `rollback_key`, a rollback: the key signs a statement bound to
        this fleet and device, the version it `replaces` (the one the device serves now) and `not_after`
        (unix seconds), which the agent checks."""
        bundle = self._offerable(bundle_dir)
        self._require_connected("nothing was offered")
        terms = None
        if rollback_key is not None:
            if not_after is None:
                raise ValueError("a rollback offer needs not_after (its expiry)")
            terms = RollbackTerms(format=ROLLBACK_FORMAT, fleet=fleet, device=device, replaces=replaces,
                                  not_after=int(not_after))
        update_id = update_id or f"{bundle.manifest.name}-{bundle.manifest.version}-{self._next_id_us()}"
        self._check_chunk_answers(bundle, Path(bundle_dir), update_id, fleet, device)
        offer = make_offer(bundle, update_id, {"type": "mqtt"}, rollback_key=rollback_key, rollback_terms=terms)
        # a plain offer leaves out the empty rollback_terms, so that an agent of an older version still parses it
        payload = offer.model_dump_json(exclude={"rollback_terms"} if terms is None else None)
        size = publish_packet_bytes(ota_offer_topic(fleet, device), payload, 1)
        if self.max_packet is not None and size > self.max_packet:  # checked before anything is recorded
            chunks = sum(len(f.chunks) for f in bundle.manifest.files)
            raise PacketTooLarge(
                f"the offer of {update_id} is {size} bytes (it carries the manifest: {chunks} transfer chunks of "
                f"{bundle.manifest.chunk_size // 1024} KiB), over the maximum packet size of the broker "
                f"{self.settings.broker_host}:{self.settings.broker_port} ({self.max_packet} bytes, its "
                f"max_packet_size): raise that limit, or export the bundle with larger chunks (fewer to list: "
                f"`edgeglm export --chunk-kib 512`, if its chunk answers still fit); nothing was offered")
        # recorded before it is published: the chunk server answers this device's requests from the record
        self.store.add_offer(update_id, Path(bundle_dir).resolve(), bundle.manifest.version, fleet, device,
                             bundle.sha256)
        self._publish_retained(ota_offer_topic(fleet, device), payload, f"the offer of {update_id} to {fleet}/{device}")
        log.info("offered %s %s to %s/%s (update %s%s)", bundle.manifest.name, bundle.manifest.version, fleet, device,
                 update_id, ", a rollback" if rollback_key is not None else "")
        return update_id

    def _offerable(self, bundle_dir: Path):
        """`offerable_bundle(bundle_dir)`, checked again only when a file in it changed (size, mtime): a rollout
        offers one bundle to each device in turn, and hashing it whole for every offer took 0.1-0.2 s per device
        for 90 MB (an hour of the serving loop for 2,000 devices and a 1.5 GB bundle). The agents verify every
        byte against the signed manifest either way."""
        root = Path(bundle_dir).resolve()
        key = _files_key(root)
        bundle = self._checked.get(root, key)
        if bundle is None:
            bundle = offerable_bundle(root)
            self._checked.put(root, key, bundle)
        return bundle

    def _next_id_us(self) -> int:
        """The time part of a new update id, in microseconds, never one this controller gave before: ids in
        milliseconds were shared by two offers in one millisecond (a rollout's devices), and one device's offer
        served the other's chunks. (Another process, `fleet offer` beside `fleet serve`, would have to offer the
        same bundle in the same microsecond to repeat one.)"""
        with self._ids_lock:
            self._last_id_us = max(time.time_ns() // 1000, self._last_id_us + 1)
            return self._last_id_us

    def _check_chunk_answers(self, bundle, bundle_dir: Path, update_id: str, fleet: str, device: str) -> None:
        """PacketTooLarge when the largest chunk answer of `bundle` would be over the broker's maximum packet size:
        the device could never download it (the chunk server answers each chunk with an error instead)."""
        if self.max_packet is None:
            return
        size = largest_chunk_answer(bundle.manifest, update_id, chunk_response_topic(fleet, device))
        if size > self.max_packet:
            raise PacketTooLarge(
                f"bundle {bundle_dir}: its chunk answers ({bundle.manifest.chunk_size // 1024} KiB chunks) are up to "
                f"{size} bytes, over the maximum packet size of the broker {self.settings.broker_host}:"
                f"{self.settings.broker_port} ({self.max_packet} bytes, its max_packet_size): no device could "
                f"download it; raise that limit, or export the bundle with smaller chunks "
                f"({chunk_kib_hint(self.max_packet)}); nothing was offered")

    def set_desired(self, fleet: str, device: str, settings: dict, version: int | None = None,
                    replace: bool = False) -> tuple[int, dict]:
        """Publish the device's desired config: `settings` merged over what this controller last set for it
        (kept in the store), or `settings` alone with `replace`. Agents take a desired config as the
        fleet's whole layer over their own config (the broker keeps only the latest one), so each one
        carries everything set so far. Returns the version and the settings published."""
        self._require_connected("no desired config was published")
        version = version if version is not None else \
            self.store.next_desired_version([(fleet, device)], int(time.time() * 1000))
        merged = settings if replace else deep_merge(self.store.desired(fleet, device) or {}, settings)
        payload = DesiredConfig(version=version, settings=merged).model_dump_json()
        # recorded before it is published: a Ctrl-C or crash between the two must not leave the broker (and the
        # agents) with settings the store lacks, which the next `config set` would then silently take back. A
        # publish that fails leaves the store ahead instead: the command says so, and running it again publishes.
        self.store.record_desired(fleet, device, version, merged)
        self._publish_retained(desired_topic(fleet, device), payload, f"the desired config of {fleet}/{device}")
        log.info("desired config version %d published to %s/%s", version, fleet, device)
        return version, merged

    def clear_retained(self, fleet: str, device: str) -> None:
        """Clear the desired config and the OTA offer the broker keeps for a removed device (empty retained
        messages). Its retained state is the device's own topic, which the controller may not write (the
        K3s ACL): the store remembers the removal instead, and the copy the broker hands each new
        subscription is ignored while a state the device publishes live registers it again."""
        self._require_connected("nothing was cleared")
        for topic in (desired_topic(fleet, device), ota_offer_topic(fleet, device)):
            self._publish_retained(topic, b"", f"the clearing of {topic}")


CHECKED_KEPT = 8  # bundles whose offer check a controller keeps (`_offerable`)


def _files_key(root: Path) -> tuple:
    """What changes when a file of the bundle at `root` is replaced, rewritten or added: (path, device, inode,
    size, mtime, ctime) of each, sorted; () when `root` cannot be read (the check then says why). The inode and
    ctime too: `cp -p`, `rsync -a` and tar keep a file's mtime (and a retrained model keeps its size), but no tool
    sets the ctime."""
    out = []
    try:
        for folder, _, names in os.walk(root):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                out.append((os.path.relpath(os.path.join(folder, name), root), st.st_dev, st.st_ino, st.st_size,
                            st.st_mtime_ns, st.st_ctime_ns))
    except OSError:
        return ()
    return tuple(sorted(out))


class PacketTooLarge(AgentError):
    """A message would be over the broker's maximum packet size: nothing was published."""


# what a chunk answer carries besides the chunk's base64: ids, path and JSON (a request id is at most 128
# characters, a path 512), plus the correlation data of an MQTT 5 request (at most 256 bytes are copied)
CHUNK_ANSWER_OVERHEAD = 1200


def largest_chunk_answer(manifest, update_id: str, topic: str) -> int:
    """The size of the largest chunk answer packet the chunk server sends for `manifest` on `topic`."""
    path = max((f.path for f in manifest.files), key=lambda p: len(json.dumps(p)), default="")
    blank = ChunkResponse(id="x" * 128, update_id=update_id, path=path, index=10**9, data_b64="").model_dump_json()
    encoded = 4 * -(-manifest.chunk_size // 3)
    return publish_packet_bytes(topic, len(blank) + encoded, 1, correlation_data=b"x" * 256)


def chunk_kib_hint(max_packet: int) -> str:
    """What to export with so that chunk answers fit a broker's `max_packet` bytes."""
    kib = min(MAX_CHUNK_SIZE, (max_packet - CHUNK_ANSWER_OVERHEAD) * 3 // 4) // 1024
    return (f"`edgeglm export --chunk-kib {kib}` or less" if kib >= 4 else
            f"even 4 KiB chunks do not fit {max_packet} bytes: the broker's limit must be raised")


def bundle_bytes(bundle) -> int:
    """What an agent needs free to download `bundle` (an opened bundle), as it checks (ota.update.space_needed)."""
    from ota.update import space_needed

    return space_needed(f.size for f in bundle.manifest.files)


def short_of_disk(store: Store, targets: list[tuple[str, str]], need: int, now: float | None = None) -> list[str]:
    """One line per target device whose latest health snapshot has less free disk in its state directory than
    `need` bytes: its update would fail with "disk full" (the agent checks before downloading). A warning, not a
    refusal: space may have been freed since, and devices that sent no snapshot are not judged."""
    now = time.time() if now is None else now
    health = store.health()
    lines = []
    for fleet, device in targets:
        h = health.get((fleet, device)) or {}
        free = h.get("disk_free_bytes")
        if free is not None and free < need:
            lines.append(f"device {fleet}/{device} reported {_size(free)} free for updates "
                         f"{max(0.0, now - h['received']):.0f} s ago, the bundle needs {_size(need)}: its update will "
                         "fail (disk full) unless space is freed on it")
    return lines


def agents_too_old(store: Store, targets: list[tuple[str, str]], min_agent_version: str) -> list[str]:
    """A line naming the targets whose agent (the version in their latest state) is older than the bundle's
    `min_agent_version`: they refuse the offer before downloading ("bundle needs agent >= ..."), and a rollout
    whose canaries they are halts. A warning: an agent may have been upgraded since its last state."""
    from fleet.rollout import _few
    from ota.versions import VersionError, parse_version

    try:
        needs = parse_version(min_agent_version)
    except VersionError:
        return []
    versions, old = store.agent_versions(), []
    for fleet, device in targets:
        try:
            if parse_version(versions.get((fleet, device), "")) < needs:
                old.append(f"{fleet}/{device} ({versions[(fleet, device)]})")
        except VersionError:  # none reported, or not a version
            continue
    if not old:
        return []
    return [f"{len(old)} device(s) run an agent older than {min_agent_version}, which the bundle needs "
            f"(min_agent_version): {_few(old)}; they refuse the update: upgrade their agent first"]


def _log_state_change(fleet: str, device: str, before: dict | None, state: ReportedState) -> None:
    """INFO lines for what an operator follows in `fleet serve`'s log: a device new to the registry, one coming
    online or going offline, and a change of the model it serves."""
    version = state.model.version if state.model else None
    if before is None:
        log.info("device %s/%s registered (%s, serving %s)", fleet, device, "online" if state.online else "offline",
                 version or "no model")
        return
    if before["online"] != state.online:
        log.info("device %s/%s %s", fleet, device, "online" if state.online else "OFFLINE")
    if state.online and before["model_version"] != version:
        log.info("device %s/%s serves %s (was %s)", fleet, device, version or "no model",
                 before["model_version"] or "no model")


def format_status(store: Store, fleet: str | None = None, since_s: float = 3600) -> str:
    """The status table: one row per device, then one per model version, then the rollouts."""
    now = time.time()
    rows = []
    health = store.health(fleet)
    for d in store.devices(fleet):
        lat = store.latency(d["fleet"], d["device"], now - since_s, d["model_version"])
        h = health.get((d["fleet"], d["device"]), {})
        h = h if d["online"] and health_current(h, now) else {}  # an offline box's or an old snapshot's: not now
        rows.append((d["fleet"], d["device"], "yes" if d["online"] else "silent" if d.get("silent") else "NO",
                     f"{now - d['last_seen']:.0f}s",
                     f"{d['model_name'] or '-'} {d['model_version'] or ''}".strip(), d["execution_path"] or "-",
                     *(_ms(lat.get(k), lat.get("percentiles")) for k in ("ttft_p50_ms", "ttft_p95_ms", "token_p50_ms",
                                                                          "token_p95_ms")),
                     f"{lat['tokens_per_s']:.1f}" if lat.get("tokens_per_s") else "-",
                     _size(h.get("rss_bytes")), _size(h.get("memory_available_bytes")), _size(h.get("disk_free_bytes")),
                     _config_cell(d)))
    head = ("fleet", "device", "online", "seen", "model", "path", "ttft p50", "ttft p95", "tok p50", "tok p95",
            "tok/s", "rss", "mem free", "disk free", "config")
    text = _table(head, rows) + f"\n{len(rows)} device(s); rejected messages: {store.counter('rejected_messages')}"
    if any("*" in cell for row in rows for cell in row[6:10]):
        text += "\n" + MEANS_NOTE
    results = store.last_results(fleet)
    losses = store.telemetry_losses(fleet, now - since_s)
    for d in store.devices(fleet):  # a refused desired config or a failed update is news, not a detail of --json
        loss = losses.get((d["fleet"], d["device"]), {})
        if loss.get("lost_reports"):
            text += (f"\ndevice {d['fleet']}/{d['device']} LOST {loss['lost_reports']} telemetry report(s) "
                     f"in the last {since_s:g} s: its offline buffer (mqtt.telemetry_buffer) overflowed while it could "
                     f"not reach the broker; the latency of that time is missing")
        if loss.get("missing_gaps"):
            text += (f"\ndevice {d['fleet']}/{d['device']} telemetry MISSING for {loss['missing_s']:.0f} s in "
                     f"{loss['missing_gaps']} gap(s) in the last {since_s:g} s: its agent ran, and no report of that "
                     f"time reached the controller (lost from the device's offline buffer, too large for the broker, "
                     f"or lost by the broker: one that forgot the controller's session or overflowed its queue; a "
                     f"window held back at a model switch shows here until it comes, up to 10 minutes; "
                     f"docs/fleet.md)")
        if d.get("silent"):
            text += (f"\ndevice {d['fleet']}/{d['device']} is SILENT: its last state said online, but nothing came from "
                     f"it for {now - d['last_seen']:.0f} s ([fleet] silent_after_s {store.silent_after_s:g}); counted "
                     f"offline and never picked as a canary (a box that died while the broker was away leaves no Will)")
        if d["last_config_error"]:
            text += (f"\nconfig REFUSED by {d['fleet']}/{d['device']} (it keeps config version "
                     f"{d['applied_config_version'] if d['applied_config_version'] is not None else '-'}): "
                     f"{d['last_config_error']}")
        last = results.get((d["fleet"], d["device"]))
        if last and last["result"] in ("failed", "rolled_back"):  # its latest update did not commit
            text += (f"\nupdate {last['update_id']} {last['result'].upper().replace('_', ' ')} on {d['fleet']}/"
                     f"{d['device']} (it serves {d['model_version'] or 'no model'}): "
                     f"{last['reason'] or 'no reason given'}")
    text += "\n\n" + format_versions(store.versions(fleet, now - since_s), since_s)
    keys = store.signing_keys(fleet)
    if keys:
        text += "\n\n" + format_signing_keys(keys, len(rows))
    from fleet.rollout import load_rollouts

    for r in load_rollouts(store):
        last = r.data["report"][-1] if r.data["report"] else ""
        if r.data.get("step_error"):  # a step that keeps failing (retried every second): why it does not move
            last += f"\n  its step keeps failing (retried every second): {r.data['step_error']}"
        target = r.fleet if not r.group else f"group {r.group} of {r.fleet}"
        version = f" {r.data['version']}" if r.data.get("version") else ""
        text += f"\nrollout {r.id} ({r.bundle.name}{version} -> {target}): {r.phase}  {last}"
        if r.phase in ("halting", "halted") and r.data.get("halt_reason") and r.data["halt_reason"] not in last:
            text += f"\n  halted because: {r.data['halt_reason']}"
    return text


def signing_key_summary(keys: dict[tuple[str, str], dict]) -> list[dict]:
    """Per key id, from the devices' `hardware.keys` (Store.signing_keys): how many devices trust it, serve a
    model it signs, and how many of those serve one no other key they trust signs (`serving_only`; the same
    for the model a rollback goes back to). A key with both `only` counts 0 can be removed from every box
    without any refusing its model; the devices counted are in `serving_only_devices`/`rollback_only_devices`."""
    out: dict[str, dict] = {}

    def entry(kid: str) -> dict:
        return out.setdefault(kid, {"key": kid, "trusted_by": 0, "serving": 0, "serving_only": 0, "rollback": 0,
                                    "rollback_only": 0, "serving_only_devices": [], "rollback_only_devices": []})

    for (fleet, device), k in sorted(keys.items()):
        for kid in k["trusted"]:
            entry(kid)["trusted_by"] += 1
        for what in ("serving", "rollback"):
            for kid in k[what] or []:
                e = entry(kid)
                e[what] += 1
                if len(k[what]) == 1:
                    e[f"{what}_only"] += 1
                    e[f"{what}_only_devices"].append(f"{fleet}/{device}")
    return sorted(out.values(), key=lambda e: e["key"])


def format_signing_keys(keys: dict[tuple[str, str], dict], devices: int) -> str:
    """The per-signing-key table of `fleet status`, and the devices serving a model no key they trust signs."""
    summary = signing_key_summary(keys)
    rows = [(e["key"], str(e["trusted_by"]), f"{e['serving']} ({e['serving_only']} only)",
             f"{e['rollback']} ({e['rollback_only']} only)") for e in summary]
    text = _table(("signing key", "trusted by", "signs serving model", "signs rollback model"), rows)
    text += (f"\nper signing key: {len(keys)} of {devices} device(s) report their keys; (N only): N devices whose "
             "model no other key they trust signs, which they refuse once this key is removed (docs/ota.md Rotation)")
    from fleet.rollout import _few

    unsigned = [f"{f}/{d}" for (f, d), k in sorted(keys.items()) if k["serving"] == [] and k.get("required") is not False]
    if unsigned:  # (required None: an agent that does not say; signatures are required by default)
        text += (f"\n{len(unsigned)} device(s) serve a model no key they trust now signs (its key was removed): "
                 f"{_few(unsigned)}; their next start refuses it unless it is offered again signed by a trusted key")
    unchecked = [f"{f}/{d}" for (f, d), k in sorted(keys.items()) if k["serving"] == [] and k.get("required") is False]
    if unchecked:
        text += (f"\n{len(unchecked)} device(s) serve a model no key they trust signs, and take it "
                 f"(ota.require_signature = false there): {_few(unchecked)}")
    return text


def _config_cell(d: dict) -> str:
    """The applied config version, and REFUSED while the device refuses the latest desired config."""
    applied = str(d["applied_config_version"]) if d["applied_config_version"] is not None else "-"
    return f"{applied} REFUSED" if d["last_config_error"] else applied


def format_versions(versions: list[dict], since_s: float) -> str:
    """The per-model-version table of `Store.versions`."""
    rows = [(v["model_version"] or "(no model)", ",".join(v["model_names"]) or "-", str(v["devices"]), str(v["online"]),
             *(_ms(v[k], v.get("percentiles")) for k in ("ttft_p50_ms", "ttft_p95_ms", "token_p50_ms", "token_p95_ms")),
             "-" if v["tokens_per_s"] is None else f"{v['tokens_per_s']:.1f}", str(v["requests"]),
             "-" if v["error_rate"] is None else f"{100 * v['error_rate']:.1f}%") for v in versions]
    head = ("version", "model", "devices", "online", "ttft p50", "ttft p95", "tok p50", "tok p95", "tok/s",
            "requests", "errors")
    means = any(v.get("percentiles") == "window means" for v in versions)
    return _table(head, rows) + (f"\nper model version: telemetry of the last {since_s / 60:g} min; percentiles of all "
                                 f"its requests, tok/s request-weighted" + ("\n" + MEANS_NOTE if means else ""))


MEANS_NOTE = ("* a request-weighted mean of window percentiles, not a percentile: windows with more than a tenth of "
              "the range's requests came without their latency histograms (an agent from before them, or with "
              "telemetry.histograms = false)")


def _size(n) -> str:
    """Bytes for a table cell: 812M, 1.4G; '-' for none."""
    if n is None:
        return "-"
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}" if n < 10 * scale else f"{n // scale}{unit}"
    return f"{n}B"


def _ms(v, percentiles: str | None = None) -> str:
    """A latency cell; `percentiles` "window means" (Store.latency): marked * (a mean of window percentiles)."""
    return "-" if v is None else f"{v:.1f}ms" + ("*" if percentiles == "window means" else "")


def _table(head: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def _label(value) -> str:
    """A label value in the Prometheus text format: backslash, double quote and newline escaped."""
    return str(value if value is not None else "").replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _version_metrics(versions: list[dict]) -> list[str]:
    """The per-model-version rows of `fleet status` as gauges labelled by model_version."""
    series = [("edgeglm_fleet_version_devices", "Devices on each model version, by online state.", None),
              ("edgeglm_fleet_version_ttft_ms", "Time to first token of each model version (last hour: "
               "the percentile of all its requests, from the agents' latency histograms; a request-weighted mean of "
               "window percentiles where a window came without them).", ("ttft_p50_ms", "ttft_p95_ms")),
              ("edgeglm_fleet_version_token_ms", "Per-token latency of each model version (last hour: "
               "the percentile of all its tokens, from the agents' latency histograms; a request-weighted mean of "
               "window percentiles where a window came without them).", ("token_p50_ms", "token_p95_ms")),
              ("edgeglm_fleet_version_tokens_per_second", "Decode speed of each model version (last hour).",
               "tokens_per_s"),
              ("edgeglm_fleet_version_requests", "Requests served by each model version (last hour).", "requests"),
              ("edgeglm_fleet_version_error_ratio", "errors / (requests + errors) of each model version "
               "(last hour).", "error_rate")]
    lines = []
    for name, help_text, key in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for v in versions:
            label = f'model_version="{_label(v["model_version"])}"'
            if key is None:
                lines += [f'{name}{{{label},online="true"}} {v["online"]}',
                          f'{name}{{{label},online="false"}} {v["devices"] - v["online"]}']
            elif isinstance(key, tuple):
                lines += [f'{name}{{{label},quantile="{q}"}} {v[k]:.3f}' for q, k in zip(("0.5", "0.95"), key)
                          if v[k] is not None]
            elif v[key] is not None:
                lines.append(f"{name}{{{label}}} {v[key]:.6g}")
    return lines


HEALTH_SERIES = (  # (metric, DeviceHealth field, type, help)
    ("edgeglm_fleet_device_resident_memory_bytes", "rss_bytes", "gauge", "Resident memory of each device's agent."),
    ("edgeglm_fleet_device_memory_available_bytes", "memory_available_bytes", "gauge",
     "Memory each device's agent can still take (MemAvailable, or less under a cgroup limit)."),
    ("edgeglm_fleet_device_disk_free_bytes", "disk_free_bytes", "gauge",
     "Free bytes on the file system of each device's state directory, where updates are downloaded."),
    ("edgeglm_fleet_device_load1", "load_1m", "gauge", "1-minute load average of each device."),
    ("edgeglm_fleet_device_temperature_celsius", "temperature_c", "gauge", "The hottest thermal zone of each device."),
    ("edgeglm_fleet_device_kv_waits_total", "kv_waits", "counter",
     "Requests that waited for batching.max_kv_mb on each device, since its agent started."),
    ("edgeglm_fleet_device_health_received_timestamp_seconds", "received", "gauge",
     "When the controller received each device's latest health snapshot (unix time, the controller's clock)."),
)


HEALTH_DUE_SLACK_S = 30.0  # a snapshot is current until received + 2 x its next_s (or HEALTH_DUE_DEFAULT_S) + this
HEALTH_DUE_DEFAULT_S = 60.0  # a snapshot without next_s: the agents' default health_interval_s


def health_current(h: dict, now: float | None = None) -> bool:
    """Whether a stored DeviceHealth (with `received`) still describes the box: its next snapshot is not overdue
    (twice the `next_s` it announced, plus HEALTH_DUE_SLACK_S). One whose agent stopped sending (health turned
    off, or the agent stuck) is shown as not known, not as the box's present state."""
    if not h:
        return False
    now = time.time() if now is None else now
    return now - h["received"] <= 2 * (h.get("next_s") or HEALTH_DUE_DEFAULT_S) + HEALTH_DUE_SLACK_S


def _health_metrics(devices: list[dict], health: dict[tuple[str, str], dict]) -> list[str]:
    """The latest DeviceHealth of each registered device that is online as per-device series (none for a device
    that never sent one, whose agent predates it, or that is offline: its last figures would keep an alert
    firing for a box that is gone; edgeglm_fleet_devices counts those). A snapshot that is overdue
    (health_current) keeps only its received timestamp, so that an alert on the age can fire."""
    lines, now = [], time.time()
    for name, key, kind, help_text in HEALTH_SERIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for d in devices:
            h = health.get((d["fleet"], d["device"]), {}) if d["online"] else {}
            value = h.get(key) if key == "received" or health_current(h, now) else None
            if value is not None:  # every digit (a timestamp at 6 significant digits is 5,000 s off)
                lines.append(f'{name}{{fleet="{_label(d["fleet"])}",device="{_label(d["device"])}"}} '
                             f'{format_value(value)}')
    return lines


def prometheus_metrics(store: Store, connected: bool, queued: int | None = None) -> str:
    """Fleet aggregates in the Prometheus text format."""
    from fleet.rollout import load_rollouts

    devices = store.devices()
    lines = ["# HELP edgeglm_fleet_devices Devices known to the controller, by online state.",
             "# TYPE edgeglm_fleet_devices gauge"]
    for online in (1, 0):
        n = sum(1 for d in devices if d["online"] == online)
        lines.append(f'edgeglm_fleet_devices{{online="{"true" if online else "false"}"}} {n}')
    lines += ["# HELP edgeglm_fleet_token_p95_ms Per-token latency of each device over the last hour: the p95 of all its "
              "tokens, from its latency histograms (a request-weighted mean of its windows' p95 where a window came "
              "without them).",
              "# TYPE edgeglm_fleet_token_p95_ms gauge"]
    since = time.time() - 3600
    for d in devices:
        lat = store.latency(d["fleet"], d["device"], since, d["model_version"])  # the version it is labelled with
        if lat.get("token_p95_ms") is not None:
            lines.append(f'edgeglm_fleet_token_p95_ms{{fleet="{_label(d["fleet"])}",device="{_label(d["device"])}",'
                         f'model_version="{_label(d["model_version"])}"}} {lat["token_p95_ms"]:.3f}')
    lines += ["# HELP edgeglm_fleet_telemetry_missing_seconds Seconds of the last hour in which the device's agent "
              "ran and no report of it reached the controller (gaps between its reports; devices with none are not "
              "listed).", "# TYPE edgeglm_fleet_telemetry_missing_seconds gauge"]
    for (fleet, device), loss in sorted(store.telemetry_losses(None, since).items()):
        if loss["missing_gaps"]:
            lines.append(f'edgeglm_fleet_telemetry_missing_seconds{{fleet="{_label(fleet)}",device="{_label(device)}"}}'
                         f' {loss["missing_s"]:.3f}')
    lines += _health_metrics(devices, store.health())
    lines += _version_metrics(store.versions(since=since))
    lines += ["# HELP edgeglm_fleet_telemetry_reports_total Telemetry reports stored.",
              "# TYPE edgeglm_fleet_telemetry_reports_total counter",
              f"edgeglm_fleet_telemetry_reports_total {store.counter('telemetry_reports')}",
              "# HELP edgeglm_fleet_telemetry_duplicates_total Telemetry reports dropped as a second copy of a "
              "stored one (same device and window end: a QoS 1 redelivery or a re-sent buffer).",
              "# TYPE edgeglm_fleet_telemetry_duplicates_total counter",
              f"edgeglm_fleet_telemetry_duplicates_total {store.counter('telemetry_duplicates')}"]
    if queued is not None:
        lines += ["# HELP edgeglm_fleet_telemetry_queued Telemetry reports received and not yet stored.",
                  "# TYPE edgeglm_fleet_telemetry_queued gauge", f"edgeglm_fleet_telemetry_queued {queued}"]
    lines += ["# HELP edgeglm_fleet_rejected_messages_total Device messages dropped: malformed, oversized, "
              "naming another device, or failing to be handled.",
              "# TYPE edgeglm_fleet_rejected_messages_total counter",
              f"edgeglm_fleet_rejected_messages_total {store.counter('rejected_messages')}",
              "# HELP edgeglm_fleet_telemetry_lost_reports_total Telemetry reports devices lost from their offline "
              "buffer during outages (their dropped_reports).",
              "# TYPE edgeglm_fleet_telemetry_lost_reports_total counter",
              f"edgeglm_fleet_telemetry_lost_reports_total {store.counter('telemetry_lost')}",
              "# HELP edgeglm_fleet_chunk_requests_limited_total Chunk requests dropped by the per-device rate limit.",
              "# TYPE edgeglm_fleet_chunk_requests_limited_total counter",
              f"edgeglm_fleet_chunk_requests_limited_total {store.counter('chunk_requests_limited')}",
              "# HELP edgeglm_fleet_chunk_answers_unservable_total Chunk requests answered with an error: the "
              "bundle offered changed or became unreadable after the offer (the controller's log names it).",
              "# TYPE edgeglm_fleet_chunk_answers_unservable_total counter",
              f"edgeglm_fleet_chunk_answers_unservable_total {store.counter('chunk_answers_unservable')}",
              "# HELP edgeglm_fleet_chunk_answers_too_large_total Chunk requests answered with an error: the chunk "
              "was over the broker's maximum packet size.",
              "# TYPE edgeglm_fleet_chunk_answers_too_large_total counter",
              f"edgeglm_fleet_chunk_answers_too_large_total {store.counter('chunk_answers_too_large')}",
              "# HELP edgeglm_fleet_rollouts Rollouts by phase.", "# TYPE edgeglm_fleet_rollouts gauge"]
    phases: dict[str, int] = {}
    for r in load_rollouts(store):
        phases[r.phase] = phases.get(r.phase, 0) + 1
    lines += [f'edgeglm_fleet_rollouts{{phase="{_label(p)}"}} {n}' for p, n in sorted(phases.items())]
    lines += _database_metrics(store)
    lines += ["# HELP edgeglm_fleet_broker_connected 1 while the controller is connected to the broker and "
              "processing its messages (/healthz).",
              "# TYPE edgeglm_fleet_broker_connected gauge", f"edgeglm_fleet_broker_connected {int(connected)}"]
    return "\n".join(lines) + "\n"


def _database_metrics(store: Store) -> list[str]:
    """The fleet database's size on disk (with its write-ahead log) and the free space where it lies: alert before
    the disk is full (a full disk loses every telemetry batch until space is freed; sizing: docs/scaling.md)."""
    try:
        size = sum(p.stat().st_size for p in (store.path, store.path.with_name(store.path.name + "-wal"))
                   if p.exists())
        free = shutil.disk_usage(store.path.parent).free
    except OSError:
        return []
    return ["# HELP edgeglm_fleet_database_bytes The fleet database's size on disk, its write-ahead log included.",
            "# TYPE edgeglm_fleet_database_bytes gauge", f"edgeglm_fleet_database_bytes {size}",
            "# HELP edgeglm_fleet_database_disk_free_bytes Free space on the file system of the fleet database.",
            "# TYPE edgeglm_fleet_database_disk_free_bytes gauge", f"edgeglm_fleet_database_disk_free_bytes {free}"]


def read_metrics_token(path: Path) -> str:
    """The bearer token /metrics requires, from `http.metrics_token_file` (surrounding whitespace stripped)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"http.metrics_token_file {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"http.metrics_token_file {path}: {'empty' if not token else 'contains whitespace'}; "
                         "put one token (e.g. `openssl rand -hex 32`) in it")
    return token


HTTP_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed (a half-sent request held a thread)
HTTP_MAX_CONNECTIONS = 32  # open at once; more are answered 503 at once and closed (probes and scrapes need few)


def serve_http(controller: FleetController, host: str, port: int, metrics_token: str | None = None):
    """/healthz (200 while connected to the broker with the MQTT network thread and the telemetry writer
    running: FleetController.health) and /metrics (with `metrics_token`: only for 'Authorization: Bearer
    <token>'), GET or HEAD, on a background thread. Connections are bounded in number and time: half-sent
    requests held a thread and a file handle each, for good, until the kubelet's probe and the MQTT reconnect
    found no file handle left."""
    import hmac
    import socket
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    state = {"expected": metrics_token.encode() if metrics_token else None}

    def authorized(header: str | None) -> bool:
        expected = state["expected"]
        if expected is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # the scheme is case-insensitive (RFC 7235): "bearer TOKEN" was refused; the token is compared as sent
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected)

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT_S

        def log_message(self, *args) -> None:
            pass

        def _answer(self, with_body: bool) -> None:
            connected, why = controller.health()
            headers = {}
            path = urlsplit(self.path).path  # "/metrics?x=1" is /metrics
            if path == "/healthz":
                code, body, ctype = (200 if connected else 503), f"{why}\n".encode(), "text/plain"
            elif path == "/metrics" and not authorized(self.headers.get("Authorization")):
                code, body, ctype = 401, b"/metrics needs 'Authorization: Bearer TOKEN' (http.metrics_token_file)\n", \
                    "text/plain"
                headers["WWW-Authenticate"] = 'Bearer realm="edgeglm-fleet"'
            elif path == "/metrics":
                try:
                    body = prometheus_metrics(reader, connected, controller.queued_telemetry).encode()
                    code, ctype = 200, "text/plain; version=0.0.4"
                except Exception as exc:  # a broken or locked database: an answer, and one line in the log
                    log.error("/metrics failed: the database %s could not be read (%s: %s)", controller.settings.db,
                              type(exc).__name__, exc)
                    code, ctype = 500, "text/plain"
                    body = f"the fleet database could not be read ({type(exc).__name__}); see the controller's log\n" \
                        .encode()
            else:
                code, body, ctype = 404, b"not found\n", "text/plain"
            self.send_response(code)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:  # uptime checkers use it: it was 501, a server error
            self._answer(with_body=False)

        def _not_allowed(self) -> None:
            body = b"only GET and HEAD: /healthz, /metrics\n"
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def __init__(self, *args):
            super().__init__(*args)
            self._slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
            self.refused = 0

        def process_request(self, request, client_address) -> None:
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                try:
                    request.settimeout(1.0)
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                    b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

        def handle_error(self, request, client_address) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):  # a client gone, or too slow
                log.debug("fleet HTTP: %s from %s: %s", type(exc).__name__, client_address[0], exc)
            else:  # one line, not the standard library's traceback on stderr
                log.error("fleet HTTP: a request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)

    server = Server((host, port), Handler)

    def set_metrics_token(token: str | None) -> None:  # a reload: the next scrape needs the new token
        state["expected"] = token.encode() if token else None

    server.set_metrics_token = set_metrics_token
    reader = Store(controller.settings.db)  # its own connection: a scrape never waits for the writer
    reader.silent_after_s = controller.settings.silent_after_s
    threading.Thread(target=server.serve_forever, name="fleet-http", daemon=True).start()
    return server
