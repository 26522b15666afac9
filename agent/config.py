"""The agent's typed configuration: one `AgentConfig`, built once at the entry point.

Each component gets the section it needs (`cfg.http`, `cfg.sampling`, ...); nothing else reads
files or the environment. `load_config` builds it, `with_updates` applies a desired-config
update from the controller, `config_schema` gives the JSON schema for docs and the controller.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import socket
import sys
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
                               SettingsError, TomlConfigSettingsSource)

from agent.errors import ConfigError
from agent.mqtt import MqttSettings, SetPath

if sys.version_info >= (3, 11):
    import tomllib
else:  # pydantic-settings reads TOML with tomli before 3.11 too (its `toml` extra)
    import tomli as tomllib

ENV_PREFIX = "EDGEGLM_"
ENV_NESTED_DELIMITER = "__"
DEFAULT_SLOTS_DIR = Path("/var/lib/edgeglm")
# MQTT topic levels are built from device and fleet ids: no '/', '+', '#' or spaces
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DeviceSettings(_Section):
    id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128, pattern=ID_PATTERN)
    fleet: str = Field("default", min_length=1, max_length=128, pattern=ID_PATTERN)


class ModelSettings(_Section):
    bundle: SetPath | None = None  # serve this bundle directly instead of the active slot under slots_dir
    slots_dir: SetPath = DEFAULT_SLOTS_DIR
    backend: Literal["auto", "onnxruntime", "openvino"] = "auto"
    threads: int | None = Field(None, ge=1, le=1024)  # None: all usable cores
    # "auto": the autotune's device (backend auto) or the CPU (a named backend); else a device of the named
    # backend, used as it is: OpenVINO "CPU", "GPU", "GPU.1", "NPU"; ONNX Runtime "CPU", "CUDA", "TensorRT"
    # or a full execution-provider name. A device the backend does not have fails the load with those it has.
    device: str = Field("auto", min_length=1, max_length=64, pattern=r"^\S+$")  # one word, no spaces
    # ONNX Runtime INT8 bundles: true runs prompts and decode steps of 4+ sequences on the bundle's W8A8
    # prefill graph (prompts about 1.5-2x faster, 8 concurrent streams 1.2-1.6x; each graph holds its own
    # copy of the weights in memory); false: the decode graph runs everything (one copy, slow prompts);
    # "only": the prefill graph runs everything (one copy, fast prompts, one stream decodes 10-25% slower);
    # "auto": true where both graphs take at most half the memory available at load, else "only"
    prefill_graph: bool | Literal["auto", "only"] = "auto"


class HttpSettings(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8321, ge=0, le=65535)  # 0: the OS picks a free port
    api_key: SecretStr | None = None  # None: no key asked for
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    max_concurrent: int = Field(8, ge=1, le=1024)  # requests running or queued; more get 429
    # open connections (idle keep-alive ones included), one thread each; more are answered 503 and closed
    max_connections: int = Field(64, ge=1, le=10_000)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: SecretStr | None) -> SecretStr | None:
        # an empty key, or one with spaces or a newline around it (a blank EDGEGLM_HTTP__API_KEY= line, a key
        # file's newline), started the API with a key no client could ever send: every request got 401
        if v is not None:
            key = v.get_secret_value()
            if not key:
                raise ValueError("the key is empty: set one, or leave http.api_key out to ask for none (then the "
                                 "API should stay on loopback)")
            if key != key.strip():
                raise ValueError("the key has spaces or a line break around it, which no client's token can match "
                                 "(tokens are read without them): remove them")
            bad = next((c for c in key if not " " <= c <= "~"), None)  # (inner spaces are sent as they are)
            if bad is not None:  # an HTTP header carries bytes read as latin-1: a UTF-8 client never matched "ä"
                raise ValueError(f"the key holds {'a control character' if ord(bad) < 32 or ord(bad) == 127 else 'a character outside ASCII'} "
                                 f"(U+{ord(bad):04X}), which clients cannot send in an Authorization header as "
                                 "the agent compares it: use printable ASCII only (e.g. `openssl rand -hex 32`)")
        return v


class SamplingSettings(_Section):
    """Defaults for requests that leave a field out; ranges as in runtime.generate.SamplingParams."""

    max_tokens: int = Field(256, ge=1, le=1 << 20)
    temperature: float = Field(0.0, ge=0.0, le=100.0)  # 0 = greedy
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: the most likely token only (as OpenAI takes it)
    top_k: int = Field(0, ge=0)  # 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)


class BatchingSettings(_Section):
    """Continuous batching of concurrent requests (runtime/batching.py); both apply live."""

    max_batch: int = Field(8, ge=1, le=256)  # sequences decoded together; 1 = one request at a time
    window_ms: float = Field(0.0, ge=0.0, le=10_000.0)  # an idle engine waits this long for a fuller batch
    # prompt tokens prefilled per decode step while other requests decode (0: each prompt whole)
    prefill_chunk: int = Field(128, ge=0, le=1 << 20)
    # KV memory the requests decoding together may come to hold, MiB (each counted at its prompt plus its
    # max_tokens, within the context window); a request that would go over waits for running ones to end
    # (one request alone always runs). "auto": a third of the memory the process can still take once the
    # model is loaded (MemAvailable, or less under a cgroup limit; with the KV in GPU memory, the GPU's free memory)
    max_kv_mb: Annotated[float, Field(gt=0, le=1_000_000, allow_inf_nan=False)] | Literal["auto"] = "auto"


class CacheSettings(_Section):
    """The prefix KV cache (runtime/prefix_cache.py): the KV of prompt prefixes that requests share
    (a system prompt) is reused instead of recomputed. All fields apply live."""

    max_mb: float = Field(64.0, ge=0.0, le=1 << 20)  # KV held in memory, MiB; 0 = off
    block_tokens: int = Field(32, ge=1, le=4096)  # prefixes are cached in whole blocks of this many tokens
    persist: bool = True  # keep reused prefixes on disk so that they survive a restart
    persist_dir: SetPath | None = None  # None: <model.slots_dir>/prefix-cache

    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))

    def directory(self, state_dir: Path) -> Path | None:
        """Where blocks are persisted (None: not at all)."""
        return (self.persist_dir or Path(state_dir) / "prefix-cache") if self.persist else None


class TelemetrySettings(_Section):
    interval_s: float = Field(30.0, gt=0.0, le=86400.0)
    # device health (memory, disk, CPU, KV waits) on its own topic, sent with the first telemetry at least this
    # long after the last one; 0: not sent
    health_interval_s: float = Field(60.0, ge=0.0, le=86400.0)
    # each window's latency histograms (1% log buckets, typically a few hundred bytes) on the latency topic, so
    # that the controller reads true fleet percentiles; false: only the report (a metered link)
    histograms: bool = True


class OtaSettings(_Section):
    # public keys (*.pub) that may sign bundles; more than one during a key rotation
    trusted_keys: SetPath = Path("/etc/edgeglm/trusted-keys")
    # public keys (*.pub) that may authorise rollbacks, and only rollbacks (never a bundle); unset: the
    # trusted_keys authorise rollbacks too (one key role)
    rollback_keys: SetPath | None = None
    # refuse to serve a bundle without a valid signature (always on for OTA updates)
    require_signature: bool = True
    max_latency_ratio: float = Field(1.5, gt=1.0, le=100.0)  # self-test: new decode latency vs serving
    min_latency_delta_ms: float = Field(1.0, ge=0.0, le=10_000.0)  # ...unless slower by less than this
    chunk_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)  # ask a chunk again after this
    give_up_s: float = Field(300.0, gt=0.0, le=86400.0)  # fail the update when the controller is gone this long
    # a committed model is on probation until it has served this long in one run of the agent; 0: no probation
    probation_s: float = Field(600.0, ge=0.0, le=7 * 86400.0)
    # starts after an unclean end (crash, kill, power cut) during the probation before going back to the old model
    probation_deaths: int = Field(3, ge=1, le=100)


LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# Set by load_config for the duration of one AgentConfig(...) call; a ContextVar keeps
# concurrent loads (tests, threads) from seeing each other's file.
_toml_file: ContextVar[Path | None] = ContextVar("edgeglm_toml_file", default=None)


class AgentConfig(BaseSettings):
    """Settings of the edge agent.

    Priority, lowest first: defaults < TOML file < environment variables `EDGEGLM_...` (nested
    with `__`, e.g. `EDGEGLM_HTTP__PORT=9000`) < command-line overrides.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      case_sensitive=False, extra="forbid")

    device: DeviceSettings = Field(default_factory=DeviceSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    ota: OtaSettings = Field(default_factory=OtaSettings)
    log_level: LogLevel = "info"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        ok = isinstance(v, str) and v.lower() in typing.get_args(LogLevel)
        return v.lower() if ok else v  # an invalid value is reported as written

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # highest priority first; no .env file and no secrets dir; the controller's variables are not ours
        return (init_settings, _PrefixEnv(settings_cls, _fleet_config_class),
                TomlConfigSettingsSource(settings_cls, toml_file=_toml_file.get()))


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (`X`, `X | None`), else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def drop_foreign(data: dict, mine: type[BaseModel], theirs: type[BaseModel] | None) -> dict:
    """`data` (settings read from EDGEGLM_* variables) less the keys that are not `mine`'s but are `theirs`'s.

    The agent and the fleet controller read the same prefix, and a box or a shell may hold both's variables
    (agent.env exported in an operator's shell, a box running both): each ignores the other's settings
    instead of refusing to start, and still refuses a name that is neither's (a typo). A setting both have
    (`EDGEGLM_MQTT__HOST`) applies to both."""
    out = {}
    for key, value in data.items():
        field = mine.model_fields.get(key)
        other = theirs.model_fields.get(key) if theirs is not None else None
        if field is None:
            if other is None:
                out[key] = value  # neither's: validation names it
            continue
        sub = _model_of(field.annotation)
        if isinstance(value, dict) and sub is not None:
            value = drop_foreign(value, sub, _model_of(other.annotation) if other is not None else None)
        out[key] = value
    return out


class _PrefixEnv(EnvSettingsSource):
    """EDGEGLM_* variables, less those of the other program (`drop_foreign`)."""

    def __init__(self, settings_cls: type[BaseSettings], foreign):
        super().__init__(settings_cls)
        self._foreign = foreign  # a callable returning the other program's settings class (imported late)

    def __call__(self) -> dict[str, Any]:
        foreign = self._foreign()
        typos = misspelled_variables(os.environ, self.settings_cls, foreign)
        if typos:
            raise ConfigError("; ".join(typos))
        return drop_foreign(super().__call__(), self.settings_cls, foreign)


OTHER_VARIABLES = {"CACHE_DIR", "TEST_GPU_PROVIDER"}  # EDGEGLM_* variables that are no config setting


def misspelled_variables(environ, *schemas: type[BaseModel]) -> list[str]:
    """A line for each EDGEGLM_* variable that names a setting of `schemas` with one underscore where two belong
    (`EDGEGLM_HTTP_API_KEY` for `EDGEGLM_HTTP__API_KEY`): such a variable was ignored without a word, so a box ran
    without the API key or password its operator set. Other unknown EDGEGLM_* names are left alone (those with
    `__` are checked by validation)."""
    lines = []
    for name in sorted(environ):
        rest = name.upper().removeprefix(ENV_PREFIX)
        if rest == name.upper() or "__" in rest or rest in OTHER_VARIABLES \
                or any(rest.lower() in schema.model_fields for schema in schemas):
            continue
        for i in [i for i, c in enumerate(rest) if c == "_"]:
            section, field = rest[:i].lower(), rest[i + 1:].lower()
            models = [_model_of(schema.model_fields[section].annotation) for schema in schemas
                      if section in schema.model_fields]
            if any(model is not None and field in model.model_fields for model in models):
                lines.append(f"environment variable {name} is not a setting (it would be ignored); the setting is "
                             f"{ENV_PREFIX}{section.upper()}__{field.upper()}, with two underscores between the "
                             "section and the setting: rename it")
                break
    return lines


def _fleet_config_class():
    from fleet.config import FleetConfig  # no ML code; the controller's schema only

    return FleetConfig


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> AgentConfig:
    """Build the config from a TOML file (optional), the environment and overrides.

    `overrides` come from the command line: nested (`{"http": {"port": 9000}}`) or dotted
    (`{"http.port": 9000}`). A file named but missing is an error; no file means defaults.
    A value in the file must have the TOML type of its field (`port = "8321"` and
    `require_signature = "no"` are errors, not coerced); environment variables are text and
    are parsed (`EDGEGLM_HTTP__PORT=9000`, `EDGEGLM_OTA__REQUIRE_SIGNATURE=false`).
    """
    overrides = nest(overrides or {})
    toml_data: dict = {}
    if path is not None:
        if not str(path).strip():  # Path("") is "." (read as "config file . ... Is a directory")
            raise ConfigError("config file '': an empty path; give the config file's path, or leave it out to use "
                              "the defaults")
        path = Path(path)
        toml_data = _read_toml(path)
    wrong_types = _wrong_types(toml_data, f"config file {path}", "TOML")
    token = _toml_file.set(path)
    try:
        cfg = AgentConfig(**overrides)
    except SettingsError as exc:  # a whole section from the environment that is not JSON: EDGEGLM_MQTT=oops
        field = re.search(r'field "([^"]+)"', str(exc))
        name = f"EDGEGLM_{field.group(1).upper()}" if field else "an EDGEGLM_ variable"
        raise ConfigError(f"{name} sets a whole section and must be a JSON object ({name}='{{\"field\": value}}'); "
                          f"set one setting with {name}__FIELD instead ({exc})") from None
    except ValidationError as exc:
        problems = _problems(exc, lambda loc: _source_of(loc, overrides, toml_data, path), skip=wrong_types)
        raise ConfigError(_invalid([*wrong_types.values(), *problems])) from None
    finally:
        _toml_file.reset(token)
    if wrong_types:
        raise ConfigError(_invalid(list(wrong_types.values())))
    warn_readable_secrets(cfg, path, toml_data)
    return cfg


def warn_readable_secrets(cfg: AgentConfig, path: Path | None, toml_data: dict) -> list[str]:
    """A warning (returned and logged) for each secret in a file every user of the box may read: the config file
    holding mqtt.password or http.api_key (agent.toml is 0644; the install puts secrets in the 0600 agent.env),
    and the MQTT client key. Nothing stops: the box is the operator's, and the agent cannot tell who is on it."""
    found = []
    held = [f"{section}.{key}" for section, key in (("mqtt", "password"), ("http", "api_key"))
            if isinstance(toml_data.get(section), dict) and key in toml_data[section]]
    files = [(path, " and ".join(held), "move it to /etc/edgeglm/agent.env (0600) as an EDGEGLM_ variable, or "
              "chmod o-r the file")] if held and path is not None else []
    if cfg.mqtt.tls is not None and cfg.mqtt.tls.key_file is not None:
        files.append((Path(cfg.mqtt.tls.key_file), "the MQTT client's private key (mqtt.tls.key_file)",
                      "chmod 0600 it (or 0640 to the service's group)"))
    for file, what, fix in files:
        try:
            mode = Path(file).stat().st_mode
        except OSError:
            continue  # a missing key file is named where it is loaded
        if mode & 0o004:
            found.append(f"{file} holds {what} and every user of this box may read it (mode {mode & 0o777:04o}): "
                         f"{fix}")
    for line in found:
        logging.getLogger("edgeglm.agent").warning("%s", line)
    return found


def with_updates(cfg: AgentConfig, desired: dict) -> AgentConfig:
    """A new config: `cfg` with a partial desired-config update applied and validated.

    The environment and the file are not read again: the update applies on top of the config
    the agent runs with. The update is JSON: each value must have its field's type (`"9000"`
    is not a port, `"no"` not a boolean). On error `cfg` is untouched and the ConfigError
    names the field.
    """
    desired = canonical_settings(desired)
    source = "the desired-config update"
    wrong_types = _wrong_types(desired, source, "JSON")
    merged = _deep_update(cfg.model_dump(), desired)
    problems = list(wrong_types.values())
    try:
        new = AgentConfig.model_validate(merged)  # validation only: no sources are read
    except ValidationError as exc:
        problems += _problems(exc, lambda loc: source, skip=wrong_types)
    if problems:
        raise ConfigError(_invalid(problems) + "; the running config is unchanged")
    return new


def config_schema() -> dict:
    """The JSON schema of AgentConfig (for docs and the controller's desired-config payloads)."""
    return AgentConfig.model_json_schema()


def nest(flat: dict) -> dict:
    """`{"http.port": 1, "model": {"backend": "x"}}` -> `{"http": {"port": 1}, "model": {"backend": "x"}}`."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} sets a field inside {p!r}, which is also given a plain value")
        if leaf in node:
            node[leaf] = _merge_once(node[leaf], value, ".".join([*parents, leaf]))
        else:
            node[leaf] = value
    return out


def canonical_settings(update: dict) -> dict:
    """`nest(update)` with every section and setting name spelled as the config spells it: `SAMPLING` is
    `sampling`, as in the config file (case_sensitive=False). Before, {"SAMPLING": {"top_k": 5}} was refused by
    the agents as local-only (and would have had no effect past that check: validated beside the running
    "sampling"). Names that are no setting are kept as given (the validation names them)."""
    return _canonical(AgentConfig, nest(update), ())


def _canonical(model: type[BaseModel], data: dict, prefix: tuple[str, ...]) -> dict:
    names = {name.lower(): name for name in model.model_fields}
    out: dict = {}
    for key, value in data.items():
        name = key if key in model.model_fields else names.get(str(key).lower(), key)
        sub = _unwrap(model.model_fields[name].annotation) if name in model.model_fields else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            value = _canonical(sub, value, (*prefix, name))
        out[name] = _merge_once(out[name], value, ".".join((*prefix, name))) if name in out else value
    return out


def _merge_once(old, new, name: str):
    """Two parts of one update that name the same section ({"sampling.top_k": 5, "sampling": {"top_p": 0.9}}):
    merged, but a setting given twice ({"sampling.top_k": 5, "sampling": {"top_k": 7}}) is refused, not
    settled by the order of the keys."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        raise ConfigError(f"{name!r} is given twice (dotted and nested, or spelled two ways); give each setting once")
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge_once(out[k], v, f"{name}.{k}") if k in out else v
    return out


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _read_toml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: give an existing file, or no file to use the defaults")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at "
                          f"offset {exc.start}): TOML files are UTF-8; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


# --- error messages -------------------------------------------------------------------------------

MAX_PROBLEMS = 12  # problems named in one error; a payload of a thousand mistakes must not make a megabyte of text
MAX_SHOWN = 80  # characters of a value or key shown in an error


def join_problems(problems: list[str]) -> str:
    """The first MAX_PROBLEMS of `problems` joined by "; ", and how many more there are."""
    more = len(problems) - MAX_PROBLEMS
    return "; ".join(problems[:MAX_PROBLEMS] + ([f"and {more} more problem{'s' * (more > 1)}"] if more > 0 else []))


def _invalid(problems: list[str]) -> str:
    return "invalid config: " + join_problems(problems)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 20]}... ({len(text)} characters)"


