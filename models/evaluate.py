"""Evaluation of a compressed model: held-out quality, size and decode speed, per stage.

A *stage* is one model of a compression pipeline (the teacher, the pruned student, the distilled
student, its INT8 bundle...). Each is measured on the same held-out windows (`heldout_windows`:
consecutive, non-overlapping runs of `seq_len + 1` tokens of text the model was not trained on):

- perplexity: exp of the mean next-token cross-entropy over every predicted position;
- top-1: how often the most likely token is the actual next token;
- teacher agreement and KL: how often its top-1 equals the teacher's, and the mean
  KL(teacher || model) at T = 1, in nats (only when a teacher reference is given);
- parameters (total, and non-embedding: outside `embed_tokens` and `lm_head`, what pruning
  shrinks) and bytes (fp32 weights for a PyTorch model; the backend's model files for a bundle).

`evaluate_model` runs a PyTorch `GlmForCausalLM` on whole windows. `evaluate_bundle` runs an
exported bundle through the real edge runtime (the bundle is verified against its manifest, then
loaded on `runtime.engine`): the graph returns last-position logits only, so each window is fed
one token at a time through the KV cache, exactly as the edge decodes. It also times greedy
decoding (`decode_tokens` steps after a short prefill) and reports tokens/s.

`format_report(stages)` renders a readable table (the first stage is the reference for the
"% of ref top-1" column); `report_dict(stages)` is the JSON form that goes into a bundle
manifest's compression report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.data import DataError
from models.glm import GlmForCausalLM
from models.prune import non_embedding_params
from ota.bundle import open_bundle
from runtime.engine import ModelArch, load_engine
from runtime.generate import decode_one_token, prefill

BATCH = 8  # windows per PyTorch forward


@dataclass
class StageMetrics:
    name: str
    kind: str  # "pytorch fp32" or "bundle <backend> <weights>"
    tokens: int  # predicted positions evaluated
    perplexity: float
    top1: float
    teacher_agreement: float | None
    kl_to_teacher: float | None
    params: int
    non_embedding_params: int
    bytes: int
    decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherReference:
    """The teacher and its top-1 (n, seq_len) on the evaluation windows. Its log-probabilities are
    recomputed a batch at a time when a stage is scored, so memory stays at one batch of logits
    whatever the vocabulary and the number of held-out tokens."""

    model: GlmForCausalLM
    windows: torch.Tensor
    top1: torch.Tensor

    def log_probs(self, start: int, stop: int) -> torch.Tensor:
        return F.log_softmax(model_logits(self.model, self.windows[start:stop]), dim=-1)


def heldout_windows(ids, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping windows (n, seq_len + 1) of a token sequence; n * seq_len <= max_tokens."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    n = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise DataError(f"held-out text of {len(ids)} tokens is shorter than one evaluation window of "
                        f"seq_len + 1 = {seq_len + 1} tokens (and max_tokens={max_tokens})")
    return torch.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def model_logits(model: GlmForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Logits (n, seq_len, vocab) of a PyTorch model on the windows' inputs (fp32, on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    return model(windows[:, :-1].to(device))[0].float().cpu()


def teacher_reference(teacher: GlmForCausalLM, windows: torch.Tensor) -> TeacherReference:
    top1 = torch.cat([model_logits(teacher, windows[i:i + BATCH]).argmax(-1)
                      for i in range(0, len(windows), BATCH)])
    return TeacherReference(teacher, windows, top1)


class Scores:
    """Running sums over the scored positions: negative log-likelihood, top-1 hits, agreement, KL."""

    def __init__(self, with_teacher: bool):
        self.with_teacher = with_teacher
        self.count = 0
        self.nll = self.hits = self.agree = self.kl = 0.0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, windows: torch.Tensor, teacher: TeacherReference | None,
            start: int) -> None:
        """Score logits (b, seq_len, vocab) of `windows` (b, seq_len + 1), rows start.. of the evaluation set."""
        targets = windows[:, 1:]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        top = log_probs.argmax(-1)
        self.count += targets.numel()
        self.nll -= float(log_probs.gather(-1, targets[..., None]).double().sum())
        self.hits += float((top == targets).sum())
        if teacher is not None:
            t = teacher.log_probs(start, start + len(windows))
            self.agree += float((top == teacher.top1[start:start + len(windows)]).sum())
            self.kl += float((t.exp() * (t - log_probs)).double().sum())

    def result(self) -> dict:
        n = self.count
        return {"tokens": n, "perplexity": float(np.exp(self.nll / n)), "top1": self.hits / n,
                "teacher_agreement": self.agree / n if self.with_teacher else None,
                "kl_to_teacher": self.kl / n if self.with_teacher else None}


def model_bytes(model: GlmForCausalLM) -> int:
    """Bytes of the model's weights as stored (tied weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def evaluate_model(model: GlmForCausalLM, windows: torch.Tensor, teacher: TeacherReference | None = None,
                   name: str = "model", on_windows: Callable[[int], object] = lambda n: None) -> StageMetrics:
    """`on_windows(n)`: after each batch, with the number of windows it scored (a progress bar's update)."""
    scores = Scores(teacher is not None)
    for i in range(0, len(windows), BATCH):
        scores.add(model_logits(model, windows[i:i + BATCH]), windows[i:i + BATCH], teacher, i)
        on_windows(len(windows[i:i + BATCH]))
    return StageMetrics(name=name, kind="pytorch fp32", **scores.result(),
                        params=sum(p.numel() for p in model.parameters()),
                        non_embedding_params=non_embedding_params(model), bytes=model_bytes(model))


