"""Work that could take the agent down, done in a child process instead: the autotune's measurements
(runtime.autotune.measure_isolated) and the OTA self-test's load of a new model (agent.selftest).

The child is `python -c "import MODULE; MODULE.FUNCTION()"` on this interpreter and this source tree; it
reads its request on stdin and reports on its stdout, one JSON object per line after a tag (whatever the
libraries it loads print goes to its stderr). It dies with the thread that started it (Linux).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def exit_text(code: int) -> str:
    """How a child ended: "killed by SIGSEGV", "exit code 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _in_site_packages(folder: Path) -> bool:
    """True for an installed package's folder (on the child's path anyway; put before the standard library
    through PYTHONPATH, a site-packages folder could shadow it)."""
    import site

    try:
        known = site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # an interpreter without them (some virtualenv layouts)
        known = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return any(Path(p).resolve() == folder for p in known if p)


class Child:
    """A child running `module.function()`, its tagged report lines read by a thread into a queue.
    Raises OSError where none can start."""

    def __init__(self, module: str, function: str, tag: str):
        if not sys.executable:  # an embedded interpreter: nothing to start
            raise OSError("no Python interpreter to start (sys.executable is empty)")
        env = dict(os.environ)
        if not _in_site_packages(_ROOT):  # a source tree: first, so that the child runs the code this one runs
            env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.tag = tag
        # a session of its own: Ctrl-C in the terminal (the foreground process group) is the parent's to handle
        self.proc = subprocess.Popen([sys.executable, "-c", f"import {module} as m; m.{function}()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"edgeglm-child-{module}", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, obj) -> None:
        """One line to the child's stdin (a JSON object, or a word)."""
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def next_event(self, timeout_s: float) -> dict | None:
        """The child's next report; None when it has ended (see `end`). Raises queue.Empty after `timeout_s`
        of silence."""
        while True:
            line = self._lines.get(timeout=timeout_s)
            if line is None:
                return None
            if line.startswith(self.tag):
                try:
                    return json.loads(line[len(self.tag):])
                except ValueError:
                    pass

    def end(self) -> int:
        """Wait for the child to exit; its exit status."""
        return self.proc.wait()

    def stop(self) -> None:
        """Kill the child if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def child_stdout():
    """In the child: die with the parent (Linux PR_SET_PDEATHSIG), ignore SIGTERM and SIGINT, send what libraries
    print to stderr, and return the file the tagged reports go to. A stop is the parent's: systemd's stop sends
    SIGTERM to every process of the unit, and a measuring child that died of it was recorded in the autotune
    cache as a path that kills its process (excluded until `--retune`), and the measuring went on in a new child."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


def report(out, tag: str, **event) -> None:
    """In the child: one tagged report line."""
    out.write(tag + json.dumps(event) + "\n")
    out.flush()