def _problems(exc: ValidationError, source_of, skip=()) -> list[str]:
    """One text per field that failed (a union's failed members make one text), fields in `skip` left out."""
    problems: list[str | tuple] = []
    fields: dict[tuple[str, ...], list[tuple[tuple[str, ...], dict]]] = {}
    unknown: dict[tuple, list[str]] = {}  # (section, source) -> the names there that are not settings
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":  # one text per section, its allowed names once
            key = ("unknown", loc[:-1], source_of(loc))
            if key not in unknown:
                unknown[key] = []
                problems.append(key)
            unknown[key].append(_clip(".".join(loc)))
            continue
        floc = _field_loc(loc)
        if floc in skip:
            continue
        if floc not in fields:
            fields[floc] = []
            problems.append(floc)  # type: ignore[arg-type]  # replaced below, in order
        fields[floc].append((loc, err))
    return [_unknown_problem(p[1], p[2], unknown[p]) if p in unknown else _field_problem(p, fields[p], source_of(p))
            for p in problems]


def _unknown_problem(section: tuple[str, ...], source: str, names: list[str]) -> str:
    known = ", ".join(_known_fields(section)) or "none"
    where = ".".join(section) or "the top level"
    listed = ", ".join(names[:MAX_PROBLEMS]) + (f" and {len(names) - MAX_PROBLEMS} more" if len(names) > MAX_PROBLEMS
                                                else "")
    verb = "is not a setting" if len(names) == 1 else "are not settings"
    return f"{listed} (from {source}) {verb}; allowed in {where}: {known}"


