"""Distillation: it moves the student towards the teacher, resumes exactly, and refuses bad settings early."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.data import DataError, TextSource, TokenCorpus, WindowSampler, tokenize_corpus
from models.distill import DistillError, DistillSettings, distill
from models.prune import PruneSpec, activation_importance, prune_model
from models.tiny import HELDOUT_MODULES, TRAIN_MODULES, corpus_text

LIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = [LIB / m for m in TRAIN_MODULES[:5]]


@pytest.fixture(scope="module")
def teacher(trained_checkpoint):
    return load_checkpoint(trained_checkpoint)[1]


@pytest.fixture(scope="module")
def source(trained_checkpoint) -> TextSource:
    return TextSource(TRAIN, trained_checkpoint / "tokenizer.json")


def pruned_student(teacher, seed_ids: torch.Tensor):
    importance = activation_importance(teacher, seed_ids)
    return prune_model(teacher, PruneSpec(num_layers=1, intermediate_size=64), importance)


def calib(teacher) -> torch.Tensor:
    return torch.randint(0, teacher.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))


def heldout_kl(student, teacher, ids: torch.Tensor) -> float:
    """KL(teacher || student) per position, with torch's own kl_div (independent of models.distill)."""
    with torch.no_grad():
        s = F.log_softmax(student(ids)[0], -1).flatten(0, 1)
        t = F.log_softmax(teacher(ids)[0], -1).flatten(0, 1)
    return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_short_distillation_lowers_kl_to_teacher_on_heldout_text(teacher, source, trained_checkpoint, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(trained_checkpoint / "tokenizer.json"))
    held = torch.tensor(tok.encode(corpus_text(HELDOUT_MODULES)).ids[:4 * 64]).view(4, 64)
    student = pruned_student(teacher, calib(teacher))
    before = heldout_kl(student, teacher, held)
    settings = DistillSettings(temperature=1.0, kl_weight=1.0, ce_weight=0.0, lr=3e-3, min_lr=3e-4,
                               warmup_steps=2, batch_size=8, seq_len=64, token_budget=8 * 64 * 25,
                               checkpoint_every=100, device="cpu")
    report = distill(student, teacher, source, settings, tmp_path / "run", progress=False)
    after = heldout_kl(student, teacher, held)
    assert report.steps == 25 and report.tokens == 25 * 8 * 64
    assert after < 0.7 * before, (before, after)


def read_log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


def test_resume_after_interruption_gives_identical_weights_and_data_order(teacher, source, tmp_path, capsys):
    settings = DistillSettings(temperature=2.0, kl_weight=0.5, ce_weight=0.5, lr=3e-3, min_lr=1e-4,
                               warmup_steps=2, batch_size=4, seq_len=32, token_budget=4 * 32 * 10,
                               checkpoint_every=3, device="cpu")
    init = pruned_student(teacher, calib(teacher))
    whole = pruned_student(teacher, calib(teacher))
    distill(whole, teacher, source, settings, tmp_path / "whole", progress=False)

    class Crash(Exception):
        pass

    def crash_at_step_7(step, metrics):  # after the checkpoint of step 6, step 7 is done and then lost
        if step == 7:
            raise Crash

    broken = pruned_student(teacher, calib(teacher))
    with pytest.raises(Crash):
        distill(broken, teacher, source, settings, tmp_path / "broken", progress=False, on_step=crash_at_step_7)
    resumed = pruned_student(teacher, calib(teacher))  # a fresh process would start from the initial student
    capsys.readouterr()
    report = distill(resumed, teacher, source, settings, tmp_path / "broken", progress=True)

    assert report.resumed_from_step == 6
    state = tmp_path / "broken" / "state.pt"
    assert f"distill: resuming after step 6 of 10 (saved in {state})" in capsys.readouterr().err
    distill(resumed, teacher, source, settings, tmp_path / "broken", progress=True)
    assert "distill: all 10 steps were trained by an earlier run" in capsys.readouterr().err
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
        assert not torch.equal(value, init.state_dict()[name]) or "norm" in name, f"{name} was not trained"
    a, b = read_log(tmp_path / "whole"), read_log(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["windows"] for r in a] == [r["windows"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # the learning rate of each step: linear warm-up to lr over 2 steps, cosine down to min_lr at the last
    w, n, lr, floor = 2, 10, 3e-3, 1e-4
    expected = [lr * (i + 1) / w if i < w else
                floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (i - w) / (n - 1 - w))) for i in range(n)]
    assert [r["lr"] for r in a] == pytest.approx(expected, rel=1e-9)


