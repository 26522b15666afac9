"""`edgeglm agent install`: lay out an edge box for the agent as a systemd service.

    edgeglm agent install [--prefix DIR] [--user edgeglm] [--venv PATH] [--wheel-or-source SPEC]
                          [--no-venv] [--dry-run]

What goes where (paths on the box; with --prefix they are written under PREFIX):

    /opt/edgeglm/venv/                         virtualenv with edgeglm, without the factory extra (no torch)
    /etc/edgeglm/agent.toml                    the defaults, commented; an existing file is never replaced:
                                               the new one goes beside it as agent.toml.new
    /etc/edgeglm/trusted-keys/                 0755, public keys (*.pub) that may sign bundles
    /var/lib/edgeglm/                          0750, owned by the service user: model slots, update state
    /etc/systemd/system/edgeglm-agent.service  the hardened unit

PREFIX works like DESTDIR: files go under it, and the paths written into them (the unit's
ExecStart, the venv's scripts) are those of the real root, so a staged tree can be copied onto a
box image. The service user is created only by root installing into "/"; otherwise the command
is printed. Each step looks first and changes only what differs, so a re-run is safe; `--dry-run`
only says what it would do. Problems (an unwritable prefix, a bad option, a failed pip) raise
InstallError: one line, exit code 2.
"""

from __future__ import annotations

import grp
import inspect
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel

from agent import __version__
from agent.config import AgentConfig, _model_of
from agent.errors import AgentError

DEFAULT_VENV = PurePosixPath("/opt/edgeglm/venv")
CONFIG_DIR = PurePosixPath("/etc/edgeglm")
CONFIG_FILE = CONFIG_DIR / "agent.toml"
ENV_FILE = CONFIG_DIR / "agent.env"
TRUSTED_KEYS_DIR = CONFIG_DIR / "trusted-keys"
STATE_DIR = PurePosixPath("/var/lib/edgeglm")
UNIT_NAME = "edgeglm-agent.service"
UNIT_FILE = PurePosixPath("/etc/systemd/system") / UNIT_NAME
SHUTDOWN_DEADLINE_S = 10  # agent.daemon.run_agent's default: in-flight requests get this long
STOP_TIMEOUT_S = 30  # the deadline, then the offline state and the MQTT disconnect

USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
NEXT_START = "systemctl daemon-reload && systemctl enable --now edgeglm-agent"


class InstallError(AgentError):
    """The install cannot go on; the message names the path or option and what to do."""


@dataclass(frozen=True)
class InstallOptions:
    prefix: Path = Path("/")
    user: str = "edgeglm"
    venv: PurePosixPath = DEFAULT_VENV  # where the venv is on the box
    source: str | None = None  # pip spec; None: this source tree, else edgeglm==__version__
    create_venv: bool = True  # False: the unit runs the current interpreter (tests, dev boxes)
    dry_run: bool = False

    def __post_init__(self):
        if not USER_NAME.fullmatch(self.user):
            raise InstallError(f"--user {self.user!r} is not a valid system user name: lower-case letters, "
                               "digits, '_' and '-', starting with a letter or '_', at most 31 characters")
        if self.user == "root":
            raise InstallError("--user root: the agent must not run as root; give a dedicated user "
                               "such as edgeglm (the default)")
        if not self.venv.is_absolute():
            raise InstallError(f"--venv {self.venv}: give an absolute path on the box, e.g. {DEFAULT_VENV}")
        if self.source is not None and re.search(r"\[[^]]*\bfactory\b", self.source):
            raise InstallError(f"--wheel-or-source {self.source}: the factory extra (torch) is for the build "
                               "host, never the edge box; give the spec without [factory]")


# --- the config file ------------------------------------------------------------------------------

