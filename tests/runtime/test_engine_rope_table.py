"""The context window the manifest promises against the rotary table the ONNX Runtime graphs carry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx


def _rows(path) -> int:
    """The rotary table's rows as the onnx library reads them, with its data (the reference)."""
    model = onnx.load(str(path))
    return next(onnx.numpy_helper.to_array(t).shape[0] for t in model.graph.initializer if t.name == "rope.cos")


def test_max_position_embeddings_past_the_rotary_table_is_refused_at_load(int8_bundle, tmp_path):
    """A manifest promising more positions than GroupQueryAttention's cos/sin tables hold loaded; a prompt past
    the table then failed with ONNX Runtime's raw RuntimeError about cos_cache."""
    bundle = shutil.copytree(int8_bundle, tmp_path / "b")
    rows = _rows(bundle / "onnxruntime" / "model.onnx")
    assert rows == _rows(bundle / "onnxruntime" / "prefill.onnx")
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["architecture"]["max_position_embeddings"] == rows  # as exported: loads
    data["architecture"]["max_position_embeddings"] = rows * 2
    (bundle / "manifest.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "generate", "--bundle", str(bundle), "--backend",
                           "onnxruntime", "--max-tokens", "1", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (f"its rotary table (rope.cos) covers {rows} positions, but the manifest's max_position_embeddings is "
            f"{rows * 2}") in proc.stderr


def test_graphs_without_a_table_have_no_limit(int8_bundle):
    from runtime.engine import GPU_GRAPH_FILE, rope_table_rows

    assert rope_table_rows(int8_bundle / "onnxruntime" / "model.onnx") == _rows(int8_bundle / "onnxruntime" /
                                                                               "model.onnx")
    gpu = onnx.load(str(int8_bundle / "onnxruntime" / GPU_GRAPH_FILE), load_external_data=False)
    assert not any(t.name == "rope.cos" for t in gpu.graph.initializer)
    assert rope_table_rows(int8_bundle / "onnxruntime" / GPU_GRAPH_FILE) is None
