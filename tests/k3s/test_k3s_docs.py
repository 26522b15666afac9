"""docs/deploy-k3s.md: the commands it quotes are the ones the manifests run, and its certificate
and password steps, run as written, give what the manifests need."""

from __future__ import annotations

import re
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
    configs = find(rendered("base"), "ConfigMap", "edgeglm-controller-config")["data"]
    serve, cli = (tomllib.loads(configs[key])["mqtt"]["username"] for key in ("fleet.toml", "fleet-cli.toml"))
    assert users[:2] == [serve, cli]  # the controller, the operator commands
    assert sorted(p.name for p in (tmp_path / "pki/devices").iterdir()) == users[2:]
    # each clear password file goes into its Secret, as the Secret's template says
    doc = DOC.read_text()
    for secret, file in (("edgeglm-controller-mqtt", "controller.password"),
                         ("edgeglm-operator-mqtt", "operator.password")):
        assert (tmp_path / "pki" / file).read_text().strip()
        command = f"kubectl -n edgeglm create secret generic {secret} --from-file=password=pki/{file}"
        assert command in doc
        assert any(command in p.read_text() for p in (REPO / "k3s" / "secrets").glob("*.yaml")), command


def _fleet_commands(text: str) -> list[list[str]]:
    """Every `edgeglm fleet ...` run with `kubectl exec` in the page's bash blocks (continuation lines joined),
    as argv from `edgeglm` on."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "kubectl" in line and " exec " in line and "edgeglm fleet " in line:
                argv = shlex.split(line)
                start = next(i for i in range(len(argv) - 1) if argv[i:i + 2] == ["edgeglm", "fleet"])
                out.append(argv[start:])
    return out


# they publish through a short MQTT connection of their own: with use_username_as_clientid it must not be
# the serving controller's user, so they take fleet-cli.toml (user edgeglm-operator); the others only touch
# the database
PUBLISHING = {("offer",), ("config", "set"), ("rollback",), ("device", "remove")}


def test_documented_operator_commands_take_the_operator_config():
    from agent.cli import build_parser

    commands = _fleet_commands(DOC.read_text())
    seen = set()
    for argv in commands:
        words = tuple(argv[2:4]) if argv[2] in ("config", "device") else (argv[2],)
        config = argv[argv.index("--config") + 1]
        build_parser().parse_args(argv[1:])  # each parses with the real CLI
        if words in PUBLISHING:
            seen.add(words)
            assert config == "/etc/edgeglm/fleet-cli.toml", shlex.join(argv)
        else:
            assert config in ("/etc/edgeglm/fleet.toml", "/etc/edgeglm/fleet-cli.toml"), shlex.join(argv)
    assert seen == PUBLISHING, f"no kubectl exec example of {sorted(PUBLISHING - seen)}"
