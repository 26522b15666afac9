"""The KV graphs the runtime ships (runtime/kv_copy.onnx, runtime/kv_write.onnx): they are the ones
models.onnx_graph builds (the edge has no `onnx` to build them), and they copy and write rows the way
DeviceRaggedBatch relies on, checked against numpy indexing on ONNX Runtime's CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.onnx_graph import kv_copy_graph, kv_write_graph
from runtime.engine import KV_COPY_GRAPH, KV_WRITE_GRAPH


@pytest.mark.parametrize("shipped, builder", [(KV_COPY_GRAPH, kv_copy_graph), (KV_WRITE_GRAPH, kv_write_graph)])
def test_the_shipped_graphs_are_the_ones_the_factory_builds(shipped, builder):
    built = builder()
    onnx.checker.check_model(built, full_check=True)
    assert shipped.read_bytes() == built.SerializeToString(), (
        f"runtime/{shipped.name} is stale: rewrite it with python -c \"from models.onnx_graph import "
        f"{builder.__name__}; open('runtime/{shipped.name}', 'wb').write({builder.__name__}().SerializeToString())\"")


@pytest.fixture(scope="module")
def copy():
    session = ort.InferenceSession(str(KV_COPY_GRAPH), providers=["CPUExecutionProvider"])

    def run(a, a_rows, b, b_rows, b_start, cap):
        return session.run(None, {"a": a, "a_rows": np.asarray(a_rows, np.int64), "b": b,
                                  "b_rows": np.asarray(b_rows, np.int64), "b_start": np.array([b_start]),
                                  "cap": np.array([cap])})[0]
    return run


def _expected(a, a_rows, b, b_rows, b_start, cap):
    def fit(x, start):
        out = np.zeros(x.shape[:3] + (cap,) + x.shape[4:], x.dtype)
        kept = x[:, :, :, start:start + cap]
        out[:, :, :, :kept.shape[3]] = kept
        return out
    return np.concatenate([fit(a[:, list(a_rows)], 0), fit(b[:, list(b_rows)], b_start)], axis=1)


@pytest.mark.parametrize("a_rows, b_rows, b_start, cap", [
    ([2, 0], [1], 3, 12),   # a row joins shifted to position 0, every row grown to 12 positions
    ([], [0], 0, 5),        # the first row of a batch, cut to 5 positions
    ([1, 2], [], 0, 10),    # a row leaves (no row joins), same capacity
    ([0, 2, 1], [], 0, 4),  # reordered and shrunk
    ([0], [1, 0], 6, 3),    # the joining rows' positions 6.. hold 1 position: zero-filled after it
])
def test_rows_are_taken_shifted_and_fitted_to_the_capacity(copy, a_rows, b_rows, b_start, cap):
    rng = np.random.default_rng(len(a_rows) * 10 + cap)
    a = rng.standard_normal((6, 3, 2, 10, 4)).astype(np.float16)  # 3 layers' keys and values, 3 rows
    b = rng.standard_normal((6, 2, 2, 7, 4)).astype(np.float16)
    got = copy(a, a_rows, b, b_rows, b_start, cap)
    want = _expected(a, a_rows, b, b_rows, b_start, cap)
    assert got.shape == want.shape and got.dtype == np.float16
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("slot, src_row, src_start, src_positions", [
    (2, 1, 3, 7),   # a joining row from another buffer, shifted to position 0, zero-filled after its 4 positions
    (0, 0, 0, 14),  # a longer source: cut to the buffer's 10 positions
    (1, 3, 0, None),  # a leave: the buffer's own row 3 moves into slot 1
])
def test_a_row_is_written_in_place_and_nothing_else_changes(slot, src_row, src_start, src_positions):
    """The engine binds the output to the buffer's own memory (runtime.engine.OnnxRuntimeEngine.write_kv):
    the row lands in its slot of that same memory, every other slot keeps its bytes."""
    rng = np.random.default_rng(slot * 7 + src_row)
    kv = rng.standard_normal((6, 4, 2, 10, 4)).astype(np.float16)  # 3 layers' keys and values, 4 slots
    src = kv if src_positions is None else rng.standard_normal((6, 2, 2, src_positions, 4)).astype(np.float16)
    want = kv.copy()
    row = src[:, src_row, :, src_start:src_start + 10]
    want[:, slot] = 0
    want[:, slot, :, :row.shape[2]] = row
    session = ort.InferenceSession(str(KV_WRITE_GRAPH), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    before = kv.ctypes.data
    binding.bind_input("kv", "cpu", 0, np.float16, kv.shape, kv.ctypes.data)
    binding.bind_output("out", "cpu", 0, np.float16, kv.shape, kv.ctypes.data)
    binding.bind_cpu_input("src", src)
    binding.bind_cpu_input("src_row", np.array([src_row], np.int64))
    binding.bind_cpu_input("src_start", np.array([src_start], np.int64))
    binding.bind_cpu_input("slot", np.array([slot], np.int64))
    session.run_with_iobinding(binding)
    assert kv.ctypes.data == before
    np.testing.assert_array_equal(kv, want)
