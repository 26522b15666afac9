"""Write the GLM decoder as an ONNX graph with KV-cache inputs and outputs.

The graph is written node by node (not traced), so that it stays small and the runtime's
contract is explicit:

    inputs   input_ids         int64  (batch, seq)
             position_ids      int64  (batch, seq)
             attention_mask    int64  (batch, past + seq)   1 = attend, 0 = padding
             past.{i}.key      float  (batch, kv_heads, past, head_dim)   per layer i
             past.{i}.value    float  (batch, kv_heads, past, head_dim)
    outputs  logits            float  (batch, vocab)      the last position only
             present.{i}.key   float  (batch, kv_heads, past + seq, head_dim)
             present.{i}.value float  (batch, kv_heads, past + seq, head_dim)

Two variants: plain ONNX ops (`fused=False`; the cache grows by Concat; OpenVINO converts this
one and the exporter makes it stateful) and ONNX Runtime contrib ops (`fused=True`, tagged
`edgeglm.kv_cache = shared-buffer` in the model metadata). The fused graph takes
`inputs_embeds` float (batch, seq, hidden) instead of `input_ids`: the runtime gathers the rows
from the fp32 embedding table saved beside it (`embed_tokens.npy`, named by the metadata
`edgeglm.embeddings`) with pread, so the process holds only the rows of the tokens in flight
(inside the graph the table was resident whole; memory-mapped, the kernel's fault-around made most
of it resident).
The fused graph's operators: GroupQueryAttention, which updates
the cache in place when past.{i}.* and present.{i}.* are bound to one preallocated buffer (then
"past" and "past + seq" above are both that buffer's capacity, and attention_mask's length says
how many positions are valid) and rotates q and k of the one packed q|k|v projection itself (cos/sin
tables of every position, constants), plus SkipSimplifiedLayerNormalization and QuickGelu. Its
batches may also be row-aligned (`edgeglm.batch_rows = ragged`): for single-token steps, row b's mask is 1 for its own positions [0, n_b] and 0 after
them, and each row's new key/value go to position n_b of its buffer row, attention covering that
row's positions only. A prompt batch must not be left-padded (GroupQueryAttention rotates a prompt
from each row's first position; the metadata `edgeglm.rotary_positions = from-row-start` says so).

Two rewrites keep the graph lean and do not change its results:
- the rotary dims of q_proj/k_proj are permuted from interleaved pairs (2i, 2i+1) to halves
  (i, i + rot/2) so rotation is one rotate-half; q and k share the permutation, so their dot
  products, and the attention, are unchanged (the cached keys are in the permuted order);
- the attention scale 1/sqrt(head_dim) is folded into q_proj's weight and bias.

Linear layers are written by a `weights` mode: "fp32" (MatMul), "int8-blockwise" (ONNX
Runtime's MatMulNBits, 8 bits, a scale per 128 inputs), "int8-per-channel" (DequantizeLinear +
MatMul, which OpenVINO keeps compressed) or "int8-per-channel-u8" (ONNX Runtime, one scale per
output channel, stored once for two graphs):

- the decode graph (`prefill=False`) runs each linear as MatMulNBits (`accuracy_level=4`), the
  fastest kernel for one token per row;
- the prefill graph (`prefill=True`) reads the same uint8 bytes as an (N, K) matrix and runs
  W8A8: each token's activations are quantized to uint8 (QuantizeLinear, symmetric, zero point
  128, one scale per token), then MatMulIntegerToFloat (exact int32 sums times the channel
  scales; ONNX Runtime's u8u8 GEMM, about 2x MatMulNBits' speed for many rows on AVX2) computes
  x W^T, times the token scales. W^T is a Transpose of the stored weight that ONNX Runtime
  constant-folds at load, so the GEMM's constant right operand is prepacked once. Quantization is
  per token, so a token's result does not depend on the other tokens of the batch or prompt
  (prefix-cache hits, chunking and batch neighbours stay consistent). The runtime runs steps of
  at least `edgeglm.prefill_min_rows` (metadata of the decode graph) token rows here.

`save_onnx_graphs` writes several graphs over one external data file, each distinct tensor once,
big ones at 4 KiB-aligned offsets so that ONNX Runtime memory-maps them instead of copying.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.config import GlmConfig
from models.quantize import quantize_blockwise, quantize_per_channel, quantize_rows_u8, row_block
from runtime.engine import (BATCH_ROWS_KEY, BLOCK_ROWS_INPUT, BLOCK_SEQLENS_INPUT,  # what the edge engine reads
                            BLOCK_TOTAL_INPUT, EMBEDDINGS_KEY, KV_CACHE_KEY, KV_DTYPE_KEY, ROTARY_KEY, block_kv_name)

OPSET = 17
WEIGHT_MODES = ("fp32", "int8-blockwise", "int8-per-channel", "int8-per-channel-u8")
EMBEDDINGS_FILE = "embed_tokens.npy"
MASK_VALUE = -1e9  # finite, so a fully masked (padding) row stays finite instead of NaN
# the GPU graph's fp16 attention bias: -1e9 would round to -inf there; -1e4 still zeroes exp() next to any
# real score, and a score added to it cannot round to -inf (fp16 reaches 65504)
FP16_MASK_VALUE, FP16_MASK_CONST = -1e4, "attention_bias.fp16_floor"


def rotary_permutation(cfg: GlmConfig) -> np.ndarray:
    """Row order for one head of q/k: interleaved rotary pairs -> halves, pass dims unchanged."""
    rot = cfg.rotary_dim
    return np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, cfg.head_dim)])


def prepare_weights(cfg: GlmConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply the graph's two exact rewrites to q_proj/k_proj (see the module docstring)."""
    perm = rotary_permutation(cfg)
    hd, scale = cfg.head_dim, cfg.head_dim ** -0.5
    out = dict(state)
    for i in range(cfg.num_hidden_layers):
        for proj, heads, s in (("q_proj", cfg.num_attention_heads, scale), ("k_proj", cfg.num_key_value_heads, 1.0)):
            rows = (np.arange(heads)[:, None] * hd + perm[None, :]).reshape(-1)
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name in out:
                    out[name] = (out[name][rows] * s).astype(np.float32)
    return out


