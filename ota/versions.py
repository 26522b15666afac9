"""Bundle versions and downgrade protection.

Versions look like `1.2.3` or `1.2.3-rc.1` (fewer parts are padded with zeros). As in semantic
versioning, a pre-release sorts before its release. An offer must be strictly newer than the
active model unless it is an explicit rollback, and a rollback offer must itself be signed.
"""

from __future__ import annotations

from ota.bundle import VERSION_RE
from ota.errors import VersionError


def parse_version(v: str) -> tuple:
    if not VERSION_RE.fullmatch(v or ""):
        raise VersionError(f"version {v!r} is not like 1.2.3 (numbers without leading zeros)")
    core, _, pre = v.split("+", 1)[0].partition("-")  # build metadata (+...) first: it may hold a hyphen
    nums = tuple(int(x) for x in core.split(".")) + (0,) * (3 - core.count(".") - 1)
    # a release (no pre-release part) sorts after any of its pre-releases
    pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split(".")) if pre else ((2, ""),)
    return nums, pre_key


def check_upgrade(active: str | None, offered: str, rollback: bool = False) -> None:
    """Raise VersionError unless `offered` may replace `active`."""
    if active is None or rollback:
        parse_version(offered)
        return
    if parse_version(offered) <= parse_version(active):
        raise VersionError(
            f"offered version {offered} is not newer than the active {active}; refused as a downgrade "
            "(send a signed rollback offer to go back on purpose)")