_SECTION_NOTES = {
    "device": "who this box is; both are MQTT topic levels",
    "model": "which model to serve and how",
    "http": "the local HTTP API (OpenAI-compatible); keep it on 127.0.0.1 unless a proxy fronts it",
    "sampling": "defaults for requests that leave a field out",
    "telemetry": "latency reports and device health snapshots to the fleet controller over MQTT",
    "mqtt": "the fleet's broker: desired config, OTA offers, inference requests, telemetry",
    "mqtt.tls": "TLS to the broker; uncomment the table to use it",
    "ota": "signed model updates",
}
# Settings whose default TOML cannot write (None, or computed on the box): a commented example,
# and advice beside the field's own note.
_EXAMPLES = {
    "device.id": ('"box-12"', "unset: this machine's host name"),
    "model.bundle": ('"/var/lib/edgeglm/bundles/my-model"', None),
    "model.threads": ("4", None),
    "http.api_key": ('"..."', "better: EDGEGLM_HTTP__API_KEY in /etc/edgeglm/agent.env (0600)"),
    "mqtt.client_id": ('"box-12"', None),
    "mqtt.username": ('"box-12"', None),
    "mqtt.password": ('"..."', "better: EDGEGLM_MQTT__PASSWORD in /etc/edgeglm/agent.env (0600)"),
    "mqtt.tls.ca_file": ('"/etc/edgeglm/ca.pem"', None),
    "mqtt.tls.cert_file": ('"/etc/edgeglm/client.pem"', None),
    "mqtt.tls.key_file": ('"/etc/edgeglm/client.key"', "readable by the service user: 0640 root:edgeglm"),
}


def default_config_toml() -> str:
    """The agent's defaults as a commented TOML file; `load_config` of it equals the defaults.

    Built from AgentConfig's fields, so a new setting shows up here by itself; the notes come
    from the comments beside each field in agent/config.py and agent/mqtt.py.
    """
    lines = [
        "# edgeglm agent configuration (written by `edgeglm agent install` with the defaults).",
        "#",
        "# Priority, lowest first: defaults < this file < environment variables EDGEGLM_<SECTION>__<FIELD>",
        "# (e.g. EDGEGLM_MQTT__HOST=broker.local, best set in /etc/edgeglm/agent.env) < command-line flags.",
        "# Secrets (mqtt.password, http.api_key) belong in /etc/edgeglm/agent.env (mode 0600), not here.",
        "# Every setting with its type and limits: edgeglm agent config-schema",
        "",
    ]
    tables = []
    for name, info in AgentConfig.model_fields.items():
        if _model_of(info.annotation) is not None:
            tables.append((name, _model_of(info.annotation)))
        else:  # top-level keys come before the first table in TOML
            lines += _setting_lines(AgentConfig, name, "", AgentConfig.model_fields[name].get_default())
    for name, model in tables:
        lines += [""] + _table_lines(name, model, commented=False)
    return "\n".join(lines) + "\n"


def _table_lines(path: str, model: type[BaseModel], commented: bool) -> list[str]:
    c = "# " if commented else ""
    doc = _SECTION_NOTES.get(path)
    lines = [f"# {doc}"] if doc else []
    env = "EDGEGLM_" + path.upper().replace(".", "__") + "__<FIELD>"
    lines += [f"{c}[{path}]", f"# environment: {env}"]
    subtables = []
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        if sub is not None:
            subtables.append((name, sub))
            continue
        default = None if info.default_factory is not None else info.get_default()
        lines += [c + line if not line.startswith("#") else line
                  for line in _setting_lines(model, name, path, default)]
    for name, sub in subtables:  # an optional sub-table (mqtt.tls): after the keys of its parent
        lines += [""] + _table_lines(f"{path}.{name}", sub, commented=True)
    return lines


def _setting_lines(model: type[BaseModel], name: str, section: str, default: Any) -> list[str]:
    info = model.model_fields[name]
    dotted = f"{section}.{name}" if section else name
    own = _field_notes(model).get(name)
    own = own and re.sub(r"^None: ", "unset: ", own)  # the source's "None" is TOML's missing key
    notes = [n for n in (own, _choices(info.annotation)) if n]
    if default is None:  # no TOML value: an example, commented
        example, advice = _EXAMPLES.get(dotted, ('"..."', None))
        notes += [advice] if advice else []
        return [f"# {n}" for n in notes] + [f"# {name} = {example}"]
    return [f"# {n}" for n in notes] + [f"{name} = {_toml_value(default)}"]


