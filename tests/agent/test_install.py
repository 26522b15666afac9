"""`edgeglm agent install`: the layout under a staging prefix, the unit's hardening, the config
file, re-runs, errors, one real virtualenv, and the two sandbox choices measured on this machine
(W^X memory for OpenVINO, the system-call filter)."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.cli import main
from agent.config import AgentConfig, load_config
from agent.install import default_config_toml

ABSENT_USER = "edgeglm-test-absent"  # never created by these tests
UNIT = "etc/systemd/system/edgeglm-agent.service"
CONFIG = "etc/edgeglm/agent.toml"
IS_ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("EDGEGLM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def install(capsys):
    """Run `edgeglm agent install ARGS` in-process: (exit code, stdout, stderr)."""
    def run(*args):
        rc = main(["agent", "install", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture
def prefix(tmp_path):
    return tmp_path / "root"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys like Environment= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# --- layout --------------------------------------------------------------------------------------


def test_the_written_config_explains_each_setting_in_whole_sentences():
    """A comment wrapped over two lines above a field was joined with '; ' ("unset: the; trusted_keys
    authorise rollbacks too"); the probation settings are explained too."""
    text = default_config_toml()
    assert "unset: the trusted_keys authorise rollbacks too (one key role)\n# rollback_keys =" in text
    assert "# a committed model is on probation until it has served this long in one run of the agent; 0: no " \
           "probation\nprobation_s = 600.0" in text

def test_install_lays_out_the_box_and_says_what_next(install, prefix):
    rc, out, err = install("--prefix", prefix, "--user", ABSENT_USER, "--no-venv")
    assert rc == 0, err
    files = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir())
    assert files == [CONFIG, "etc/edgeglm/trusted-keys/README", UNIT]
    assert stat.S_IMODE((prefix / "etc/edgeglm/trusted-keys").stat().st_mode) == 0o755
    assert stat.S_IMODE((prefix / "var/lib/edgeglm").stat().st_mode) == 0o750
    assert "*.pub" in (prefix / "etc/edgeglm/trusted-keys/README").read_text()
    for done in ("created", "wrote"):
        assert f"{done} " in out
    # a staging prefix: the user is not created, the command is printed
    assert f"useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin " \
           f"{ABSENT_USER}" in out
    with pytest.raises(KeyError):
        pwd.getpwnam(ABSENT_USER)
    assert "systemctl daemon-reload && systemctl enable --now edgeglm-agent" in out
    assert "journalctl -u edgeglm-agent" in out
    assert "install -m 0644 fleet.pub /etc/edgeglm/trusted-keys/" in out


# --- the unit ------------------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
    "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
    "LockPersonality": "yes", "SystemCallFilter": "@system-service", "CapabilityBoundingSet": "",
    "ReadWritePaths": "/var/lib/edgeglm", "StateDirectory": "edgeglm", "ConfigurationDirectory": "edgeglm",
    "Restart": "on-failure", "KillSignal": "SIGTERM",
    "MemoryDenyWriteExecute": "no",  # OpenVINO's JIT: see test_openvino_cpu_plugin_needs_memory_made_executable
}


@pytest.fixture
def unit(install, prefix):
    rc, _, err = install("--prefix", prefix, "--user", ABSENT_USER, "--no-venv")
    assert rc == 0, err
    text = (prefix / UNIT).read_text()
    return text, parse_unit(text)["Service"]


@pytest.mark.parametrize("key,value", sorted(HARDENING.items()))
def test_unit_is_hardened(unit, key, value):
    _, service = unit
    assert service.get(key) == [value]


def test_unit_runs_as_the_service_user_and_stops_after_the_agent_deadline(unit):
    text, service = unit
    assert service["User"] == [ABSENT_USER] and service["Group"] == [ABSENT_USER]
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert re.fullmatch(r"\d+s", service["RestartSec"][0])
    assert int(service["TimeoutStopSec"][0].rstrip("s")) > 10  # the agent's shutdown deadline
    assert "ORT_DISABLE_TELEMETRY=1" in service["Environment"]
    assert service["EnvironmentFile"] == ["-/etc/edgeglm/agent.env"]
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "EDGEGLM_" in comments  # how to set settings through the environment
    assert "DeviceAllow=/dev/dri/renderD128" in comments and "PrivateDevices=no" in comments
    assert "OpenVINO" in comments and "JIT" in comments  # why MemoryDenyWriteExecute is off
    assert parse_unit(text)["Install"] == {"WantedBy": ["multi-user.target"]}


