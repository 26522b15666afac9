"""Inference engines: one decoder forward step through ONNX Runtime or OpenVINO.

Both run the graph written by the exporter (see the bundle docs): token ids, positions and an
attention mask in, last-position logits out. The KV cache is opaque: `engine.new_cache(batch)`
returns a per-sequence handle that the engine owns and updates in place; `forward` takes it and
returns it. `cache.length` is the number of positions it holds, `cache.batch` its rows.

- ONNX Runtime: the graph's GroupQueryAttention reads and writes a preallocated buffer per layer
  (past and present bound to the same memory through IOBinding, so nothing is concatenated or
  copied per step); a new buffer has `KV_HEADROOM` positions more than its first step needs and
  grows by at least doubling, up to the context window, when a step needs more room. Only the three small inputs and the logits are bound per step. An INT8 bundle's
  graph names a second, prefill graph (metadata `edgeglm.prefill_graph`) over the same weight
  bytes: steps of at least `prefill_min_rows` token rows (batch x new tokens, metadata
  `edgeglm.prefill_min_rows`, 4) run there (W8A8, a prepacked u8 GEMM, about 2x MatMulNBits' speed
  for prompts and 1.5x for decode steps of 8 sequences on AVX2), smaller steps on the decode
  graph (MatMulNBits, the fastest for one row). Both sessions bind the same cache buffers; each
  prepacks its own copy of the weights at load (the file holds one).
  The graphs take `inputs_embeds`: the engine reads the rows from the bundle's fp32 embedding
  table (`embed_tokens.npy`) with pread (`EmbeddingTable`), so the process holds only the rows it
  is using, not the table. (Graphs exported before take `input_ids` and gather inside.)
- OpenVINO: the IR is stateful (the cache lives in the infer request's variables); one request
  is reused, inputs are bound with `set_tensor` on the caller's arrays (shared, not copied), and
  only the logits are read back. A request holds one sequence's state at a time: switching to
  another handle saves the current one's state into it and restores the other's.

`engine.export_kv(cache, length)` copies positions [0, length) of a batch-1 cache out as a
`KvBlock` (float32 keys and values per layer, (kv_heads, length, head_dim)), and
`engine.cache_from_kv(block)` makes a new batch-1 cache holding exactly those positions, ready
for a forward at position `length`: runtime/prefix_cache.py keeps shared prompt prefixes this way.

Batched forward with left padding (attention_mask 0 = padding) works on both; on ONNX Runtime
a multi-token step on top of a cache (chunked prefill) needs batch 1, and a left-padded step runs on
the decode graph (the prefill graph's attention in blocks has no padding bias: docs/runtime.md).

`engine.merge_caches(rows)` builds one left-padded batch cache from rows of other caches (each
row's valid positions copied right-aligned, the padding before them zero and masked). It copies;
the sources are left as they were.

`engine.new_batch()` is what the continuous batching scheduler (runtime/batching.py) decodes with:
a `DecodeBatch` whose rows are added (their KV copied in) and removed one at a time and which
makes one token per row per step. On ONNX Runtime graphs tagged `edgeglm.batch_rows = ragged` it is
row-aligned (`RaggedBatch`): one buffer per layer with a slot per row, row i's positions [0, n_i)
valid; adding copies only the new row, removing moves only the last row into the freed slot, and
each row attends over its own positions (GroupQueryAttention's per-row lengths) instead of the
longest row's. With the cache in device memory (the GPU graph, `DeviceCache`) it is
`DeviceRaggedBatch`: the same layout, a joining or moved row written in place by a small graph
(runtime/kv_write.onnx), the buffers rebuilt on the device (runtime/kv_copy.onnx) only when they
grow or shrink, never read to the host. Elsewhere (OpenVINO, older graphs) it is `MergedBatch`: `merge_caches` after each
change of membership, every row's KV copied, rows left-padded to the longest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import BackendUnavailable, ModelLoadError
from runtime.probe import cpus_one_per_core, usable_cpus
from runtime.signals import same_signal_stack

log = logging.getLogger("edgeglm.engine")



BACKENDS = ("onnxruntime", "openvino")
KV_CACHE_KEY = "edgeglm.kv_cache"  # ONNX metadata: "shared-buffer" on the fused (GroupQueryAttention) graph
PREFILL_GRAPH_KEY = "edgeglm.prefill_graph"  # ONNX metadata: file name of the prefill graph beside it
PREFILL_ROWS_KEY = "edgeglm.prefill_min_rows"  # ONNX metadata: see PREFILL_GRAPH_MIN_ROWS
# Steps of at least this many token rows (batch x new tokens) run on the prefill graph: a prompt of 4+
# tokens, or a decode step of 4+ sequences. Below it the decode graph (MatMulNBits, the fastest kernel
# for one row) is as fast or faster; from there the prefill graph's prepacked u8 GEMM wins (measured, 2
# threads, AVX2: glm-s 4 rows 4.7-5.0 vs 5.4-5.8 ms, 8 rows 5.5-6.1 vs 8.2-8.7 ms; glm-m 2 rows 15-17 vs
# 17.5 ms, 8 rows 32-33 vs 46-49 ms). The exporter writes it into the decode graph's metadata.
PREFILL_GRAPH_MIN_ROWS = 4
# Prefill graphs exported before that key (the weight as the GEMM's left operand, repacked at every call)
# paid a fixed cost per step: only steps of at least this many tokens per row ran there.
LEGACY_PREFILL_MIN_TOKENS = 24
EMBEDDINGS_KEY = "edgeglm.embeddings"  # ONNX metadata: file name of the fp32 embedding table beside the graph
# ONNX metadata: "ragged" when the fused graph takes row-aligned batches (each row's positions from 0, its
# own length from its mask) for single-token steps; graphs exported before it take left-padded ones only
BATCH_ROWS_KEY = "edgeglm.batch_rows"
# ONNX metadata of the fused graph: "from-row-start" when GroupQueryAttention rotates q and k itself, taking a
# prompt's positions (a step with no past) from each row's first position_ids onward: a multi-token step must
# have consecutive positions in every row (no left-padded prompt batch). Graphs exported before rotate at
# any position_ids (RotaryEmbedding nodes)
ROTARY_KEY = "edgeglm.rotary_positions"
# The blocked prefill graph (models.onnx_graph._blocked_attention): each layer's attention is
# ATTENTION_BLOCKS GroupQueryAttention nodes over row ranges given per step in these inputs; blocks after
# the first read and write block_kv_name(...) buffers: the cache's own for a prompt split into blocks, a
# one-position scratch buffer otherwise (attention_block_inputs)
BLOCK_ROWS_INPUT = "attention_blocks.rows"  # (n, 3) int64: block j's tokens [lo, hi) of the first nb sequences
BLOCK_SEQLENS_INPUT = "attention_blocks.seqlens_k"  # (n, batch) int32: each row's last position in block j
BLOCK_TOTAL_INPUT = "attention_blocks.total"  # (n,) int32: block j's total sequence length
ATTENTION_BLOCKS = 4
# a one-sequence step of at least this many new tokens is split into blocks (fewer: one block, the others idle)
BLOCKED_MIN_TOKENS = 64

# ONNX metadata of the fused decode graph: file name of its GPU variant beside it (GPU_GRAPH_FILE), the same
# graph with GroupQueryAttention and the KV cache in fp16, which ONNX Runtime's CUDA kernels run (they have no
# fp32 GroupQueryAttention); the variant itself carries KV_DTYPE_KEY = "float16"
GPU_GRAPH_KEY = "edgeglm.gpu_graph"
GPU_GRAPH_FILE = "gpu.onnx"
KV_DTYPE_KEY = "edgeglm.kv_dtype"
SPIN_AFTER_RUN_US = 1000  # ONNX Runtime worker spin after a run when two sessions share the cores
# prompt tokens per ONNX Runtime run: a longer prompt (one sequence) runs in pieces of this many, each attending
# over the pieces before it, with the same logits. ONNX Runtime's arenas keep what a run took for the life of
# the process, and a run's memory grows faster than its tokens: a whole 3,000-token prompt left glm-s's agent
# at 584 MB resident against 275 MB in runs of 512 (2 CPU cores, same time), and glm-m on an H200 holding
# 3,184 MiB more GPU memory than the loaded model against 112 MiB (docs/performance.md "Long prompts")
PROMPT_RUN_TOKENS = 512
KV_HEADROOM = 128  # positions a new or grown ONNX Runtime cache buffer has beyond what the step needs
# copies KV rows in the execution provider's memory (built by models.onnx_graph.kv_copy_graph)
KV_COPY_GRAPH = Path(__file__).with_name("kv_copy.onnx")
# writes one KV row into a buffer in place (models.onnx_graph.kv_write_graph)
KV_WRITE_GRAPH = Path(__file__).with_name("kv_write.onnx")


class EmbeddingTable:
    """A (vocab, hidden) float32 table in a .npy file, read a row at a time with pread.

    Nothing of the table is mapped into the process: a lookup reads the rows it needs (4 KiB for a
    hidden size of 1024) from the page cache or the disk, so the process holds only the rows of the
    tokens it is working on. (Memory-mapped, the kernel's fault-around maps 64 KiB of cached
    neighbours per touched row: 117 of glm-m's 131 MB became resident after two random 512-token
    prompts.) Lookups are thread-safe (pread has no file position)."""

    def __init__(self, path: Path, vocab_size: int):
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a readable embedding table ({exc}); re-export the bundle") from None
        if len(shape) != 2 or shape[0] != vocab_size or dtype != np.float32 or fortran:
            raise ModelLoadError(f"{path}: embedding table is {dtype} {shape}, expected float32 ({vocab_size}, hidden)")
        if Path(path).stat().st_size < self.offset + shape[0] * shape[1] * 4:
            raise ModelLoadError(f"{path}: embedding table is truncated; re-export the bundle")
        self.vocab_size, self.hidden = shape
        self.row_bytes = self.hidden * 4
        self._fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def __getitem__(self, ids) -> np.ndarray:
        """Rows for `ids` (any shape of ints) -> float32 (*ids.shape, hidden), a new array."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)].flat[0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        out = np.empty((ids.size, self.hidden), np.float32)
        for row, token in zip(out, ids.reshape(-1).tolist()):
            where = self.offset + token * self.row_bytes
            if hasattr(os, "preadv"):  # straight into the output row
                n = os.preadv(self._fd, [row], where)
            else:  # platforms without preadv: one copy more
                data = os.pread(self._fd, self.row_bytes, where)
                row[:len(data) // 4] = np.frombuffer(data, np.float32, len(data) // 4)
                n = len(data)
            if n != self.row_bytes:
                raise ModelLoadError(f"embedding table: short read for token {token}")
        return out.reshape(*ids.shape, self.hidden)


@dataclass(frozen=True)
class ModelArch:
    """What the runtime needs to know of the architecture (from the bundle manifest)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_manifest(cls, arch: dict) -> "ModelArch":
        return cls(
            num_layers=arch["num_hidden_layers"], num_kv_heads=arch["num_key_value_heads"],
            head_dim=arch["head_dim"], vocab_size=arch["vocab_size"],
            max_positions=arch["max_position_embeddings"], eos_token_ids=tuple(arch.get("eos_token_id") or ()),
        )


SUPPORTED_ACTIVATIONS = ("silu",)


def architecture_problem(arch: dict) -> str | None:
    """Why this runtime cannot run a bundle of this architecture, or None when it can."""
    try:
        ModelArch.from_manifest(arch)
    except (KeyError, TypeError) as exc:
        return f"architecture lacks field {exc} that a GLM decoder needs: not a bundle for this runtime"
    act = arch.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        return f"architecture uses hidden_act={act!r}; this runtime runs {', '.join(SUPPORTED_ACTIVATIONS)}"
    return None


def available_backends() -> list[str]:
    found = []
    for name in BACKENDS:
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    return found


class KVCache:
    """A per-sequence KV cache handle; its storage belongs to the engine that made it."""

    def __init__(self, batch: int):
        self.batch = batch
        self.length = 0  # positions held

    def _check(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[int, int, int]:
        batch, new = input_ids.shape
        total = attention_mask.shape[1]
        if batch != self.batch or total - new != self.length or attention_mask.shape[0] != batch:
            raise ValueError(f"cache holds {self.batch} row(s) of {self.length} positions; got input_ids "
                             f"{tuple(input_ids.shape)} with attention_mask {tuple(attention_mask.shape)} "
                             f"(the mask must cover the cached positions plus the new ones)")
        return batch, new, total


@dataclass(frozen=True)
class CacheRow:
    """Row `row` of `cache`: its last `length` positions (None: all it holds). In a left-padded
    batch a row's valid positions are the last ones, so this names one sequence inside a batch."""

    cache: KVCache
    row: int = 0
    length: int | None = None

    def span(self) -> tuple[int, int]:
        """(start, end) of the row's valid positions in its cache."""
        n = self.cache.length if self.length is None else self.length
        if not 0 <= self.row < self.cache.batch or not 0 < n <= self.cache.length:
            raise ValueError(f"cache row {self.row} with {n} positions does not exist in a cache of "
                             f"{self.cache.batch} row(s) x {self.cache.length} positions")
        return self.cache.length - n, self.cache.length


def _merge_plan(rows: list[CacheRow]) -> tuple[list[tuple[int, int]], int, np.ndarray]:
    """The rows' spans, the batch's length (the longest row) and its left-padding attention mask."""
    if not rows:
        raise ValueError("merge_caches needs at least one row")
    spans = [r.span() for r in rows]
    total = max(end - start for start, end in spans)
    mask = np.zeros((len(rows), total), np.int64)
    for i, (start, end) in enumerate(spans):
        mask[i, total - (end - start):] = 1
    return spans, total, mask


class DecodeBatch:
    """Rows decoded together, one token per row and step (see the module docstring).

    Rows sit in slots 0..rows-1; `add` puts a row in slot `rows`, and `remove(slot)` moves the last
    row into the freed slot and returns that row's old slot (None when the last slot itself left),
    so the caller's per-row state follows. `step(ids)` feeds ids[i] to row i at position lengths[i]
    and returns the (rows, vocab) logits; every row then holds one more position."""

    rows: int

    def lengths(self) -> list[int]:
        raise NotImplementedError

    def add(self, source: CacheRow) -> None:
        raise NotImplementedError

    def remove(self, slot: int) -> int | None:
        raise NotImplementedError

    def step(self, input_ids) -> np.ndarray:
        raise NotImplementedError

    def host_kv_bytes(self) -> int:
        """KV bytes this batch holds in host memory now (0 where it keeps them elsewhere or per row)."""
        return 0

    def kv_bound(self, needs: list[int], per_token: int) -> int:
        """The most KV bytes this batch can come to hold with rows growing to `needs` positions each, from
        what it holds now (the batching scheduler's `max_kv_bytes`). Here: one cache of exactly the rows,
        grown past the longest, as MergedBatch rebuilds it."""
        return kv_estimate(needs, per_token, self.engine.arch, slots=len(needs))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.rows:
            raise ValueError(f"batch slot {slot} does not exist; the batch has {self.rows} row(s)")


class MergedBatch(DecodeBatch):
    """A DecodeBatch for any engine: one left-padded cache from `engine.merge_caches`, rebuilt (every
    row's KV copied) at the first step after rows were added or removed."""

    def __init__(self, engine):
        self.engine = engine
        self._sources: list[tuple[KVCache, int]] = []  # per slot: (cache, row) holding its positions last
        self._lengths: list[int] = []
        self._cache: KVCache | None = None
        self._mask: np.ndarray | None = None
        self._dirty = False

    @property
    def rows(self) -> int:
        return len(self._lengths)

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def add(self, source: CacheRow) -> None:
        start, end = source.span()
        self._sources.append((source.cache, source.row))
        self._lengths.append(end - start)
        self._dirty = True

    def kv_bound(self, needs: list[int], per_token: int) -> int:
        """As DecodeBatch.kv_bound where the engine's merged cache has room to grow (ONNX Runtime's, sized by
        `_grown_capacity`); an engine whose merged state holds exactly the rows (OpenVINO: `merged_cache_exact`,
        its state grows a position per step) counts rows x (longest + 1): the growth rules counted a 109- and a
        103-position row as 0.5 MiB where they held 0.21, and kept the second row out of a bound it fitted."""
        if getattr(self.engine, "merged_cache_exact", False):
            return len(needs) * (max(needs) + 1) * per_token if needs else 0
        return super().kv_bound(needs, per_token)

    def remove(self, slot: int) -> int | None:
        self._check_slot(slot)
        last = self.rows - 1
        if slot != last:
            self._sources[slot], self._lengths[slot] = self._sources[last], self._lengths[last]
        self._sources.pop()
        self._lengths.pop()
        self._dirty = True
        if not self._lengths:
            self._cache = self._mask = None
            drop = getattr(self.engine, "_drop_stale_bindings", None)
            if drop is not None:  # a device cache owns its memory: do not let an IO binding keep it
                drop()
        return last if slot != last else None

    def step(self, input_ids) -> np.ndarray:
        if not self.rows:
            raise ValueError("the batch has no rows to step")
        if self._dirty or self._cache is None:
            rows = [CacheRow(c, r, n) for (c, r), n in zip(self._sources, self._lengths)]
            self._cache, self._mask = self.engine.merge_caches(rows)
            self._sources = [(self._cache, i) for i in range(self.rows)]
            self._dirty = False
        n = self.rows
        mask = np.concatenate([self._mask, np.ones((n, 1), np.int64)], axis=1)
        ids = np.asarray(input_ids, np.int64).reshape(n, 1)
        pos = np.asarray(self._lengths, np.int64).reshape(n, 1)
        logits, self._cache = self.engine.forward(ids, pos, mask, self._cache)
        self._mask = mask
        self._lengths = [x + 1 for x in self._lengths]
        return logits


class KvBlock:
    """Keys and values of positions [0, length) of one sequence: per layer, float32 arrays
    (kv_heads, length, head_dim). Plain numpy, owned by nobody: `engine.cache_from_kv` of an engine
    of the same model and backend turns it back into a cache.

    A block may be held as consecutive parts along the positions (`of_parts`: the prefix cache's
    blocks of 32 tokens), joined only where `keys` / `values` are read; `write_to` copies the parts
    straight into a cache's buffers (a 512-token hit on glm-s: one copy into one allocation instead
    of a join, a zeroed buffer per layer and a second copy, ~0.7 vs 1.1-4.6 ms)."""

    __slots__ = ("_parts", "_joined")

    def __init__(self, keys, values):
        self._parts = ((tuple(keys), tuple(values)),)
        self._joined = self._parts[0]

    @classmethod
    def of_parts(cls, parts) -> "KvBlock":
        """A block of consecutive (keys, values) parts, each shaped as a block's (per layer
        (kv_heads, n_i, head_dim)), in position order."""
        parts = tuple((tuple(k), tuple(v)) for k, v in parts)
        if len(parts) == 1:
            return cls(*parts[0])
        block = cls.__new__(cls)
        block._parts, block._joined = parts, None
        return block

    def _join(self) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        if self._joined is None:
            keys, values = zip(*self._parts)
            self._joined = (tuple(np.concatenate(ks, axis=1) for ks in zip(*keys)),
                            tuple(np.concatenate(vs, axis=1) for vs in zip(*values)))
        return self._joined

    @property
    def keys(self) -> tuple[np.ndarray, ...]:
        return self._join()[0]

    @property
    def values(self) -> tuple[np.ndarray, ...]:
        return self._join()[1]

    @property
    def length(self) -> int:
        return sum(keys[0].shape[1] for keys, _ in self._parts if keys)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for keys, values in self._parts for a in keys + values)

    def check(self, arch: ModelArch) -> None:
        """ValueError unless the block fits `arch` (layers, kv heads, head_dim, context window)."""
        def fits(keys, values) -> bool:
            if len(keys) != arch.num_layers or len(values) != arch.num_layers or keys[0].ndim != 3:
                return False
            want = (arch.num_kv_heads, keys[0].shape[1], arch.head_dim)
            return all(a.shape == want and a.dtype == np.float32 for a in keys + values)

        if not all(fits(*part) for part in self._parts) or self.length > arch.max_positions:
            got = sorted({(a.shape, str(a.dtype)) for keys, values in self._parts for a in keys + values})
            raise ValueError(f"KV block of {len(self._parts[0][0])} layer(s) {got} does not fit this model: it "
                             f"needs {arch.num_layers} float32 layers of (kv_heads {arch.num_kv_heads}, positions, "
                             f"head_dim {arch.head_dim}), at most {arch.max_positions} positions")

    def write_to(self, buffers: list[np.ndarray]) -> None:
        """Copy positions [0, length) into `buffers`: per layer its keys' then its values' array, each
        (kv_heads, >= length, head_dim) (a view of one cache row)."""
        start = 0
        for keys, values in self._parts:
            n = keys[0].shape[1] if keys else 0
            for dst, src in zip(buffers, (a for kv in zip(keys, values) for a in kv)):
                dst[:, start:start + n] = src
            start += n