def _field_problem(floc: tuple[str, ...], errs: list, source: str) -> str:
    field = ".".join(floc)
    loc, err = errs[0]
    if len(errs) > 1 or loc != floc:  # the members of a union (`bool | Literal[...]`) failed one by one
        return f"{field} = {_shown(floc, err['input'])} (from {source}) is invalid: must be {_expected(floc)}"
    msg = _plain(err)
    if isinstance(err["input"], dict):  # a whole section failed a check across its fields
        text = f"{field} (from {source}) is invalid: {msg}"
    else:  # "x = 7 (from ...) is too large" / "... is invalid: must be an integer"
        text = f"{field} = {_shown(floc, err['input'])} (from {source}) " + (msg if msg.startswith("is too ") else
                                                                            f"is invalid: {msg}")
    allowed = _allowed(floc)
    if allowed:
        text += f"; allowed: {allowed}"
    return text


_PLAIN = {  # pydantic's error types in the words the TOML type checks use (the allowed range follows)
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "must be an integer"),
    **dict.fromkeys(("float_parsing", "float_type"), "must be a number"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "must be true or false"),
    "finite_number": "must be a finite number",
    **dict.fromkeys(("greater_than", "greater_than_equal"), "is too small"),
    **dict.fromkeys(("less_than", "less_than_equal"), "is too large"),
}