class GraphBuilder:
    """Collects nodes and initializers; every op returns the name of its (first) output."""

    def __init__(self, weights: str, block: int = 128, prefill: bool = False, row_block_max: int = 1024):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights={weights!r} must be one of {WEIGHT_MODES}")
        if prefill and weights != "int8-per-channel-u8":
            raise ValueError(f"a prefill graph needs weights='int8-per-channel-u8', not {weights!r}")
        self.weights, self.block, self.prefill = weights, block, prefill
        self.row_block_max = row_block_max  # per-channel weights: the widest MatMulNBits block (quantize.row_block)
        self._shared: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.max_quant_error = 0.0
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, name: str | None = None, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = name or self._name("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out_name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        names = [out_name] if out_name and outputs == 1 else [self._name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self._name(op_type + "_node"),
                                           domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str, rows: str = "tokens",
               times: str | None = None, scaled: bool = True, parts: list[tuple[int, int]] | None = None):
        """x (..., K) @ w.T + b, w given as (N, K). `rows`: the kind of x's leading dims ("tokens" for
        (batch, seq), "last" for (batch,), "flat" for the prefill graph's (tokens,) rows); the prefill
        graph shares shape nodes between the linears of one kind. Prefill graph, "flat" rows only:
        `times` is an (M, 1) tensor the output is also multiplied by, and scaled=False returns
        (x @ w.T without the token scales, the (M, 1) token scales) instead (`_w8a8`)."""
        n, k = w.shape
        if (times is not None or not scaled) and not (self.prefill and rows == "flat" and b is None):
            raise ValueError("times / scaled=False apply to the prefill graph's flat rows without a bias")
        if self.weights == "fp32":
            y = self.op("MatMul", x, self.const(np.ascontiguousarray(w.T), name + ".weight"))
        elif self.weights == "int8-per-channel-u8":
            qr = quantize_rows_u8(w, row_block(k, self.row_block_max))
            self.max_quant_error = max(self.max_quant_error, qr.max_abs_error)
            if self.prefill:
                y = self._w8a8(x, qr.q.reshape(n, -1), qr.scale[:, 0], k, name, rows, times, scaled, parts)
                if not scaled:
                    return y
            else:
                extra = ["", "", self.const(b, name + ".bias")] if b is not None else []
                y = self.op("MatMulNBits", x, self.const(qr.q, name + ".weight_uint8"),
                            self.const(qr.scale.reshape(-1), name + ".weight_scale"), *extra,
                            domain="com.microsoft", K=k, N=n, bits=8, block_size=qr.block, accuracy_level=4)
                b = None
        elif self.weights == "int8-per-channel":
            qw = quantize_per_channel(w)
            self.max_quant_error = max(self.max_quant_error, qw.max_abs_error)
            wq = self.const(np.ascontiguousarray(qw.q.T), name + ".weight_int8")  # (K, N)
            deq = self.op("DequantizeLinear", wq, self.const(qw.scale, name + ".weight_scale"), axis=1)
            y = self.op("MatMul", x, deq)
        else:
            qb = quantize_blockwise(w, self.block)
            self.max_quant_error = max(self.max_quant_error, qb.max_abs_error)
            extra = ["", "", self.const(b, name + ".bias")] if b is not None else []  # bias input, fused
            y = self.op("MatMulNBits", x, self.const(qb.q, name + ".weight_uint8"),
                        self.const(qb.scale.reshape(-1), name + ".weight_scale"), *extra,
                        domain="com.microsoft", K=k, N=n, bits=8, block_size=qb.block, accuracy_level=4)
            b = None
        if b is not None:
            y = self.op("Add", y, self.const(b, name + ".bias"))
        return y

    def shared(self, key: str, value, dtype=None) -> str:
        """One initializer per distinct small constant (a graph-wide name)."""
        if key not in self._shared:
            self._shared[key] = self.const(value, key, dtype)
        return self._shared[key]

    def _w8a8(self, x: str, q: np.ndarray, scale: np.ndarray, k: int, name: str, rows: str,
              times: str | None = None, scaled: bool = True, parts: list[tuple[int, int]] | None = None):
        """x (..., K) float -> (..., N): per-token uint8 activations times the (N, Kp) uint8 weight.

        The weight is the decode graph's bytes; a Transpose of it is constant-folded when ONNX
        Runtime loads the graph, so the GEMM's right operand is a constant that it prepacks once
        (with the weight as the left operand it re-packed the whole matrix at every call: 46 ms
        per step on glm-m). `rows` names the kind of x's leading dims ("tokens": (B, T), "last":
        (B,), "flat": x is already (M, K), the prefill graph's rows); the nodes that depend only on
        them are made once per kind. With "flat" rows nothing is reshaped (9 nodes instead of 12),
        `times` (M, 1) multiplies into the token scales, and scaled=False leaves the token scales
        out and returns them: (y without them, (M, 1) scales). `parts` (flat rows, scaled=False): row
        ranges of the weight, one GEMM each over the same quantized x, returned as a list of outputs
        (Slice of the one stored weight, folded at load; no Split of one wide output)."""
        n, kp = q.shape
        i64 = np.int64
        lead, zp_rows = self._rows(x, rows)
        flat = rows == "flat"
        x2 = x if flat else self.op("Reshape", x, self.shared(f"w8a8.rows{k}", [-1, k], i64))  # (M, K)
        amax = self.op("ReduceMax", self.op("Abs", x2), axes=[-1], keepdims=1)  # (M, 1)
        s = self.op("Max", self.op("Mul", amax, self.shared("w8a8.inv127", np.float32(1 / 127))),
                    self.shared("w8a8.tiny", np.float32(1e-30)))  # one scale per token; > 0 for zero rows
        xq = self.op("QuantizeLinear", x2, self.op("Reshape", s, self.shared("w8a8.to1d", [-1], i64)), zp_rows,
                     axis=0)  # (M, K) uint8 = round(x / s) + 128
        zp = self.shared("w8a8.zp", np.uint8(128))
        if kp > k:  # the weight rows are padded to whole MatMulNBits blocks; 128 is zero
            xq = self.op("Pad", xq, self.shared(f"w8a8.pad{kp - k}", [0, 0, 0, kp - k], i64), zp)
        weight = self.const(q, name + ".weight_uint8")
        if parts is not None:
            if scaled or not flat:
                raise ValueError("parts: flat rows and scaled=False only")
            ys = []
            for lo, hi in parts:  # Transpose(Slice(weight)): both folded at load
                i64c = [self.const(np.array([v], i64)) for v in (lo, hi, 0)]
                wt = self.op("Transpose", self.op("Slice", weight, *i64c), perm=[1, 0])
                ys.append(self.op("MatMulIntegerToFloat", xq, wt, self.shared("w8a8.one", np.float32(1.0)),
                                  self.const(scale[lo:hi].astype(np.float32), f"{name}.weight_scale.{lo}-{hi}"),
                                  zp, zp, domain="com.microsoft"))
            return ys, s
        wt = self.op("Transpose", weight, perm=[1, 0])  # (Kp, N), folded at load
        # (M, N) = (x_q - 128)(W - 128)^T, exact int32 sums, times the channel scales, in one kernel;
        # then times each token's scale
        y = self.op("MatMulIntegerToFloat", xq, wt, self.shared("w8a8.one", np.float32(1.0)),
                    self.const(scale.astype(np.float32), name + ".weight_scale"), zp, zp, domain="com.microsoft")
        if not scaled:
            return y, s
        y = self.op("Mul", y, self.op("Mul", s, times) if times is not None else s)
        if flat:
            return y
        key = f"w8a8.{rows}.shape{n}"
        if key not in self._shared:
            self._shared[key] = self.op("Concat", lead, self.shared(f"w8a8.n{n}", [n], i64), axis=0)
        return self.op("Reshape", y, self._shared[key])

    def _rows(self, x: str, rows: str) -> tuple[str, str]:
        """x's leading dims and a (M,) tensor of uint8 128s (the per-row zero points), once per kind."""
        key = f"w8a8.{rows}"
        if key not in self._shared:
            i64 = np.int64
            lead = self.op("Slice", self.op("Shape", x), self.shared("w8a8.zero", [0], i64),
                           self.shared("w8a8.minus1", [-1], i64))
            m = self.op("ReduceProd", lead, axes=[0], keepdims=1)  # (1,) = M
            self._shared[key] = lead
            self._shared[key + ".zp"] = self.op("Expand", self.shared("w8a8.zp", np.uint8(128)), m)
        return self._shared[key], self._shared[key + ".zp"]

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern both engines fuse
        var = self.op("ReduceMean", self.op("Pow", x, self.const(np.float32(2.0))), axes=[-1], keepdims=1)
        denom = self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps))))
        return self.op("Mul", self.op("Div", x, denom), self.const(weight, name + ".weight"))


