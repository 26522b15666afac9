"""Device groups, and which version `edgeglm fleet rollback` goes back to.

A group is a set of devices the operator names in the controller:

    edgeglm fleet group add line-3 --fleet plant7 dev-1 dev-2     # stored in the `groups` table
    edgeglm fleet rollout --group line-3 ...                      # rollout, rollback, config set

`--group G` selects the devices assigned to G; when no group G is assigned, G is a fleet id and
selects every known device of that fleet (what `--group` meant before groups existed, so scripts
that pass a fleet id keep working). A group name may not be a fleet id, so the two never clash.
Membership lives in the controller, not on the devices: it needs no agent change or config push,
covers devices that are offline, and one `group add` moves a device between rings.

Rollback targets come from the bundles the controller knows: those it has offered (the offers
table), those its rollouts named, and those in the `bundles.dir` of fleet.toml. "The previous
version" of a group is the newest known version older than the newest version its devices run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError
from agent.topics import ID_PATTERN
from fleet.store import Store
from ota.bundle import VERSION_RE
from ota.errors import VersionError
from ota.versions import parse_version


class GroupError(AgentError):
    """A group or rollback target cannot be resolved."""


@dataclass(frozen=True)
class Selection:
    """The devices `--group name` selects, as (fleet, device) pairs."""

    name: str
    assigned: bool  # False: `name` is a fleet id
    members: list[tuple[str, str]]

    @property
    def fleets(self) -> list[str]:
        return sorted({f for f, _ in self.members})

    def describe(self) -> str:
        return f"group {self.name}" if self.assigned else f"fleet {self.name}"


def select(store: Store, name: str) -> Selection:
    """The devices of group `name`, or of fleet `name` when no such group is assigned."""
    groups = store.groups()
    if name in groups:
        return Selection(name, True, groups[name])
    fleet_devices = [(d["fleet"], d["device"]) for d in store.devices(name)]
    if fleet_devices:
        return Selection(name, False, fleet_devices)
    raise GroupError(f"--group {name!r}: no such group or fleet (groups: {', '.join(groups) or 'none'}; fleets: "
                     f"{', '.join(store.fleets()) or 'none'}); `edgeglm fleet group add {name} --fleet F DEVICE...` "
                     f"makes one")


def one_fleet(selection: Selection) -> str:
    """The fleet of a selection that a rollout can go to (a rollout is per fleet)."""
    if len(selection.fleets) != 1:
        raise GroupError(f"{selection.describe()} spans fleets {', '.join(selection.fleets)}; a rollout goes to "
                         f"one fleet: make one group per fleet")
    return selection.fleets[0]


def check_group_name(store: Store, name: str) -> str:
    if not re.fullmatch(ID_PATTERN, name) or len(name) > 128:
        raise GroupError(f"group name {name!r}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    if name in store.fleets():
        raise GroupError(f"group name {name!r} is a fleet id: --group {name} already selects that whole fleet; "
                         f"pick another name")
    return name


def _manifest_version(bundle: Path) -> str | None:
    try:
        version = json.loads((Path(bundle) / "manifest.json").read_text())["version"]
        parse_version(version)
        return version
    except (OSError, ValueError, KeyError, TypeError, VersionError):
        return None  # gone or not a bundle: not a candidate


def known_bundles(store: Store, bundles_dir: Path | None = None) -> dict[str, Path]:
    """version -> a bundle directory with that version, from every source the controller knows."""
    from fleet.rollout import load_rollouts

    candidates = [Path(b) for b in store.offers().values()]
    for r in load_rollouts(store):
        candidates += [r.bundle] + ([r.previous_bundle] if r.previous_bundle else [])
    if bundles_dir is not None and Path(bundles_dir).is_dir():
        # hidden directories are staging of an unfinished export or copy (.NAME.partial-...), not bundles
        candidates += sorted(p for p in Path(bundles_dir).iterdir()
                             if not p.name.startswith(".") and (p / "manifest.json").is_file())
    known: dict[str, Path] = {}
    for bundle in candidates:
        version = _manifest_version(bundle)
        if version is not None:
            known[version] = bundle  # later sources win: a bundles.dir copy over an old offer's path
    return known


def rollback_target(running: set[str], known: dict[str, Path], to: str | None = None,
                    served: set[str] | None = None) -> tuple[str, Path]:
    """(version, bundle) to roll back to: `to`, or the newest known version older than the newest running; with
    `served` (versions some device served, `Store.served_versions`), the newest of those older ones
    where there is one: a version whose every update failed (a bundle signed by a key the devices do not trust)
    was picked, and refused by every device."""
    listing = ", ".join(sorted(known, key=parse_version)) or "none"
    versions = [v for v in running if v is not None and _parses(v)]
    newest = max(versions, key=parse_version) if versions else None
    if to is not None:
        if not VERSION_RE.fullmatch(to):
            raise GroupError(f"--to {to!r} is not a version like 1.2.3 (numbers without leading zeros); known: "
                             f"{listing}; nothing was offered")
        if to not in known:
            raise GroupError(f"--to {to}: no bundle of that version is known (known: {listing}); offer it once or "
                             f"put it in bundles.dir of fleet.toml")
        if newest is not None and parse_version(to) > parse_version(newest):
            # a signed rollback is accepted as a downgrade: offered "back" to a newer version it would upgrade
            raise GroupError(f"--to {to} is newer than {newest}, the newest version the selected devices run: "
                             f"a rollback only goes back; nothing was offered (a newer version goes out with "
                             f"`edgeglm fleet rollout` or `fleet offer`)")
        return to, known[to]
    if newest is None:
        raise GroupError("the selected devices report no model version; give --to VERSION")
    older = [v for v in known if parse_version(v) < parse_version(newest)]
    if not older:
        raise GroupError(f"no version earlier than {newest} is known (known: {listing}); nothing to roll back to; "
                         f"give --to VERSION with a bundle in bundles.dir")
    proven = [v for v in older if served is not None and v in served]
    best = max(proven or older, key=parse_version)
    return best, known[best]


def _parses(v: str) -> bool:
    try:
        parse_version(v)
        return True
    except VersionError:
        return False
