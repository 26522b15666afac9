"""`edgeglm build`: teacher checkpoint + text + recipe -> a small INT8 bundle and a compression report.

    edgeglm build --teacher CHECKPOINT --corpus FILE... --recipe RECIPE --out BUNDLE [--work DIR] [--resume]

Stages, each on the `build` progress bar (long stages show their own bars below it):

1. check      every input, before any long work and before the work directory is made: the
              recipe (models/recipe.py), its [distill] device available here, the teacher's config
              (a GLM, the recipe's sizes within its own, every window within its context window) and
              its weight files (whole, of the config's shapes: their headers), the bundle's name,
              --out and --work writable (tried), not inside an existing bundle (--work not a bundle itself) nor inside
              each other, every corpus file readable UTF-8 text (files under --work and --out are
              left out of a corpus directory), and last every teacher weight finite (one read of the
              weights, a piece at a time, which also gives the teacher's sha256); after tokenizing,
              the corpus size (enough tokens for the held-out split, the calibration and the
              distillation budget)
2. tokenize   the corpus through the teacher's tokenizer (models/data.py, cached in the work dir);
              the last `[eval] heldout_fraction` of the token stream is held out, the rest is the
              train split
3. prune      importance on `[prune] calibration_tokens` of the train split (windows spread evenly
              over it), then `prune_model` (models/prune.py); saved as work/pruned
4. distill    the pruned student learns from the teacher on the train split (models/distill.py);
              saved as work/distilled
5. evaluate   teacher, pruned and distilled students on the held-out split (models/evaluate.py)
6. export     the distilled student to a bundle (models/export.py) in work/bundle, then the INT8
              (or fp32) bundle itself is evaluated through the edge runtime
7. report     work/report.json and work/report.md, and the same JSON in the bundle manifest's
              `compression` field; the bundle is verified and copied to --out (a build stopped
              after the copy and before recording it: --resume finds that bundle at --out and
              only records it; any other existing --out is refused)

The work directory (default: BUNDLE.work next to --out) keeps every stage's output and
`state.json`, which records the build's identity (teacher, corpus files and every recipe setting
that shapes the student: `Recipe.resume_identity`, which leaves out name, description, the
[distill] device and checkpoint_every, and [quantize] and [export]; the other [distill] settings may
change until distillation saved a step: `_distillation_started`) and the stages done. `--resume`
continues a build stopped at any point: stages done are loaded, not repeated, and distillation
continues from its last checkpoint; with [quantize]/[export] changed, export and report are redone.
A work directory of another build is refused, naming the first setting that differs, and so is one
whose corpus text or teacher (config.json and weights, by sha256) changed under the stages done.

What a failure leaves:
- a failed check (bad input): nothing; the work directory is made only after every cheap check,
  and one made by this run is removed again if the build fails before its state is written
  (during tokenizing or the corpus-size checks);
- a failed stage (after `check`): the stages done stay in the work directory, and the error line
  says so: rerun with --resume once the cause is fixed (a changed device or checkpoint_every is
  fine), or remove the work directory to start over; out of memory, the line names what sets the
  stage's memory (`_memory_hint`: [distill] batch_size and seq_len) instead of a traceback.
Nothing is written at --out until the last step, and only a complete, verified bundle.

What Ctrl-C leaves (`BuildInterrupted`, a KeyboardInterrupt whose text the CLI prints after
"interrupted": "while distilling; the stages done (...) are kept in ..."), decided by what had
finished, and said as read back from the work directory, so that the line never promises what is
not there:
- during the checks or while tokenizing (no stage finished; a partial token file is never kept):
  as a failed check, a work directory this run made is removed again, and the line says that
  nothing was kept and the same command starts over;
- after tokenizing finished and before the corpus-size checks recorded `check`: the token cache is
  kept with a state.json of the build's identity and `tokenize` done;
- from then on (prune, distill, evaluate, export, report): the stages done are kept, and the line
  names them (and distillation's last saved step): the same command with --resume continues.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import (check_weight_headers, check_weight_values, checkpoint_dir_problem, enclosing_bundle,
                               is_bundle_dir, load_checkpoint, save_checkpoint, stored_weights, weight_files)
from models.config import GlmConfig
from models.data import DataError, TextSource, TokenCorpus, corpus_from_ids, text_files, tokenize_corpus
from models.distill import STATE_FILE as DISTILL_STATE_FILE
from models.distill import DistillError, DistillSettings, distill, resolve_device
from models.errors import CheckpointError, ExportError
from models.prune import (
    PruneError, PruneSpec, activation_importance, kept_indices, magnitude_importance, non_embedding_params,
    prune_model, solve_spec,
)
from models.recipe import EXPORT_SECTIONS, RECIPES_DIR, Recipe, bundle_name_problem, load_recipe
from ota.errors import BundleError
from runtime.errors import RuntimeUserError

STAGES = ("check", "tokenize", "prune", "distill", "evaluate", "export", "report")
STATE = "state.json"
# what the check stage records of the inputs themselves, compared on --resume (the rest follows from them and the
# recipe settings in the build's identity)
CORPUS_AND_TEACHER = ("corpus_tokens", "corpus_sha256", "teacher_sha256")
log = logging.getLogger("edgeglm.build")


class BuildError(CheckpointError):
    """`edgeglm build` cannot run with these inputs (names the setting and the allowed range)."""


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `edgeglm build`: the text ("while ...") says where, what was kept and how to go on."""


@dataclass
class BuildInputs:
    teacher: Path
    corpus: tuple[Path, ...]
    recipe: Recipe
    out: Path
    work: Path
    resume: bool = False

    @classmethod
    def create(cls, teacher, corpus, recipe, out, work=None, resume=False) -> "BuildInputs":
        out = Path(out)
        if not out.name or out.name in (".", ".."):
            raise BuildError(f"--out {out}: name a directory for the bundle (e.g. --out bundles/edge-small); "
                             "nothing was built")
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        work = Path(work) if work is not None else out.with_name(out.name + ".work")
        return cls(Path(teacher), tuple(Path(c) for c in corpus), recipe, out, work, resume)

    def identity(self) -> dict:
        """What a resumed build must share with the one that wrote the work directory: the inputs,
        and every recipe setting that shapes a stage's result (not the recipe's bytes, so that a
        fixed device or a new description does not orphan the stages done)."""
        return {"teacher": str(self.teacher.resolve()), "corpus": [str(p.resolve()) for p in self.corpus],
                "recipe": self.recipe.resume_identity()}


