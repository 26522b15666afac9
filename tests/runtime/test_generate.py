"""Sampling and streaming against plain numpy/Python references."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.errors import RequestError
from runtime.generate import SamplingParams, apply_repetition_penalty, logits_to_probs, sample
from runtime.tokenizer import StreamDecoder


def test_top_k_keeps_only_the_k_largest():
    logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = logits_to_probs(logits, temperature=1.0, top_k=2)
    expected = np.exp([5.0, 4.0]) / np.exp([5.0, 4.0]).sum()
    np.testing.assert_allclose(probs[[1, 3]], expected)
    assert probs[[0, 2, 4]].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = np.array([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(np.log(probs_in), temperature=1.0, top_p=0.75)
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_temperature_sharpens():
    logits = np.array([1.0, 2.0])
    cold, warm = logits_to_probs(logits, 0.5), logits_to_probs(logits, 2.0)
    np.testing.assert_allclose(cold[1], np.exp(4) / (np.exp(2) + np.exp(4)))
    assert cold[1] > warm[1]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = apply_repetition_penalty(np.array([2.0, -2.0, 2.0]), [0, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 2.0])



@pytest.mark.parametrize("penalty", [1e-20, 1e-38, 1e-45, 1e-300, 5e-324])
def test_a_tiny_repetition_penalty_samples_the_seen_positive_tokens(penalty):
    """A penalty inside the allowed (0, 10] that overflows float32 (a positive logit / 1e-38): the request failed
    on NaN probabilities (HTTP 500, or a stream cut after its first chunk). In the limit the seen tokens with
    positive logits take all the mass, and so they do."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 64).astype(np.float32)
    logits[[3, 9]], logits[5] = (2.5, 4.0), -1.0
    history = [3, 9, 5]
    penalised = apply_repetition_penalty(logits, history, penalty)
    assert np.isfinite(penalised).all() and penalised.dtype == np.float32
    assert penalised[5] <= 0 and penalised[5] > -1.0 - 1e-6  # negative logits shrink toward 0
    got = {sample(logits, SamplingParams(temperature=1.0, repetition_penalty=penalty), np.random.default_rng(s),
                  history) for s in range(50)}
    assert got <= {3, 9}, got
    assert sample(logits, SamplingParams(temperature=0.0, repetition_penalty=penalty), rng, history) in (3, 9)

def test_greedy_and_seeded_sampling():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(), np.random.default_rng(0), []) == 1
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, params, np.random.default_rng(7), []) for _ in range(5)]
    b = [sample(logits, params, np.random.default_rng(7), []) for _ in range(5)]
    assert a == b
    draws = [sample(logits, params, rng, []) for rng in [np.random.default_rng(1)] for _ in range(2000)]
    freq = np.bincount(draws, minlength=4) / 2000
    np.testing.assert_allclose(freq, logits_to_probs(logits, 1.0), atol=0.04)


