"""Export a GLM checkpoint to a bundle: ONNX (ONNX Runtime) and OpenVINO IR, INT8 or fp32.

Steps, each shown on a progress bar: load and validate the checkpoint; compute the golden
continuation with the PyTorch reference; per backend write the graph, load it with the edge
runtime and measure how far its logits are from the reference on the golden sequence (a parity
check: an export whose engine disagrees beyond its own tolerance is refused); write the manifest
last and move the staged directory into place. On any error the staging directory is removed,
so nothing half-written is left where a bundle is expected.

Before any work (ExportOptions and the start of `export_bundle`): --name and --version follow the
manifest's rules (models.recipe.bundle_name_problem / bundle_version_problem; without --name the
checkpoint directory's name must be a valid name), the checkpoint must be a directory (not one of
its files), --force replaces only a bundle or an empty directory (never the checkpoint, a directory
holding it, or a directory of other files), --out must not lie inside a bundle, and --out must be
creatable: the staging directory is made next to it first, so an unwritable --out fails in a
second, not after the export. Each is one ExportError line.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import checkpoint_dir_problem, enclosing_bundle, is_bundle_dir, load_checkpoint
from models.config import GlmConfig
from models.errors import CheckpointError, ExportError
from models.glm import GlmForCausalLM
from models.onnx_graph import EMBEDDINGS_FILE, build_decoder, fp16_attention_variant, save_onnx, save_onnx_graphs
from models.quantize import quantize_blockwise, quantize_per_channel, quantize_rows_u8
from models.recipe import bundle_name_problem, bundle_version_problem
from ota.bundle import MANIFEST, BundleError, publish, write_manifest
from ota.transfer import MAX_CHUNK_SIZE
from runtime.engine import (ATTENTION_BLOCKS, GPU_GRAPH_FILE, GPU_GRAPH_KEY, PREFILL_GRAPH_KEY, PREFILL_GRAPH_MIN_ROWS, PREFILL_ROWS_KEY,
                            ModelArch, load_engine)
from runtime.errors import RuntimeUserError
from runtime.golden import check_golden, teacher_forced_logits
from runtime.tokenizer import load_tokenizer

log = logging.getLogger("edgeglm.export")

MIN_AGENT_VERSION = "0.2.0"
DEFAULT_GOLDEN_PROMPT = "def main(argv=None):\n    \"\"\"Parse the command line"
WEIGHTS = {  # (backend, precision) -> graph weight mode
    ("onnxruntime", "int8"): "int8-per-channel-u8",
    ("openvino", "int8"): "int8-per-channel",
    ("onnxruntime", "fp32"): "fp32",
    ("openvino", "fp32"): "fp32",
}
SCHEMES = {
    "fp32": "fp32 weights and activations",
    "int8-blockwise": "INT8 weight-only, symmetric, block-wise (128 input channels per fp32 scale); "
                      "ONNX Runtime MatMulNBits bits=8, accuracy_level=4 (activations quantized to int8 per block at run time)",
    "int8-per-channel-u8": "INT8, symmetric, per output channel, stored once as uint8 (zero point 128) for two "
                           "ONNX Runtime graphs: decode = MatMulNBits bits=8, accuracy_level=4; prefill "
                           "(prefill.onnx, steps of 4+ token rows) = W8A8, activations quantized to uint8 per "
                           "token, MatMulIntegerToFloat",
    "int8-per-channel": "INT8 weight-only, symmetric, per output channel (one fp32 scale per row); "
                        "OpenVINO compressed weights, fp32 activations",
}
ENTRY = {"onnxruntime": "onnxruntime/model.onnx", "openvino": "openvino/openvino_model.xml"}
MAX_CHUNK_KIB = MAX_CHUNK_SIZE // 1024  # the largest chunk the controller serves in one MQTT message


@dataclass
class ExportOptions:
    precision: str = "int8"
    backends: tuple[str, ...] = ("openvino", "onnxruntime")
    name: str | None = None
    version: str = "0.1.0"
    golden_prompt: str = DEFAULT_GOLDEN_PROMPT
    golden_tokens: int = 32
    block: int = 128
    chunk_kib: int = 256  # OTA transfer chunk; each chunk's sha256 goes into the manifest
    force: bool = False
    compression: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp32"):
            raise ExportError(f"--precision {self.precision!r} is invalid; choose int8 or fp32")
        unknown = [b for b in self.backends if b not in ENTRY]
        if not 4 <= self.chunk_kib <= MAX_CHUNK_KIB:  # a bigger chunk does not fit in one MQTT chunk message
            raise ExportError(f"--chunk-kib {self.chunk_kib} must be between 4 and {MAX_CHUNK_KIB} (the largest "
                              "chunk the fleet controller serves over MQTT); nothing was exported")
        if unknown or not self.backends:
            raise ExportError(f"--backends {','.join(self.backends)!r} is invalid; choose from openvino,onnxruntime")
        if len(set(self.backends)) != len(self.backends):
            raise ExportError(f"--backends {','.join(self.backends)!r} names a backend twice; list each once")
        if self.name == "":
            raise ExportError("--name '': is empty; give a bundle name, or leave --name out to use the checkpoint "
                              "directory's name; nothing was exported")
        problem = bundle_name_problem(self.name) if self.name is not None else None
        if problem:
            raise ExportError(f"--name {self.name!r}: {problem}; nothing was exported")
        problem = bundle_version_problem(self.version)
        if problem:
            raise ExportError(f"--version {self.version!r}: {problem}; nothing was exported")


def linear_weight_names(cfg: GlmConfig) -> list[str]:
    names = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight"]
    return names + ["lm_head.weight"]


def fake_quantized(model: GlmForCausalLM, weights: str, block: int) -> GlmForCausalLM:
    """A copy of the model whose linear weights are the dequantized values the engine will use."""
    if weights == "fp32":
        return model
    q = copy.deepcopy(model)
    head = q.lm_head.weight.detach()
    if q.config.tie_word_embeddings:  # the embedding lookup stays fp32; only the head is quantized
        q.lm_head.weight = torch.nn.Parameter(head.clone())
    params = dict(q.named_parameters())
    with torch.no_grad():
        for name in linear_weight_names(q.config):
            w = params[name].numpy()
            if weights == "int8-per-channel":
                deq = quantize_per_channel(w)
            elif weights == "int8-per-channel-u8":
                deq = quantize_rows_u8(w)
            else:
                deq = quantize_blockwise(w, block)
            params[name].copy_(torch.from_numpy(deq.dequantize()))
    return q


@torch.no_grad()
def reference_greedy(model: GlmForCausalLM, prompt_ids: list[int], n: int):
    """Greedy continuation with the PyTorch reference: tokens, top-1/top-2 margins, logits (n, vocab)."""
    tokens, margins, rows = [], [], []
    logits, past = model(torch.tensor([prompt_ids]))
    pos = len(prompt_ids)
    for _ in range(n):
        last = logits[0, -1]
        top2 = torch.topk(last, 2).values
        tokens.append(int(last.argmax()))
        margins.append(float(top2[0] - top2[1]))
        rows.append(last.numpy().copy())
        logits, past = model(torch.tensor([[tokens[-1]]]), past=past, start_pos=pos)
        pos += 1
    return tokens, margins, np.stack(rows)


# the most positions for which the fused graphs take constant cos/sin tables (2 x positions x rotary_dim / 2
# float32: 512 KiB for glm-s's 4,096; 16 MiB at 32,768 positions and a rotary_dim of 128)
GQA_ROTARY_MAX_POSITIONS = 32768


def gqa_rotates(cfg: GlmConfig) -> bool:
    """Whether ONNX Runtime's GroupQueryAttention can rotate q and k itself for this head shape: its CPU kernel
    takes a head_dim that is a multiple of 16 and cos/sin tables of a multiple of 8 (rotary_dim / 2). Other
    shapes (head_dim 40, a partial_rotary_factor of 0.25 on 32) get RotaryEmbedding nodes instead: the export
    failed with ONNX Runtime's own traceback."""
    return cfg.head_dim % 16 == 0 and (cfg.rotary_dim // 2) % 8 == 0


def onnxruntime_problem(cfg: GlmConfig) -> str | None:
    """Why ONNX Runtime cannot run this architecture at all (None: it can)."""
    if cfg.head_dim % 8:
        return (f"head_dim {cfg.head_dim} (config.json) is not a multiple of 8, which ONNX Runtime's "
                "GroupQueryAttention needs; export it with --backends openvino")
    return None


def _write_backend(backend: str, weights: str, cfg: GlmConfig, state: dict, staging: Path, block: int) -> float:
    if backend == "onnxruntime":  # contrib ops: GroupQueryAttention over a shared, preallocated cache
        # GroupQueryAttention rotates q and k itself from constant cos/sin tables of every position (onnx_graph.
        # _fused_layers); past GQA_ROTARY_MAX_POSITIONS those tables would be big: RotaryEmbedding nodes instead
        rotary = "gqa" if cfg.max_position_embeddings <= GQA_ROTARY_MAX_POSITIONS and gqa_rotates(cfg) else "nodes"
        model, err = build_decoder(cfg, state, weights, block, fused=True, rotary=rotary)
        # the GPU variant keeps the form measured on CUDA: RotaryEmbedding nodes (onnx_graph._fused_layers) and
        # MatMulNBits blocks of at most 128 (the weight bytes are the same, only the repeated scales differ)
        gpu_source, _ = build_decoder(cfg, state, weights, block, fused=True, rotary="nodes", row_block_max=128)
        graphs = {"model.onnx": model, GPU_GRAPH_FILE: fp16_attention_variant(gpu_source)}
        del gpu_source
        meta = model.metadata_props.add()
        meta.key, meta.value = GPU_GRAPH_KEY, GPU_GRAPH_FILE
        if weights == "int8-per-channel-u8":  # + the W8A8 prefill graph over the same weight bytes
            # its attention in blocks (onnx_graph._blocked_attention) where GroupQueryAttention rotates itself
            graphs["prefill.onnx"], _ = build_decoder(cfg, state, weights, block, fused=True, prefill=True,
                                                      rotary=rotary,
                                                      attention_blocks=ATTENTION_BLOCKS if rotary == "gqa" else 1)
            for key, value in ((PREFILL_GRAPH_KEY, "prefill.onnx"), (PREFILL_ROWS_KEY, str(PREFILL_GRAPH_MIN_ROWS))):
                meta = model.metadata_props.add()
                meta.key, meta.value = key, value
        (staging / "onnxruntime").mkdir()
        save_onnx_graphs(graphs, staging / "onnxruntime", "model.onnx.data")
        np.save(staging / "onnxruntime" / EMBEDDINGS_FILE,
                np.ascontiguousarray(state["model.embed_tokens.weight"], dtype=np.float32))
        return err
    import openvino as ov

    model, err = build_decoder(cfg, state, weights, block)
    (staging / "openvino").mkdir()
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        onnx_path = Path(tmp) / "decoder.onnx"
        save_onnx(model, onnx_path)
        ov_model = ov.convert_model(str(onnx_path))
        make_stateful(ov_model, cfg.num_hidden_layers)
        ov.save_model(ov_model, str(staging / ENTRY["openvino"]), compress_to_fp16=False)
    return err


def make_stateful(ov_model, num_layers: int) -> None:
    """Keep the KV cache inside the infer request: past.{i}.* / present.{i}.* become variables
    (ReadValue/Assign), so the IR's inputs are input_ids, position_ids, attention_mask and its only
    output is logits. A variable starts empty, (batch of input_ids, kv_heads, 0, head_dim), on
    `reset_state()`. Done at export time so that the bundle ships (and its golden check runs on)
    exactly the model the edge loads, and the edge needs no private OpenVINO transformation API.

    Each variable is read through Gather(rows = 0..batch-1, axis 0), which changes nothing: it is
    the ReadValue -> Gather(beam_idx) -> Concat -> ScaledDotProductAttention + Assign pattern that
    OpenVINO's CPU plugin (StatefulSDPAFusion) replaces by one ScaledDotProductAttentionWithKVCache
    per layer, which appends to the cache in place. Without it the attention is decomposed into
    MatMul/Softmax over a cache concatenated anew every step."""
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    apply_make_stateful_transformation(ov_model, {f"past.{i}.{k}": f"present.{i}.{k}"
                                                  for i in range(num_layers) for k in ("key", "value")})
    batch = ops.gather(ops.shape_of(ov_model.input("input_ids"), output_type="i64"), ops.constant([0]),
                       ops.constant(0))
    rows = ops.range(ops.constant(0, np.int32), ops.convert(ops.squeeze(batch, ops.constant([0])), "i32"),
                     ops.constant(1, np.int32), "i32")  # identity beam order (batch,)
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [batch] + [ops.constant(np.array([d.get_length() if d.is_static else 0], np.int64))
                              for d in list(op.get_output_partial_shape(0))[1:]]
            zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, ops.concat(dims, 0))])
            readers = list(op.output(0).get_target_inputs())
            reordered = ops.gather(op.output(0), rows, ops.constant(0)).output(0)
            for reader in readers:
                reader.replace_source_output(reordered)
    ov_model.validate_nodes_and_infer_types()


