"""The edge agent daemon: wiring of config, model, HTTP API, MQTT session, telemetry and OTA.

    Agent(cfg).start()    load the active model (verified, signed), start the HTTP API, connect
                          to MQTT, resume an interrupted update; an active slot that cannot be
                          served (signed by a key no longer trusted, corrupted, failing its golden
                          check) leaves the agent up without a model (HTTP 503 with the reason,
                          `model_error` in the state) until an OTA update installs one
    Agent.run(stop)       the loop: MQTT events (desired config, OTA offers, inference requests)
                          and the telemetry timer, until `stop` is set (SIGTERM, Ctrl-C)
    Agent.shutdown()      stop accepting requests, finish or cut in-flight ones within the
                          deadline, publish the offline state, disconnect

MQTT callbacks only queue events (agent/mqtt.py); everything happens on this loop's thread,
except inference requests and the update, which run on their own worker threads so that the
loop keeps answering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path

from pydantic import ValidationError

from agent import __version__
from agent.config import AgentConfig, canonical_settings, is_setting, join_problems, with_updates
from agent.errors import AgentError, ConfigError, ServeError
from agent.http_api import ApiServer, stream_tokens
from agent.http_api import configure_prefix_cache, make_prefix_cache
from agent.model import LoadedModel, load_model, register_execution_metric, set_execution_metric
from agent.mqtt import Delivery, MqttSession, PayloadRejected, Received
from agent.openai_compat import (ApiError, Outcome, chat_request, completion_request, generate_text, prompt_ids,
                                  with_special_stops)
from agent.remote_config import (LOCAL_CEILINGS, REMOTE_SETTINGS, local_only_keys,  # noqa: F401 (re-exported)
                                 named_keys, remote_config_problems)
from agent.selftest import SelfTestConfig, run_self_test
from agent.telemetry import LatencyWindow, device_health, serving_label
from agent.topics import (DesiredConfig, ErrorInfo, InferenceRequest, InferenceResponse, ModelRef, ReportedState,
                          Usage, chunk_request_topic, chunk_response_topic, desired_topic, health_topic,
                          infer_request_topic, infer_response_problem, ota_offer_topic, ota_status_topic)
from ota.bundle import MANIFEST, open_bundle
from ota.errors import BundleError, SignatureError
from ota.fsutil import atomic_write_json
from ota.offers import DirectoryFetcher
from ota.signing import load_trusted_keys, slot_signers, verify_bundle_signature
from ota.transfer import OFFER_MAX_BYTES, MqttChunkFetcher
from ota.update import Offer, State, UpdateFailed, UpdateInterrupted, Updater, UpdaterDeps
from runtime.batching import SchedulerClosed
from runtime.engine import architecture_problem, available_backends
from runtime.errors import RequestError, RuntimeUserError, Stopped
from runtime.probe import device_report, probe_hardware

log = logging.getLogger("edgeglm.agent")
REQUEST_MEMORY, REQUEST_MEMORY_S = 256, 600.0  # MQTT inference requests remembered against second copies
RETRYABLE = {"busy", "model_unavailable", "internal", "timeout"}  # a copy of a request answered so is generated anew
# the answers telemetry counts as errors of the model (HTTP: status >= 500); a bad request or a busy answer is not,
# nor a request stopped at its deadline: the requester's timeout_s or MQTT expiry, whose wait may be a model swap's
SERVER_ERRORS = {"model_unavailable", "internal"}
OTA_STOP_WAIT_S = 5.0  # a stopping agent's wait for the OTA thread to reach a resumable point (_let_update_stop)


class _OfferFetcher:
    """Chooses the fetcher by the offer's source: `mqtt` (the controller's chunk server) or `dir`."""

    def __init__(self, mqtt: MqttChunkFetcher | None):
        self.mqtt, self.dir = mqtt, DirectoryFetcher()

    def read_chunk(self, offer: Offer, path: str, index: int, chunk_size: int) -> bytes:
        kind = offer.source.get("type", "mqtt")
        if kind == "dir":
            return self.dir.read_chunk(offer, path, index, chunk_size)
        if kind == "mqtt" and self.mqtt is not None:
            return self.mqtt.read_chunk(offer, path, index, chunk_size)
        raise UpdateFailed(f"offer source type {kind!r} cannot be fetched by this agent (mqtt, dir)")


# an absolute path in a message: "/" at the start or after a space, quote, bracket, "=" or "<", up to a space,
# quote, colon, comma, semicolon, bracket or ">" (a URL's "//host" is left alone)
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(\[=<])/(?:[^\s'\":,;()\[\]<>/]+/)*([^\s'\":,;()\[\]<>/]+)/?")


def without_paths(text: str, roots: tuple[Path, ...] = ()) -> str:
    """`text` without absolute paths: one under a directory of `roots` made relative to it ("slots/a/
    manifest.sig" under model.slots_dir), any other cut to its last part. /readyz and the 503s say why no
    model serves to anyone who can reach the HTTP API, not the box's directory layout (the full reason is in
    the agent's log and in its reported state, to the fleet)."""
    for root in roots:
        text = text.replace(f"{str(root).rstrip('/')}/", "")  # (the trailing "/": not a root's namesake)
    return _ABSOLUTE_PATH.sub(r"\1", text)


class _AgentApiServer(ApiServer):
    """The HTTP API; while no model serves because the active one was refused, /readyz and the inference
    endpoints' 503 say why (without absolute paths: `without_paths`)."""

    model_problem: str | None = None
    no_model_installed = False  # no bundle in the slots: a box waiting for its first OTA update

    def readiness(self, no_model_ok: bool = False) -> tuple[bool, str]:
        ready, reason = super().readiness()
        problem = self.model_problem
        if not ready and problem and self.current_model() is None and not self._stopping.is_set():
            reason = f"{reason}: {problem}"
        elif not ready and no_model_ok and self.no_model_installed and self.current_model() is None \
                and not self._stopping.is_set():
            return True, "no model installed yet: waiting for the first OTA update"
        return ready, reason

    def mqtt_request(self):
        """Counts an MQTT inference request in progress as an HTTP one, answer included: shutdown lets it
        finish within its deadline, then cuts it (answered "the agent is shutting down"), before the MQTT
        session closes. (Uncounted, a request in flight at SIGTERM was never answered.)"""
        return self._request()


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.local_cfg = cfg  # the box's own config: what the desired config may not override (REMOTE_SETTINGS)
        self.started = time.monotonic()  # uptime: never negative when the wall clock is set back
        # this run of the agent, in its states: the controller orders two states of one run by uptime, not by `ts`
        self.run_id = secrets.token_hex(8)
        # the run's first telemetry window starts with it: the controller tells a run's first window by its start
        # (fleet.controller.RUN_START_SLACK_S), so that the time before it is not counted missing
        self.window = LatencyWindow()
        self.hardware = probe_hardware()
        self.http = _AgentApiServer(cfg.http, cfg.sampling, window=self.window, batching=cfg.batching)
        # in memory until start() has checked model.slots_dir (its directory on disk is set there: a warning that
        # the cache directory cannot be made came before the one-line error about the state dir itself)
        self.prefix_cache = make_prefix_cache(cfg.cache.model_copy(update={"persist": False}), cfg.model.slots_dir)
        self.http.set_prefix_cache(self.prefix_cache)
        self._path_metric, self._path_labels = register_execution_metric(self.http.metrics.registry), None
        self.http.metrics.collectors.append(self._observe_session)
        self.session: MqttSession | None = None
        self.updater: Updater | None = None
        self._state_lock = None  # the open agent.lock of model.slots_dir (hold_state_dir), held while running
        self.model: LoadedModel | None = None
        self.applied_config_version: int | None = None
        self._applied_settings: dict | None = None  # the settings of that version, as received
        # the newest desired config received, applied or not: a reload tries it again (the box's own config may
        # now allow what it refused)
        self._latest_desired: DesiredConfig | None = None
        self.last_config_error: str | None = None
        self._error_is_the_desired_ones = False  # last_config_error is about the retained desired config received
        self.model_error: str | None = None  # why the active slot's model is not served (None: no problem)
        self.signing_keys: dict | None = None  # hardware.keys (`_signing_keys`), read again each telemetry window
        self._keys_lock = threading.Lock()  # one read-and-set at a time: the main loop's could set the old slots'
        self._chunk_fetcher: MqttChunkFetcher | None = None
        self._ota_thread: threading.Thread | None = None
        self._ota_lock = threading.Lock()
        self._next_offer: Offer | None = None  # the latest offer that came while an update ran: taken after it
        # OTA outcomes published and not yet acknowledged by the broker: their record in the state dir goes when
        # they are (ota/update.py REPORT); one never acknowledged is published again at the next start
        self._reports_in_flight: list[tuple[Delivery, dict]] = []
        self._reports_lock = threading.Lock()
        self._last_telemetry = time.monotonic()
        self._last_health = float("-inf")  # the first telemetry after the start carries the first health
        self._serving_since = time.monotonic()  # when the model served now was activated
        # MQTT inference requests taken lately: (reply topic, id, payload hash) -> (when, answer or None)
        self._requests: OrderedDict[tuple, tuple] = OrderedDict()
        self._requests_lock = threading.Lock()

    # --- model --------------------------------------------------------------------------------
    def _trusted_keys(self) -> dict:
        try:
            return load_trusted_keys([self.cfg.ota.trusted_keys], warn_private=True)
        except BundleError as exc:
            raise ServeError(f"{exc} (set ota.trusted_keys to the directory of the fleet's *.pub keys; for "
                             "unsigned development bundles only, set ota.require_signature = false)") from None

    def _rollback_keys(self) -> dict | None:
        """The keys trusted for rollback statements only (None: ota.rollback_keys unset, the bundle keys)."""
        if self.cfg.ota.rollback_keys is None:
            return None
        try:
            keys = load_trusted_keys([self.cfg.ota.rollback_keys], warn_private=True)
        except BundleError as exc:
            log.warning("rollbacks will be refused: %s (ota.rollback_keys)", exc)
            return {}
        return keys

    def _load(self, path: Path, stop: threading.Event | None = None) -> LoadedModel:
        """Load a bundle for serving: signature checked over the manifest's bytes, then every file checked
        against those same bytes (the manifest is read once). `stop`: see `activate`."""
        bundle = open_bundle(path, verify=False)
        if self.cfg.ota.require_signature:
            verify_bundle_signature(bundle, self._trusted_keys(), previous=True)
        # backend auto: the measured autotune, cached per (bundle, hardware) under the state dir
        return load_model(bundle, self.cfg.model.backend, self.cfg.model.threads, hardware=self.hardware,
                          cache_dir=Path(self.cfg.model.slots_dir), prefill_graph=self.cfg.model.prefill_graph,
                          device=self.cfg.model.device, stop=stop)  # results in <slots_dir>/autotune/

    def activate(self, path: Path | None, stop: threading.Event | None = None) -> None:
        """Serve the model in `path` (after its golden check); None serves nothing. `stop` (start's): set while
        the autotune measures, it ends with runtime.errors.Stopped and nothing changes."""
        if path is None:
            self.model = None
            self.http.set_model(None, None)
        else:
            model = self._load(path, stop)
            golden = model.golden_check()
            if not golden.passed:
                raise ServeError(f"{path}: golden check failed on {model.backend}: {golden.describe()}")
            self.model = model
            self.http.set_model(model, golden)
            self.http.no_model_installed = False
            self._serving_since = time.monotonic()  # (the probation of a committed model counts from here)
        # telemetry: what was served until now is reported under the model that served it, not this one
        self.window.switch(serving_label(self.model))
        self._set_model_error(None)
        self._path_labels = set_execution_metric(self._path_metric, self.model, self._path_labels)
        self._refresh_signing_keys()
        self._publish_state()

    def _signing_keys(self) -> dict:
        """`hardware.keys` of the reported state: the ids of the keys this box trusts, of those signing the model
        it serves (`serving`; None: no model served) and the other slot's model, the one a rollback goes back
        to (`rollback`; None: that slot is empty). A key that alone signs a box's serving or rollback model
        cannot be removed from that box without it refusing that model (`edgeglm fleet status` counts them)."""
        try:
            trusted = load_trusted_keys([self.cfg.ota.trusted_keys], quiet=True)
        except BundleError:  # none loads (the agent's loads say why)
            trusted = {}
        m = self.model
        keys = {"trusted": sorted(trusted),
                "serving": slot_signers(m.bundle.root, m.bundle.manifest_bytes, trusted) if m else None,
                "rollback": None,
                # false: this box serves a model no trusted key signs (ota.require_signature = false), not refuses it
                "required": bool(self.cfg.ota.require_signature)}
        if self.updater is not None:
            other = self.updater.slots.path(self.updater.slots.inactive())
            try:
                keys["rollback"] = slot_signers(other, (other / MANIFEST).read_bytes(), trusted)
            except OSError:  # an empty slot
                pass
        return keys

    def _refresh_signing_keys(self) -> bool:
        """Read the keys of `hardware.keys` again; whether they changed (a key added or removed on the box, a
        slot's signature replaced by an update)."""
        with self._keys_lock:  # (the OTA thread's, after an update, and the main loop's: the last read is the newest)
            try:
                keys = self._signing_keys()
            except Exception:  # noqa: BLE001 a report must never stop the agent
                log.debug("reading the signing keys for the state failed", exc_info=True)
                return False
            changed, self.signing_keys = keys != self.signing_keys, keys
        return changed

    def _set_model_error(self, reason: str | None) -> None:
        self.model_error = reason
        roots = tuple(p for p in (self.cfg.model.slots_dir, self.cfg.ota.trusted_keys) if Path(p).is_absolute())
        self.http.model_problem = reason and without_paths(reason, roots)

    def _initial_model_path(self) -> Path | None:
        if self.cfg.model.bundle is not None:
            return Path(self.cfg.model.bundle)
        return self.updater.slots.active_path() if self.updater else None

    def _activate_active_slot(self, fallback: bool = True, stop: threading.Event | None = None) -> None:
        """Serve the active slot's model at start. If it cannot be served (a bundle signed by a key that was
        removed from ota.trusted_keys, a corrupted file, a failed golden check, a load error), serve the other
        slot's model if that one verifies (`current` is flipped to it, so that the next update installs over
        the refused one; not with `fallback` False: an update in progress owns the other slot); else serve
        nothing, and say why, while MQTT and OTA run so that a new bundle can be installed over the air.
        Crashing here would crash-loop the box out of reach of any update. A stop asked meanwhile (`stop`)
        ends it with Stopped: that is no reason to refuse a model."""
        slots = self.updater.slots
        active = slots.active()
        try:
            self.activate(slots.path(active), stop)
            return
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001: whatever the reason, the agent must stay reachable
            reason = self._unservable(active, exc)
        other = slots.inactive()
        if fallback and (slots.path(other) / MANIFEST).is_file():
            try:
                self.activate(slots.path(other), stop)
            except Stopped:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("the model in slot %s cannot be served either: %s", other, exc)
            else:
                slots.activate(other)
                self._set_model_error(f"{reason}; serving the previous model from slot {other} instead")
                log.warning("%s", self.model_error)
                return
        self._set_model_error(f"{reason}; waiting for an OTA update with a bundle signed by a trusted key")
        log.error("no model served: %s (HTTP answers 503 until an update installs one)", self.model_error)

    def _unservable(self, slot: str, exc: Exception) -> str:
        if not isinstance(exc, (RuntimeUserError, BundleError, AgentError)):
            log.error("loading the model in slot %s failed", slot, exc_info=exc)
        kind = "is refused" if isinstance(exc, SignatureError) else "cannot be served"
        return f"the model in slot {slot} {kind}: {exc}"

    # --- state --------------------------------------------------------------------------------
    def reported_state(self, online: bool = True) -> ReportedState:
        m = self.model
        return ReportedState(
            device=self.cfg.device.id, online=online, agent_version=__version__,
            hardware={"cpu": self.hardware.cpu.model, "cores": self.hardware.cpu.logical_cores,
                      "features": list(self.hardware.cpu.features), "fingerprint": self.hardware.fingerprint(),
                      "backends": available_backends(), "devices": device_report(self.hardware),
                      "execution": m.execution_info() if m else None,  # backend, device, threads, hints
                      # why the active slot's model is not served (ReportedState has no field of its own)
                      "model_error": self.model_error,
                      # (here, not a field of its own: controllers before it refuse unknown fields)
                      "run": self.run_id, "keys": self.signing_keys},
            execution_path=self._execution_path(),
            model=ModelRef(name=m.bundle.manifest.name, version=m.bundle.manifest.version, sha256=m.bundle.sha256)
            if m else None,
            active_slot=self.updater.slots.active() if self.updater else None,
            applied_config_version=self.applied_config_version, last_config_error=_bounded(self.last_config_error),
            uptime_s=time.monotonic() - self.started, ts=time.time())

    def _execution_path(self) -> str | None:
        """e.g. "onnxruntime:cpu" or "openvino:gpu"."""
        return serving_label(self.model)[1]

    def _publish_state(self) -> None:
        if self.session is not None:
            self.session.publish_state()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, stop: threading.Event | None = None) -> None:
        """Start serving. `stop` (SIGTERM's): set while the model's execution path is measured (a first start's
        autotune can take minutes, more than systemd's TimeoutStopSec), start ends with runtime.errors.Stopped
        within a fraction of a second; `shutdown` then stops what had started."""
        cfg = self.cfg
        unreadable = cfg.mqtt.tls.unreadable() if cfg.mqtt.enabled and cfg.mqtt.tls is not None else []
        if unreadable:  # before the model loads; paho's error names no file, and the session would retry it forever
            raise ConfigError(f"{'; '.join(unreadable)}: the agent cannot connect to the broker over TLS "
                              "without it; fix the path, the file or its permissions")
        slots_dir = Path(cfg.model.slots_dir)
        probation_result = None
        if cfg.model.bundle is None or cfg.mqtt.enabled:
            if slots_dir.exists() and not slots_dir.is_dir():
                raise ServeError(f"model.slots_dir {slots_dir}: exists and is not a directory; set model.slots_dir "
                                 "to a directory (it is made if missing)")
            try:
                slots_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServeError(f"model.slots_dir {slots_dir}: cannot be created ({exc.strerror or exc}); set "
                                 "model.slots_dir to a writable directory") from None
            self._state_lock = hold_state_dir(slots_dir)
            self.updater = Updater(slots_dir, self._updater_deps())
            # before the active slot's model is loaded: a model that keeps killing the agent is not loaded again
            if cfg.model.bundle is None:  # (a bundle named directly is served instead of the slots)
                try:
                    probation_result = self.updater.check_probation()
                except OSError as exc:  # a disk error: the agent serves what `current` names, and OTA stays usable
                    log.error("the probation check failed (%s); the active slot's model is served as it is", exc)
        if cfg.ota.require_signature and cfg.model.bundle is not None:
            self._trusted_keys()  # the bundle named to serve cannot be verified without them: stop before binding
        configure_prefix_cache(self.prefix_cache, cfg.cache, cfg.model.slots_dir)  # its directory, now checked
        self.http.start()
        log.info("HTTP API on %s", self.http.url)
        path = self._initial_model_path()
        # an update interrupted by a restart (power cut, SIGKILL) resumes below; until it switches models, the
        # active slot's model serves, as it did before. Only COMMITTING and ROLLBACK load a model themselves.
        resuming = self.updater is not None and self.updater.state is not State.IDLE
        if path is not None and (not resuming or cfg.model.bundle is not None
                                 or self.updater.state not in (State.COMMITTING, State.ROLLBACK)):
            if cfg.model.bundle is not None:
                self.activate(path, stop)  # a bundle named on the command line or in the config: an error stops it
            else:
                # while an update is in progress the other slot is its target: never served in its place
                self._activate_active_slot(fallback=not resuming, stop=stop)
        if stop is not None and stop.is_set():
            raise Stopped("the agent was asked to stop while it started")
        elif path is None:
            self.http.no_model_installed = True
            log.warning("no model yet: waiting for an OTA update (HTTP answers 503 until then)")
        if self.updater is not None:  # the fleet's layer applied before the restart, before the broker's copy
            self._restore_desired()
        self._refresh_signing_keys()  # (no model activated: the keys are still reported)
        if cfg.mqtt.enabled:
            d = cfg.device
            self.session = MqttSession(cfg.mqtt, fleet=d.fleet, device=d.id, state_fn=self.reported_state)
            self.session.subscribe(desired_topic(d.fleet, d.id), DesiredConfig, empty_ok=True)
            self.session.subscribe(ota_offer_topic(d.fleet, d.id), Offer, empty_ok=True,
                                   max_bytes=max(cfg.mqtt.max_payload_bytes, OFFER_MAX_BYTES))
            # an empty message clears a request published retained by mistake: nothing to answer or log
            self.session.subscribe(infer_request_topic(d.fleet, d.id), InferenceRequest, empty_ok=True)
            self.session.start()
        if probation_result is not None:
            self._report_ota(probation_result)  # logged; held by the session until it connects (retained)
        elif self.updater is not None and self.session is None:
            # no broker to tell (mqtt.enabled = false): an outcome kept now would be published, stale, by the first
            # start with MQTT on, and read as the device's latest
            self.updater.discard_report()
        elif self.updater is not None and self.session is not None:
            # an outcome the broker never acknowledged: the agent was killed (or stopped with the broker away)
            # after the update or the rollback was over: published again, not lost (an update resuming in its
            # REPORTING state reports by itself)
            last = self.updater.undelivered_report()
            if last is not None and (self.updater.state is State.IDLE
                                     or last.get("update_id") != self.updater.data.get("update_id")):
                log.info("the outcome of OTA update %s (%s) had not reached the broker when the agent stopped; "
                         "published again", last.get("update_id"), last.get("result"))
                self._report_ota(last)
        if self.updater is not None and self.updater.state is not State.IDLE:
            log.info("resuming the interrupted update %s in state %s", self.updater.data.get("update_id"),
                     self.updater.state.value)
            self._start_update(None)

    def run(self, stop: threading.Event, reload: threading.Event | None = None, read_config=None) -> None:
        """Serve until `stop`. When `reload` is set (SIGHUP), the box's config is read again with `read_config`
        and applied (`reload`); a config that does not load is logged and the running one kept."""
        while not stop.is_set():
            if reload is not None and reload.is_set():
                reload.clear()
                try:
                    self.reload(read_config())
                except (ConfigError, OSError) as exc:
                    log.error("config reload refused, the running config is kept: %s", exc)
            event = self.session.get_event(timeout=0.2) if self.session else (stop.wait(0.2) and None)
            try:
                if isinstance(event, Received):
                    self._dispatch(event)
                elif isinstance(event, PayloadRejected):
                    self._rejected(event)
            except Exception:  # one bad event must not stop the agent: log it, count it, go on
                log.exception("handling an MQTT event failed")
                self.window.record_error()
            try:
                self._forget_delivered_reports()
            except Exception:  # a report's record stays (published again at the next start); the agent serves on
                log.exception("checking the delivery of OTA outcomes failed")
            if self.session and time.monotonic() - self._last_telemetry >= self.cfg.telemetry.interval_s:
                self._send_telemetry()
                if self._refresh_signing_keys():  # a key added or removed on the box: the fleet sees it
                    self._publish_state()
            if self._next_offer is not None and not self._update_running():
                self._start_update(None, follow_up=True)
            self._end_probation()

    def _end_probation(self) -> None:
        """The model committed last has served `ota.probation_s` in this run: its probation is over."""
        u = self.updater
        if u is None or u.probation is None or self.model is None or self._update_running():
            return
        if u.probation["slot"] == u.slots.active() and \
                time.monotonic() - self._serving_since >= self.cfg.ota.probation_s:
            u.pass_probation()

    def shutdown(self, deadline: float = 10.0) -> None:
        if self.updater is not None:
            self.updater.stopping.set()  # before the session closes: an update in progress resumes at the next start
        # while requests in flight finish, MQTT messages still come: inference requests among them are answered
        # "shutting down" (retryable) instead of being acknowledged to the broker and then lost with the process
        drained, drainer = threading.Event(), None
        if self.session is not None:
            drainer = threading.Thread(target=self._refuse_while_stopping, args=(drained,), name="mqtt-drain",
                                       daemon=True)
            drainer.start()
        self.http.shutdown(deadline)
        if self.session is not None:
            drained.set()
            drainer.join(timeout=2.0)
            self._refuse_while_stopping(None)  # what came since: the queue, emptied once more
            self._send_telemetry(final=True)
            self.session.close(publish_offline=True)
            try:  # (acknowledged while it closed; the others go again at the next start)
                self._forget_delivered_reports()
            except Exception:
                log.exception("checking the delivery of OTA outcomes failed")
        self._let_update_stop()
        if self.updater is not None:
            # no death of a model on probation: said last, so that a shutdown that hangs until systemd's SIGKILL
            # (TimeoutStopSec) still counts as the unclean end it is
            self.updater.stopped_cleanly()
        if self._state_lock is not None:
            self._state_lock.close()  # the state dir is free for the next agent
            self._state_lock = None

    def _let_update_stop(self, wait_s: float = OTA_STOP_WAIT_S) -> None:
        """Give the OTA thread `wait_s` to stop where it is (a chunk being waited for is cancelled with the session;
        the state machine stops before its next state): the process ended under it before, so its last chunk could
        be half written and "resumes at the next start" was never logged. A step that takes longer (hashing a large
        file, a self-test) is left to end with the process; its state on disk is from before that step."""
        thread = self._ota_thread
        if thread is None or not thread.is_alive():
            return
        thread.join(timeout=wait_s)
        if thread.is_alive():
            log.info("update %s is still in state %s after %.0f s: the agent stops anyway, and the update resumes "
                     "from that state at the next start", self.updater.data.get("update_id"),
                     self.updater.state.value, wait_s)

    def _refuse_while_stopping(self, done: threading.Event | None) -> None:
        """Answer the inference requests that come while the agent stops (until `done`; None: those queued now)
        with `model_unavailable`, which a requester sends again. Desired configs and offers are retained: the
        broker hands them again at the next start."""
        while True:
            event = self.session.get_event(timeout=0.2 if done is not None else 0)
            if event is None:
                if done is None or done.is_set():
                    return
                continue
            try:
                if isinstance(event, Received) and isinstance(event.payload, InferenceRequest):
                    if self._answerable(event.message):
                        log.info("MQTT inference request %r came while the agent stops: answered "
                                 "model_unavailable", event.payload.id[:64])
                        self._respond(event.message, event.payload, InferenceResponse(
                            id=event.payload.id, error=ErrorInfo(code="model_unavailable", message=(
                                "the agent is shutting down; send the request again (to this device once it is "
                                "back, or to another)"))))
                elif isinstance(event, PayloadRejected):
                    self._rejected(event)
            except Exception:  # noqa: BLE001: one bad message must not stop the shutdown
                log.exception("answering an MQTT message while stopping failed")

    # --- events -------------------------------------------------------------------------------
    def _dispatch(self, event: Received) -> None:
        payload = event.payload
        if isinstance(payload, DesiredConfig):
            self._apply_desired(payload)
        elif isinstance(payload, Offer):
            self._start_update(payload)
        elif payload is None and event.message.topic == ota_offer_topic(self.cfg.device.fleet, self.cfg.device.id):
            with self._ota_lock:  # the retained offer was cleared: one waiting for the running update goes too
                self._next_offer = None
        elif payload is None and event.message.topic == desired_topic(self.cfg.device.fleet, self.cfg.device.id):
            # the retained desired config was cleared (the applied one stays): why that one was refused is no
            # longer news, and the fleet would keep showing it
            if self.last_config_error is not None and self._error_is_the_desired_ones:
                self.last_config_error, self._error_is_the_desired_ones = None, False
                self._publish_state()
        elif isinstance(payload, InferenceRequest):
            if self._answerable(event.message) and self._first_copy(event.message, payload):
                threading.Thread(target=self._infer, args=(event.message, payload), daemon=True).start()

    def _first_copy(self, message, req: InferenceRequest) -> bool:
        """Whether this request is not a second copy of one taken in the last REQUEST_MEMORY_S (same response
        topic, id and payload: a QoS 1 redelivery after a reconnect, or a requester's retry). A copy of one still
        running is dropped (one answer comes); a copy of one answered gets the same answer again, without
        generating it twice. The same id with another payload is a new request."""
        key = (self.session.reply_target(message).topic, req.id, hashlib.sha256(message.payload).digest())
        now = time.monotonic()
        with self._requests_lock:
            while self._requests and (len(self._requests) > REQUEST_MEMORY or
                                      now - next(iter(self._requests.values()))[0] > REQUEST_MEMORY_S):
                self._requests.popitem(last=False)
            seen = self._requests.get(key)
            if seen is None:
                self._requests[key] = (now, None)
                return True
        if seen[1] is None:
            log.info("MQTT inference request %r came again while it is answered (a QoS 1 redelivery or a retry): "
                     "answered once", req.id[:64])
        else:
            log.info("MQTT inference request %r came again after its answer: the same answer is sent again",
                     req.id[:64])
            self._respond(message, req, seen[1])
        return False

    def _answerable(self, message) -> bool:
        """Whether an inference request (valid or not) gets an answer; if not, why is logged."""
        d = self.cfg.device
        target = self.session.reply_target(message)
        if message.retain:  # handed again at every (re)subscription, i.e. every reconnect and restart
            problem = (f"is a retained message on {message.topic}: not answered (the broker would hand it again at "
                       "every reconnect); clear it with an empty retained message on that topic")
        elif target is None:
            unusable = self.session.response_topic_problem(message)
            problem = (f"names a response topic the broker would refuse: {unusable}" if unusable else
                       "names no response topic one can publish to (neither the MQTT 5 property nor reply_to in the "
                       "payload)")
        else:
            problem = infer_response_problem(d.fleet, d.id, target.topic)
        if problem is None:
            return True
        request_id = f" {target.id!r}"[:70] if target is not None and target.id else ""
        log.warning("MQTT inference request%s %s; it is dropped unanswered", request_id, problem)
        return False

    def _rejected(self, event: PayloadRejected) -> None:
        """A malformed, oversized or wrong-type payload: counted by the session (`stats.payload_errors`; not in
        telemetry's errors, which are the model's: a client's mistake must not fail a canary); an inference request
        gets an error answer."""
        d = self.cfg.device
        if event.message.topic == infer_request_topic(d.fleet, d.id):
            target = self.session.reply_target(event.message)
            if target is not None and self._answerable(event.message):
                # an id the response cannot carry (over 128 characters) is what the error is about
                request_id = target.id if target.id and len(target.id) <= 128 else "unknown"
                self.session.respond(event.message, InferenceResponse(
                    id=request_id, error=ErrorInfo(code="bad_request", message=str(event.error))))
                self.http.metrics.mqtt_answers.inc(outcome="bad_request")
        elif event.message.topic == desired_topic(d.fleet, d.id):
            self.last_config_error, self._error_is_the_desired_ones = f"desired config refused: {event.error}", True
            self._publish_state()
        elif event.message.topic == ota_offer_topic(d.fleet, d.id):
            # a rollout waits for this device's result: say why the offer was not taken, or it waits forever
            try:
                update_id = json.loads(event.message.payload).get("update_id")
            except (ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested past Python's limit
                update_id = None
            reason = f"offer refused before any check: {event.error}"
            log.warning("OTA %s", reason)
            printable = isinstance(update_id, str) and re.fullmatch(r"[!-~]{1,128}", update_id)  # no forged log lines
            self._report_ota({"update_id": update_id if printable else None, "ts": time.time(),
                              "state": "idle", "result": "failed", "reason": reason})

    def _apply_desired(self, desired: DesiredConfig) -> None:
        """The desired config is the fleet's whole layer over the box's own config (not a change to the
        running one): the broker keeps only the latest, so a box that restarts or was offline gets the same
        config as one that saw every version. Older than the one applied (a stale retained copy, a controller
        whose clock or --version went back), or the applied version with other settings: not applied, and
        `last_config_error` says so (the fleet sees the box keeps another config than the latest one)."""
        applied = self.applied_config_version
        if self._latest_desired is None or desired.version >= self._latest_desired.version:
            self._latest_desired = desired
        if desired.version == applied and desired.settings == self._applied_settings:
            if self.last_config_error is not None:  # the latest desired config is the one applied
                self.last_config_error = None
                self._publish_state()
            return
        if applied is not None and desired.version <= applied:
            reason = ("with other settings than the ones applied under that version" if desired.version == applied
                      else f"version {applied}, newer, is applied")
            self.last_config_error = (f"desired config version {desired.version} ignored: {reason}; publish the "
                                      f"change with a version above {applied}")
            self._error_is_the_desired_ones = True
            log.warning("%s", self.last_config_error)
            self._publish_state()
            return
        try:  # all or nothing: no part of a refused update is applied
            # first the settings the fleet may not touch, even at the value they have (their values' own checks,
            # e.g. a password without a username, would send the fleet to fix what it may not set at all)
            settings = canonical_settings(desired.settings)  # `SAMPLING` is `sampling`, as in the file
            named = [f"{key} is local-only and cannot be changed by the desired config; set it in the agent's "
                     "config file" for key in local_only_keys(settings) if is_setting(key)]
            if named:
                raise ConfigError(join_problems(named))
            new = with_updates(self.local_cfg, settings)  # names what is not a setting, or has a bad value
            problems = remote_config_problems(self.local_cfg, self.local_cfg, new)
            if problems:
                raise ConfigError(join_problems(problems))
        except ConfigError as exc:
            kept = f"version {applied} stays applied" if applied is not None else "the box's own config stays"
            self.last_config_error = f"desired config version {desired.version} refused: {exc}; {kept}"
            self._error_is_the_desired_ones = True
            log.warning("%s", self.last_config_error)
        else:
            self._use(new)
            self.applied_config_version, self.last_config_error = desired.version, None
            self._applied_settings = desired.settings
            self._remember_desired(desired)
            log.info("desired config version %s applied: %s", desired.version,
                     ", ".join(named_keys(desired.settings)) or "no settings (the box's own config)")
        self._publish_state()

    def _use(self, new: AgentConfig) -> None:
        """Run with `new` from now on: the settings that apply live (LIVE_SETTINGS) take effect at once."""
        self.cfg = new
        logging.getLogger().setLevel(new.log_level.upper())  # live
        self.http.sampling = new.sampling  # live: sampling defaults; telemetry interval is read each loop
        configure_prefix_cache(self.prefix_cache, new.cache, new.model.slots_dir)  # live: evicts to a new bound
        self.http.set_batching(new.batching)  # live: the batch limits apply at the next decode step
        if self._chunk_fetcher is not None:  # live: from the next chunk on
            self._chunk_fetcher.timeout_s, self._chunk_fetcher.give_up_s = new.ota.chunk_timeout_s, new.ota.give_up_s
        # (ota.trusted_keys and ota.rollback_keys are read at each model load and offer; probation at each check)

    def reload(self, new_local: AgentConfig) -> list[str]:
        """The box's own config read again (SIGHUP, `systemctl reload edgeglm-agent`): the settings that apply live
        (LIVE_SETTINGS) take effect now, under the fleet's desired config as before; the others (the HTTP
        address, the MQTT connection, the model and state paths, the device id, ...) keep their running value
        until the next restart, and are named in a warning. Returns the dotted names of those kept."""
        old, merged = self.local_cfg.model_dump(), new_local.model_dump()
        changed = _changed_settings(old, merged)
        later = [k for k in changed if not is_live(k)]
        for key in later:  # the running value stays until a restart
            _set_dotted(merged, key, _get_dotted(old, key))
        local = AgentConfig.model_validate(merged)
        if later:
            log.warning("config reload: %s changed; applied at the next restart (systemctl restart edgeglm-agent)",
                        ", ".join(later))
        live = [k for k in changed if is_live(k)]
        log.info("config reload: %s", f"applied {', '.join(live)}" if live else "no setting that applies live changed")
        self.local_cfg = local
        latest = self._latest_desired
        if latest is not None and (self.applied_config_version is None or latest.version > self.applied_config_version):
            # the newest desired config, refused before (or dropped by an earlier reload): the reloaded config may
            # allow it now (the broker does not send its retained copy again, so nothing else would bring it back);
            # tried first, so that the box never runs its bare config between the old layer and the new one
            self._apply_desired(latest)
            if self.applied_config_version == latest.version:
                return later
        new = local
        if self._applied_settings is not None:  # the fleet's layer stays on top of the box's own config
            try:
                new = with_updates(local, self._applied_settings)
                problems = remote_config_problems(local, local, new)
                if problems:
                    raise ConfigError(join_problems(problems))
            except ConfigError as exc:
                new = local
                self.last_config_error = (f"desired config version {self.applied_config_version} no longer applies "
                                          f"over the box's reloaded config: {exc}; the box's own config applies")
                self._error_is_the_desired_ones = False
                log.warning("%s", self.last_config_error)
                self.applied_config_version, self._applied_settings = None, None
        self._use(new)
        self._publish_state()
        return later

    def _remember_desired(self, desired: DesiredConfig) -> None:
        """Keep the applied desired config in the state dir: after a restart it is applied again before the
        broker's retained one arrives, so a latest version this box refuses does not leave it on its own
        config alone (it kept the version it had applied while running)."""
        if self.updater is None:  # no state dir in use (a bundle served without MQTT)
            return
        try:
            atomic_write_json(Path(self.cfg.model.slots_dir) / DESIRED_APPLIED, desired.model_dump(mode="json"))
        except OSError as exc:
            log.warning("desired config version %s applied but not kept for a restart: %s", desired.version, exc)

    def _restore_desired(self) -> None:
        path = Path(self.cfg.model.slots_dir) / DESIRED_APPLIED
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_bytes())
            if isinstance(data, dict):  # fields a newer edgeglm may add are left out, not a reason to drop the file
                data = {k: v for k, v in data.items() if k in DesiredConfig.model_fields}
            desired = DesiredConfig.model_validate(data)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors()[:3])
            log.warning("%s: unreadable (%s); the fleet's desired config comes again from the broker", path, why)
            return
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("%s: unreadable (%s); the fleet's desired config comes again from the broker", path,
                        str(exc).splitlines()[0])
            return
        log.info("desired config version %s, applied before the restart, applied again", desired.version)
        self._apply_desired(desired)

    def _send_telemetry(self, final: bool = False) -> None:
        self._last_telemetry = time.monotonic()
        for report in self.window.take(self.cfg.device.id, final=final):
            if not self.cfg.telemetry.histograms:
                report._histograms = None
            if self.session is not None:
                self.session.publish_telemetry(report)
        every = self.cfg.telemetry.health_interval_s
        if self.session is not None and not final and self.session.connected and every > 0 and \
                self._last_telemetry - self._last_health >= every:
            self._last_health = self._last_telemetry  # (so that it goes with the report every `every` s, not later)
            try:
                interval = self.cfg.telemetry.interval_s  # health goes with the first report `every` s later
                health = device_health(self.cfg.device.id, time.monotonic() - self.started, self.http.metrics,
                                       self.cfg.model.slots_dir, next_s=math.ceil(every / interval) * interval)
            except Exception as exc:  # noqa: BLE001 a reading out of range must stop neither telemetry nor the agent
                log.warning("device health not sent: %s", (str(exc).splitlines() or [type(exc).__name__])[0])
                return
            self.session.publish_snapshot(health_topic(self.cfg.device.fleet, self.cfg.device.id), health)

    def _infer(self, message, req: InferenceRequest) -> None:
        with self.http.mqtt_request(), ExitStack() as serving:  # shutdown waits for it, answer included
            served = {}  # the label of the model that took it (its telemetry window waits for this answer)
            try:
                text, usage, finish = self._generate_for(req, serving, served, message.received, message.expiry_s)
                response = InferenceResponse(id=req.id, text=text, usage=usage, finish_reason=finish)
            except ApiError as exc:
                code = {400: "bad_request", 429: "busy", 503: "model_unavailable", 504: "timeout"}.get(exc.status,
                                                                                                       "internal")
                response = InferenceResponse(id=req.id, error=ErrorInfo(code=code, message=exc.message))
            except RequestError as exc:
                response = InferenceResponse(id=req.id, error=ErrorInfo(code="bad_request", message=str(exc)))
            except Exception as exc:  # never let one request take the agent down; the requester is told
                log.exception("MQTT inference request %s failed", req.id)
                response = InferenceResponse(id=req.id, error=ErrorInfo(code="internal", message=str(exc)))
            if response.error and response.error.code in SERVER_ERRORS:  # as HTTP counts 5xx: not the client's
                self.window.record_error(label=served.get("label"), window=served.get("window"))
            self._remember_answer(message, req, response)
            self._respond(message, req, response)
            self.http.metrics.request_latency.observe(time.perf_counter() - message.received, endpoint="mqtt")

    def _observe_session(self) -> None:
        """(before each /metrics exposition) the MQTT session's counters, where MQTT is on."""
        if self.session is None:
            return
        stats, counter = self.session.stats, self.http.metrics.mqtt_session
        for event in ("connects", "payload_errors", "dropped_reports", "dropped_messages", "too_large",
                      "client_resets"):
            counter.advance_to(getattr(stats, event), event=event)
        self.http.metrics.mqtt_held_reports.set(self.session.held_reports)

    def _remember_answer(self, message, req: InferenceRequest, response: InferenceResponse) -> None:
        key = (self.session.reply_target(message).topic, req.id, hashlib.sha256(message.payload).digest())
        with self._requests_lock:
            if key in self._requests:
                if response.error is not None and response.error.code in RETRYABLE:  # a retry is generated anew
                    del self._requests[key]
                else:
                    self._requests[key] = (self._requests[key][0], response)

    def _respond(self, message, req: InferenceRequest, response: InferenceResponse) -> None:
        try:
            over = self.session.answer_over_limit(message, response)
            if over is not None:  # dropped whole, the requester heard nothing and a retry got the same silence
                size, limit = over
                log.warning("MQTT inference request %s: the answer (%d bytes) is over the broker's maximum packet size "
                            "(%d bytes); an error is sent instead", req.id, size, limit)
                response = InferenceResponse(id=req.id, error=ErrorInfo(code="too_large", message=(
                    f"the answer is {size} bytes, over the broker's maximum packet size of {limit} bytes; ask for "
                    "fewer max_tokens, or raise the broker's max_packet_size")))
            self.session.respond(message, response)
            self.http.metrics.mqtt_answers.inc(outcome=response.error.code if response.error else "ok")
        except AgentError as exc:
            log.warning("MQTT inference request %s: %s", req.id, exc)

    def _generate_for(self, req: InferenceRequest, serving: ExitStack, served: dict, t0: float,
                      expiry_s: int | None = None):
        """The answer to `req`; its telemetry (TTFT from `t0`, the request's arrival) goes to the window of the model
        that took it. It stops at the sooner of its `timeout_s` and its MQTT 5 message expiry (`expiry_s`, what the
        publisher's Message Expiry Interval had left when the broker delivered it: a requester that gives up after
        that has said so in the protocol's own way)."""
        limits = [(req.timeout_s, f"the request's timeout_s={req.timeout_s:g} (from its arrival)")] \
            if req.timeout_s is not None else []
        if expiry_s is not None:
            limits.append((float(expiry_s), f"its MQTT message expiry ({expiry_s} s left when it arrived)"))
        limit_s, limit_text = min(limits) if limits else (math.inf, "")
        # read as the HTTP API reads the same request: a chat ends at GLM's end-of-turn tokens, a stop string
        # that is a special token becomes a stop token, the chat template's [gMASK]<sop> is not added twice,
        # an empty stop string is refused (it cut every answer to nothing)
        body = req.model_dump(include={"prompt", "messages", "max_tokens", "temperature", "top_k", "top_p",
                                       "repetition_penalty", "seed", "stop"}, exclude_none=True)
        with self.http.engine_slot() as slot:
            model = slot.model
            served["label"] = label = serving_label(model)
            served["window"] = serving.enter_context(self.window.serving(label))
            gen = chat_request(body, self.http.sampling, model.tokenizer) if req.messages is not None \
                else completion_request(body, self.http.sampling)
            gen = with_special_stops(gen, model.tokenizer)
            params, ids = gen.params, prompt_ids(gen, model)
            outcome = Outcome(len(ids))
            times = []
            deadline = t0 + limit_s

            def too_late(what: str) -> ApiError:
                return ApiError(504, f"no answer within {limit_text}; {what}")

            if time.perf_counter() > deadline:  # it waited for a place past its limit: not started at all
                raise too_late("it waited for a place until then and was not started")
            # the scheduler admits requests with a deadline first, earliest first (its clock is time.monotonic)
            queue_deadline = None if math.isinf(limit_s) else time.monotonic() + deadline - time.perf_counter()
            try:  # the scheduler batches it with concurrent requests
                handle = slot.submit(ids, params, deadline=queue_deadline)
            except SchedulerClosed as exc:  # the model was swapped (an OTA update) since the slot was taken
                raise ApiError(503, str(exc)) from None
            # the limit holds while it waits in the scheduler's queue or prefills too, not only between tokens: a
            # request queued behind long answers was answered `timeout` only after them, having held its place
            tokens = stream_tokens(handle, None if math.isinf(limit_s) else lambda: time.perf_counter() <= deadline)

            metrics = self.http.metrics

            def on_token() -> None:
                times.append(now := time.perf_counter())
                if len(times) == 1:  # the same figures as the HTTP API's, under endpoint "mqtt"
                    metrics.ttft.observe(now - t0, endpoint="mqtt")
                else:
                    metrics.token_latency.observe(now - times[-2], endpoint="mqtt")
                if now > deadline:  # the requester gave up by now (MQTT shows no requester leaving): stop for it
                    raise too_late(f"{outcome.completion_tokens} token(s) were generated, then stopped")

            try:
                text = "".join(generate_text(model, ids, tokens, params, gen.stop, outcome, on_token))
            except ConnectionResetError:  # (stream_tokens' watch: the limit passed while no token came)
                raise too_late(f"{outcome.completion_tokens} token(s) were generated, then stopped") from None
            finally:
                tokens.close()  # a stop string or the timeout ends the text early: the request leaves the batch
                metrics.prompt_tokens.inc(outcome.prompt_tokens, endpoint="mqtt")
                metrics.completion_tokens.inc(outcome.completion_tokens, endpoint="mqtt")
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.window.record(times[0] - t0 if times else None, gaps, len(gaps), sum(gaps), label=label,
                           window=served["window"])
        return text, Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens), \
            outcome.finish_reason

    # --- OTA ----------------------------------------------------------------------------------
    def _updater_deps(self) -> UpdaterDeps:
        mqtt_fetcher = MqttChunkFetcher(self._chunk_request, self.cfg.ota.chunk_timeout_s, self.cfg.ota.give_up_s)
        self._chunk_fetcher = mqtt_fetcher
        try:
            keys = self._trusted_keys()
        except ServeError as exc:
            log.warning("OTA updates will be refused until trusted keys exist: %s", exc)
            keys = {}
        return UpdaterDeps(
            trusted_keys=keys, reload_keys=self._reload_keys, fetcher=_OfferFetcher(mqtt_fetcher),
            self_test=lambda slot, manifest: run_self_test(slot, manifest, SelfTestConfig(
                backend=self.cfg.model.backend, threads=self.cfg.model.threads, device=self.cfg.model.device,
                prefill_graph=self.cfg.model.prefill_graph, max_latency_ratio=self.cfg.ota.max_latency_ratio,
                min_delta_ms=self.cfg.ota.min_latency_delta_ms), self.model, self.http.on_engine),
            activate=self.activate, report=self._report_ota, agent_version=__version__,
            supported_backends=tuple(available_backends()), architecture_problem=architecture_problem,
            active_version=lambda: self.model.bundle.manifest.version if self.model else None,
            active_manifest_sha256=lambda: self.model.bundle.sha256 if self.model else None,
            serving=lambda: self.model is not None,
            fleet=self.cfg.device.fleet, device=self.cfg.device.id, rollback_keys=self._rollback_keys(),
            probation_deaths=self.cfg.ota.probation_deaths, probation_s=self.cfg.ota.probation_s)

    def _chunk_request(self, req):
        d = self.cfg.device
        if self.updater is not None and self.updater.stopping.is_set():
            raise UpdateInterrupted("the agent is stopping")
        if self.session is None:
            raise UpdateFailed("MQTT is disabled (mqtt.enabled = false): chunks cannot be fetched")
        return self.session.request(chunk_request_topic(d.fleet, d.id), req,
                                    response_topic=chunk_response_topic(d.fleet, d.id))

    def _report_ota(self, status: dict) -> None:
        # what an operator must see, in words (once: the idle status after REPORTING carries the result again)
        if status.get("result") in ("failed", "rolled_back") and status.get("from") != "reporting":
            log.warning("OTA update %s %s: %s", status.get("update_id"), status["result"].replace("_", " "),
                        status.get("reason") or "no reason given")
        else:  # e.g. "OTA update v2-17: downloading (progress 40.0%)"; a dict repr was hard to read in a journal
            extra = [f"{k.replace('_', ' ')} {status[k]}" for k in ("from", "event", "in_slot", "result")
                     if status.get(k) is not None]
            extra += [f"reason {status['reason']}"] if status.get("reason") and status.get("from") != "reporting" \
                else []
            extra += [f"{status['progress']}%"] if status.get("progress") is not None else []
            extra += [f"self-test {json.dumps(status['self_test'])}"] if status.get("self_test") else []
            log.info("OTA update %s: %s%s", status.get("update_id"), status.get("state"),
                     f" ({', '.join(extra)})" if extra else "")
        if self.session is not None:
            d = self.cfg.device
            delivery = None
            if status.get("result") and status.get("state") == State.REPORTING.value and self.updater is not None:
                delivery = Delivery()  # an outcome: its record in the state dir goes once the broker has it
                with self._reports_lock:
                    self._reports_in_flight.append((delivery, status))
            self.session.publish(ota_status_topic(d.fleet, d.id), json.dumps(status).encode(), retain=True,
                                 delivery=delivery)

    def _forget_delivered_reports(self) -> None:
        with self._reports_lock:
            if not self._reports_in_flight:
                return
            flags = [(delivery.delivered(), delivery, status) for delivery, status in self._reports_in_flight]
            done = [status for delivered, _, status in flags if delivered]
            if not done:
                return
            self._reports_in_flight = [(delivery, status) for delivered, delivery, status in flags if not delivered]
        for status in done:
            self.updater.report_delivered(status)

    def _update_running(self) -> bool:
        return self._ota_thread is not None and self._ota_thread.is_alive()

    def _start_update(self, offer: Offer | None, follow_up: bool = False) -> None:
        """Run `offer` (None: resume the persisted update) on the OTA thread. An offer that comes while an
        update runs replaces the retained one on the broker, which does not send it again: it is kept (the
        latest one only) and taken when the running update ends (`follow_up`, from the agent's loop)."""
        if self.updater is None:
            return
        with self._ota_lock:
            if follow_up:
                offer, self._next_offer = self._next_offer, None
                if offer is None:
                    return
            if self._update_running():
                if offer is not None and offer.update_id != self.updater.data.get("update_id"):
                    self._next_offer = offer
                    log.info("offer %s came while update %s runs: it is taken when that one ends",
                             offer.update_id, self.updater.data.get("update_id"))
                return
            if offer is not None:
                if offer.update_id == self.updater.data.get("update_id"):
                    return  # the retained offer we already processed, seen again after a reconnect
                self.updater.deps.trusted_keys = self._reload_keys()
                self.updater.deps.rollback_keys = self._rollback_keys()
                try:
                    self.updater.submit(offer)
                except UpdateFailed as exc:
                    log.warning("%s", exc)
                    return
            self._ota_thread = threading.Thread(target=self._run_update, name="ota", daemon=True)
            self._ota_thread.start()

    def _reload_keys(self) -> dict:
        try:
            return self._trusted_keys()  # picked up at each offer: rotating keys needs no restart
        except ServeError as exc:
            log.warning("%s", exc)
            return {}

    def _run_update(self) -> None:
        try:
            self.updater.run()
        except Exception:  # the state is persisted; a restart resumes or fails it for good
            log.exception("OTA update stopped unexpectedly")
        finally:
            self._refresh_signing_keys()  # a slot written or re-signed (a rotation's re-offer), or cleared
            self._publish_state()