def _plain(err: dict) -> str:
    """An error in plain words: our validators' own text, else pydantic's sentence without "Input should be"."""
    if err["type"] in _PLAIN:
        value = err.get("input")
        try:
            nan = isinstance(value, (str, float)) and math.isnan(float(value))
        except ValueError:
            nan = False
        return "must be a number, not NaN" if nan and "than" in err["type"] else _PLAIN[err["type"]]
    if err["type"] in ("string_too_short", "too_short") and (err.get("ctx") or {}).get("min_length") == 1:
        return "must not be empty"
    if err["type"] == "string_too_long":
        return f"must be at most {(err.get('ctx') or {}).get('max_length')} characters long"
    return re.sub(r"^Input should be ", "must be ", err["msg"].removeprefix("Value error, "))


def _shown(loc: tuple[str, ...], value: Any) -> str:
    if _is_secret(loc):
        return "'**********'"
    return value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else _clip(repr(value))  # TOML dates


# --- strict types for typed sources (the TOML file, a JSON desired-config update) -----------------

def _wrong_types(data: dict, source: str, syntax: str) -> dict[tuple[str, ...], str]:
    """Fields of `data` whose value has the wrong type for the field, by field path: their texts.

    A typed source is validated strictly (a string is not a bool or a number); values of the
    right type are left to the full validation, which checks ranges and knows every source.
    """
    out: dict[tuple[str, ...], str] = {}
    _check_types(AgentConfig, data, (), source, syntax, out)
    return out


