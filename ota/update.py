"""The OTA update state machine: one transition table, one small handler per state.

    state        event         -> next state
    IDLE         OFFER         -> OFFERED
    OFFERED      ACCEPTED      -> DOWNLOADING   signature, version, architecture, backends, disk space ok
    OFFERED      ALREADY_SERVING -> CLEANUP     the offered manifest is the one serving: committed, nothing done
    OFFERED      IN_SLOT       -> SELF_TEST     the inactive slot holds the offered bundle, every file verified
                                                (a rollback to the previous model): nothing downloaded
    DOWNLOADING  DOWNLOADED    -> VERIFYING     every chunk checked against the signed manifest
    VERIFYING    VERIFIED      -> INSTALLING    every file's size and sha256, the signature again
    INSTALLING   INSTALLED     -> SELF_TEST     staging moved into the inactive slot, fsynced
    SELF_TEST    PASSED        -> COMMITTING    load, golden check, latency within budget
    COMMITTING   COMMITTED     -> CLEANUP       `current` flipped; the agent serves the new model
    COMMITTING   FAILED        -> ROLLBACK      the new model failed to activate after the flip
    ROLLBACK     ROLLED_BACK   -> CLEANUP       `current` flipped back; the old model serves again
    (any of OFFERED..SELF_TEST) FAILED -> FAILURE
    FAILURE      DONE          -> CLEANUP       nothing was switched; the active model never changed
    CLEANUP      CLEANED       -> REPORTING     staging removed; a failed slot cleared
    REPORTING    REPORTED      -> IDLE          the outcome is reported

The state is written to disk atomically *before* each handler runs, so a power cut at any point
resumes in the state it was in; every handler is idempotent. A state entered more than
`max_entries` times (a crash loop: the process keeps dying in it) fails the update instead of
running again. The serving model keeps serving until COMMITTING, and nothing is activated
before its signature and every file hash have been verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ota.bundle import MANIFEST, Manifest, manifest_problems, open_bundle
from ota.errors import BundleError, SignatureError
from ota.fsutil import atomic_write_bytes, atomic_write_json, remove_leftover_temporaries
from ota.signing import (SIGNATURE, SIGNATURE_PREVIOUS, read_previous, read_signature, verify_bundle_signature,
                         verify_bytes)
from ota.slots import Slots
from ota.versions import check_upgrade, parse_version

log = logging.getLogger("edgeglm.ota")

DISK_HEADROOM = 1 << 20  # beyond the bundle's files: the manifest, signature, update state and slot pointer files
# the other keys' signatures a slot keeps of its manifest (manifest.sig.prev), newest first: key rotations
MAX_PREVIOUS_SIGNATURES = 8
CHUNK_ATTEMPTS = 3  # a chunk whose sha256 does not match is fetched this many times before the update fails
DISK_BLOCK = 4096  # files take whole blocks of the file system (4 KiB on ext4 and most others)


def _manifest_of(slot: Path) -> bytes | None:
    """The manifest bytes of the bundle in `slot`; None when there is none or it cannot be read."""
    try:
        return (slot / MANIFEST).read_bytes()
    except OSError:
        return None


# what the updater and the agent write in the state dir (atomic_write_json, atomic_symlink), besides the
# records named below (WITHDRAWN, ROLLBACK_APPLIED, PROBATION)
STATE_FILES = ("update.json", "download-progress.json", "staging-partial-progress.json", "desired-applied.json",
               "current")


def _remove_temporaries(root: Path) -> None:
    """The state dir's and the slots' leftovers of writes cut short (fsutil.remove_leftover_temporaries): of the
    state files, and of a slot's signature (a file of the bundle itself is never touched, whatever its name)."""
    removed = remove_leftover_temporaries(root, STATE_FILES + (WITHDRAWN, ROLLBACK_APPLIED, PROBATION, REPORT))
    for slot in ("a", "b"):
        folder = root / "slots" / slot
        try:  # a file the bundle lists, whatever its name, is the bundle's
            keep = {f.path.split("/")[0] for f in Manifest.model_validate_json(_manifest_of(folder) or b"").files}
        except ValueError:
            keep = set()
        removed += remove_leftover_temporaries(folder, (SIGNATURE,), keep)
    if removed:
        log.info("removed %d temporary file(s) left in %s by writes cut short (a power cut, a kill)", removed, root)


def _probation_problem(data) -> str | None:
    """Why a probation record cannot be used (None: it can): every field it is read by, with its type."""
    if not isinstance(data, dict):
        return "not a JSON object"
    checks = [("slot", data.get("slot") in ("a", "b"), '"a" or "b"'),
              ("deaths", isinstance(data.get("deaths"), int) and not isinstance(data.get("deaths"), bool)
               and data["deaths"] >= 0, "an integer >= 0"),
              ("previous_slot", data.get("previous_slot") in ("a", "b", None), '"a", "b" or null'),
              ("probation_s", isinstance(data.get("probation_s", 0), (int, float))
               and not isinstance(data.get("probation_s", 0), bool), "a number"),
              ("running", isinstance(data.get("running", False), bool), "true or false"),
              ("rolling_back", isinstance(data.get("rolling_back", False), bool), "true or false")]
    bad = [f"{name} = {data.get(name)!r} (must be {allowed})" for name, ok, allowed in checks if not ok]
    return "; ".join(bad) or None


def space_needed(file_sizes) -> int:
    """Bytes an update needs free before it starts downloading: each file rounded up to whole blocks, plus
    DISK_HEADROOM. The plain sum let a box with a few KiB to spare accept the update and then fail while
    saving its state (OSError: No space left on device) instead of with "disk full"."""
    return sum(-(-size // DISK_BLOCK) * DISK_BLOCK for size in file_sizes) + DISK_HEADROOM


def _verifies(raw: bytes, sig: dict, trusted: dict) -> bool:
    """Whether signature `sig` (a slot's) verifies over the manifest bytes `raw` with a trusted key."""
    try:
        verify_bytes(raw, sig, trusted, "slot signature")
        return True
    except SignatureError:
        return False


class State(str, Enum):
    IDLE = "idle"
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_TEST = "self_test"
    COMMITTING = "committing"
    ROLLBACK = "rollback"
    FAILURE = "failure"
    CLEANUP = "cleanup"
    REPORTING = "reporting"


class Event(str, Enum):
    OFFER = "offer"
    ACCEPTED = "accepted"
    ALREADY_SERVING = "already_serving"
    IN_SLOT = "in_slot"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    PASSED = "passed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    DONE = "done"
    CLEANED = "cleaned"
    REPORTED = "reported"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE,        E.OFFER):       S.OFFERED,
    (S.OFFERED,     E.ACCEPTED):    S.DOWNLOADING,
    (S.OFFERED,     E.FAILED):      S.FAILURE,
    (S.OFFERED,     E.ALREADY_SERVING): S.CLEANUP,  # the exact signed manifest serves already: nothing to do
    (S.OFFERED,     E.IN_SLOT):     S.SELF_TEST,  # the inactive slot holds it, verified: a rollback is one flip
    (S.DOWNLOADING, E.DOWNLOADED):  S.VERIFYING,
    (S.DOWNLOADING, E.FAILED):      S.FAILURE,
    (S.VERIFYING,   E.VERIFIED):    S.INSTALLING,
    (S.VERIFYING,   E.FAILED):      S.FAILURE,
    (S.INSTALLING,  E.INSTALLED):   S.SELF_TEST,
    (S.INSTALLING,  E.FAILED):      S.FAILURE,
    (S.SELF_TEST,   E.PASSED):      S.COMMITTING,
    (S.SELF_TEST,   E.FAILED):      S.FAILURE,
    (S.COMMITTING,  E.COMMITTED):   S.CLEANUP,
    (S.COMMITTING,  E.FAILED):      S.ROLLBACK,   # the switch happened: go back to the old slot
    (S.ROLLBACK,    E.ROLLED_BACK): S.CLEANUP,
    (S.ROLLBACK,    E.FAILED):      S.CLEANUP,    # old slot unusable too: reported, agent keeps trying
    (S.FAILURE,     E.DONE):        S.CLEANUP,
    (S.FAILURE,     E.FAILED):      S.CLEANUP,
    (S.CLEANUP,     E.CLEANED):     S.REPORTING,
    (S.CLEANUP,     E.FAILED):      S.REPORTING,
    (S.REPORTING,   E.REPORTED):    S.IDLE,
    (S.REPORTING,   E.FAILED):      S.IDLE,
}