def test_a_finished_run_resumed_returns_its_weights(teacher, source, tmp_path):
    settings = DistillSettings(kl_weight=0.0, ce_weight=1.0, warmup_steps=1, batch_size=4, seq_len=32,
                               token_budget=4 * 32 * 3, checkpoint_every=10, device="cpu")
    first = pruned_student(teacher, calib(teacher))
    distill(first, None, source, settings, tmp_path / "run", progress=False)
    again = pruned_student(teacher, calib(teacher))
    report = distill(again, None, source, settings, tmp_path / "run", progress=False)
    assert report.resumed_from_step == 3
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())


def test_resuming_with_a_student_of_another_shape_is_one_line(teacher, source, tmp_path):
    """The error carried load_state_dict's own text: every missing tensor, over several lines."""
    settings = DistillSettings(kl_weight=0.0, ce_weight=1.0, warmup_steps=1, batch_size=4, seq_len=32,
                               token_budget=4 * 32 * 2, checkpoint_every=10, device="cpu")
    distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "run", progress=False)
    wider = prune_model(teacher, PruneSpec(num_layers=2, intermediate_size=96),
                        activation_importance(teacher, calib(teacher)))
    with pytest.raises(DistillError) as err:
        distill(wider, None, source, settings, tmp_path / "run", progress=False)
    message = str(err.value)
    assert "\n" not in message and "state.pt: the saved student does not fit this student model (" in message
    assert "2 tensor(s) of another shape, e.g. model.layers.0.mlp.gate_up_proj.weight: saved (128, 128), this " \
           "model (192, 128)" in message and "tensor(s) of this model not saved, e.g. model.layers.1." in message
    assert message.endswith("use another work dir or pass resume=False")


def test_a_resumed_run_reports_the_whole_training_time_or_says_it_is_unknown(teacher, source, tmp_path):
    """A run resumed after its last step (its caller crashed before recording it) trains nothing: it reported
    seconds ~0 and tokens_per_second 0. It now reports the time state.pt recorded for the steps it holds; a
    state.pt of an older edgeglm, without that record, gives None and a note, never a made-up number."""
    settings = DistillSettings(kl_weight=0.0, ce_weight=1.0, warmup_steps=1, batch_size=4, seq_len=32,
                               token_budget=4 * 32 * 6, checkpoint_every=2, device="cpu")
    first = distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "run", progress=False)
    assert first.resumed_from_step == 0 and first.seconds == first.seconds_this_run > 0 and first.note is None
    assert first.tokens_per_second == pytest.approx(first.tokens / first.seconds)
    recorded = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert 0 < recorded["train_seconds"] <= first.seconds and recorded["device"] == "cpu"

    again = distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "run", progress=False)
    assert again.resumed_from_step == 6 and again.seconds_this_run == 0.0
    assert again.seconds == recorded["train_seconds"] and again.tokens_per_second == again.tokens / again.seconds
    assert again.note is None and again.device == "cpu"

    # interrupted after step 4 (saved at 4) and resumed: the earlier run's time plus this one's
    class Crash(Exception):
        pass

    def crash_at_step_5(step, _metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "cut", progress=False,
                on_step=crash_at_step_5)
    at_4 = torch.load(tmp_path / "cut" / "state.pt", weights_only=False)
    assert at_4["step"] == 4
    resumed = distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "cut",
                      progress=False)
    assert resumed.resumed_from_step == 4 and resumed.seconds_this_run > 0
    assert resumed.seconds == pytest.approx(at_4["train_seconds"] + resumed.seconds_this_run)

    # a state.pt without the record (an older edgeglm): unknown, said so
    del at_4["train_seconds"]
    torch.save(at_4, tmp_path / "cut" / "state.pt")
    old = distill(pruned_student(teacher, calib(teacher)), None, source, settings, tmp_path / "cut", progress=False)
    assert old.resumed_from_step == 4 and old.seconds is None and old.tokens_per_second is None
    assert "steps 1..4 were trained by an earlier run whose time" in old.note and "2 step(s) in" in old.note
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=False)["train_seconds"] is None  # still unknown