def _mask_bias(g: GraphBuilder, T: str, S: str) -> str:
    """Additive mask (B, 1, T, S), broadcast over the heads: causal AND not padding; 0 or MASK_VALUE."""
    i64 = np.int64
    P = g.op("Sub", S, T)
    q_pos = g.op("Unsqueeze", g.op("Range", P, S, g.const(1, dtype=i64)), g.const([1], dtype=i64))  # (T, 1)
    k_pos = g.op("Unsqueeze", g.op("Range", g.const(0, dtype=i64), S, g.const(1, dtype=i64)),
                 g.const([0], dtype=i64))  # (1, S)
    causal = g.op("GreaterOrEqual", q_pos, k_pos)  # (T, S)
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2], dtype=i64))
    allowed = g.op("And", causal, keep)  # (B, 1, T, S)
    return g.op("Where", allowed, g.const(np.float32(0.0)), g.const(np.float32(MASK_VALUE)))


def build_decoder(cfg: GlmConfig, state: dict[str, np.ndarray], weights: str = "fp32",
                  block: int = 128, fused: bool = False, prefill: bool = False,
                  rotary: str = "gqa", row_block_max: int = 1024,
                  attention_blocks: int = 1) -> tuple[onnx.ModelProto, float]:
    """The decoder graph for `state` (HF names, fp32 numpy arrays) and the worst weight-quantization error.

    fused=False writes plain ONNX ops (any runtime; the KV cache grows by Concat). fused=True writes
    ONNX Runtime's contrib operators (see `_fused_layers`), whose GroupQueryAttention can update a
    preallocated cache in place. prefill=True (with weights="int8-per-channel-u8") writes the W8A8
    linears of the prefill graph; its inputs and outputs are the decode graph's. rotary (fused only):
    "gqa" rotates q and k inside GroupQueryAttention, "nodes" with RotaryEmbedding nodes (`_fused_layers`).
    row_block_max: the widest MatMulNBits block of per-channel weights (models.quantize.row_block).
    attention_blocks (prefill graph, rotary "gqa" only): n > 1 splits each layer's attention into n
    GroupQueryAttention nodes over row ranges the runtime gives per step (`_blocked_attention`).
    """
    g = GraphBuilder(weights, block, prefill, row_block_max)
    state = prepare_weights(cfg, state)
    L = cfg.num_hidden_layers
    i64 = np.int64

    # shapes: T = new tokens, S = past + T
    tokens = "inputs_embeds" if fused else "input_ids"
    T = g.op("Gather", g.op("Shape", tokens), g.const(1, dtype=i64), axis=0)
    S = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1, dtype=i64), axis=0)
    if fused:  # the runtime gathers the embedding rows (module docstring)
        x = "inputs_embeds"
    else:
        x = g.op("Gather", g.const(state["model.embed_tokens.weight"], "embed_tokens.weight"), "input_ids", axis=0)
    if rotary not in ("gqa", "nodes"):
        raise ValueError(f"rotary={rotary!r}: choose 'gqa' or 'nodes'")
    if fused:
        if attention_blocks > 1 and not (prefill and rotary == "gqa"):
            raise ValueError("attention_blocks > 1 needs the prefill graph with rotary='gqa'")
        x, present_names = _fused_layers(g, cfg, state, x, T, S, rotary, attention_blocks)
    else:
        x, present_names = _plain_layers(g, cfg, state, x, T, S)

    last = g.op("Gather", x, g.op("Sub", T, g.const(1, dtype=i64)), axis=1)  # (B, C)
    last = g.rms_norm(last, state["model.norm.weight"], cfg.rms_norm_eps, "model.norm")
    head = state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]
    g.linear(last, head, None, "lm_head", rows="last")
    g.nodes[-1].output[0] = "logits"

    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    kv_shape = ["batch", nkv, "past", hd]
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size])
        if fused else helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ] + [helper.make_tensor_value_info(f"past.{i}.{kind}", TensorProto.FLOAT, kv_shape)
         for i in range(L) for kind in ("key", "value")]
    if fused and attention_blocks > 1:  # see _blocked_attention
        n = attention_blocks
        inputs += [helper.make_tensor_value_info(BLOCK_ROWS_INPUT, TensorProto.INT64, [n, 3]),
                   helper.make_tensor_value_info(BLOCK_SEQLENS_INPUT, TensorProto.INT32, [n, "batch"]),
                   helper.make_tensor_value_info(BLOCK_TOTAL_INPUT, TensorProto.INT32, [n])]
        inputs += [helper.make_tensor_value_info(block_kv_name("past", i, kind, j), TensorProto.FLOAT,
                                                 [f"block{j}_batch", nkv, f"block{j}_past", hd])
                   for j in range(1, n) for i in range(L) for kind in ("key", "value")]
    present_len = "present" if fused else "total"  # fused: past + seq, or the buffer's length when shared
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", nkv, present_len, hd]) for n in present_names]
    if fused and attention_blocks > 1:
        outputs += [helper.make_tensor_value_info(block_kv_name("present", i, kind, j), TensorProto.FLOAT,
                                                  [f"block{j}_batch", nkv, f"block{j}_present", hd])
                    for j in range(1, attention_blocks) for i in range(L) for kind in ("key", "value")]
    graph = helper.make_graph(g.nodes, "glm_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if weights in ("int8-blockwise", "int8-per-channel-u8") or fused:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeglm")
    model.ir_version = 8
    if fused:  # the runtime binds past and present to one buffer only on this graph
        props = {KV_CACHE_KEY: "shared-buffer", EMBEDDINGS_KEY: EMBEDDINGS_FILE, BATCH_ROWS_KEY: "ragged"}
        if rotary == "gqa":
            props[ROTARY_KEY] = "from-row-start"
        helper.set_model_props(model, props)
    return model, g.max_quant_error