def window_logits(engine, window: list[int]) -> torch.Tensor:
    """Logits (1, len(window), vocab) through an edge engine, one token at a time through the KV cache."""
    cache, steps = engine.new_cache(), []
    for pos, token in enumerate(window):
        logits, cache = decode_one_token(engine, token, pos, cache)
        steps.append(logits)
    return torch.from_numpy(np.stack(steps))[None]


def decode_speed(engine, prompt_ids: list[int], new_tokens: int) -> float:
    """Greedy decode tokens/s after a prefill of `prompt_ids` (only the decode steps are timed)."""
    logits, cache = prefill(engine, prompt_ids)
    token, pos = int(np.argmax(logits)), len(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits, cache = decode_one_token(engine, token, pos, cache)
        token, pos = int(np.argmax(logits)), pos + 1
    return new_tokens / (time.perf_counter() - t0)


def evaluate_bundle(bundle_path: str | Path, windows: torch.Tensor, teacher: TeacherReference | None = None,
                    backend: str = "onnxruntime", name: str | None = None, decode_tokens: int = 64,
                    threads: int | None = None, on_windows: Callable[[int], object] = lambda n: None) -> StageMetrics:
    """Evaluate an exported bundle through the edge runtime (verified against its manifest first), one token at a
    time (the slow part of a build's evaluation: `on_windows(1)` after each window)."""
    from models.config import GlmConfig

    bundle = open_bundle(bundle_path)
    if backend not in bundle.manifest.backends:
        raise DataError(f"bundle {bundle_path} has no {backend!r} model; it carries: "
                        f"{', '.join(bundle.manifest.backends)}")
    entry = bundle.manifest.backends[backend]
    cfg = GlmConfig.from_dict(bundle.manifest.architecture)
    arch = ModelArch.from_manifest(bundle.manifest.architecture)
    engine = load_engine(backend, bundle.path(entry.entry), arch, threads, listed=bundle.listed_beside(entry.entry))
    scores = Scores(teacher is not None)
    for i, window in enumerate(windows[:, :-1].tolist()):
        scores.add(window_logits(engine, window), windows[i:i + 1], teacher, i)
        on_windows(1)
    # the speed probe stays inside the context window: 16 prompt tokens and 64 steps ran past a short one (an
    # ONNX Runtime error in the export stage, after the distillation)
    prompt = windows[0, :max(1, min(16, arch.max_positions - 1))].tolist()
    steps = min(decode_tokens, arch.max_positions - len(prompt))
    speed = decode_speed(engine, prompt, steps) if steps > 0 else None
    files = [f for f in bundle.manifest.files if f.path.startswith(backend + "/")]
    params = non_embedding_params(cfg) + cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return StageMetrics(name=name or Path(bundle_path).name, kind=f"bundle {backend} {entry.weights}",
                        **scores.result(), params=params,
                        non_embedding_params=non_embedding_params(cfg), bytes=sum(f.size for f in files),
                        decode_tokens_per_s=speed)


def report_dict(stages: list[StageMetrics]) -> dict:
    """JSON-ready form (for a bundle manifest's compression report)."""
    return {"stages": [s.to_dict() for s in stages]}


def report_json(stages: list[StageMetrics]) -> str:
    return json.dumps(report_dict(stages), indent=2)


def format_report(stages: list[StageMetrics]) -> str:
    """A Markdown table of the stages; the first stage is the reference for the relative columns."""
    ref = stages[0]
    head = ("| stage | kind | non-emb params | % of ref | size MB | perplexity | top-1 | % of ref top-1 "
            "| agree w/ teacher | KL to teacher | decode tok/s |")
    rows = [head, "|" + "---|" * 11]

    def opt(value, fmt):
        return "-" if value is None else format(value, fmt)

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    for s in stages:
        rows.append(
            f"| {s.name} | {s.kind} | {s.non_embedding_params / 1e6:.2f} M "
            f"| {100 * s.non_embedding_params / ref.non_embedding_params:.1f}% | {s.bytes / 1e6:.1f} "
            f"| {s.perplexity:.2f} | {100 * s.top1:.1f}% | {pct(s.top1 / ref.top1 if ref.top1 else None)} "
            f"| {pct(s.teacher_agreement)} | {opt(s.kl_to_teacher, '.3f')} "
            f"| {opt(s.decode_tokens_per_s, '.0f')} |")
    return "\n".join(rows)
