"""AgentConfig: file < environment < overrides, error texts, schema, live updates."""

from __future__ import annotations

import json
import os
import re
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


@pytest.mark.parametrize("host,words", [
    ("mqtt://broker.example:1883", "give a host name or address, not a URL"),
    ("broker.example/edgeglm", "not a URL"),
    ("broker.example:1883", "give the port in port (here 1883), not after the host"),
    ("broker example", "a host name has no spaces"),
])
def test_a_broker_url_or_host_with_a_port_is_refused_where_the_agent_and_the_fleet_read_it(tmp_path, host, words):
    """`host = "mqtt://broker.example:1883"` was taken as a name: the agent logged "gaierror ... retrying in 15 s"
    forever, the port appended a second time."""
    from fleet.config import load_fleet_config

    path = tmp_path / "conf.toml"
    path.write_text(f'[mqtt]\nhost = "{host}"\n')
    for load in (load_config, load_fleet_config):
        with pytest.raises(ConfigError) as err:
            load(path, {})
        named = (f"mqtt.host = '{host}'", f"[mqtt] host = '{host}'")  # (the agent's and the fleet's way)
        assert any(n in str(err.value) for n in named) and words in str(err.value), str(err.value)
    for fine in ("broker.example", "10.0.0.7", "::1", "fe80::1", "edgeglm-broker.edgeglm.svc"):
        path.write_text(f'[mqtt]\nhost = "{fine}"\n')
        assert load_config(path, {}).mqtt.host == load_fleet_config(path, {}).mqtt.host == fine


def test_invalid_overrides_are_all_reported(toml_file):
    with pytest.raises(ConfigError) as err:
        load_config(toml_file, {"sampling.top_p": 1.5, "device.id": "box/1", "log_level": "LOUD"})
    msg = str(err.value)
    assert "sampling.top_p = 1.5 (from a command-line override)" in msg and "0.0 <= top_p <= 1.0" in msg
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
    path.write_text('[mqtt.tls]\ncafile = "/etc/edgeglm/ca.pem"\n')  # an optional section: said "allowed: none"
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert "mqtt.tls.cafile" in str(err.value) and "allowed in mqtt.tls: ca_file, cert_file, key_file" in str(err.value)


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


# --- strict types from typed sources; readable messages --------------------------------------------

def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[device]\nfleet = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml is not UTF-8 text .*save it as UTF-8"):
        load_config(path, {})


def test_an_api_key_with_inner_spaces_still_loads():
    """(A passphrase key like "correct horse battery" matched before the ASCII check; it must still load.)"""
    assert load_config(None, {"http.api_key": "correct horse battery"}).http.api_key.get_secret_value() == \
        "correct horse battery"


@pytest.mark.parametrize("where,value,message", [
    ("file", "", "the key is empty: set one, or leave http.api_key out"),
    ("env", "", "the key is empty"),
    ("env", "s3cret\n", "the key has spaces or a line break around it, which no client's token can match"),
    ("file", " s3cret", "the key has spaces or a line break around it"),
    ("file", "pässwort", "the key holds a character outside ASCII (U+00E4), which clients cannot send"),
    ("env", "ключ", "the key holds a character outside ASCII (U+043A)"),
    ("file", "a\tb", "the key holds a control character (U+0009)"),
    ("file", "a\nb", "the key holds a control character (U+000A)"),
    ("file", "a\u007fb", "the key holds a control character (U+007F)"),
])
def test_an_api_key_no_client_could_send_is_refused(tmp_path, monkeypatch, where, value, message):
    """An empty key (a blank EDGEGLM_HTTP__API_KEY= line) or one padded with spaces or a newline started the API
    with a key that no request could match: every request was a 401, and an empty key on 0.0.0.0 skipped the
    warning about listening beyond loopback without one."""
    path = tmp_path / "agent.toml"
    path.write_text(f"[http]\napi_key = {json.dumps(value)}\n" if where == "file" else "")
    if where == "env":
        monkeypatch.setenv("EDGEGLM_HTTP__API_KEY", value)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert "http.api_key = '**********'" in str(err.value) and message in str(err.value)
    assert value.strip() not in str(err.value) or not value.strip()  # the key itself is never printed