def check_checkpoint_dir(checkpoint: Path) -> None:
    """The checkpoint must be a directory (a file inside it is a common slip)."""
    problem = checkpoint_dir_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{checkpoint}: {problem}" + ("; nothing was exported" if checkpoint.is_file() else ""))


def check_replaceable(out: Path, checkpoint: Path) -> None:
    """--force replaces a bundle (or an empty directory), never the checkpoint nor a directory of other files."""
    resolved, ckpt = out.resolve(), checkpoint.resolve()
    if resolved == ckpt or resolved in ckpt.parents:
        raise ExportError(f"--out {out}: is the checkpoint's directory or holds it; --force would delete "
                          f"{checkpoint}; choose another --out; nothing was exported")
    # a bundle: its manifest.json lists `files` and an `architecture` (a web app's or an extension's
    # manifest.json does not make its directory one; --force deleted such a directory)
    if not out.is_dir() or (any(out.iterdir()) and not is_bundle_dir(out)):
        why = (f"its {MANIFEST} is no bundle manifest" if (out / MANIFEST).is_file() else f"no {MANIFEST}")
        raise ExportError(f"--out {out}: exists and is not a bundle ({why}); --force replaces only a bundle; "
                          "choose another --out or remove it yourself; nothing was exported")


UNOWNED_STAGING_AGE_S = 24 * 3600  # an unowned staging dir untouched this long is an interrupted run's