def _check_types(model: type[BaseModel], data: Any, prefix: tuple[str, ...], source: str, syntax: str,
                 out: dict) -> None:
    if not isinstance(data, dict):
        return
    flat = {}
    names = {name.lower(): name for name in model.model_fields}  # `[OTA]` is `[ota]` (case_sensitive=False)
    for key, value in data.items():
        key = key if key in model.model_fields else names.get(str(key).lower())
        if key is None:
            continue  # not a setting: the full validation names it and the allowed ones
        sub = _unwrap(model.model_fields[key].annotation)
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_types(sub, value, (*prefix, key), source, syntax, out)
        else:
            flat[key] = value
    if not flat:
        return
    try:  # JSON mode: a path is a string there; strict: no coercion between types
        model.model_validate_json(json.dumps(flat, default=lambda v: []), strict=True)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(str(p) for p in err["loc"])
            if not loc or loc[0] not in flat:
                continue  # a check across fields: the full validation reports it with every source
            floc = (*prefix, loc[0])
            if floc in out or not _is_type_error(err, floc):
                continue
            value = flat[loc[0]]
            text = f"{'.'.join(floc)} = {_shown(floc, value)} (from {source}) is invalid: must be {_expected(floc)}"
            if not _type_fits(value, floc):
                text += f", not {_kind(value, syntax)}"
            out[floc] = text