# the states on the way to a switch: entered only once their entry is saved (see Updater.run)
FORWARD = (S.OFFERED, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.SELF_TEST, S.COMMITTING)


class UpdateFailed(Exception):
    """A handler's reason for failing the update (reported as given)."""


class UpdateInterrupted(Exception):
    """The agent is stopping: the update stops where it is, its state kept on disk, and resumes at the next
    start (a download from its last verified chunk). Failing it instead removed the chunks downloaded, and the
    offer's id counted as done, so the retained offer was not taken again after the restart."""


ROLLBACK_FORMAT = 2  # the statement format this agent accepts (1: update id + manifest hash only, refused)
ROLLBACK_CLOCK_SKEW_S = 300  # an expired rollback statement is still accepted this long after its not_after
ROLLBACK_APPLIED = "rollbacks-applied.json"  # in the OTA state dir: ids of the rollbacks this device applied
ROLLBACK_APPLIED_KEEP = 1000  # the newest this many are kept (statements expire; the controller caps at 30 d)
# in the OTA state dir: the bundles this device backed out (a signed rollback away from them, or their probation
# crash loop), by manifest sha256: a plain offer of one is refused, so replaying its old retained offer cannot undo the
# rollback (a new version of the model, or a signed rollback offer, installs it again)
WITHDRAWN = "withdrawn.json"
WITHDRAWN_KEEP = 64
# in the OTA state dir: the model committed last, on probation until it has served `ota.probation_s` in one run
# of the agent; an agent that dies (no clean stop) `ota.probation_deaths` times before that goes back at start
PROBATION = "probation.json"
# in the OTA state dir: the last outcome (committed, failed, rolled back), kept until the broker has it; an agent
# killed before that (or with the broker away until it stopped) publishes it again at its next start
REPORT = "ota-report.json"


class RollbackTerms(BaseModel):
    """What a signed rollback authorisation is bound to (all of it signed, see `rollback_statement`)."""

    model_config = ConfigDict(extra="forbid")
    format: int
    fleet: str = Field(min_length=1, max_length=128)
    device: str = Field(min_length=1, max_length=128)
    replaces: str | None = Field(max_length=64)  # the version the device served when it was issued (None: none)
    not_after: int  # unix seconds: refused after this (plus ROLLBACK_CLOCK_SKEW_S)


class Offer(BaseModel):
    """An update offer from the controller: the exact signed manifest and where to fetch files."""

    model_config = ConfigDict(extra="forbid")
    # printable ASCII without spaces: it goes into log lines and status reports as it is (a newline in it forged
    # journal lines)
    update_id: str = Field(min_length=1, max_length=128, pattern=r"^[!-~]+$")
    manifest_b64: str  # exact manifest.json bytes, base64 (the signature covers these bytes)
    signature: dict  # manifest.sig content
    rollback: bool = False
    # a rollback (an older version on purpose) must be authorised by a signature over
    # `rollback_statement(update_id, manifest bytes, rollback_terms)` from a trusted rollback key
    rollback_signature: dict | None = None
    rollback_terms: RollbackTerms | None = None  # what the rollback authorisation is bound to
    source: dict = Field(default_factory=dict)  # how the fetcher reaches the files

    @field_validator("manifest_b64")
    @classmethod
    def _base64(cls, v: str) -> str:  # else "Error: Only base64 data is allowed" at OFFERED, naming nothing
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not valid base64 ({exc})") from None
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: dict) -> dict:  # else KeyError 'path' / TypeError at DOWNLOADING, naming nothing
        kind = v.get("type", "mqtt")
        if kind not in ("mqtt", "dir"):
            raise ValueError(f"type {kind!r} is not a source this agent fetches from (mqtt, dir)")
        if kind == "dir":
            path = v.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"a dir source needs an absolute 'path' (got {path!r})")
        return v

    def manifest_bytes(self) -> bytes:
        return base64.b64decode(self.manifest_b64, validate=True)


def rollback_statement(update_id: str, manifest_bytes: bytes, terms: RollbackTerms) -> bytes:
    """The exact bytes a rollback authorisation signs: the update id, the manifest's sha256 and the terms
    (format, fleet, device, the version it replaces, not_after)."""
    return json.dumps({"update_id": update_id, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                       "rollback": True, **terms.model_dump()}, sort_keys=True).encode()


class Fetcher(Protocol):
    def read_chunk(self, offer: Offer, path: str, index: int, chunk_size: int) -> bytes: ...


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    reason: str = ""
    details: dict | None = None


@dataclass
class UpdaterDeps:
    """What the agent hands to the updater (nothing here imports ML code)."""

    trusted_keys: dict
    fetcher: Fetcher
    self_test: Callable[[Path, Manifest], SelfTestResult]
    activate: Callable[[Path | None], None]  # load the model in this slot into serving (None: no model)
    report: Callable[[dict], None]
    agent_version: str
    supported_backends: tuple[str, ...]
    active_version: Callable[[], str | None]
    max_entries: int = 3
    # sha256 of the serving bundle's manifest bytes (None: no model, or not known)
    active_manifest_sha256: Callable[[], str | None] = lambda: None
    # whether a model serves now: after a restart in COMMITTING or ROLLBACK the agent loads none itself
    serving: Callable[[], bool] = lambda: True
    # why the runtime cannot run this architecture (None: it can); handed in by the agent
    architecture_problem: Callable[[dict], str | None] = lambda arch: None
    # who this device is: a rollback statement must name exactly this fleet and device
    fleet: str | None = None
    device: str | None = None
    # keys trusted for rollback statements only (never for manifests); None: the bundle keys (trusted_keys)
    rollback_keys: dict | None = None
    clock: Callable[[], float] = time.time
    # starts of the agent after an unclean end (a crash, SIGKILL, the OOM killer, a power cut) while the model
    # committed last was on probation, before it goes back to the previous model (see check_probation)
    probation_deaths: int = 3
    # the trusted keys read again (the agent's ota.trusted_keys): called at VERIFYING and SELF_TEST; None: the
    # offer's trusted_keys throughout
    reload_keys: Callable[[], dict] | None = None
    probation_s: float = 600.0  # recorded with the probation, for its reason; the agent times the run


