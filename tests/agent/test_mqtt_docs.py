"""docs/mqtt.md's topic table and payload schemas are generated from agent/topics.py: keep them current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.topics import BEGIN_MARK, END_MARK, render_docs_section, replace_generated

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"


def test_mqtt_doc_schemas_are_current():
    text = DOC.read_text(encoding="utf-8")
    assert replace_generated(text, render_docs_section()) == text, \
        "docs/mqtt.md is stale: run python -m agent.topics --write-docs docs/mqtt.md"


def test_generator_rewrites_only_the_marked_section(tmp_path):
    doc = tmp_path / "mqtt.md"
    doc.write_text(f"# intro\n\n{BEGIN_MARK}\nold stuff\n{END_MARK}\n\nafter\n", encoding="utf-8")
    check = [sys.executable, "-m", "agent.topics", "--check", str(doc)]
    stale = subprocess.run(check, capture_output=True, text=True)
    assert stale.returncode == 1 and "out of date" in stale.stderr
    subprocess.run([sys.executable, "-m", "agent.topics", "--write-docs", str(doc)], check=True)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# intro\n\n") and text.endswith(f"{END_MARK}\n\nafter\n") and "old stuff" not in text
    assert "#### InferenceRequest" in text and "| `state` | device → all | yes | 1 | ReportedState |" in text
    assert subprocess.run(check).returncode == 0


def test_generator_refuses_a_file_without_markers(tmp_path):
    doc = tmp_path / "mqtt.md"
    doc.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="markers not found"):
        replace_generated(doc.read_text(), render_docs_section())
