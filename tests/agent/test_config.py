"""AgentConfig: file < environment < overrides, error texts, schema, live updates."""

from __future__ import annotations

import os
import socket

import pytest

from agent.config import AgentConfig, config_schema, load_config, with_updates
from agent.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("EDGEGLM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('log_level = "WARNING"\n\n'
                    '[http]\nhost = "0.0.0.0"\nport = 9000\n\n'
                    '[sampling]\nmax_tokens = 10\ntemperature = 0.2\n\n'
                    '[model]\nbundle = "/opt/bundle"\nbackend = "openvino"\n')
    return path


def test_defaults_without_a_file():
    cfg = load_config(None, {})
    assert (cfg.http.host, cfg.http.port, cfg.http.api_key) == ("127.0.0.1", 8321, None)
    assert cfg.device.id == socket.gethostname() and cfg.device.fleet == "default"
    assert str(cfg.model.slots_dir) == "/var/lib/edgeglm" and cfg.model.backend == "auto"
    assert cfg.model.prefill_graph == "auto"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.enabled) == ("127.0.0.1", 1883, False)
    assert cfg.log_level == "info"


def test_file_then_environment_then_overrides(toml_file, monkeypatch):
    cfg = load_config(toml_file, {})
    assert (cfg.http.host, cfg.http.port, cfg.sampling.max_tokens, cfg.log_level) == ("0.0.0.0", 9000, 10, "warning")
    assert str(cfg.model.bundle) == "/opt/bundle" and cfg.model.backend == "openvino"

    monkeypatch.setenv("EDGEGLM_HTTP__PORT", "9100")
    monkeypatch.setenv("EDGEGLM_SAMPLING__TEMPERATURE", "0.5")
    cfg = load_config(toml_file, {})
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9100)  # nested merge: host still from the file
    assert (cfg.sampling.max_tokens, cfg.sampling.temperature) == (10, 0.5)

    cfg = load_config(toml_file, {"http.port": 9200, "sampling": {"max_tokens": 3}})
    assert (cfg.http.host, cfg.http.port, cfg.sampling.max_tokens, cfg.sampling.temperature) == ("0.0.0.0", 9200, 3, 0.5)


def test_api_key_from_the_environment_stays_secret(monkeypatch):
    monkeypatch.setenv("EDGEGLM_HTTP__API_KEY", "s3cret-key")
    cfg = load_config(None, {})
    assert cfg.http.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(cfg) and "s3cret-key" not in str(cfg.model_dump())


def test_invalid_value_in_the_file_names_field_value_choices_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nbackend = "tensorrt"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    msg = str(err.value)
    assert "model.backend = 'tensorrt'" in msg and str(path) in msg
    assert "'auto', 'onnxruntime' or 'openvino'" in msg


def test_invalid_value_in_the_environment_names_the_variable_and_the_range(monkeypatch):
    monkeypatch.setenv("EDGEGLM_HTTP__PORT", "70000")
    with pytest.raises(ConfigError) as err:
        load_config(None, {})
    msg = str(err.value)
    assert "http.port = '70000'" in msg and "environment variable EDGEGLM_HTTP__PORT" in msg
    assert "0 <= port <= 65535" in msg


def test_invalid_overrides_are_all_reported(toml_file):
    with pytest.raises(ConfigError) as err:
        load_config(toml_file, {"sampling.top_p": 0, "device.id": "box/1", "log_level": "LOUD"})
    msg = str(err.value)
    assert "sampling.top_p = 0 (from a command-line override)" in msg and "0.0 < top_p <= 1.0" in msg
    assert "device.id = 'box/1'" in msg and "MQTT topic level" in msg
    assert "log_level = 'LOUD'" in msg and "'debug', 'info', 'warning', 'error' or 'critical'" in msg


def test_unknown_setting_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[http]\nprot = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    msg = str(err.value)
    assert "http.prot" in msg and str(path) in msg
    assert "allowed in http: host, port, api_key, max_body_bytes, max_concurrent" in msg


def test_missing_or_broken_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_config(tmp_path / "nope.toml", {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[http\nport = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML: .*line 1"):
        load_config(broken, {})


def test_schema_has_the_sections():
    schema = config_schema()
    assert {"device", "model", "http", "sampling", "telemetry", "mqtt", "log_level"} <= set(schema["properties"])
    http = schema["$defs"]["HttpSettings"]["properties"]
    assert http["port"]["maximum"] == 65535 and http["port"]["default"] == 8321
    assert schema["$defs"]["ModelSettings"]["properties"]["backend"]["enum"] == ["auto", "onnxruntime", "openvino"]


def test_with_updates_applies_a_partial_update(toml_file):
    old = load_config(toml_file, {"http.api_key": "k"})
    new = with_updates(old, {"sampling": {"temperature": 0.7}, "telemetry": {"interval_s": 5}})
    assert (new.sampling.temperature, new.sampling.max_tokens, new.telemetry.interval_s) == (0.7, 10, 5.0)
    assert new.http.port == 9000 and new.http.api_key.get_secret_value() == "k"
    assert old.sampling.temperature == 0.2 and old.telemetry.interval_s == 30.0


def test_with_updates_does_not_read_the_environment_again(monkeypatch):
    old = load_config(None, {})
    monkeypatch.setenv("EDGEGLM_HTTP__PORT", "9999")
    assert with_updates(old, {"log_level": "debug"}).http.port == 8321


def test_with_updates_rejects_bad_values_and_keeps_the_old_config():
    old = load_config(None, {})
    before = old.model_dump()
    with pytest.raises(ConfigError) as err:
        with_updates(old, {"sampling": {"temperature": -1}})
    msg = str(err.value)
    assert "sampling.temperature = -1 (from the desired-config update)" in msg
    assert "0.0 <= temperature <= 100.0" in msg and "running config is unchanged" in msg
    with pytest.raises(ConfigError, match="sampling.temprature .* is not a setting"):
        with_updates(old, {"sampling": {"temprature": 1}})
    assert old.model_dump() == before and isinstance(old, AgentConfig)


def test_a_bad_secret_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"http.api_key": ["hunter2"]})
    assert "http.api_key = '**********' (from a command-line override)" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_model_device_is_one_word(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('[model]\nbackend = "openvino"\ndevice = "GPU 1"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert "model.device = 'GPU 1'" in str(err.value) and str(path) in str(err.value)
    assert load_config(None, {"model.device": "GPU.1"}).model.device == "GPU.1"