def _plain_layers(g: GraphBuilder, cfg: GlmConfig, state: dict, x: str, T: str, S: str):
    """Decoder layers from standard ONNX ops; the cache grows by Concat.

    Written in the shapes OpenVINO's CPU plugin fuses: one q|k|v projection + Split per layer, and
    attention as MatMul(q, K^T) + mask -> Softmax -> MatMul(V) over 4-D (B, heads, T, hd) tensors
    with the cached K/V (B, kv_heads, S, hd) repeated to the query heads by Unsqueeze -> Expand ->
    Reshape. OpenVINO turns that into one ScaledDotProductAttention per layer and, on CPU, with the
    state's ReadValue -> Concat -> Assign, into ScaledDotProductAttentionWithKVCache (the cache is
    appended in place; see `models/export.py::make_stateful`).
    """
    L, nh, nkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rot, grp = cfg.rotary_dim, cfg.group_size
    i64 = np.int64
    bias = _mask_bias(g, T, S)  # (B, 1, T, S)

    # rotary cos/sin (B, 1, T, rot), halves layout
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([2], dtype=i64))
    freqs = g.op("Mul", pos, g.const(inv_freq.astype(np.float32), "rope.inv_freq"))  # (B, T, rot/2)
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], dtype=i64))
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)

    minus_one = g.const(np.float32(-1.0))

    def rope(x: str) -> str:  # x (B, heads, T, hd); the form OpenVINO fuses to one RoPE node
        if hd > rot:  # partial rotary: rotate the first `rot` dims, pass the rest through
            x, passed = g.op("Split", x, g.const([rot, hd - rot], dtype=i64), axis=3, outputs=2)
        x1, x2 = g.op("Split", x, g.const([rot // 2, rot // 2], dtype=i64), axis=3, outputs=2)
        rotated = g.op("Concat", g.op("Mul", x2, minus_one), x1, axis=-1)
        out = g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))
        return g.op("Concat", out, passed, axis=-1) if hd > rot else out

    heads_shape = {h: g.const([0, 0, h, hd], dtype=i64) for h in {nh, nkv}}
    qkv_sizes = g.const([nh * hd, nkv * hd, nkv * hd], dtype=i64)
    group_axis, to_heads = g.const([2], dtype=i64), g.const([0, nh, -1, hd], dtype=i64)
    group_shape = g.const([1, 1, grp, 1, 1], dtype=i64)

    def heads(y: str, n: int) -> str:  # (B, T, n*hd) -> (B, n, T, hd)
        return g.op("Transpose", g.op("Reshape", y, heads_shape[n]), perm=[0, 2, 1, 3])

    def repeat_kv(t: str) -> str:  # (B, nkv, S, hd) -> (B, nh, S, hd), each kv head grp times
        if grp == 1:
            return t
        return g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, group_axis), group_shape), to_heads)

    present_names = []
    for i in range(L):
        p = f"model.layers.{i}."
        h = g.rms_norm(x, state[p + "input_layernorm.weight"], cfg.rms_norm_eps, p + "input_layernorm")
        names = ("q_proj", "k_proj", "v_proj")
        w = np.concatenate([state[p + f"self_attn.{n}.weight"] for n in names])
        b = (np.concatenate([state[p + f"self_attn.{n}.bias"] for n in names])
             if p + "self_attn.q_proj.bias" in state else None)
        q, k, v = g.op("Split", g.linear(h, w, b, p + "self_attn.qkv_proj"), qkv_sizes, axis=-1, outputs=3)
        q, k, v = rope(heads(q, nh)), rope(heads(k, nkv)), heads(v, nkv)
        k = g.op("Concat", f"past.{i}.key", k, axis=2, out_name=f"present.{i}.key")  # (B, nkv, S, hd)
        v = g.op("Concat", f"past.{i}.value", v, axis=2, out_name=f"present.{i}.value")
        present_names += [f"present.{i}.key", f"present.{i}.value"]
        scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", repeat_kv(k), perm=[0, 1, 3, 2])), bias)
        att = g.op("MatMul", g.op("Softmax", scores, axis=-1), repeat_kv(v))  # (B, nh, T, hd)
        att = g.op("Reshape", g.op("Transpose", att, perm=[0, 2, 1, 3]), g.const([0, 0, nh * hd], dtype=i64))
        x = g.op("Add", x, g.linear(att, state[p + "self_attn.o_proj.weight"], None, p + "self_attn.o_proj"))

        h = g.rms_norm(x, state[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps,
                       p + "post_attention_layernorm")
        gate, up = g.op("Split", g.linear(h, state[p + "mlp.gate_up_proj.weight"], None, p + "mlp.gate_up_proj"),
                        g.const([cfg.intermediate_size] * 2, dtype=i64), axis=-1, outputs=2)
        act = g.op("Mul", up, g.op("Mul", gate, g.op("Sigmoid", gate)))  # up * silu(gate)
        x = g.op("Add", x, g.linear(act, state[p + "mlp.down_proj.weight"], None, p + "mlp.down_proj"))
    return x, present_names


def _fused_layers(g: GraphBuilder, cfg: GlmConfig, state: dict, x: str, T: str, S: str, rotary: str = "gqa",
                  attention_blocks: int = 1):
    """Decoder layers from ONNX Runtime contrib ops, 10 nodes per layer (rotary="gqa"):

    SkipSimplifiedLayerNormalization (residual add + RMSNorm), one q|k|v projection, GroupQueryAttention
    on the packed q|k|v (it rotates q and k itself: do_rotary, halves layout = interleaved=0, partial
    rotary from the tables' width, at `position_ids`; scale 1: it is folded into q_proj; its causal mask
    plus `attention_bias` for padding; the cache in BNSH, shared in place when past and present are bound
    to the same buffer), o_proj, the post-attention SkipSimplifiedLayerNormalization, gate|up projection,
    Split, QuickGelu(alpha=1) = SiLU, Mul, down_proj. (Until session 19 a Split of q|k|v and a
    RotaryEmbedding node on q and on k came before GroupQueryAttention: 13 nodes per layer; in the op, glm-s
    decoded 6-13% faster and prompts ran 2.5% faster on the VNNI EPYC, docs/performance.md.)

    GroupQueryAttention takes a prompt's positions (a step with no past) from each row's first
    position_ids onward, so a left-padded prompt batch is not computed right: `ROTARY_KEY` in the metadata
    says so and the engine refuses such input (the runtime prefills each sequence alone).

    attention_blocks > 1 (the prefill graph, rotary "gqa"): each layer's GroupQueryAttention becomes that many
    over row ranges the runtime gives per step (`_blocked_attention`), with no padding bias.

    rotary="nodes" writes the 13-node form (the GPU variant's source: it was measured on CUDA in that form;
    GroupQueryAttention's own rotary has not been run on a GPU yet).
    """
    L, nh, nkv, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rot, eps = cfg.rotary_dim, cfg.rms_norm_eps
    i64, ms = np.int64, "com.microsoft"
    blocked = attention_blocks > 1
    # the blocked prefill graph attends by each row's valid length only (seqlens_k): no padding bias
    bias = "" if blocked else _mask_bias(g, T, S)  # (B, 1, T, S)
    total = None if blocked else g.op("Cast", S, to=TensorProto.INT32)  # scalar
    # (B,): the index of each row's last valid column, i.e. 1-based column numbers masked, max, minus 1.
    # Left-padded or full masks end in a valid column: S - 1 in every row. A row-aligned batch ("ragged":
    # row b's positions [0, n_b) valid, then padding) gives n_b - 1 + new tokens, so GroupQueryAttention
    # writes each row's new key/value right after its own positions and attends over them only.
    if not blocked:  # (the blocked graph takes each block's from the runtime)
        cols = g.op("Range", g.const(1, dtype=i64), g.op("Add", S, g.const(1, dtype=i64)), g.const(1, dtype=i64))
        last = g.op("ReduceMax", g.op("Mul", "attention_mask", cols), axes=[1], keepdims=0)
        seqlens_k = g.op("Cast", g.op("Sub", last, g.const(1, dtype=i64)), to=TensorProto.INT32)

    if rotary == "gqa":
        # GroupQueryAttention rotates q and k of the packed q|k|v itself (do_rotary), at each token's
        # position_ids, from cos/sin tables of every position of the context window (constants)
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        angles = np.outer(np.arange(cfg.max_position_embeddings, dtype=np.float64), inv_freq)  # (positions, rot/2)
        cos = g.const(np.cos(angles).astype(np.float32), "rope.cos")
        sin = g.const(np.sin(angles).astype(np.float32), "rope.sin")
    else:
        # rotary tables for exactly this step's positions: row b*T + t holds position_ids[b, t]
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
        flat = g.op("Reshape", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([-1, 1], dtype=i64))
        freqs = g.op("Mul", flat, g.const(inv_freq.astype(np.float32), "rope.inv_freq"))  # (B*T, rot/2)
        cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
        n_pos = g.op("Gather", g.op("Shape", flat), g.const(0, dtype=i64), axis=0)
        rope_ids = g.op("Reshape", g.op("Range", g.const(0, dtype=i64), n_pos, g.const(1, dtype=i64)),
                        g.op("Shape", "position_ids"))  # (B, T)

    def rope(t: str, heads: int) -> str:  # t (B, T, heads*hd)
        return g.op("RotaryEmbedding", t, rope_ids, cos, sin, domain=ms, interleaved=0, num_heads=heads,
                    rotary_embedding_dim=rot)

    def norm_weight(name: str) -> str:
        return g.const(state[name].astype(np.float32), name)

    # the prefill graph keeps the residual stream as (tokens, hidden) rows: its W8A8 linears then need no
    # reshapes (`_w8a8`, "flat"); only GroupQueryAttention's input and output are (B, T, ...)
    rows = "flat" if g.prefill else "tokens"
    if g.prefill:
        shape3 = g.op("Shape", x)  # (B, T, C)
        to_bt = g.op("Concat", g.op("Slice", shape3, g.const([0], dtype=i64), g.const([2], dtype=i64)),
                     g.const([-1], dtype=i64), axis=0)  # (B, T, -1)
        flat_rows = g.const([-1, cfg.hidden_size], dtype=i64)
        x = g.op("Reshape", x, flat_rows)

    present_names = []
    residual, pending = x, None  # pending: the sublayer output not yet added to the residual
    for i in range(L):
        p = f"model.layers.{i}."

        def add_norm(name: str) -> str:
            nonlocal residual
            if pending is None:
                return g.op("SimplifiedLayerNormalization", residual, norm_weight(name), epsilon=eps, axis=-1)
            out = g.op("SkipSimplifiedLayerNormalization", residual, pending, norm_weight(name), domain=ms,
                       epsilon=eps, outputs=4)
            residual = out[3]
            return out[0]

        h = add_norm(p + "input_layernorm.weight")
        names = ("q_proj", "k_proj", "v_proj")
        w = np.concatenate([state[p + f"self_attn.{n}.weight"] for n in names])
        b = (np.concatenate([state[p + f"self_attn.{n}.bias"] for n in names])
             if p + "self_attn.q_proj.bias" in state else None)
        qkv = g.linear(h, w, b, p + "self_attn.qkv_proj", rows=rows)
        if g.prefill:
            qkv = g.op("Reshape", qkv, to_bt)
        if blocked:
            att = _blocked_attention(g, qkv, i, attention_blocks, cos, sin, nh=nh, nkv=nkv, hd=hd)
        elif rotary == "gqa":
            att, _, _ = g.op("GroupQueryAttention", qkv, "", "", f"past.{i}.key", f"past.{i}.value", seqlens_k,
                             total, cos, sin, "position_ids", bias, domain=ms, outputs=3, num_heads=nh,
                             kv_num_heads=nkv, scale=1.0, do_rotary=1, rotary_interleaved=0)
        else:
            q, k, v = g.op("Split", qkv, g.const([nh * hd, nkv * hd, nkv * hd], dtype=i64), axis=-1, outputs=3)
            att, _, _ = g.op("GroupQueryAttention", rope(q, nh), rope(k, nkv), v, f"past.{i}.key",
                             f"past.{i}.value", seqlens_k, total, "", "", "", bias, domain=ms, outputs=3,
                             num_heads=nh, kv_num_heads=nkv, scale=1.0, do_rotary=0)
        if not blocked:
            g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
        present_names += [f"present.{i}.key", f"present.{i}.value"]
        if g.prefill:
            att = g.op("Reshape", att, flat_rows if nh * hd == cfg.hidden_size else g.const([-1, nh * hd], dtype=i64))
        pending = g.linear(att, state[p + "self_attn.o_proj.weight"], None, p + "self_attn.o_proj", rows=rows)

        h = add_norm(p + "post_attention_layernorm.weight")
        if g.prefill:
            # the token scales of gate|up go on gate only (silu is not linear): up's are folded into down_proj's
            # (per-token quantization of up * silu(gate) does not depend on a per-token factor)
            # gate and up: two GEMMs over the halves of the one stored weight (no Split of a (tokens, 2 x ffn)
            # output: -4% TTFT on glm-s once the int8-weight copy took the halves too)
            f = cfg.intermediate_size
            (gate, up), s_gu = g.linear(h, state[p + "mlp.gate_up_proj.weight"], None, p + "mlp.gate_up_proj",
                                        rows=rows, scaled=False, parts=[(0, f), (f, 2 * f)])
            act = g.op("Mul", up, g.op("QuickGelu", g.op("Mul", gate, s_gu), domain=ms, alpha=1.0))
            pending = g.linear(act, state[p + "mlp.down_proj.weight"], None, p + "mlp.down_proj", rows=rows,
                               times=s_gu)
        else:
            gate, up = g.op("Split", g.linear(h, state[p + "mlp.gate_up_proj.weight"], None, p + "mlp.gate_up_proj"),
                            g.const([cfg.intermediate_size] * 2, dtype=i64), axis=-1, outputs=2)
            act = g.op("Mul", up, g.op("QuickGelu", gate, domain=ms, alpha=1.0))  # up * silu(gate)
            pending = g.linear(act, state[p + "mlp.down_proj.weight"], None, p + "mlp.down_proj")
    out = g.op("Add", residual, pending)
    return (g.op("Reshape", out, to_bt) if g.prefill else out), present_names


def _blocked_attention(g: GraphBuilder, qkv: str, layer: int, n: int, cos: str, sin: str, *, nh: int, nkv: int,
                       hd: int) -> str:
    """Layer `layer`'s attention as n GroupQueryAttention nodes, block j over the packed q|k|v of tokens
    [lo_j, hi_j) of the first nb_j sequences (row j of BLOCK_ROWS_INPUT (n, 3) = lo, hi, nb), with its own
    seqlens_k (the first nb_j of BLOCK_SEQLENS_INPUT[j]) and total length (BLOCK_TOTAL_INPUT[j]). Block 0
    reads and writes the cache (past.{layer}.*); block j > 0 the buffers bound as block_kv_name(..., j).
    Returns the blocks' outputs as (token rows, heads x head_dim), concatenated, cut to the step's rows.

    ONNX Runtime's CPU GroupQueryAttention computes a prompt's whole square of scores and zeroes the upper
    half; blocks of a prompt, each over the keys up to its own end, skip most of that (exact: each block's
    scores and softmax are the rows the single node would compute). The runtime gives one sequence's prompt
    consecutive blocks, all bound to the cache (each writes its rows' keys and values in place, the next one
    attends over them); any other step runs whole in block 0 while blocks j > 0 each take one token of
    one sequence over a one-position scratch buffer, their rows dropped (runtime.engine.attention_block_inputs).
    Block j's rows start after block j-1 has run (its start depends on block j-1's output shape)."""
    i64, ms = np.int64, "com.microsoft"
    zero, one = g.shared("blocks.zero", [0], i64), g.shared("blocks.one", [1], i64)
    two, three = g.shared("blocks.two", [2], i64), g.shared("blocks.three", [3], i64)
    axes01 = g.shared("blocks.axes01", [0, 1], i64)
    if "blocks.rows" not in g._shared:  # the step's token rows (batch x new tokens), (1,)
        g._shared["blocks.rows"] = g.op("ReduceProd", g.op("Shape", qkv, start=0, end=2), axes=[0], keepdims=1)
    outs, prev = [], None
    for j in range(n):
        key = f"blocks.{j}"
        if key not in g._shared:  # once per graph: block j's rows, seqlens_k, total and positions
            row = g.op("Gather", BLOCK_ROWS_INPUT, g.const(j, dtype=i64), axis=0)  # (3,): lo, hi, batch rows
            lo, hi, nb = g.op("Slice", row, zero, one), g.op("Slice", row, one, two), g.op("Slice", row, two, three)
            start, end = g.op("Concat", zero, lo, axis=0), g.op("Concat", nb, hi, axis=0)  # (batch, token) corners
            seqlens = g.op("Slice", g.op("Gather", BLOCK_SEQLENS_INPUT, g.const(j, dtype=i64), axis=0), zero, nb)
            g._shared[key] = (start, end, seqlens, g.op("Gather", BLOCK_TOTAL_INPUT, g.const(j, dtype=i64), axis=0),
                              g.op("Slice", "position_ids", start, end, axes01))
        start, end, seqlens, total, pos = g._shared[key]
        if prev is not None:  # after block j-1: its start + 0 * (its rows)
            start = g.op("Add", start, g.op("Mul", g.op("Shape", prev, start=0, end=1), zero))
        rows = g.op("Slice", qkv, start, end, axes01)
        past = [f"past.{layer}.{k}" if j == 0 else block_kv_name("past", layer, k, j) for k in ("key", "value")]
        att, _, _ = g.op("GroupQueryAttention", rows, "", "", *past, seqlens, total, cos, sin, pos, domain=ms,
                         outputs=3, num_heads=nh, kv_num_heads=nkv, scale=1.0, do_rotary=1, rotary_interleaved=0)
        g.nodes[-1].output[1:] = [f"present.{layer}.{k}" if j == 0 else block_kv_name("present", layer, k, j)
                                  for k in ("key", "value")]
        prev = g.op("Reshape", att, g.shared("blocks.flat", [-1, nh * hd], i64))  # (rows, heads x head)
        outs.append(prev)
    joined = g.op("Concat", *outs, axis=0)
    return g.op("Slice", joined, zero, g._shared["blocks.rows"], zero)  # the step's rows, in order


def fp16_attention_variant(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a fused decode graph whose GroupQueryAttention nodes and KV cache are fp16: its q, k, v
    and attention-bias inputs are cast to fp16, its output back to fp32, and past/present are declared
    fp16. ONNX Runtime's CUDA provider has GroupQueryAttention only in fp16/bf16: on this variant every
    node runs on the GPU and the cache can live in device memory (on the fp32 graph attention falls back
    to the CPU, with host-device copies around it in every layer). Everything else, and the weights,
    are the decode graph's (saved once for both by save_onnx_graphs)."""
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    g = variant.graph
    for vi in list(g.input) + list(g.output):
        if vi.name.startswith(("past.", "present.")):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    casts: dict[str, str] = {}
    nodes = []
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        for idx in (0, 1, 2, 7, 8, 10):  # query, key, value, cos and sin tables, attention_bias
            name = node.input[idx] if idx < len(node.input) else ""
            if name:
                if name not in casts:  # one cast of the bias and the tables, shared by every layer
                    casts[name] = f"{name}.f16"
                    src = name
                    if idx == 10:  # MASK_VALUE is -inf in fp16: a fully masked (padding) row would be NaN
                        src = f"{name}.clipped"
                        nodes.append(helper.make_node("Max", [name, FP16_MASK_CONST], [src]))
                    nodes.append(helper.make_node("Cast", [src], [casts[name]], to=TensorProto.FLOAT16))
                node.input[idx] = casts[name]
        out = node.output[0]
        node.output[0] = f"{out}.f16"
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    if FP16_MASK_CONST in {i for n in nodes for i in n.input}:
        g.initializer.append(numpy_helper.from_array(np.array(FP16_MASK_VALUE, np.float32), FP16_MASK_CONST))
    helper.set_model_props(variant, {**{p.key: p.value for p in model.metadata_props}, KV_DTYPE_KEY: "float16"})
    return variant


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save with weights in one external data file beside the graph; returns the files written."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data] if data.exists() else [path]


def save_onnx_graphs(models: dict[str, onnx.ModelProto], directory: Path, data_name: str,
                     align: int = 4096, threshold: int = 1024) -> list[Path]:
    """Save `models` ({file name: graph}) in `directory` over one external data file `data_name`.

    Each distinct tensor (by bytes) is stored once and shared by every graph that uses it;
    tensors of at least `align` bytes start at `align`-aligned offsets, which lets ONNX Runtime
    memory-map them (read-only, shared page cache) instead of reading them into its own buffers.
    Returns the files written. The graphs are modified (their big initializers become external)."""
    directory = Path(directory)
    data_path = directory / data_name
    stored: dict[bytes, tuple[int, int]] = {}
    with open(data_path, "wb") as data:
        for model in models.values():
            for t in model.graph.initializer:
                raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                if len(raw) < threshold:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in stored:
                    if len(raw) >= align and data.tell() % align:
                        data.write(b"\0" * (align - data.tell() % align))
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                offset, length = stored[key]
                for field_name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                                   "uint64_data"):
                    t.ClearField(field_name)
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
    written = []
    for name, model in models.items():
        onnx.save_model(model, str(directory / name))
        written.append(directory / name)
    return written + [data_path]


def _fit_rows(nodes: list, src: str, rows: str, start: str, cap: str, tag: str) -> str:
    """Nodes for src[:, rows, :, start:start + cap], zero-filled up to `cap` positions (appended to
    `nodes`; needs the Constant `positions_axis`); returns the result's name."""
    def out(name: str) -> str:
        return f"{tag}.{name}"
    nodes.extend([
        helper.make_node("Gather", [src, rows], [out("rows")], axis=1),
        helper.make_node("Add", [start, cap], [out("end")]),
        helper.make_node("Slice", [out("rows"), start, out("end"), "positions_axis"], [out("kept")]),
        helper.make_node("Shape", [out("kept")], [out("outer")], start=0, end=3),
        helper.make_node("Shape", [out("kept")], [out("held")], start=3, end=4),
        helper.make_node("Shape", [out("kept")], [out("head_dim")], start=4, end=5),
        helper.make_node("Sub", [cap, out("held")], [out("missing")]),
        helper.make_node("Concat", [out("outer"), out("missing"), out("head_dim")], [out("pad_shape")], axis=0),
        helper.make_node("ConstantOfShape", [out("pad_shape")], [out("pad")],
                         value=numpy_helper.from_array(np.array([0], np.float16))),
        helper.make_node("Concat", [out("kept"), out("pad")], [out("fit")], axis=3),
    ])
    return out("fit")


def kv_copy_graph() -> onnx.ModelProto:
    """The graph runtime/kv_copy.onnx holds (shipped with the runtime, which has no `onnx` to build it;
    tests/models/test_kv_copy_graph.py checks that the shipped file is this one). It copies KV rows
    between buffers in the execution provider's memory, so a GPU engine never reads its cache to the
    host to grow or batch it (runtime.engine.DeviceCache, DeviceRaggedBatch):

        out = concat(fit(a[:, a_rows], 0), fit(b[:, b_rows], b_start))   # along the rows
        fit(x, s) = x[:, :, :, s:s + cap], zero-filled up to cap positions

    a and b: (layers x 2, rows, kv_heads, positions, head_dim) float16 (a DeviceCache's buffer: every
    layer's keys and values); a_rows, b_rows: int64 row indices (either may be empty); b_start, cap:
    int64 (1,)."""
    i64, f16 = TensorProto.INT64, TensorProto.FLOAT16
    nodes = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Constant", [], ["positions_axis"],
                              value=numpy_helper.from_array(np.array([3], np.int64)))]

    def fit(src: str, rows: str, start: str, tag: str) -> str:
        return _fit_rows(nodes, src, rows, start, "cap", tag)

    nodes.append(helper.make_node("Concat", [fit("a", "a_rows", "zero", "a"), fit("b", "b_rows", "b_start", "b")],
                                  ["out"], axis=1))
    buf = ["layers_kv", "rows", "kv_heads", "positions", "head_dim"]
    inputs = [helper.make_tensor_value_info("a", f16, [f"a_{d}" for d in buf]),
              helper.make_tensor_value_info("a_rows", i64, ["a_taken"]),
              helper.make_tensor_value_info("b", f16, [f"b_{d}" for d in buf]),
              helper.make_tensor_value_info("b_rows", i64, ["b_taken"]),
              helper.make_tensor_value_info("b_start", i64, [1]),
              helper.make_tensor_value_info("cap", i64, [1])]
    output = helper.make_tensor_value_info("out", f16, ["layers_kv", "out_rows", "kv_heads", "cap", "head_dim"])
    graph = helper.make_graph(nodes, "edgeglm-kv-copy", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeglm",
                             ir_version=8)


