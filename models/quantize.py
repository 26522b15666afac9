"""INT8 weight quantization primitives (numpy): each returns its own worst-case error.

Two symmetric, weight-only schemes, one per backend's fastest INT8 kernel:

- per-channel: one fp32 scale per output channel, int8 values in [-127, 127]. OpenVINO reads
  it as a compressed weight (int8 constant -> convert -> multiply) and runs its
  `FullyConnectedCompressed` kernel on it.
- block-wise: one fp32 scale per `block` consecutive input elements of an output channel,
  stored as uint8 with zero point 128, which is the layout of ONNX Runtime's `MatMulNBits`
  (bits=8). With `accuracy_level=4` ORT also quantizes activations to int8 per block at run time.
- per-channel in the block-wise layout (`quantize_rows_u8`): one scale per output channel,
  repeated for every block, stored as MatMulNBits' uint8 (N, n_blocks, block). The same bytes
  read as an (N, n_blocks * block) matrix are what `MatMulInteger` needs for the prefill graph,
  so ONNX Runtime's decode and prefill graphs share one copy of the weights.

Weights are given as (N, K) = (out_features, in_features), the PyTorch/HF layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PerChannelInt8:
    q: np.ndarray  # (N, K) int8
    scale: np.ndarray  # (N,) float32
    max_abs_error: float

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]


@dataclass(frozen=True)
class BlockwiseInt8:
    q: np.ndarray  # (N, n_blocks, block) uint8, zero point 128
    scale: np.ndarray  # (N, n_blocks) float32
    k: int  # input features before padding to whole blocks
    max_abs_error: float

    @property
    def block(self) -> int:
        return self.q.shape[2]

    def dequantize(self) -> np.ndarray:
        w = (self.q.astype(np.float32) - 128.0) * self.scale[:, :, None]  # (N, nb, block)
        return w.reshape(w.shape[0], -1)[:, : self.k]


def _scales(absmax: np.ndarray) -> np.ndarray:
    # an all-zero channel gets scale 1 so that it dequantizes to exact zeros
    return np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)


def quantize_per_channel(w: np.ndarray) -> PerChannelInt8:
    w = np.asarray(w, dtype=np.float32)
    scale = _scales(np.abs(w).max(axis=1))
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    err = float(np.abs(q.astype(np.float32) * scale[:, None] - w).max()) if w.size else 0.0
    return PerChannelInt8(q, scale, err)


def quantize_blockwise(w: np.ndarray, block: int = 128) -> BlockwiseInt8:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16 (MatMulNBits requirement)")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    n_blocks = -(-k // block)
    padded = np.zeros((n, n_blocks * block), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block)
    scale = _scales(np.abs(blocks).max(axis=2))  # (N, nb)
    q = np.clip(np.rint(blocks / scale[:, :, None]), -127, 127)
    quant = BlockwiseInt8((q + 128).astype(np.uint8), scale, k, 0.0)
    err = float(np.abs(quant.dequantize() - w).max()) if w.size else 0.0
    return BlockwiseInt8(quant.q, scale, k, err)


def row_block(k: int, largest: int = 1024) -> int:
    """The MatMulNBits block for a per-channel weight of `k` inputs: the largest power of two from 1024
    down to 16 that divides k (no padding), else 32 (the row is padded with zeros to whole blocks). The
    weight has one scale per row whatever the block; the block sets how MatMulNBits' int8 path quantizes
    the activations (a scale per block of each token): wide blocks are faster (glm-m decode 1.056x with
    up to 1024 against 128, VNNI EPYC; logits as close to transformers': cos 0.99861 vs 0.99864) and a
    block that spans the row quantizes each token like the W8A8 prefill graph. `largest` caps it (the GPU
    graph keeps 128: CUDA's kernels were measured with that)."""
    return next((b for b in (1024, 512, 256, 128, 64, 32, 16) if b <= largest and k % b == 0), 32)


def quantize_rows_u8(w: np.ndarray, block: int | None = None) -> BlockwiseInt8:
    """Per-output-channel symmetric INT8 in MatMulNBits' uint8 layout (zero point 128)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    block = block or row_block(k)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of two >= 16 (MatMulNBits requirement)")
    n_blocks = -(-k // block)
    scale = _scales(np.abs(w).max(axis=1)) if k else np.ones(n, np.float32)  # (N,)
    q = np.full((n, n_blocks * block), 128, dtype=np.uint8)  # padding dequantizes to 0
    q[:, :k] = (np.clip(np.rint(w / scale[:, None]), -127, 127) + 128).astype(np.uint8)
    quant = BlockwiseInt8(q.reshape(n, n_blocks, block), np.repeat(scale[:, None], n_blocks, axis=1), k, 0.0)
    err = float(np.abs(quant.dequantize() - w).max()) if w.size else 0.0
    return BlockwiseInt8(quant.q, quant.scale, k, err)
