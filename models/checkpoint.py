"""Load and save Hugging Face `GlmForCausalLM` checkpoints.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as shards
listed in `model.safetensors.index.json`, and `tokenizer.json`. Weights may be bf16, fp16 or
fp32; they are loaded as fp32. Every tensor is checked against the shape the config implies
and to hold only finite values (a NaN or inf weight is refused, naming the tensor), and every
problem is raised as one `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import GlmConfig
from models.errors import CheckpointError
from models.glm import GlmForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def expected_shapes(cfg: GlmConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its shape (HF names)."""
    C, hs = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hs, cfg.num_key_value_heads * hs
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (q_out, C),
            p + "self_attn.k_proj.weight": (kv_out, C),
            p + "self_attn.v_proj.weight": (kv_out, C),
            p + "self_attn.o_proj.weight": (C, q_out),
            p + "mlp.gate_up_proj.weight": (2 * cfg.intermediate_size, C),
            p + "mlp.down_proj.weight": (C, cfg.intermediate_size),
        })
        if cfg.attention_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            })
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    return shapes


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist."""
    index = ckpt / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{index}: shard(s) listed but not found in {ckpt}: {', '.join(missing)}"
            )
        return [ckpt / f for f in files]
    if (ckpt / SINGLE_FILE).is_file():
        return [ckpt / SINGLE_FILE]
    raise CheckpointError(f"{ckpt}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


HEADER_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_weight_headers(ckpt: Path, cfg: GlmConfig) -> None:
    """The checks of `load_state_dict` that need no tensor data: the weight files exist and can be opened,
    and every tensor is expected, of the shape config.json implies and a loadable dtype, and none is
    missing. Reads the safetensors headers only (cheap for any model size), so `edgeglm build` can refuse a
    broken teacher before any work; non-finite values are found by `check_weight_values` (one read of the
    weights) or when the weights are loaded."""
    expected = expected_shapes(cfg)
    seen: set[str] = set()
    for path in weight_files(ckpt):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(f.keys()):
                    if name not in expected:
                        if (name == "lm_head.weight" and cfg.tie_word_embeddings) or \
                                name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
                    header = f.get_slice(name)
                    shape, dtype = tuple(header.get_shape()), header.get_dtype()
                    if shape != expected[name]:
                        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, but config.json implies "
                                              f"{expected[name]}")
                    if dtype not in HEADER_DTYPES:
                        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; "
                                              "expected float32, float16 or bfloat16")
                    seen.add(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: weights missing from the checkpoint: {shown}")


DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def stored_weights(ckpt: Path, cfg: GlmConfig) -> tuple[str, int]:
    """The dtype the checkpoint's weights are stored in ("bf16"; "bf16 + fp32" for a mix) and their bytes as
    stored (each expected tensor once: a tied lm_head stored anyway is not counted twice). A bf16 teacher is
    scored in fp32, and was reported as fp32 at twice its size (a compression ratio twice too good)."""
    expected, names, total, seen = expected_shapes(cfg), set(), 0, set()
    for path in weight_files(ckpt):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name not in expected or name in seen or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                header = f.get_slice(name)
                dtype = header.get_dtype()
                seen.add(name)
                names.add(DTYPE_NAMES.get(dtype, dtype.lower()))
                numel = 1
                for n in header.get_shape():
                    numel *= n
                total += numel * HEADER_DTYPES[dtype].itemsize if dtype in HEADER_DTYPES else 0
    return " + ".join(sorted(names)), total


SCAN_BYTES = 4 << 20  # what check_weight_values reads (and holds) at a time: hashed and checked while in cache
NON_FINITE = "the checkpoint is broken (a diverged training run, or an overflow when it was cast to fp16)"


def check_weight_values(ckpt: Path, digest=None, progress=None) -> None:
    """Every weight is a finite number (no NaN, no inf), checked without loading the model: each weight file is
    read once, front to back, SCAN_BYTES at a time (memory stays at one such piece whatever the model's size),
    each tensor's values checked as they go by. A non-finite value is a `CheckpointError` naming the file, the
    tensor and how many values. If `digest` (a hashlib object) is given, it is fed each file's name and bytes
    ("model.safetensors\0" + bytes) from the same read, so a checksum of the weights costs no second read;
    `progress(nbytes)` is called as bytes are read. Run `check_weight_headers` first (names, shapes, dtypes)."""
    for path in weight_files(ckpt):
        if digest is not None:
            digest.update(f"{path.name}\0".encode())
        try:
            _scan_file(path, digest, progress)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({exc})") from None


def _scan_file(path: Path, digest, progress) -> None:
    buf = bytearray(SCAN_BYTES)

    def read(n: int) -> memoryview:  # exactly n bytes (n <= SCAN_BYTES), hashed and counted
        view = memoryview(buf)[:n]
        got = f.readinto(view)
        if got != n:
            raise ValueError(f"file ends {n - got} bytes early")
        if digest is not None:
            digest.update(view)
        if progress is not None:
            progress(n)
        return view

    with open(path, "rb") as f:
        size = int.from_bytes(read(8), "little")
        header = json.loads(b"".join(bytes(read(min(SCAN_BYTES, size - done))) for done in
                                     range(0, size, SCAN_BYTES)))
        tensors = sorted((info["data_offsets"][0], info["data_offsets"][1], name, info["dtype"])
                         for name, info in header.items() if name != "__metadata__")
        pos = 0  # in the data, after the header
        for start, end, name, dtype in tensors:
            if start < pos:
                raise ValueError(f"tensor {name!r} overlaps the one before it")
            while pos < start:  # bytes between tensors (none in files safetensors writes): hashed only
                pos += len(read(min(SCAN_BYTES, start - pos)))
            torch_dtype = HEADER_DTYPES[dtype]
            step = SCAN_BYTES - SCAN_BYTES % torch_dtype.itemsize
            bad = 0
            while pos < end:
                values = torch.frombuffer(read(min(step, end - pos)), dtype=torch_dtype)
                pos += values.numel() * torch_dtype.itemsize
                if values.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):
                    bad += int((~torch.isfinite(values)).sum())  # NaN and inf propagate to min or max: counted
            if bad:
                raise CheckpointError(f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): "
                                      f"{NON_FINITE}")
        while block := f.read(SCAN_BYTES):  # anything after the last tensor: hashed only
            if digest is not None:
                digest.update(block)
            if progress is not None:
                progress(len(block))


def load_state_dict(ckpt: Path, cfg: GlmConfig) -> dict[str, torch.Tensor]:
    """All weights as fp32 tensors, validated against the config."""
    expected = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(ckpt):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(f.keys()):
                    if name not in expected:
                        if name == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue  # some writers store the tied head anyway
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # a buffer, recomputed from the config
                        raise CheckpointError(f"{path}: unexpected tensor {name!r} for this config")
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but "
                            f"config.json implies {expected[name]}"
                        )
                    if tensor.dtype not in LOADABLE_DTYPES:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}; "
                            "expected float32, float16 or bfloat16"
                        )
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): {NON_FINITE}; "
                            "export or train from a good checkpoint")
                    state[name] = tensor.to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: weights missing from the checkpoint: {shown}")
    return state


def load_checkpoint(ckpt: str | Path) -> tuple[GlmConfig, GlmForCausalLM]:
    """Load a `GlmForCausalLM` checkpoint directory as an fp32 reference model in eval mode."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    cfg = GlmConfig.from_file(ckpt / "config.json")
    state = load_state_dict(ckpt, cfg)
    model = GlmForCausalLM(cfg)
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return cfg, model.eval()


def _save_file(tensors: dict, path: Path) -> None:
    """safetensors' save_file, with the file mode every other file of the checkpoint gets (0644 under the usual
    umask): safetensors 0.8 writes 0600, so a service user other than the builder could not read the weights."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def save_checkpoint(model: GlmForCausalLM, out: str | Path, tokenizer_json: Path | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write a standard HF checkpoint (fp32 safetensors, sharded above `max_shard_bytes`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    if max_shard_bytes is None:
        _save_file(state, out / SINGLE_FILE)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_file(shard, out / fname)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    return out


def checkpoint_dir_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not a checkpoint directory (a file inside one is a common slip), or None."""
    if checkpoint.is_file():
        return (f"is a file; give the checkpoint's directory ({checkpoint.parent}), which holds config.json, "
                "the weights and tokenizer.json")
    if not checkpoint.is_dir():
        return "checkpoint directory not found"
    return None


def enclosing_bundle(path: Path) -> Path | None:
    """The bundle directory that `path` would be created inside, or None: a directory whose
    manifest.json is a bundle manifest (one listing `files` and an `architecture`; another
    project's manifest.json higher up does not count)."""
    for parent in Path(path).resolve().parents:
        if is_bundle_dir(parent):
            return parent
    return None


def is_bundle_dir(path: Path) -> bool:
    """Whether `path` holds a bundle manifest (manifest.json listing `files` and an `architecture`)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "files" in manifest and "architecture" in manifest