def _is_type_error(err: dict, floc: tuple[str, ...]) -> bool:
    if err["type"].endswith("_type"):  # bool_type, int_type, string_type, model_type, ...
        return True
    if err["type"] == "literal_error":  # `backend = 5`, `qos = "1"`: not even the type of a choice
        return not _type_fits(err["input"], floc)
    return False


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X (other unions as they are)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _members(a)]
    return [annotation]


def _bounds(annotation: Any) -> str:
    """` > 0`, ` >= 1 and <= 10`: the bounds an `Annotated[x, Field(...)]` member of a union puts on it."""
    parts = []
    for meta in typing.get_args(annotation)[1:]:
        for item in getattr(meta, "metadata", [meta]):
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                if getattr(item, attr, None) is not None:
                    parts.append(f"{sign} {getattr(item, attr)}")
    return (" " + " and ".join(parts)) if parts else ""


def _expected(loc: tuple[str, ...]) -> str:
    """What a field accepts, in TOML/JSON words: `true, false, "auto" or "only"`, `an integer`."""
    info = _field_info(loc)
    if info is None:
        return "a valid value"
    words: list[str] = []
    for m in _members(info.annotation):
        if typing.get_origin(m) is Annotated:
            base = typing.get_args(m)[0]
            words.append({int: "an integer", float: "a number"}.get(base, getattr(base, "__name__", str(base)))
                         + _bounds(m))
        elif typing.get_origin(m) is Literal:
            words += [json.dumps(a) for a in typing.get_args(m)]
        elif m is bool:
            words += ["true", "false"]
        elif m is int:
            words.append("an integer")
        elif m is float:
            words.append("a number")
        elif m is str or m is SecretStr:
            words.append("a string")
        elif isinstance(m, type) and issubclass(m, Path):
            words.append("a path (a string)")
        elif isinstance(m, type) and issubclass(m, BaseModel):
            words.append("a table of settings")
        else:
            words.append(getattr(m, "__name__", str(m)))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _accepted_types(annotation: Any) -> tuple[type, ...]:
    """The Python types of the TOML/JSON values a field can take (for "not a string" in a message)."""
    out: list[type] = []
    for m in _members(annotation):
        if typing.get_origin(m) is Annotated:
            m = typing.get_args(m)[0]
        if typing.get_origin(m) is Literal:
            out += [type(a) for a in typing.get_args(m)]
        elif m is float:
            out += [int, float]
        elif m in (str, SecretStr) or (isinstance(m, type) and issubclass(m, Path)):
            out.append(str)
        elif isinstance(m, type) and issubclass(m, BaseModel):
            out.append(dict)
        elif isinstance(m, type):
            out.append(m)
    return tuple(out)


