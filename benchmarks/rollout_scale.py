"""How long a rollout's offers take the fleet controller at 1,000 and 10,000 devices, against saving the rollout
after every offer (what the controller did before: quadratic, since the rollout's data holds every offer).

    python benchmarks/rollout_scale.py                    # 1,000 and 10,000 devices
    python benchmarks/rollout_scale.py --devices 2000 --repeats 3

For each N, a fresh SQLite fleet database (in a temporary directory) gets N registered devices and one rollout
of a bundle to all of them; the rollout driver (fleet.rollout.RolloutDriver._offer, what the canary and rest
steps call) then offers the bundle to every device through a controller whose offer() records the offer as
FleetController.offer does, less the bundle check and the MQTT publish (the broker's share is measured by
benchmarks/fleet_scale.py). Two ways, side by side in one run:

  batched      the rollout's data takes its offers in once a second (the offers go to a table one row each)
  per-offer    the rollout's data written after every offer (KEEP_EVERY_S = 0: the data, which lists every
               offer made so far, grows with each one)

Per N and way it prints the wall time of the offers, the microseconds per offer, the bytes the process wrote
to disk (/proc/self/io write_bytes, SQLite's WAL included) and the longest hold of the store's lock (what the
MQTT thread waits for: a state or an OTA status from a device); then the per-offer / batched ratio and each
way's 10,000 / 1,000 time ratio (10 means linear). Numbers go to docs/scaling.md.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _args import Parser, int_list, positive_int  # noqa: E402

FLEET = "plant"


class _TimedLock:
    """The store's RLock, recording the longest outermost hold."""

    def __init__(self):
        self._lock, self._local = threading.RLock(), threading.local()
        self.longest, self._t0 = 0.0, 0.0

    def acquire(self, blocking=True, timeout=-1):
        got = self._lock.acquire(blocking, timeout)
        depth = getattr(self._local, "depth", 0)
        if got and depth == 0:
            self._t0 = time.perf_counter()
        self._local.depth = depth + 1
        return got

    def release(self):
        self._local.depth -= 1
        if self._local.depth == 0:
            self.longest = max(self.longest, time.perf_counter() - self._t0)
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class _RecordingController:
    """FleetController.offer as far as the store goes: the offer and its target recorded, no publish."""

    def __init__(self, store, bundle: Path):
        self.store, self.bundle, self.n = store, bundle, 0

    def offer(self, fleet, device, bundle, **_):
        self.n += 1
        update_id = f"model-2.0.0-{self.n:08d}"
        self.store.add_offer(update_id, self.bundle, "2.0.0", fleet, device)
        return update_id


def _written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def _state(device: str) -> dict:
    return {"device": device, "online": True, "agent_version": "0.1.0", "execution_path": "onnxruntime:cpu",
            "model": {"name": "m", "version": "1.0.0", "sha256": "0" * 64}, "active_slot": "a",
            "applied_config_version": None, "last_config_error": None, "uptime_s": 1.0, "ts": time.time()}


def measure(n: int, per_offer: bool, work: Path) -> dict:
    import fleet.rollout as rollout
    from fleet.store import Store

    db = work / f"fleet-{n}-{'per-offer' if per_offer else 'batched'}.db"
    bundle = work / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps({"version": "2.0.0"}))
    store = Store(db)
    devices = [f"dev-{i:06d}" for i in range(n)]
    for d in devices:
        store.upsert_state(FLEET, _state(d))
    rid = rollout.create_rollout(store, bundle, FLEET, 100.0, window_s=60.0)
    lock = _TimedLock()
    store._lock = lock
    driver = rollout.RolloutDriver(store, _RecordingController(store, bundle))
    r = next(x for x in rollout.load_rollouts(store) if x.id == rid)
    keep_every = rollout.KEEP_EVERY_S
    rollout.KEEP_EVERY_S = 0.0 if per_offer else keep_every
    try:
        written, t0 = _written(), time.perf_counter()
        assert driver._offer(r, devices, bundle)
        seconds = time.perf_counter() - t0
        written = _written() - written
    finally:
        rollout.KEEP_EVERY_S = keep_every
    offered = next(x for x in rollout.load_rollouts(store) if x.id == rid).data["offers"]
    assert len(offered) == n, f"{len(offered)} of {n} offers recorded"
    store.close()
    return {"s": seconds, "us_per_offer": 1e6 * seconds / n, "mb_written": written / 2**20,
            "lock_ms": 1000 * lock.longest}


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0], formatter_class=lambda prog: __import__(
        "argparse").RawDescriptionHelpFormatter(prog, width=100))
    ap.add_argument("--devices", type=int_list, default=[1000, 10000], help="device counts (default 1000,10000)")
    ap.add_argument("--repeats", type=positive_int, default=1, help="runs per count and way; the median is shown")
    args = ap.parse_args()
    import platform

    print(f"# {platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}; "
          f"median of {args.repeats} run(s) each")
    print(f"{'devices':>8} {'way':>10} {'seconds':>9} {'us/offer':>9} {'MB written':>11} {'longest lock':>13}")
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgeglm-rollout-scale-") as tmp:
        for n in args.devices:
            for way in ("batched", "per-offer"):
                runs = []
                for k in range(args.repeats):
                    work = Path(tmp) / f"{n}-{way}-{k}"
                    work.mkdir()
                    runs.append(measure(n, way == "per-offer", work))
                got = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                results[(n, way)] = got
                print(f"{n:>8} {way:>10} {got['s']:>9.2f} {got['us_per_offer']:>9.0f} {got['mb_written']:>11.1f} "
                      f"{got['lock_ms']:>10.1f} ms", flush=True)
            ratio = results[(n, "per-offer")]["s"] / results[(n, "batched")]["s"]
            print(f"{n:>8} per-offer / batched time: {ratio:.1f}x")
    small, large = min(args.devices), max(args.devices)
    if small != large:
        for way in ("batched", "per-offer"):
            print(f"{way}: {large} / {small} devices time ratio {results[(large, way)]['s'] / results[(small, way)]['s']:.1f}x "
                  f"(linear: {large / small:.0f}x)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