def _choices(annotation: Any) -> str | None:
    """`one of: ...` for a Literal field, booleans first where the field takes them too (`bool | Literal[...]`)."""
    members = (annotation, *typing.get_args(annotation))
    for t in members:
        if typing.get_origin(t) is Literal:
            values = ([True, False] if bool in members else []) + list(typing.get_args(t))
            numbers = [m for m in members if typing.get_origin(m) is typing.Annotated]  # `Annotated[float, ...] | "auto"`
            if numbers:
                from agent.config import _bounds

                kind = {int: "an integer", float: "a number"}.get(typing.get_args(numbers[0])[0], "a value")
                return f"{kind}{_bounds(numbers[0])} or " + ", ".join(_toml_value(v) for v in values)
            return "one of: " + ", ".join(_toml_value(v) for v in values)
    return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    raise TypeError(f"no TOML form for {value!r}")


def _field_notes(model: type) -> dict[str, str]:
    """The comments beside (or just above) each field in the model's source, by field name."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):  # installed without sources: no notes
        return {}
    notes: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        if re.match(r"^ {4}# ", line):
            above.append(line.strip()[2:])
            continue
        m = re.match(r"^ {4}(\w+)\s*:", line)
        if m:
            beside = line.split("  # ", 1)[1].strip() if "  # " in line else None
            # the lines above are one wrapped comment: joined with spaces (with "; " it read "unset: the; trusted_keys")
            text = "; ".join(t for t in (" ".join(above), beside) if t)
            if text:
                notes[m.group(1)] = text
        above = []
    return notes


# --- the systemd unit -----------------------------------------------------------------------------

UNIT_TEMPLATE = """\
# edgeglm edge agent, written by `edgeglm agent install` (edgeglm {version}).
# A re-run of the installer rewrites this file: change it with a drop-in instead,
# `systemctl edit edgeglm-agent`. Settings go in /etc/edgeglm/agent.toml or agent.env.
[Unit]
Description=edgeglm edge agent (local GLM model, signed OTA updates over MQTT)
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
User={user}
Group={group}
ExecStart={exec_start}
WorkingDirectory={state_dir}
# Environment variables EDGEGLM_<SECTION>__<FIELD> override agent.toml, e.g.
# EDGEGLM_MQTT__HOST=broker.plant7 or EDGEGLM_HTTP__API_KEY=...: put them in agent.env
# (mode 0600; systemd reads it as root before it drops privileges; '-': the file is optional).
EnvironmentFile=-{env_file}
#Environment=EDGEGLM_LOG_LEVEL=debug
Environment=PYTHONUNBUFFERED=1
# ONNX Runtime's telemetry (1DS, with a device id kept under $HOME): off on a fleet box.
Environment=ORT_DISABLE_TELEMETRY=1
Restart=on-failure
RestartSec=5s
# SIGTERM starts the agent's clean shutdown: in-flight requests get {deadline} s, then the offline
# state is published and MQTT disconnects. SIGKILL comes only after TimeoutStopSec.
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout}s
# `systemctl reload edgeglm-agent`: agent.toml read again; what applies live does now, the rest (address, MQTT
# connection, paths, device id) at the next restart, as the log says. agent.env is read at start only.
ExecReload=/bin/kill -HUP $MAINPID

# Files: the state directory (model slots, update state) is the only writable place.
StateDirectory=edgeglm
StateDirectoryMode=0750
ConfigurationDirectory=edgeglm
ReadWritePaths={state_dir}
UMask=0027

# Sandbox
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
# Also keeps OpenVINO's telemetry (loaded by `import openvino`) from keeping a client id in
# ~/intel; without one it sends nothing.
ProtectHome=yes
PrivateTmp=yes
# Only /dev/null, zero, random and friends: CPU inference needs no devices. For an Intel iGPU or
# NPU (OpenVINO devices GPU, NPU), relax it in a drop-in (systemctl edit edgeglm-agent):
#   [Service]
#   PrivateDevices=no
#   DevicePolicy=closed
#   DeviceAllow=/dev/dri/renderD128 rw
#   DeviceAllow=/dev/accel/accel0 rw
#   SupplementaryGroups=render
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# Not ProcSubset=pid: the runtimes read /proc/cpuinfo and /proc/meminfo to choose kernels and threads.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
# Off on purpose: OpenVINO's CPU plugin generates its kernels at run time (oneDNN/Xbyak JIT) and
# makes that memory executable; under W^X compile_model fails ("can't protect"). ONNX Runtime's
# CPU kernels are precompiled: a box with model.backend = "onnxruntime" may set it to yes.
MemoryDenyWriteExecute=no
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_unit(user: str, group: str, exec_start: list[str]) -> str:
    """The unit's text; `exec_start` is the command on the box (paths of the real root)."""
    return UNIT_TEMPLATE.format(
        version=__version__, user=user, group=group, exec_start=" ".join(map(_systemd_word, exec_start)),
        state_dir=STATE_DIR, env_file=ENV_FILE, deadline=SHUTDOWN_DEADLINE_S, stop_timeout=STOP_TIMEOUT_S)


