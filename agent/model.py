"""Load a verified bundle onto an engine: the wiring between `ota.bundle` and `runtime`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ota.bundle import Bundle, open_bundle
from runtime.engine import BACKENDS, ModelArch, available_backends, load_engine
from runtime.errors import BackendUnavailable
from runtime.golden import GoldenResult, check_golden
from runtime.tokenizer import load_tokenizer

# Until the measured autotune lands, "auto" prefers ONNX Runtime: its MatMulNBits int8 kernel
# decoded fastest in the runtime findings; OpenVINO is the fallback.
AUTO_ORDER = ("onnxruntime", "openvino")


@dataclass
class LoadedModel:
    bundle: Bundle
    backend: str
    engine: object
    tokenizer: Tokenizer
    arch: ModelArch

    def golden_check(self) -> GoldenResult:
        g = self.bundle.manifest.golden
        seq = g.backends[self.backend]
        return check_golden(self.engine, g.prompt_ids, seq.tokens, seq.margins, g.tolerance)


def choose_backend(bundle: Bundle, requested: str = "auto") -> str:
    in_bundle = list(bundle.manifest.backends)
    installed = available_backends()
    if requested != "auto":
        if requested not in BACKENDS:
            raise BackendUnavailable(f"--backend {requested!r} is unknown; choose auto or one of: {', '.join(BACKENDS)}")
        if requested not in in_bundle:
            raise BackendUnavailable(
                f"bundle {bundle.root} has no {requested!r} model; it carries: {', '.join(in_bundle)}")
        if requested not in installed:
            raise BackendUnavailable(f"backend {requested!r} is not installed; available: {', '.join(installed)}")
        return requested
    for name in AUTO_ORDER:
        if name in in_bundle and name in installed:
            return name
    raise BackendUnavailable(
        f"no backend can run bundle {bundle.root}: it carries {', '.join(in_bundle)}, installed are "
        f"{', '.join(installed) or 'none'}")


def load_model(bundle_path: str | Path, backend: str = "auto", threads: int | None = None) -> LoadedModel:
    """Verify the bundle's files against its manifest, then load the model for one backend."""
    bundle = open_bundle(bundle_path)
    name = choose_backend(bundle, backend)
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    engine = load_engine(name, bundle.path(bundle.manifest.backends[name].entry), arch, threads)
    tokenizer = load_tokenizer(bundle.path(bundle.manifest.tokenizer))
    return LoadedModel(bundle, name, engine, tokenizer, arch)
