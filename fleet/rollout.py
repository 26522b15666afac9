"""Staged rollouts gated by measured latency.

    phase         does                                                         next
    canary        pick ceil(canary% of the group's online devices that do not   canary_wait
                  run the bundle's version yet), record their p95 per-token     (done: all do)
                  latency on the current version, offer
    canary_wait   wait for every canary's OTA result                           canary_window | halting
    canary_window wait `window_s`, then compare the canaries' p95 per-token     rest | halting
                  latency and error count on the new version to their baseline
                  (a regression is over max_regression_pct AND over min_delta_ms);
                  a canary with no telemetry yet gets one more window, then fails;
                  with min_free_mb, a canary whose health snapshot says it can
                  still take less memory than that fails too (the report gives
                  each canary's rss and free memory before -> after either way)
    rest          offer to the remaining devices                               rest_wait
    rest_wait     wait for their results                                       done
    halting       offer the canaries a signed rollback to the previous bundle  halted
    (any active)  `edgeglm fleet rollout cancel ID` (`cancel_rollout`)          cancelled

A cancelled rollout offers nothing more, sends no rollback and is never advanced again; devices
already offered the bundle keep their retained offer and finish (or fail) that update on their
own (an offer that went out as the cancel landed is still added to the rollout's offers and report).
`edgeglm fleet rollback` takes them back.

One active rollout per device: `create_rollout` refuses a rollout whose devices an active rollout of the
same fleet may offer too (the check and the INSERT in one transaction). Group membership can change while
rollouts run, so that alone is not enough: when a rollout picks its canaries or its rest it leaves out every
device another active rollout has offered or may still offer (`claims`: its offers, canaries and rest, and
its target's members until it has picked its rest), and says so in its report; and `fleet group add`
refuses a device that two active rollouts would then target (`group_add_checked`).

The rollout lives in the controller's database and is advanced by `tick()`, so a controller
restart continues where it was. Each decision is written to the rollout's report.

A rollout goes to one fleet, or to the members of an assigned group within it (`group`,
resolved when the canaries are picked: fleet/groups.py). `offer_rollback` is the signed
rollback of the halt path; `edgeglm fleet rollback` uses it too.
"""

from __future__ import annotations

import json
import re
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from fleet.store import Store
from ota.errors import VersionError
from ota.versions import parse_version

log = logging.getLogger("edgeglm.fleet")

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, bundle TEXT NOT NULL, fleet TEXT NOT NULL, canary_pct REAL NOT NULL,
    max_regression_pct REAL NOT NULL, window_s REAL NOT NULL, previous_bundle TEXT, key TEXT,
    min_delta_ms REAL NOT NULL DEFAULT 1.0,
    phase TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, group_name TEXT,
    min_requests INTEGER NOT NULL DEFAULT 1);
"""


# each offer of a rollout as it is published, one small row: rewriting the rollout's whole data (1 MB at 10,000
# devices) after every offer made a rollout of 10,000 quadratic (110 s of store lock, ~30 GB written); the data
# takes them in once a second and at the end of the offers, and every read of a rollout merges them in
OFFERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_offers (
    rollout_id INTEGER NOT NULL, device TEXT NOT NULL, update_id TEXT NOT NULL, PRIMARY KEY (rollout_id, device))
"""
KEEP_EVERY_S = 1.0  # while offering: how often the rollout's data takes in its offers
REPORT_LIST_MAX = 20  # devices a report line names; beyond, the first ones and the count (a line of 10,000 was 243 KB)


def _few(devices: list[str]) -> str:
    """A list of devices for a report line: whole up to REPORT_LIST_MAX, else its first ones and how many more."""
    devices = list(devices)
    if len(devices) <= REPORT_LIST_MAX:
        return str(devices)
    return str(devices[:REPORT_LIST_MAX])[:-1] + f", ... and {len(devices) - REPORT_LIST_MAX} more]"


def _schema(store: Store) -> None:
    # one statement each, by execute (not executescript, which commits first): it may run inside a transaction
    store._exec(SCHEMA.strip().rstrip(";"))
    store._exec(OFFERS_SCHEMA.strip())
    have = {row[1] for row in store._exec("PRAGMA table_info(rollouts)")}
    # a rollout recorded by an older controller keeps the gate it was started with (no minimum: 1 request)
    for column, kind in (("min_delta_ms", "REAL NOT NULL DEFAULT 1.0"), ("group_name", "TEXT"),
                         ("min_requests", "INTEGER NOT NULL DEFAULT 1")):
        if column not in have:  # a database of an older controller
            store._exec(f"ALTER TABLE rollouts ADD COLUMN {column} {kind}")
ACTIVE = ("canary", "canary_wait", "canary_window", "rest", "rest_wait", "halting")
ERROR_RATE_FLOOR = 0.01  # the canary gate halts on an error rate above the baseline's by more than this
# a canary whose telemetry of the gate's window is missing for more than this share of it fails the gate (below
# it, the pass says so): docs/fleet.md "Missing telemetry"
MISSING_SHARE_MAX = 0.1
MIN_REQUESTS = 10  # requests a canary serves on each side of the update before its latency decides (default)
RESULT_WAIT_MIN_S = 3600.0  # how long canary_wait / rest_wait wait for devices' results, at least


def result_wait_s(window_s: float) -> float:
    """How long a rollout waits for OTA results before it stops waiting for the devices that sent none
    (offline, or a download on a slow link): an hour, or four gate windows if longer."""
    return max(RESULT_WAIT_MIN_S, 4 * window_s)


def _memory(health: dict) -> dict:
    """What the memory gate keeps of a DeviceHealth snapshot."""
    return {k: health.get(k) for k in ("rss_bytes", "memory_available_bytes")}


def _mib(n) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


def _like_for_like(base: dict, new: dict) -> tuple[dict, dict, bool]:
    """The baseline and the new version's latency read the same way: percentiles off histograms on both sides, or
    else request-weighted means of window percentiles on both (`Store.latency` keeps the means in "means"; a
    baseline recorded before histograms has only means). One side of each made identical traffic read +95%
    (a histogram lost on the baseline's side: a false halt) or hid a regression (lost on the new side).
    Returns (base, new, whether they were read as means because one side had no histograms)."""
    if base.get("percentiles") == new.get("percentiles") == "histograms" or not new.get("requests"):
        return base, new, False
    if base.get("percentiles") == new.get("percentiles") == "window means":
        return base, new, False
    return ({**base, **base.get("means", {})}, {**new, **new.get("means", {})},
            bool(base.get("requests")) and bool(new.get("requests")))


