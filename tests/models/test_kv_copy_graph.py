"""The KV copy graph the runtime ships (runtime/kv_copy.onnx): it is the one models.onnx_graph builds
(the edge has no `onnx` to build it), and it copies rows the way DeviceRaggedBatch relies on, checked
against numpy indexing on ONNX Runtime's CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.onnx_graph import kv_copy_graph
from runtime.engine import KV_COPY_GRAPH


def test_the_shipped_graph_is_the_one_the_factory_builds():
    built = kv_copy_graph()
    onnx.checker.check_model(built, full_check=True)
    assert KV_COPY_GRAPH.read_bytes() == built.SerializeToString(), (
        "runtime/kv_copy.onnx is stale: rewrite it with python -c \"from models.onnx_graph import kv_copy_graph; "
        "open('runtime/kv_copy.onnx', 'wb').write(kv_copy_graph().SerializeToString())\"")


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
