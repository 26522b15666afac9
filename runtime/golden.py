"""The golden check: does a loaded model reproduce the continuation recorded at build time?

The check is teacher-forced: the engine is fed the recorded tokens, not its own picks, so a
single near-tie cannot cascade. At every step the engine's top-1 must equal the recorded token,
except where the reference's own top-1/top-2 margin is below the bundle's tolerance: there a
correct kernel with a different summation order (or INT8 activations) may pick the other one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.generate import decode_one_token, prefill


def teacher_forced_logits(engine, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """Logits (len(tokens), vocab): row i predicts tokens[i] after prompt + tokens[:i]."""
    rows = []
    logits, cache = prefill(engine, prompt_ids)
    rows.append(logits)
    for i, tok in enumerate(tokens[:-1]):
        logits, cache = decode_one_token(engine, tok, len(prompt_ids) + i, cache)
        rows.append(logits)
    return np.stack(rows)


@dataclass(frozen=True)
class GoldenResult:
    steps: int
    exact: int  # steps whose top-1 equals the recorded token
    mismatches: tuple[int, ...]  # steps that differ where the reference margin was clear
    near_ties: tuple[int, ...]  # steps that differ within the tolerance (accepted)

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        text = f"{self.exact}/{self.steps} tokens identical"
        if self.near_ties:
            text += f", {len(self.near_ties)} accepted near-tie(s) at step(s) {list(self.near_ties)}"
        if self.mismatches:
            text += f", MISMATCH at step(s) {list(self.mismatches)}"
        return text


def check_golden(engine, prompt_ids: list[int], tokens: list[int], margins: list[float],
                 tolerance: float) -> GoldenResult:
    picks = teacher_forced_logits(engine, prompt_ids, tokens).argmax(axis=-1)
    differ = [i for i, (p, t) in enumerate(zip(picks, tokens)) if int(p) != t]
    near = tuple(i for i in differ if margins[i] < tolerance)
    bad = tuple(i for i in differ if margins[i] >= tolerance)
    return GoldenResult(len(tokens), len(tokens) - len(differ), bad, near)
