"""Compression benchmark: prune + distill against the baselines, at <= 12.5% of the teacher, in one run.

Run from the repository root (the factory extra installed):

    python benchmarks/compression.py                       # the default, sized for 2 CPU cores
    python benchmarks/compression.py --teacher-shape 384x6x1536 --teacher-tokens 4000000 \\
        --tokens 4000000 --device cuda                      # scaled up

Text: the Python standard library's own source, which every Python installation carries (the
text models/tiny.py trains on): `TRAIN` modules for training (tokenizer, teacher and students),
`models.tiny.HELDOUT_MODULES` for every held-out number. Nothing is downloaded.

Steps (each cached under --workdir, default .bench/compression, keyed by its settings; the
training runs resume after an interruption):

1. a byte-level BPE tokenizer (--vocab) and a teacher (--teacher-shape HIDDENxLAYERSxFFN, 64-dim
   heads, 2 KV groups) trained with plain next-token loss for --teacher-tokens tokens;
2. the student shape: --student-layers layers, --student-kv KV groups and the largest FFN
   within --fraction of the teacher's non-embedding parameters (prune.solve_spec);
3. students of that one shape, each trained on the SAME --tokens tokens of the same text, same
   batches, same learning-rate schedule:
     (a) ours:      activation-importance prune + distillation (KL at --temperature, weights
                    --kl-weight / --ce-weight)
     (b) magnitude: magnitude-importance prune + plain next-token training
     (c) scratch:   random init + plain next-token training
     (d) ablation:  activation-importance prune + plain next-token training (isolates what the
                    importance measure does from what the distillation loss does)
     --extra-mixes T:KL:CE,...  more (a)-style students with other loss mixes (each choice's effect)
4. held-out evaluation (models.evaluate) of the teacher, every student before and after training,
   and student (a) exported to an INT8 bundle run through the real ONNX Runtime engine
   (token by token through the KV cache) with its decode speed.

It prints the table, the targets (student keeps >= 90% of the teacher's top-1; (a) beats (b)
and (c), margins in top-1 points and perplexity; INT8 perplexity <= +2% of its fp32) and writes
everything to WORKDIR/results.json. Quality is measured, never asserted: nothing here fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from _args import Parser, fraction, nonneg_float, positive_float, positive_int  # noqa: E402  (benchmarks/ on sys.path)
from procstats import cpu_model  # noqa: E402

import torch  # noqa: E402  (after the argument helpers: a slow import, but no work before the checks)

# training text: models.tiny's modules plus more of the standard library (held-out modules excluded)
EXTRA_TRAIN = ("inspect.py", "typing.py", "enum.py", "pathlib.py", "tarfile.py", "zipfile.py", "pprint.py",
               "configparser.py", "logging/__init__.py", "collections/__init__.py", "ast.py", "datetime.py",
               "gettext.py", "locale.py", "optparse.py", "pickle.py", "subprocess.py", "tempfile.py",
               "threading.py", "traceback.py", "unittest/case.py", "uuid.py", "weakref.py", "shutil.py")


KV_GROUPS, HEAD_DIM = 2, 64  # of the teacher (teacher_config)


def learning_rate(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid: must be a number > 0 and <= 1")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every one checked here (one-line error, exit 2) before anything is trained."""
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(".bench/compression"))
    p.add_argument("--vocab", type=positive_int, default=1024)
    p.add_argument("--teacher-shape", default="256x4x768", help="HIDDENxLAYERSxFFN (64-dim heads, 2 KV groups)")
    p.add_argument("--teacher-tokens", type=positive_int, default=1_000_000)
    p.add_argument("--teacher-lr", type=learning_rate, default=3e-3)
    p.add_argument("--tokens", type=positive_int, default=300_000, help="token budget of every student")
    p.add_argument("--fraction", type=fraction, default=0.125, help="student non-embedding params / teacher's")
    p.add_argument("--student-layers", type=positive_int, default=2)
    p.add_argument("--student-kv", type=positive_int, default=1)
    p.add_argument("--lr", type=learning_rate, default=3e-3, help="peak learning rate of every student")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--kl-weight", type=nonneg_float, default=1.0)
    p.add_argument("--ce-weight", type=nonneg_float, default=0.0)
    p.add_argument("--extra-mixes", default="2:0.5:0.5", help="more distilled students, T:KL:CE comma-separated, "
                   "e.g. '2:0.5:0.5,1:0.5:0.5' ('' for none)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--eval-tokens", type=positive_int, default=2048, help="held-out tokens for the PyTorch stages")
    p.add_argument("--bundle-eval-tokens", type=positive_int, default=1024,
                   help="held-out tokens fed to the INT8 bundle")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the steps require of the arguments together, as they would find it only after training."""
    from models.tiny import SPECIAL_TOKENS

    min_vocab = 256 + len(SPECIAL_TOKENS)  # the byte-level alphabet and the special tokens
    if args.vocab < min_vocab:
        p.error(f"--vocab {args.vocab} is invalid: must be an integer >= {min_vocab} (256 bytes + "
                f"{len(SPECIAL_TOKENS)} special tokens)")
    if not 0 <= args.seed < 2 ** 31:
        p.error(f"--seed {args.seed} is invalid: must be an integer in [0, 2**31)")
    if args.seq_len < 2 or args.seq_len >= 4096:
        p.error(f"--seq-len {args.seq_len} is invalid: must be an integer in 2..4095 (the teacher's context is 4096)")
    try:
        hidden, layers, ffn = (int(x) for x in args.teacher_shape.split("x"))
        if min(hidden, layers, ffn) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--teacher-shape {args.teacher_shape} is invalid: must be HIDDENxLAYERSxFFN, three integers >= 1, "
                "e.g. 256x4x768")
    if hidden % (HEAD_DIM * KV_GROUPS):
        p.error(f"--teacher-shape {args.teacher_shape} is invalid: HIDDEN must be a multiple of "
                f"{HEAD_DIM * KV_GROUPS} ({HEAD_DIM}-dim heads, their count a multiple of the {KV_GROUPS} KV groups), "
                f"e.g. {max(HEAD_DIM * KV_GROUPS, hidden // (HEAD_DIM * KV_GROUPS) * HEAD_DIM * KV_GROUPS)}")
    if args.student_layers > layers:
        p.error(f"--student-layers {args.student_layers} is invalid: allowed 1..{layers} (the teacher's layers, "
                f"--teacher-shape {args.teacher_shape})")
    if args.student_kv > KV_GROUPS:
        p.error(f"--student-kv {args.student_kv} is invalid: allowed 1..{KV_GROUPS} (the teacher's KV groups)")
    window = args.batch * args.seq_len
    for flag, value in (("--teacher-tokens", args.teacher_tokens), ("--tokens", args.tokens)):
        if value < window:
            p.error(f"{flag} {value} is invalid: must be at least one batch, --batch x --seq-len = {window} tokens")
    if args.eval_tokens < args.seq_len:
        p.error(f"--eval-tokens {args.eval_tokens} is invalid: must be at least one window, --seq-len {args.seq_len}")
    if args.kl_weight == 0 and args.ce_weight == 0:
        p.error("--kl-weight 0 and --ce-weight 0 are invalid: at least one loss must have a weight > 0")
    mixes = []
    for mix in filter(None, (m.strip() for m in args.extra_mixes.split(","))):
        try:
            t, kl, ce = (float(x) for x in mix.split(":"))
            if not (all(math.isfinite(x) for x in (t, kl, ce)) and t > 0 and kl >= 0 and ce >= 0 and kl + ce > 0):
                raise ValueError
        except ValueError:
            p.error(f"--extra-mixes {args.extra_mixes} is invalid: must be T:KL:CE triples, comma-separated "
                    f"(T > 0, KL and CE >= 0, not both 0), e.g. 2:0.5:0.5,1:0.5:0.5; {mix!r} is not one")
        mixes.append((t, kl, ce))
    args.mixes = mixes
    from models.prune import PruneError, solve_spec  # the student shape: fraction, layers and KV groups together

    try:
        solve_spec(teacher_config(args.teacher_shape, args.vocab, 0), args.fraction, num_layers=args.student_layers,
                   num_key_value_heads=args.student_kv, source="--fraction/--student-layers/--student-kv")
    except PruneError as exc:
        p.error(" ".join(str(exc).split()))


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_paths() -> list[Path]:
    import sysconfig

    from models.tiny import TRAIN_MODULES

    lib = Path(sysconfig.get_paths()["stdlib"])
    return [lib / m for m in TRAIN_MODULES + EXTRA_TRAIN if (lib / m).is_file()]


def heldout_text() -> str:
    from models.tiny import HELDOUT_MODULES, corpus_text

    return corpus_text(HELDOUT_MODULES)


def make_tokenizer(workdir: Path, vocab: int) -> Path:
    from models.tiny import train_tokenizer

    path = workdir / f"tokenizer-{vocab}-{key([str(p) for p in train_paths()])}.json"
    if not path.is_file():
        text = "\n".join(p.read_text(encoding="utf-8") for p in train_paths())
        train_tokenizer(text, vocab).save(str(path))
    return path


def teacher_config(shape: str, vocab: int, eos_id: int):
    from models.config import GlmConfig

    hidden, layers, ffn = (int(x) for x in shape.split("x"))
    return GlmConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64,
                     partial_rotary_factor=0.5, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     eos_token_id=(eos_id,), pad_token_id=eos_id)


def settings_for(args, tokens: int, lr: float, kl: float = 0.0, ce: float = 1.0, temperature: float = 1.0):
    from models.distill import DistillSettings

    steps = tokens // (args.batch * args.seq_len)
    return DistillSettings(temperature=temperature, kl_weight=kl, ce_weight=ce, lr=lr, min_lr=lr / 20,
                           warmup_steps=max(1, steps // 20), batch_size=args.batch, seq_len=args.seq_len,
                           token_budget=tokens, seed=args.seed, checkpoint_every=25, device=args.device,
                           max_passes=64.0)


def train_teacher(args, corpus, tok_path: Path, eos_id: int):
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.distill import distill
    from models.glm import GlmForCausalLM
    from models.tiny import _init_weights

    settings = settings_for(args, args.teacher_tokens, args.teacher_lr)
    out = args.workdir / f"teacher-{args.teacher_shape}-{key(settings.to_dict(), args.vocab, tok_path.name)}"
    if (out / "model" / "config.json").is_file():
        return load_checkpoint(out / "model")[1], out / "model"
    torch.manual_seed(args.seed)
    teacher = GlmForCausalLM(teacher_config(args.teacher_shape, args.vocab, eos_id))
    _init_weights(teacher)
    print(f"training the teacher ({args.teacher_shape}, {args.teacher_tokens} tokens) in {out}", file=sys.stderr)
    distill(teacher, None, corpus, settings, out / "run")
    save_checkpoint(teacher, out / "model", tokenizer_json=tok_path)
    return teacher.cpu().eval(), out / "model"


def student_init(method: str, teacher, spec, calib, seed: int):
    from models.glm import GlmForCausalLM
    from models.prune import activation_importance, magnitude_importance, prune_model
    from models.tiny import _init_weights

    if method == "scratch":
        torch.manual_seed(seed)
        model = GlmForCausalLM(spec.target_config(teacher.config))
        _init_weights(model)
        return model.eval()
    importance = activation_importance(teacher, calib) if method == "activation" else magnitude_importance(teacher)
    return prune_model(teacher, spec, importance)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from models.data import TextSource, tokenize_corpus
    from models.distill import distill
    from models.evaluate import (evaluate_model, format_report, heldout_windows,
                                 report_dict, teacher_reference)
    from models.prune import non_embedding_params, solve_spec
    from tokenizers import Tokenizer

    t_start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tok_path = make_tokenizer(args.workdir, args.vocab)
    tokenizer = Tokenizer.from_file(str(tok_path))
    corpus = tokenize_corpus(TextSource(train_paths(), tok_path), args.workdir / "tokens")
    print(f"training text: {len(corpus.files)} stdlib files, {corpus.num_tokens} tokens", file=sys.stderr)
    teacher, teacher_dir = train_teacher(args, corpus, tok_path, corpus.eos_id)

    windows = heldout_windows(tokenizer.encode(heldout_text()).ids, args.seq_len, args.eval_tokens)
    ref = teacher_reference(teacher, windows)
    stages = [evaluate_model(teacher, windows, ref, name="teacher")]

    spec = solve_spec(teacher.config, args.fraction, num_layers=args.student_layers,
                      num_key_value_heads=args.student_kv)
    calib = torch.from_numpy(corpus.tokens()[:32 * args.seq_len].astype("int64")).view(32, args.seq_len)
    students = {
        "(a) activation prune + distill": ("activation", settings_for(
            args, args.tokens, args.lr, args.kl_weight, args.ce_weight, args.temperature)),
        "(b) magnitude prune + plain": ("magnitude", settings_for(args, args.tokens, args.lr)),
        "(c) random init + plain": ("scratch", settings_for(args, args.tokens, args.lr)),
        "(d) activation prune + plain": ("activation", settings_for(args, args.tokens, args.lr)),
    }
    for t, kl, ce in args.mixes:
        students[f"(a') activation prune + distill T={t:g} kl={kl:g} ce={ce:g}"] = (
            "activation", settings_for(args, args.tokens, args.lr, kl, ce, t))
    runs, trained = {}, {}
    for name, (method, settings) in students.items():
        model = student_init(method, teacher, spec, calib, args.seed)
        stages.append(evaluate_model(model, windows, ref, name=f"{name}: before training"))
        work = args.workdir / f"student-{method}-{key(settings.to_dict(), spec, str(teacher_dir))}"
        print(f"{name}: training in {work}", file=sys.stderr)
        report = distill(model, teacher if settings.kl_weight > 0 else None, corpus, settings, work)
        model.cpu().eval()
        runs[name] = {"work_dir": str(work), "report": report.to_dict()}
        trained[name] = model
        stages.append(evaluate_model(model, windows, ref, name=name))

    ours_name = next(iter(students))
    bundle_stage, fp32_on_bundle_windows = int8_stage(args, trained[ours_name], tok_path, windows, ref, spec,
                                                      teacher_dir)
    stages += [fp32_on_bundle_windows, bundle_stage]
    summary = summarize(stages, ours_name, fp32_on_bundle_windows, bundle_stage)
    table = format_report(stages)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": runs[ours_name]["report"]["device"]},
        "args": {k: str(v) for k, v in vars(args).items()},
        "teacher": {"config": teacher.config.to_dict(), "non_embedding_params": non_embedding_params(teacher)},
        "student_spec": {"num_layers": spec.num_layers, "intermediate_size": spec.intermediate_size,
                         "num_key_value_heads": spec.num_key_value_heads},
        "training_tokens_in_corpus": corpus.num_tokens,
        "runs": runs, "summary": summary, **report_dict(stages), "table": table,
        "seconds": time.perf_counter() - t_start,
    }
    (args.workdir / "results.json").write_text(json.dumps(result, indent=2))
    print(table)
    print()
    for line in summary["lines"]:
        print(line)
    print(f"\n{result['seconds'] / 60:.1f} min; results in {args.workdir / 'results.json'}")
    return 0


def int8_stage(args, model, tok_path: Path, windows, ref, spec, teacher_dir: Path):
    """Student (a) as an INT8 bundle on ONNX Runtime, and its fp32 PyTorch self on the same windows."""
    from models.checkpoint import save_checkpoint
    from models.evaluate import evaluate_bundle, evaluate_model
    from models.export import ExportOptions, export_bundle

    few = windows[:max(1, args.bundle_eval_tokens // args.seq_len)]
    ckpt = save_checkpoint(model, args.workdir / "student-a-checkpoint", tokenizer_json=tok_path)
    bundle = args.workdir / "student-a-int8"
    export_bundle(ckpt, bundle, ExportOptions(precision="int8", backends=("onnxruntime",), name="student-a",
                                              force=True), show_progress=False)
    fp32 = evaluate_model(model, few, _sub(ref, len(few)), name="(a) fp32, bundle windows")
    int8 = evaluate_bundle(bundle, few, _sub(ref, len(few)), backend="onnxruntime", name="(a) INT8 bundle")
    return int8, fp32


def _sub(ref, n: int):
    from models.evaluate import TeacherReference

    return TeacherReference(ref.model, ref.windows[:n], ref.top1[:n])


def summarize(stages, ours_name: str, fp32, int8) -> dict:
    by = {s.name: s for s in stages}
    teacher, ours = by["teacher"], by[ours_name]
    lines, out = [], {}
    keep = ours.top1 / teacher.top1
    out["ours_top1_fraction_of_teacher"] = keep
    lines.append(f"(a) keeps {100 * keep:.1f}% of the teacher's held-out top-1 "
                 f"({100 * ours.top1:.1f}% vs {100 * teacher.top1:.1f}%): target >= 90%: "
                 f"{'met' if keep >= 0.9 else 'NOT met'}")
    for other in [n for n in by if n.startswith(("(b)", "(c)", "(d)", "(a')")) and ":" not in n]:
        s = by[other]
        d_top1, d_ppl = 100 * (ours.top1 - s.top1), ours.perplexity / s.perplexity - 1
        out[f"margin vs {other}"] = {"top1_points": d_top1, "perplexity_relative": d_ppl}
        verdict = "beats" if d_top1 > 0 and d_ppl < 0 else "does NOT beat"
        lines.append(f"(a) {verdict} {other}: top-1 {d_top1:+.2f} points, perplexity {100 * d_ppl:+.1f}% "
                     f"({ours.perplexity:.2f} vs {s.perplexity:.2f})")
    rel = int8.perplexity / fp32.perplexity - 1
    out["int8_perplexity_relative"] = rel
    lines.append(f"INT8 bundle perplexity {int8.perplexity:.3f} vs fp32 {fp32.perplexity:.3f}: {100 * rel:+.2f}% "
                 f"(target <= +2%: {'met' if rel <= 0.02 else 'NOT met'}); decode {int8.decode_tokens_per_s:.0f} tok/s")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    sys.exit(main())