def test_windows_cover_the_corpus_in_a_seeded_order_per_epoch(source, tmp_path):
    corpus = tokenize_corpus(source, tmp_path / "tok", progress=False)
    seq = 64
    sampler = WindowSampler(corpus, seq, batch_size=8, seed=3)
    per_epoch = sampler.windows_per_epoch
    starts = [s for step in range(per_epoch // 8) for s in sampler.window_starts(step)]
    offsets = {s % seq for s in starts}
    assert len(offsets) == 1 and len(set(starts)) == len(starts)  # one epoch: distinct windows, one phase
    assert sampler.window_starts(0) == WindowSampler(corpus, seq, 8, seed=3).window_starts(0)
    assert sampler.window_starts(0) != WindowSampler(corpus, seq, 8, seed=4).window_starts(0)
    tokens = corpus.tokens()
    batch = sampler.batch(1)
    assert batch.shape == (8, seq + 1)
    assert batch[0].tolist() == tokens[sampler.window_starts(1)[0]:][:seq + 1].tolist()


@pytest.mark.parametrize("changes, words", [
    (dict(temperature=0.0), ["temperature=0.0", "> 0"]),
    (dict(temperature=-1.0), ["temperature=-1.0", "> 0"]),
    (dict(kl_weight=0.0, ce_weight=0.0), ["kl_weight=0", "where ce_weight = 0"]),
    (dict(kl_weight=-0.5), ["kl_weight=-0.5", ">= 0"]),
    (dict(lr=0.0), ["lr=0.0", "(0, 1]"]),
    (dict(min_lr=1.0), ["min_lr=1.0", "[0, lr="]),
    (dict(warmup_steps=50), ["warmup_steps=50", "< the run's 10 steps"]),
    (dict(token_budget=100), ["token_budget=100", "one batch", ">= 128"]),
    (dict(device="tpu"), ["device='tpu'", "auto, cpu, cuda"]),
    (dict(batch_size=0), ["batch_size=0", ">= 1"]),
    # every problem at once: a setting that depends on others is checked where those others are valid
    (dict(temperature=0.0, kl_weight=0.0, ce_weight=0.0), ["temperature=0.0", "where ce_weight = 0"]),
    (dict(lr=0.0, warmup_steps=50), ["lr=0.0", "warmup_steps=50"]),
])
def test_bad_settings_name_the_setting_and_its_range(changes, words):
    base = dict(batch_size=4, seq_len=32, token_budget=4 * 32 * 10, warmup_steps=2)
    with pytest.raises(DistillError) as err:
        DistillSettings(**{**base, **changes})
    for word in words:
        assert word in str(err.value)


def test_corpus_too_small_for_the_budget_fails_before_training(teacher, trained_checkpoint, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(LIB.joinpath("bisect.py").read_text())
    settings = DistillSettings(batch_size=4, seq_len=32, token_budget=4 * 32 * 1000, max_passes=4.0,
                               warmup_steps=2, device="cpu")
    student = pruned_student(teacher, calib(teacher))
    with pytest.raises(DistillError) as err:
        distill(student, teacher, TextSource(small, trained_checkpoint / "tokenizer.json"), settings,
                tmp_path / "run", progress=False)
    assert "token_budget=128000" in str(err.value) and "max_passes=4.0" in str(err.value)
    assert not (tmp_path / "run" / "state.pt").exists() and not (tmp_path / "run" / "log.jsonl").exists()


def test_input_problems_are_one_line_errors(teacher, source, trained_checkpoint, tmp_path):
    settings = DistillSettings(batch_size=4, seq_len=32, token_budget=4 * 32 * 10, warmup_steps=2, device="cpu")
    student = pruned_student(teacher, calib(teacher))
    tok = trained_checkpoint / "tokenizer.json"
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text" * 10)
    cases = [
        (TextSource(tmp_path / "missing", tok), "missing: training text not found"),
        (TextSource(binary, tok), "data.bin: not UTF-8 text"),
        (TextSource(TRAIN, tmp_path / "nope.json"), "nope.json: tokenizer.json not found"),
    ]
    for src, message in cases:
        with pytest.raises(DistillError) as err:
            distill(student, teacher, src, settings, tmp_path / "w", progress=False)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DistillError, match="kl_weight=0.5 needs a teacher"):
        distill(student, None, source, settings, tmp_path / "w", progress=False)
    # a run interrupted and resumed with a different learning rate is refused
    plain = DistillSettings(**{**settings.to_dict(), "kl_weight": 0.0, "checkpoint_every": 1})
    with pytest.raises(KeyError):
        distill(student, None, source, plain, tmp_path / "r", progress=False,
                on_step=lambda step, m: (_ for _ in ()).throw(KeyError("stop")))
    with pytest.raises(DistillError, match=r"other settings \(lr=0.001 -> 0.0005\)"):
        distill(student, None, source, DistillSettings(**{**plain.to_dict(), "lr": 5e-4}), tmp_path / "r",
                progress=False)


def test_a_single_huge_line_is_read_in_bounded_pieces_with_the_same_tokens(trained_checkpoint, tmp_path,
                                                                           monkeypatch):
    """A file that is one line (minified text) was held whole until 4 * READ_CHARS characters: a 16M-character
    line took about 4 GB to tokenize. It is now cut before a space, which leaves the token ids unchanged."""
    import models.data
    from models.data import _pieces, load_tokenizer_file

    monkeypatch.setattr(models.data, "READ_CHARS", 256)
    words = corpus_text(HELDOUT_MODULES[:1]).split()
    line = tmp_path / "one-line.txt"
    line.write_text(" ".join(words[:2000]) + "\n")
    text = line.read_text()
    assert len(text) > 16 * 256 and text.count("\n") == 1
    assert max(len(p) for p in _pieces(line)) <= 2 * 256
    assert "".join(_pieces(line)) == text
    tok_path = trained_checkpoint / "tokenizer.json"
    corpus = tokenize_corpus(TextSource([line], tok_path), tmp_path / "tokens", progress=False)
    tokenizer = load_tokenizer_file(tok_path)
    assert list(corpus.tokens()) == tokenizer.encode(text).ids + [corpus.eos_id]


@pytest.mark.parametrize("left", ["empty meta", "cut meta"])
def test_a_token_cache_cut_short_by_a_killed_run_is_tokenized_again(source, tmp_path, left):
    """A build killed while writing tokens-KEY.json left a cache entry that ended every --resume in a traceback."""
    first = tokenize_corpus(source, tmp_path / "tokens", progress=False)
    meta = first.path.with_suffix(".json")
    text = meta.read_text()
    meta.write_text("" if left == "empty meta" else text[: len(text) // 2])
    again = tokenize_corpus(source, tmp_path / "tokens", progress=False)
    assert again.num_tokens == first.num_tokens and list(again.tokens()) == list(first.tokens())
    assert json.loads(meta.read_text())["num_tokens"] == first.num_tokens


def test_a_tokenizer_that_adds_a_prefix_puts_none_inside_the_training_text(tmp_path, monkeypatch):
    """A post-processor that adds [gMASK] (GLM-4's tokenizer.json adds [gMASK]<sop>) used to land in the token
    stream at every cut of a long file; the tokens are now the text's own, documents end with EOS."""
    import numpy as np
    from tokenizers import processors

    import models.data as data
    from models.tiny import corpus_text, train_tokenizer
    tok = train_tokenizer(corpus_text(), 512)
    gmask = tok.token_to_id("[gMASK]")
    tok.post_processor = processors.TemplateProcessing(single="[gMASK] $A", special_tokens=[("[gMASK]", gmask)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("line of text\n" * 400)
    monkeypatch.setattr(data, "READ_CHARS", 1000)  # about 5 pieces
    corpus = tokenize_corpus(TextSource([tmp_path / "a.txt"], tmp_path / "tokenizer.json"), tmp_path / "c",
                             progress=False)
    tokens = np.asarray(corpus.tokens())
    assert int((tokens == gmask).sum()) == 0
    assert tokens[:-1].tolist() == tok.encode("line of text\n" * 400, add_special_tokens=False).ids


def test_the_shortest_text_a_batch_takes_is_what_the_error_says(tmp_path):
    """31 tokens with seq_len 16 were "0 windows of seq_len=16" with no word of the minimum (a window is 17
    tokens, but each epoch starts at a random offset below seq_len): the error says how many tokens it takes, and
    exactly that many feed every batch of every epoch."""
    import numpy as np

    def corpus(n: int) -> TokenCorpus:
        path = tmp_path / f"c{n}.bin"
        np.arange(n, dtype=np.uint32).tofile(path)
        return TokenCorpus(path, n, ("c",), 0)

    settings = DistillSettings(seq_len=16, batch_size=3, token_budget=16 * 3, warmup_steps=0)
    with pytest.raises(DistillError, match=r"needs at least 3 windows, 64 tokens"):
        settings.check_corpus(corpus(63))
    settings.check_corpus(corpus(64))
    sampler = WindowSampler(corpus(64), 16, 3, seed=0)
    for step in range(40):  # every epoch's offset: each window is whole
        assert sampler.batch(step).shape == (3, 17)
    with pytest.raises(DataError, match=r"one window takes 2 x seq_len = 32 tokens"):
        WindowSampler(corpus(31), 16, 1, seed=0)