def _check_window(arch: ModelArch, positions: int) -> None:
    """ValueError unless a batch row of `positions` positions fits the context window."""
    if positions > arch.max_positions:
        raise ValueError(f"a batch row would hold {positions} positions; the context window is "
                         f"{arch.max_positions}")


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _device_shape(rows: int, positions: int, arch: ModelArch) -> tuple[int, int]:
    """(row slots, positions) of a DeviceRaggedBatch buffer for `rows` rows of at least `positions`:
    powers of two (positions at least 256, capped by the context window), so that the allocator sees
    few distinct sizes and reuses the blocks that earlier buffers gave back."""
    return _power_of_two(rows), max(positions, min(_power_of_two(max(positions, 256)), arch.max_positions))


def _batch_one(cache: KVCache, length: int) -> None:
    if cache.batch != 1 or not 0 <= length <= cache.length:
        raise ValueError(f"cannot export {length} positions of a cache of {cache.batch} row(s) x {cache.length} "
                         "positions: export_kv takes a batch-1 cache and at most the positions it holds")


def _grown_capacity(current: int, needed: int, arch: ModelArch) -> int:
    """Positions for a cache buffer that must hold `needed`: at least doubling, with `KV_HEADROOM` more for
    the tokens that follow and 256 at the least, capped by the context window (never below `needed`)."""
    return max(needed, min(max(2 * current, needed + KV_HEADROOM, 256), arch.max_positions))


def kv_estimate(needs: list[int], per_token: int, arch: ModelArch, slots: int = 0, capacity: int = 0,
                device: bool = False) -> int:
    """The most KV bytes a row-aligned batch (RaggedBatch; DeviceRaggedBatch with `device`) can come to hold
    while its rows grow to `needs` positions each, joining one at a time, from buffers of `slots` row slots
    x `capacity` positions (0, 0: none yet): the sizing rules of `_grow` / `_grown_capacity` /
    `_device_shape`, as upper bounds. A buffer being rebuilt holds its old copy too for a moment; not counted."""
    if not needs:
        return 0
    longest = max(needs) + 1  # a row holding n positions needs room for its next one
    positions = capacity if capacity >= longest else \
        min(max(2 * longest, longest + KV_HEADROOM + 1, 256, capacity), arch.max_positions)
    n = len(needs)
    if device:
        rows = _power_of_two(max(n, slots))
        positions = max(positions, min(_power_of_two(max(positions, 256)), arch.max_positions))
    else:
        rows = slots
        while rows < n:  # RaggedBatch._grow: max(rows, 2 x slots)
            rows = max(rows + 1, 2 * rows)
    return rows * max(positions, capacity) * per_token


