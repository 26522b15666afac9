"""Tiny GLM checkpoints trained in seconds, for the demo, the tests and the benchmarks.

No weights can be downloaded on an edge build host without network, so edgeglm makes its own:
a byte-level BPE tokenizer and a small `GlmForCausalLM` trained on a fixed set of Python
standard-library sources (PSF-licensed text that every Python installation carries). Training
text and held-out text come from different modules.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.checkpoint import save_checkpoint
from models.config import GlmConfig
from models.glm import GlmForCausalLM

TRAIN_MODULES = (
    "textwrap.py", "string.py", "difflib.py", "argparse.py", "json/encoder.py", "json/decoder.py",
    "fractions.py", "statistics.py", "csv.py", "shlex.py", "calendar.py", "base64.py",
    "functools.py", "contextlib.py", "dataclasses.py",
)
HELDOUT_MODULES = ("heapq.py", "bisect.py", "queue.py", "sched.py")
EOS = "<|endoftext|>"
# GLM chat-format markers, reserved so that chat prompts tokenize the same way they will in a real model.
SPECIAL_TOKENS = (EOS, "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

SHAPES = {
    # name: (hidden, layers, heads, kv heads, head_dim, ffn, vocab, partial rotary factor)
    "tiny": (128, 2, 4, 2, 32, 256, 512, 0.5),
    "glm-s": (512, 8, 8, 2, 64, 1536, 8192, 0.5),
    "glm-m": (1024, 16, 16, 4, 64, 3072, 32000, 0.5),
}


def corpus_text(modules: tuple[str, ...] = TRAIN_MODULES) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((lib / m).read_text(encoding="utf-8") for m in modules)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def shape_config(shape: str, vocab_size: int | None = None, eos_id: int = 0) -> GlmConfig:
    hidden, layers, heads, kv, hd, ffn, vocab, prf = SHAPES[shape]
    return GlmConfig(
        vocab_size=vocab_size or vocab, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        partial_rotary_factor=prf, rms_norm_eps=1e-5, max_position_embeddings=4096,
        eos_token_id=(eos_id,), pad_token_id=eos_id,
    )


@dataclass
class TrainReport:
    steps: int
    tokens: int
    seconds: float
    final_loss: float


def train(model: GlmForCausalLM, ids: torch.Tensor, steps: int, batch: int = 16, seq_len: int = 128,
          lr: float = 3e-3, seed: int = 0, progress=None) -> TrainReport:
    """Plain next-token training on random windows of `ids`, cosine learning-rate decay."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0, loss_value = time.perf_counter(), float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts])  # (B, T)
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if progress is not None:
            progress(step + 1, steps, loss_value)
    model.eval()
    return TrainReport(steps, steps * batch * seq_len, time.perf_counter() - t0, loss_value)


def make_checkpoint(out: str | Path, shape: str = "tiny", train_steps: int = 200, seed: int = 0,
                    tie_word_embeddings: bool = False, progress=None) -> Path:
    """Train a tokenizer and (for train_steps > 0) a GLM of the given shape; save an HF checkpoint. `progress`:
    None, a callback (step, steps, loss), or True for a progress bar."""
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = corpus_text()
    vocab = SHAPES[shape][6]
    tok = train_tokenizer(text, vocab)
    tok.save(str(out / "tokenizer.json"))
    cfg = shape_config(shape, vocab_size=vocab, eos_id=tok.token_to_id(EOS))
    if tie_word_embeddings:
        cfg = GlmConfig.from_dict({**cfg.to_dict(), "tie_word_embeddings": True})
    model = GlmForCausalLM(cfg)
    _init_weights(model)
    if train_steps > 0:
        ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
        bar = None
        if progress is True:  # a progress bar on stderr, as `edgeglm demo` shows
            from tqdm import tqdm

            bar = tqdm(total=train_steps, desc="train", unit="step")

            def progress(step, steps, loss):
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(step - bar.n)
        try:
            train(model, ids, train_steps, seed=seed, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    save_checkpoint(model, out)
    return out


def _init_weights(model: GlmForCausalLM, std: float = 0.02) -> None:
    """GPT-2 style init; also keeps random-weight checkpoints (benchmarks) at realistic scales."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=std)