def test_unit_paths_are_those_of_the_box_not_of_the_prefix(unit, prefix):
    text, service = unit
    assert str(prefix) not in text
    assert service["ExecStart"] == [f"{sys.executable} -m agent.cli agent --config /etc/edgeglm/agent.toml"]
    assert Path(sys.executable).is_relative_to(sys.prefix)  # --no-venv: this venv's interpreter


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(unit, prefix):
    proc = subprocess.run(["systemd-analyze", "verify", str(prefix / UNIT)], capture_output=True, text=True,
                          cwd=prefix)
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"Unknown|Invalid|Failed|not executable|ignoring", proc.stdout + proc.stderr), \
        proc.stdout + proc.stderr


# --- the config file -----------------------------------------------------------------------------

def settings_of(model, dotted: str = "") -> tuple[list[str], list[str]]:
    """(tables, settings) of a config model, dotted: (["http", "mqtt.tls", ...], ["http.port", ...])."""
    tables, settings = [], []
    for name, info in model.model_fields.items():
        section = next((t for t in (info.annotation, *typing.get_args(info.annotation))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is None:
            settings.append(dotted + name)
            continue
        sub_tables, sub_settings = settings_of(section, f"{dotted}{name}.")
        tables += [dotted + name, *sub_tables]
        settings += sub_settings
    return tables, settings


def test_config_file_loads_as_the_defaults_and_names_every_setting(install, prefix):
    rc, _, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    path = prefix / CONFIG
    assert path.read_text() == default_config_toml()
    assert load_config(path).model_dump() == load_config(None).model_dump()
    text = path.read_text()

    tables, settings = settings_of(AgentConfig)
    for table in tables:
        assert re.search(rf"^(# )?\[{re.escape(table)}\]$", text, re.M), f"[{table}] is not in {path}"
    for dotted in settings:
        assert re.search(rf"^(# )?{dotted.rsplit('.', 1)[-1]} = ", text, re.M), f"{dotted} is not in {path}"
    assert "EDGEGLM_MQTT__PASSWORD" in text and "password = " in text  # a secret: advice, not a value
    # a setting that takes booleans and names lists them all (the note said only "auto", "only")
    assert re.search(r'^# one of: true, false, "auto", "only"\nprefill_graph = "auto"$', text, re.M)


def test_an_existing_config_is_kept_and_the_defaults_go_beside_it(install, prefix):
    mine = '[http]\nport = 9000\n'
    (prefix / "etc/edgeglm").mkdir(parents=True)
    (prefix / CONFIG).write_text(mine)
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    assert (prefix / CONFIG).read_text() == mine
    assert (prefix / (CONFIG + ".new")).read_text() == default_config_toml()
    assert re.search(r"kept +\S+/agent\.toml \(it exists and differs", out)
    assert "agent.toml.new" in out

    rc, out, _ = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0 and (prefix / CONFIG).read_text() == mine
    assert re.search(r"unchanged +\S+/agent\.toml\.new", out)

    latin1 = "# r\xe9glage du bo\xeetier\n[http]\nport = 9000\n".encode("latin-1")  # not UTF-8: kept too
    (prefix / CONFIG).write_bytes(latin1)
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    assert (prefix / CONFIG).read_bytes() == latin1 and re.search(r"kept +\S+/agent\.toml", out)


# --- re-runs and dry runs ------------------------------------------------------------------------

def test_a_rerun_changes_nothing(install, prefix):
    assert install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)[0] == 0
    before = snapshot(prefix)
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    assert snapshot(prefix) == before
    assert not re.search(r"^  (created|wrote|updated|set) ", out, re.M), out


def test_a_rerun_repairs_what_drifted(install, prefix):
    assert install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)[0] == 0
    (prefix / UNIT).write_text("[Service]\nExecStart=/bin/false\n")  # hand-edited: the installer owns it
    (prefix / "var/lib/edgeglm").chmod(0o777)
    rc, out, _ = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0
    assert "ProtectSystem=strict" in (prefix / UNIT).read_text()
    assert stat.S_IMODE((prefix / "var/lib/edgeglm").stat().st_mode) == 0o750
    assert re.search(r"updated +\S+edgeglm-agent\.service", out) and "mode 0777 -> 0750" in out


