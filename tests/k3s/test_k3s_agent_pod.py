"""The agent pod's own commands, run here: the exec probes against a real `edgeglm agent`, and the
start script that hands the device's MQTT password to the agent."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from k3s_manifests import containers, find, rendered

from broker import free_port

WAIT = 20.0
PROBE_TIMEOUT = 10.0
API = "http://127.0.0.1:8321"


def _agent_container() -> dict:
    (c,) = [c for c in containers(find(rendered("base"), "DaemonSet", "edgeglm-agent")) if c["name"] == "agent"]
    return c


def _probe(kind: str, port: int) -> subprocess.CompletedProcess:
    command = list(_agent_container()[kind]["exec"]["command"])
    assert command[0] == "python"
    command[0] = sys.executable
    command[-1] = command[-1].replace(API, f"http://127.0.0.1:{port}")
    return subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT)


@contextmanager
def running_agent(state: Path, ready, what: str):
    """`edgeglm agent` with MQTT off on `state`, once `ready(port)` holds (it polls the API; OSError: not yet):
    its port. Stopped on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("EDGEGLM_")}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "agent", "--port", str(port), "--state-dir", str(state)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if ready(port):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"edgeglm agent: {what}: {proc.communicate()[1]}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def agent_without_a_model(tmp_path_factory):
    """`edgeglm agent` with no model yet (a box before its first OTA update), MQTT off."""
    with running_agent(tmp_path_factory.mktemp("agent-state"),
                       lambda port: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1),
                       "no answer to /healthz") as port:
        yield port


def test_liveness_probe_passes_while_the_api_answers(agent_without_a_model):
    result = _probe("livenessProbe", agent_without_a_model)
    assert result.returncode == 0, result.stderr


def test_readiness_probe_passes_on_a_box_waiting_for_its_first_model(agent_without_a_model):
    """A DaemonSet rolling update counts an unready new pod as unavailable: with readiness on plain /readyz,
    boxes still waiting for their first model stalled every agent upgrade at maxUnavailable. The probe passes
    while no model is installed at all; plain /readyz still says no model serves."""
    result = _probe("readinessProbe", agent_without_a_model)
    assert result.returncode == 0, result.stderr
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{agent_without_a_model}/readyz", timeout=5)
        raise AssertionError("/readyz answered 200 with no model")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503


def test_readiness_probe_fails_when_the_installed_model_does_not_serve(tmp_path):
    """A box whose installed model is refused (here: damaged) is not ready, so an agent image that cannot serve
    the fleet's models stops its own rollout; the failure is one line for the pod's events."""
    state = tmp_path / "state"
    (state / "slots" / "a").mkdir(parents=True)
    (state / "slots" / "a" / "manifest.json").write_text("{not json")
    os.symlink("slots/a", state / "current")

    def refused(port) -> bool:  # decided before the API answers /readyz with its reason
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
        except urllib.error.HTTPError as exc:
            return "the model in slot a cannot be served" in json.loads(exc.read())["reason"]
        raise AssertionError("/readyz answered 200 with a damaged model")

    with running_agent(state, refused, "it did not refuse its damaged model") as port:
        result = _probe("readinessProbe", port)
    assert result.returncode == 1
    assert result.stderr.strip() == "/readyz: HTTP Error 503: Service Unavailable", "one line for the pod's events"


def test_the_agent_pod_gives_the_runtimes_no_home_and_turns_their_telemetry_off():
    """With a writable $HOME (the pod's /tmp) ONNX Runtime and OpenVINO keep telemetry ids there, and
    `import openvino` looks up a usage-statistics host; the NetworkPolicy lets DNS out."""
    env = {e["name"]: e.get("value") for e in _agent_container()["env"]}
    assert env["HOME"] == "/nonexistent" and env["ORT_DISABLE_TELEMETRY"] == "1"
    assert env["EDGEGLM_CACHE_DIR"].startswith("/tmp/")  # the pod's emptyDir: `kubectl exec ... edgeglm probe`
    image = (Path(__file__).resolve().parents[2] / "k3s" / "images" / "agent.Containerfile").read_text()
    assert "HOME=/nonexistent" in image and "ORT_DISABLE_TELEMETRY=1" in image