def kv_write_graph() -> onnx.ModelProto:
    """The graph runtime/kv_write.onnx holds (as kv_copy_graph: shipped, checked by
    tests/models/test_kv_copy_graph.py). It writes one row into a buffer in place, so that a row joining
    or leaving a DeviceRaggedBatch that has a free slot copies one row, not the batch:

        out = kv;  out[:, slot] = fit(src[:, src_row], src_start)

    with fit as in kv_copy_graph (positions src_start.. cut or zero-filled to kv's positions). The
    engine binds `out` to kv's own memory: ScatterND then skips copying its input and only the row is
    written. Its indices, built here, address every (layer, slot, head, position): ONNX Runtime's CUDA
    ScatterND runs one thread per index, each copying its slice, so one index per layer (slices of
    heads x positions x head_dim) left a few dozen threads copying megabytes each (a leave and a join
    15.5 ms on an H200 for 32 rows of 256 positions, against 3.6 ms for rebuilding the batch); here a
    thread copies head_dim values. kv: (layers x 2, slots, kv_heads, positions, head_dim) float16; src:
    the same but its own rows and positions (it may be kv itself: the row is read before anything is
    written); src_row, src_start, slot: int64 (1,)."""
    i64, f16 = TensorProto.INT64, TensorProto.FLOAT16

    def const(name: str, values) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))
    nodes = [const("positions_axis", [3]), const("rows_axis", [1]), const("one", [1]), const("zero_s", 0),
             const("one_s", 1), helper.make_node("Shape", ["kv"], ["cap"], start=3, end=4)]
    row = _fit_rows(nodes, "src", "src_row", "src_start", "cap", "src")
    nodes.append(helper.make_node("Squeeze", [row, "rows_axis"], ["updates"]))  # (layers x 2, heads, cap, dim)
    # indices (layers x 2, heads, cap, 4): [k, slot, h, p] for every k, h, p
    nodes.append(helper.make_node("Shape", ["updates"], ["grid"], start=0, end=3))
    nodes.append(helper.make_node("Concat", ["grid", "one"], ["grid1"], axis=0))
    parts = []
    for axis, (name, start) in enumerate((("k", 0), ("h", 2), ("p", 3))):
        count = f"{name}.count"
        nodes += [helper.make_node("Shape", ["kv"], [f"{name}.n"], start=start, end=start + 1),
                  helper.make_node("Squeeze", [f"{name}.n"], [count]),
                  helper.make_node("Range", ["zero_s", count, "one_s"], [f"{name}.range"]),
                  const(f"{name}.shape", [-1 if i == axis else 1 for i in range(3)] + [1]),
                  helper.make_node("Reshape", [f"{name}.range", f"{name}.shape"], [f"{name}.col"]),
                  helper.make_node("Expand", [f"{name}.col", "grid1"], [f"{name}.idx"])]
        parts.append(f"{name}.idx")
    nodes += [const("slot.shape", [1, 1, 1, 1]),
              helper.make_node("Reshape", ["slot", "slot.shape"], ["slot.col"]),
              helper.make_node("Expand", ["slot.col", "grid1"], ["slot.idx"]),
              helper.make_node("Concat", [parts[0], "slot.idx", parts[1], parts[2]], ["indices"], axis=3),
              helper.make_node("ScatterND", ["kv", "indices", "updates"], ["out"])]
    buf = ["layers_kv", "slots", "kv_heads", "positions", "head_dim"]
    inputs = [helper.make_tensor_value_info("kv", f16, buf),
              helper.make_tensor_value_info("src", f16, [f"src_{d}" for d in buf]),
              helper.make_tensor_value_info("src_row", i64, [1]),
              helper.make_tensor_value_info("src_start", i64, [1]),
              helper.make_tensor_value_info("slot", i64, [1])]
    output = helper.make_tensor_value_info("out", f16, buf)
    graph = helper.make_graph(nodes, "edgeglm-kv-write", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeglm",
                             ir_version=8)