def test_a_file_it_would_rewrite_that_it_cannot_read_is_one_line(install, prefix):
    """A directory where agent.toml or the unit goes, or a unit file that is not UTF-8, ended the install in a
    traceback (IsADirectoryError, UnicodeDecodeError), exit 1."""
    assert install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)[0] == 0
    (prefix / UNIT).write_bytes(b"\xff\xfe not text")  # rewritten: the installer owns it
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    assert "ProtectSystem=strict" in (prefix / UNIT).read_text() and re.search(r"updated +\S+agent\.service", out)
    for where in (CONFIG, UNIT):
        (prefix / where).unlink()
        (prefix / where).mkdir()
        rc, _, err = install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)
        assert rc == 2 and err.strip().endswith(f"{prefix / where} exists and is not a file: move it away and "
                                                "re-run") and "Traceback" not in err, err
        assert (prefix / where).is_dir()  # left as it was
        (prefix / where).rmdir()
        assert install("--prefix", prefix, "--no-venv", "--user", ABSENT_USER)[0] == 0


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv to make a file "
                    "another user cannot read")
def test_a_rerun_as_another_user_who_cannot_read_the_config_is_one_line(tmp_path):
    """The prefix is the user's, but agent.toml in it is root's 0600 (an earlier install by root): PermissionError
    traceback."""
    parent = Path(tempfile.mkdtemp(prefix="edgeglm-rerun-"))
    prefix = parent / "root"
    nobody = pwd.getpwnam("nobody")
    cmd = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", sys.executable,
           "-m", "agent.cli", "agent", "install", "--prefix", str(prefix), "--no-venv", "--user", ABSENT_USER]
    try:
        os.chown(parent, nobody.pw_uid, nobody.pw_gid)
        first = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert first.returncode == 0, first.stderr
        (prefix / CONFIG).write_text("# the operator's\n")
        os.chown(prefix / CONFIG, 0, 0)
        (prefix / CONFIG).chmod(0o600)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{prefix / CONFIG}: Permission denied; fix it and re-run" in proc.stderr
        assert (prefix / CONFIG).read_text() == "# the operator's\n"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_dry_run_changes_nothing(install, prefix):
    rc, out, err = install("--prefix", prefix, "--dry-run", "--user", ABSENT_USER)  # with the default venv
    assert rc == 0, err
    assert not prefix.exists()
    assert "dry run, nothing is changed" in out
    assert re.search(rf"would create +{re.escape(str(prefix))}/opt/edgeglm/venv ", out)
    assert re.search(r"would install +edgeglm from", out)
    assert re.search(r"would write +\S+/edgeglm-agent\.service", out)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: the user is created only by root installing into /")
def test_root_installing_into_slash_would_create_the_user(install):
    before = [Path(p).exists() for p in ("/etc/edgeglm", "/var/lib/edgeglm", "/" + UNIT)]
    rc, out, err = install("--prefix", "/", "--dry-run", "--no-venv", "--user", ABSENT_USER)
    assert rc == 0, err
    assert re.search(rf"would run +useradd --system .* {ABSENT_USER}$", out, re.M)
    assert "create the service user" not in out  # it is done, not left as a next step
    assert [Path(p).exists() for p in ("/etc/edgeglm", "/var/lib/edgeglm", "/" + UNIT)] == before
    with pytest.raises(KeyError):
        pwd.getpwnam(ABSENT_USER)


@pytest.mark.skipif(not IS_ROOT, reason="needs root: only root can give the state directory to the service user")
def test_state_dir_is_owned_by_the_service_user_of_the_staged_box(install, prefix):
    """Staging a box image: its users are those of PREFIX/etc/passwd (the build host's uid and group were given
    to the staged state dir and written into the unit, and the useradd step was left out)."""
    (prefix / "etc").mkdir(parents=True)
    (prefix / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nedge:x:4321:4322::/nonexistent:/usr/sbin/nologin\n")
    (prefix / "etc/group").write_text("root:x:0:\nedgegrp:x:4322:\n")
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", "edge")
    assert rc == 0, err
    st = (prefix / "var/lib/edgeglm").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o750)
    assert (prefix / CONFIG).stat().st_uid == 0  # the service reads its config, never writes it
    service = parse_unit((prefix / UNIT).read_text())["Service"]
    assert (service["User"], service["Group"]) == (["edge"], ["edgegrp"])
    assert re.search(rf"exists +user edge in {re.escape(str(prefix / 'etc/passwd'))} \(uid 4321, group edgegrp\)",
                     out) and "useradd" not in out, out