def staging_prefix(out: Path) -> str:
    """The name prefix of a staging directory for `out` made by this process: `.NAME.partial-PID@HOST`.
    The owner in the name lets a later run on the same host remove what a killed one left (a model's
    size each time): `remove_stale_staging`."""
    return f".{out.name}.partial-{os.getpid()}@{socket.gethostname()}"


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging directories next to `out` left by a process of this host that no longer runs
    (an export or a build killed before publishing), and those in the old unowned form
    (`.NAME.partial-XXXX`, before the owner was in the name) untouched for UNOWNED_STAGING_AGE_S; a live
    owner's, another host's and a recent unowned one are kept. Returns what was removed."""
    host, removed = socket.gethostname(), []
    prefix = f".{out.name}.partial-"
    try:
        candidates = [d for d in out.parent.iterdir() if d.name.startswith(prefix)]
    except OSError:
        return removed
    for d in candidates:
        pid, at, rest = d.name[len(prefix):].partition("@")
        if not at and d.is_dir() and not d.is_symlink():
            try:
                idle = time.time() - d.stat().st_mtime
            except OSError:
                continue
            if idle > UNOWNED_STAGING_AGE_S:
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    removed.append(d)
                    log.warning("removed %s, an unfinished export's staging untouched for %.0f hours (from an "
                                "edgeglm before staging names had an owner)", d, idle / 3600)
            continue
        # this host's: HOST, then mkdtemp's "-" and 8 characters without a "-" (host "vm" is not "vm-2")
        suffix = rest[len(host) + 1:] if rest.startswith(host + "-") else None
        mine = rest == host or (suffix is not None and len(suffix) == 8 and "-" not in suffix)
        if not (pid.isdigit() and at and mine) or not d.is_dir():
            continue
        if int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
            log.warning("removed %s, left by an interrupted run (process %s is gone)", d, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


MIN_GOLDEN_TOKENS = 4


def fit_golden(prompt_ids: list[int], golden_tokens: int, max_positions: int, checkpoint: Path):
    """The golden check's prompt and token count, within the model's context window: a check over positions the
    model never runs (a 16-position model checked over 67) passed a meaningless check, and ONNX Runtime's export
    failed on it with a traceback. The tokens first, then the prompt's end, are cut to fit."""
    if len(prompt_ids) + golden_tokens <= max_positions:
        return prompt_ids, golden_tokens
    if max_positions < 1 + MIN_GOLDEN_TOKENS:
        raise ExportError(f"{checkpoint / 'config.json'}: max_position_embeddings {max_positions} leaves no room for "
                          f"the golden check (a prompt and {MIN_GOLDEN_TOKENS} tokens); nothing was exported")
    tokens = max(MIN_GOLDEN_TOKENS, min(golden_tokens, max_positions - len(prompt_ids)))
    prompt = prompt_ids[:max_positions - tokens]
    log.info("golden check cut to the context window of %d positions: a %d-token prompt and %d tokens",
             max_positions, len(prompt), tokens)
    return prompt, tokens


