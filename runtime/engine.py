"""Inference engines: one decoder forward step through ONNX Runtime or OpenVINO.

Both run the graph written by the exporter (see the bundle docs): token ids, positions and an
attention mask in; last-position logits and the grown KV cache out. The cache is a list of
numpy arrays (key, value per layer), shape (batch, kv_heads, tokens, head_dim).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import BackendUnavailable, ModelLoadError

BACKENDS = ("onnxruntime", "openvino")


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

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.num_layers)]

    def input_names(self) -> list[str]:
        return ["input_ids", "position_ids", "attention_mask"] + [
            f"past.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]


def available_backends() -> list[str]:
    found = []
    for name in BACKENDS:
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    return found


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, model_path: Path, arch: ModelArch, threads: int | None = None):
        import onnxruntime as ort

        self.arch = arch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or _default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            raise ModelLoadError(f"{model_path}: ONNX Runtime could not load the model ({exc})") from None
        self.device = "CPUExecutionProvider"
        self._names = arch.input_names()

    def forward(self, input_ids, position_ids, attention_mask, cache):
        feeds = dict(zip(self._names, [input_ids, position_ids, attention_mask, *cache]))
        out = self.session.run(None, feeds)
        return out[0], out[1:]


class OpenVinoEngine:
    backend = "openvino"

    def __init__(self, model_path: Path, arch: ModelArch, threads: int | None = None, device: str = "CPU"):
        import openvino as ov

        self.arch = arch
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendUnavailable(
                f"OpenVINO device {device!r} is not available; found: {', '.join(core.available_devices)}")
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_NUM_THREADS": threads or _default_threads(),
                  # f32 activations: bf16 would trade the golden check's exactness for speed
                  "INFERENCE_PRECISION_HINT": "f32"}
        try:
            self.compiled = core.compile_model(core.read_model(str(model_path)), device, config)
        except Exception as exc:
            raise ModelLoadError(f"{model_path}: OpenVINO could not load the model ({exc})") from None
        self.request = self.compiled.create_infer_request()
        self.device = device
        self._names = arch.input_names()

    def forward(self, input_ids, position_ids, attention_mask, cache):
        feeds = dict(zip(self._names, [input_ids, position_ids, attention_mask, *cache]))
        self.request.infer(feeds, share_inputs=True)
        outs = [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]
        return outs[0], outs[1:]


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_engine(backend: str, model_path: Path, arch: ModelArch, threads: int | None = None):
    if backend not in BACKENDS:
        raise BackendUnavailable(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise BackendUnavailable(
            f"backend {backend!r} is not installed; available: {', '.join(available_backends()) or 'none'}")
    if not Path(model_path).is_file():
        raise ModelLoadError(f"{model_path}: model file not found")
    engine_cls = OnnxRuntimeEngine if backend == "onnxruntime" else OpenVinoEngine
    return engine_cls(Path(model_path), arch, threads)