def _bytes_on_disk(root: Path) -> int:
    """Bytes the files under `root` take on disk (their blocks); 0 for what cannot be read."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Updater:
    def __init__(self, state_dir: str | Path, deps: UpdaterDeps):
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.slots = Slots(self.root)
        self.staging = self.root / "staging"
        self.state_path = self.root / "update.json"
        # chunks on disk per file while downloading: a small file rewritten after each chunk (update.json
        # holds the whole offer, manifest included: rewriting it per chunk wrote the manifest once per chunk)
        self._progress_path = self.root / "download-progress.json"
        # a download that failed for good keeps its verified chunks here, for an offer of the same bundle
        self.partial = self.root / "staging-partial"
        self._partial_progress = self.root / "staging-partial-progress.json"
        self.deps = deps
        self.load_problem: str | None = None  # why the persisted state was dropped at start, if it was
        _remove_temporaries(self.root)
        self.data = self._load()
        self._probation_path = self.root / PROBATION
        self._report_path = self.root / REPORT
        self._report_lock = threading.Lock()  # the OTA thread writes it, the agent's loop removes it
        self.probation: dict | None = self._load_probation()  # the committed model on probation, if one is
        self.on_enter: Callable[[State], None] | None = None  # observation/fault-injection point
        self.stopping = threading.Event()  # set by the agent as it stops: `run` returns, leaving the state to resume
        self.handlers: dict[State, Callable[[], Event]] = {
            S.OFFERED: self._offered, S.DOWNLOADING: self._downloading, S.VERIFYING: self._verifying,
            S.INSTALLING: self._installing, S.SELF_TEST: self._self_test, S.COMMITTING: self._committing,
            S.ROLLBACK: self._rollback, S.FAILURE: self._failure, S.CLEANUP: self._cleanup,
            S.REPORTING: self._reporting,
        }

    # --- persistence -------------------------------------------------------------------------
    def _load(self) -> dict:
        """The persisted state. One that cannot be read or makes no sense (invalid JSON, missing fields: a
        disk error, an edit by hand) is moved aside to update.json.unreadable and the updater starts idle,
        its staging removed: the slots and `current` are untouched, so the active model serves, and the
        interrupted update, if there was one, is offered again or not at all. Raising here would stop the
        agent at every start, out of reach of any update."""
        fresh = {"state": S.IDLE.value, "entries": 0, "history": []}
        if not self.state_path.is_file():
            return fresh
        try:
            data = json.loads(self.state_path.read_text())
            state = State(data["state"])
            if not isinstance(data["entries"], int) or not isinstance(data["history"], list):
                raise ValueError("entries or history of the wrong type")
            if state is not S.IDLE:
                Offer.model_validate(data["offer"])
                if data["target_slot"] not in ("a", "b") or not isinstance(data["chunks_done"], dict):
                    raise ValueError("target_slot or chunks_done invalid")
                if data.get("previous_slot") not in ("a", "b", None):
                    raise ValueError(f"previous_slot {data.get('previous_slot')!r} is not a slot")
                # before the switch (COMMITTING) the target is never the serving slot: a state that says so (an
                # edit by hand) would install into, or clear, the model that serves
                if state in FORWARD[:-1] and data["target_slot"] == self.slots.active():
                    raise ValueError(f"target_slot {data['target_slot']!r} is the active slot in state "
                                     f"{state.value}")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # JSON, Unicode, nesting too
            aside = self.state_path.with_name(self.state_path.name + ".unreadable")
            os.replace(self.state_path, aside)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.load_problem = (f"{self.state_path} was unreadable ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); moved to {aside.name}, any "
                                 "update in progress was dropped, the active slot is unchanged")
            log.warning("%s", self.load_problem)
            return fresh
        return data

    def _save(self) -> None:
        atomic_write_json(self.state_path, self.data)

    def _persist(self) -> str | None:
        """Save the state; why it could not be saved (a full disk, a read-only or failing one), or None."""
        try:
            self._save()
        except OSError as exc:
            log.warning("OTA state not saved in state %s: %s", self.state.value, exc)
            return f"{type(exc).__name__}: {exc}"
        return None

    @property
    def state(self) -> State:
        return State(self.data["state"])

    @property
    def offer(self) -> Offer:
        return Offer.model_validate(self.data["offer"])

    # --- driving -----------------------------------------------------------------------------
    def submit(self, offer: Offer) -> None:
        """Accept an offer for processing (only when idle)."""
        if self.state is not S.IDLE:
            raise UpdateFailed(f"an update ({self.data.get('update_id')}) is in progress in state "
                               f"{self.state.value}; offer {offer.update_id} refused")
        self.data = {"state": S.IDLE.value, "entries": 0, "history": [S.IDLE.value], "update_id": offer.update_id,
                     "offer": offer.model_dump(), "chunks_done": {}, "outcome": None, "reason": None,
                     "previous_slot": self.slots.active(), "target_slot": self.slots.inactive()}
        try:
            self._progress_path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only or failing disk: the update fails at its first save, and says why
            log.warning("%s not removed: %s", self._progress_path, exc)
        self._transition(E.OFFER)

    def run(self) -> None:
        """Run handlers until the machine is idle again (also resumes after a restart).

        A state that cannot be saved (the disk is full) fails the update before anything more is done on
        the way to a switch; the failure path (FAILURE, ROLLBACK, CLEANUP, REPORTING) runs even then, since
        CLEANUP frees the staging area, so the updater ends idle and takes the next offer."""
        while self.state is not S.IDLE:
            state = self.state
            if self.stopping.is_set():
                log.info("the agent is stopping: update %s stays in state %s and resumes at the next start",
                         self.data.get("update_id"), state.value)
                return
            self.data["entries"] += 1
            unsaved = self._persist()  # persisted before acting
            if unsaved and state in FORWARD:
                self._fail(f"the update state cannot be saved ({unsaved})")
                event = E.FAILED
            elif self.data["entries"] > self.deps.max_entries:
                self._fail(f"state {state.value} was entered {self.data['entries']} times without finishing "
                           "(the agent keeps dying there); giving up on this update")
                event = E.FAILED if (state, E.FAILED) in TRANSITIONS else E.DONE
            else:
                try:
                    if self.on_enter:
                        self.on_enter(state)
                    event = self.handlers[state]()
                except UpdateInterrupted as exc:
                    log.info("update %s stopped in state %s (%s): it resumes at the next start",
                             self.data.get("update_id"), state.value, exc)
                    return
                except (UpdateFailed, BundleError) as exc:
                    self._fail(str(exc))
                    event = E.FAILED
                except Exception as exc:  # a load error, a full disk, a bug: fail this update, say why
                    self._fail(f"{type(exc).__name__}: {exc}")
                    event = E.FAILED
            self._transition(event)

    def _transition(self, event: Event) -> None:
        prev = self.state
        nxt = TRANSITIONS[(prev, event)]
        self.data.update(state=nxt.value, entries=0)
        self.data["history"].append(nxt.value)
        self._persist()  # if it fails, `run` fails the update on entering the next state, or carries on cleaning up
        fields = {"state": nxt.value, "event": event.value, "from": prev.value}
        if prev is S.REPORTING:  # the status the broker keeps (retained) carries the outcome too: a controller away
            # when REPORTING's went by gets only this one when it is back, and its rollout waited for a result
            fields.update(result=self.data.get("outcome"), active_slot=self.slots.active())
        self._report(fields)

    def _fail(self, reason: str) -> None:
        if not self.data.get("reason"):
            self.data["reason"] = f"{self.state.value}: {reason}"

    def _report(self, fields: dict, keep: bool = False) -> None:
        status = {"update_id": self.data.get("update_id"), "ts": time.time(), **fields}
        if self.data.get("reason"):
            status["reason"] = self.data["reason"]
        if keep:  # an outcome: on disk before it is handed over (and before the state moves on)
            status = json.loads(json.dumps(status))  # a snapshot: `history` grows on after this
            self._keep_report(status)
        try:
            self.deps.report(status)
        except Exception:  # reporting must never stop an update or a rollback; the outcome is persisted
            pass

    # --- the last outcome, kept until delivered ------------------------------------------------
    def _keep_report(self, status: dict) -> None:
        try:
            with self._report_lock:
                atomic_write_json(self._report_path, status)
        except OSError as exc:  # the report is still handed over; only a kill before it is delivered loses it
            log.warning("the outcome of update %s is not kept in %s until delivered (%s)", status.get("update_id"),
                        self._report_path, exc)

    def undelivered_report(self) -> dict | None:
        """The last outcome (a `reporting` status with its `result`) if it is not known to be delivered: the
        agent publishes it again at start. An unreadable record is dropped with a warning (it only ever held a
        report, nothing the device runs on)."""
        try:
            status = json.loads(self._report_path.read_text())
            if not (isinstance(status, dict) and isinstance(status.get("result"), str)
                    and isinstance(status.get("ts"), (int, float))):
                raise ValueError("not an outcome report (an object with a result and a ts)")
            return status
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("%s is not a readable outcome report (%s); dropped: that outcome is not reported again",
                        self._report_path, exc)
            try:
                self._report_path.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def report_delivered(self, status: dict) -> None:
        """The broker has `status`: its record goes, unless a newer outcome replaced it meanwhile."""
        with self._report_lock:
            try:
                if json.loads(self._report_path.read_text()) == status:
                    self._report_path.unlink()
            except (OSError, ValueError, RecursionError):
                pass  # gone already, or replaced by something unreadable (undelivered_report drops that)

    def discard_report(self) -> None:
        """Forget the kept outcome (the agent runs without MQTT: nobody to deliver it to)."""
        with self._report_lock:
            try:
                self._report_path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("%s could not be removed (%s)", self._report_path, exc)

    # --- probation: a committed model that kills the agent goes back by itself ----------------
    def _load_probation(self) -> dict | None:
        try:
            data = json.loads(self._probation_path.read_text())
            problem = _probation_problem(data)
            if problem:
                raise ValueError(problem)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("%s unreadable (%s): removed; the model committed last is no longer on probation",
                        self._probation_path, exc)
            self._probation_path.unlink(missing_ok=True)
            return None
        return data

    def _save_probation(self, data: dict | None) -> None:
        self.probation = data
        if data is None:
            self._probation_path.unlink(missing_ok=True)
        else:
            atomic_write_json(self._probation_path, data)

    def check_probation(self) -> dict | None:
        """Called by the agent at start, before it loads the active slot's model. While the model committed last
        is on probation (it has not yet served `ota.probation_s` in one run), a start after an unclean end (the
        previous run never called `stopped_cleanly`: a native crash in the engine, SIGKILL, the OOM killer, a
        power cut) counts as a death; at `probation_deaths` deaths the agent goes back to the previous model:
        `current` flips to its slot and the slot of the model that kept dying is cleared (so that nothing falls
        back into it). Returns the OTA result to report (`rolled_back`, with the reason), else None. A model
        that crashes the engine natively would otherwise have crash-looped the box for good: the update was
        over, and every restart loaded it again."""
        p = self.probation
        if p is None or self.state is not S.IDLE:  # an update in progress: its own crash-loop count applies
            return None
        if p.get("rolling_back"):  # a rollback cut short (a kill, a power cut): finished and reported now
            log.warning("the rollback from model %s (update %s) was cut short; finishing it", p.get("version"),
                        p.get("update_id"))
            return self._finish_probation_rollback(p)
        if p["slot"] != self.slots.active():  # the other slot serves (a fallback at start, a rollback): over
            self._save_probation(None)
            return None
        deaths = p["deaths"] + (1 if p.get("running") else 0)
        previous = p.get("previous_slot")
        if deaths < self.deps.probation_deaths:
            self._save_probation({**p, "deaths": deaths, "running": True})
            if deaths:
                log.warning("the agent ended without a clean stop %d time(s) while model %s (update %s) was on "
                            "probation; at %d it goes back to the previous model", deaths, p.get("version"),
                            p.get("update_id"), self.deps.probation_deaths)
            return None
        if not previous or previous == p["slot"] or not (self.slots.path(previous) / MANIFEST).is_file():
            log.error("the agent ended without a clean stop %d times since model %s (update %s) was committed, and "
                      "there is no previous model to go back to; it stays", deaths, p.get("version"),
                      p.get("update_id"))
            self._save_probation(None)
            return None
        # backed out first, then the intent recorded, then the switch: a kill anywhere from here on is finished at
        # the next start (the bad bundle had been left un-withdrawn, sometimes whole in its slot, and a replayed
        # offer of it installed it again; the rollback was never reported). Neither record stops the switch back
        # on a full disk (a crash loop fills one): _withdraw never raises, and a record not written is a warning.
        p = {**p, "deaths": deaths, "running": False, "rolling_back": True}
        self._withdraw(_manifest_of(self.slots.path(p["slot"])),
                       f"its probation: {deaths} deaths before it had served {p.get('probation_s', 0):g} s")
        try:
            self._save_probation(p)
        except OSError as exc:
            log.warning("the rollback from model %s is not recorded before it runs (%s): a kill now may leave "
                        "it half done", p.get("version"), exc)
        return self._finish_probation_rollback(p)

    def _finish_probation_rollback(self, p: dict) -> dict | None:
        """Go back to the previous slot (if `current` is not there yet: still on the bad one, or missing), clear
        the bad one, drop the record; returns the `rolled_back` result to report. Idempotent: a kill at any point
        is finished by running it again. Where the previous slot holds no model (a record that does not match
        the disk), nothing is switched or cleared: the bad model is all there is."""
        bad, previous, deaths = p["slot"], p.get("previous_slot"), p["deaths"]
        if previous not in ("a", "b") or previous == bad or not (self.slots.path(previous) / MANIFEST).is_file():
            log.error("model %s (update %s) was being rolled back, but there is no previous model in slot %s; it "
                      "stays", p.get("version"), p.get("update_id"), previous)
            self._save_probation(None)
            return None
        if self.slots.active() != previous:  # not switched yet
            self.slots.activate(previous)
        self.slots.clear(bad)
        reason = (f"probation: the agent ended without a clean stop {deaths} times (a crash, a kill, a power cut) "
                  f"since version {p.get('version')} was committed, before it had served "
                  f"{p.get('probation_s', 0):g} s: back to the previous model in slot {previous}; slot {bad} cleared")
        status = {"update_id": p.get("update_id"), "ts": time.time(), "state": S.REPORTING.value,
                  "result": "rolled_back", "reason": reason, "active_slot": previous}
        self._keep_report(status)  # before the record goes: a kill between the two reports it at the next start
        self._save_probation(None)
        return status

    def stopped_cleanly(self) -> None:
        """The agent stops cleanly: this run is no death of the model on probation."""
        if self.probation is not None and self.probation.get("running"):
            self._save_probation({**self.probation, "running": False})

    def pass_probation(self) -> None:
        """The model on probation served `ota.probation_s` in one run: it is the model now."""
        if self.probation is not None:
            log.info("model %s (update %s) passed its probation", self.probation.get("version"),
                     self.probation.get("update_id"))
            self._save_probation(None)

    # --- handlers: each returns exactly one event --------------------------------------------
    def _manifest(self) -> Manifest:
        return Manifest.model_validate_json(self.offer.manifest_bytes())

    def _offered(self) -> Event:
        offer = self.offer
        try:
            raw = offer.manifest_bytes()
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:  # the field and the value named, as `bundle verify` names them
            raise UpdateFailed(f"offered manifest is invalid ({manifest_problems(exc, 3)})") from None
        except ValueError as exc:
            raise UpdateFailed(f"offered manifest is invalid ({str(exc).splitlines()[0]})") from None
        verify_bytes(raw, offer.signature, self.deps.trusted_keys, f"offer {offer.update_id} manifest")
        if not offer.rollback and hashlib.sha256(raw).hexdigest() == self.deps.active_manifest_sha256():
            # offered again (a rollout over boxes that have it, a state file lost): done, not a "downgrade"
            try:
                self._take_signature(self.slots.active_path(), raw)
            except OSError as exc:  # the model serves either way; the next offer tries again
                log.warning("the serving slot keeps its signature: the offered one could not be written (%s)", exc)
            self.data["outcome"] = "committed"
            return E.ALREADY_SERVING
        if offer.rollback:
            self._check_rollback(offer, raw)
        else:
            self._check_withdrawn(raw, manifest)
        check_upgrade(self.deps.active_version(), manifest.version, rollback=offer.rollback)
        if parse_version(manifest.min_agent_version) > parse_version(self.deps.agent_version):
            raise UpdateFailed(f"bundle needs agent >= {manifest.min_agent_version}; this agent is "
                               f"{self.deps.agent_version}")
        problem = self.deps.architecture_problem(manifest.architecture)
        if problem:
            raise UpdateFailed(problem)
        usable = [b for b in manifest.backends if b in self.deps.supported_backends]
        if not usable:
            raise UpdateFailed(f"bundle carries backends {sorted(manifest.backends)}, this device runs "
                               f"{list(self.deps.supported_backends)}: not for this device")
        if self._in_inactive_slot(raw):
            return E.IN_SLOT
        need = space_needed(f.size for f in manifest.files)
        need -= self._take_partial(raw)
        self.staging.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.staging).free
        target = self.data["target_slot"]
        held = _bytes_on_disk(self.slots.path(target))
        if need > free and need <= free + held and target != self.slots.active():
            # the update's target slot holds the model before the serving one, which INSTALLING replaces anyway:
            # a box sized for two bundles (the serving one and the download) makes room by clearing it (else every
            # update after the second was "disk full"), but only once the download has filled the free space
            # (`_make_room`): cleared here, a download that then failed (a source gone, one forged chunk answer)
            # left the box with no previous model to go back to
            self.data["clear_when_full"] = target
            log.info("the download needs %d bytes, %d are free: slot %s (the previous model, %d bytes) is cleared "
                     "when the download has filled the free space", need, free, target, held)
            free += held
        if need > free:
            room = "" if target == self.slots.active() else \
                f", and {held} bytes in slot {target} (the previous model, which the update replaces)"
            raise UpdateFailed(f"bundle needs {need} bytes (its files, rounded up to whole blocks, and "
                               f"{DISK_HEADROOM >> 20} MiB for the update's own files), {free} bytes free in "
                               f"{self.root}{room}: disk full")
        atomic_write_bytes(self.staging / MANIFEST, raw)
        atomic_write_json(self.staging / SIGNATURE, offer.signature)
        return E.ACCEPTED

    def _take_partial(self, raw: bytes) -> int:
        """The chunks an earlier download of this exact manifest verified before it failed (the controller
        unreachable past ota.give_up_s, a full disk, a source serving other bytes) become this update's staging,
        and the download resumes from them (each chunk is checked again against the manifest first). Before, a
        failed download's chunks were removed: the operator's next offer of the same bundle started at chunk 0,
        on the slow links edge boxes have. Those of another bundle are removed. Returns the bytes it brings."""
        if not self.partial.exists():
            self._partial_progress.unlink(missing_ok=True)
            return 0
        try:
            same = (self.partial / MANIFEST).read_bytes() == raw and not self.staging.exists()
        except OSError:
            same = False
        if not same:
            shutil.rmtree(self.partial, ignore_errors=True)
            self._partial_progress.unlink(missing_ok=True)
            return 0
        os.replace(self.partial, self.staging)
        if self._partial_progress.exists():
            os.replace(self._partial_progress, self._progress_path)
        kept = _bytes_on_disk(self.staging)
        log.info("OTA %s: the download of this bundle that failed before kept its chunks (%d bytes): resumed from "
                 "them", self.data.get("update_id"), kept)
        self._report({"state": S.OFFERED.value, "resumed_bytes": kept})
        return kept

    def _in_inactive_slot(self, raw: bytes) -> bool:
        """Whether the inactive slot (the update's target) holds exactly the offered bundle: the same manifest
        bytes (whose offered signature was just verified) and every file's size and sha256 as it lists. That is the
        previous model after an update (what a rollback goes back to): it is self-tested and switched to
        there, nothing downloaded. A slot that does not verify is downloaded into as usual."""
        slot = self.slots.path(self.data["target_slot"])
        try:
            if (slot / MANIFEST).read_bytes() != raw:
                return False
        except OSError:
            return False
        try:
            open_bundle(slot)  # every file's size and sha256 against these manifest bytes
            self._take_signature(slot, raw)  # so that the self-test verifies it there
        except (BundleError, OSError, ValueError) as exc:
            log.warning("slot %s holds the offered manifest but does not verify (%s); downloading the bundle "
                        "into it again", slot, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return False
        log.info("slot %s holds the offered bundle (verified): no download", slot)
        self._report({"state": S.OFFERED.value, "in_slot": self.data["target_slot"]})
        return True

    def _take_signature(self, slot: Path | None, raw: bytes) -> None:
        """A slot holding exactly the offered manifest bytes takes the offer's signature when it is by a key the
        slot holds no signature of: the bundle was signed again since it was installed (a key rotation), and that
        signature was verified over these exact bytes in this state. The serving bundle re-signed and offered again
        kept the old key's signature (the offer counted as done): once the old key was removed from
        ota.trusted_keys, as a rotation ends, the next start refused the serving model. The signatures it held
        are kept in manifest.sig.prev (every key's, newest first, MAX_PREVIOUS_SIGNATURES), and a key's signature
        the slot holds already changes nothing: the old key's offer replayed (by anyone who can publish on the
        offer topic, its signature spelt another way) put the old key back in manifest.sig, twice pushed the new
        key's out, and the end of the rotation left the box serving nothing. Writing the signature files
        (atomically) changes no byte the model is loaded from."""
        if slot is None:
            return
        kid = self.offer.signature.get("key_id") if isinstance(self.offer.signature, dict) else None
        held = None
        try:
            if (slot / MANIFEST).read_bytes() != raw:
                return
            held = read_signature(slot)
        except (OSError, ValueError, BundleError):
            pass  # unreadable or no signature: the verified one replaces it
        previous = ([held] if held is not None else []) + read_previous(slot)
        if any(sig.get("key_id") == kid and _verifies(raw, sig, self.deps.trusted_keys) for sig in previous):
            return  # (ed25519 signatures are deterministic: the same key's over the same bytes is the same)
        # a damaged one of the offered key (bytes changed, key id intact) goes: the offered one replaces it
        previous = [sig for sig in previous if sig.get("key_id") != kid]
        kept, seen = [], set()
        for sig in previous:
            if sig.get("key_id") not in seen:
                seen.add(sig.get("key_id"))
                kept.append(sig)
        if kept:
            kept = kept[:MAX_PREVIOUS_SIGNATURES]
            atomic_write_json(slot / SIGNATURE_PREVIOUS, kept[0] if len(kept) == 1 else kept)
        atomic_write_json(slot / SIGNATURE, self.offer.signature)
        log.info("slot %s: the offered signature (key %s) replaces the one it was installed with (kept beside it)",
                 slot.name, kid or "?")

    def _check_rollback(self, offer: Offer, raw: bytes) -> None:
        """A rollback offer is taken only with a valid signed statement for this fleet and device, replacing
        the version it serves now, not expired, and not applied here before."""
        if not offer.rollback_signature:
            raise UpdateFailed("rollback offer carries no rollback_signature; refused")
        terms = offer.rollback_terms
        if terms is None or terms.format < ROLLBACK_FORMAT:
            raise UpdateFailed(f"rollback statement of an older format: re-issue it with this controller "
                               f"(`edgeglm fleet rollback`; the statement is format {terms.format if terms else 1}, "
                               f"this agent takes format {ROLLBACK_FORMAT}); refused")
        if terms.format != ROLLBACK_FORMAT:
            raise UpdateFailed(f"rollback statement of format {terms.format}, this agent takes format "
                               f"{ROLLBACK_FORMAT}: update the agent, or re-issue it with a controller of its "
                               "version; refused")
        keys = self.deps.rollback_keys if self.deps.rollback_keys is not None else self.deps.trusted_keys
        if not keys:
            raise UpdateFailed("no key is trusted for rollback statements (ota.rollback_keys empty or unreadable, "
                               "or no ota.trusted_keys); refused")
        verify_bytes(rollback_statement(offer.update_id, raw, terms), offer.rollback_signature, keys,
                     f"offer {offer.update_id} rollback authorisation")
        if offer.update_id in self.applied_rollbacks():
            raise UpdateFailed(f"rollback {offer.update_id} was already applied on this device; a rollback "
                               "authorisation is used once (issue a new one); refused")
        me = f"{self.deps.fleet}/{self.deps.device}"
        if not (self.deps.fleet and self.deps.device) or (terms.fleet, terms.device) != (self.deps.fleet,
                                                                                         self.deps.device):
            raise UpdateFailed(f"rollback statement is for device {terms.fleet}/{terms.device}, this device is "
                               f"{me}; refused")
        active = self.deps.active_version()
        if terms.replaces != active:
            raise UpdateFailed(f"rollback statement replaces version {terms.replaces or '(no model)'}, this "
                               f"device serves {active or 'no model'}; refused (issue one for the version it serves)")
        clock = self.deps.clock()
        # a box without an RTC may boot at 1970 (or any stale time) until NTP syncs: its clock alone would take
        # an old, expired statement replayed to it. Time never goes back before the signed build time of the
        # model it serves
        built = self._active_built_at()
        now = max(clock, built or 0.0)
        if now > terms.not_after + ROLLBACK_CLOCK_SKEW_S:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(terms.not_after))
            behind = "" if built is None or built <= clock else \
                (f"; the model it serves was built (signed manifest) at "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(built))}, after the device clock: that time counts")
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock))
            raise UpdateFailed(f"rollback statement expired at {when} (not_after {terms.not_after}; device clock "
                               f"{iso}, {ROLLBACK_CLOCK_SKEW_S} s of clock skew allowed{behind}); refused: if the "
                               "device clock is wrong, correct it (NTP) and issue the rollback again, else issue a "
                               "new one (`edgeglm fleet rollback`)")

    def _active_built_at(self) -> float | None:
        """Unix time of the serving bundle's manifest `created` (signed, verified when it was installed); None
        when there is none or it cannot be read."""
        active = self.slots.active_path()
        try:
            created = json.loads((active / MANIFEST).read_text())["created"] if active else None
            stamp = datetime.fromisoformat(created)
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            return None
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()

    def applied_rollbacks(self) -> list[str]:
        """Ids of the rollbacks this device applied (newest last, at most ROLLBACK_APPLIED_KEEP)."""
        path = self.root / ROLLBACK_APPLIED
        if not path.is_file():
            return []
        try:
            ids = json.loads(path.read_text()).get("applied", [])
            if not isinstance(ids, list):
                raise ValueError(f"'applied' is {type(ids).__name__}, not a list")
        except (OSError, ValueError, AttributeError) as exc:
            raise UpdateFailed(f"{path}: unreadable ({exc}); rollbacks are refused until it is fixed or "
                               "removed") from None
        return [i for i in ids if isinstance(i, str)]

    def withdrawn(self) -> list[dict]:
        """The bundles this device backed out, oldest first: {"sha256", "version", "why", "at"} each."""
        try:
            data = json.loads((self.root / WITHDRAWN).read_text())
            entries = data.get("withdrawn", []) if isinstance(data, dict) else []
            if not isinstance(entries, list):
                raise ValueError(f"'withdrawn' is {type(entries).__name__}, not a list")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as exc:  # kept, not dropped: it protects against a replay
            raise UpdateFailed(f"{self.root / WITHDRAWN}: unreadable ({exc}); offers are refused until it is fixed or "
                               "removed") from None
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("sha256"), str)]

    def _withdraw(self, raw: bytes | None, why: str) -> None:
        """Remember the bundle whose manifest is `raw` as backed out (None: nothing readable, nothing to protect
        against). Never raises: a record that cannot be written (a full disk) is a warning, not a stopped
        rollback."""
        if raw is None:
            return
        try:
            version = json.loads(raw).get("version")
        except (ValueError, AttributeError, RecursionError):
            version = None
        sha = hashlib.sha256(raw).hexdigest()
        try:
            kept = [e for e in self.withdrawn() if e["sha256"] != sha]
        except UpdateFailed:
            kept = []  # an unreadable record is replaced by one that holds this bundle at least
        kept.append({"sha256": sha, "version": version, "why": why, "at": time.time()})
        try:
            atomic_write_json(self.root / WITHDRAWN, {"withdrawn": kept[-WITHDRAWN_KEEP:]})
        except OSError as exc:
            log.warning("bundle %s (manifest sha256 %s) backed out by %s, but %s could not be written (%s): a plain "
                        "offer of it is not refused", version, sha[:16], why, WITHDRAWN, exc)
            return
        log.info("bundle %s (manifest sha256 %s) backed out by %s: plain offers of it are refused from now on",
                 version, sha[:16], why)

    def _unwithdraw(self, raw: bytes | None) -> None:
        """The switch away from that bundle was undone (a failed rollback): it is not backed out."""
        if raw is None:
            return
        sha = hashlib.sha256(raw).hexdigest()
        try:
            entries = self.withdrawn()
            if any(e["sha256"] == sha for e in entries):
                atomic_write_json(self.root / WITHDRAWN, {"withdrawn": [e for e in entries if e["sha256"] != sha]})
        except (UpdateFailed, OSError) as exc:
            log.warning("%s not updated (%s)", WITHDRAWN, exc)

    def _check_withdrawn(self, raw: bytes, manifest: Manifest) -> None:
        sha = hashlib.sha256(raw).hexdigest()
        hit = next((e for e in self.withdrawn() if e["sha256"] == sha), None)
        if hit is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hit.get("at") or 0))
            raise UpdateFailed(f"bundle {manifest.version} (manifest sha256 {sha[:16]}) was backed out on this device "
                               f"by {hit.get('why')} at {when}: a plain offer of it is refused (an old offer replayed "
                               "would undo the rollback); release the model again as a new version, or offer it as a "
                               "signed rollback")

    def _remember_rollback(self, update_id: str) -> None:
        ids = [i for i in self.applied_rollbacks() if i != update_id] + [update_id]
        atomic_write_json(self.root / ROLLBACK_APPLIED, {"applied": ids[-ROLLBACK_APPLIED_KEEP:]})

    def _chunks_on_disk(self) -> dict:
        """Chunks written and fsynced per file: the progress file, else what update.json recorded."""
        done = dict(self.data["chunks_done"])
        try:
            saved = json.loads(self._progress_path.read_text())
        except (OSError, ValueError, RecursionError):  # none yet, or a torn/unreadable one: re-fetching is safe
            return done
        if isinstance(saved, dict):
            done.update({k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, int) and v >= 0})
        return done

    @staticmethod
    def _verified_prefix(dest: Path, entry, chunk_size: int, recorded: int) -> int:
        """How many of the first `recorded` chunks of `dest` still match the manifest (a resume re-reads what
        the previous run wrote: a file or its contents lost in a power cut is fetched again, not found bad
        only after the whole download)."""
        if recorded <= 0 or not dest.is_file():
            return 0
        with open(dest, "rb") as f:
            for i in range(recorded):
                f.seek(i * chunk_size)
                if hashlib.sha256(f.read(min(chunk_size, entry.size - i * chunk_size))).hexdigest() != entry.chunks[i]:
                    log.warning("%s: chunk %d on disk does not match the manifest after a restart; fetching it "
                                "and those after it again", dest, i)
                    return i
        return recorded

    def _downloading(self) -> Event:
        """Fetch every chunk not yet on disk, check it against the manifest, write and fsync it, then record
        it (in the small progress file). A restart resumes from what is on disk and still matches; a run
        that gets further than the one before resets the state's entry count, so a long download
        interrupted many times is not taken for a crash loop."""
        manifest, offer = self._manifest(), self.offer
        done = self._chunks_on_disk()
        progressed = False
        total = sum(len(f.chunks) for f in manifest.files) or 1
        for entry in manifest.files:
            expected_chunks = -(-entry.size // manifest.chunk_size)
            if len(entry.chunks) != expected_chunks:
                raise UpdateFailed(f"manifest lists {len(entry.chunks)} chunk hashes for {entry.path}, "
                                   f"expected {expected_chunks}")
            dest = self.staging / entry.path
            if self.staging.resolve() not in dest.resolve().parents:
                raise UpdateFailed(f"manifest path {entry.path!r} points outside the bundle")
            dest.parent.mkdir(parents=True, exist_ok=True)
            start = self._verified_prefix(dest, entry, manifest.chunk_size, min(done.get(entry.path, 0),
                                                                              expected_chunks))
            with open(dest, "r+b" if dest.exists() else "w+b") as f:
                f.truncate(entry.size)
                for i in range(start, expected_chunks):
                    for attempt in range(1, CHUNK_ATTEMPTS + 1):  # a chunk damaged on its way is asked for again
                        data = self.deps.fetcher.read_chunk(offer, entry.path, i, manifest.chunk_size)
                        digest = hashlib.sha256(data).hexdigest()
                        if digest == entry.chunks[i]:
                            break
                        if attempt == CHUNK_ATTEMPTS:
                            raise UpdateFailed(f"chunk {i} of {entry.path}: sha256 {digest} does not match the "
                                               f"manifest's {entry.chunks[i]} ({CHUNK_ATTEMPTS} times: the source "
                                               "serves other bytes than the offered bundle's)")
                        log.warning("OTA %s: chunk %d of %s does not match the manifest (sha256 %s): asking again",
                                    offer.update_id, i, entry.path, digest[:16])
                    self._make_room(len(data))
                    f.seek(i * manifest.chunk_size)
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                    done[entry.path] = i + 1  # only after the chunk is on disk
                    atomic_write_json(self._progress_path, done)
                    if not progressed:  # this run gets somewhere: not a crash loop
                        progressed = True
                        self.data["entries"] = 1
                        self._save()
                    finished = sum(done.values())
                    if finished % 16 == 0 or finished == total:
                        self._report({"state": S.DOWNLOADING.value, "progress": round(100 * finished / total, 1)})
            done[entry.path] = expected_chunks
        self.data["chunks_done"] = done  # saved with the transition
        return E.DOWNLOADED

    def _make_room(self, size: int) -> None:
        """Clear the slot OFFERED set aside for this download (the model before the serving one, which INSTALLING
        replaces anyway) once the next `size` bytes would leave less than DISK_HEADROOM free."""
        target = self.data.get("clear_when_full")
        if not target or shutil.disk_usage(self.staging).free >= size + DISK_HEADROOM:
            return
        held = _bytes_on_disk(self.slots.path(target))
        if target != self.slots.active():
            self.slots.clear(target)
            log.warning("slot %s (the previous model, %d bytes) cleared to make room for the rest of the download",
                        target, held)
            self._report({"state": S.DOWNLOADING.value, "cleared_slot": target,
                          "note": f"previous model in slot {target} removed to make room for the download"})
        self.data.pop("clear_when_full", None)
        self._save()

    def _keys_now(self) -> dict:
        """The trusted keys as they are now (a key removed while the update downloads is not trusted at its
        verification and self-test: the offer's copy would have let its bundle over the previous model)."""
        if self.deps.reload_keys is not None:
            self.deps.trusted_keys = self.deps.reload_keys()
        return self.deps.trusted_keys

    def _verifying(self) -> Event:
        bundle = open_bundle(self.staging)  # every file's size and sha256
        verify_bundle_signature(bundle, self._keys_now())
        if bundle.manifest_bytes != self.offer.manifest_bytes():
            raise UpdateFailed("staged manifest differs from the offered one")
        return E.VERIFIED

    def _installing(self) -> Event:
        target = self.data["target_slot"]
        if self.staging.exists():  # on a resume after the move, staging is gone and the slot is full
            self.slots.install(self.staging, target)
        elif not (self.slots.path(target) / MANIFEST).is_file():
            raise UpdateFailed(f"nothing staged and slot {target} is empty")
        return E.INSTALLED

    def _self_test(self) -> Event:
        path = self.slots.path(self.data["target_slot"])
        bundle = open_bundle(path)
        verify_bundle_signature(bundle, self._keys_now(), previous=True)
        result = self.deps.self_test(path, bundle.manifest)
        self.data["self_test"] = {"passed": result.passed, "reason": result.reason, **(result.details or {})}
        self._report({"state": S.SELF_TEST.value, "self_test": self.data["self_test"]})
        if not result.passed:
            raise UpdateFailed(f"self-test failed: {result.reason}")
        return E.PASSED

    def _committing(self) -> Event:
        target = self.data["target_slot"]
        if self.offer.rollback:  # remembered before the switch: a replay is refused even after a power cut here
            self._remember_rollback(self.data["update_id"])
            # the bundle served when the offer was checked (`previous_slot`): on a COMMITTING entered again after a
            # death, the active slot is already the rollback's target
            previous = self.data.get("previous_slot")
            self._withdraw(_manifest_of(self.slots.path(previous)) if previous else None,
                           f"rollback {self.data['update_id']}")
        self.data["switching"] = True  # from here on a failure must switch back (ROLLBACK)
        # on probation from before the switch (a death while loading it in COMMITTING is this state's own count);
        # the serving model's own probation, if it is on one, is kept in it for a ROLLBACK
        before = self.probation
        if before is not None and before.get("update_id") == self.data["update_id"]:  # COMMITTING entered again
            before = before.get("before")
        self._save_probation({"update_id": self.data["update_id"], "version": self._manifest().version,
                              "slot": target, "previous_slot": self.data.get("previous_slot"), "deaths": 0,
                              "running": True, "probation_s": self.deps.probation_s, "committed": time.time(),
                              "before": {k: v for k, v in before.items() if k != "before"} if before else None})
        self.slots.activate(target)
        self.deps.activate(self.slots.path(target))
        self.data["outcome"] = "committed"
        return E.COMMITTED

    def _rollback(self) -> Event:
        if self.probation is not None and self.probation.get("update_id") == self.data.get("update_id"):
            self._save_probation(self.probation.get("before"))  # the old model's, as before COMMITTING
        previous = self.data.get("previous_slot")
        if previous and self.offer.rollback:  # a rollback undone: the bundle it backed out serves again
            self._unwithdraw(_manifest_of(self.slots.path(previous)))
        if not self.data.get("switching") and self.slots.active() == previous:
            # COMMITTING failed before it switched anything (its state could not be saved): the old model
            # still serves; loading it again would hold two copies on a box short of memory. Unless the agent
            # restarted in COMMITTING, which loads no model at start: then the previous one is loaded here
            self.data["outcome"] = "failed"
            if previous and not self.deps.serving():
                try:
                    self.deps.activate(self.slots.path(previous))
                except Exception as exc:  # noqa: BLE001: the update has failed either way; say why nothing serves
                    log.error("the previous model in slot %s cannot be served after the failed update: %s",
                              previous, exc)
            return E.ROLLED_BACK
        self.data["outcome"] = "rolled_back"
        if previous:
            self.slots.activate(previous)
            self.deps.activate(self.slots.path(previous))
        else:
            if self.slots.link.is_symlink():
                self.slots.link.unlink()
            self.deps.activate(None)
        return E.ROLLED_BACK

    def _failure(self) -> Event:
        self.data["outcome"] = "failed"
        return E.DONE

    def _cleanup(self) -> Event:
        history = self.data.get("history", [])
        # (not when the disk is full: then CLEANUP is what frees it)
        full = any(word in (self.data.get("reason") or "") for word in ("No space left", "disk full", "Errno 28"))
        failed_downloading = (self.data.get("outcome") != "committed" and S.DOWNLOADING.value in history
                              and S.VERIFYING.value not in history and (self.staging / MANIFEST).is_file()
                              and not full)
        if failed_downloading or self.data.get("outcome") == "committed":  # (a model committed: the box moved on)
            shutil.rmtree(self.partial, ignore_errors=True)  # one partial download at most: the latest
            self._partial_progress.unlink(missing_ok=True)
        if failed_downloading:  # its verified chunks wait for an offer of the same bundle (`_take_partial`)
            os.replace(self.staging, self.partial)
            if self._progress_path.exists():
                os.replace(self._progress_path, self._partial_progress)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._progress_path.unlink(missing_ok=True)
        target = self.data.get("target_slot")
        written = S.INSTALLING.value in self.data.get("history", [])  # the slot was (maybe partly) overwritten
        if self.data.get("outcome") != "committed" and written and target and target != self.slots.active():
            self.slots.clear(target)  # a slot that failed holds nothing worth keeping
        # an update refused or failed before INSTALLING never touched the inactive slot: the previous model
        # stays there (the fallback at start, and what a rollback can go back to)
        return E.CLEANED

    def _reporting(self) -> Event:
        self._report({"state": S.REPORTING.value, "result": self.data.get("outcome"),
                      "active_slot": self.slots.active(), "history": self.data["history"]}, keep=True)
        return E.REPORTED