@pytest.mark.parametrize("toml,message", [
    ('[http]\nport = "18326"\n', "http.port = '18326' (from config file {path}) is invalid: must be an integer, "
                                 "not a string"),
    ('[ota]\nrequire_signature = "no"\n', "ota.require_signature = 'no' (from config file {path}) is invalid: "
                                          "must be true or false, not a string"),
    ('[cache]\npersist = 0\n', "cache.persist = 0 (from config file {path}) is invalid: must be true or false, "
                               "not an integer"),
    ('[sampling]\ntemperature = "0.5"\n', "sampling.temperature = '0.5' (from config file {path}) is invalid: "
                                          "must be a number, not a string"),
    ('[sampling]\ntop_k = 2.0\n', "sampling.top_k = 2.0 (from config file {path}) is invalid: must be an integer, "
                                  "not a float"),
    ('[device]\nid = 7\n', "device.id = 7 (from config file {path}) is invalid: must be a string, not an integer"),
    ('[mqtt]\nqos = "1"\n', "mqtt.qos = '1' (from config file {path}) is invalid: must be an integer, not a string"),
    ('[mqtt.tls]\ninsecure = "yes"\n', "mqtt.tls.insecure = 'yes' (from config file {path}) is invalid: "
                                       "must be true or false, not a string"),
    ('http = 3\n', "http = 3 (from config file {path}) is invalid: must be a table of settings, not an integer"),
])
def test_a_value_in_the_file_must_have_the_fields_type(tmp_path, toml, message):
    path = tmp_path / "typed.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert message.format(path=path) in str(err.value)


def test_a_string_in_the_file_never_turns_signature_checks_off(tmp_path, monkeypatch):
    path = tmp_path / "ota.toml"
    for text in ('"no"', '"false"', '"0"', "0"):
        path.write_text(f"[ota]\nrequire_signature = {text}\n")
        with pytest.raises(ConfigError, match="ota.require_signature"):
            load_config(path, {})
    path.write_text('[OTA]\nrequire_signature = "no"\n')  # section names are case-insensitive: checked too
    with pytest.raises(ConfigError, match="ota.require_signature = 'no'"):
        load_config(path, {})
    path.write_text("[ota]\nrequire_signature = false\n")
    assert load_config(path, {}).ota.require_signature is False  # a real TOML boolean does