def test_a_staged_box_without_the_user_gets_the_useradd_step_whatever_this_host_has(install, prefix):
    nobody = pwd.getpwnam("nobody")  # this host has it; the staged tree has no etc/passwd
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", "nobody")
    assert rc == 0, err
    assert "create the service user on the box: useradd " in out, out
    assert (prefix / "var/lib/edgeglm").stat().st_uid != nobody.pw_uid or not IS_ROOT
    service = parse_unit((prefix / UNIT).read_text())["Service"]
    assert (service["User"], service["Group"]) == (["nobody"], ["nobody"])  # useradd --user-group's


def test_a_venv_path_that_is_no_virtualenv_is_refused(install, prefix):
    """`--venv` on a data directory had a virtualenv written into it; one whose bin/python linked to the system's
    pip-installed into the system interpreter; a file got a hint to install python3-venv."""
    data = prefix / "srv/data"
    data.mkdir(parents=True)
    (data / "keep.txt").write_text("mine")
    (prefix / "opt").mkdir()
    (prefix / "opt/afile").write_text("x")
    for venv, why in (("/srv/data", "is a directory with other files and no pyvenv.cfg"),
                      ("/opt/afile", "is not a directory")):
        for dry in ([], ["--dry-run"]):
            rc, out, err = install("--prefix", prefix, "--venv", venv, *dry)
            assert rc == 2 and f"--venv {venv}: {prefix / venv.lstrip('/')} {why}" in err, err
    assert sorted(p.name for p in data.iterdir()) == ["keep.txt"]


def test_a_failing_command_says_its_own_error_line():
    """pip's cause (`ERROR: No matching distribution found for ...`) comes before its closing notes: only the
    notes were kept ("See above for output"), with nothing above."""
    from agent.install import InstallError, _run

    script = ("import sys; print('ERROR: No matching distribution found for setuptools>=77', file=sys.stderr); "
              "[print(line, file=sys.stderr) for line in ('note: this error originates from a subprocess', "
              "'See above for output.', 'hint: see above')]; sys.exit(1)")
    with pytest.raises(InstallError, match=r"pip install failed \(exit 1\): ERROR: No matching distribution found "
                                           r"for setuptools>=77; fix it"):
        _run([sys.executable, "-c", script], "pip install")


@pytest.mark.skipif(not IS_ROOT, reason="needs root: only root can give the state directory to the service user")
def test_a_state_dir_left_by_root_is_given_to_the_service_user_whole(install, prefix):
    """A state dir left by `sudo edgeglm agent` (autotune/, prefix-cache/, slots owned by root): the installer gave
    only the top to the service user, and systemd's StateDirectory= fixes the contents only when the top is wrong,
    so the agent could write none of its updates, caches or records. Links are given as links, never followed."""
    nobody = pwd.getpwnam("nobody")
    (prefix / "etc").mkdir(parents=True)  # the staged box's users (this host's are not looked at)
    (prefix / "etc/passwd").write_text(f"nobody:x:{nobody.pw_uid}:{nobody.pw_gid}::/nonexistent:/usr/sbin/nologin\n")
    (prefix / "etc/group").write_text(f"nogroup:x:{nobody.pw_gid}:\n")
    state = prefix / "var/lib/edgeglm"
    (state / "autotune").mkdir(parents=True)
    (state / "autotune" / "cache.json").write_text("{}")
    (state / "slots" / "a").mkdir(parents=True)
    outside = prefix / "outside"
    outside.write_text("root's")
    (state / "current").symlink_to(outside)
    os.link(outside, state / "hard")  # a second name of a file outside: never given away
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", "nobody")
    assert rc == 0, err
    assert re.search(r"owner of 5 entries inside -> nobody:", out), out
    for entry in [state, *state.rglob("*")]:
        st = entry.lstat()
        if entry.name != "hard":
            assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), entry
    assert outside.stat().st_uid == 0  # the links' target is not the state dir's
    rc, out, err = install("--prefix", prefix, "--no-venv", "--user", "nobody")  # a re-run: nothing to give
    assert rc == 0 and "entries inside" not in out, out


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--user", "root", "--no-venv"], "must not run as root"),
    (["--user", "Bad User", "--no-venv"], "not a valid system user name"),
    (["--venv", "opt/venv"], "--venv opt/venv: give an absolute path"),
    (["--venv", "/opt/v", "--no-venv"], "--venv and --no-venv exclude each other"),
    (["--wheel-or-source", "edgeglm[factory]"], "the factory extra (torch) is for the build host"),
    (["--wheel-or-source", "./no-such-edgeglm.whl"], "./no-such-edgeglm.whl: no such file or directory"),
    (["--wheel-or-source", "./edgeglm.whl", "--no-venv"], "--wheel-or-source and --no-venv exclude each other"),
])
def test_option_errors(install, prefix, args, fragment):
    rc, out, err = install("--prefix", prefix, *args)
    assert rc == 2 and out == ""
    assert err.startswith("edgeglm agent: error: ") and fragment in err
    assert not prefix.exists()


