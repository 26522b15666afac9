"""`fleet config set` and the agent refuse the same desired configs: both use agent/remote_config.py,
which loads no model runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.config import AgentConfig, with_updates
from agent.errors import ConfigError
from agent.remote_config import REMOTE_SETTINGS, local_only_keys, named_keys, remote_config_problems
from fleet.config import check_desired_config

# one change per setting family; values valid for the schema and different from the defaults
UPDATES = [
    {"sampling": {"top_k": 5}}, {"sampling": {"max_tokens": 64, "temperature": 0.5}}, {"batching": {"max_batch": 2}},
    {"telemetry": {"interval_s": 60}}, {"log_level": "debug"}, {"cache": {"max_mb": 8}}, {"cache": {"persist": False}},
    {"cache": {"block_tokens": 64}}, {"ota": {"give_up_s": 60}}, {"ota": {"chunk_timeout_s": 5}},
    {"ota": {"max_latency_ratio": 2.0}}, {"ota": {"min_latency_delta_ms": 3.0}},
    # local-only: a section check (device/mqtt/http/model) let the ota and cache ones through
    {"ota": {"require_signature": False}}, {"ota": {"trusted_keys": "/tmp/evil-keys"}},
    {"cache": {"persist_dir": "/tmp/elsewhere"}}, {"http": {"port": 9000}}, {"mqtt": {"host": "evil.example"}},
    {"model": {"backend": "onnxruntime"}}, {"device": {"id": "other"}},
    {"sampling": {"top_k": 5}, "ota": {"require_signature": False}},
]


def _base() -> AgentConfig:
    return AgentConfig.model_validate({"device": {"id": "box-1", "fleet": "f"}})


def _agent_refuses(update: dict) -> bool:
    """What agent/daemon.py Agent._apply_desired does with `update` on an agent with the default config."""
    base = _base()
    try:
        new = with_updates(base, update)
    except ConfigError:
        return True
    return bool(remote_config_problems(base, base, new))


def _fleet_refuses(update: dict) -> bool:
    try:
        check_desired_config(update)
    except ConfigError:
        return True
    return False


@pytest.mark.parametrize("update", UPDATES, ids=lambda u: ",".join(named_keys(u)))
def test_fleet_config_set_refuses_exactly_what_the_agent_refuses(update):
    assert _fleet_refuses(update) == _agent_refuses(update)


def test_the_local_only_settings_are_named():
    with pytest.raises(ConfigError, match=r"^ota\.require_signature, cache\.persist_dir: local-only") as exc:
        check_desired_config({"ota": {"require_signature": False}, "cache": {"persist_dir": "/x", "max_mb": 1}})
    assert "nothing was published" in str(exc.value) and ", ".join(REMOTE_SETTINGS) in str(exc.value)
    assert local_only_keys({"sampling": {"top_k": 1}, "cache": {"max_mb": 1}}) == []


def test_daemon_uses_the_same_allowlist():
    """agent/daemon.py imports the rules (it is not imported here: it loads the model runtime)."""
    source = open("agent/daemon.py", encoding="utf-8").read()
    assert "from agent.remote_config import" in source and "REMOTE_SETTINGS = (" not in source


def test_remote_config_and_the_fleet_check_load_no_model_runtime():
    code = ("import sys, agent.remote_config, fleet.config; fleet.config.check_desired_config({'sampling': "
            "{'top_k': 3}}); heavy = [m for m in ('torch', 'onnxruntime', 'openvino', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