def _systemd_word(word: str) -> str:
    if "\n" in word:
        raise InstallError(f"{word!r} cannot go in a systemd command line (it holds a newline)")
    word = word.replace("%", "%%")  # systemd specifiers
    return f'"{word}"' if re.search(r'[\s"\'\\]', word) else word


# --- the install ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceUser:
    name: str
    group: str
    uid: int | None  # None: not created yet
    gid: int | None


@dataclass
class Installer:
    """Runs the steps in order; each appends what it did (or would do) to `done`."""

    opts: InstallOptions
    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.prefix = Path(os.path.abspath(self.opts.prefix))
        self.staging = self.prefix != Path("/")
        self.is_root = os.geteuid() == 0

    def on_box(self, path: PurePosixPath) -> Path:
        """Where a path of the box is written: under PREFIX."""
        return self.prefix / path.relative_to("/")

    def note(self, verb: str, path: Path | str, detail: str = "") -> None:
        if self.opts.dry_run and verb not in ("unchanged", "exists", "kept"):
            verb = "would " + {"created": "create", "wrote": "write", "updated": "update", "set": "set",
                               "ran": "run", "installed": "install", "rewrote": "rewrite"}.get(verb, verb)
        self.done.append(f"  {verb:<15} {path}" + (f" ({detail})" if detail else ""))

    def run(self) -> None:
        self.check_prefix()
        user = self.service_user()
        exec_start = self.venv()
        for path in (CONFIG_DIR, UNIT_FILE.parent):
            self.make_dir(self.on_box(path), None)
        self.make_dir(self.on_box(TRUSTED_KEYS_DIR), 0o755)
        self.write_owned(self.on_box(TRUSTED_KEYS_DIR) / "README",
                         "Public keys (*.pub) trusted to sign model bundles; add one with "
                         "`install -m 0644 KEY.pub /etc/edgeglm/trusted-keys/`; other files are ignored.\n")
        # its contents too: a state dir left by `sudo edgeglm agent` (autotune/, prefix-cache/, the slots owned by
        # root) kept them root's, and systemd's StateDirectory= fixes the contents only when the top is wrong:
        # the agent, as the service user, could not write its updates, caches or records
        self.make_dir(self.on_box(STATE_DIR), 0o750, owner=user, whole_tree=True)
        self.write_config()
        self.write_owned(self.on_box(UNIT_FILE), render_unit(user.name, user.group, exec_start))
        self.plan_next_steps()

    # -- steps -------------------------------------------------------------------------------------

    def check_prefix(self) -> None:
        existing = self.prefix
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise InstallError(f"--prefix {self.prefix}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            problem = f"--prefix {self.prefix}: {existing} is not writable by {_whoami()}"
            fix = "run as root (sudo edgeglm agent install ...), or give a --prefix you can write to"
            if not self.opts.dry_run:
                raise InstallError(f"{problem}: {fix}; nothing was changed")
            self.done.append(f"  note: {problem}: the real run needs root")

    def service_user(self) -> ServiceUser:
        name = self.opts.user
        # staging a box image: the box's users are those of PREFIX/etc/passwd, not this build host's (whose uid
        # and group were given to the staged state dir and written into the unit, and the useradd step was left out)
        found = _box_user(self.prefix, name) if self.staging else _host_user(name)
        if found is not None:
            uid, gid, group = found
            if uid == 0:
                raise InstallError(f"--user {name} has uid 0: the agent must not run as root; give a dedicated user")
            if group is None:
                raise InstallError(f"user {name}'s primary group (gid {gid}) does not exist: fix the "
                                   "user (usermod -g) or give another --user") from None
            where = f" in {self.prefix / 'etc/passwd'}" if self.staging else ""
            self.note("exists", f"user {name}{where}", f"uid {uid}, group {group}")
            return ServiceUser(name, group, uid, gid)
        command = useradd_command(name)
        if self.is_root and not self.staging:
            self.note("ran", " ".join(command))
            if not self.opts.dry_run:
                _run(command, f"creating the service user {name}")
                pw = pwd.getpwnam(name)
                return ServiceUser(name, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_uid, pw.pw_gid)
        else:
            where = "on the box" if self.staging else "as root"
            self.next_steps.append(f"create the service user {where}: {' '.join(command)}")
        return ServiceUser(name, name, None, None)  # useradd --user-group: the group is named after the user

    def venv_problem(self, staged: Path) -> str | None:
        """Why `--venv` cannot be (re)used: a file, or a directory that holds other things and no pyvenv.cfg (a
        data directory got a virtualenv written into it; a bin/python linked to the system's made pip install
        into the system interpreter)."""
        if not staged.exists() and not staged.is_symlink():
            return None
        if not staged.is_dir():
            return "is not a directory"
        if (staged / "pyvenv.cfg").is_file():
            return None
        if any(staged.iterdir()):
            return "is a directory with other files and no pyvenv.cfg: not a virtualenv; give a new path"
        return None

    def venv(self) -> list[str]:
        """Create or update the venv; the ExecStart command (on the box)."""
        config = ["agent", "--config", str(CONFIG_FILE)]
        if not self.opts.create_venv:
            self.note("exists", sys.executable, "--no-venv: the unit runs this interpreter")
            self.check_reachable(sys.executable)
            return [sys.executable, "-m", "agent.cli", *config]
        self.check_reachable(_base_python())
        target = self.opts.venv
        staged = self.on_box(target)
        python = staged / "bin" / "python"
        problem = self.venv_problem(staged)
        if problem:
            raise InstallError(f"--venv {target}: {staged} {problem}; nothing was changed")
        source, describe = self.pip_source()
        if python.exists():
            self.note("exists", staged, "virtualenv; edgeglm is installed again into it")
        else:
            self.note("created", staged, f"virtualenv, Python {sys.version_info.major}.{sys.version_info.minor}")
            if not self.opts.dry_run:
                _run([_base_python(), "-m", "venv", str(staged)], f"creating the virtualenv {staged}",
                     hint="on Debian/Ubuntu install the venv module: apt-get install python3-venv")
        self.note("installed", f"edgeglm from {describe}",
                  "pip, without the factory extra: about half a minute from a nearby package index")
        if not self.opts.dry_run:
            self.pip_install(python, source)
            if self.staging:
                n = relocate_venv(staged, target)
                self.note("rewrote", f"{n} script{'s' * (n != 1)} in {staged / 'bin'}",
                          f"paths of the box: {target}")
        return [str(target / "bin" / "edgeglm"), *config]

    def check_reachable(self, python: str) -> None:
        """Warn when the unit's interpreter lives where ProtectHome=yes hides it from the service."""
        for path in (Path(python), Path(python).resolve()):
            hidden = next((h for h in ("/root", "/home", "/run/user") if path.is_relative_to(h)), None)
            if hidden:
                self.warnings.append(
                    f"the interpreter {path} is under {hidden}, which the unit's ProtectHome=yes hides from the "
                    "service: it will not start. Install from a system Python (e.g. /usr/bin/python3), or relax "
                    "ProtectHome in a drop-in")
                return

    def pip_source(self) -> tuple[str | None, str]:
        """(spec or None for this source tree, its description)."""
        spec = self.opts.source
        if spec is None:
            tree = source_tree()
            if tree:
                return None, f"the source tree {tree}"
            local = installed_from()
            if local is not None:  # `pip install ./edgeglm` (not -e) or a wheel file: the same source again
                return local, f"{local}, where this edgeglm was installed from"
            return f"edgeglm=={__version__}", f"edgeglm=={__version__} from the package index"
        looks_like_path = spec.endswith((".whl", ".tar.gz", ".zip")) or "/" in spec or spec.startswith(".")
        if looks_like_path and "://" not in spec and not Path(spec).exists():
            raise InstallError(f"--wheel-or-source {spec}: no such file or directory; give a wheel, a source "
                               "directory or a requirement such as edgeglm==0.2.0")
        if looks_like_path and "://" not in spec:
            spec = str(Path(spec).resolve())
        return spec, spec

    def pip_install(self, python: Path, spec: str | None) -> None:
        pip = [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check"]
        if spec is not None and Path(spec).is_dir() and source_tree(Path(spec)):
            self.pip_install_tree(pip, Path(spec))
        elif spec is not None:
            _run(pip + [spec], f"pip install {spec}",
                 hint="give --wheel-or-source with a wheel or a source tree of edgeglm" if spec.startswith("edgeglm==")
                 else None)
        else:
            self.pip_install_tree(pip, source_tree())
        # from "/": run in the source tree, `-m agent.cli` would find the tree's copy, not the venv's
        _run([str(python), "-m", "agent.cli", "--version"], "checking the installed edgeglm", cwd="/")

    @staticmethod
    def pip_install_tree(pip: list[str], tree: Path) -> None:
        # A copy of the package files: pip builds in the tree it is given, and this one may be
        # read-only or hold gigabytes of benchmark data.
        with tempfile.TemporaryDirectory(prefix="edgeglm-src-") as tmp:
            copy = copy_source_tree(tree, Path(tmp) / "edgeglm")
            _run(pip + [str(copy)], "pip install of the source tree")

    def make_dir(self, path: Path, mode: int | None, owner: ServiceUser | None = None,
                 whole_tree: bool = False) -> None:
        """A directory with `mode` (None: 0755 when created, left alone after) and owner; with `whole_tree`, what
        is inside it is given to the owner too (the state dir: see `_give_tree`)."""
        chown = owner is not None and owner.uid is not None and self.is_root
        want = [f"{mode:04o}"] if mode is not None else []
        want += [f"owner {owner.name}:{owner.group}"] if chown else []
        if path.exists() and not path.is_dir():
            raise InstallError(f"{path} exists and is not a directory: move it away and re-run")
        if not path.exists():
            self.note("created", path, ", ".join(want))
            if not self.opts.dry_run:
                _os(lambda: _make_dirs(path, mode or 0o755), path)
        else:
            st = path.stat()
            fixes = []
            if mode is not None and (st.st_mode & 0o7777) != mode:
                fixes.append(f"mode {st.st_mode & 0o7777:04o} -> {mode:04o}")
            if chown and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
                fixes.append(f"owner -> {owner.name}:{owner.group}")
            inside = _give_inside(path, owner.uid, owner.gid, act=False) if chown and whole_tree else 0
            if inside:
                fixes.append(f"owner of {inside} entr{'y' if inside == 1 else 'ies'} inside -> "
                             f"{owner.name}:{owner.group}")
            self.note("set" if fixes else "exists", path, ", ".join(fixes or want))
            if not fixes or self.opts.dry_run:
                return
            if mode is not None and (st.st_mode & 0o7777) != mode:
                _os(lambda: path.chmod(mode), path)
            if inside:
                _give_inside(path, owner.uid, owner.gid, act=True)
        if chown and not self.opts.dry_run:
            _os(lambda: os.chown(path, owner.uid, owner.gid), path)

    def write_owned(self, path: Path, text: str) -> None:
        """A file the installer owns: rewritten when it differs."""
        existing = _existing(path)
        if existing == text.encode():  # bytes: a file that is not UTF-8 differs, it is not an error
            self.note("unchanged", path)
            return
        self.note("updated" if existing is not None else "wrote", path)
        if not self.opts.dry_run:
            _write(path, text, 0o644)

    def write_config(self) -> None:
        """agent.toml: written once; a different existing file is the operator's and stays."""
        path = self.on_box(CONFIG_FILE)
        text = default_config_toml()
        existing = _existing(path)
        if existing is None:
            self.note("wrote", path, "the defaults, commented")
            if not self.opts.dry_run:
                _write(path, text, 0o644)
            return
        if existing == text.encode():  # bytes: a file that is not UTF-8 differs, it is not an error
            self.note("unchanged", path)
            return
        self.note("kept", path, "it exists and differs from the defaults: it stays as it is")
        new = path.with_name(path.name + ".new")
        if _existing(new) == text.encode():
            self.note("unchanged", new, "the current defaults, for comparison")
        else:
            self.note("wrote", new, f"the current defaults: compare with diff {path} {new}")
            if not self.opts.dry_run:
                _write(new, text, 0o644)

    def plan_next_steps(self) -> None:
        if self.staging:
            python = (f"; the venv links to {_base_python()}, which the box needs at that path"
                      if self.opts.create_venv else "")
            self.next_steps.insert(0, f"copy the tree under {self.prefix} onto the box's root{python}")
        keys = self.on_box(TRUSTED_KEYS_DIR)
        if not any(keys.glob("*.pub")):
            self.next_steps.append(f"install the fleet's public signing key: install -m 0644 fleet.pub "
                                   f"{TRUSTED_KEYS_DIR}/")
        self.next_steps.append(f"set device.fleet and [mqtt] (enabled, host) in {CONFIG_FILE}, secrets in "
                               f"{ENV_FILE} (chmod 0600)")
        self.next_steps.append(f"start it: {NEXT_START}")
        self.next_steps.append("follow its log: journalctl -u edgeglm-agent -f")

    def report(self) -> str:
        head = f"edgeglm agent install into {self.prefix}" + (" (a staging root)" if self.staging else "") + \
               (": dry run, nothing is changed" if self.opts.dry_run else "")
        steps = [f"  {i}. {s}" for i, s in enumerate(self.next_steps, 1)]
        warnings = [f"warning: {w}" for w in self.warnings]
        return "\n".join([head, *self.done, *warnings, "next steps:", *steps])


def useradd_command(name: str) -> list[str]:
    # home /nonexistent: nothing may write under the service's $HOME (see ProtectHome in the unit)
    return ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", name]


def source_tree(root: Path | None = None) -> Path | None:
    """The edgeglm source tree this code runs from (or `root`, when it is one), or None when it is an installed
    package."""
    root = root if root is not None else Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"edgeglm"', pyproject.read_text()):
            return root
    except (OSError, UnicodeDecodeError):
        pass
    return None


def installed_from(path: list[str] | None = None) -> str | None:
    """Where pip installed this edgeglm from when that was a local directory or file that is still there (its
    dist-info's direct_url.json, PEP 610: `pip install ./edgeglm` or a wheel file); None for the package index
    or a source that is gone. `path`: where to look for the installed distribution (default sys.path)."""
    from importlib.metadata import distributions
    from urllib.parse import unquote, urlparse

    for dist in distributions(name="edgeglm", path=path if path is not None else sys.path):
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        except (OSError, ValueError, AttributeError):
            continue
        if url.startswith("file://"):
            local = Path(unquote(urlparse(url).path))
            if local.exists():
                return str(local)
        return None  # the first one found is what imports
    return None


def copy_source_tree(tree: Path, dest: Path) -> Path:
    """What a build needs: the top-level files and the Python packages (directories with __init__.py)."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for entry in tree.iterdir():
        if entry.is_file() and (entry.suffix in (".toml", ".cfg", ".py", ".in", ".md", ".txt")
                                or entry.name.startswith("LICENSE")):
            shutil.copy2(entry, dest / entry.name)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            shutil.copytree(entry, dest / entry.name, ignore=ignore)
    return dest


def relocate_venv(staged: Path, target: PurePosixPath) -> int:
    """Point the scripts of a venv built at `staged` to where it will live on the box.

    pip writes absolute paths into the script shebangs and the activate scripts; the
    interpreter and site-packages find themselves relative to bin/python, so nothing else moves.
    """
    old, new = str(staged).encode(), str(target).encode()
    changed = 0
    for path in [*(staged / "bin").iterdir(), staged / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        script = data.startswith(b"#!") or path.name.startswith("activate") or path.name == "pyvenv.cfg"
        if old in data and script:
            path.write_bytes(data.replace(old, new))
            changed += 1
    return changed


def _whoami() -> str:
    try:
        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid {os.geteuid()}"


def _base_python() -> str:
    """The interpreter a new venv is made from (not this venv's python, if it is one)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _host_user(name: str) -> tuple[int, int, str | None] | None:
    """(uid, gid, primary group name or None) of `name` on this host, or None."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        return pw.pw_uid, pw.pw_gid, grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        return pw.pw_uid, pw.pw_gid, None


def _box_user(prefix: Path, name: str) -> tuple[int, int, str | None] | None:
    """As `_host_user`, from the staged tree's etc/passwd and etc/group (None where it has no such user)."""
    def entries(path: Path) -> list[list[str]]:
        try:
            return [line.split(":") for line in path.read_text(errors="replace").splitlines()]
        except OSError:
            return []

    for fields in entries(prefix / "etc/passwd"):
        if len(fields) >= 4 and fields[0] == name and fields[2].isdigit() and fields[3].isdigit():
            uid, gid = int(fields[2]), int(fields[3])
            group = next((g[0] for g in entries(prefix / "etc/group") if len(g) >= 3 and g[2] == str(gid)), None)
            return uid, gid, group
    return None


def _run(command: list[str], what: str, hint: str | None = None, cwd: str | None = None) -> None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise InstallError(f"{what}: {command[0]} not found" + (f"; {hint}" if hint else "")) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # pip's own cause ("ERROR: No matching distribution found for ...") comes before its closing notes
        errors = [line.strip() for line in lines if line.lstrip().startswith(("ERROR:", "error:"))]
        tail = " | ".join(errors[-3:] or lines[-3:])
        raise InstallError(f"{what} failed (exit {proc.returncode}): {tail}" + (f"; {hint}" if hint else "")
                           + "; fix it and re-run (the steps before are kept)")


def _os(action, path: Path):
    try:
        return action()
    except OSError as exc:
        raise InstallError(f"{path}: {exc.strerror}; fix it and re-run (the steps before are kept)") from None


def _existing(path: Path) -> bytes | None:
    """The bytes of a file the installer would rewrite, None where there is none; a directory (or other
    non-file) there, or a file it cannot read, is one line (a re-run as another user meets root's 0600 files)."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise InstallError(f"{path} exists and is not a file: move it away and re-run")
    return _os(path.read_bytes, path)


def _make_dirs(path: Path, mode: int) -> None:
    """mkdir -p, with 0755 for the parents it creates and `mode` for `path`, whatever the umask."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for i, p in enumerate(reversed(missing)):
        p.mkdir()
        p.chmod(mode if i == len(missing) - 1 else 0o755)


def _give_inside(top: Path, uid: int, gid: int, act: bool) -> int:
    """Count (and with `act`, chown to uid:gid) everything under `top`, not `top` itself, not owned by uid:gid.
    Walked by directory descriptors, links never followed (`os.fwalk`): the service user owns the tree and could
    swap a directory for a link to /etc between a walk by name and root's chown. A file with more than one hard
    link is left alone (its other name may be outside)."""
    count = 0
    for _, dirs, files, dirfd in os.fwalk(top, follow_symlinks=False):
        for name in dirs + files:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:  # gone meanwhile
                continue
            if (st.st_uid, st.st_gid) == (uid, gid) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
                continue
            count += 1
            if act:
                _os(lambda: os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False), top / name)
    return count


def _write(path: Path, text: str, mode: int) -> None:
    """Write whole or not at all: a temporary file beside it, then a rename."""
    def write():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
    _os(write, path)


def install(opts: InstallOptions) -> str:
    """Run the install (or the dry run); the report of what it did and the next steps."""
    installer = Installer(opts)
    installer.run()
    return installer.report()


def install_from_args(args) -> int:
    """`edgeglm agent install`: the CLI's entry point."""
    if args.no_venv and args.venv is not None:
        raise InstallError("--venv and --no-venv exclude each other: give one")
    if args.no_venv and args.wheel_or_source is not None:  # it was ignored without a word
        raise InstallError("--wheel-or-source and --no-venv exclude each other: with --no-venv the unit runs the "
                           "edgeglm installed in this Python, nothing is installed; give one")
    if not str(args.prefix).strip():  # '' was the current directory: a box tree written where the shell stood
        raise InstallError("--prefix '': an empty path; give / (this box) or a staging directory")
    opts = InstallOptions(prefix=Path(args.prefix), user=args.user,
                          venv=PurePosixPath(args.venv) if args.venv else DEFAULT_VENV,
                          source=args.wheel_or_source, create_venv=not args.no_venv, dry_run=args.dry_run)
    print(install(opts))
    return 0