def test_the_penalty_reads_the_distinct_ids_kept_as_they_come():
    """The same penalised logits as from the whole history (np.unique over it at every step, which grew with
    the context), whatever way the ids were added."""
    from runtime.generate import TokenHistory

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 500, 3000).tolist()
    history = TokenHistory(ids[:1000])
    for token in ids[1000:2000]:
        history.append(token)
    history.extend(ids[2000:2500])
    history += ids[2500:]
    assert history == ids and sorted(history.distinct().tolist()) == sorted(set(ids))
    logits = rng.normal(size=500)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, history, 1.3),
                                  apply_repetition_penalty(logits, list(ids), 1.3))
    assert apply_repetition_penalty(logits, TokenHistory(), 1.3) is logits


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 1.0, 1.0), (0.7, 0, 1.0, 1.0), (1.3, 5, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (0.8, 8, 0.7, 1.0),
    (1.0, 0, 1.0, 1.3), (0.6, 12, 0.95, 1.2), (1.0, 1, 1.0, 1.0), (1.0, 0, 0.01, 1.0), (2.0, 100, 0.5, 0.8),
])
def test_the_sampling_distribution_is_the_one_transformers_samples_from(temperature, top_k, top_p, penalty):
    """The probabilities a token is drawn with equal those of transformers' own logits processors, in the order
    `generate` applies them (repetition penalty over prompt + output, temperature, top-k, top-p): an independent
    implementation of the same settings, on logits with ties and a wide range."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(int(temperature * 100 + top_k * 7 + top_p * 1000 + penalty * 10))
    for _ in range(20):
        logits = rng.normal(scale=3.0, size=64).astype(np.float32)
        if top_p == 1.0:  # ties (top-k keeps every token tied with the k-th, as transformers does; which of two
            logits[rng.integers(0, 64, 4)] = logits[0]  # tied tokens top-p keeps at its cut is a sort order)
        history = rng.integers(0, 64, 30).tolist()
        chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)])
        if top_k:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p))
        scores = chain(torch.tensor([history]), torch.tensor(logits[None].astype(np.float64)))
        expected = torch.softmax(scores, dim=-1)[0].numpy()
        ours = logits_to_probs(apply_repetition_penalty(logits, history, penalty), temperature, top_k, top_p)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-5, 1e-6, 1e-8, 1e-300])
def test_a_tiny_temperature_is_the_one_asked_for(temperature):
    """Temperatures below 1e-5 were taken as 1e-5: two nearly tied tokens stayed near a coin flip at 1e-8,
    which transformers (and the request) makes nearly greedy."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TemperatureLogitsWarper

    logits = np.array([10.0, 10.0 - 2e-6, 0.0, 10.0 - 1e-5])
    expected = torch.softmax(TemperatureLogitsWarper(temperature)(None, torch.tensor(logits[None])), dim=-1)[0]
    ours = logits_to_probs(logits, temperature)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-9)


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", -0.1), ("top_p", 1.5), ("top_k", -1),
                                         ("max_tokens", 0), ("repetition_penalty", 0.0), ("seed", 1.5),
                                         # wrong types: a bare TypeError without the field, or True taken as 1
                                         ("temperature", "1"), ("top_p", None), ("max_tokens", True), ("top_k", True),
                                         ("max_tokens", 2.0), ("temperature", float("nan")),
                                         ("stop_token_ids", (1, "a"))])
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(RequestError, match=re.escape(f"{field}={value!r} is invalid: must be ")):
        SamplingParams(**{field: value})


def test_numpy_numbers_are_taken_as_python_numbers():
    """seed=np.int64(3) (what a numpy rng or array gives) was refused as "must be an integer >= 0"."""
    params = SamplingParams(seed=np.int64(3), max_tokens=np.int32(5), temperature=np.float32(0.5),
                            stop_token_ids=[np.int64(4)])
    assert (params.seed, params.max_tokens, params.temperature, params.stop_token_ids) == (3, 5, 0.5, (4,))
    assert type(params.seed) is int and type(params.temperature) is float


def test_any_integer_seed_is_taken_modulo_2_64_everywhere():
    """HTTP took a negative seed (as OpenAI does, modulo 2^64) but `edgeglm generate --seed -1`, MQTT and the Python
    API refused it: a seed that worked over HTTP could not be repeated elsewhere."""
    assert SamplingParams(seed=-1).seed == 2**64 - 1 and SamplingParams(seed=2**64 + 5).seed == 5
    assert SamplingParams(seed=-1) == SamplingParams(seed=2**64 - 1)


def test_stream_decoder_never_emits_half_a_character():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain ascii text only"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    text = "naïve café ✓ 日本語 🚀 end"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters are split over several byte tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