class OrtCache(KVCache):
    """Per-layer key/value buffers (batch, kv_heads, capacity, head_dim); positions [0, length) valid."""

    def __init__(self, batch: int, arch: ModelArch):
        super().__init__(batch)
        self.capacity = 0
        self.buffers: list[np.ndarray] = []
        self.values: list = []  # OrtValues over `buffers`, bound as both past and present

    dtype = np.float32

    def reserve(self, needed: int, arch: ModelArch, ort) -> bool:
        """Make room for `needed` positions, with `KV_HEADROOM` more for the tokens that follow (at least
        doubling, capped by the context window); True if reallocated. The headroom keeps the first
        decode steps after a prompt from growing the buffer: without it a 512-token prompt got
        exactly 512 positions and the first step copied the whole cache (glm-m: 25-30 ms instead of
        ~15 ms)."""
        if needed <= self.capacity:
            return False
        fresh = self.blank(_grown_capacity(self.capacity, needed, arch), arch, filled=self.length)
        if self.length:
            for new, old in zip(fresh, self.host()):
                new[:, :, :self.length] = old[:, :, :self.length]
        self.put(fresh, ort)
        return True

    def blank(self, capacity: int, arch: ModelArch, filled: int = 0) -> list[np.ndarray]:
        """Host arrays for this cache's rows at `capacity` positions, in its dtype, per layer its keys' and
        its values': views of one allocation (one mapping instead of one per layer, fewer page faults),
        zeroed from position `filled` on (the caller writes positions [0, filled) of every row)."""
        shape = (2 * arch.num_layers, self.batch, arch.num_kv_heads, capacity, arch.head_dim)
        held = np.empty(shape, self.dtype)
        held[:, :, :, filled:] = 0
        return list(held)

    def put(self, arrays: list[np.ndarray], ort) -> None:
        """Hold `arrays` (from `blank`, filled) as the cache's buffers."""
        self.capacity, self.buffers = arrays[0].shape[2], arrays
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in arrays]

    def host(self) -> list[np.ndarray]:
        """The buffers as host arrays (these very buffers here; a copy for a DeviceCache)."""
        return self.buffers

    def bind(self, binding, kv_names: list[tuple[str, str]]) -> None:
        """Bind each layer's buffer as both its past and its present (GroupQueryAttention writes in place)."""
        for (past, present), value in zip(kv_names, self.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def key(self, layer: int) -> np.ndarray:
        """Layer `layer`'s cached keys (batch, kv_heads, length, head_dim) (for tests and debugging)."""
        return self.host()[2 * layer][:, :, :self.length]

    def value(self, layer: int) -> np.ndarray:
        return self.host()[2 * layer + 1][:, :, :self.length]


class DeviceCache(OrtCache):
    """An OrtCache in an execution provider's memory ("cuda"), in the GPU graph's dtype (float16): one
    allocation, `kv`, an OrtValue of (2 x layers, batch, kv_heads, capacity, head_dim) (per layer its
    keys then its values), each layer's part bound to the graph where it lies: a step copies no KV
    between host and device. Growing and batching copy on the device (`copier`: the engine's KV copy
    graph, one run for every layer); the cache is read to the host (`host`, a copy) only to export a
    prefix or to merge rows left-padded (MergedBatch), and written from it (`put`) for a new cache or an
    imported prefix. The same code runs with "cpu"."""

    def __init__(self, batch: int, arch: ModelArch, device: str = "cuda", dtype=np.float16, device_id: int = 0,
                 copier=None):
        super().__init__(batch, arch)
        self.device, self.dtype, self.device_id, self.copier = device, dtype, device_id, copier
        self.kv = None  # the OrtValue holding every layer, None until the first put

    @property
    def buffers(self) -> list[np.ndarray]:
        """Not host arrays: code written for OrtCache.buffers would read or write nothing here."""
        if self.kv is not None:
            raise TypeError("a DeviceCache's buffers are in device memory: read them with host(), write with put()")
        return []

    @buffers.setter
    def buffers(self, value: list) -> None:  # OrtCache.__init__ sets the empty list
        if value:
            raise TypeError("a DeviceCache's buffers are in device memory: write them with put()")

    def reserve(self, needed: int, arch: ModelArch, ort) -> bool:
        """As OrtCache.reserve; a cache that holds positions grows on the device (no host round trip)."""
        if needed <= self.capacity or self.kv is None or self.copier is None:
            return super().reserve(needed, arch, ort)
        capacity = _grown_capacity(self.capacity, needed, arch)
        self.kv = self.copier(self, range(self.batch), None, (), 0, capacity)
        self.capacity = capacity
        return True

    def put(self, arrays: list[np.ndarray], ort) -> None:
        self.capacity = arrays[0].shape[2]
        self.kv = ort.OrtValue.ortvalue_from_numpy(np.stack(arrays), self.device, self.device_id)

    @property
    def slots(self) -> int:
        """Rows the buffer has room for (a batch's buffer may have more than `batch`, unused)."""
        return self.kv.shape()[1] if self.kv is not None else self.batch

    def host(self) -> list[np.ndarray]:
        held = self.kv.numpy()  # a copy from device memory; on "cpu" a view of the live buffer
        if self.device == "cpu":
            held = held.copy()
        return [layer[:self.batch] for layer in held]

    def bind(self, binding, kv_names: list[tuple[str, str]]) -> None:
        """Each layer's first `batch` rows (contiguous in its part of `kv`) as its past and present."""
        full = self.kv.shape()[1:]
        step = int(np.prod(full)) * np.dtype(self.dtype).itemsize
        shape = [self.batch, *full[1:]]
        start = self.kv.data_ptr()
        for k, (past, present) in enumerate(kv_names):
            binding.bind_input(past, self.device, self.device_id, self.dtype, shape, start + k * step)
            binding.bind_output(present, self.device, self.device_id, self.dtype, shape, start + k * step)


class DeviceRaggedBatch(DecodeBatch):
    """RaggedBatch's row-aligned layout for caches in device memory (the GPU graph, DeviceCache): row i's
    positions [0, n_i) valid, each row attending over its own positions; nothing is read to the host.
    As in RaggedBatch, a row joining a free slot is written into it and a row leaving is replaced by
    the last row, one row copied in place (the engine's KV write graph, runtime/kv_write.onnx, its
    output bound to the buffer's own memory); new buffers are built only when the rows outgrow the
    slots or the positions, or when a quarter of either would do (the KV copy graph,
    runtime/kv_copy.onnx, one run for all layers). When the last row leaves, the buffers are released
    (to ONNX Runtime's allocator, which every cache's buffer comes from: the next prompts reuse them).
    (MergedBatch read every row to the host and wrote the batch back at each change of membership:
    43 ms for 8 rows of glm-m on an H200, against a 3.6 ms step.)

    Buffer sizes come from a short list (`_device_shape`): row slots and positions are powers of two
    (spare slots are never bound). ONNX Runtime's CUDA allocators are arenas that keep what they take
    and reuse a freed block for a request that fits it. Building a buffer of exactly `rows` x (longest
    row + headroom) at every join and leave asked for a new size nearly every time: on an H200, 8 rows
    of glm-m (50-1700 positions) left 6.5 GB held, 9.2 GB after a second round, and 32 rows 41 GB, for
    under 1 GB of keys and values (docs/performance.md)."""

    def __init__(self, engine: "OnnxRuntimeEngine"):
        self.engine, self.arch = engine, engine.arch
        self._cache: DeviceCache | None = None
        self._lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self._lengths)

    @property
    def capacity(self) -> int:
        """Positions per row in the current buffers (0 when empty)."""
        return self._cache.capacity if self._cache is not None else 0

    def lengths(self) -> list[int]:
        return list(self._lengths)

    @property
    def slots(self) -> int:
        """Rows the current buffers have room for (0 when empty)."""
        return self._cache.slots if self._cache is not None else 0

    def kv_bound(self, needs: list[int], per_token: int) -> int:
        return kv_estimate(needs, per_token, self.arch, self.slots, self.capacity, device=True)

    def _rebuild(self, order: list[int], lengths: list[int], capacity: int, source: CacheRow | None = None,
                 slots: int = 0) -> None:
        """New buffers: rows `order` of the current ones, then `source`'s row (shifted to start at
        position 0), `capacity` positions (rounded up, `_device_shape`) and at least `slots` row slots
        each; the batch's rows are then `lengths` long. Nothing changes if the copy fails."""
        taken, start = ([source.row], source.span()[0]) if source is not None else ([], 0)
        current = self._cache if self._cache is not None else source.cache
        rows = len(order) + len(taken)
        slots, capacity = _device_shape(max(rows, slots), capacity, self.arch)
        if taken:  # spare slots: copies of the joining row (any row would do; they are never bound)
            taken = taken * (slots - len(order))
        else:
            order = order + order[:1] * (slots - rows)
        fresh = self.engine.new_cache(rows)
        fresh.kv = self.engine.copy_kv(current, order, source.cache if source is not None else current,
                                       taken, start, capacity)
        fresh.capacity, fresh.length = capacity, max(lengths)
        self._cache, self._lengths = fresh, lengths

    def add(self, source: CacheRow) -> None:
        start, end = source.span()
        if not isinstance(source.cache, DeviceCache):
            raise TypeError(f"a DeviceRaggedBatch takes rows of device caches, not of {type(source.cache).__name__}")
        needed = max([end - start, *self._lengths]) + 1
        _check_window(self.arch, needed)  # as RaggedBatch: a row must have room for its next position
        if self.rows < self.slots and needed <= self.capacity and self.engine.can_write_kv:
            # a free slot with room: the row is written into it, nothing else moves
            self.engine.write_kv(self._cache, self.rows, source.cache, source.row, start)
            self._cache.batch += 1
            self._lengths = self._lengths + [end - start]
            self._cache.length = max(self._lengths)
            return
        capacity = self.capacity if needed <= self.capacity else _grown_capacity(self.capacity, needed, self.arch)
        self._rebuild(list(range(self.rows)), self._lengths + [end - start], capacity, source)

    def remove(self, slot: int) -> int | None:
        self._check_slot(slot)
        last = self.rows - 1
        order = list(range(self.rows))
        order[slot] = last
        order.pop()
        lengths = [self._lengths[i] for i in order]
        if not order:  # memory back to the provider (the sessions' bindings let go too)
            self._cache, self._lengths = None, []
            self.engine._drop_stale_bindings()
            return None
        # as RaggedBatch: slots and positions given back when a quarter would do (to twice what is used)
        fit = min(max(max(lengths) + 1 + KV_HEADROOM, 256), self.arch.max_positions)
        shrink = self.slots >= 4 * len(order) or self.capacity >= 4 * fit
        if shrink or not self.engine.can_write_kv:
            self._rebuild(order, lengths, fit if self.capacity >= 4 * fit else self.capacity,
                          slots=2 * len(order) if self.slots >= 4 * len(order) else self.slots)
        else:  # the last row moves into the freed slot (read before it is written): one row copied
            if slot != last:
                self.engine.write_kv(self._cache, slot, self._cache, last, 0)
            self._cache.batch -= 1
            self._lengths = lengths
            self._cache.length = max(lengths)
        return last if slot != last else None

    def step(self, input_ids) -> np.ndarray:
        n = self.rows
        if not n:
            raise ValueError("the batch has no rows to step")
        width = max(self._lengths) + 1
        _check_window(self.arch, width)
        if width > self.capacity:
            self._rebuild(list(range(n)), self._lengths, _grown_capacity(self.capacity, width, self.arch),
                          slots=self.slots)
        lengths = np.asarray(self._lengths, np.int64)
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.asarray(input_ids, np.int64).reshape(n, 1)
        logits = self.engine._run(ids, lengths.reshape(n, 1), mask, self._cache, n)
        self._lengths = [x + 1 for x in self._lengths]
        self._cache.length = width
        return logits