def _error_rate(latency: dict) -> float:
    """errors / (requests + errors) of a `Store.latency` result (a failed request is not in `requests`)."""
    errors = latency.get("errors", 0) or 0
    total = (latency.get("requests", 0) or 0) + errors
    return errors / total if total else 0.0
ENDED = ("done", "halted", "cancelled")


class RolloutError(AgentError):
    """A rollout cannot be created or cancelled as asked."""


@dataclass
class Rollout:
    id: int
    bundle: Path
    fleet: str
    canary_pct: float
    max_regression_pct: float
    window_s: float
    previous_bundle: Path | None
    key: Path | None
    phase: str
    data: dict
    min_delta_ms: float = 1.0
    group: str | None = None  # an assigned group within `fleet`; None: the whole fleet
    min_requests: int = 1  # requests per canary and side of the update the latency gate decides on, at least

    @property
    def target(self) -> str:
        return _target(self.fleet, self.group)


def create_rollout(store: Store, bundle: Path, fleet: str, canary_pct: float, max_regression_pct: float = 20.0,
                   window_s: float = 300.0, previous_bundle: Path | None = None, key: Path | None = None,
                   min_delta_ms: float = 1.0, group: str | None = None, min_free_mb: float | None = None,
                   min_requests: int = MIN_REQUESTS) -> int:
    """Record a rollout (advanced by RolloutDriver.tick). `min_free_mb`: the memory gate (None: off): a canary
    whose health snapshot on the new version says it can still take less than this many MiB halts the rollout.
    `min_requests`: a canary must serve this many requests on the new version (in up to two windows) for the gate
    to pass, and as many on the old one before the update for its latency to be compared."""
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise RolloutError(f"min_requests {min_requests!r} is invalid: must be a whole number >= 1; nothing was "
                           f"recorded")
    _schema(store)
    # the check and the INSERT in one transaction: two `fleet rollout` commands at the same moment both passed
    # the check before either recorded its rollout
    with store.transaction():
        return _insert_rollout(store, bundle, fleet, canary_pct, max_regression_pct, window_s, previous_bundle, key,
                               min_delta_ms, group, min_free_mb, min_requests)


def _insert_rollout(store, bundle, fleet, canary_pct, max_regression_pct, window_s, previous_bundle, key,
                    min_delta_ms, group, min_free_mb, min_requests) -> int:
    active = active_rollout(store, fleet, group)
    if active is not None:
        raise RolloutError(
            f"rollout {active.id} ({active.bundle.name} -> {active.target}) is still active (phase {active.phase}) "
            f"and may offer the same devices as a rollout to {_target(fleet, group)}; nothing was recorded. Wait "
            f"until it is done or halted (`edgeglm fleet status`), or stop it with "
            f"`edgeglm fleet rollout cancel {active.id}`")
    now = time.time()
    cur = store._exec(
        "INSERT INTO rollouts (bundle, fleet, canary_pct, max_regression_pct, window_s, previous_bundle, key, "
        "min_delta_ms, phase, data, created, updated, group_name, min_requests) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (str(Path(bundle).resolve()), fleet, canary_pct, max_regression_pct, window_s,
         str(Path(previous_bundle).resolve()) if previous_bundle else None,
         # absolute but not resolved: a Kubernetes Secret's file is a link into a directory the kubelet replaces
         # when the Secret changes (a key rotation); the resolved path would be gone after it
         os.path.abspath(key) if key else None,
         min_delta_ms, "canary", json.dumps({"report": [], **({"min_free_mb": min_free_mb} if min_free_mb else {})}),
         now, now, group, min_requests))
    return cur.lastrowid


