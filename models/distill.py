"""Knowledge distillation: train a (pruned) student to match a teacher's next-token distribution.

Interface (what `edgeglm build` and the compression benchmark call):

    DistillSettings(temperature=2.0, kl_weight=0.5, ce_weight=0.5, lr=1e-3, min_lr=1e-4,
                    warmup_steps=20, batch_size=16, seq_len=256, token_budget=2_000_000, seed=0,
                    checkpoint_every=50, device="auto", weight_decay=0.0, grad_clip=1.0,
                    max_passes=8.0)                     validated on construction (DistillError)
    distill(student, teacher | None, train_source, settings, work_dir, resume=True, progress=True,
            on_step=None) -> DistillReport
        train_source: data.TextSource(paths, tokenizer_json) or an already tokenized data.TokenCorpus

The loss per token is

    kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + ce_weight * CE(student, next token)

(the T^2 keeps the KL gradients' scale independent of T). `kl_weight=0` (and `teacher=None`) is
plain next-token training: the baseline the compression benchmark compares against.

Training: the student is trained in place on `token_budget` tokens, that is
`token_budget // (batch_size * seq_len)` steps of windows from `data.WindowSampler` (batch k
depends only on the seed and k). AdamW (betas 0.9/0.95), gradient norm clipped at `grad_clip`,
learning rate linear warm-up over `warmup_steps` then cosine down to `min_lr` at the last step.
A tqdm bar counts tokens (rate = tokens/s, ETA) and shows loss, KL and CE.

Exact resume: every `checkpoint_every` steps, at the last step and on Ctrl-C,
`work_dir/state.pt` is written atomically with the student, the optimizer, the scheduler, the
RNG states, the step (which is the data position) and the settings. `distill(..., resume=True)`
on the same work dir continues from it; since the batches are a function of the step, the
resumed run sees the same data in the same order and (on CPU, same thread count) ends with
bit-identical weights to an uninterrupted run. `work_dir/log.jsonl` has one line per step (loss,
KL, CE, learning rate and the window starts of that step's batch); a resume cuts it back to the
checkpoint's step. Resuming with different training settings is refused; `resume=False` starts
over. A finished run resumed again returns at once with the trained weights.

Timing: `state.pt` also records the training seconds of the steps it holds (over every run that
trained them; the time of steps after the last checkpoint, redone by a resume, is not counted) and
the device of the run that saved it, so the report of a resumed run, even one that trains no step
(a run that finished but whose caller crashed before recording it), gives the whole training's
`seconds` and `tokens_per_second`, not its own near-zero time. A state.pt without that record
(written by an older edgeglm) gives `seconds` and `tokens_per_second` None, with a `note` saying
why and what this run alone took (`seconds_this_run`).

Device "auto" is CUDA when available, else CPU. Bad settings (T <= 0, both weights zero, a
token budget the corpus cannot fill within `max_passes` passes, a warm-up longer than the run,
...) raise `DistillError` before any training, naming the setting and its allowed range.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.data import DataError, TextSource, TokenCorpus, WindowSampler, tokenize_corpus, windows_in
from models.errors import CheckpointError
from models.glm import GlmForCausalLM

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
DEVICES = ("auto", "cpu", "cuda")
# settings that may change between an interrupted run and its resume without changing the result
RESUMABLE_CHANGES = ("checkpoint_every", "device")


class DistillError(CheckpointError):
    """Distillation cannot run as asked (names the setting and its allowed range); CLI exit 2.

    `problems`: for invalid settings, every one found, as (setting, value, what it must be): a recipe
    tells them all at once, in its own words."""

    def __init__(self, message: str, problems: tuple[tuple[str, object, str], ...] = ()):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 2.0
    kl_weight: float = 0.5
    ce_weight: float = 0.5
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    batch_size: int = 16
    seq_len: int = 256
    token_budget: int = 2_000_000
    seed: int = 0
    checkpoint_every: int = 50
    device: str = "auto"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_passes: float = 8.0

    @staticmethod
    def field_problems(v: dict) -> list[tuple[str, object, str]]:
        """(setting, value, what it must be) for each value of `v` (every field) out of its own range."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        checks = [
            ("temperature", is_num(v["temperature"]) and v["temperature"] > 0, "> 0"),
            ("kl_weight", is_num(v["kl_weight"]) and v["kl_weight"] >= 0, ">= 0"),
            ("ce_weight", is_num(v["ce_weight"]) and v["ce_weight"] >= 0, ">= 0"),
            ("lr", is_num(v["lr"]) and 0 < v["lr"] <= 1, "in (0, 1]"),
            ("min_lr", is_num(v["min_lr"]) and 0 <= v["min_lr"] and (not is_num(v["lr"]) or v["min_lr"] <= v["lr"]),
             f"in [0, lr={v['lr']}]"),
            ("warmup_steps", is_int(v["warmup_steps"]) and v["warmup_steps"] >= 0, ">= 0"),
            ("batch_size", is_int(v["batch_size"]) and v["batch_size"] >= 1, ">= 1"),
            ("seq_len", is_int(v["seq_len"]) and v["seq_len"] >= 2, ">= 2"),
            ("token_budget", is_int(v["token_budget"]) and v["token_budget"] >= 1, ">= 1"),
            ("seed", is_int(v["seed"]) and 0 <= v["seed"] < 2 ** 31, "in [0, 2**31)"),
            ("checkpoint_every", is_int(v["checkpoint_every"]) and v["checkpoint_every"] >= 1, ">= 1"),
            ("device", v["device"] in DEVICES, f"one of {', '.join(DEVICES)}"),
            ("weight_decay", is_num(v["weight_decay"]) and v["weight_decay"] >= 0, ">= 0"),
            ("grad_clip", is_num(v["grad_clip"]) and v["grad_clip"] > 0, "> 0"),
            ("max_passes", is_num(v["max_passes"]) and v["max_passes"] > 0, "> 0"),
        ]
        return [(name, v[name], allowed) for name, ok, allowed in checks if not ok]

    def __post_init__(self) -> None:
        problems = self.field_problems(asdict(self))
        bad = {name for name, _, _ in problems}

        def valid(*names: str) -> bool:  # a setting that depends on others is checked once each of them is valid
            return not bad.intersection(names)

        if valid("kl_weight", "ce_weight") and self.kl_weight == 0 and self.ce_weight == 0:
            problems.append(("kl_weight", self.kl_weight, "> 0 where ce_weight = 0 (at least one loss "
                             "weight must be > 0)"))
        if valid("batch_size", "seq_len", "token_budget"):
            if self.tokens_per_step > self.token_budget:
                problems.append(("token_budget", self.token_budget, f">= {self.tokens_per_step}, one batch "
                                 "(batch_size * seq_len)"))
            elif valid("warmup_steps") and self.warmup_steps >= self.steps:
                problems.append(("warmup_steps", self.warmup_steps, f"< the run's {self.steps} steps "
                                 "(token_budget // (batch_size * seq_len))"))
        if problems:
            raise DistillError("; ".join(f"distill setting {name}={value!r} is invalid: must be {allowed}"
                                         for name, value, allowed in problems), tuple(problems))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.token_budget // self.tokens_per_step

    def to_dict(self) -> dict:
        return asdict(self)

    def check_corpus(self, corpus: TokenCorpus) -> None:
        """The corpus must hold one batch and fill the token budget within `max_passes` passes."""
        windows = windows_in(corpus.num_tokens, self.seq_len)
        if windows < self.batch_size:
            raise DistillError(
                f"training text of {corpus.num_tokens} tokens holds {windows} windows of seq_len={self.seq_len} "
                f"(each epoch starts at a random offset below seq_len, so N windows take (N + 1) x seq_len tokens); "
                f"batch_size={self.batch_size} needs at least {self.batch_size} windows, "
                f"{(self.batch_size + 1) * self.seq_len} tokens: give more text or lower batch_size/seq_len")
        passes = self.steps * self.tokens_per_step / (windows * self.seq_len)
        if passes > self.max_passes:
            raise DistillError(
                f"distill setting token_budget={self.token_budget} is too large for the training text "
                f"({windows * self.seq_len} tokens usable): it would take {passes:.1f} passes, more than "
                f"max_passes={self.max_passes}; must be <= {int(self.max_passes * windows * self.seq_len)} "
                "(or give more text, or raise max_passes)")


