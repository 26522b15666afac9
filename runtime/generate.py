"""The generation loop: prefill, one decode step at a time, sampling.

Split into one-job functions: `prefill` runs the prompt, `decode_one_token` one new token
against the KV cache, `logits_to_probs` applies temperature/top-k/top-p, `sample` picks a
token. `generate` strings them together and yields token ids as they are made.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from runtime.errors import RequestError
from runtime.prefix_cache import prefill_cached


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Each setting's type, then its range; a SamplingError names the first that fails. numpy integers and
        floats are taken (as Python numbers); a bool is not a number here (True was taken as 1)."""
        def integer(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

        def real(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

        checks = [
            ("max_tokens", integer, lambda v: v >= 1, "an integer >= 1"),
            ("temperature", real, lambda v: 0.0 <= v <= 100.0, "a number in [0, 100]"),
            ("top_k", integer, lambda v: v >= 0, "an integer >= 0 (0: off)"),
            ("top_p", real, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (0: the most likely token only)"),
            ("repetition_penalty", real, lambda v: 0.0 < v <= 10.0, "a number in (0, 10]"),
            ("seed", lambda v: v is None or integer(v), lambda v: True, "an integer, or unset"),
        ]
        for name, of_type, in_range, allowed in checks:
            value = getattr(self, name)
            if not (of_type(value) and in_range(value)):
                raise SamplingError(name, value, allowed)
            if value is not None and not isinstance(value, (int, float)):  # np.int64(3): a Python number
                object.__setattr__(self, name, int(value) if integer(value) else float(value))
        if self.seed is not None:  # any integer, taken modulo 2^64 (OpenAI takes signed 64-bit seeds; clients send -1)
            object.__setattr__(self, "seed", int(self.seed) % (1 << 64))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                         and i >= 0 for i in ids):
            raise SamplingError("stop_token_ids", ids, "a tuple of token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))


class SamplingError(RequestError):
    """An invalid sampling setting: `field`, its `value` and what it `allowed`, for callers that name the
    setting their own way (a CLI flag)."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"sampling setting {field}={value!r} is invalid: must be {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def prefill(engine, prompt_ids: list[int]):
    """Run the whole prompt; returns last-position logits (vocab,) and a new KV cache handle."""
    n = len(prompt_ids)
    ids = np.asarray([prompt_ids], dtype=np.int64)  # (1, T)
    pos = np.arange(n, dtype=np.int64)[None]  # (1, T)
    logits, cache = engine.forward(ids, pos, np.ones((1, n), np.int64), engine.new_cache())
    return logits[0], cache


def decode_one_token(engine, token: int, position: int, cache):
    """One step: the token at `position` attends to the cache; returns logits (vocab,) and the cache.

    The cache is the engine's handle from `prefill`: it is updated in place and returned."""
    ids = np.array([[token]], dtype=np.int64)
    pos = np.array([[position]], dtype=np.int64)
    logits, cache = engine.forward(ids, pos, np.ones((1, position + 1), np.int64), cache)
    return logits[0], cache


class TokenHistory(list):
    """A request's token ids (prompt, then those made), which also keeps the distinct ids as they come: the
    repetition penalty reads them without a pass over the whole history at every step (np.unique over a
    4096-token history took as long as a glm-s decode step)."""

    def __init__(self, ids=()):
        super().__init__(ids)
        self._seen = set(self)
        self._distinct = np.fromiter(self._seen, np.int64, len(self._seen))
        self._new: list[int] = []

    def append(self, token: int) -> None:
        super().append(token)
        if token not in self._seen:
            self._seen.add(token)
            self._new.append(token)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.append(token)

    def __iadd__(self, tokens):
        self.extend(tokens)
        return self

    def distinct(self) -> np.ndarray:
        """The distinct ids so far, in no particular order (at most the vocabulary: not growing with the context)."""
        if self._new:
            self._distinct = np.concatenate([self._distinct, np.asarray(self._new, np.int64)])
            self._new.clear()
        return self._distinct


def apply_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    if penalty == 1.0 or not history:
        return logits
    logits = logits.copy()
    seen = history.distinct() if isinstance(history, TokenHistory) else np.unique(np.asarray(history))
    vals = logits[seen].astype(np.float64)
    # within the logits' own range: a tiny penalty (1e-38 in float32) made a positive logit inf, and inf - inf the
    # NaN probabilities that failed the request (a 500, or a stream cut after its first chunk)
    top = float(np.finfo(logits.dtype).max) if np.issubdtype(logits.dtype, np.floating) else np.inf
    with np.errstate(over="ignore"):  # a float64 overflow to inf is clipped here, not a warning in the log
        logits[seen] = np.clip(np.where(vals > 0, vals / penalty, vals * penalty), -top, top)
    return logits


def logits_to_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64)
    z = (z - z.max()) / temperature  # shifted first: any temperature > 0 divides without overflow (a 1e-5
    # floor here made 1e-6 or 1e-8 sample like 1e-5, near a coin flip between nearly tied tokens)
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        cut = order[np.searchsorted(cum, top_p) + 1:]  # keep the smallest set whose mass reaches top_p
        probs[cut] = 0.0
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: list[int]) -> int:
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, params.temperature, params.top_k, params.top_p)
    return int(rng.choice(probs.size, p=probs))


def generate(engine, prompt_ids: list[int], params: SamplingParams, prefix_cache=None) -> Iterator[int]:
    """Yield new token ids until max_tokens, an EOS/stop token (not yielded) or the context limit.

    `prefix_cache` (a runtime.prefix_cache.PrefixCache bound to this model, or None) lets the
    prefill reuse the KV of a cached prompt prefix; the tokens are the same either way."""
    if not prompt_ids:
        raise RequestError("prompt is empty: give at least one token of text")
    limit = engine.arch.max_positions
    if len(prompt_ids) >= limit:
        raise RequestError(
            f"prompt has {len(prompt_ids)} tokens; the model's context window is {limit} tokens, so a prompt may "
            f"have at most {limit - 1} (one position is kept for the first new token): shorten the prompt")
    stops = set(params.stop_token_ids) | set(engine.arch.eos_token_ids)
    rng = np.random.default_rng(params.seed)
    history = TokenHistory(prompt_ids)
    logits, cache, _reused = prefill_cached(engine, prompt_ids, prefix_cache)
    for i in range(params.max_tokens):
        token = sample(logits, params, rng, history)
        if token in stops:
            return
        yield token
        history.append(token)
        if len(history) >= limit or i + 1 == params.max_tokens:  # no step whose logits nobody reads
            return
        logits, cache = decode_one_token(engine, token, len(history) - 1, cache)