class _Counting:
    """The real tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _trained(pre, dec, text):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre, dec
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                        special_tokens=["[UNK]", "<eos>"], show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_a_long_stream_decodes_to_the_whole_text_with_work_per_token_that_does_not_grow(kind):
    """Each token decoded every id so far (0.5 ms per token after 4096 tokens): the work grew with the output.
    The pieces must still join to exactly the text of all the ids, for a decoder that drops the leading space
    of what it decodes (Metaspace) too, with special tokens skipped."""
    import random

    words = ["naïve", "café", "✓", "日本語", "🚀", "end", "the", "model", "edge", "box"]
    text = " ".join(random.Random(5).choice(words) for _ in range(3000))
    if kind == "byte-level":
        tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), "plain ascii text")
    else:
        tok = _trained(pre_tokenizers.Metaspace(), decoders.Metaspace(), text)
    eos = tok.token_to_id("<eos>")
    ids = tok.encode(text).ids
    ids = ids[:500] + [eos] + ids[500:]  # a special token inside the stream: skipped, as before
    assert len(ids) > 3000
    counting = _Counting(tok)
    dec = StreamDecoder(counting)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
    assert max(counting.sizes) <= 16 and len(dec.ids) <= 16  # a window, not the whole output


def test_generate_stops_at_stop_tokens_and_context_limit(fp32_bundle):
    import dataclasses

    from agent.model import load_model
    from runtime.generate import generate

    model = load_model(fp32_bundle, "onnxruntime")
    prompt = model.tokenizer.encode("def parse(text):\n    ").ids
    steps = []
    real_forward = model.engine.forward
    model.engine.forward = lambda *a, **k: (steps.append(1), real_forward(*a, **k))[1]
    free = list(generate(model.engine, prompt, SamplingParams(max_tokens=10)))
    assert len(free) == 10 and len(steps) == 10  # the prompt, then 9 steps: none after the last token
    del model.engine.forward
    stopped = list(generate(model.engine, prompt, SamplingParams(max_tokens=10, stop_token_ids=(free[3],))))
    assert stopped == free[:free.index(free[3])]
    model.engine.arch = dataclasses.replace(model.arch, max_positions=len(prompt) + 4)
    assert len(list(generate(model.engine, prompt, SamplingParams(max_tokens=10)))) == 4
    with pytest.raises(RequestError, match=f"prompt has {len(prompt)} tokens; the model's context window is"):
        model.engine.arch = dataclasses.replace(model.arch, max_positions=len(prompt))
        list(generate(model.engine, prompt, SamplingParams()))


def test_generate_a_prompt_beyond_the_context_window_says_the_most_it_may_have(int8_bundle, capsys):
    """`edgeglm generate` with too long a prompt said only "prompt has 4096 tokens; the model's context
    window is 4096 tokens", which reads as if it fit; it now says the most a prompt may have and what to do."""
    import json

    from agent.cli import main

    window = json.loads((int8_bundle / "manifest.json").read_text())["architecture"]["max_position_embeddings"]
    assert main(["generate", "--bundle", str(int8_bundle), "--backend", "onnxruntime", "word " * window]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("edgeglm generate: error: prompt has ")
    assert f"the model's context window is {window} tokens, so a prompt may have at most {window - 1}" in err
    assert err.strip().endswith("shorten the prompt")


def test_generate_says_when_the_context_window_ended_the_answer(fp32_bundle):
    """`edgeglm generate --max-tokens 5000` stopped at the context window and said only "generated 4093", which
    read as an early stop of the model."""
    import dataclasses
    import io

    from agent.cli import run_generation
    from agent.model import load_model

    model = load_model(fp32_bundle, "onnxruntime")
    prompt = "def parse(text):\n    "
    n = len(model.tokenizer.encode(prompt).ids)
    model.engine.arch = dataclasses.replace(model.arch, max_positions=n + 4)
    err = io.StringIO()
    assert len(run_generation(model, prompt, SamplingParams(max_tokens=10), out=io.StringIO(), err=err)) == 4
    assert f"generated 4 (stopped at the model's context window of {n + 4} tokens, before --max-tokens 10)" \
        in err.getvalue()
    err = io.StringIO()
    run_generation(model, prompt, SamplingParams(max_tokens=3), out=io.StringIO(), err=err)
    assert "generated 3;" in err.getvalue() and "context window" not in err.getvalue()
