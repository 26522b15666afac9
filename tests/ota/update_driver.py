"""Runs the real OTA updater the way the agent wires it, in this process or as a subprocess.

    python tests/ota/update_driver.py WORKDIR [--kill-at STATE] [--fail-at STATE] [--activate-fails VERSION]

WORKDIR holds `keys/` (trusted *.pub), optionally `rollback-keys/` (*.pub trusted for rollbacks only),
`offer.json` (submitted when the updater is idle and `submit` exists), and receives `state/` (slots and update.json), `reports.jsonl` (every status
report) and `serving.json` (what the "agent" serves after each activation).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import __version__  # noqa: E402
from agent.model import load_model  # noqa: E402
from agent.selftest import SelfTestConfig, run_self_test  # noqa: E402
from ota.bundle import open_bundle  # noqa: E402
from ota.offers import DirectoryFetcher  # noqa: E402
from ota.signing import load_trusted_keys  # noqa: E402
from ota.update import Offer, State, UpdateFailed, Updater, UpdaterDeps  # noqa: E402
from runtime.engine import architecture_problem  # noqa: E402


FLEET, DEVICE = "plant7", "box-1"  # the identity the driven device has


def build_updater(work: Path, activate_fails: str | None = None, max_latency_ratio: float = 100.0,
                  clock=None, probation: bool = False) -> Updater:
    """The updater as the agent builds it at start; with `probation`, the start checks the probation of the
    model committed last first, as the agent does before loading the active slot (its result is reported)."""
    serving: dict = {"model": None}

    def report(status: dict) -> None:
        with open(work / "reports.jsonl", "a") as f:
            f.write(json.dumps(status) + "\n")

    def activate(path: Path | None) -> None:
        if path is None:
            serving["model"] = None
            (work / "serving.json").write_text(json.dumps({"version": None}))
            return
        model = load_model(path)
        if activate_fails and model.bundle.manifest.version == activate_fails:
            raise RuntimeError(f"model {activate_fails} crashed on activation")
        serving["model"] = model
        (work / "serving.json").write_text(json.dumps({"version": model.bundle.manifest.version,
                                                       "slot": path.name}))

    def active_version():
        path = updater.slots.active_path()
        return open_bundle(path, verify=False).manifest.version if path else None

    def active_manifest_sha256():
        return serving["model"].bundle.sha256 if serving["model"] else None

    deps = UpdaterDeps(
        trusted_keys=load_trusted_keys([work / "keys"]), fetcher=DirectoryFetcher(),
        self_test=lambda slot, manifest: run_self_test(slot, manifest, SelfTestConfig(
            max_latency_ratio=max_latency_ratio, steps=4), serving["model"]),
        activate=activate, report=report, agent_version=__version__,
        supported_backends=("onnxruntime", "openvino"), active_version=active_version,
        active_manifest_sha256=active_manifest_sha256, serving=lambda: serving["model"] is not None,
        architecture_problem=architecture_problem, fleet=FLEET, device=DEVICE,
        rollback_keys=load_trusted_keys([work / "rollback-keys"]) if (work / "rollback-keys").is_dir() else None)
    if clock is not None:
        deps.clock = clock
    updater = Updater(work / "state", deps)
    if probation:
        result = updater.check_probation()
        if result is not None:
            report(result)
    # the agent serves its active slot at start, except in COMMITTING and ROLLBACK, which load a model themselves
    if updater.slots.active_path() and updater.state not in (State.COMMITTING, State.ROLLBACK):
        activate(updater.slots.active_path())
    return updater


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--kill-at")
    p.add_argument("--fail-at")
    p.add_argument("--activate-fails")
    args = p.parse_args()
    updater = build_updater(args.work, args.activate_fails)

    def on_enter(state: State) -> None:
        if state.value == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a power cut: no cleanup, no last words
        if state.value == args.fail_at:
            raise UpdateFailed(f"injected failure in {state.value}")

    updater.on_enter = on_enter
    offer_path = args.work / "offer.json"
    if updater.state is State.IDLE and offer_path.exists():
        updater.submit(Offer.model_validate_json(offer_path.read_text()))
        offer_path.unlink()
    updater.run()


if __name__ == "__main__":
    main()