STATE_LOCK = "agent.lock"
MAX_CONFIG_ERROR = 4096  # characters of last_config_error in the reported state (the log has the whole text)


def _bounded(text: str | None) -> str | None:
    """A refusal text short enough for the retained state (the controller drops states over 256 KiB, and the
    state goes again at every reconnect)."""
    if text is None or len(text) <= MAX_CONFIG_ERROR:
        return text
    return text[:MAX_CONFIG_ERROR - 60] + f"... ({len(text)} characters; the agent's log has the whole text)"


DESIRED_APPLIED = "desired-applied.json"  # the desired config applied last (Agent._remember_desired)


def hold_state_dir(slots_dir: Path):
    """Lock `slots_dir` for this agent (flock on `agent.lock`, released by the OS when the process ends, a crash
    too); ServeError naming the holder's pid when another agent holds it. Two agents on one state dir (a second
    `edgeglm agent run` with the same config) took the device's MQTT session from each other in turn, and both
    ran the OTA updater on the same slots and update state."""
    import fcntl

    path = slots_dir / STATE_LOCK
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise ServeError(f"model.slots_dir {slots_dir}: cannot open {path} ({exc.strerror or exc}); set "
                         "model.slots_dir to a writable directory") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ServeError(f"model.slots_dir {slots_dir}: in use by another edgeglm agent (pid {holder}); two agents "
                         "on one state directory would take the device's MQTT session from each other and update "
                         "the same slots. Stop the other one (systemctl stop edgeglm-agent), or give this one "
                         "another --state-dir and device id") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def run_agent(cfg: AgentConfig, stop: threading.Event, deadline: float = 10.0, reload: threading.Event | None = None,
              read_config=None) -> None:
    """Start the agent, run until `stop`, shut down cleanly (the CLI wires SIGTERM to `stop`, and SIGHUP to
    `reload`, which reads the config again with `read_config`)."""
    agent = Agent(cfg)
    try:
        agent.start(stop)
        agent.run(stop, reload, read_config)
    except Stopped as exc:  # SIGTERM while the model's path was measured: a clean stop, not a model's failure
        log.info("stopping before the model served: %s", exc)
    except (RuntimeUserError, BundleError, AgentError) as exc:
        agent.shutdown(deadline)
        raise ServeError(str(exc)) from None
    log.info("stopping: requests in flight get up to %.0f s, then the offline state is published", deadline)
    agent.shutdown(deadline)
    log.info("stopped")


# the box's own settings a reload (SIGHUP) applies at once: the fleet's remote settings, and those read afresh at
# each use (the keys, at each model load and offer; the prefix cache's directory; probation, at each check)
LIVE_SETTINGS = REMOTE_SETTINGS + ("cache.persist_dir", "ota.trusted_keys", "ota.rollback_keys", "ota.probation_s")


def is_live(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in LIVE_SETTINGS)


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted names of the settings whose values differ (secrets compared by value)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, name + ".")
        elif _plain_value(a) != _plain_value(b):
            out.append(name)
    return out


def _plain_value(value):
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _get_dotted(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _set_dotted(data: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[last] = value