def _type_fits(value: Any, loc: tuple[str, ...]) -> bool:
    """Whether `value`'s type is one the field takes (a boolean is not an integer here)."""
    accepted = _accepted_types(_field_info(loc).annotation)
    return bool in accepted if isinstance(value, bool) else isinstance(value, accepted)


def _kind(value: Any, syntax: str) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float" if syntax == "TOML" else "a fractional number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table" if syntax == "TOML" else "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "a date/time" if syntax == "TOML" else type(value).__name__


def _source_of(loc: tuple[str, ...], overrides: dict, toml_data: dict, path: Path | None) -> str:
    if _has(overrides, loc):
        return "a command-line override"
    for n in range(len(loc), 0, -1):  # a nested variable, or a whole section given as JSON
        name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(loc[:n])
        if any(k.upper() == name.upper() for k in os.environ):
            return f"environment variable {name.upper()}"
    if _has(toml_data, loc):
        return f"config file {path}"
    # a section-level error (two fields that go together): the variables that set fields inside it
    prefix = (ENV_PREFIX + ENV_NESTED_DELIMITER.join(loc) + ENV_NESTED_DELIMITER).upper()
    inside = sorted(k.upper() for k in os.environ if k.upper().startswith(prefix))
    if inside:
        return f"environment variable{'s' if len(inside) > 1 else ''} {', '.join(inside)}"
    return "the default"