def test_probes_fail_when_nothing_listens():
    result = _probe("livenessProbe", free_port())
    assert result.returncode == 1 and result.stderr.startswith("/healthz: "), result.stderr


@contextmanager
def answering(status: int):
    """A stand-in agent that answers every request with `status`: its port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck(port: int) -> subprocess.CompletedProcess:
    """The agent image's HEALTHCHECK command against `port`."""
    image = (Path(__file__).resolve().parents[2] / "k3s" / "images" / "agent.Containerfile").read_text()
    command = json.loads(re.search(r"^\s*CMD (\[.*\])$", image.split("HEALTHCHECK", 1)[1], re.M).group(1))
    assert command[0] == "python"
    command[0] = sys.executable
    command[-1] = command[-1].replace(API, f"http://127.0.0.1:{port}")
    return subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT)


def test_liveness_passes_on_any_answer_so_a_busy_agent_is_not_restarted():
    """The liveness probe failed on any HTTP error: an agent at http.max_connections (idle keep-alive clients
    hold their connections for 60 s) answered 503, and the kubelet restarted it, cutting every generation.
    An answer is life, whatever its status; readiness still wants a 200."""
    for status in (503, 500, 404):
        with answering(status) as port:
            assert _probe("livenessProbe", port).returncode == 0, status
            assert _healthcheck(port).returncode == 0, status
            result = _probe("readinessProbe", port)
            assert result.returncode == 1 and result.stderr.startswith("/readyz: HTTP Error"), result.stderr


def test_liveness_fails_when_the_process_does_not_answer():
    """A stuck agent: its port takes the connection (the kernel's backlog), nothing answers; so does nothing at all."""
    with socket.create_server(("127.0.0.1", 0)) as stuck:
        port = stuck.getsockname()[1]
        result = _probe("livenessProbe", port)
        assert result.returncode == 1 and result.stderr.startswith("/healthz: "), result.stderr
        assert _healthcheck(port).returncode != 0
    assert _healthcheck(free_port()).returncode != 0


# --- the start script ------------------------------------------------------------------------------

PASSWORD_FILE = "/etc/edgeglm/device/mqtt-password"


def _run_start_script(tmp_path: Path, device: str, password: str | None) -> subprocess.CompletedProcess:
    """The container's command with the box's password file (None: not written) moved into tmp_path
    and a stand-in `edgeglm` first on PATH that prints what it was given."""
    box = tmp_path / "etc-edgeglm-device"
    box.mkdir()
    if password is not None:
        (box / "mqtt-password").write_text(password)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgeglm"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "password: $EDGEGLM_MQTT__PASSWORD"\n')
    fake.chmod(0o755)
    c = _agent_container()
    script = c["args"][0]
    assert PASSWORD_FILE in script
    command = [*c["command"], script.replace(PASSWORD_FILE, str(box / "mqtt-password"))]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "EDGEGLM_DEVICE__ID": device}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT)


def test_start_script_exports_this_devices_password_and_runs_the_agent(tmp_path):
    # as `openssl rand -hex 24 > file` writes it: the trailing newline is not part of the password
    result = _run_start_script(tmp_path, "box-1", "s3cret $x 'q'\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["argv: agent --config /etc/edgeglm/agent.toml", "password: s3cret $x 'q'"]


@pytest.mark.parametrize("password", [None, ""], ids=["missing", "empty"])
def test_start_script_names_the_file_to_write_on_the_box(tmp_path, password):
    result = _run_start_script(tmp_path, "box-9", password)
    assert result.returncode == 2
    assert "no MQTT password for device 'box-9'" in result.stderr
    assert "/etc/edgeglm-device/mqtt-password on node box-9" in result.stderr
    assert result.stdout == ""
