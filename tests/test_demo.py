"""The README's first quick-start command, `edgeglm demo`, end to end (short training)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_rolls_out_two_versions_to_three_agents_and_answers_chat(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--workdir", str(tmp_path / "demo"),
                           "--steps", "40"], capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "v1.0.0 rollout: done" in out
    assert "v1.1.0 rollout: done" in out or "v1.1.0 rollout: halted" in out  # the gate decides on measured latency
    assert out.count("chat with box") == 3
    status = [line for line in out.splitlines() if line.startswith("demo ")]
    assert [line.split()[1] for line in status] == ["box1", "box2", "box3"]
    assert all(" yes " in line and "demo-tiny 1." in line for line in status)
    assert "Traceback" not in proc.stderr
    assert "private signing key" not in proc.stdout + proc.stderr  # the agents trust demo.pub alone, not the keys dir
    assert "latency gate passed ({})" not in out  # said in words (agent/demo.py explain_report_line)


def test_the_latency_gate_line_says_what_it_compared():
    from agent.demo import explain_report_line

    first = explain_report_line("06:50:24 latency gate passed ({})")  # the first rollout: nothing served before
    assert first.startswith("06:50:24 latency gate passed: no baseline latency to compare with yet")
    assert "{}" not in first
    assert explain_report_line("06:51:02 latency gate passed ({'box1': 3.2, 'box2': -10.0})") == \
        "06:51:02 latency gate passed: p95 per-token latency box1 +3.2%, box2 -10.0%"
    memory = "; memory: box1 rss 180 MiB -> 190 MiB, free 9000 MiB -> 8990 MiB"
    assert explain_report_line("06:51:02 latency gate passed ({'box1': 3.2})" + memory) == \
        "06:51:02 latency gate passed: p95 per-token latency box1 +3.2%" + memory
    not_compared = explain_report_line("06:51:02 latency gate passed ({}); latency not compared for box1 (no "
                                       "per-token p95 before the update)" + memory)
    assert not_compared == ("06:51:02 latency gate passed: no baseline latency to compare with yet (not compared: "
                            "box1 (no per-token p95 before the update)); the canaries' telemetry on the new version "
                            "arrived with no new errors" + memory)
    assert explain_report_line("offered to the rest ['box2']") == "offered to the rest ['box2']"


def test_without_the_embedded_broker_the_demo_stops_before_any_work(tmp_path):
    """A factory install without the `demo` extra: the demo trained and exported for half a minute, then found it
    had no broker. It now says what to install (or --broker) at once, and leaves the work dir empty."""
    import time

    work = tmp_path / "demo"
    script = ("import sys; sys.modules['amqtt'] = None; from agent.cli import main; "
              f"sys.exit(main(['demo', '--workdir', {str(work)!r}]))")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "needs amqtt: pip install 'edgeglm[factory,demo]', or pass --broker HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr and time.monotonic() - start < 20
    assert not work.exists() or not any(work.iterdir())