def _has(data: dict, loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _field_loc(loc: tuple[str, ...]) -> tuple[str, ...]:
    """The setting an error's location is in: `("model", "prefill_graph", "bool")` -> `("model", "prefill_graph")`."""
    model: Any = AgentConfig
    n = 0
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            break
        model = _unwrap(model.model_fields[part].annotation)
        n += 1
    return loc[:n]


def is_setting(key: str) -> bool:
    """Whether the dotted `key` names one setting or a part of one (e.g. "http.host", "ota.trusted_keys.k1"; not a
    section such as "http", nor a name the config does not have)."""
    model: Any = AgentConfig
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # inside a setting's value (a table of keys)
        if part not in model.model_fields:
            return False
        model = _unwrap(model.model_fields[part].annotation)
    return not (isinstance(model, type) and issubclass(model, BaseModel))


def _field_info(loc: tuple[str, ...]):
    model: Any = AgentConfig
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _unwrap(info.annotation)
    return info


def _is_secret(loc: tuple[str, ...]) -> bool:
    info = _field_info(loc)
    return info is not None and (info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation))


def _known_fields(loc: tuple[str, ...]) -> list[str]:
    model = AgentConfig if not loc else _unwrap(getattr(_field_info(loc), "annotation", None))  # (`MqttTls | None`)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _allowed(loc: tuple[str, ...]) -> str | None:
    """What a constrained field accepts where pydantic's message says only half, e.g. `0 <= port <= 65535`.

    (For a Literal, pydantic's message already lists the choices.)
    """
    info = _field_info(loc)
    if info is None:
        return None
    low = high = ""
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            low = f"{m.ge} <= "
        elif isinstance(m, annotated_types.Gt):
            low = f"{m.gt} < "
        elif isinstance(m, annotated_types.Le):
            high = f" <= {m.le}"
        elif isinstance(m, annotated_types.Lt):
            high = f" < {m.lt}"
        elif getattr(m, "pattern", None) == ID_PATTERN:
            return "letters, digits, '.', '_' and '-', starting with a letter or digit (it is an MQTT topic level)"
    if low or high:
        return f"{low}{loc[-1]}{high}"
    return None
