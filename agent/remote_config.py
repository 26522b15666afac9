"""What a desired config (pushed by the fleet over MQTT, retained) may change on an agent.

One allowlist for both ends: the agent (agent/daemon.py `Agent._apply_desired`) refuses a
desired config that changes anything else, and `edgeglm fleet config set` (fleet/config.py)
refuses to publish one that names anything else. Pure Python on pydantic models: importing it
loads no model runtime (no torch, onnxruntime or openvino), so the controller can use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotations: agent.config itself is imported by the callers
    from agent.config import AgentConfig

# What the desired config may change: a setting or a whole section named here. Everything else is
# local-only (the agent's config file, environment, command line): the device identity, how the box is
# reached (mqtt, http), what it serves and where it writes (model, cache.persist_dir) and what it trusts
# (ota.trusted_keys, ota.require_signature). An allowlist, so that a setting added later is local-only
# until it is listed here on purpose.
REMOTE_SETTINGS = ("sampling", "batching", "telemetry", "log_level", "cache.max_mb", "cache.block_tokens",
                   "cache.persist", "ota.max_latency_ratio", "ota.min_latency_delta_ms", "ota.chunk_timeout_s",
                   "ota.give_up_s")
# remote settings the fleet may lower but not raise above the value in the box's own config
# settings the desired config may lower but not raise above the box's own value: the memory budget, and
# whether prompts' KV (their token ids) may be written to disk (a box that keeps it off stays off)
LOCAL_CEILINGS = ("cache.max_mb", "cache.persist", "batching.max_kv_mb")
# the least the desired config may set, where the box's own config may go lower (a test rig reporting every
# 0.3 s): one fleet-wide typo (0.001) would have every box publish a thousand reports a second
# 0.001 is likewise a chunk asked for again a thousand times a second, or an update that fails at once
REMOTE_FLOORS = {"telemetry.interval_s": 1.0, "telemetry.health_interval_s": 1.0,  # (0, "off", stays allowed)
                 "ota.chunk_timeout_s": 1.0, "ota.give_up_s": 10.0}


def is_remote(key: str) -> bool:
    """Whether the dotted setting `key` (e.g. "sampling.top_k") may be set by a desired config."""
    return any(key == r or key.startswith(r + ".") for r in REMOTE_SETTINGS)


def named_keys(settings: dict, prefix: str = "") -> list[str]:
    """The dotted names of the leaves of a (nested) desired-config update, e.g.
    {"sampling": {"top_k": 5}} -> ["sampling.top_k"]; an empty section counts as its own name."""
    keys: list[str] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys += named_keys(value, name + ".")
        else:
            keys.append(name)
    return keys


def local_only_keys(settings: dict) -> list[str]:
    """The settings of a desired-config update that no agent accepts from the fleet."""
    return [k for k in named_keys(settings) if not is_remote(k)]


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted names of the settings whose values differ between two `model_dump()`s."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(old.keys() | new.keys())
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def remote_config_problems(local: AgentConfig, current: AgentConfig, new: AgentConfig) -> list[str]:
    """Why `new` (the running `current` config with a desired-config update applied) may not be applied;
    `local` is the config the agent started with (file, environment, command line)."""
    problems = []
    for key in _changed_keys(current.model_dump(), new.model_dump()):
        if not is_remote(key):
            problems.append(f"{key} is local-only and cannot be changed by the desired config; set it in the "
                            "agent's config file")
    for key in LOCAL_CEILINGS:
        section, field = key.split(".")
        value, ceiling = getattr(getattr(new, section), field), getattr(getattr(local, section), field)
        if ceiling == "auto" or value == ceiling:  # "auto" is a default, not a limit the box's owner set
            continue
        if value == "auto":
            problems.append(f"{key} = \"auto\", but this box's own config sets {ceiling!r}: the desired config may "
                            "lower it, not raise it")
        elif value > ceiling:
            if isinstance(value, bool):
                problems.append(f"{key} = true, but this box's own config sets it false: the desired config may "
                                "turn it off, not on")
            else:
                problems.append(f"{key} = {value!r} is above this box's own limit {ceiling!r} (set in the agent's "
                                "config): the desired config may lower it, not raise it")
    return problems + floor_problems(current, new)


def floor_problems(current: AgentConfig, new: AgentConfig) -> list[str]:
    """The settings of `new` below REMOTE_FLOORS (a value the box already has is no problem)."""
    problems = []
    for key, floor in REMOTE_FLOORS.items():
        section, field = key.split(".")
        value = getattr(getattr(new, section), field)
        if 0 < value < floor and value != getattr(getattr(current, section), field):
            why = "fails every update" if key == "ota.give_up_s" else "floods the broker"
            problems.append(f"{key} = {value!r} is below {floor!r}, the least a desired config may set (a "
                            f"fleet-wide value this low {why}); a box's own config may set less")
    return problems