def _bundle_version(bundle: Path) -> str | None:
    """The version in a bundle's manifest (checked with its files when the rollout was created); None when it
    cannot be read now: the offer then fails with the reason, logged and retried (RolloutDriver.tick)."""
    try:
        version = json.loads((Path(bundle) / "manifest.json").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _missing(losses: dict[str, dict]) -> str:
    """Devices' telemetry_losses for a report line: {'d1': '40 s in 2 gap(s)', ...}."""
    return str({d: f"{loss['missing_s']:.0f} s in {loss['missing_gaps']} gap(s)" + (
        f", {loss['lost_reports']} report(s) lost from its buffer" if loss["lost_reports"] else "")
        for d, loss in losses.items()})


def _newer(serving: str | None, version: str | None) -> bool:
    """Whether a device serving `serving` runs a newer version than `version` (its agent refuses `version` as a
    downgrade: an offer of it fails, and a failed canary halts the rollout)."""
    if not serving or not version:
        return False
    try:
        return parse_version(serving) > parse_version(version)
    except VersionError:
        return False


def _target(fleet: str, group: str | None) -> str:
    return f"group {group} of {fleet}" if group else f"fleet {fleet}"


def active_rollout(store: Store, fleet: str, group: str | None = None) -> "Rollout | None":
    """The active rollout that may offer devices of `group` (None: the whole fleet) of `fleet`: one to the
    whole fleet, to the same group, or to a group with a device in common."""
    groups = store.groups()

    def members(g: str | None) -> set[str] | None:
        return None if g is None else {d for f, d in groups.get(g, []) if f == fleet}

    mine = members(group)
    for r in load_rollouts(store, active_only=True):
        if r.fleet != fleet:
            continue
        theirs = members(r.group)
        if mine is None or theirs is None or r.group == group or mine & theirs:
            return r
    return None


def _picked_all(r: Rollout) -> bool:
    """Whether r has picked every device it offers (halting: rollbacks to its canaries)."""
    return r.phase in ("rest_wait", "halting") or (r.phase == "rest" and bool(r.data.get("rest_picked")))


def committed(r: Rollout) -> set[str]:
    """The devices the active rollout r has offered or picked to offer: its offers and canaries, and its rest once
    picked for good (the rest picked with the canaries is offered only to those still in its group then)."""
    out = set(r.data.get("offers", {})) | set(r.data.get("canaries", []))
    return out | set(r.data.get("rest", [])) if _picked_all(r) else out


def claims(r: Rollout, groups: dict[str, list[tuple[str, str]]]) -> set[str] | None:
    """The devices of r.fleet that the active rollout r has offered or may still offer (None: any device of its
    fleet): `committed`, and, until it has picked its rest, its target's members in `groups` (`Store.groups()`)
    as they are now."""
    if _picked_all(r):
        return committed(r)
    if r.group is None:
        return None
    return committed(r) | {d for f, d in groups.get(r.group, []) if f == r.fleet}


def _claimed_by_others(store: Store, r: Rollout, devices) -> dict[str, list[Rollout]]:
    """Of `devices`, those another active rollout of r's fleet has offered or picked (`committed`), or, an older
    one, may still offer (`claims`): device -> those rollouts. The older rollout keeps a device both may offer,
    so two rollouts never wait on each other."""
    groups = store.groups()
    others = [(o, committed(o), claims(o, groups) if o.id < r.id else set())
              for o in load_rollouts(store, active_only=True) if o.fleet == r.fleet and o.id != r.id]
    out = {}
    for d in devices:
        mine = [o for o, fixed, may in others if d in fixed or may is None or d in may]
        if mine:
            out[d] = mine
    return out


def _left_out_note(taken: dict[str, list[Rollout]]) -> str:
    by = {}
    for d, rs in sorted(taken.items()):
        by.setdefault(tuple((o.id, o.bundle.name, o.target) for o in rs), []).append(d)
    return "; ".join(f"{_few(devices)} left out: also targeted by "
                     + " and ".join(f"active rollout {i} ({b} -> {t})" for i, b, t in key)
                     + ", which may offer it another bundle"
                     for key, devices in by.items())


def group_add_checked(store: Store, group: str, fleet: str, devices: list[str], force: bool = False
                      ) -> tuple[int, dict[str, list[Rollout]]]:
    """`fleet group add`: put `devices` of `fleet` in `group`, unless one not in it yet would then be targeted
    by two active rollouts (each would offer it its own bundle on its one retained offer topic): RolloutError,
    nothing added. With `force` they are added anyway (the older rollout offers them, unless the newer one has
    picked them already; the newer leaves them out).
    Returns (how many were new, device -> the active rollouts that target it, where two or more do). The check and
    the rows in one transaction (a rollout created meanwhile cannot slip in between)."""
    _schema(store)
    with store.transaction():
        groups = store.groups()
        have = {d for f, d in groups.get(group, []) if f == fleet}
        new = [d for d in dict.fromkeys(devices) if d not in have]
        after = {**groups, group: groups.get(group, []) + [(fleet, d) for d in new]}
        active = [(r, claims(r, after)) for r in load_rollouts(store, active_only=True) if r.fleet == fleet]
        both = {d: rs for d in new if len(rs := [r for r, c in active if c is None or d in c]) > 1}
        if both and not force:
            them = "it" if len(both) == 1 else "them"
            named = "; ".join(f"{d} by " + " and ".join(f"rollout {r.id} ({r.bundle.name} -> {r.target})" for r in rs)
                              for d, rs in both.items())
            raise RolloutError(
                f"group {group}: adding {', '.join(both)} of fleet {fleet} would have two active rollouts target "
                f"{them} ({named}), which would offer different bundles; nothing was added. Cancel one (`edgeglm "
                f"fleet rollout cancel ID`) or wait until one is done or halted (`edgeglm fleet status`), or give "
                f"--force (the older rollout then offers {them}, and the newer leaves {them} out)")
        return store.group_add(group, fleet, devices), both


def _rollout_row(store: Store, rollout_id: int) -> "tuple[Rollout, float] | None":
    """One rollout and its `updated`, read in one SELECT (its offers merged in)."""
    row = store._exec(f"SELECT {_COLUMNS}, updated FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
    if row is None:
        return None
    r = _rollout(row)
    _merge_offers(store, [r])
    return r, row[-1]


def _merge_offers(store: Store, rollouts: list[Rollout]) -> None:
    """The offers recorded one by one (rollout_offers) into each rollout's data["offers"]."""
    ids = [r.id for r in rollouts if r.phase in ACTIVE or r.phase == "cancelled"]
    if not ids:
        return
    try:
        rows = store._exec(f"SELECT rollout_id, device, update_id FROM rollout_offers WHERE rollout_id IN "
                           f"({','.join('?' * len(ids))})", ids).fetchall()
    except Exception as exc:  # noqa: BLE001: a read-only database of a controller from before the table
        if "no such table" in str(exc):
            return
        raise
    by_id = {r.id: r for r in rollouts}
    for rid, device, update_id in rows:
        by_id[rid].data.setdefault("offers", {}).setdefault(device, update_id)


def cancel_rollout(store: Store, rollout_id: int) -> tuple["Rollout", str]:
    """Stop an active rollout where it is: (the rollout as it was, the phase it was cancelled in).
    Compare-and-set on `updated`, read in the same SELECT as its data, so a `fleet serve` advancing it at the same
    moment (an offer it records) is not overwritten (and the driver never moves a cancelled rollout:
    RolloutDriver._save)."""
    _schema(store)
    for _ in range(20):
        # (an id beyond SQLite's integers names no rollout: it was a raw OverflowError from the driver)
        got = _rollout_row(store, rollout_id) if -(1 << 63) <= rollout_id < 1 << 63 else None
        if got is None:
            active = [str(x.id) for x in load_rollouts(store, active_only=True)]
            raise RolloutError(f"rollout {rollout_id}: no such rollout (active: {', '.join(active) or 'none'}); "
                               f"`edgeglm fleet status` lists them")
        r, updated = got
        if r.phase not in ACTIVE:
            raise RolloutError(f"rollout {rollout_id} already ended ({r.phase}); nothing to cancel")
        was = r.phase
        r.data["report"].append(f"{time.strftime('%H:%M:%S')} cancelled by the operator in phase {was}; "
                                f"no further offers")
        cur = store._exec("UPDATE rollouts SET phase='cancelled', data=?, updated=? WHERE id=? AND updated=?",
                          (json.dumps(r.data), time.time(), rollout_id, updated))
        if cur.rowcount == 1:
            r.phase = "cancelled"
            return r, was
        time.sleep(0.05)  # the driver moved it meanwhile: read it again
    raise RolloutError(f"rollout {rollout_id} changed 20 times while being cancelled; try again")


_COLUMNS = ("id, bundle, fleet, canary_pct, max_regression_pct, window_s, previous_bundle, key, phase, data, "
            "min_delta_ms, group_name, min_requests")


def _rollout(r: tuple) -> Rollout:
    return Rollout(r[0], Path(r[1]), r[2], r[3], r[4], r[5], Path(r[6]) if r[6] else None,
                   Path(r[7]) if r[7] else None, r[8], json.loads(r[9]), r[10], r[11], r[12])


def load_rollouts(store: Store, active_only: bool = False) -> list[Rollout]:
    if getattr(store, "read_only", False):  # (`fleet status` by a user who may only read): nothing is created
        if not store._exec("SELECT 1 FROM sqlite_master WHERE type='table' AND name='rollouts'").fetchone():
            return []
    else:
        _schema(store)
    rows = store._exec(f"SELECT {_COLUMNS} FROM rollouts" + (
        f" WHERE phase IN ({','.join('?' * len(ACTIVE))})" if active_only else "") + " ORDER BY id",
        ACTIVE if active_only else ()).fetchall()
    out = [_rollout(r) for r in rows]
    _merge_offers(store, out)
    return out


# the saved start times of a rollout's waits and windows, and how far the wall clock must step between two ticks
# (against the monotonic clock) to be taken for a step, not for time passed
TIMERS = ("offered_at", "window_start", "rest_offered_at", "baseline_wait_since")
CLOCK_STEP_S = 30.0
ROLLBACK_VALID_S = 24 * 3600.0  # how long a rollback authorisation is valid by default
ROLLBACK_VALID_MAX_S = 30 * 86400.0  # the longest `fleet rollback --valid-for` issues


def offer_rollback(controller, fleet: str, devices: dict[str, str | None], bundle: Path, key: Path,
                   valid_s: float = ROLLBACK_VALID_S) -> dict[str, str]:
    """Offer every device a rollback to `bundle`, signed with `key`: device -> update id.

    `devices` maps each device to the version it serves now (None: no model): each gets its own statement,
    bound to this fleet, that device and that version, valid for `valid_s` seconds."""
    from ota.signing import load_private_key

    private = load_private_key(key)
    not_after = int(time.time() + valid_s)
    return {d: controller.offer(fleet, d, bundle, rollback_key=private, replaces=v, not_after=not_after)
            for d, v in devices.items()}


class RolloutDriver:
    """Advances the active rollouts of `fleet` ('+': of every fleet); `controller` offers bundles
    (FleetController.offer). A controller serving one fleet (`fleet serve --fleet F`) hears only that
    fleet's devices: it must not drive another fleet's rollout (it would wait for results it never hears,
    or offer twice beside that fleet's own controller on a shared database)."""

    def __init__(self, store: Store, controller, fleet: str = "+", stopping=None):
        self.store, self.controller, self.fleet = store, controller, fleet
        self.stopping = stopping  # a threading.Event: set, the offers of a tick stop (kept) and go on at the next start
        self._failing: dict[int, str] = {}  # rollout id -> the error its last step raised (logged once)
        self._last_clock: tuple[float, float] | None = None  # (wall, monotonic) at the last tick

    def _save(self, r: Rollout, phase: str, note: str | None = None) -> None:
        if note and phase == "halting" and r.phase != "halting":  # why it halts: `fleet status` shows it to the end
            r.data["halt_reason"] = note
        if note:
            r.data["report"].append(f"{time.strftime('%H:%M:%S')} {note}")
            # each decision in fleet serve's log too (a halt as a warning), as `fleet status` shows the last one
            (log.warning if phase in ("halting", "halted") else log.info)(
                "rollout %d (%s -> %s): %s%s", r.id, r.bundle.name, r.target, note,
                "" if phase == r.phase else f" [{r.phase} -> {phase}]")
        r.phase = phase
        # never over a cancel that came in while this tick worked on the rollout
        saved = self.store._exec("UPDATE rollouts SET phase=?, data=?, updated=? WHERE id=? AND phase != 'cancelled'",
                                 (phase, json.dumps(r.data), time.time(), r.id)).rowcount
        if saved and phase not in ACTIVE:  # ended with every offer in its data (merged when it was loaded)
            self.store._exec("DELETE FROM rollout_offers WHERE rollout_id=?", (r.id,))

    def tick(self, now: float | None = None) -> None:
        """One step of every active rollout. A step that raises (a bundle deleted since the rollout was
        recorded, a database error) is logged, once per rollout and error, and tried again at the next tick;
        the other rollouts, and `fleet serve`, go on. `now`: the wall clock (tests pass their own)."""
        if now is None:
            now = time.time()
            self._follow_clock(now)
        for r in load_rollouts(self.store, active_only=True):
            if self.fleet != "+" and r.fleet != self.fleet:
                continue
            try:
                getattr(self, f"_{r.phase}")(r, now)
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                if self._failing.get(r.id) != text:
                    self._failing[r.id] = text
                    log.error("rollout %d (%s -> %s), phase %s: step failed, retried every tick: %s", r.id,
                              r.bundle.name, r.target, r.phase, text, exc_info=exc)
                    try:  # `fleet status` shows it beside the phase (the log alone was easy to miss)
                        r.data["step_error"] = f"{time.strftime('%H:%M:%S')} {r.phase}: {text[:300]}"
                        self._keep(r)
                    except Exception:  # noqa: BLE001: the database itself may be what fails
                        pass
            else:
                if self._failing.pop(r.id, None) is not None:
                    log.info("rollout %d: phase %s went through again", r.id, r.phase)
                    r.data.pop("step_error", None)
                    self._keep(r)

    def _follow_clock(self, now: float) -> None:
        """A step of the controller's wall clock (NTP after a boot without an RTC, a VM restored) between two
        ticks shifts the active rollouts' saved start times by as much, so that it is not taken for time passed:
        a +1 h step halted a canary wait at once ("no result ... in 3602 s"), a -1 h step held a window an hour
        longer. Measured against the monotonic clock, tick to tick."""
        mono = time.monotonic()
        last, self._last_clock = self._last_clock, (now, mono)
        if last is None:
            return
        jump = (now - last[0]) - (mono - last[1])
        if abs(jump) < CLOCK_STEP_S:
            return
        log.warning("the controller's clock stepped by %+.0f s: the active rollouts' waits and windows are shifted "
                    "by as much", jump)
        for r in load_rollouts(self.store, active_only=True):
            if self.fleet != "+" and r.fleet != self.fleet:
                continue
            moved = [k for k in TIMERS if isinstance(r.data.get(k), (int, float))]
            for k in moved:
                r.data[k] += jump
            if moved:
                self._keep(r)

    def _keep(self, r: Rollout) -> bool:
        """Write r.data as it is now, the phase unchanged (never over a cancel): False if it was cancelled."""
        return self.store._exec("UPDATE rollouts SET data=?, updated=? WHERE id=? AND phase != 'cancelled'",
                                (json.dumps(r.data), time.time(), r.id)).rowcount == 1

    def _record_late_offer(self, r: Rollout, device: str, update_id: str) -> None:
        """An offer published after a cancel landed (between the check and the publish): merged into the cancelled
        rollout's offers and report, so the operator sees that this device was offered it."""
        with self.store.transaction():
            row = self.store._exec("SELECT data FROM rollouts WHERE id=?", (r.id,)).fetchone()
            if row is None:
                return
            data = json.loads(row[0])
            data.setdefault("offers", {})[device] = update_id
            data.setdefault("report", []).append(
                f"{time.strftime('%H:%M:%S')} offered to {device} ({update_id}) as the cancel landed: its retained "
                f"offer stands")
            self.store._exec("UPDATE rollouts SET data=?, updated=? WHERE id=?", (json.dumps(data), time.time(), r.id))
        log.info("rollout %d: offered to %s as it was cancelled; recorded in its report", r.id, device)

    def _offer(self, r: Rollout, devices: list[str], bundle: Path) -> bool:
        """Offer `bundle` to each device not offered it by this rollout yet, recording each offer in
        r.data["offers"] as soon as it is published, and stopping as soon as the rollout is cancelled (a `rollout
        cancel` that lands while a step offers to hundreds of devices stops the offers from there on). A step
        cut off midway (the broker lost, the controller killed) offers the rest at its retry, to the same
        devices: it picked new canaries among those not yet on the version, so the first ones ran the new
        version unmeasured and were never rolled back. False if cancelled."""
        offers = r.data.setdefault("offers", {})
        todo = [d for d in devices if d not in offers]
        kept = time.monotonic()
        for n, d in enumerate(todo):
            row = self.store._exec("SELECT phase FROM rollouts WHERE id=?", (r.id,)).fetchone()
            if row and row[0] == "cancelled":
                log.info("rollout %d cancelled while offering: %d of %d device(s) offered", r.id, n, len(todo))
                return False
            if self.stopping is not None and self.stopping.is_set():  # `fleet serve` stops: the next start goes on
                self._keep(r)
                log.info("rollout %d: stopped while offering: %d of %d device(s) offered; the rest when the "
                         "controller runs again", r.id, n, len(todo))
                return False
            offers[d] = self.controller.offer(r.fleet, d, bundle)
            # one small row per offer, never over a cancel (the data takes them in once a second, and at the end)
            recorded = self.store._exec(
                "INSERT OR REPLACE INTO rollout_offers (rollout_id, device, update_id) SELECT ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM rollouts WHERE id=? AND phase != 'cancelled')", (r.id, d, offers[d], r.id)).rowcount
            if not recorded:  # cancelled while it was being offered: the offer is out all the same
                self._record_late_offer(r, d, offers[d])
                log.info("rollout %d cancelled while offering: %d of %d device(s) offered", r.id, n + 1, len(todo))
                return False
            if time.monotonic() - kept >= KEEP_EVERY_S:
                kept = time.monotonic()
                self._keep(r)
        return not todo or self._keep(r)

    def _members(self, r: Rollout) -> set[str] | None:
        if r.group is None:
            return None
        return {d for f, d in self.store.groups().get(r.group, []) if f == r.fleet}

    def _canary(self, r: Rollout, now: float) -> None:
        if r.data.get("picked"):  # picked and saved by an earlier tick that was cut off while offering
            return self._offer_canaries(r, now)
        members = self._members(r)
        online = sorted(d["device"] for d in self.store.devices(r.fleet)
                        if d["online"] and (members is None or d["device"] in members))
        if not online:  # nothing to do until devices are online: said once, in the report and the log
            if not r.data.get("waiting_online"):
                r.data["waiting_online"] = True
                self._save(r, "canary", f"waiting: no device of {r.target} is online"
                                        + (f" (members: {', '.join(sorted(members))})" if members else ""))
            return
        r.data.pop("waiting_online", None)
        # a device that already runs the bundle's version is neither a canary (its "before" latency would be
        # the new version's) nor offered it (agents from before the no-op answer to the bundle they serve report
        # such an offer as failed, which halts a rollout)
        version = r.data.get("version") or _bundle_version(r.bundle)
        serving = {d["device"]: d["model_version"] for d in self.store.devices(r.fleet)}
        already = [d for d in online if version is not None and serving.get(d) == version]
        # nor one that runs a newer version (a pilot box given a later build by `fleet offer`): its agent refuses
        # the bundle as a downgrade, and a refused canary halted the rollout
        newer = [d for d in online if _newer(serving.get(d), version)]
        skip = set(already) | set(newer)
        online = [d for d in online if d not in skip]
        # a device another active rollout has picked, or an older one may offer (it is in both targets since a
        # `group add --force`), is left out: both would offer it their bundle on its one retained offer topic
        taken = _claimed_by_others(self.store, r, online)
        if taken and not [d for d in online if d not in taken]:  # never "done": those devices still need it
            if r.data.get("waiting_others") != sorted(taken):
                r.data["waiting_others"] = sorted(taken)
                self._save(r, "canary", f"waiting: {_left_out_note(taken)}; it starts when they end (or cancel "
                                        f"one: `edgeglm fleet rollout cancel ID`)")
            return
        r.data.pop("waiting_others", None)
        online = [d for d in online if d not in taken]
        r.data.update(version=version, already=already, newer=newer)
        if not online:
            self._save(r, "done", f"nothing to do: every online device of {r.target} already runs {version}"
                                  + (" or a newer version" if newer else "") + f" ({_few(already + newer)})")
            return
        n = max(1, math.ceil(len(online) * r.canary_pct / 100.0))
        canaries, rest = online[:n], online[n:]
        versions = {d["device"]: d["model_version"] for d in self.store.devices(r.fleet)}
        baseline = {d: self.store.latency(r.fleet, d, now - max(r.window_s, 60.0), versions.get(d))
                    for d in canaries}  # of the version each canary serves now
        # a canary that serves a model but has reported no latency yet (or fewer requests than the gate decides
        # on) gives nothing to compare with: wait for its telemetry (up to two windows) instead of passing blind
        missing = [d for d in canaries if versions.get(d) and (baseline[d].get("requests") or 0) < r.min_requests]
        if missing and "baseline_wait_since" not in r.data:
            r.data["baseline_wait_since"] = now
            self._save(r, "canary", f"waiting for baseline latency from {missing}"
                                    + (f" ({r.min_requests} requests each)" if r.min_requests > 1 else ""))
        if missing and now - r.data["baseline_wait_since"] < 2 * max(r.window_s, 1.0):
            return
        from fleet.controller import health_current

        health = self.store.health(r.fleet)  # each canary's memory before (agents from before health, old ones: none)
        r.data["health_before"] = {d: _memory(health[(r.fleet, d)]) for d in canaries
                                   if health_current(health.get((r.fleet, d)), now)}
        none = [d for d in missing if not baseline[d].get("requests")]
        few = {d: baseline[d]["requests"] for d in missing if d not in none}
        note = "; ".join(([f"no baseline latency from {none}"] if none else [])
                         + ([f"too few requests before the update to compare latency with ({few}, fewer than "
                             f"{r.min_requests})"] if few else []))
        note = f" ({note})" if note else ""
        if already:
            note += f"; {len(already)} already run {version}, not offered: {_few(already)}"
        if newer:
            note += (f"; {len(newer)} run a version newer than {version}, not offered (their agents refuse a "
                     f"downgrade; `fleet rollback` moves a device back): {_few(newer)}")
        if taken:
            note += f"; {_left_out_note(taken)}"
        # saved before the first offer: a retry offers these canaries, never others
        r.data.update(canaries=canaries, rest=rest, baseline=baseline, offers={}, picked=True, pick_note=note)
        self._keep(r)
        self._offer_canaries(r, now)

    def _offer_canaries(self, r: Rollout, now: float) -> None:
        if not self._offer(r, r.data["canaries"], r.bundle):
            return
        r.data["offered_at"] = now
        r.data.pop("picked", None)
        note = r.data.pop("pick_note", "")
        self._save(r, "canary_wait", f"offered to canaries {_few(r.data['canaries'])}; {len(r.data['rest'])} device(s) "
                                     f"wait{note}")

    def _results(self, r: Rollout, devices: list[str]) -> dict:
        return {d: (self.store.last_result(r.fleet, d, r.data["offers"][d]) or {}).get("result") for d in devices}

    def _drop_removed(self, r: Rollout, key: str) -> list[str]:
        """Take devices removed from the registry (`fleet device remove`) out of r.data[key]; those removed."""
        known = {d["device"] for d in self.store.devices(r.fleet)}
        gone = [d for d in r.data.get(key, []) if d not in known]
        if gone:
            r.data[key] = [d for d in r.data[key] if d in known]
            had = set(r.data.setdefault("removed", []))
            r.data["removed"].extend(d for d in gone if d not in had)
        return gone

    def _canaries_left(self, r: Rollout) -> bool:
        """Whether canaries are left after dropping removed ones; halts the rollout (nothing to roll back) if not."""
        gone = self._drop_removed(r, "canaries")
        if gone and not r.data["canaries"]:
            self._save(r, "halting", f"every canary was removed from the registry ({_few(gone)}): nothing can be "
                                     f"measured; start the rollout again to pick new canaries")
            return False
        if gone:
            self._save(r, r.phase, f"canaries {_few(gone)} were removed from the registry: no longer waited for")
        return True

    def _canary_wait(self, r: Rollout, now: float) -> None:
        if not self._canaries_left(r):
            return
        results = self._results(r, r.data["canaries"])
        failed = {d: res for d, res in results.items() if res not in (None, "committed")}
        silent = [d for d, res in results.items() if res is None]
        waited = now - r.data.get("offered_at", now)
        if failed:
            self._save(r, "halting", f"canary update failed: {failed}")
        elif silent and waited > result_wait_s(r.window_s):  # offline since: it would block the fleet for ever
            self._save(r, "halting", f"canary update failed: no result from {silent} in {waited:.0f} s "
                                     f"(offline, or still downloading); the retained offer stands for them")
        elif all(res == "committed" for res in results.values()):
            r.data["window_start"] = now
            self._save(r, "canary_window", f"canaries committed; measuring for {r.window_s:g} s")

    def _canary_window(self, r: Rollout, now: float) -> None:
        # a canary that went back by itself after committing (its agent kept dying while the new model was on
        # probation) reports the update rolled back: no need to wait for the window's end
        undone = {d: res for d, res in self._results(r, r.data["canaries"]).items() if res not in (None, "committed")}
        if undone:
            reasons = {d: (self.store.last_result(r.fleet, d, r.data["offers"][d]) or {}).get("reason") for d in undone}
            self._save(r, "halting", f"canary update undone after it committed: {undone} ({reasons})")
            return
        if now - r.data["window_start"] < r.window_s or not self._canaries_left(r):
            return
        # a canary that has reported nothing on the new version yet (a report in flight, an agent still
        # loading the model) gets one more window before its silence fails the gate
        # only telemetry tagged with the new version counts: a canary back on the old one (a slot fallback, a
        # manual rollback) must not pass the gate on the old model's numbers
        version = r.data.get("version")
        served = {d: self.store.latency(r.fleet, d, r.data["window_start"], version).get("requests") or 0
                  for d in r.data["canaries"]}
        silent = [d for d, n in served.items() if n < r.min_requests]
        # with the memory gate on, a canary without a health snapshot in the window that gives its free memory (a
        # health interval longer than the window, a snapshot lost at QoS 0) gets the same one more window
        unmeasured = [d for d in r.data["canaries"] if d not in self._memory_now(r)] \
            if r.data.get("min_free_mb") is not None else []
        # a canary whose telemetry of the window did not all reach the controller (docs/fleet.md "Missing
        # telemetry"): what was lost may be what would fail the gate; one more window, then judged on what is missing
        losses = self.store.telemetry_losses(r.fleet, r.data["window_start"])
        gappy = {d: losses[(r.fleet, d)] for d in r.data["canaries"] if (r.fleet, d) in losses}
        if (silent or unmeasured or gappy) and now - r.data["window_start"] < 2 * r.window_s:
            if not r.data.get("window_extended"):
                r.data["window_extended"] = True
                few = {d: served[d] for d in silent if served[d]}
                none = [d for d in silent if not served[d]]
                waiting = ([f"no telemetry yet from {none} on the new version"] if none else []) + \
                    ([f"fewer than {r.min_requests} requests yet on the new version from {few}"] if few else []) + \
                    ([f"no health snapshot with free memory yet from {unmeasured}"] if unmeasured else []) + \
                    ([f"telemetry missing from {_missing(gappy)}"] if gappy else [])
                self._save(r, "canary_window", f"{'; '.join(waiting)}; waiting one more window ({r.window_s:g} s)")
            return
        problems, uncompared, floored, means = [], [], [], []
        span = max(now - r.data["window_start"], 1.0)
        unseen = {d: loss for d, loss in gappy.items()
                  if loss["missing_s"] > MISSING_SHARE_MAX * span or (loss["lost_reports"] and not loss["missing_gaps"])}
        for d, loss in unseen.items():
            problems.append(f"{d}: telemetry missing for {loss['missing_s']:.0f} s of the {span:.0f} s window"
                            + (f", {loss['lost_reports']} report(s) lost from its buffer" if loss["lost_reports"] else
                               "") + ": the gate does not pass what it did not see (the broker or the device lost "
                            "it: docs/fleet.md \"Missing telemetry\")")
        for d in r.data["canaries"]:
            base, new = r.data["baseline"].get(d, {}), self.store.latency(r.fleet, d, r.data["window_start"], version)
            base, new, mixed = _like_for_like(base, new)
            base_rate, new_rate = _error_rate(base), _error_rate(new)
            # rates, not counts (busier traffic after the update is not a regression), by more than a point
            if new.get("errors", 0) and new_rate > base_rate + ERROR_RATE_FLOOR:
                problems.append(f"{d}: errors {100 * base_rate:.1f}% -> {100 * new_rate:.1f}% of requests "
                                f"({base.get('errors', 0)} -> {new['errors']})")
            if 0 < (new.get("requests") or 0) < r.min_requests:  # two windows and still too few to judge
                problems.append(f"{d}: {new['requests']} request(s) on the new version in "
                                f"{now - r.data['window_start']:.0f} s, fewer than the {r.min_requests} the gate "
                                f"decides on: send it traffic, give a longer --window or a lower --min-requests")
            elif base.get("token_p95_ms") and new.get("token_p95_ms") and (base.get("requests") or 0) < r.min_requests:
                uncompared.append(f"{d} (only {base.get('requests') or 0} request(s) before the update)")
            elif base.get("token_p95_ms") and new.get("token_p95_ms"):
                change = 100.0 * (new["token_p95_ms"] / base["token_p95_ms"] - 1.0)
                r.data.setdefault("p95_change_pct", {})[d] = round(change, 1)
                if mixed:  # one side had no histograms: both compared as means of window p95s
                    means.append(d)
                # both relative and absolute: sub-millisecond jitter of a tiny model is not a regression
                delta = new["token_p95_ms"] - base["token_p95_ms"]
                if change > r.max_regression_pct and delta > r.min_delta_ms:
                    problems.append(f"{d}: p95 per-token latency {base['token_p95_ms']:.2f} -> "
                                    f"{new['token_p95_ms']:.2f} ms (+{change:.0f}% > {r.max_regression_pct:g}%)")
                elif change > r.max_regression_pct:  # said, or "+313%" reads as a pass by mistake
                    floored.append(f"{d} {delta:+.2f} ms")
            elif new.get("requests"):  # served, but nothing to compare its latency with: said, not passed silently
                side = "before the update" if not base.get("token_p95_ms") else "on the new version"
                uncompared.append(f"{d} (no per-token p95 {side})")
            else:
                reports = self.store._exec("SELECT COUNT(*) FROM telemetry WHERE fleet=? AND device=? AND "
                                           "model_version=? AND stored>=?",
                                           (r.fleet, d, version, r.data["window_start"])).fetchone()[0]
                problems.append(f"{d}: no telemetry on the new version in the window" if not reports else
                                f"{d}: no requests served on the new version in the window ({reports} telemetry "
                                f"report(s), all idle): an idle canary gives nothing to compare; send it traffic "
                                f"or give a longer --window")
        memory_problems, memory_note = self._memory_gate(r)
        if means:  # an agent without latency histograms: a mean of window p95s can hide a regression on long answers
            memory_note = (f"; p95 of {', '.join(means)} compared as request-weighted means of window p95s on both "
                           f"sides (a window without latency histograms: an agent without them, one lost, or older "
                           f"than a day)") + memory_note
        if problems or memory_problems:
            self._save(r, "halting", "; ".join((["latency gate failed: " + "; ".join(problems)] if problems else [])
                                               + (["memory gate failed: " + "; ".join(memory_problems)]
                                                  if memory_problems else [])) + memory_note)
        else:
            note = (f"; under --min-delta-ms {r.min_delta_ms:g}: {', '.join(floored)}" if floored else "") + (
                f"; latency not compared for {', '.join(uncompared)}" if uncompared else "") + (
                f"; telemetry missing from {_missing(gappy)} (at most {100 * MISSING_SHARE_MAX:g}% of the window)"
                if gappy else "")
            self._save(r, "rest", f"latency gate passed ({r.data.get('p95_change_pct', {})}){note}{memory_note}")

    def _memory_now(self, r: Rollout) -> dict[str, dict]:
        """The canaries' health snapshots received since the window started (the model loaded and serving) that
        give their free memory, by device."""
        health = self.store.health(r.fleet)
        return {d: h for d in r.data["canaries"] if (h := health.get((r.fleet, d))) is not None
                and h["received"] >= r.data["window_start"] and h.get("memory_available_bytes") is not None}

    def _memory_gate(self, r: Rollout) -> tuple[list[str], str]:
        """Each canary's memory on the new version (its latest health snapshot, received after the window
        started) against before the offer: what the report says, and the problems when `min_free_mb` is set: a
        canary that can still take less than that, or that sent no snapshot with its free memory in two windows
        (the gate was asked for: it does not pass blind). Without `min_free_mb`, a canary with no snapshot since
        (an agent from before health, or with it off) is neither shown nor judged."""
        health, floor, now_ = self.store.health(r.fleet), r.data.get("min_free_mb"), self._memory_now(r)
        problems, changes = [], []
        for d in r.data["canaries"]:
            h = health.get((r.fleet, d))
            if h is None or h["received"] < r.data["window_start"]:
                if floor is not None:
                    problems.append(f"{d}: no health snapshot in the window to judge its memory by (its "
                                    f"telemetry.health_interval_s may be longer than --window {r.window_s:g} s, or "
                                    "its agent is from before health)")
                continue
            if floor is not None and d not in now_:
                problems.append(f"{d}: its health snapshot gives no free memory (no /proc?) to judge it by")
            after, before = _memory(h), r.data.get("health_before", {}).get(d, {})
            r.data.setdefault("memory", {})[d] = {"before": before, "after": after}
            free, was = after.get("memory_available_bytes"), before.get("memory_available_bytes")
            changes.append(f"{d} rss {_mib(before.get('rss_bytes'))} -> {_mib(after.get('rss_bytes'))}, "
                           f"free {_mib(was)} -> {_mib(free)}" if before else
                           f"{d} rss {_mib(after.get('rss_bytes'))}, free {_mib(free)} (no snapshot before)")
            if floor is not None and free is not None and free < floor * 2**20:
                problems.append(f"{d}: can still take {_mib(free)} of memory on the new version (was {_mib(was)}), "
                                f"below --min-free-memory-mb {floor:g}")
        return problems, (f"; memory: {'; '.join(changes)}" if changes else "")

    def _rest(self, r: Rollout, now: float) -> None:
        devices = self.store.devices(r.fleet)
        online = {d["device"] for d in devices if d["online"]}
        if not r.data.get("rest_picked"):
            # every device of the target not on the version yet, online or not (one offline when the canaries were
            # picked gets the retained offer when it connects), less the canaries; a group's members as they are
            # now: a device moved out of the group since (to another group, another rollout) is not offered it
            members, version = self._members(r), r.data.get("version")
            known = {d["device"]: d["model_version"] for d in devices}
            in_target = {d for d in known if members is None or d in members}
            # devices removed from the registry since the canaries were picked are not offered it either
            left = sorted(d for d in r.data["rest"] if d in known and d not in in_target)
            rest = sorted({*(d for d in r.data["rest"] if d in in_target), *in_target}
                          - set(r.data["canaries"]) - {d for d, v in known.items() if version and v == version})
            newer = [d for d in rest if _newer(known.get(d), version)]  # their agents refuse it (see _canary)
            rest = [d for d in rest if d not in newer]
            note = f"; {_few(left)} left {r.group} since the canaries were picked: not offered" if left else ""
            if newer:
                note += f"; {len(newer)} run a version newer than {version}, not offered: {_few(newer)}"
            # a member the registry has never heard from (added to the group before its agent ever connected):
            # its version is unknown, so it is not offered; named, not dropped without a word
            unseen = sorted(members - set(known)) if members is not None else []
            if unseen:
                note += (f"; {len(unseen)} member(s) of group {r.group} never seen by this controller, not offered: "
                         f"{_few(unseen)} (offer them with `fleet offer` once their agents have connected)")
            taken = _claimed_by_others(self.store, r, [d for d in rest if d not in r.data.get("offers", {})])
            if taken:  # in another active rollout's target too (a `group add --force`, or one from before the check)
                rest = [d for d in rest if d not in taken]
                note += f"; {_left_out_note(taken)}"
            r.data.update(rest=rest, rest_picked=True, rest_note=note)  # saved before the first offer
            self._keep(r)
        rest = r.data["rest"]
        if not self._offer(r, rest, r.bundle):
            return
        r.data["rest_offered_at"] = now
        r.data.pop("rest_picked", None)
        offline = [d for d in rest if d not in online]
        note = f" ({len(offline)} offline, offered when they connect: {_few(offline)})" if offline else ""
        self._save(r, "rest_wait", f"offered to the rest {_few(rest)}{note}{r.data.pop('rest_note', '')}")

    def _rest_wait(self, r: Rollout, now: float) -> None:
        gone = self._drop_removed(r, "rest")
        if gone:
            self._save(r, "rest_wait", f"{_few(gone)} were removed from the registry: no longer waited for")
        results = self._results(r, r.data["rest"])
        pending = [d for d, res in results.items() if res is None]
        waited = now - r.data.get("rest_offered_at", now)
        if not pending or waited > result_wait_s(r.window_s):
            ok = sum(res == "committed" for res in results.values())
            note = f"; no result from {_few(pending)} in {waited:.0f} s: the retained offer stands for them" \
                if pending else ""
            answered = {d: res for d, res in results.items() if res is not None}
            if len(answered) > REPORT_LIST_MAX:  # the count of each result, and the devices that did not commit
                failed = {d: res for d, res in answered.items() if res != "committed"}
                counts = {res: list(answered.values()).count(res) for res in sorted(set(answered.values()))}
                shown = f"{counts}" + (f"; not committed: {_few(sorted(failed))}" if failed else "")
            else:
                shown = f"{answered}"
            self._save(r, "done", f"rollout finished: {ok}/{len(results)} of the rest committed; {shown}"
                                  f"{self._why_not(r, answered)}{note}"
                       if results else "rollout finished: no device besides the canaries needed it")

    def _why_not(self, r: Rollout, answered: dict) -> str:
        """The reasons the devices that did not commit reported, the same ones once with their count: a rollout whose
        every device failed read "finished" with no word of why (a bundle changed on the controller, say)."""
        reasons: dict[str, int] = {}
        for d, res in answered.items():
            if res == "committed":
                continue
            update = r.data["offers"][d]
            reason = (self.store.last_result(r.fleet, d, update) or {}).get("reason")
            if isinstance(reason, str) and reason:
                key = re.sub(r"\bchunk \d+", "chunk N", reason.replace(update, "U"))[:240]
                reasons[key] = reasons.get(key, 0) + 1
        if not reasons:
            return ""
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        return "; why not: " + "; ".join(f"{n} x {why}" for why, n in top) + \
            (f"; and {len(reasons) - 3} other reason(s)" if len(reasons) > 3 else "")

    def _halting(self, r: Rollout, now: float) -> None:
        self._drop_removed(r, "canaries")  # a removed device is offered no rollback (its retained offer was cleared)
        offers = r.data.get("offers", {})
        pending = [d for d in r.data.get("canaries", []) if d in offers
                   and not (self.store.last_result(r.fleet, d, offers[d]) or {}).get("result")]
        if r.previous_bundle and r.key and pending and now - r.data.get("offered_at", now) <= result_wait_s(r.window_s):
            # a canary still updating would commit the new version after a rollback signed for the old one,
            # and refuse it: roll back once it has a result (or the result wait is over)
            if not r.data.get("halting_waits"):
                r.data["halting_waits"] = True
                self._save(r, "halting", f"waiting for the update of {pending} to end before rolling back")
            return
        if not r.data.get("canaries"):
            self._save(r, "halted", "halted; no canary left in the registry to roll back")
        elif r.previous_bundle and r.key:
            # the version each canary serves now: the rollout's for one that committed it, else the reported one
            reported = {d["device"]: d["model_version"] for d in self.store.devices(r.fleet)}
            serving, undone = {}, {}
            for d in r.data.get("canaries", []):
                update_id = r.data.get("offers", {}).get(d)
                row = self.store._exec("SELECT version FROM offers WHERE update_id=?", (update_id,)).fetchone() \
                    if update_id else None
                result = (self.store.last_result(r.fleet, d, update_id) or {}).get("result") if update_id else None
                if result not in (None, "committed"):
                    # its update failed (nothing switched) or went back by itself after committing (probation):
                    # it serves the model it served before the rollout. A rollback offer would make it download
                    # and switch to that model again (the slot it went back from was cleared) and hide its result
                    undone[d] = result
                    continue
                serving[d] = row[0] if row and result == "committed" else reported.get(d)
            if serving:  # (nothing to sign for none: an unreadable key kept such a rollout in halting for good)
                offer_rollback(self.controller, r.fleet, serving, r.previous_bundle, r.key)
            left = f"; {', '.join(f'{d} ({res})' for d, res in undone.items())} already serve(s) the model from " \
                   f"before the rollout: not offered one" if undone else ""
            self._save(r, "halted", f"halted; canaries {sorted(serving)} offered a signed rollback to "
                                    f"{r.previous_bundle.name}{left}" if serving else
                       f"halted; no canary runs {r.data.get('version') or 'the new version'}: no rollback "
                       f"offered{left}")
        else:
            self._save(r, "halted", "halted; no --previous-bundle/--key given, canaries keep the new version")