@dataclass
class Plan:
    """Everything the checks settled, so the long stages need no more decisions."""

    teacher_cfg: GlmConfig
    spec: PruneSpec
    student_cfg: GlmConfig
    distill_settings: object = None
    data: dict = field(default_factory=dict)


# --- checks (before any long work) ---------------------------------------------------------------

def _writable_dir(path: Path, flag: str, shown: Path | None = None) -> None:
    """`path` can be created (or, for a directory that exists, written into) by this user: tried by making
    (and removing) a directory in its nearest existing ancestor, since permission bits do not tell (root, a
    read-only mount, /proc)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    problem = None if probe.is_dir() else "not a directory"
    if problem is None:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".edgeglm-probe-", dir=probe))
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise BuildError(f"{flag} {shown or path}: cannot write there ({probe} is not a writable directory: "
                         f"{problem}); choose a directory you can write to; nothing was written")


def _read_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: unreadable build state ({exc}); remove {path.parent} to start over") from None


def _stages_done(data: dict) -> list[str]:
    done = data.get("done") or {}
    names = [s for s in STAGES if s in done]  # "tokenize" is recorded only by a build interrupted before "check"
    return names[:1] + ["tokenize"] + names[1:] if names[:1] == ["check"] and "tokenize" not in done else names


def _first_difference(recorded, current, path: str = "") -> str | None:
    """The first recipe setting that differs, as `[section] setting was X, now Y`."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        for key in list(current) + [k for k in recorded if k not in current]:
            where = f"[{key}]" if not path else f"{path} {key}"
            diff = _first_difference(recorded.get(key), current.get(key), where)
            if diff:
                return diff
        return None
    return None if recorded == current else f"{path} was {recorded!r}, now {current!r}"


def identity_difference(recorded, current: dict) -> str:
    """In words: what differs between a work directory's build and this one."""
    if not isinstance(recorded, dict) or "recipe" not in recorded:
        return "it was written by an earlier edgeglm, which recorded the recipe's bytes only"
    if recorded.get("teacher") != current["teacher"]:
        return f"--teacher was {recorded.get('teacher')}, now {current['teacher']}"
    if recorded.get("corpus") != current["corpus"]:
        return f"--corpus was {' '.join(recorded.get('corpus') or [])}, now {' '.join(current['corpus'])}"
    return "recipe setting " + (_first_difference(recorded["recipe"], current["recipe"]) or "?")