def test_right_types_in_the_file_still_load(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('log_level = "WARNING"\n[model]\nprefill_graph = "only"\nthreads = 4\nslots_dir = "/srv/eg"\n'
                    '[batching]\nwindow_ms = 5\n[mqtt]\nprotocol = 5\nqos = 2\n[mqtt.tls]\ninsecure = true\n'
                    '[ota]\nrequire_signature = true\n')
    cfg = load_config(path, {})
    assert (cfg.log_level, cfg.model.prefill_graph, cfg.model.threads, str(cfg.model.slots_dir)) == (
        "warning", "only", 4, "/srv/eg")
    assert (cfg.batching.window_ms, cfg.mqtt.protocol, cfg.mqtt.qos, cfg.mqtt.tls.insecure) == (5.0, "5", 2, True)


def test_environment_variables_are_text_and_still_parsed(tmp_path, monkeypatch):
    path = tmp_path / "base.toml"
    path.write_text("[http]\nport = 9000\n[ota]\nrequire_signature = true\n")
    monkeypatch.setenv("EDGEGLM_HTTP__PORT", "9100")
    monkeypatch.setenv("EDGEGLM_OTA__REQUIRE_SIGNATURE", "false")
    monkeypatch.setenv("EDGEGLM_MODEL__BACKEND", "openvino")
    monkeypatch.setenv("EDGEGLM_MODEL__THREADS", "2")
    monkeypatch.setenv("EDGEGLM_MODEL__PREFILL_GRAPH", "true")
    monkeypatch.setenv("EDGEGLM_SAMPLING__TEMPERATURE", "0.5")
    monkeypatch.setenv("EDGEGLM_LOG_LEVEL", "DEBUG")
    cfg = load_config(path, {})
    assert (cfg.http.port, cfg.ota.require_signature, cfg.model.backend, cfg.model.threads) == (
        9100, False, "openvino", 2)
    assert (cfg.model.prefill_graph, cfg.sampling.temperature, cfg.log_level) == (True, 0.5, "debug")
    monkeypatch.setenv("EDGEGLM_MODEL__PREFILL_GRAPH", "only")
    assert load_config(path, {}).model.prefill_graph == "only"
    monkeypatch.setenv("EDGEGLM_MQTT__QOS", "2")  # refused before: text never matched the choices 0, 1, 2
    assert load_config(path, {}).mqtt.qos == 2


def test_mqtt_qos_above_2_is_refused(tmp_path):
    path = tmp_path / "qos.toml"
    path.write_text("[mqtt]\nqos = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert "mqtt.qos = 3" in str(err.value) and "is too large; allowed: 0 <= qos <= 2" in str(err.value), str(err.value)


@pytest.mark.parametrize("value,shown,tail", [('"maybe"', "'maybe'", ""), ("3", "3", ", not an integer")])
def test_prefill_graph_error_names_the_file_and_the_choices_once(tmp_path, value, shown, tail):
    path = tmp_path / "pg.toml"
    path.write_text(f"[model]\nprefill_graph = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    msg = str(err.value)
    assert msg == (f"invalid config: model.prefill_graph = {shown} (from config file {path}) is invalid: "
                   f'must be true, false, "auto" or "only"{tail}')


def test_a_union_error_from_the_environment_is_one_message(monkeypatch):
    monkeypatch.setenv("EDGEGLM_MODEL__PREFILL_GRAPH", "maybe")
    with pytest.raises(ConfigError) as err:
        load_config(None, {})
    assert str(err.value) == ("invalid config: model.prefill_graph = 'maybe' (from environment variable "
                              'EDGEGLM_MODEL__PREFILL_GRAPH) is invalid: must be true, false, "auto" or "only"')


def test_type_and_range_errors_are_reported_together(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('[http]\nport = 70000\nhost = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    msg = str(err.value)
    assert "http.host = 1 (from config file" in msg and "must be a string, not an integer" in msg
    assert "http.port = 70000 (from config file" in msg and "0 <= port <= 65535" in msg


def test_with_updates_takes_json_types_strictly():
    old = load_config(None, {})
    for desired, text in [({"ota": {"require_signature": "no"}}, "ota.require_signature = 'no' (from the "
                           "desired-config update) is invalid: must be true or false, not a string"),
                          ({"http.port": "18326"}, "http.port = '18326' (from the desired-config update) is "
                           "invalid: must be an integer, not a string"),
                          ({"sampling": {"max_tokens": 3.5}}, "sampling.max_tokens = 3.5 (from the desired-config "
                           "update) is invalid: must be an integer, not a fractional number")]:
        with pytest.raises(ConfigError) as err:
            with_updates(old, desired)
        assert text in str(err.value) and str(err.value).endswith("the running config is unchanged")
    new = with_updates(old, {"batching": {"window_ms": 5}, "cache": {"persist": False}, "log_level": "DEBUG",
                             "model": {"prefill_graph": "only"}, "mqtt": {"protocol": 5}})
    assert (new.batching.window_ms, new.cache.persist, new.log_level, new.model.prefill_graph) == (
        5.0, False, "debug", "only")
    assert old.ota.require_signature is True


@pytest.mark.parametrize("variable", ["EDGEGLM_MQTT", "EDGEGLM_DEVICE"])
def test_a_whole_section_from_the_environment_that_is_not_json_is_a_config_error(monkeypatch, variable):
    monkeypatch.setenv(variable, "oops")
    with pytest.raises(ConfigError, match=f"{variable} sets a whole section and must be a JSON object.*"
                                          f"{variable}__FIELD"):
        load_config(None)


@pytest.mark.parametrize("typo, setting", [("EDGEGLM_HTTP_API_KEY", "EDGEGLM_HTTP__API_KEY"),
                                           ("EDGEGLM_MQTT_PASSWORD", "EDGEGLM_MQTT__PASSWORD"),
                                           ("edgeglm_ota_require_signature", "EDGEGLM_OTA__REQUIRE_SIGNATURE"),
                                           ("EDGEGLM_DATABASE_PATH", "EDGEGLM_DATABASE__PATH")])  # the controller's
def test_a_setting_spelled_with_one_underscore_in_the_environment_is_refused_by_both_programs(monkeypatch, typo,
                                                                                              setting):
    """`EDGEGLM_HTTP_API_KEY=...` in agent.env (one underscore where two belong) was ignored without a word: the
    box ran without the API key its operator set. Other EDGEGLM_* variables (EDGEGLM_CACHE_DIR, top-level
    settings such as EDGEGLM_LOG_LEVEL, names that look like no setting) still pass."""
    from fleet.config import load_fleet_config

    monkeypatch.setenv(typo, "x")
    message = f"environment variable {typo} is not a setting (it would be ignored); the setting is {setting}, " \
              "with two underscores"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_fleet_config(None)
    monkeypatch.delenv(typo)
    for name, value in [("EDGEGLM_CACHE_DIR", "/tmp"), ("EDGEGLM_LOG_LEVEL", "debug"), ("EDGEGLM_FOO_BAR", "1"),
                        ("EDGEGLM_TEST_GPU_PROVIDER", "x")]:
        monkeypatch.setenv(name, value)
    assert load_config(None).log_level == "debug" and load_fleet_config(None).log_level == "debug"


@pytest.mark.parametrize("key, variable", [("ota.trusted_keys", "EDGEGLM_OTA__TRUSTED_KEYS"),
                                           ("model.bundle", "EDGEGLM_MODEL__BUNDLE"),
                                           ("mqtt.tls.ca_file", "EDGEGLM_MQTT__TLS__CA_FILE")])
def test_an_empty_path_is_refused_not_taken_as_the_working_directory(monkeypatch, tmp_path, key, variable):
    """`EDGEGLM_OTA__TRUSTED_KEYS=` in agent.env used to become Path("."): the service's working
    directory, which it can write, as the trust root."""
    monkeypatch.setenv(variable, "")
    with pytest.raises(ConfigError, match=f"{re.escape(key)} = '' \\(from environment variable {variable}\\) is "
                                          "invalid: is empty; set a path, or leave the setting out"):
        load_config(None)
    toml = tmp_path / "agent.toml"
    section, _, field = key.rpartition(".")
    toml.write_text(f'[{section}]\n{field} = ""\n')
    monkeypatch.delenv(variable)
    with pytest.raises(ConfigError, match="is empty; set a path"):
        load_config(toml)


def test_an_error_across_two_fields_names_the_variable_that_set_one(monkeypatch):
    monkeypatch.setenv("EDGEGLM_MQTT__PASSWORD", "x")
    with pytest.raises(ConfigError, match=r"mqtt \(from environment variable EDGEGLM_MQTT__PASSWORD\) is invalid: "
                                          "mqtt.password is set but mqtt.username is not"):
        load_config(None)


def test_the_agent_and_the_controller_ignore_each_others_variables_and_refuse_neithers(monkeypatch):
    """Both read EDGEGLM_*: with agent.env's variables in an operator's shell (EDGEGLM_HTTP__API_KEY, as
    docs/install.md writes it) every `edgeglm fleet ...` command failed ("http.api_key: Extra inputs are not
    permitted"), and the controller's (EDGEGLM_DATABASE__PATH) stopped the agent. A name neither has (a typo)
    is still refused; one both have (EDGEGLM_MQTT__HOST) applies to both."""
    from fleet.config import load_fleet_config

    for var in [v for v in os.environ if v.upper().startswith("EDGEGLM_")]:
        monkeypatch.delenv(var)
    for name, value in (("EDGEGLM_HTTP__API_KEY", "s3cret-key"), ("EDGEGLM_MQTT__ENABLED", "true"),
                        ("EDGEGLM_MODEL__BACKEND", "openvino"), ("EDGEGLM_DATABASE__PATH", "/srv/fleet.db"),
                        ("EDGEGLM_HTTP__METRICS_TOKEN_FILE", "/run/token"), ("EDGEGLM_ROLLBACK__KEY", "/k/rb.key"),
                        ("EDGEGLM_MQTT__HOST", "broker.lan")):
        monkeypatch.setenv(name, value)
    agent, fleet = load_config(), load_fleet_config()
    assert (agent.http.api_key.get_secret_value(), agent.mqtt.enabled, agent.model.backend) == \
        ("s3cret-key", True, "openvino")
    assert (str(fleet.database.path), str(fleet.http.metrics_token_file), str(fleet.rollback.key)) == \
        ("/srv/fleet.db", "/run/token", "/k/rb.key")
    assert agent.mqtt.host == fleet.mqtt.host == "broker.lan"
    monkeypatch.setenv("EDGEGLM_HTTP__APIKEY", "typo")
    for load in (load_config, load_fleet_config):
        with pytest.raises(ConfigError, match="apikey"):
            load()


@pytest.mark.parametrize("variable, value, words", [
    ("EDGEGLM_HTTP__PORT", "abc", "http.port = 'abc' (from environment variable EDGEGLM_HTTP__PORT) is invalid: must "
                                  "be an integer; allowed: 0 <= port <= 65535"),
    ("EDGEGLM_HTTP__PORT", "70000", "http.port = '70000' (from environment variable EDGEGLM_HTTP__PORT) is too large; "
                                    "allowed: 0 <= port <= 65535"),
    ("EDGEGLM_CACHE__MAX_MB", "nan", "cache.max_mb = 'nan' (from environment variable EDGEGLM_CACHE__MAX_MB) is "
                                     "invalid: must be a number, not NaN"),
    ("EDGEGLM_MQTT__ENABLED", "maybe", "mqtt.enabled = 'maybe' (from environment variable EDGEGLM_MQTT__ENABLED) is "
                                       "invalid: must be true or false"),
    ("EDGEGLM_HTTP__HOST", "", "http.host = '' (from environment variable EDGEGLM_HTTP__HOST) is invalid: must not "
                               "be empty"),  # was pydantic's "String should have at least 1 character"
    ("EDGEGLM_DEVICE__ID", "d" * 129, "(from environment variable EDGEGLM_DEVICE__ID) is invalid: must be at most "
                                      "128 characters long"),
])
def test_values_from_the_environment_are_refused_in_plain_words(monkeypatch, variable, value, words):
    """Values from the environment (text, parsed) were refused in pydantic's words: "Input should be a valid integer,
    unable to parse string as an integer", "Input should be less than or equal to 65535"; NaN was "too large"."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_config(None)
    assert words in str(err.value) and "Input should" not in str(err.value) and "String should" not in str(err.value)


def test_a_secret_in_a_file_every_user_may_read_is_warned_about(tmp_path, caplog):
    """agent.toml is 0644, and an `[mqtt] password` or `[http] api_key` written into it (its comments show where)
    was readable by every user of the box without a word; so was a client key left 0644."""
    import logging

    path = tmp_path / "agent.toml"
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    path.write_text('[mqtt]\nusername = "box7"\npassword = "s3cret"\n[http]\napi_key = "k3y-k3y-k3y-k3y"\n'
                    f'[mqtt.tls]\ncert_file = "{key}"\nkey_file = "{key}"\n')
    for mode, key_mode, expected in ((0o644, 0o644, 2), (0o640, 0o644, 1), (0o640, 0o600, 0)):
        path.chmod(mode)
        key.chmod(key_mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgeglm.agent"):
            load_config(path, {})
        lines = [r.getMessage() for r in caplog.records if "every user of this box may read it" in r.getMessage()]
        assert len(lines) == expected, lines
        if mode == 0o644:
            assert f"{path} holds mqtt.password and http.api_key" in lines[0] and "(mode 0644)" in lines[0]
            assert "agent.env" in lines[0] and "s3cret" not in " ".join(lines)
        if key_mode == 0o644:
            assert f"{key} holds the MQTT client's private key" in lines[-1]
