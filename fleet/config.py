"""The fleet controller's typed configuration (`edgeglm fleet serve --config fleet.toml`).

Priority, lowest first: defaults < TOML file < environment variables `EDGEGLM_...` (nested
with `__`, e.g. `EDGEGLM_MQTT__PASSWORD`) < command-line flags. The MQTT password may instead be
in a file, `[mqtt] password_file` (a mounted Secret on K3s), read by `mqtt_password` when a command
starts.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.config import AgentConfig, _PrefixEnv, _plain
from agent.errors import ConfigError
from agent.mqtt import BrokerHost

_toml_file: ContextVar[Path | None] = ContextVar("edgeglm_fleet_toml", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetSection(_Section):
    id: str = Field("+", description="the fleet served; '+' serves every fleet on the broker")
    silent_after_s: float = Field(
        900.0, gt=0, le=30 * 86400,
        description="a device whose last state said online but that sent nothing (state, telemetry, health) for "
                    "this long counts as offline in status, /metrics and rollouts (a box that died while the broker "
                    "was away leaves no Will); keep it above a few of the agents' telemetry.interval_s")


class HttpSection(_Section):
    host: str = "127.0.0.1"  # /healthz and /metrics; 0.0.0.0 in a pod, for the kubelet and Prometheus
    port: int = Field(9100, ge=0, le=65535)
    metrics_token_file: Path | None = Field(
        None, description="a file holding a bearer token that GET /metrics must send ('Authorization: Bearer "
                          "TOKEN'); unset: /metrics is open to whoever reaches the port. /healthz stays open")


class DatabaseSection(_Section):
    path: Path = Path("fleet.db")
    retention_s: float = Field(7 * 86400, gt=0)


class BundlesSection(_Section):
    dir: Path = Path("bundles")


class RollbackSection(_Section):
    key: Path | None = Field(
        None, description="private key that signs rollback offers (`edgeglm fleet rollback`, the canaries' "
                          "rollback when a rollout with --previous-bundle halts) where --key is not given: best a "
                          "rollback key, whose public half the agents have in ota.rollback_keys")


class TlsSection(_Section):
    ca_file: str | None = None


class MqttSection(_Section):
    host: BrokerHost = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(
        None, description="a file holding the MQTT password (a trailing newline is stripped), read when a command "
                          "starts (mqtt_password); instead of password / EDGEGLM_MQTT__PASSWORD, never with it")
    client_id: str = "edgeglm-controller"
    protocol: Literal["5", "3.1.1"] = "5"
    tls: TlsSection | None = None
    telemetry_qos: int = Field(  # (an int, not Literal[0, 1]: EDGEGLM_MQTT__TELEMETRY_QOS=0 gives the string "0")
        1, ge=0, le=1, description="QoS of `fleet serve`'s telemetry subscription: 1 has the broker queue what devices send "
                       "while the controller is away (with session_expiry_s); 0 loses it")
    session_expiry_s: int = Field(
        3600, ge=0, le=4294967295, description="how long the broker keeps `fleet serve`'s session (subscriptions, "
                                               "queued messages) after it disconnects; 0: not at all")
    receive_maximum: int = Field(
        1000, ge=1, le=65535, description="MQTT 5: QoS 1 messages the broker may send `fleet serve` before it "
                                          "acknowledges one")

    @model_validator(mode="after")
    def _one_password(self) -> MqttSection:
        if self.password is not None and self.password_file is not None:
            raise ValueError("password (or EDGEGLM_MQTT__PASSWORD) and password_file are both set; set one of them")
        return self


class FleetConfig(BaseSettings):
    """Settings of `edgeglm fleet serve`: defaults < TOML file < EDGEGLM_* env < CLI flags."""

    model_config = SettingsConfigDict(env_prefix="EDGEGLM_", env_nested_delimiter="__", case_sensitive=False,
                                      extra="forbid")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    fleet: FleetSection = Field(default_factory=FleetSection)
    http: HttpSection = Field(default_factory=HttpSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    bundles: BundlesSection = Field(default_factory=BundlesSection)
    rollback: RollbackSection = Field(default_factory=RollbackSection)
    mqtt: MqttSection = Field(default_factory=MqttSection)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings, file_secret_settings):
        # the agent's EDGEGLM_* variables (agent.env in the operator's shell) are not the controller's
        return (init_settings, _PrefixEnv(settings_cls, lambda: AgentConfig),
                TomlConfigSettingsSource(settings_cls, toml_file=_toml_file.get()))


def load_fleet_config(path: str | Path | None = None, overrides: dict | None = None) -> FleetConfig:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{path}: fleet config file not found")
    token = _toml_file.set(Path(path) if path else None)
    try:
        return FleetConfig(**(overrides or {}))
    except ValidationError as exc:
        problems = "; ".join(_problem(e, path, overrides or {}) for e in exc.errors(include_url=False)[:5])
        raise ConfigError(f"invalid fleet config ({path or 'defaults'}): {problems}") from None
    except ValueError as exc:  # a TOML syntax error
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        _toml_file.reset(token)


def _problem(err: dict, path: Path | None, overrides: dict) -> str:
    """One refused setting: `[section] key = value (from where): what is wrong`, in plain words."""
    loc = [str(p) for p in err["loc"]]
    where = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else loc[0] if loc else "(file)"
    source = _source(loc, path, overrides)
    if err["type"] == "extra_forbidden":
        model = FleetConfig
        for part in loc[:-1]:
            model = getattr(model.model_fields.get(part), "annotation", None) or model
        known = ", ".join(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else ""
        here = f"in [{loc[-2]}]" if len(loc) > 1 else "at the top level"
        return f"{where} (from {source}) is not a setting; allowed {here}: {known}"
    value = err.get("input")
    msg = _plain(err)
    if isinstance(value, dict):  # a check across a section's settings
        return f"[{'.'.join(loc)}] (from {source}): {msg}"
    shown = f" = {'**********' if 'password' in loc[-1] else repr(value)}"
    return f"{where}{shown} (from {source}) " + (msg if msg.startswith("is too ") else f"is invalid: {msg}") + \
        _bound(err)


def _bound(err: dict) -> str:
    """The limit a number broke, in words ("; must be at most 65535")."""
    ctx = err.get("ctx") or {}
    words = {"gt": "above", "ge": "at least", "lt": "below", "le": "at most"}
    return "".join(f"; must be {words[k]} {v}" for k, v in ctx.items() if k in words)


def _source(loc: list[str], path: Path | None, overrides: dict) -> str:
    """Where a setting came from: the command line, the TOML file, else the environment."""
    def has(data) -> bool:
        for part in loc:
            if not isinstance(data, dict) or part not in data:
                return False
            data = data[part]
        return True
    if has(overrides):
        return "the command line"
    if path is not None:
        try:
            import tomllib
            if has(tomllib.loads(Path(path).read_text(encoding="utf-8"))):
                return f"config file {path}"
        except (OSError, ValueError):
            pass
    return f"environment variable EDGEGLM_{'__'.join(loc).upper()}"


def mqtt_password(mqtt: MqttSection) -> str | None:
    """The MQTT password: `[mqtt] password` (or EDGEGLM_MQTT__PASSWORD), else the contents of `[mqtt]
    password_file` without its trailing newline, read now (a Secret the kubelet updated is read afresh by
    the next command; `fleet serve` keeps the password it started with). ConfigError naming the setting and
    the file when it cannot be read or is empty."""
    if mqtt.password_file is None:
        return mqtt.password.get_secret_value() if mqtt.password is not None else None
    path = mqtt.password_file
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"[mqtt] password_file {path}: cannot read it ({reason}); no MQTT connection was "
                          f"made") from None
    if not password:
        raise ConfigError(f"[mqtt] password_file {path}: empty; put the MQTT password of user "
                          f"{mqtt.username or '(none set)'} in it; no MQTT connection was made")
    return password


def check_desired_config(settings: dict) -> None:
    """Check a desired-config update before it is published; a ConfigError names the key, the value
    and what is allowed.

    Two checks, both the agents' own code (no model runtime): every setting it names must be one the
    agents take from the fleet (agent/remote_config.py REMOTE_SETTINGS, the allowlist agent/daemon.py
    enforces), and the result must pass the agent's schema (agent/config.py), against the agent
    defaults. What depends on an agent's own config file (LOCAL_CEILINGS: cache.max_mb may not rise
    above the box's own value) is checked by each agent, and a refusal shows in `fleet status`
    (config ... REFUSED)."""
    from agent.config import AgentConfig, DeviceSettings, canonical_settings, is_setting, with_updates
    from agent.remote_config import REMOTE_SETTINGS, floor_problems, local_only_keys

    # the agent defaults, built without reading EDGEGLM_* variables: model_validate would read them, and
    # EDGEGLM_MQTT__PASSWORD (the controller's too) without a username failed the agent's schema with a traceback
    base = AgentConfig.model_construct(device=DeviceSettings(id="fleet-check", fleet="fleet-check"))
    def invalid(exc: ConfigError) -> ConfigError:
        text = str(exc).replace("(from the desired-config update)", "(from the command line)")
        text = text.removeprefix("invalid config: ").removesuffix("; the running config is unchanged")
        return ConfigError(f"invalid desired config: {text}; nothing was published")

    try:
        settings = canonical_settings(settings)  # `SAMPLING.top_k` is `sampling.top_k`, as the agents take it
    except ConfigError as exc:
        raise invalid(exc) from None
    # local-only settings first (as the agents check them): their values' own checks (a password without a
    # username) would ask for a fix the fleet may not make at all
    fixed = [key for key in local_only_keys(settings) if is_setting(key)]
    if fixed:
        them = "it" if len(fixed) == 1 else "them"
        raise ConfigError(f"{', '.join(fixed)}: local-only; the agents refuse a desired config that changes {them} "
                          f"(the fleet may set only {', '.join(REMOTE_SETTINGS)}); nothing was published. Change "
                          f"local-only settings in each agent's config file")
    try:
        new = with_updates(base, settings)
    except ConfigError as exc:
        raise invalid(exc) from None
    low = floor_problems(base, new)
    if low:
        raise ConfigError(f"invalid desired config: {'; '.join(low)}; nothing was published")