class RaggedBatch(DecodeBatch):
    """A row-aligned DecodeBatch on ONNX Runtime (graphs tagged `edgeglm.batch_rows = ragged`).

    One buffer per layer and key/value, (row slots, kv_heads, capacity, head_dim); row i's positions
    [0, lengths[i]) are valid and the rest of its slot is never read. A step binds the first `rows`
    slots (a contiguous view, no copy) with a mask of 1 over each row's own positions plus the new
    one: the graph takes each row's length from it, GroupQueryAttention writes the row's new key and
    value at that position and attends over that row's positions only. Slots and positions grow by
    doubling (a copy of what is held) and shrink (a copy too) when a removal leaves a quarter of
    either in use; when the last row leaves, the buffers are released."""

    def __init__(self, engine: "OnnxRuntimeEngine"):
        self.engine, self.arch = engine, engine.arch
        self.rows = 0
        self.capacity = 0  # positions per slot
        self.buffers: list[np.ndarray] = []
        self._lengths = np.zeros(0, np.int64)
        self._view: OrtCache | None = None  # the first `rows` slots, as the runner binds them

    def lengths(self) -> list[int]:
        return self._lengths[:self.rows].tolist()

    def host_kv_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def kv_bound(self, needs: list[int], per_token: int) -> int:
        slots = self.buffers[0].shape[0] if self.buffers else 0
        return kv_estimate(needs, per_token, self.arch, slots, self.capacity)

    def _grow(self, rows: int, positions: int) -> None:
        slots = self.buffers[0].shape[0] if self.buffers else 0
        if rows <= slots and positions <= self.capacity:
            return
        arch = self.arch
        _check_window(arch, positions)
        new_slots = max(rows, 2 * slots) if rows > slots else slots
        cap = self.capacity if positions <= self.capacity else _grown_capacity(self.capacity, positions, arch)
        self._realloc(new_slots, cap)

    def _shrink(self) -> None:
        """After a removal: when a quarter of the slots or of the positions would do, reallocate to
        twice the rows and the longest row plus headroom, so that one long or crowded moment does not
        keep its memory for as long as the batch never empties."""
        slots, held = self.buffers[0].shape[0], int(self._lengths[:self.rows].max())
        fit = min(max(held + 1 + KV_HEADROOM, 256), self.arch.max_positions)
        new_slots = 2 * self.rows if slots >= 4 * self.rows else slots
        new_cap = fit if self.capacity >= 4 * fit else self.capacity
        if (new_slots, new_cap) != (slots, self.capacity):
            self._realloc(new_slots, new_cap)

    def _realloc(self, slots: int, cap: int) -> None:
        """New buffers of `slots` x `cap` positions holding the rows' positions (copied)."""
        arch = self.arch
        shape = (slots, arch.num_kv_heads, cap, arch.head_dim)
        fresh = [np.zeros(shape, np.float32) for _ in range(2 * arch.num_layers)]
        held = int(self._lengths[:self.rows].max()) if self.rows else 0
        for new, old in zip(fresh, self.buffers):
            new[:self.rows, :, :held] = old[:self.rows, :, :held]
        lengths = np.zeros(slots, np.int64)
        lengths[:self.rows] = self._lengths[:self.rows]
        self.buffers, self.capacity, self._lengths, self._view = fresh, cap, lengths, None

    def add(self, source: CacheRow) -> None:
        start, end = source.span()
        n = end - start
        self._grow(self.rows + 1, n + 1)
        for dst, src in zip(self.buffers, source.cache.buffers):
            dst[self.rows, :, :n] = src[source.row, :, start:end]
        self._lengths[self.rows] = n
        self.rows += 1
        self._view = None

    def remove(self, slot: int) -> int | None:
        self._check_slot(slot)
        last = self.rows - 1
        if slot != last:
            n = int(self._lengths[last])
            for buf in self.buffers:
                buf[slot, :, :n] = buf[last, :, :n]
            self._lengths[slot] = n
        self.rows -= 1
        self._view = None
        if not self.rows:  # memory back to the process (the sessions' bindings let go too); the next row starts small
            self.buffers, self.capacity, self._lengths = [], 0, np.zeros(0, np.int64)
            self.engine._drop_stale_bindings()
        else:
            self._shrink()
        return last if slot != last else None

    def step(self, input_ids) -> np.ndarray:
        n = self.rows
        if not n:
            raise ValueError("the batch has no rows to step")
        lengths = self._lengths[:n]
        width = int(lengths.max()) + 1
        self._grow(n, width)
        if self._view is None:
            view = OrtCache(n, self.arch)
            view.capacity, view.buffers = self.capacity, [b[:n] for b in self.buffers]
            view.values = [self.engine._ort.OrtValue.ortvalue_from_numpy(b) for b in view.buffers]
            self._view = view
        lengths = self._lengths[:n]
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        ids = np.asarray(input_ids, np.int64).reshape(n, 1)
        logits = self.engine._run(ids, lengths.reshape(n, 1).copy(), mask, self._view, n)
        self._lengths[:n] += 1
        return logits


def _has_int8_weights(model) -> bool:
    """Whether an OpenVINO model holds 8-bit weight constants (an INT8 bundle's IR)."""
    import openvino as ov

    eight = {ov.Type.u8, ov.Type.i8}
    return any(op.get_type_name() == "Constant" and op.get_output_element_type(0) in eight for op in model.get_ops())


def _positive_int(value: str, model_path: Path, key: str) -> int:
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        raise ModelLoadError(f"{model_path}: metadata {key}={value!r} is not a positive integer; the bundle is "
                             "damaged or from an incompatible exporter, re-export it") from None
    return n


def _beside(model_path: Path, name: str, what: str, listed: frozenset[str] | None = None) -> Path:
    """The file `name` (from the graph's metadata) in the graph's directory, or a clear error. `listed`: the
    names of the files beside the graph that the bundle's manifest lists (None: not from a bundle); a file it
    does not list is refused even when present, since its hash was never checked and no OTA transfer carries it."""
    path = model_path.parent / name
    if not name or Path(name).name != name or not path.is_file():
        raise ModelLoadError(f"{model_path}: its {what} {name!r} is not beside it; the bundle is incomplete, "
                             "re-export it")
    if listed is not None and name not in listed:
        raise ModelLoadError(f"{model_path}: its {what} {name!r} is not listed in the bundle's manifest (its hash is "
                             "unchecked and an agent would not get it); re-export the bundle")
    return path


# x86 CPUs whose integer dot-product instruction multiplies u8 by s8 (VNNI, AMX): there ONNX Runtime's u8 x s8 GEMM
# ran 2.1x faster than its u8 x u8 one on glm-m's shapes (571 vs 268 GFLOP/s, 2 cores of an AVX-512 VNNI EPYC).
# Without VNNI its u8 x s8 kernel (vpmaddubsw) saturates int16 pair sums, so there the weights stay uint8.
VNNI_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
SIGNED_DATA = "prefill-s8.data"


def cpu_has_vnni() -> bool:
    from runtime.probe import probe_cpu

    return bool(VNNI_FEATURES & set(probe_cpu().features))


def _tensor_array(path: Path, t, maps: dict) -> np.ndarray:
    """Initializer `t` of the graph `path` as an array; external data memory-mapped (read-only, cached in
    `maps` per file), and only from a file in the graph's own directory."""
    from onnx import TensorProto, helper, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    loc = info["location"]
    if Path(loc).name != loc:
        raise ModelLoadError(f"{path}: tensor {t.name} names external data {loc!r} outside its directory")
    if loc not in maps:
        maps[loc] = np.memmap(path.parent / loc, np.uint8, "r")
    offset, length = int(info.get("offset", 0)), int(info["length"])
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return maps[loc][offset:offset + length].view(dtype).reshape(tuple(t.dims))


NARROW_BLOCK = 256  # the widest MatMulNBits block ONNX Runtime before 1.32 takes (16, 32, 64, 128 or 256)
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def takes_wide_blocks(version: str) -> bool:
    """True for an ONNX Runtime version that takes MatMulNBits blocks over NARROW_BLOCK (1.32 and later; an
    unreadable version counts as one: its refusal is caught anyway)."""
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= (1, 32)
    except ValueError:
        return True


def refuses_wide_blocks(exc: Exception) -> bool:
    """True for ONNX Runtime's refusal of a MatMulNBits block wider than it takes (1.31: "Only block sizes 16,
    32, 64, 128, and 256 are supported for MatMulNBits op, got: 1024")."""
    text = str(exc)
    return "MatMulNBits" in text and "block size" in text


def narrow_block_graph(path: Path, widest: int = NARROW_BLOCK) -> bytes | None:
    """The graph `path`, serialized, with each MatMulNBits block wider than `widest` split into blocks of
    `widest`: the weight bytes stay where they are (a column's blocks are contiguous either way, so only the
    tensor's shape changes and its external data is read from the bundle as it is; load the bytes with
    EXTERNAL_FOLDER_KEY set to the graph's directory), each block's scale (and zero point) is repeated for its
    parts. Per-channel weights (the exporter's) have one scale per row, so the weights are exactly the same;
    only the activations' int8 quantization (a scale per block of each token) gets finer. None when no block
    is wider. For ONNX Runtime before 1.32 (onnxruntime-gpu 1.31 among them), which refuses wider blocks."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise RuntimeError(f"this onnxruntime takes MatMulNBits blocks of up to {widest} inputs, and splitting the "
                           "bundle's wider ones needs the onnx package, which is not installed: "
                           "pip install 'onnx>=1.17' (an edgeglm dependency), or onnxruntime 1.32 or later") from None

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    maps: dict[str, np.memmap] = {}
    done: set[str] = set()
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or n.domain != "com.microsoft":
            continue
        attrs = {a.name: a for a in n.attribute}
        block, bits = attrs["block_size"].i, attrs["bits"].i if "bits" in attrs else 4
        zp = n.input[3] if len(n.input) > 3 and n.input[3] else None
        w, scales = inits.get(n.input[1]), inits.get(n.input[2])
        if block <= widest or block % widest or w is None or scales is None or len(w.dims) != 3 or \
                n.input[1] in done or (zp is not None and (bits != 8 or zp not in inits)):
            continue
        parts = block // widest
        rows, blocks, nbytes = w.dims
        w.dims[:] = [rows, blocks * parts, nbytes // parts]
        for name in [n.input[2]] + ([zp] if zp is not None else []):
            t = inits[name]
            a = _tensor_array(path, t, maps).reshape(rows, blocks)
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.repeat(a, parts, axis=1).reshape(
                (-1,) if len(t.dims) == 1 else (rows, blocks * parts))), name))
        attrs["block_size"].i = widest
        done.add(n.input[1])
    return model.SerializeToString() if done else None


def signed_weight_graph(path: Path, out_dir: Path) -> Path | None:
    """A copy of the W8A8 graph `path` in `out_dir` whose GEMMs take their weights as int8 (u8 x s8) instead of
    uint8 with zero point 128: each weight W (N, Kp) uint8 is written once, as W - 128 transposed to (Kp, N) int8,
    to `out_dir`/SIGNED_DATA (so the Transpose the exporter leaves for ONNX Runtime to fold is gone), and its
    GEMM's weight zero point becomes 0. The integer sums are the same, so are the logits. The graph's other
    (small) tensors are copied into the new graph. None when the graph has no such GEMM."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    maps: dict[str, np.memmap] = {}

    def array(t) -> np.ndarray:
        return _tensor_array(path, t, maps)

    zero = "edgeglm.s8.zero_point"
    converted, offset = 0, 0
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / SIGNED_DATA, "wb") as data:
        for n in g.node:
            if n.op_type != "MatMulIntegerToFloat" or n.domain != "com.microsoft" or len(n.input) < 6:
                continue
            t = producers.get(n.input[1])
            src = t.input[0] if t is not None and t.op_type == "Transpose" else None
            part, cut = None, producers.get(src)  # Transpose(Slice(W, start, end, axis 0)): rows of W
            if cut is not None and cut.op_type == "Slice" and users.get(src) == 1 and len(cut.input) >= 4 and \
                    all(i in inits for i in cut.input[1:4]):
                starts, ends, axes = (array(inits[i]).reshape(-1).tolist() for i in cut.input[1:4])
                if axes == [0] and len(starts) == len(ends) == 1:
                    part, src = (int(starts[0]), int(ends[0])), cut.input[0]
            w = inits.get(src) if src is not None else None
            zp = inits.get(n.input[5])
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"] if t is not None else []
            if w is None or w.data_type != TensorProto.UINT8 or len(w.dims) != 2 or perm not in ([], [[1, 0]]) or \
                    zp is None or zp.data_type != TensorProto.UINT8 or array(zp).reshape(-1).tolist() != [128] or \
                    users.get(t.output[0]) != 1:
                continue
            rows_of_w = array(w) if part is None else array(w)[part[0]:part[1]]
            signed = np.ascontiguousarray((rows_of_w ^ np.uint8(0x80)).view(np.int8).T)  # W - 128, (Kp, N)
            pad = -offset % 4096  # page-aligned, so ONNX Runtime maps it instead of reading it
            data.write(b"\0" * pad)
            offset += pad
            data.write(signed.tobytes())
            tag = "" if part is None else f".{part[0]}-{part[1]}"
            new = onnx.TensorProto(name=f"{w.name}{tag}.s8t", data_type=TensorProto.INT8, dims=list(signed.shape),
                                   data_location=TensorProto.EXTERNAL)
            for key, value in (("location", SIGNED_DATA), ("offset", str(offset)), ("length", str(signed.nbytes))):
                new.external_data.add(key=key, value=value)
            offset += signed.nbytes
            g.initializer.append(new)
            n.input[1], n.input[5] = new.name, zero
            t.output[0] = f"{t.output[0]}.unused"  # the Transpose (and its Slice) are dropped below
            if part is not None:
                cut.output[0] = f"{cut.output[0]}.unused"
            converted += 1
    if not converted:
        return None
    g.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))
    kept = [n for n in g.node if not (n.op_type in ("Transpose", "Slice") and n.output[0].endswith(".unused"))]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    for t in list(g.initializer):
        if t.name not in used:
            g.initializer.remove(t)
        elif t.data_location == TensorProto.EXTERNAL and not any(
                e.key == "location" and e.value == SIGNED_DATA for e in t.external_data):
            t.CopyFrom(numpy_helper.from_array(np.array(array(t)), t.name))  # a small tensor, now in the graph
    out = out_dir / path.name
    onnx.save(model, str(out))
    return out


