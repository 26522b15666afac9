"""INT8 primitives against plain numpy arithmetic."""

import numpy as np
import pytest

from models.quantize import quantize_blockwise, quantize_per_channel


def test_per_channel_roundtrip_within_half_a_step():
    w = np.random.default_rng(0).normal(size=(24, 40)).astype(np.float32)
    q = quantize_per_channel(w)
    scale = np.abs(w).max(axis=1) / 127
    assert q.q.dtype == np.int8 and np.abs(q.q).max() == 127
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    err = np.abs(q.dequantize() - w)
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert q.max_abs_error == pytest.approx(err.max())


def test_blockwise_pads_k_and_uses_zero_point_128():
    w = np.random.default_rng(1).normal(size=(8, 40)).astype(np.float32)  # K=40 -> 3 blocks of 16
    q = quantize_blockwise(w, block=16)
    assert q.q.shape == (8, 3, 16) and q.scale.shape == (8, 3)
    assert (q.q[:, 2, 8:] == 128).all()  # padding dequantizes to 0
    expected_scale = np.abs(np.pad(w, ((0, 0), (0, 8))).reshape(8, 3, 16)).max(axis=2) / 127
    np.testing.assert_allclose(q.scale, expected_scale, rtol=1e-6)
    deq = q.dequantize()
    assert deq.shape == w.shape
    assert (np.abs(deq - w) <= np.repeat(expected_scale, 16, axis=1)[:, :40] / 2 + 1e-7).all()


def test_zero_channel_stays_zero():
    w = np.zeros((2, 32), np.float32)
    w[1] = 1.0
    for q in (quantize_per_channel(w), quantize_blockwise(w, 16)):
        np.testing.assert_array_equal(q.dequantize(), w)


def test_block_must_be_power_of_two():
    with pytest.raises(ValueError, match="block=48"):
        quantize_blockwise(np.ones((2, 64), np.float32), 48)


def test_a_per_channel_row_takes_the_widest_block_that_divides_it():
    """MatMulNBits quantizes the activations per block on its int8 path: with one weight scale per row the
    block is free, and a wide one is faster (glm-m decode 1.056x with blocks of up to 1024 against 128)
    and, where it spans the row, quantizes each token like the W8A8 prefill graph does."""
    from models.quantize import quantize_rows_u8, row_block

    assert [row_block(k) for k in (3072, 1536, 1024, 512, 96, 40)] == [1024, 512, 1024, 512, 32, 32]
    w = np.random.default_rng(2).normal(size=(6, 1536)).astype(np.float32)
    wide, narrow = quantize_rows_u8(w), quantize_rows_u8(w, block=128)
    assert wide.q.shape == (6, 3, 512) and narrow.q.shape == (6, 12, 128)
    np.testing.assert_array_equal(wide.q.reshape(6, -1), narrow.q.reshape(6, -1))  # the same bytes, row by row
    np.testing.assert_array_equal(wide.dequantize(), narrow.dequantize())