def test_prefix_that_is_a_file(install, tmp_path):
    (tmp_path / "file").write_text("")
    rc, _, err = install("--prefix", tmp_path / "file" / "root", "--no-venv")
    assert rc == 2 and f"{tmp_path / 'file'} is not a directory" in err


def test_an_empty_prefix_is_refused_not_the_current_directory(install, tmp_path, monkeypatch):
    """`--prefix ''` staged a box tree (etc/, var/) into the directory the shell stood in, without a word."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = install("--prefix", "", "--no-venv")
    assert rc == 2 and out == "" and "--prefix '': an empty path" in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_prefix(tmp_path):
    parent = Path(tempfile.mkdtemp(prefix="edgeglm-ro-"))  # /tmp: reachable for an unprivileged user
    cmd = [sys.executable, "-m", "agent.cli", "agent", "install", "--prefix", str(parent / "root"), "--no-venv"]
    if IS_ROOT:  # root may write anywhere: run it as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux) to drop to nobody")
        nobody = pwd.getpwnam("nobody")
        cmd = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *cmd]
    parent.chmod(0o555)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert proc.returncode == 2, proc.stderr
        assert f"{parent} is not writable by" in proc.stderr and "nothing was changed" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (parent / "root").exists()
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)


# --- a real virtualenv -------------------------------------------------------------------------------

def test_real_venv_without_the_factory_extra_moves_to_its_place_on_the_box(install, tmp_path):
    """pip installs this source tree into a fresh venv (about 35 s here, from the local package index)."""
    if subprocess.run([sys.executable, "-c", "import ensurepip"], capture_output=True).returncode != 0:
        pytest.skip("this Python has no ensurepip: apt-get install python3-venv")
    stage, box = tmp_path / "stage", tmp_path / "box"
    target = box / "venv"  # the venv's path "on the box": here a real path, so it can be run after the move
    rc, out, err = install("--prefix", stage, "--venv", target, "--user", ABSENT_USER)
    assert rc == 0, err
    staged = stage / target.relative_to("/")
    script = (staged / "bin/edgeglm").read_text()  # "#!python" or, for a long path, a /bin/sh trampoline
    assert f"{target}/bin/python" in "\n".join(script.splitlines()[:2]) and str(stage) not in script
    service = parse_unit((stage / UNIT).read_text())["Service"]
    assert service["ExecStart"] == [f"{target}/bin/edgeglm agent --config /etc/edgeglm/agent.toml"]

    box.mkdir()
    staged.rename(target)  # what copying the staged tree onto the box does
    version = subprocess.run([target / "bin/edgeglm", "--version"], capture_output=True, text=True, cwd="/")
    assert version.returncode == 0 and version.stdout.startswith("edgeglm "), version.stderr
    no_torch = subprocess.run([target / "bin/python", "-c", "import importlib.util as u, agent.install; "
                               "print(u.find_spec('torch') is None, agent.install.__file__)"],
                              capture_output=True, text=True, cwd="/")
    is_none, where = no_torch.stdout.split()
    assert is_none == "True", "the edge venv must not have torch"
    assert Path(where).is_relative_to(target)  # the venv's copy, not this source tree


# --- the sandbox, measured -------------------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1  # Linux >= 6.3: what MemoryDenyWriteExecute= does

MDWE_SCRIPT = """
import ctypes, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper, save
assert ctypes.CDLL(None).prctl(%d, %d, 0, 0, 0) == 0
w = numpy_helper.from_array(np.random.rand(64, 64).astype(np.float32), "w")
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
save(model, sys.argv[2])
x = np.ones((8, 64), np.float32)
if sys.argv[1] == "onnxruntime":
    import onnxruntime as ort
    ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"]).run(None, {"x": x})