def check_graph_architecture(inputs: dict, outputs: dict, arch: ModelArch) -> None:
    """ModelLoadError where a graph's KV inputs (past.N.key: batch, KV heads, positions, head_dim) or logits
    (batch, vocabulary) disagree with the manifest's architecture: a hand-edited or mismatched manifest failed
    at the first step with ONNX Runtime's "Failed to find input name in the mapping: past.8.key" or its
    "Got invalid dimensions for input". `inputs`/`outputs`: name -> shape (ints, or names for free dims);
    a graph with no such inputs (not a decoder graph of this runtime) is not checked."""
    layers = sorted(int(m[1]) for name in inputs if (m := re.fullmatch(r"past\.(\d+)\.key", name)))
    if not layers:
        return
    problems = []
    if layers != list(range(arch.num_layers)):
        problems.append(f"KV inputs for {len(layers)} layers (past.{layers[0]}.key .. past.{layers[-1]}.key) where "
                        f"num_hidden_layers is {arch.num_layers}")
    shape = list(inputs[f"past.{layers[0]}.key"] or [])
    for axis, field, want in ((1, "num_key_value_heads", arch.num_kv_heads), (3, "head_dim", arch.head_dim)):
        if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != want:
            problems.append(f"{shape[axis]} in axis {axis} of past.{layers[0]}.key where {field} is {want}")
    logits = list(outputs.get("logits") or [])
    if logits and isinstance(logits[-1], int) and logits[-1] != arch.vocab_size:
        problems.append(f"logits over {logits[-1]} tokens where vocab_size is {arch.vocab_size}")
    if problems:
        raise ModelLoadError(f"the model graph does not match the manifest's architecture: {'; '.join(problems)}; "
                             "the manifest was edited or belongs to another model: re-export the bundle")


ROPE_TABLE = "rope.cos"  # GroupQueryAttention's cos_cache: one row per position (models/onnx_graph.py)


def rope_table_rows(model_path: Path) -> int | None:
    """The positions the graph's rotary table covers (rows of its `rope.cos` initializer), None for a graph
    without one (rotary from position_ids: RotaryEmbedding or Cos/Sin nodes, as the GPU graph and OpenVINO's
    IR compute it, have no such limit). Read from the graph file without its external weights."""
    try:
        import onnx
    except ImportError:  # an install without onnx (the engine serves without it): no table to read, no check
        return None
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # a missing, truncated or foreign file
        raise ModelLoadError(f"{model_path}: not a readable ONNX graph ({_first_line(exc)})") from None
    table = next((t for t in model.graph.initializer if t.name == ROPE_TABLE), None)
    return int(table.dims[0]) if table is not None and table.dims else None


def check_rope_table(model_path: Path, arch: ModelArch) -> None:
    """ModelLoadError where the manifest's max_position_embeddings is larger than the graph's rotary table: the
    scheduler let prompts grow past the table, and the first step past it failed with ONNX Runtime's raw
    "cos_cache" error from GroupQueryAttention."""
    rows = rope_table_rows(model_path)
    if rows is not None and rows < arch.max_positions:
        raise ModelLoadError(f"{model_path}: its rotary table ({ROPE_TABLE}) covers {rows} positions, but the "
                             f"manifest's max_position_embeddings is {arch.max_positions}: longer contexts would "
                             "fail; the manifest was edited or belongs to another model: re-export the bundle (or set "
                             f"max_position_embeddings to at most {rows})")


def _ir_shapes(model) -> tuple[dict, dict]:
    """check_graph_architecture's view of an OpenVINO IR: its KV state variables ("past.N.key...") as inputs, its
    outputs, dims that are not static as "?"."""
    def dims(shape) -> list:
        return [d.get_length() if d.is_static else "?" for d in shape]
    states = {}
    for variable in model.get_variables():
        info = variable.get_info()
        if m := re.match(r"past\.(\d+)\.key", info.variable_id):
            states[f"past.{m[1]}.key"] = dims(info.data_shape)
    outputs = {name: dims(o.get_partial_shape()) for o in model.outputs for name in o.get_names()}
    return states, outputs


def block_kv_name(kind: str, layer: int, key: str, block: int) -> str:
    """The graph input ("past") or output ("present") of block `block` > 0's keys or values of one layer."""
    return f"{kind}.{layer}.{key}.block{block}"


def attention_block_inputs(n: int, batch: int, new: int, attention_mask: np.ndarray,
                           min_tokens: int = BLOCKED_MIN_TOKENS) -> tuple[bool, dict[str, np.ndarray]]:
    """The blocked prefill graph's per-step inputs: (split, {input name: array}). A one-sequence step of at least
    `min_tokens` new tokens, and at least half as many as the cache holds, is split into n consecutive blocks of
    its rows, each attending over the cache and the blocks before it (split=True: every block bound to the
    cache). Any other step runs whole in block 0 and
    blocks 1.. each take the first sequence's last token over a one-position scratch buffer of one sequence
    (position 0: a prompt of one token), so they cost almost nothing; the graph drops their rows."""
    mask = np.asarray(attention_mask)
    total = mask.shape[1]
    # each row's last valid position (row-aligned batches: trailing padding), as the decode graph computes it
    last = (mask * np.arange(1, total + 1)).max(axis=1).astype(np.int32) - 1
    past = int(last[0]) + 1 - new
    # over a cache, blocks pay only where the new tokens are a good part of what they attend to (glm-s, 512
    # cached: 64 new 1.13x the time of one block, 128 1.02x, 256 0.97x; from empty: 64 1.00x, 128 0.94x)
    split = batch == 1 and new >= max(min_tokens, n, past // 2)
    if split:
        ends = [round((j + 1) * new / n) for j in range(n)]
        rows = np.array([[0 if j == 0 else ends[j - 1], ends[j], 1] for j in range(n)], np.int64)
        seqlens = np.array([[past + e - 1] for e in ends], np.int32)
        totals = np.array([past + e for e in ends], np.int32)
    else:
        rows = np.array([[0, new, batch]] + [[new - 1, new, 1]] * (n - 1), np.int64)
        seqlens = np.concatenate([last[None], np.zeros((n - 1, batch), np.int32)])
        totals = np.array([total] + [1] * (n - 1), np.int32)
    return split, {BLOCK_ROWS_INPUT: rows, BLOCK_SEQLENS_INPUT: seqlens, BLOCK_TOTAL_INPUT: totals}


class _OrtRunner:
    """One ONNX Runtime session with its IOBinding, the cache it has bound and its logits buffers."""

    def __init__(self, session, arch: ModelArch):
        check_graph_architecture({i.name: i.shape for i in session.get_inputs()},
                                 {o.name: o.shape for o in session.get_outputs()}, arch)
        self.session, self.arch = session, arch
        self.binding = session.io_binding()
        self.bound = (None, 0, 0)  # (weakref to the cache whose buffers are bound, its capacity and rows then)
        # batch -> the first `batch` rows of one preallocated output (as large as the largest batch seen) and an
        # OrtValue over them: one array per batch size held vocab x 4 bytes x b(b+1)/2 (66 MB on glm-m at 32)
        self.logits: dict[int, tuple[np.ndarray, object]] = {}
        self._logits_rows = np.empty((0, arch.vocab_size), np.float32)
        self.kv_names = [(f"past.{i}.{k}", f"present.{i}.{k}") for i in range(arch.num_layers)
                         for k in ("key", "value")]
        names = {i.name for i in session.get_inputs()}
        # the blocked prefill graph (attention_block_inputs): its blocks after the first, their KV names
        shape = next(i.shape for i in session.get_inputs() if i.name == BLOCK_ROWS_INPUT) \
            if BLOCK_ROWS_INPUT in names else [1, 3]
        if shape[1] != 3:  # (n, 2): exported by a development version between two releases
            raise ModelLoadError(f"{BLOCK_ROWS_INPUT} of {shape} (expected (n, 3)): the bundle's prefill graph comes "
                                 "from a development version of the exporter; re-export the bundle with this version")
        self.blocks = int(shape[0])
        self.block_names = [[(block_kv_name("past", i, k, j), block_kv_name("present", i, k, j))
                             for i in range(arch.num_layers) for k in ("key", "value")] for j in range(1, self.blocks)]
        self.scratch: list = []  # the one-position buffers of idle blocks
        self.split = None  # whether the blocks are bound to the cache (True) or to scratch buffers (False)

    def run(self, ort, tokens: tuple[str, np.ndarray], position_ids, attention_mask, cache: OrtCache,
            batch: int) -> np.ndarray:
        b = self.binding
        held: list = []  # the OrtValues over this step's host arrays, alive until the run is over
        ref, cap, rows = self.bound
        rebind = ref is None or ref() is not cache or cap != cache.capacity or rows != cache.batch
        if rebind:
            cache.bind(b, self.kv_names)  # past and present: the same memory (GroupQueryAttention writes in place)
            self.bound = (weakref.ref(cache), cache.capacity, cache.batch)
        if self.blocks > 1:
            split, inputs = attention_block_inputs(self.blocks, batch, np.shape(tokens[1])[1], attention_mask,
                                                   BLOCKED_MIN_TOKENS)
            if rebind or split != self.split:
                for names in self.block_names:
                    if split:
                        cache.bind(b, names)
                    else:
                        for (past, present), value in zip(names, self._scratch(ort)):
                            b.bind_ortvalue_input(past, value)
                            b.bind_ortvalue_output(present, value)
                self.split = split
            for name, arr in inputs.items():
                bind_host_input(ort, b, name, arr, held)
        bind_host_input(ort, b, tokens[0], tokens[1], held)
        for name, arr in (("position_ids", position_ids), ("attention_mask", attention_mask)):
            bind_host_input(ort, b, name, np.ascontiguousarray(arr, np.int64), held)
        if batch not in self.logits:
            if batch > len(self._logits_rows):  # a larger buffer: the views over the old one go with it
                self._logits_rows = np.empty((batch, self.arch.vocab_size), np.float32)
                self.logits.clear()
            out = self._logits_rows[:batch]  # the leading rows: contiguous
            self.logits[batch] = (out, ort.OrtValue.ortvalue_from_numpy(out))
        out, out_value = self.logits[batch]
        b.bind_ortvalue_output("logits", out_value)
        self.session.run_with_iobinding(b)
        del held
        return out.copy()

    def _scratch(self, ort) -> list:
        """One-position KV buffers of one sequence for the idle blocks of a step that is not split: one per layer
        and key/value, shared by the blocks (each writes its ignored row at position 0)."""
        if not self.scratch:
            shape = (1, self.arch.num_kv_heads, 1, self.arch.head_dim)
            self.scratch = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.kv_names]
        return self.scratch


def bind_host_input(ort, binding, name: str, array: np.ndarray, held: list) -> None:
    """Bind a host array as input `name` of an IO binding, appending its OrtValue to `held`, which the caller
    keeps until the run is over. An OrtValue made from a numpy array on the CPU points at the array's memory,
    and before version 1.30 ONNX Runtime's IO binding kept no reference to it: an OrtValue (or a converted
    array) made for the call alone was freed before the run, which then read whatever reused that memory
    (a batch of rows joined with rows of another sequence's positions: found with onnxruntime 1.23 and 1.27)."""
    value = ort.OrtValue.ortvalue_from_numpy(array)
    held.append(value)
    binding.bind_ortvalue_input(name, value)


PREFILL_MODES = ("on", "off", "only")


def prefill_mode(value: bool | str) -> str:
    """"on", "off" or "only" from a `prefill_graph` setting (True / False accepted for on / off)."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in PREFILL_MODES:
        raise ValueError(f"prefill_graph={value!r} is invalid: choose true / \"on\", false / \"off\" or \"only\" "
                         "(agent.model.load_model also takes \"auto\": chosen by the memory available)")
    return value


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def require_provider(session, provider: str) -> None:
    """Raise BackendUnavailable unless `session` really runs on `provider` (not a CPU session made instead)."""
    running = session.get_providers()
    if provider not in running:
        raise BackendUnavailable(f"ONNX Runtime execution provider {provider!r} did not start; the session runs on "
                                 f"{', '.join(running)} instead")


def _first_line(exc: Exception) -> str:
    """ONNX Runtime's message without its C++ source location ("/src/x.cc:729 void f(args) Please install ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ [^()]*\([^()]*\)\s*", "", lines[0]) if lines else type(exc).__name__
    return text[:300]