def make_staging(out: Path) -> tuple[Path, list[Path]]:
    """The staging directory next to `out` (and the parent directories made for it, deepest last):
    made before any work, so that an --out that cannot be written fails at once. Staging directories of
    killed runs for the same `out` are removed first."""
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()][::-1]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out) + "-", dir=out.parent))
    except OSError as exc:
        _remove_empty(missing)
        raise ExportError(f"--out {out}: not writable: cannot create a directory in {out.parent} "
                          f"({exc.strerror or exc}); choose a directory you can write to; "
                          "nothing was exported") from None
    return staging, missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):  # deepest first; only directories this export made, and only if still empty
        try:
            d.rmdir()
        except OSError:
            break


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions, show_progress: bool = True):
    """Export `checkpoint` to a bundle directory at `out`; returns the manifest."""
    checkpoint, out = Path(checkpoint), Path(os.path.abspath(out))  # `--out .`: its name, its parent
    check_checkpoint_dir(checkpoint)
    name = opts.name or checkpoint.resolve().name
    problem = bundle_name_problem(name)
    if problem and opts.name is None:
        raise ExportError(f"{checkpoint}: the directory's name {name!r} {problem}; pass --name NAME; "
                          "nothing was exported")
    exists = out.exists() or out.is_symlink()  # a dangling symlink too: renaming onto it failed after the export
    if exists and not opts.force:
        if out.exists() and not out.is_dir():  # a file (or a link to one): --force would not replace it either
            raise ExportError(f"--out {out}: is a file, not a bundle directory; choose another --out; nothing was "
                              "exported")
        raise ExportError(f"{out}: already exists; pass --force to replace it (the existing bundle is untouched)")
    if exists:
        check_replaceable(out, checkpoint)
    bundle = enclosing_bundle(out)
    if bundle is not None:
        raise ExportError(f"--out {out}: is inside the bundle {bundle}; choose a path outside any bundle; "
                          "nothing was exported")
    staging, made_dirs = make_staging(out)
    steps = 3 + 2 * len(opts.backends)  # load, golden, 2 per backend, manifest
    bar = tqdm(total=steps, desc="export", unit="step", disable=not show_progress, leave=True)

    def step(text: str) -> None:  # marks the previous step done and names the next
        bar.update(1)
        bar.set_postfix_str(text)

    published = False
    try:
        bar.set_postfix_str("loading checkpoint")
        cfg, model = load_checkpoint(checkpoint)
        problem = onnxruntime_problem(cfg) if "onnxruntime" in opts.backends else None
        if problem:
            raise ExportError(f"{checkpoint / 'config.json'}: {problem}; nothing was exported")
        tok_path = checkpoint / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{checkpoint}: tokenizer.json not found; a bundle must carry its tokenizer")
        try:
            tokenizer = load_tokenizer(tok_path)
        except RuntimeUserError as exc:
            raise CheckpointError(str(exc)) from None
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > cfg.vocab_size:  # token ids past the embedding table: an IndexError deep in torch
            raise CheckpointError(f"{tok_path}: has {vocab} tokens, more than the model's vocab_size "
                                  f"{cfg.vocab_size} (config.json): they do not belong together; put the "
                                  "model's own tokenizer.json there; nothing was exported")
        step("golden reference")
        prompt_ids = tokenizer.encode(opts.golden_prompt).ids
        if not prompt_ids:
            raise ExportError(f"golden prompt {opts.golden_prompt!r} encodes to no tokens")
        prompt_ids, golden_tokens = fit_golden(prompt_ids, opts.golden_tokens, cfg.max_position_embeddings,
                                               checkpoint)
        ref_tokens, ref_margins, _ = reference_greedy(model, prompt_ids, golden_tokens)

        shutil.copyfile(tok_path, staging / "tokenizer.json")
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        arch = ModelArch.from_manifest(cfg.to_dict())
        backends, golden, report = {}, {}, {"parameters": sum(p.numel() for p in model.parameters()),
                                             "backends": {}}
        deviations, eng_logits_by_backend = {}, {}
        for backend in opts.backends:
            weights = WEIGHTS[(backend, opts.precision)]
            step(f"{backend}: writing {weights} graph")
            quant_err = _write_backend(backend, weights, cfg, state, staging, opts.block)
            step(f"{backend}: parity check")
            qmodel = fake_quantized(model, weights, opts.block)
            tokens, margins, ref_logits = reference_greedy(qmodel, prompt_ids, golden_tokens)
            engine = load_engine(backend, staging / ENTRY[backend], arch)
            eng_logits = eng_logits_by_backend[backend] = teacher_forced_logits(engine, prompt_ids, tokens)
            deviations[backend] = float(np.abs(eng_logits - ref_logits).max())
            del engine
            files = sorted(p for p in (staging / backend).rglob("*") if p.is_file())
            backends[backend] = {"entry": ENTRY[backend], "weights": weights, "scheme": SCHEMES[weights]}
            golden[backend] = {"tokens": tokens, "margins": margins}
            report["backends"][backend] = {
                "weights": weights, "bytes": sum(p.stat().st_size for p in files),
                "max_weight_quantization_error": quant_err,
                "max_logit_deviation_from_reference": deviations[backend],
                "golden_tokens_equal_to_fp32_reference": sum(a == b for a, b in zip(tokens, ref_tokens)),
            }
        # near-ties within a few times the deviation seen here may resolve differently on other hardware
        tolerance = 4.0 * max(deviations.values()) + 1e-4
        for backend in opts.backends:
            engine = load_engine(backend, staging / ENTRY[backend], arch)
            result = check_golden(engine, prompt_ids, golden[backend]["tokens"], golden[backend]["margins"],
                                  tolerance)
            if not result.passed:
                raise ExportError(f"{backend}: exported model fails its own golden check ({result.describe()})")
        if "onnxruntime" in opts.backends:  # the GPU graph, run here on the CPU: recorded, not gated (the
            # autotune golden-checks every GPU path on the device itself before measuring it)
            gpu_report: dict = {"file": GPU_GRAPH_FILE}
            try:
                engine = load_engine("onnxruntime", staging / ENTRY["onnxruntime"], arch, gpu_graph=True)
                gpu_report["golden_on_cpu"] = check_golden(engine, prompt_ids, golden["onnxruntime"]["tokens"],
                                                           golden["onnxruntime"]["margins"], tolerance).describe()
                gpu_report["max_logit_deviation_from_onnxruntime"] = float(np.abs(
                    teacher_forced_logits(engine, prompt_ids, golden["onnxruntime"]["tokens"])
                    - eng_logits_by_backend["onnxruntime"]).max())
                del engine
            except Exception as exc:  # a GPU box's autotune would exclude it with its own reason
                log.warning("the GPU graph did not run on the CPU: %s", exc)
                gpu_report["error"] = str(exc).splitlines()[0][:300]
            report["backends"]["onnxruntime"]["gpu_graph"] = gpu_report
        step("writing manifest")
        manifest = write_manifest(staging, {
            "name": name,
            "version": opts.version,
            "min_agent_version": MIN_AGENT_VERSION,
            "architecture": cfg.to_dict(),
            "precision": opts.precision,
            "backends": backends,
            "golden": {"prompt_ids": prompt_ids, "reference": {"tokens": ref_tokens, "margins": ref_margins},
                       "backends": golden, "tolerance": tolerance},
            "compression": {**opts.compression, "export": report},
        }, chunk_size=opts.chunk_kib * 1024)
        staging.chmod(0o755)
        try:
            publish(staging, out, force=opts.force)
        except OSError as exc:
            raise ExportError(f"--out {out}: the bundle could not be put there ({exc.strerror or exc}); the "
                              "existing bundle, if any, is untouched; nothing was exported") from None
        published = True
        bar.update(1)
    except (RuntimeUserError, BundleError) as exc:
        raise ExportError(str(exc)) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not published:
            _remove_empty(made_dirs)
        bar.close()
    return manifest
