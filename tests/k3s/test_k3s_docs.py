"""docs/deploy-k3s.md: the commands it quotes are the ones the manifests run, and its certificate
and password steps, run as written, give what the manifests need."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest
from k3s_manifests import REPO, find, kustomizations, rendered

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DOC = REPO / "docs" / "deploy-k3s.md"


def _block(text: str, first: str, last: str) -> str:
    """The lines from the one equal to `first` to the next equal to `last`, both included."""
    lines = text.splitlines()
    start = lines.index(first)
    end = lines.index(last, start)
    return "\n".join(lines[start:end + 1]) + "\n"


def test_documented_commands_are_the_manifests_commands():
    doc = DOC.read_text()
    resources = rendered("base")
    (controller,) = find(resources, "Deployment", "edgeglm-controller")["spec"]["template"]["spec"]["containers"]
    assert shlex.join(controller["command"]) in doc
    (agent,) = find(resources, "DaemonSet", "edgeglm-agent")["spec"]["template"]["spec"]["containers"]
    assert agent["args"][0].strip().splitlines()[-1].strip().removeprefix("exec ") in doc
    for overlay in kustomizations()[1:]:
        assert f"kubectl apply -k k3s/{overlay}" in doc or f"`k3s/{overlay}`" in doc, overlay
    assert "edgeglm fleet rollout --config /etc/edgeglm/fleet.toml" in doc and "--canary 10" in doc
    assert "edgeglm fleet status --config /etc/edgeglm/fleet.toml" in doc
    # the documented controller commands parse with the real CLI
    from agent.cli import build_parser

    rollout = build_parser().parse_args(["fleet", "rollout", "--config", "/etc/edgeglm/fleet.toml", "--bundle", "b",
                                         "--group", "default", "--canary", "10"])
    assert rollout.group == "default" and rollout.canary == 10.0


def test_certificate_steps_give_a_broker_certificate_for_the_service_name(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    script = _block(DOC.read_text(), "mkdir -p pki && cd pki", "cd ..")
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True, capture_output=True)
    text = subprocess.run(["openssl", "x509", "-in", "pki/broker.crt", "-noout", "-ext", "subjectAltName"],
                          cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    agent = tomllib.loads(find(rendered("base"), "ConfigMap", "edgeglm-agent-config")["data"]["agent.toml"])
    assert f"DNS:{agent['mqtt']['host']}" in text, text


def test_password_steps_give_a_line_per_user(tmp_path):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    script = _block(DOC.read_text(), "mkdir -p pki/devices", "done")
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True, capture_output=True)
    users = [line.split(":", 1)[0] for line in (tmp_path / "pki/passwords").read_text().splitlines()]
    fleet = tomllib.loads(find(rendered("base"), "ConfigMap", "edgeglm-controller-config")["data"]["fleet.toml"])
    assert users[0] == fleet["mqtt"]["username"]
    assert sorted(p.name for p in (tmp_path / "pki/devices").iterdir()) == users[1:]