def _preload_gpu_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries that `pip install onnxruntime-gpu[cuda,cudnn]` puts in the nvidia-*
    packages, so that the CUDA provider finds them without LD_LIBRARY_PATH (onnxruntime >= 1.21; a
    system-wide CUDA install is found by the loader either way)."""
    global _GPU_LIBRARIES_PRELOADED
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or _GPU_LIBRARIES_PRELOADED:
        return
    _GPU_LIBRARIES_PRELOADED = True
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # it print()s what it cannot find: not on our stdout (--json)
            preload()
    except Exception as exc:  # missing wheels: the provider may still find a system CUDA
        log.debug("onnxruntime.preload_dlls: %s", exc)
    if said.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", " ".join(said.getvalue().split()))


_GPU_LIBRARIES_PRELOADED = False


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, model_path: Path, arch: ModelArch, threads: int | None = None,
                 provider: str = "CPUExecutionProvider", pinned: bool = False, prefill_graph: bool | str = True,
                 gpu_graph: bool | None = None, listed: frozenset[str] | None = None,
                 signed_weights: bool | None = None):
        """`provider`: the execution provider (CPU falls back for nodes it cannot run); `pinned`: one
        intra-op thread per physical core (the calling thread is not pinned); `prefill_graph`: True / "on"
        runs steps of `prefill_min_rows`+ token rows on the bundle's prefill graph, if it has one; False /
        "off": the decode graph runs everything; "only": the prefill graph runs everything and the decode
        graph is not loaded (one copy of the weights in memory; single-stream decode slower).
        `gpu_graph`: run the bundle's GPU variant (GPU_GRAPH_FILE: attention and the KV cache in fp16, the
        cache kept in the provider's memory as DeviceCache) instead of the decode and prefill graphs; None:
        on the CUDA and TensorRT providers, where the bundle has one. True on the CPU provider runs the same
        code with the cache in host memory (slower than the decode graph there; for tests). `listed`: the names of
        the files beside the graph that its bundle's manifest lists; the graphs and tables the graph's metadata
        names must be among them (None: a graph outside a bundle, as the exporter checks it).
        `signed_weights`: the prefill graph's GEMMs take int8 weights (u8 x s8, `signed_weight_graph`: the same
        sums, written at load to a temporary directory, removed once the session is made); None: on the CPU
        provider where the CPU has VNNI (VNNI_FEATURES), where ONNX Runtime's u8 x s8 kernel is twice as fast."""
        import onnxruntime as ort

        mode = prefill_mode(prefill_graph)

        self.arch, self._ort = arch, ort
        if provider in GPU_PROVIDERS:
            _preload_gpu_libraries(ort)
        if provider not in ort.get_available_providers():
            raise BackendUnavailable(f"ONNX Runtime execution provider {provider!r} is not available; found: "
                                     f"{', '.join(ort.get_available_providers())}")
        affinities = None
        n_threads = threads or _default_threads()
        if pinned and n_threads > 1:
            cpus = cpus_one_per_core()[1:n_threads]  # 1-based ids, one per extra thread
            if len(cpus) == n_threads - 1:
                affinities = ";".join(str(c + 1) for c in cpus)

        def options(spin_duration_us: int | None = None):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = n_threads, 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if affinities:
                opts.add_session_config_entry("session.intra_op_thread_affinities", affinities)
            if spin_duration_us is not None:
                opts.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_duration_us))
            return opts

        providers = [provider] + (["CUDAExecutionProvider"] if provider == "TensorrtExecutionProvider" else []) \
            + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])

        if signed_weights is None:
            signed_weights = provider == "CPUExecutionProvider" and cpu_has_vnni()
        elif signed_weights and not cpu_has_vnni():
            log.warning("signed_weights=True on a CPU without VNNI: ONNX Runtime's u8 x s8 kernel saturates there "
                        "and prompts get wrong logits; leave it unset (chosen by the CPU)")
        self.signed_weights = False  # True once a prefill graph runs on int8 weights

        def session(path: Path, opts=None, signed: bool = False):
            return self._signed_session(path, plain_session, opts) if signed else plain_session(path, opts)

        # not one recursive function: a closure that refers to itself is a reference cycle holding `self`, so
        # a dropped engine (each path the autotune measured, a model replaced over the air) kept its sessions'
        # memory until Python's cyclic collector happened to run (glm-m: the autotune measuring six paths
        # "one at a time" peaked at 2.75 GB, as if loaded together)
        def plain_session(path: Path, opts=None):
            try:
                # enable_fallback=0: when the provider cannot start (a GPU provider without its CUDA or TensorRT
                # libraries), ONNX Runtime's Python layer would otherwise print to stdout and quietly make a CPU
                # session, which the autotune would then measure and report as that provider
                # ONNX Runtime before 1.32 (onnxruntime-gpu 1.31 too) takes MatMulNBits blocks of up to 256: split
                # wider ones up front there (no failed attempt, no error in ONNX Runtime's log), and wherever
                # it refuses them
                narrowed = None if takes_wide_blocks(ort.__version__) else narrow_block_graph(path)
                try:
                    if narrowed is None:
                        made = ort.InferenceSession(str(path), opts or options(), providers=providers,
                                                    enable_fallback=0)
                except Exception as exc:
                    narrowed = narrow_block_graph(path) if refuses_wide_blocks(exc) else None
                    if narrowed is None:
                        raise
                if narrowed is not None:
                    narrow_opts = opts or options()
                    narrow_opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(path.parent))
                    made = ort.InferenceSession(narrowed, narrow_opts, providers=providers, enable_fallback=0)
                    log.warning("%s: ONNX Runtime %s takes MatMulNBits blocks of up to %d inputs, not the bundle's "
                                "wider ones: loaded with its blocks split (the same weights; activations quantized "
                                "per %d inputs); onnxruntime 1.32 or later runs the bundle as exported, a few "
                                "percent faster", path, ort.__version__, NARROW_BLOCK, NARROW_BLOCK)
            except Exception as exc:  # ORT raises its own untyped errors for bad files
                if provider != "CPUExecutionProvider":  # missing CUDA/TensorRT libraries, no device, an op it lacks
                    raise BackendUnavailable(f"ONNX Runtime execution provider {provider!r} could not load "
                                             f"{path.name}: {_first_line(exc)}") from None
                raise ModelLoadError(f"{path}: ONNX Runtime could not load the model ({exc})") from None
            require_provider(made, provider)
            return made

        main = Path(model_path)
        self._kv_device: str | None = None  # where a DeviceCache keeps the KV (None: OrtCache, host numpy)
        self._kv_dtype = np.float32
        if gpu_graph and provider not in GPU_PROVIDERS + ("CPUExecutionProvider",):
            raise ModelLoadError(f"gpu_graph runs on the CPU, CUDA or TensorRT providers, not {provider!r}")
        if gpu_graph or (gpu_graph is None and provider in GPU_PROVIDERS):
            # named by the (hashed, signed) decode graph, not found by file name
            name = self._metadata(main, ort).get(GPU_GRAPH_KEY)
            if name:
                main, mode = _beside(main, name, "GPU graph", listed), "off"  # prompts too: the W8A8 graph is for CPUs
                self._kv_device = "cpu" if provider == "CPUExecutionProvider" else "cuda"
                self._kv_dtype = np.float16
            elif gpu_graph:
                raise ModelLoadError(f"{model_path}: the bundle has no GPU graph ({GPU_GRAPH_FILE}); re-export it")
            else:
                log.warning("%s: the bundle predates its GPU graph (%s): on %s attention runs on the CPU and "
                            "the KV cache stays in host memory; re-export it", model_path, GPU_GRAPH_FILE, provider)
        # with a prefill graph, two sessions take turns on the same cores: each one's worker threads may
        # spin only briefly after a run. ORT's default spin kept them busy for tens of ms, taking the cores
        # from the other session's next steps (the first 16 decode tokens after a prefill at 186 instead of
        # 322 tok/s on glm-s; a 16-token step after a prefix hit on glm-m 75 -> 47 ms once the decode
        # session stopped spinning). Decode itself does not slow down with 1 ms (glm-s 449 vs 455, glm-m
        # 70 vs 69 tok/s); no spinning at all costs a prefill about 12%.
        spin = SPIN_AFTER_RUN_US if mode == "on" else None
        if mode == "only":
            main = self._prefill_only(main, ort, listed)
            mode = "only" if main != Path(model_path) else "off"
        check_rope_table(main, arch)
        self.session = session(main, options(spin),
                               signed=signed_weights and mode == "only" and main != Path(model_path))
        meta = self.session.get_modelmeta().custom_metadata_map
        kv = meta.get(KV_CACHE_KEY)
        if kv != "shared-buffer":
            raise ModelLoadError(f"{model_path}: not a fused decoder graph ({KV_CACHE_KEY}={kv!r}, expected "
                                 "'shared-buffer'); re-export the bundle with this version")
        if self._kv_device and meta.get(KV_DTYPE_KEY) != "float16":
            raise ModelLoadError(f"{main}: not an fp16-cache GPU graph ({KV_DTYPE_KEY}={meta.get(KV_DTYPE_KEY)!r})")
        self.device = provider
        self._embeddings = self._embedding_table(Path(model_path), meta, listed)
        self._decode = _OrtRunner(self.session, arch)
        # see RaggedBatch; a cache in device memory is batched with DeviceRaggedBatch (the KV copy graph)
        self._kv_copy = self._kv_copy_session(KV_COPY_GRAPH) if self._kv_device else None  # (session, binding)
        # joins into a free slot and leaves write one row in place; without it every change rebuilds the batch
        self._kv_write = self._kv_copy_session(KV_WRITE_GRAPH) if self._kv_copy is not None else None
        # GroupQueryAttention rotates a multi-token step from each row's first position (ROTARY_KEY)
        self.consecutive_positions = meta.get(ROTARY_KEY) == "from-row-start"
        self.ragged_batches = meta.get(BATCH_ROWS_KEY) == "ragged" and (
            self._kv_device is None or self._kv_copy is not None)
        self.kv_memory = f"{self._kv_device} memory" if self._kv_device else "host memory"  # where the KV lives
        self.kv_cache = f"{self.kv_memory}, float16 ({main.name})" if self._kv_device else f"{self.kv_memory}, float32"
        self.gpu_graph: str | None = main.name if self._kv_device else None  # the GPU graph serving, if it is
        self.prompt_run_tokens: int | None = PROMPT_RUN_TOKENS  # longer inputs run in pieces (None: whole)
        self._prefill = self._decode
        self.prefill_graph: str | None = main.name if mode == "only" else None  # the prefill graph in use
        self.prefill_only = mode == "only"
        # steps of >= prefill_min_rows rows (batch x tokens; legacy graphs: tokens per row) run on it
        self._rows_per_step = PREFILL_ROWS_KEY in meta
        self.prefill_min_rows = _positive_int(meta[PREFILL_ROWS_KEY], model_path, PREFILL_ROWS_KEY) \
            if self._rows_per_step else LEGACY_PREFILL_MIN_TOKENS
        name = meta.get(PREFILL_GRAPH_KEY)
        if name and mode == "on":
            prefill_path = _beside(Path(model_path), name, "prefill graph", listed)
            check_rope_table(prefill_path, arch)
            self._prefill = _OrtRunner(session(prefill_path, options(spin), signed=signed_weights), arch)
            self.prefill_graph = name
        # GroupQueryAttention nodes per layer of the graph prompts take (its attention in blocks: 4; else 1)
        self.prefill_attention_blocks = self._prefill.blocks

    def _signed_session(self, path: Path, session, opts):
        """`session(path)` of the W8A8 graph with int8 weights (signed_weight_graph), or of `path` as it is, with
        a warning, where that copy cannot be made (no room in the temporary directory, no `onnx`, a copy ONNX
        Runtime refuses)."""
        import shutil
        import tempfile

        where = os.environ.get("TMPDIR") or "/tmp"
        made = None
        try:
            where = tempfile.gettempdir()
            data = path.parent / "model.onnx.data"
            need = data.stat().st_size if data.exists() else 0
            free = shutil.disk_usage(where).free
            if free < need + (64 << 20):
                raise OSError(f"{free >> 20} MiB free, about {need >> 20} MiB needed")
            with tempfile.TemporaryDirectory(prefix="edgeglm-s8-", ignore_cleanup_errors=True) as tmp:
                signed = signed_weight_graph(path, Path(tmp))
                if signed is not None:
                    made = session(signed, opts)
        except Exception as exc:  # no room, no onnx, or a copy ONNX Runtime refused: the uint8 graph still serves
            log.warning("%s: its int8-weight copy could not be made (%s): prompts run on uint8 weights, about half "
                        "as fast on this CPU (free space in %s, or set TMPDIR)", path, _first_line(exc), where)
            made = None
        if made is not None:
            self.signed_weights = True
            return made
        return session(path, opts)

    @staticmethod
    def _metadata(model_path: Path, ort) -> dict:
        """A graph's metadata, read from the file (not by a session: ONNX Runtime before 1.32 cannot make one
        of the decode graph as exported, see narrow_block_graph)."""
        import onnx

        try:
            model = onnx.load(str(model_path), load_external_data=False)
        except Exception as exc:  # a missing, truncated or foreign file
            raise ModelLoadError(f"{model_path}: not a readable ONNX graph ({_first_line(exc)})") from None
        return {p.key: p.value for p in model.metadata_props}

    @staticmethod
    def _prefill_only(model_path: Path, ort, listed: frozenset[str] | None = None) -> Path:
        """The prefill graph that can run every step alone (named by the decode graph's metadata), or
        `model_path` with a warning when the bundle has none (fp32, or a prefill graph from before
        `edgeglm.prefill_min_rows`, whose single-token steps are slow). The decode graph is opened
        without optimizing or prepacking, only to read its metadata."""
        meta = OnnxRuntimeEngine._metadata(model_path, ort)
        name = meta.get(PREFILL_GRAPH_KEY)
        if name and PREFILL_ROWS_KEY in meta:
            return _beside(model_path, name, "prefill graph", listed)
        log.warning("%s: prefill_graph='only' asked for, but this bundle has no prefill graph that can decode "
                    "(%s); running its decode graph for everything", model_path,
                    "none" if not name else "exported before edgeglm.prefill_min_rows")
        return model_path

    def _embedding_table(self, model_path: Path, meta: dict, listed: frozenset[str] | None) -> EmbeddingTable | None:
        """The table the graph's `inputs_embeds` come from; None for graphs that gather inside."""
        if "inputs_embeds" not in {i.name for i in self.session.get_inputs()}:
            return None
        return EmbeddingTable(_beside(model_path, meta.get(EMBEDDINGS_KEY, ""), "embedding table", listed),
                              self.arch.vocab_size)

    def new_cache(self, batch: int = 1) -> OrtCache:
        if self._kv_device:
            return DeviceCache(batch, self.arch, self._kv_device, self._kv_dtype,
                               copier=self.copy_kv if self._kv_copy is not None else None)
        return OrtCache(batch, self.arch)

    def _kv_copy_session(self, graph: Path):
        """(session, io binding) of `graph` (KV_COPY_GRAPH or KV_WRITE_GRAPH) on the cache's provider, made at
        load so that a first batch does not wait for it; None, with a warning, where it is missing or does
        not load (without the copy graph device caches are grown and merged through the host, as
        MergedBatch; without the write graph every join and leave rebuilds the batch's buffers)."""
        # the copy's intermediates: no CPU arena; the CUDA arena grows by what is asked, not to powers of two
        # (shrinking it after each copy made a leave + join 2.1 -> 4.1 ms on an H200, and the memory the
        # driver reported did not change)
        providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),
                     "CPUExecutionProvider"] if self._kv_device == "cuda" else ["CPUExecutionProvider"]
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.enable_cpu_mem_arena = False
        # errors only: at each load on CUDA, ORT warned that it copies the row and position inputs (a few
        # int64s) from the host. (Its warning that ScatterND is correct only without duplicate indices comes
        # from the process-wide logger and still shows; the write graph makes one per layer, head, position.)
        opts.log_severity_level = 3
        try:
            # no fallback: a copy session that fell back to the CPU (CUDA out of memory at load) was bound to the
            # device cache's memory, and every join and leave of a batch failed its requests
            session = self._ort.InferenceSession(str(graph), opts, providers=providers, enable_fallback=0)
            if self._kv_device == "cuda":
                require_provider(session, "CUDAExecutionProvider")
        except Exception as exc:  # missing file, a provider that did not start, or ORT's own untyped errors
            what, effect = ("copy", "batches on %s are merged through the host") if graph == KV_COPY_GRAPH else \
                ("write", "every join and leave of a batch on %s copies the whole batch")
            log.warning("%s: ONNX Runtime could not load the KV %s graph (%s): %s; reinstall edgeglm", graph, what,
                        _first_line(exc), effect % self._kv_device)
            return None
        return session, session.io_binding()

    @property
    def can_write_kv(self) -> bool:
        return self._kv_write is not None

    def write_kv(self, dst: DeviceCache, slot: int, src: DeviceCache, src_row: int, src_start: int) -> None:
        """Write row `src_row` of `src` (positions src_start.., cut or zero-filled to dst's capacity) into
        row slot `slot` of `dst`'s buffer, in place: one run of KV_WRITE_GRAPH, its output bound to dst's
        own memory; `src` may be `dst`. Nothing else in `dst` changes."""
        session, binding = self._kv_write
        shape = dst.kv.shape()
        if not 0 <= slot < shape[1]:
            raise ValueError(f"row slot {slot} is outside the buffer's {shape[1]} slots")
        ptr = dst.kv.data_ptr()
        binding.bind_input("kv", dst.device, dst.device_id, dst.dtype, shape, ptr)
        binding.bind_output("out", dst.device, dst.device_id, dst.dtype, shape, ptr)  # in place
        binding.bind_ortvalue_input("src", src.kv)
        held: list = []
        for name, n in (("src_row", src_row), ("src_start", src_start), ("slot", slot)):
            bind_host_input(self._ort, binding, name, np.array([n], np.int64), held)
        try:
            session.run_with_iobinding(binding)
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def copy_kv(self, a: DeviceCache, a_rows, b: DeviceCache | None, b_rows, b_start: int, capacity: int):
        """A new device buffer for a DeviceCache (its `kv`): rows `a_rows` of `a`, then rows `b_rows` of `b`
        (None: `a`) from position `b_start` on, every layer's keys and values cut or zero-filled to
        `capacity` positions. One run of KV_COPY_GRAPH on the cache's provider; nothing is read to the host."""
        session, binding = self._kv_copy
        a_rows, b_rows, b = list(a_rows), list(b_rows), a if b is None else b
        held: list = []
        for name, arr in (("a_rows", a_rows), ("b_rows", b_rows), ("b_start", [b_start]), ("cap", [capacity])):
            bind_host_input(self._ort, binding, name, np.asarray(arr, np.int64).reshape(-1), held)
        binding.bind_ortvalue_input("a", a.kv)
        binding.bind_ortvalue_input("b", b.kv)
        layers_kv, _, heads, _, head_dim = a.kv.shape()
        # the new buffer comes from the allocator every cache's buffer comes from (put), not from this
        # session's arena, so that memory a batch gives back serves the next caches
        out = self._ort.OrtValue.ortvalue_from_shape_and_type(
            [layers_kv, len(a_rows) + len(b_rows), heads, capacity, head_dim], a.dtype, a.device, a.device_id)
        binding.bind_ortvalue_output("out", out)
        try:
            session.run_with_iobinding(binding)
        finally:
            binding.clear_binding_inputs()  # keep no cache's memory alive
            binding.clear_binding_outputs()
        return out

    def forward(self, input_ids, position_ids, attention_mask, cache: OrtCache, prompt_tokens: int | None = None):
        """One step. `prompt_tokens`: this step is part of a prompt of that many tokens (a chunk, or what is left
        after a prefix-cache hit), and runs on the graph the whole prompt would run on, so that its logits are
        those of a cold, unchunked prefill (an INT8 bundle's prefill and decode graphs round differently: a
        greedy answer could change with a cache hit)."""
        batch, new, total = cache._check(input_ids, attention_mask)
        if self.consecutive_positions and new > 1 and np.any(np.diff(np.asarray(position_ids), axis=1) != 1):
            raise ValueError("this bundle's graph takes a multi-token step's positions as consecutive from each "
                             "row's first one (GroupQueryAttention rotates q and k itself), but position_ids are "
                             "not (a left-padded prompt batch?): prefill each sequence alone, then batch the decode "
                             "steps (engine.new_batch())")
        cache.reserve(total, self.arch, self._ort)
        piece = self.prompt_run_tokens
        # one sequence only: GroupQueryAttention takes several new tokens over a cache for one row at a time
        if piece and new > piece and batch == 1:
            return self._run_in_pieces(input_ids, position_ids, attention_mask, cache, batch, piece,
                                       prompt_tokens or new), cache
        out = self._run(input_ids, position_ids, attention_mask, cache, batch, prompt_tokens)
        cache.length = total
        return out, cache

    def _run_in_pieces(self, input_ids, position_ids, attention_mask, cache: OrtCache, batch: int, piece: int,
                       prompt_tokens: int) -> np.ndarray:
        """`forward` of a long input as runs of at most `piece` tokens, each attending over the cache so far;
        every run is on the graph the whole input would take. The logits are the last run's. If a run fails,
        the cache is left holding what it held before (its length unchanged), as after a failed whole run."""
        past, new = cache.length, np.shape(input_ids)[1]
        try:
            for start in range(0, new, piece):
                end = min(new, start + piece)
                out = self._run(input_ids[:, start:end], position_ids[:, start:end], attention_mask[:, :past + end],
                                cache, batch, prompt_tokens)
                cache.length = past + end
        except BaseException:
            cache.length = past
            raise
        return out

    def _run(self, input_ids, position_ids, attention_mask, cache: OrtCache, batch: int,
             prompt_tokens: int | None = None) -> np.ndarray:
        tokens_per_row = max(np.shape(input_ids)[1], prompt_tokens or 0)  # a prompt's chunk: the whole prompt's
        rows = batch * tokens_per_row if self._rows_per_step else tokens_per_row
        runner = self._prefill if self._on_prefill(rows) else self._decode
        if runner.blocks > 1 and not np.asarray(attention_mask)[:, 0].all():
            # left padding (a row whose first position is masked): the blocked prefill graph attends by each
            # row's length only (no padding bias); the decode graph masks padding
            if self._decode.blocks > 1:
                raise ValueError("this engine runs only the prefill graph (prefill_graph='only'), which takes "
                                 "row-aligned batches (each row's positions from 0), not left-padded ones: "
                                 "batch with engine.new_batch(), or load with prefill_graph='on'")
            runner = self._decode
        if self._embeddings is None:
            tokens = ("input_ids", np.ascontiguousarray(input_ids, np.int64))
        else:
            tokens = ("inputs_embeds", self._embeddings[input_ids])  # (batch, seq, hidden)
        return runner.run(self._ort, tokens, position_ids, attention_mask, cache, batch)

    def prompt_graph(self, prompt_tokens: int) -> str:
        """Which graph a prompt of this many tokens runs on ("prefill" or "decode"; "" with one graph): as `_run`
        routes a batch-1 prompt and its chunks (`prompt_tokens`). The prefix cache keys blocks by it: the two
        graphs' KV of the same tokens differ by rounding (W8A8 against MatMulNBits)."""
        if self._prefill is self._decode:
            return ""
        return "prefill" if self._on_prefill(prompt_tokens) else "decode"

    def _on_prefill(self, rows: int) -> bool:
        """Whether a step of this many token rows runs on the prefill graph (`prefill_min_rows`)."""
        return rows >= self.prefill_min_rows

    @property
    def routes_by_rows(self) -> bool:
        """True when steps go to the decode or the prefill graph by their token rows (`prefill_min_rows`): both
        CPU graphs loaded, row-aligned batches, a bundle that records rows per step (runtime.autotune measures
        the threshold for such an engine)."""
        return self._prefill is not self._decode and self.ragged_batches and not self.gpu_graph \
            and self._rows_per_step

    def _drop_stale_bindings(self) -> None:
        """Unbind the KV buffers of caches that are gone (a batch that emptied): an IO binding keeps
        what it binds alive, so without this their memory would stay held until the next run."""
        for runner in {id(r): r for r in (self._decode, self._prefill)}.values():
            ref = runner.bound[0]
            if ref is not None and ref() is None:
                runner.binding.clear_binding_inputs()
                runner.binding.clear_binding_outputs()
                runner.bound = (None, 0, 0)

    def new_batch(self) -> DecodeBatch:
        """An empty DecodeBatch: row-aligned on graphs that take it, else merged and left-padded."""
        if not self.ragged_batches:
            return MergedBatch(self)
        return DeviceRaggedBatch(self) if self._kv_device else RaggedBatch(self)

    def merge_caches(self, rows: list[CacheRow]) -> tuple[OrtCache, np.ndarray]:
        """A new left-padded batch cache holding `rows` (copied), and its attention mask (batch, length)."""
        spans, total, mask = _merge_plan(rows)
        merged = self.new_cache(len(rows))
        fresh = merged.blank(_grown_capacity(0, total, self.arch), self.arch)
        held = {id(r.cache): r.cache.host() for r in rows}  # a device cache is read once, not once per row
        for k, dst in enumerate(fresh):
            for i, (row, (start, end)) in enumerate(zip(rows, spans)):
                dst[i, :, total - (end - start):total] = held[id(row.cache)][k][row.row, :, start:end]
        merged.put(fresh, self._ort)
        merged.length = total
        return merged, mask

    def export_kv(self, cache: OrtCache, length: int) -> KvBlock:
        """Positions [0, length) of a batch-1 cache, copied out (as float32)."""
        _batch_one(cache, length)
        held = cache.host()
        return KvBlock(tuple(b[0, :, :length].astype(np.float32) for b in held[0::2]),
                       tuple(b[0, :, :length].astype(np.float32) for b in held[1::2]))

    def cache_from_kv(self, block: KvBlock) -> OrtCache:
        """A new batch-1 cache holding the block's positions (copied)."""
        block.check(self.arch)
        cache = self.new_cache(1)
        if block.length:
            fresh = cache.blank(_grown_capacity(0, block.length, self.arch), self.arch, filled=block.length)
            block.write_to([a[0] for a in fresh])
            cache.put(fresh, self._ort)
            cache.length = block.length
        return cache