@dataclass
class DistillReport:
    steps: int
    tokens: int
    seconds: float | None  # training time of all `steps`, over every run (None: an earlier run's not recorded)
    tokens_per_second: float | None  # tokens / seconds
    final_loss: float
    final_kl: float
    final_ce: float
    resumed_from_step: int
    device: str  # the device this call trained on (or, if it trained no step, the one that saved the state)
    settings: dict = field(default_factory=dict)
    seconds_this_run: float = 0.0  # this call's training time alone
    note: str | None = None  # why seconds / tokens_per_second are None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DistillError("distill setting device='cuda' is invalid here: no CUDA device is available "
                           "(use 'cpu' or 'auto')")
    return torch.device(name)


def lr_factor(step: int, settings: DistillSettings) -> float:
    """Learning rate of step `step` (0-based) as a fraction of `lr`: linear warm-up, cosine to min_lr."""
    s = settings
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    span = max(1, s.steps - 1 - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    floor = s.min_lr / s.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 settings: DistillSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce): logits (B, T, V), targets (B, T). kl is T^2-scaled, 0 without a teacher."""
    ce = F.cross_entropy(student_logits.flatten(0, 1), targets.flatten())
    if teacher_logits is None or settings.kl_weight == 0:
        kl = torch.zeros((), device=ce.device)
    else:
        kl = kl_divergence(student_logits, teacher_logits, settings.temperature) * settings.temperature ** 2
    return settings.kl_weight * kl + settings.ce_weight * ce, kl, ce


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over positions of KL(softmax(teacher / T) || softmax(student / T)), in nats."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def _check_models(student: GlmForCausalLM, teacher: GlmForCausalLM | None, settings: DistillSettings,
                  corpus: TokenCorpus) -> None:
    if teacher is None and settings.kl_weight > 0:
        raise DistillError(f"distill setting kl_weight={settings.kl_weight} needs a teacher; "
                           "give one or set kl_weight=0 (plain next-token training)")
    vocab = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise DistillError(f"teacher vocab_size={teacher.config.vocab_size} differs from the student's {vocab}: "
                           "distillation needs the same tokenizer")
    top = int(corpus.tokens().max()) if corpus.num_tokens else 0
    if top >= vocab:
        raise DistillError(f"training text has token id {top}, outside the student's vocab_size={vocab}: "
                           "tokenize it with the model's own tokenizer.json")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(path: Path, step: int, student, opt, sched, settings: DistillSettings, last: dict,
                train_seconds: float | None, device) -> None:
    tmp = path.with_suffix(".partial")
    try:
        torch.save({"step": step, "model": student.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "settings": settings.to_dict(),
                    "last": last, "train_seconds": train_seconds, "device": str(device)}, tmp)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as a RuntimeError ("unexpected pos")
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            why = exc.strerror
        else:
            free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
            why = f"the write failed ({str(exc).splitlines()[0][:200]})" + (
                f"; {free / 1e6:.0f} MB free there: a full disk?" if free is not None else "")
        raise OSError(errno.EIO, f"cannot save the training state of step {step}: {why} (the step saved before it "
                                 f"is kept)", str(path)) from None
    os.replace(tmp, path)


def _load_state(path: Path, settings: DistillSettings) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise DistillError(f"{path}: cannot read the training state ({exc}); "
                           "remove it or pass resume=False to start over") from None
    old, new = state.get("settings", {}), settings.to_dict()
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"{k}={old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise DistillError(f"{path}: the interrupted run used other settings ({diff}); resume with the same "
                           "settings, use another work dir, or pass resume=False to start over")
    return state


def _state_misfit(saved: dict, own: dict) -> str | None:
    """How a saved student's tensors differ from this student's, in a few words (None: they fit)."""
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    shapes = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {k}: saved {tuple(saved[k].shape)}, "
                     f"this model {tuple(own[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of this model not saved, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} saved tensor(s) this model lacks, e.g. {extra[0]}")
    return "; ".join(parts) or None


def _trim_log(log_path: Path, step: int) -> None:
    """Keep the log lines of steps 1..step (those a resumed run does not redo)."""
    if not log_path.is_file():
        return
    lines = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in lines))


def prepare_corpus(train_source: TextSource | TokenCorpus, work_dir: Path, progress: bool) -> TokenCorpus:
    if isinstance(train_source, TokenCorpus):
        return train_source
    if isinstance(train_source, TextSource):
        return tokenize_corpus(train_source, work_dir / "tokens", progress=progress)
    raise DistillError(f"train_source {type(train_source).__name__} is invalid: "
                       "give a data.TextSource or a data.TokenCorpus")


def distill(student: GlmForCausalLM, teacher: GlmForCausalLM | None, train_source: TextSource | TokenCorpus,
            settings: DistillSettings, work_dir: str | Path, resume: bool = True, progress: bool = True,
            on_step: Callable[[int, dict], None] | None = None) -> DistillReport:
    """Train `student` in place (see the module docstring); returns what the run did.

    `on_step(step, metrics)` is called after each optimizer step (1-based step) and may raise to
    stop the run (the state saved last is where a resume starts)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        corpus = prepare_corpus(train_source, work_dir, progress)
    except DataError as exc:
        raise DistillError(str(exc)) from None
    settings.check_corpus(corpus)
    _check_models(student, teacher, settings, corpus)
    device = resolve_device(settings.device)
    sampler = WindowSampler(corpus, settings.seq_len, settings.batch_size, settings.seed)

    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()  # its forward runs under no_grad
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                            weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, settings))
    state_path, log_path = work_dir / STATE_FILE, work_dir / LOG_FILE
    start, last = 0, {"loss": float("nan"), "kl": float("nan"), "ce": float("nan"), "lr": settings.lr}
    earlier_seconds, saved_device = 0.0, None  # the training time of the steps resumed from (None: not recorded)
    if resume and state_path.is_file():
        state = _load_state(state_path, settings)
        misfit = _state_misfit(state["model"], student.state_dict())
        if misfit:  # one line: load_state_dict's own error lists every tensor, over many lines
            raise DistillError(f"{state_path}: the saved student does not fit this student model ({misfit}); "
                               "use another work dir or pass resume=False")
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, last = state["step"], state["last"]
        earlier_seconds, saved_device = state.get("train_seconds"), state.get("device")
        _trim_log(log_path, start)
        if progress:
            tqdm.write(f"{'distill' if teacher is not None else 'train'}: "
                       + (f"resuming after step {start} of {settings.steps} (saved in {state_path})"
                          if start < settings.steps else f"all {start} steps were trained by an earlier run"),
                       file=sys.stderr)
    else:
        log_path.unlink(missing_ok=True)

    steps, per_step = settings.steps, settings.tokens_per_step
    bar = tqdm(total=steps * per_step, initial=start * per_step, desc="distill" if teacher else "train",
               unit="tok", unit_scale=True, disable=not progress, leave=True)
    t0 = time.perf_counter()
    try:
        with open(log_path, "a") as log, _CtrlC() as ctrl_c:
            for step in range(start, steps):
                last = _train_step(student, teacher, sampler, step, opt, sched, settings, device)
                log.write(json.dumps({"step": step + 1, **last, "windows": sampler.window_starts(step)}) + "\n")
                bar.update(per_step)
                bar.set_postfix(loss=f"{last['loss']:.3f}", kl=f"{last['kl']:.3f}", ce=f"{last['ce']:.3f}")
                if (step + 1) % settings.checkpoint_every == 0 or step + 1 == steps or ctrl_c.pressed:
                    log.flush()
                    spent = None if earlier_seconds is None else earlier_seconds + time.perf_counter() - t0
                    _save_state(state_path, step + 1, student, opt, sched, settings, last, spent, device)
                if ctrl_c.pressed:  # the completed steps are saved: a rerun resumes after them
                    raise KeyboardInterrupt(f"step {step + 1} of {steps}")
                if on_step is not None:
                    on_step(step + 1, last)
    finally:
        bar.close()
        student.eval()
    trained = steps - start
    this_run = time.perf_counter() - t0 if trained else 0.0
    seconds = None if earlier_seconds is None else earlier_seconds + this_run
    note = None
    if seconds is None:
        note = (f"steps 1..{start} were trained by an earlier run whose time {state_path} does not record (written "
                f"by an older edgeglm): the whole training's seconds and tokens/s are unknown; this run trained "
                f"{trained} step(s) in {this_run:.1f} s")
    return DistillReport(steps=steps, tokens=steps * per_step, seconds=seconds,
                         tokens_per_second=steps * per_step / seconds if seconds else None,
                         final_loss=last["loss"], final_kl=last["kl"], final_ce=last["ce"],
                         resumed_from_step=start, device=str(device) if trained or not saved_device else saved_device,
                         settings=settings.to_dict(), seconds_this_run=this_run, note=note)


def _train_step(student, teacher, sampler: WindowSampler, step: int, opt, sched, settings: DistillSettings,
                device) -> dict:
    batch = sampler.batch(step).to(device)
    x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
    student.train()
    logits, _ = student(x)
    teacher_logits = None
    if teacher is not None and settings.kl_weight > 0:
        with torch.no_grad():
            teacher_logits, _ = teacher(x)
    loss, kl, ce = distill_loss(logits, teacher_logits, y, settings)
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), settings.grad_clip)
    opt.step()
    sched.step()
    return {"loss": loss.item(), "kl": kl.item(), "ce": ce.item(), "lr": lr}


class _CtrlC:
    """The first Ctrl-C or SIGTERM (`timeout`, `docker stop`, systemd, Kubernetes) during training sets `pressed`
    (the loop saves and stops after the current step); a second one interrupts at once. Only the main thread can
    own signals; elsewhere, no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    received: list[int] = []  # the signals that stopped a training (the CLI's exit code: 130 or 143)

    def __init__(self):
        self.pressed = False
        self._previous: dict = {}

    def __enter__(self) -> "_CtrlC":
        # a build started in the background by a script inherits SIGINT ignored, as every other stage keeps it
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        _CtrlC.received.append(signum)
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