def _distill_only_difference(recorded, current: dict) -> bool:
    """Whether a recorded identity differs from this build's in [distill] settings alone."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("recipe"), dict):
        return False

    def rest(identity: dict) -> dict:
        return {**identity, "recipe": {k: v for k, v in identity["recipe"].items() if k != "distill"}}
    return rest(recorded) == rest(current)


def _distillation_started(work: Path) -> bool:
    """Whether the work directory's distillation finished or saved a step: before that, the stages done (check,
    tokenize, prune) do not depend on the [distill] settings, and a build resumes with them changed (a smaller
    batch_size after running out of memory)."""
    done = (_read_state(work / STATE).get("done") or {}) if (work / STATE).is_file() else {}
    return "distill" in done or (work / "distill" / DISTILL_STATE_FILE).exists()


def _comparable(identity):
    """A recorded identity as this edgeglm compares it: [quantize] and [export] are no longer part of it (an
    earlier edgeglm recorded them; a resume with them changed exports again)."""
    if isinstance(identity, dict) and isinstance(identity.get("recipe"), dict):
        return {**identity, "recipe": {k: v for k, v in identity["recipe"].items() if k not in EXPORT_SECTIONS}}
    return identity


def export_difference(inputs: BuildInputs, data: dict) -> str | None:
    """How this run's [quantize]/[export] settings differ from those the work directory's finished export was
    made with (`[export] version was '1.0.0', now '1.0.1'`), None if they do not or nothing was exported."""
    done = (data.get("done") or {}).get("export")
    if not isinstance(done, dict):
        return None
    had = done.get("settings")
    if had is None:  # exported by an earlier edgeglm: its identity held the settings, and they could not change
        recipe = (data.get("identity") or {}).get("recipe") or {}
        had = {k: recipe.get(k) for k in EXPORT_SECTIONS}
    return _first_difference(had, inputs.recipe.export_identity())


def published(inputs: BuildInputs) -> bool:
    """Whether --out is the bundle this build's work directory published (a build stopped after copying it
    to --out and before recording that: --resume then only records it)."""
    if not (inputs.resume and (inputs.out / "manifest.json").is_file()):
        return False
    try:
        data = _read_state(inputs.work / STATE)
        done = data.get("done", {})
        if export_difference(inputs, data):  # this run exports again: not the bundle at --out
            return False
        ours = json.loads((inputs.work / "bundle" / "manifest.json").read_text())
        theirs = json.loads((inputs.out / "manifest.json").read_text())
        # the same manifest, but for the name publishing may have given it (after its --out)
        return "export" in done and isinstance(theirs, dict) and {**theirs, "name": None} == {**ours, "name": None}
    except (OSError, ValueError, BuildError):
        return False


def check_paths(inputs: BuildInputs) -> None:
    work = inputs.work
    if inputs.out.exists() and not published(inputs):
        raise BuildError(f"--out {inputs.out}: already exists; choose a new bundle path (it is left untouched)")
    _writable_dir(inputs.out.parent, "--out", inputs.out)
    for flag, path in (("--out", inputs.out), ("--work", work)):
        bundle = enclosing_bundle(path)
        if bundle is not None:
            raise BuildError(f"{flag} {path}: is inside the bundle {bundle}, which would carry it unsigned; "
                             "choose a path outside any bundle")
    if is_bundle_dir(work):
        raise BuildError(f"--work {work}: is a bundle; the build would write its work files into it, unsigned; "
                         "choose a --work directory outside any bundle")
    _writable_dir(work, "--work")
    if work.exists() and not work.is_dir():
        raise BuildError(f"--work {work}: is a file; choose a directory")
    teacher = inputs.teacher.resolve()
    if work.resolve() == teacher or work.resolve() in teacher.parents:
        # the build writes (and to start over, removes) its work directory: never the checkpoint's own
        raise BuildError(f"--work {work}: holds the teacher checkpoint {inputs.teacher}; choose a --work directory "
                         "of its own")
    tokens_only = work.is_dir() and not (work / STATE).is_file() and _clear_killed_tokenizing(work)
    if inputs.resume and work.is_dir() and any(work.iterdir()) and not (work / STATE).is_file() and not tokens_only:
        raise BuildError(f"--resume: --work {work} holds files but no {STATE} (not a build's work directory); "
                         "choose the --work of the build to continue, or an empty or new one to start over")
    if work.resolve() == inputs.out.resolve():
        raise BuildError(f"--work {work}: must differ from --out")
    if work.resolve() in inputs.out.resolve().parents:
        raise BuildError(f"--out {inputs.out}: is inside --work {work}, which holds the build's own bundle/ and is "
                         "removed to start over; choose an --out outside the work directory")
    if inputs.out.resolve() in work.resolve().parents:
        raise BuildError(f"--work {work}: is inside --out {inputs.out}, which must not exist until the bundle is "
                         "written; choose a --work outside it")
    state = work / STATE
    if inputs.resume:
        if state.is_file():
            recorded = _comparable(_read_state(state).get("identity"))
            current = inputs.identity()
            if recorded != current and not (_distill_only_difference(recorded, current)
                                            and not _distillation_started(work)):
                raise BuildError(
                    f"--resume: {state} belongs to another build ({identity_difference(recorded, current)}); "
                    "a build resumes only with the same teacher, corpus and recipe settings (name, description, "
                    "[distill] device and checkpoint_every, [quantize] and [export] may change; the other [distill] "
                    "settings only until distillation saved a step): undo the change, or start over without "
                    f"--resume after removing {work} or with another --work directory")
    elif work.is_dir() and any(work.iterdir()):
        done = _stages_done(_read_state(state)) if state.is_file() else []
        what = f"a build stopped after {done[-1]}" if done else \
            "a build stopped while tokenizing: its token cache" if tokens_only else "a previous build?"
        raise BuildError(f"--work {work}: not empty ({what}); pass --resume to continue it, or remove it or "
                         "choose another --work directory to start over")


TOKEN_CACHE_FILE = re.compile(r"tokens-[0-9a-f]+\.(bin|json|partial|json\.partial)")


def _clear_killed_tokenizing(work: Path) -> bool:
    """A build killed while tokenizing (SIGKILL, a power cut: nothing could clean up) left `work` holding only its
    token cache, without a state: every later command refused it ("not empty" without --resume, "not a build's
    work directory" with it). Its partial files go, a finished token file stays (the cache is keyed by the
    tokenizer and the files, so it is reused only for the same input), and an emptied directory goes. True when
    `work` holds nothing else than such a cache (or nothing now): --resume may continue there."""
    tokens = work / "tokens"
    if [e.name for e in work.iterdir()] != ["tokens"] or not tokens.is_dir():
        return False
    files = list(tokens.iterdir())
    if not all(f.is_file() and TOKEN_CACHE_FILE.fullmatch(f.name) for f in files):
        return False
    partial = [f for f in files if f.name.endswith(".partial")]
    for f in partial:
        f.unlink(missing_ok=True)
    if not any(tokens.iterdir()):
        tokens.rmdir()
    if partial:
        log.warning("%s: cleared the partial token files of a build stopped while tokenizing", work)
    return True


def check_device(recipe: Recipe, settings: DistillSettings) -> None:
    try:
        resolve_device(settings.device)
    except DistillError:
        raise BuildError(f"{recipe.source}: [distill] device = {settings.device!r}: no CUDA device is available "
                         "here; use \"cpu\" or \"auto\" (CUDA where there is one); nothing was written") from None


def check_bundle_name(inputs: BuildInputs) -> None:
    """The bundle is named by [export] name (checked with the recipe) or else after --out."""
    if inputs.recipe.export.name is None:
        problem = bundle_name_problem(inputs.out.name)
        if problem:
            recipe = inputs.recipe.source
            if Path(recipe).parent == RECIPES_DIR:  # a shipped recipe: its installed file is not the user's to edit
                where = f"set [export] name in a copy of the {Path(recipe).stem!r} recipe (--recipe COPY.toml)"
            else:
                where = f"set [export] name in {recipe}"
            raise BuildError(f"--out {inputs.out}: the bundle is named after it, and {inputs.out.name!r} {problem}; "
                             f"{where} or choose another --out")


def check_corpus_text(files: list[Path]) -> None:
    """Every corpus file can be read and is UTF-8, before anything is written (one streaming pass)."""
    for path in files:
        decoder, pos, pending = codecs.getincrementaldecoder("utf-8")(), 0, 0
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    pending = len(decoder.getstate()[0])
                    decoder.decode(block)
                    pos += len(block)
                pending = len(decoder.getstate()[0])
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise BuildError(f"--corpus {path}: not UTF-8 text ({exc.reason} at byte {pos - pending + exc.start}); "
                             "convert it or leave it out of the training text; nothing was written") from None
        except OSError as exc:
            raise BuildError(f"--corpus {path}: cannot be read ({exc.strerror or exc}); nothing was written") from None


def corpus_files(inputs: BuildInputs) -> list[Path]:
    """The corpus files, less those under --work and --out: a corpus directory that holds them
    (`--corpus data --out data/bundle`) would otherwise read the build's own files on --resume."""
    own = (inputs.work.resolve(), inputs.out.resolve())
    skipped: list[Path] = []
    repeated: list[tuple[Path, Path]] = []
    try:
        found = text_files(inputs.corpus, skipped, repeated)
    except DataError as exc:  # a path that is not there, an empty directory
        raise BuildError(f"--corpus {exc}; nothing was written") from None
    if skipped:
        shown = ", ".join(str(f) for f in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        log.warning("--corpus: left out %d binary file(s) found in its directories: %s", len(skipped), shown)
    if repeated:
        shown = ", ".join(f"{again} (is {first})" for again, first in repeated[:3]) + \
            (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")
        log.warning("--corpus: %d file(s) named more than once are read once (twice, their text would be in the "
                    "training and the held-out text at once): %s", len(repeated), shown)
    files = [f for f in found if not any(d == f.resolve() or d in f.resolve().parents for d in own)]
    if not files:
        raise BuildError(f"--corpus {' '.join(map(str, inputs.corpus))}: no training text outside --work "
                         f"{inputs.work} and --out {inputs.out}; give files of UTF-8 text")
    return files


def check_teacher(teacher: Path) -> GlmConfig:
    problem = checkpoint_dir_problem(teacher)
    if problem:
        raise BuildError(f"--teacher {teacher}: {problem}")
    try:  # (names another architecture, or a folder that is no checkpoint)
        cfg = GlmConfig.from_file(teacher / "config.json")
    except CheckpointError as exc:
        raise BuildError(f"--teacher {teacher}: {exc}; give a GLM checkpoint directory (config.json, "
                         "model.safetensors, tokenizer.json); nothing was written") from None
    try:  # headers only: missing, truncated or misshapen weights are found now, not after tokenizing
        check_weight_headers(teacher, cfg)
    except CheckpointError as exc:
        where = "" if str(exc).startswith(str(teacher)) else f"--teacher {teacher}: "
        raise BuildError(f"{where}{exc}; give a complete teacher checkpoint; nothing was written") from None
    if not (teacher / "tokenizer.json").is_file():
        raise BuildError(f"--teacher {teacher}: tokenizer.json not found; the bundle must carry the teacher's tokenizer")
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(teacher / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # the tokenizers library's own error types
        raise BuildError(f"--teacher {teacher}: tokenizer.json cannot be read ({exc})") from None
    if vocab > cfg.vocab_size:  # token ids past the embedding table: an IndexError deep in the prune
        raise BuildError(f"--teacher {teacher}: tokenizer.json has {vocab} tokens, more than the model's vocab_size "
                         f"{cfg.vocab_size} (config.json): they do not belong together")
    return cfg


def check_teacher_weights(teacher: Path, progress: bool = False) -> str:
    """Every teacher weight finite (a NaN or inf names the tensor and its file), read tensor by tensor, a piece
    at a time (`check_weight_values`), before any work; returns the teacher's sha256 (`teacher_sha256`) from the
    same read."""
    try:
        return teacher_sha256(teacher, progress)
    except CheckpointError as exc:
        where = "" if str(exc).startswith(str(teacher)) else f"--teacher {teacher}: "
        fix = "a teacher checkpoint without them" if "non-finite" in str(exc) else "a complete teacher checkpoint"
        raise BuildError(f"{where}{exc}; give {fix}; nothing was written") from None


def student_spec(recipe: Recipe, cfg: GlmConfig) -> PruneSpec:
    p, where = recipe.prune, f"{recipe.source}: [prune]"
    if p.target_fraction is not None:
        return solve_spec(cfg, p.target_fraction, p.num_layers, p.num_key_value_heads, p.multiple_of, where)
    spec = PruneSpec(p.num_layers, p.intermediate_size, p.num_key_value_heads)
    spec.target_config(cfg, where)
    return spec


def check_context(recipe: Recipe, settings: DistillSettings, cfg: GlmConfig, teacher: Path) -> list[str]:
    """Every window the build runs the models on fits the teacher's context window: positions past its
    max_position_embeddings are ones it was never trained on, and ones the edge runtime never runs (it stops
    there), so training on them or scoring them gives a student and a report that mean nothing. Returns a
    problem per window too long."""
    p = recipe.prune
    windows = [("[distill] seq_len", settings.seq_len), ("[eval] seq_len", recipe.eval.seq_len)]
    if p.importance == "activation":  # calibration_windows: windows of at most calibration_tokens
        windows.insert(0, ("[prune] calibration_seq_len", p.calibration_seq_len) if p.calibration_seq_len <=
                       p.calibration_tokens else ("[prune] calibration_tokens", p.calibration_tokens))
    limit = cfg.max_position_embeddings
    return [f"{recipe.source}: {where} = {length} is longer than the teacher's context window "
            f"(max_position_embeddings = {limit} in {teacher / 'config.json'}): must be <= {limit}"
            for where, length in windows if length > limit]


def check_data(recipe: Recipe, corpus: TokenCorpus, settings: DistillSettings) -> dict:
    """Split sizes, and a clear error when the corpus is too small for what the recipe asks."""
    ev, pr, src = recipe.eval, recipe.prune, recipe.source
    total = corpus.num_tokens
    heldout = max(1, int(total * ev.heldout_fraction))
    train = total - heldout
    if heldout < ev.seq_len + 1:
        raise BuildError(
            f"corpus too small: its {total} tokens give {heldout} held-out tokens, less than one evaluation "
            f"window ({src}: [eval] seq_len = {ev.seq_len} needs {ev.seq_len + 1}); give more text, raise "
            f"[eval] heldout_fraction (allowed: < 0.5) or lower [eval] seq_len")
    if pr.importance == "activation" and train < pr.calibration_tokens:  # magnitude importance reads no text
        raise BuildError(
            f"corpus too small: the train split holds {train} tokens; {src}: [prune] calibration_tokens = "
            f"{pr.calibration_tokens} must be at most that (allowed: 16..{train}), or give more text")
    try:
        settings.check_corpus(TokenCorpus(corpus.path, train, corpus.files, corpus.eos_id))
    except DistillError as exc:
        msg = re.sub(r"^distill setting ", "", str(exc))
        raise BuildError(f"corpus too small for the distillation: {src}: [distill] {msg}") from None
    # the tokens the stages really run on (models.evaluate.heldout_windows, calibration_windows): whole windows
    scored = min((heldout - 1) // ev.seq_len, ev.heldout_tokens // ev.seq_len) * ev.seq_len
    calib_len = min(pr.calibration_seq_len, pr.calibration_tokens)
    calibration = max(1, pr.calibration_tokens // calib_len) * calib_len if pr.importance == "activation" else 0
    return {"corpus_tokens": total, "train_tokens": train, "heldout_tokens": heldout,
            "heldout_tokens_scored": scored, "calibration_tokens": calibration}


# --- the stages ---------------------------------------------------------------------------------

class _State:
    """state.json in the work directory: the inputs' identity, the plan's numbers and each stage's result."""

    def __init__(self, inputs: BuildInputs):
        self.path = inputs.work / STATE
        self.data = json.loads(self.path.read_text()) if inputs.resume and self.path.is_file() else {}
        # (the resume check passed: the same build, or [distill] settings changed before distillation began)
        self.data["identity"] = inputs.identity()
        self.data.setdefault("done", {})

    def done(self, stage: str):
        return self.data["done"].get(stage)

    def forget(self, *stages: str) -> None:
        """Take stages out of the done ones (they are made again)."""
        if any(self.data["done"].pop(stage, None) is not None for stage in stages):
            self._write()

    def mark(self, stage: str, result) -> None:
        self.data["done"][stage] = result
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


def split_corpus(corpus: TokenCorpus, heldout: int, work: Path) -> tuple[TokenCorpus, TokenCorpus]:
    """Train = the stream's first tokens (the same file, no copy), held-out = its last `heldout` tokens."""
    cut = corpus.num_tokens - heldout
    train = TokenCorpus(corpus.path, cut, corpus.files, corpus.eos_id)
    held = corpus_from_ids(np.asarray(corpus.tokens()[cut:]), work / "tokens", corpus.eos_id, "heldout")
    return train, held


def calibration_windows(train: TokenCorpus, tokens: int, seq_len: int) -> torch.Tensor:
    """`tokens // seq_len` windows of `seq_len` spread evenly over the train split: (n, seq_len)."""
    ids = train.tokens()
    seq_len = min(seq_len, tokens)
    n = max(1, tokens // seq_len)
    starts = np.linspace(0, train.num_tokens - seq_len, n).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(ids[s:s + seq_len], dtype=np.int64) for s in starts]))


def run_prune(recipe: Recipe, plan: Plan, teacher, train: TokenCorpus, work: Path, progress: bool) -> dict:
    p = recipe.prune
    if p.importance == "activation":
        calib = calibration_windows(train, p.calibration_tokens, p.calibration_seq_len)
        bar = tqdm(total=len(calib), desc="calibration", unit="window", disable=not progress, leave=False)
        importance = activation_importance(teacher, calib, progress=lambda done, _total: bar.update(done - bar.n))
        bar.close()
    else:
        importance = magnitude_importance(teacher)
    pruned = prune_model(teacher, plan.spec, importance)
    save_checkpoint(pruned, work / "pruned", tokenizer_json=None)
    # what prune_model keeps, ties broken the same way
    kept = kept_indices(importance.layers, plan.student_cfg.num_hidden_layers).tolist()
    return {
        "importance": importance.method,
        "spec": {"num_layers": plan.student_cfg.num_hidden_layers,
                 "intermediate_size": plan.student_cfg.intermediate_size,
                 "num_key_value_heads": plan.student_cfg.num_key_value_heads,
                 "num_attention_heads": plan.student_cfg.num_attention_heads},
        "layers_kept": kept,
        "layer_scores": [round(float(s), 6) for s in importance.layers],
        "calibration_tokens": p.calibration_tokens if p.importance == "activation" else 0,
    }


def sizes(cfg: GlmConfig) -> dict:
    return {"num_hidden_layers": cfg.num_hidden_layers, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "hidden_size": cfg.hidden_size, "non_embedding_params": non_embedding_params(cfg),
            "params": non_embedding_params(cfg) + cfg.vocab_size * cfg.hidden_size * (
                1 if cfg.tie_word_embeddings else 2)}


# --- the pipeline -------------------------------------------------------------------------------

@dataclass
class _Reached:
    """How far a build got (for what Ctrl-C keeps and says): the stage running, and the token corpus once
    tokenizing finished."""

    stage: str = "check"
    corpus: TokenCorpus | None = None


def plan_build(inputs: BuildInputs, progress: bool = True,
               reached: _Reached | None = None) -> tuple[Plan, TokenCorpus, TokenCorpus]:
    """Every check, cheapest first; only tokenizing the corpus (cached in the work dir) takes time."""
    reached = reached if reached is not None else _Reached()
    recipe = inputs.recipe
    settings = recipe.distill_settings()
    check_device(recipe, settings)
    if "block" in recipe.quantize.model_fields_set:
        log.warning("%s: [quantize] block = %s has no effect: INT8 bundles have one scale per output channel "
                    "(docs/factory.md); leave it out of new recipes (a build in progress that resumes without it "
                    "exports again)", recipe.source, recipe.quantize.block)
    teacher_cfg = check_teacher(inputs.teacher)
    problems = []  # what the recipe asks of this teacher: every problem in one line
    try:
        spec = student_spec(recipe, teacher_cfg)
        student_cfg = spec.target_config(teacher_cfg, f"{recipe.source}: [prune]")
    except PruneError as exc:
        problems.append(str(exc))
    problems += check_context(recipe, settings, teacher_cfg, inputs.teacher)
    if problems:
        raise BuildError("; ".join(problems) + "; nothing was written")
    check_bundle_name(inputs)
    check_paths(inputs)
    files = corpus_files(inputs)  # DataError names a missing corpus file
    check_corpus_text(files)
    # the last check before the work directory: the one that reads every weight (NaN or inf), and gives the
    # teacher's sha256 from that read (recorded for --resume)
    teacher_digest = check_teacher_weights(inputs.teacher, progress)
    try:
        inputs.work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # _writable_dir's probe passed, yet this failed (a race, a name too long)
        raise BuildError(f"--work {inputs.work}: cannot be created ({exc.strerror or exc}); choose a directory "
                         "you can write to; nothing was written") from None
    reached.stage = "tokenize"
    corpus = tokenize_corpus(TextSource(files, inputs.teacher / "tokenizer.json"), inputs.work / "tokens", progress)
    reached.stage, reached.corpus = "check", corpus
    data = check_data(recipe, corpus, settings)
    data["corpus_sha256"] = _sha256_file(corpus.path)  # text changed with the same token count is caught too
    data["teacher_sha256"] = teacher_digest  # a teacher retrained in place is caught on --resume
    train, heldout = split_corpus(corpus, data["heldout_tokens"], inputs.work)
    return Plan(teacher_cfg, spec, student_cfg, settings, data), train, heldout


def _remove_new_work(work: Path, existed: bool, made_parents: list[Path]) -> None:
    """Undo a work directory this run made (or filled, when it was empty) before any state was kept."""
    if existed:
        for child in work.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    for d in reversed(made_parents):  # deepest first, only if still empty
        try:
            d.rmdir()
        except OSError:
            break


USER_ERRORS = (CheckpointError, ExportError, BundleError, RuntimeUserError)


def _sha256_file(path: Path, h=None) -> str:
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_sha256(teacher: Path, progress: bool = False) -> str:
    """One sha256 over the teacher's config.json and weight files (names and bytes, in that order): what the
    stages done were made from. (Its tokenizer.json shows in the corpus' tokens.) The weights are read once,
    for this and for `check_weight_values` (every value finite: a CheckpointError names the tensor)."""
    h = hashlib.sha256(b"config.json\0" + (teacher / "config.json").read_bytes())
    files = weight_files(teacher)
    bar = tqdm(total=sum(p.stat().st_size for p in files), desc="teacher weights", unit="B", unit_scale=True,
               disable=not progress, leave=False)
    try:
        check_weight_values(teacher, h, progress=bar.update)
    finally:
        bar.close()
    return h.hexdigest()


DOING = {"check": "checking the inputs", "tokenize": "tokenizing the corpus", "prune": "pruning",
         "distill": "distilling", "evaluate": "evaluating", "export": "exporting the bundle",
         "report": "writing the report and publishing the bundle"}


def _interrupted(work: Path, reached: _Reached, detail: str = "") -> BuildInterrupted:
    """What Ctrl-C left, read back from the work directory (after any clean-up), in words for the CLI."""
    doing = "checking the corpus size" if reached.stage == "check" and reached.corpus is not None else \
        DOING.get(reached.stage, reached.stage)
    if not work.is_dir() or not any(work.iterdir()):
        return BuildInterrupted(f"while {doing}, before any stage finished: nothing was kept; run the "
                                "same command again to start over")
    try:
        done = _stages_done(_read_state(work / STATE)) if (work / STATE).is_file() else []
    except BuildError:
        done = []
    if not done:  # a --resume into a directory without a state: left as it was
        return BuildInterrupted(f"while {doing}, before any stage finished; {work} is left as it was: "
                                "the same command with --resume starts again from there")
    step = ""
    if reached.stage == "distill" and (work / "distill" / "state.pt").is_file():
        step = f", with distillation's last saved training step ({detail})" if detail else \
            ", with distillation's last saved training step"
    return BuildInterrupted(f"while {doing}; the stages done ({', '.join(done)}) are kept in {work}{step}: "
                            "the same command with --resume continues from there")


def _say_resuming(inputs: BuildInputs, state: "_State", progress: bool, fresh: bool = False) -> None:
    """One line on stderr (not with --quiet) when --resume found stages done; distillation's own line says the
    step it continues from (models/distill.py)."""
    done = _stages_done(state.data)
    if inputs.resume and fresh:  # (`fresh`: the work directory was new or empty) said even with --quiet: it costs a
        # whole distillation
        tqdm.write(f"edgeglm build: warning: --resume: no build to continue in --work {inputs.work} (new or empty): "
                   f"starting a new build from the first stage; a build with another --out keeps its stages in its "
                   f"own work directory (default: that --out's name + .work): give it as --work to continue that "
                   f"build", file=sys.stderr)
    if progress and inputs.resume and done:
        changed = export_difference(inputs, state.data)
        if changed:
            done = [s for s in done if s not in ("export", "report")]
        tqdm.write(f"edgeglm build: resuming {inputs.work}: done before ({', '.join(done)}) kept, not redone"
                   + (f"; exported again: recipe setting {changed}" if changed else ""), file=sys.stderr)


def _resume_hint(work: Path, state: "_State") -> str:
    done = ", ".join(_stages_done(state.data))
    distill = "device or checkpoint_every" if _distillation_started(work) else \
        "setting (distillation saved no step yet)"
    return (f"the stages done ({done}) are kept in {work}: rerun with --resume once the cause is fixed "
            f"(a changed [distill] {distill} is fine, and so is [quantize] or [export]: exported "
            f"again), or remove {work} to start over")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says that memory ran out: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError of torch's CPU allocator."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def _memory_hint(stage: str, recipe, work: Path) -> str:
    """What to lower in the recipe when `stage` ran out of memory."""
    d = recipe.distill_settings()
    if stage == "distill":
        saved = work / "distill" / DISTILL_STATE_FILE
        return (f"each step holds the teacher's and the student's logits over [distill] batch_size x seq_len = "
                f"{d.batch_size} x {d.seq_len} tokens (x the vocabulary, several times over in the loss): lower "
                f"[distill] batch_size or seq_len (token_budget sets the tokens trained on, not the memory), or "
                f"set [distill] device = \"cpu\" where a GPU's memory is the limit"
                + (f" (distillation saved steps with these settings, in {saved}: remove it to distill from the "
                   f"start with others, the stages before kept)" if saved.exists() else ""))
    if stage == "evaluate":
        return f"lower [eval] seq_len (now {recipe.eval.seq_len})"
    if stage == "prune":
        return "lower [prune] calibration_seq_len or calibration_tokens"
    return "free memory on this machine, or build on one with more"


def run_build(inputs: BuildInputs, progress: bool = True) -> dict:
    """Run every stage (skipping those a resumed build has done); returns the compression report."""
    # no ETA or rate: stages differ in length by orders of magnitude (an average per stage predicted 10 s
    # left at the start of a distillation of minutes); each stage's own bar below has its ETA
    bar = tqdm(total=len(STAGES), desc="build", unit="stage", disable=not progress, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]")
    reached = _Reached()

    def stage(name: str) -> None:
        reached.stage = name.split()[0]
        bar.set_postfix_str(name)

    work = inputs.work
    existed = work.is_dir()
    fresh = not existed or not any(work.iterdir())
    made_parents = [p for p in work.parents if not p.exists()][::-1]
    try:
        stage("check")
        try:
            plan, train, heldout = plan_build(inputs, progress, reached)
            state = _State(inputs)
            _say_resuming(inputs, state, progress, fresh)
            # what the earlier run recorded of the inputs (a work directory of an older edgeglm has no
            # corpus_sha256 and no teacher_sha256: what it lacks is not compared)
            previous = state.done("check")
            previous = {k: v for k, v in previous.items() if k in CORPUS_AND_TEACHER} \
                if isinstance(previous, dict) else {}
            recorded = {k: plan.data.get(k) for k in previous}
            if recorded != previous and _stages_done(state.data)[2:] and \
                    recorded.get("teacher_sha256") != previous.get("teacher_sha256"):
                raise BuildError(
                    f"--resume: the teacher {inputs.teacher} changed since {work} was made (its config.json or "
                    "weights differ, by sha256), and the stages done were made from the one before; start over "
                    f"without --resume after removing {work} or with another --work directory, or put the "
                    "earlier teacher back")
            if recorded != previous and _stages_done(state.data)[2:]:
                same = previous.get("corpus_tokens") == plan.data["corpus_tokens"]
                raise BuildError(
                    f"--resume: the corpus changed since {work} was made ("
                    + ("its text changed, with the same number of tokens" if same else
                       f"now {plan.data['corpus_tokens']} tokens, then {previous.get('corpus_tokens')}")
                    + f"); start over without --resume after removing {work} or with another --work directory")
            state.mark("check", plan.data)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            if work.is_dir() and not (work / STATE).exists():
                if interrupted and reached.corpus is not None:  # Ctrl-C after tokenizing: the tokens are kept
                    _State(inputs).mark("tokenize", {"corpus_tokens": reached.corpus.num_tokens,
                                                     "tokens": reached.corpus.path.name})
                elif fresh:  # nothing finished (or bad input): as if this run had not been
                    _remove_new_work(work, existed, made_parents)
            if interrupted:
                raise _interrupted(work, reached) from None
            if isinstance(exc, OSError):  # a full disk while tokenizing, an unreadable directory: one line
                where = f"{exc.filename}: " if exc.filename else ""
                left = f"the stages done are kept in {work}: rerun with --resume once the cause is fixed" \
                    if (work / STATE).is_file() else "nothing was kept" if not work.exists() else \
                    f"{work} is left as it was"
                raise BuildError(f"{where}{exc.strerror or exc}; {left}") from None
            raise
        bar.update(2)
        try:
            return _run_stages(inputs, plan, train, heldout, state, stage, bar, progress)
        except KeyboardInterrupt as exc:  # distillation saved its completed steps first (models/distill.py)
            raise _interrupted(work, reached, str(exc)) from None
        except USER_ERRORS as exc:
            raise BuildError(f"{exc}; {_resume_hint(work, state)}") from None
        except OSError as exc:  # a full disk, a directory that went away: one line, the finished stages kept
            where = f"{exc.filename}: " if exc.filename else ""
            raise BuildError(f"{where}{exc.strerror or exc}; {_resume_hint(work, state)}") from None
        except Exception as exc:
            if _out_of_memory(exc):  # a recipe too large for this machine: one line, with what to change
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
                raise BuildError(f"out of memory in stage {reached.stage} ({first}): "
                                 f"{_memory_hint(reached.stage, inputs.recipe, work)}; {_resume_hint(work, state)}"
                                 ) from None
            exc.add_note(f"edgeglm build: {_resume_hint(work, state)}")
            raise
    finally:
        bar.close()


def _run_stages(inputs: BuildInputs, plan: Plan, train: TokenCorpus, heldout: TokenCorpus, state: "_State",
                stage, bar, progress: bool) -> dict:
    recipe, work = inputs.recipe, inputs.work
    stage("prune (loading the teacher)")
    _, teacher = load_checkpoint(inputs.teacher)
    prune_result = state.done("prune")
    if prune_result is None:
        stage("prune")
        prune_result = run_prune(recipe, plan, teacher, train, work, progress)
        state.mark("prune", prune_result)
    bar.update(1)
    stage("distill")
    distill_result = state.done("distill")
    if distill_result is None:
        _, student = load_checkpoint(work / "pruned")
        report = distill(student, teacher, train, plan.distill_settings, work / "distill",
                         resume=inputs.resume, progress=progress)
        save_checkpoint(student.cpu(), work / "distilled", tokenizer_json=inputs.teacher / "tokenizer.json")
        distill_result = report.to_dict()
        state.mark("distill", distill_result)
    bar.update(1)
    stage("evaluate")
    evaluator = None
    evaluation = state.done("evaluate")
    if evaluation is None:
        evaluator = Evaluator(recipe, teacher, heldout, progress)
        evaluation = evaluate_stages(evaluator, teacher, work, inputs.teacher)
        state.mark("evaluate", evaluation)
    bar.update(1)
    stage("export")
    bundle = work / "bundle"
    export_result = state.done("export")
    if export_result is None or export_difference(inputs, state.data):  # (a resume with [export] changed)
        state.forget("export", "report")  # first: a stop while exporting again must not leave the old ones done
        run_export(inputs, bundle, progress)
        evaluator = evaluator or Evaluator(recipe, teacher, heldout, progress)
        export_result = {"evaluation": evaluate_bundle_stages(recipe, evaluator, bundle),
                         "settings": recipe.export_identity()}
        state.mark("export", export_result)
    bar.update(1)
    stage("report")
    done_before = published(inputs)  # a run that stopped after publishing, before recording it
    report = _published_report(work) if done_before else None
    if report is None:
        report = compression_report(inputs, plan, prune_result, distill_result,
                                    {**evaluation, **export_result["evaluation"]})
        write_report(report, work)
    if not done_before:  # named after this run's --out (unless [export] name), whichever run exported it
        publish_bundle(bundle, inputs.out, report, name=recipe.export.name or inputs.out.name)
    state.mark("report", {"out": str(inputs.out)})
    bar.update(1)
    return report


def _published_report(work: Path) -> dict | None:
    """The report a run wrote to the work directory before it published the bundle (None if unreadable): a
    recovering --resume keeps it rather than making one anew from its own inputs, which may differ in what
    the identity leaves out (name, recipe path)."""
    try:
        return json.loads((work / "report.json").read_text())
    except (OSError, ValueError):
        return None


def run_export(inputs: BuildInputs, bundle: Path, progress: bool) -> None:
    from models.export import ExportOptions, export_bundle

    q, e = inputs.recipe.quantize, inputs.recipe.export
    opts = ExportOptions(precision=q.precision, backends=tuple(e.backends), name=e.name or inputs.out.name,
                         version=e.version, block=q.block, chunk_kib=e.chunk_kib, golden_tokens=e.golden_tokens,
                         force=True)
    export_bundle(inputs.work / "distilled", bundle, opts, show_progress=progress)


# --- evaluation (models/evaluate.py) --------------------------------------------------------------

class Evaluator:
    """The held-out windows and the teacher's reference on them, computed once, for every stage."""

    def __init__(self, recipe: Recipe, teacher, heldout: TokenCorpus, progress: bool = False):
        from models.evaluate import heldout_windows, teacher_reference

        self.windows = heldout_windows(heldout.tokens(), recipe.eval.seq_len, recipe.eval.heldout_tokens)
        self.teacher = teacher_reference(teacher, self.windows)
        self.progress = progress

    def _bar(self, name: str):  # each scoring pass on its own bar below the build's (the bundles' take longest)
        return tqdm(total=len(self.windows), desc=f"evaluate {name}", unit="window", disable=not self.progress,
                    leave=False)

    def model(self, model, name: str) -> dict:
        from models.evaluate import evaluate_model

        with self._bar(name) as bar:
            return evaluate_model(model, self.windows, self.teacher, name=name, on_windows=bar.update).to_dict()

    def bundle(self, bundle: Path, backend: str, name: str) -> dict:
        from models.evaluate import evaluate_bundle

        with self._bar(name) as bar:
            return evaluate_bundle(bundle, self.windows, self.teacher, backend=backend, name=name,
                                   on_windows=bar.update).to_dict()


def evaluate_stages(evaluator: Evaluator, teacher, work: Path, teacher_dir: Path | None = None) -> dict:
    """Teacher, pruned and distilled students (PyTorch fp32) on the held-out windows. The teacher's size is its
    weights' as stored in `teacher_dir` (a bf16 checkpoint: half its fp32 size), its kind says both."""
    stages = {name: evaluator.model(teacher if name == "teacher" else load_checkpoint(work / name)[1], name)
              for name in ("teacher", "pruned", "distilled")}
    if teacher_dir is not None:
        dtype, size = stored_weights(teacher_dir, teacher.config)
        if dtype != "fp32":
            stages["teacher"] = {**stages["teacher"], "kind": f"pytorch fp32 (stored {dtype})", "bytes": size}
    return stages


def evaluate_bundle_stages(recipe: Recipe, evaluator: Evaluator, bundle: Path) -> dict:
    """The exported bundle itself, run by the edge runtime on each backend."""
    names = {b: f"{recipe.quantize.precision} ({b})" for b in recipe.export.backends}
    return {name: evaluator.bundle(bundle, backend, name) for backend, name in names.items()}


# --- the report -----------------------------------------------------------------------------------

def compression_report(inputs: BuildInputs, plan: Plan, prune: dict, distill_result: dict, stages: dict) -> dict:
    teacher, student = sizes(plan.teacher_cfg), sizes(plan.student_cfg)
    recipe = inputs.recipe
    return {
        "recipe": {"name": recipe.name, "file": recipe.source, "sha256": recipe.sha256,
                   "settings": {**recipe.model_dump(), "distill": plan.distill_settings.to_dict()}},
        "teacher": {"checkpoint": str(inputs.teacher.resolve()), "sha256": plan.data.get("teacher_sha256"), **teacher},
        "student": student,
        "non_embedding_params_ratio": round(student["non_embedding_params"] / teacher["non_embedding_params"], 4),
        "data": {"corpus": [str(p) for p in inputs.corpus],
                 **{k: v for k, v in plan.data.items() if k != "teacher_sha256"}},
        "prune": prune,
        "distill": {k: v for k, v in distill_result.items() if k != "settings"},
        "stages": stages,
    }


def format_report(report: dict) -> str:
    """The report in words and a Markdown table, one row per stage (the teacher is the reference)."""
    from models.evaluate import StageMetrics
    from models.evaluate import format_report as stage_table

    t, s, d = report["teacher"], report["student"], report["distill"]

    def shape(c: dict) -> str:
        return (f"{c['num_hidden_layers']} layers, FFN {c['intermediate_size']}, {c['num_attention_heads']} heads / "
                f"{c['num_key_value_heads']} KV heads, {c['non_embedding_params']:,} non-embedding parameters")

    lines = [
        f"# Compression report: recipe {report['recipe']['name']}",
        "",
        f"- teacher: {shape(t)}",
        f"- student: {shape(s)} ({report['non_embedding_params_ratio']:.1%} of the teacher)",
        f"- pruning: {report['prune']['importance']} importance, layers kept {report['prune']['layers_kept']}",
        f"- distillation: {d['tokens']:,} tokens in {d['steps']} steps, final loss {d['final_loss']:.3f}, "
        + (f"{d['seconds']:.1f} s of training ({d['tokens_per_second']:,.0f} tokens/s)" if d.get("seconds")
           else "training time unknown" + (f" ({d['note']})" if d.get("note") else "")),
        f"- held-out: {report['data']['heldout_tokens_scored']:,} of {report['data']['heldout_tokens']:,} tokens "
        f"(train split {report['data']['train_tokens']:,} tokens)",
        "",
        stage_table([StageMetrics(**m) for m in report["stages"].values()]),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, work: Path) -> None:
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(format_report(report))


def publish_bundle(bundle: Path, out: Path, report: dict, name: str | None = None) -> None:
    """Put the report (and `name`, if given) into the bundle's manifest (before it is signed), verify, and
    copy it to `out`."""
    from models.export import remove_stale_staging, staging_prefix
    from ota.bundle import MANIFEST, open_bundle, read_manifest

    manifest = read_manifest(bundle).manifest
    export_report = manifest.compression.get("export", {})
    manifest = manifest.model_copy(update={"compression": {**report, "export": export_report}})
    tmp = bundle / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    os.replace(tmp, bundle / MANIFEST)
    open_bundle(bundle)  # every file still matches the manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = out.with_name(staging_prefix(out))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(bundle, staging)
        if name and name != manifest.name:  # exported by an earlier run for another --out: this one's name
            (staging / MANIFEST).write_text(json.dumps(manifest.model_copy(update={"name": name}).model_dump(),
                                                       indent=2) + "\n")
            open_bundle(staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