class OvCache(KVCache):
    """An OpenVINO sequence: its state lives in the engine's infer request while it is the active one."""

    def __init__(self, batch: int):
        super().__init__(batch)
        self.saved: dict[str, np.ndarray] | None = None  # state parked here while another sequence runs


# properties the OpenVINO CPU plugin takes although SUPPORTED_PROPERTIES does not list them
OV_UNLISTED_PROPERTIES = {"CPU": {"CPU_RUNTIME_CACHE_CAPACITY"}}


class OpenVinoEngine:
    merged_cache_exact = True  # merge_caches makes a state of exactly the rows (MergedBatch.kv_bound)
    backend = "openvino"
    # one infer request holds one sequence's state: running another cache copies the active one out and
    # the other in, so interleaving a prompt's chunks with batch steps would copy both at every chunk
    swaps_state = True

    def __init__(self, *args, **kwargs):
        with same_signal_stack():  # OpenVINO's Core and compile replace the thread's alternate signal stack
            self._open(*args, **kwargs)

    def _open(self, model_path: Path, arch: ModelArch, threads: int | None = None, device: str = "CPU",
                 precision: str | None = "f32", kv_cache_precision: str | None = "f32", pinned: bool | None = None):
        """`precision`/`kv_cache_precision`: INFERENCE_PRECISION_HINT / KV_CACHE_PRECISION (None: the
        device's default); the f32 defaults keep the golden check exact, bf16/f16/u8 trade exactness
        for speed. `threads` and `pinned` (ENABLE_CPU_PINNING; None: the plugin's default) apply to CPU."""
        import openvino as ov

        self.arch, self._ov = arch, ov
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendUnavailable(
                f"OpenVINO device {device!r} is not available; found: {', '.join(core.available_devices)}")
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": kv_cache_precision,
                  # the CPU plugin's runtime cache (kernels per input shape) kept each compiled model alive after
                  # it was released: one thread and ~10 MB per load of glm-s that served a request, every OTA
                  # switch, self-test and autotune trial, for the life of the agent. Off, nothing stays; OpenVINO
                  # decode ~7% and prefill up to ~20% slower on the test box (benchmarks/ov_reload.py,
                  # performance.md "OpenVINO reloads")
                  "CPU_RUNTIME_CACHE_CAPACITY": 0 if device == "CPU" else None}
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads or _default_threads()
            config["ENABLE_CPU_PINNING"] = pinned
        supported = set(map(str, core.get_property(device, "SUPPORTED_PROPERTIES")))
        supported |= OV_UNLISTED_PROPERTIES.get(device, set())
        config = {k: v for k, v in config.items() if v is not None and k in supported}
        try:
            model = core.read_model(str(model_path))
            if not model.get_sinks():
                raise ModelLoadError(f"{model_path}: not a stateful decoder IR (no KV-cache variables); "
                                     "re-export the bundle with this version")
            check_graph_architecture(*_ir_shapes(model), arch)
            try:
                self.compiled = core.compile_model(model, device, config)
            except Exception as exc:  # an OpenVINO that refuses an unlisted property: without it
                unlisted = [k for k in config if k in OV_UNLISTED_PROPERTIES.get(device, set()) and k in str(exc)]
                if not unlisted:
                    raise
                log.warning("OpenVINO %s refused %s (%s); compiled without it", device, ", ".join(unlisted),
                            _first_line(exc))
                self.compiled = core.compile_model(model, device, {k: v for k, v in config.items()
                                                                   if k not in unlisted})
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{model_path}: OpenVINO could not load the model ({exc})") from None
        self.request = self.compiled.create_infer_request()
        self.device = device
        self._active = None  # weakref to the OvCache whose state the request holds
        # the precisions the compiled model runs in (the hints, or the device's defaults: bf16 and a u8 KV
        # cache on many CPUs, f16 on GPUs). Only at f32 with an f32 KV cache does a prompt resumed from cached
        # KV (runtime/prefix_cache.py) give the logits of the whole prompt: bf16 rounding depends on how many
        # tokens a step runs, and cached KV taken out and put back is quantized again
        self.precisions = {name: self._compiled_type(name) for name in ("INFERENCE_PRECISION_HINT",
                                                                         "KV_CACHE_PRECISION")}
        inexact = {k: v for k, v in self.precisions.items() if v not in ("f32", None)}
        # the CPU plugin quantizes the activations of int8-weight products on the fly, per group of this many
        # (32 by default): how a prompt is split into steps then changes its logits (0.012 on glm-s, a 100-token
        # prompt whole against 64 + 36), so a prompt resumed from cached KV is not the whole prompt's either.
        # Left on: it makes OpenVINO's int8 prefill 1.7x faster (glm-s, 512 tokens: 110 against 190 ms)
        group = self._compiled_int("DYNAMIC_QUANTIZATION_GROUP_SIZE")
        if group and _has_int8_weights(model):
            inexact["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
        self.inexact_resume = (", ".join(f"{k} {v}" for k, v in inexact.items()) or None) if inexact else None

    def _compiled_int(self, name: str) -> int | None:
        try:
            return int(self.compiled.get_property(name))
        except Exception:  # noqa: BLE001: a device or version without the property
            return None

    def _compiled_type(self, name: str) -> str | None:
        """A precision property of the compiled model ('f32', 'bf16', 'u8', ...), None if it has none."""
        try:
            value = self.compiled.get_property(name)
        except Exception:  # noqa: BLE001: a device without the property
            return None
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    def new_cache(self, batch: int = 1) -> OvCache:
        return OvCache(batch)

    def _activate(self, cache: OvCache) -> None:
        active = self._active() if self._active is not None else None
        if active is cache:
            if cache.length == 0:
                self.request.reset_state()
            return
        if active is not None and active.length > 0:
            active.saved = {s.name: s.state.data.copy() for s in self.request.query_state()}
        self.request.reset_state()
        if cache.saved is not None:
            for s in self.request.query_state():
                s.state = self._ov.Tensor(cache.saved[s.name])
            cache.saved = None
        self._active = weakref.ref(cache)

    def forward(self, input_ids, position_ids, attention_mask, cache: OvCache, prompt_tokens: int | None = None):
        """One step (`prompt_tokens`: see OnnxRuntimeEngine.forward; OpenVINO runs one graph for everything)."""
        ov, r = self._ov, self.request
        cache._check(input_ids, attention_mask)
        _check_window(self.arch, attention_mask.shape[1])  # the graph would run past it without a word
        self._activate(cache)
        for name, arr in (("input_ids", input_ids), ("position_ids", position_ids),
                          ("attention_mask", attention_mask)):
            r.set_tensor(name, ov.Tensor(np.ascontiguousarray(arr, np.int64), shared_memory=True))
        r.infer()
        cache.length = attention_mask.shape[1]
        return r.get_output_tensor(0).data.copy(), cache

    def _state_of(self, cache: OvCache) -> dict[str, np.ndarray]:
        """The cache's state tensors (batch, kv_heads, length, head_dim), read where they live now."""
        active = self._active() if self._active is not None else None
        if active is cache:
            return {s.name: s.state.data for s in self.request.query_state()}
        if cache.saved is None:
            raise ValueError(f"an OpenVINO cache of {cache.length} positions has no saved state to merge")
        return cache.saved

    def new_batch(self) -> DecodeBatch:
        """An empty DecodeBatch (merged and left-padded: the stateful IR has one cache per request)."""
        return MergedBatch(self)

    def merge_caches(self, rows: list[CacheRow]) -> tuple[OvCache, np.ndarray]:
        """A new left-padded batch cache holding `rows` (copied), and its attention mask (batch, length).

        The merged state is parked in the new handle; the first forward on it loads it into the request."""
        spans, total, mask = _merge_plan(rows)
        merged, states = OvCache(len(rows)), [self._state_of(r.cache) for r in rows]
        merged.saved = {}
        for name, first in states[0].items():
            dst = np.zeros((len(rows), first.shape[1], total, first.shape[3]), first.dtype)
            for i, (row, state, (start, end)) in enumerate(zip(rows, states, spans)):
                dst[i, :, total - (end - start):] = state[name][row.row, :, start:end]
            merged.saved[name] = dst
        merged.length = total
        return merged, mask

    def _kv_state_names(self) -> list[tuple[str, str]]:
        """(key, value) state variable names per layer. The exporter's variables are named
        "past.{i}.key" + "present.{i}.key" (ReadValue/Assign pairs), each (batch, kv_heads, length, head_dim)."""
        names = {}
        for s in self.request.query_state():
            m = re.match(r"past\.(\d+)\.(key|value)", s.name)
            if m:
                names[(int(m[1]), m[2])] = s.name
        try:
            return [(names[(i, "key")], names[(i, "value")]) for i in range(self.arch.num_layers)]
        except KeyError as exc:
            raise ValueError(f"the IR has no KV state variable for {exc.args[0]}; found: {sorted(names.values())}") \
                from None

    def export_kv(self, cache: OvCache, length: int) -> KvBlock:
        """Positions [0, length) of a batch-1 cache, copied out of the request (if it is the active
        sequence) or of the state parked in the handle."""
        _batch_one(cache, length)
        active = self._active() if self._active is not None else None
        if length == 0:
            state = {}
        elif active is cache:
            state = {s.name: s.state.data for s in self.request.query_state()}
        elif cache.saved is not None:
            state = cache.saved
        else:
            raise ValueError(f"an OpenVINO cache of {cache.length} positions has no state to export")
        names = self._kv_state_names()
        if not state:
            empty = np.zeros((self.arch.num_kv_heads, 0, self.arch.head_dim), np.float32)
            return KvBlock((empty,) * len(names), (empty,) * len(names))
        take = lambda name: np.array(state[name][0, :, :length], np.float32)  # noqa: E731 (a copy)
        return KvBlock(tuple(take(k) for k, _ in names), tuple(take(v) for _, v in names))

    def cache_from_kv(self, block: KvBlock) -> OvCache:
        """A new batch-1 cache holding the block's positions; its state is parked in the handle and
        loaded into the request by the first forward on it."""
        block.check(self.arch)
        cache = OvCache(1)
        if block.length:
            names = [name for kv in self._kv_state_names() for name in kv]  # per layer its key's, its value's
            shape = (1, self.arch.num_kv_heads, block.length, self.arch.head_dim)
            cache.saved = {name: np.empty(shape, np.float32) for name in names}
            block.write_to([cache.saved[name][0] for name in names])
            cache.length = block.length
        return cache


def _default_threads() -> int:
    """The CPUs this process may use, within a cgroup CPU quota (runtime.probe.usable_cpus)."""
    return usable_cpus()


def load_engine(backend: str, model_path: Path, arch: ModelArch, threads: int | None = None, **options):
    """`options` go to the engine's constructor: `provider`, `pinned` (ONNX Runtime); `device`,
    `precision`, `kv_cache_precision`, `pinned` (OpenVINO); runtime.autotune.Candidate makes them. `listed`
    (from ota.bundle.Bundle.listed_beside): the files beside the graph its manifest lists."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise BackendUnavailable(
            f"backend {backend!r} is not installed; available: {', '.join(available_backends()) or 'none'}")
    if not Path(model_path).is_file():
        raise ModelLoadError(f"{model_path}: model file not found")
    if backend != "onnxruntime":
        options.pop("listed", None)  # an IR names no other files (its .bin is the manifest's too)
    engine_cls = OnnxRuntimeEngine if backend == "onnxruntime" else OpenVinoEngine
    return engine_cls(Path(model_path), arch, threads, **options)