else:
    import openvino as ov
    ov.Core().compile_model(sys.argv[2], "CPU")({"x": x})
""" % (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)


def test_openvino_cpu_plugin_needs_memory_made_executable(tmp_path):
    """Why the unit leaves MemoryDenyWriteExecute off: under W^X OpenVINO cannot run, ONNX Runtime can."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    results = {}
    for backend in ("onnxruntime", "openvino"):
        proc = subprocess.run([sys.executable, "-c", MDWE_SCRIPT, backend, str(tmp_path / "m.onnx")],
                              capture_output=True, text=True, timeout=120)
        results[backend] = (proc.returncode, proc.stderr.strip().splitlines()[-1:] if proc.stderr else [])
    assert results["onnxruntime"][0] == 0, results
    assert results["openvino"][0] != 0, f"OpenVINO ran under W^X: the unit could turn it on now; {results}"


def _expand_syscall_group(group: str, seen: set[str]) -> set[str]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item.startswith("@") and item not in seen:
            seen.add(item)
            names |= _expand_syscall_group(item, seen)
        elif item and not item.startswith(("#", "@")):
            names.add(item)
    return names


GENERATE_SCRIPT = """
import sys, tempfile
from pathlib import Path
from agent.model import choose_path, load_model
from ota.bundle import open_bundle
from runtime.generate import SamplingParams, generate
from runtime.probe import probe_hardware
probe_hardware()
for backend in ("onnxruntime", "openvino"):
    model = load_model(sys.argv[1], backend)
    prompt = model.tokenizer.encode("def main():").ids
    print(backend, list(generate(model.engine, prompt, SamplingParams(max_tokens=4))))
path, tuning = choose_path(open_bundle(sys.argv[1]), "auto", threads=1, cache_dir=Path(tempfile.mkdtemp()))
print("autotune", path.describe(), sum(t.status == "measured" for t in tuning.trials))
"""


@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("systemd-analyze") is None,
                    reason="needs strace and systemd-analyze")
def test_inference_stays_inside_the_units_system_call_filter(int8_bundle, tmp_path):
    """Every system call of probing, loading and generating with both backends, and of the autotune's
    measuring child process (strace -f follows it), is in @system-service."""
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-c", GENERATE_SCRIPT,
                           str(int8_bundle)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0 and "openvino [" in proc.stdout, proc.stderr[-2000:]
    measured = re.search(r"^autotune .+ (\d+)$", proc.stdout, re.M)
    assert measured and int(measured.group(1)) >= 2, proc.stdout  # measured in the child, under strace too
    used = set(re.findall(r"^\d+ +([a-z_0-9]+)\(", trace.read_text(), re.M))
    assert len(used) > 20, used  # the trace was read
    allowed = _expand_syscall_group("@system-service", set())
    assert used - allowed == set()


def _dist_info(site: Path, url: str) -> None:
    """An installed edgeglm's metadata as pip writes it, with its PEP 610 direct_url.json."""
    info = site / "edgeglm-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgeglm\nVersion: 0.1.0\n")
    (info / "direct_url.json").write_text(f'{{"url": "{url}", "dir_info": {{}}}}')


def test_an_edgeglm_installed_from_a_local_tree_is_installed_again_from_it(tmp_path):
    """`pip install ./edgeglm` (not -e) leaves no source tree beside the code: `agent install` then asked the
    package index for edgeglm==0.1.0, which has none, and failed. It now reads where pip took it from."""
    from agent.install import installed_from

    src = tmp_path / "my src"  # a space: the URL is percent-encoded
    src.mkdir()
    _dist_info(tmp_path / "site", src.as_uri())
    assert installed_from([str(tmp_path / "site")]) == str(src)
    src.rmdir()  # the tree is gone: nothing to install from locally
    assert installed_from([str(tmp_path / "site")]) is None
    _dist_info(tmp_path / "site2", "https://example.invalid/edgeglm-0.1.0.tar.gz")
    assert installed_from([str(tmp_path / "site2")]) is None
    assert installed_from([str(tmp_path / "empty")]) is None
