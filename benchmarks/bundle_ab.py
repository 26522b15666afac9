"""Two bundles of one model through the ONNX Runtime engine, interleaved finely: decode speed and TTFT.

    python benchmarks/bundle_ab.py A_BUNDLE B_BUNDLE [--blocks 40] [--block-steps 16] [--prompt-tokens 512]
                                   [--prefills 10] [--threads 2]

For changes of the exported graph: one checkpoint exported by two versions of the exporter, e.g.
`git worktree add /tmp/old <commit>`, then `python -m agent.cli export CKPT --out /tmp/a` in /tmp/old
and `edgeglm export CKPT --out /tmp/b` here. Both engines stay
loaded in this process. Decode: each holds a cache after a --prompt-tokens prompt and runs --block-steps
greedy steps in turn with the other (the order alternates each round; the first step of a block is untimed,
so the other engine's worker threads have stopped spinning), --blocks rounds; a cache past 1,800 positions is
refilled from the prompt. TTFT: --prefills prompts of --prompt-tokens random ids, each run by both, order
alternating. The machine's speed drifts by up to 25% within minutes (docs/performance.md "Noise"), which
coarser interleaving (whole generations) does not cancel: the ratios here are medians of per-round ratios.
The logits of the first prompt are compared too (max |A - B| and whether the argmax agrees). Nothing here
asserts on timings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python benchmarks/bundle_ab.py` from anywhere
from _args import Parser, positive_int  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="bundle A (the baseline)")
    ap.add_argument("b", type=Path, help="bundle B")
    ap.add_argument("--blocks", type=positive_int, default=40,
                    help="decode rounds (each engine runs one block per round)")
    ap.add_argument("--block-steps", type=positive_int, default=16)
    ap.add_argument("--prompt-tokens", type=positive_int, default=512)
    ap.add_argument("--prefills", type=positive_int, default=10)
    ap.add_argument("--threads", type=positive_int, default=2)
    args = ap.parse_args(argv)
    for flag, path in (("a", args.a), ("b", args.b)):  # before two models are loaded
        if not (path / "manifest.json").is_file():
            ap.error(f"{flag} {path} is invalid: must be a bundle directory (with manifest.json)")

    from agent.model import load_model
    from runtime.generate import decode_one_token, prefill

    engines = [load_model(path, "onnxruntime", args.threads).engine for path in (args.a, args.b)]
    if engines[0].arch.vocab_size != engines[1].arch.vocab_size:
        raise SystemExit("the two bundles are of different models (vocabulary sizes differ)")
    vocab = engines[0].arch.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, args.prompt_tokens).tolist()

    first = [prefill(e, prompt)[0] for e in engines]
    diff = float(np.abs(first[0] - first[1]).max())

    ttft: list[list[float]] = [[], []]
    for r in range(args.prefills):
        p = rng.integers(0, vocab, args.prompt_tokens).tolist()
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            prefill(engines[k], p)
            ttft[k].append(time.perf_counter() - t0)

    state = []
    for e in engines:
        logits, cache = prefill(e, prompt)
        state.append([cache, len(prompt), int(np.argmax(logits))])
    step: list[list[float]] = [[], []]
    for r in range(args.blocks):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            engine, (cache, pos, token) = engines[k], state[k]
            if pos > 1800:
                logits, cache = prefill(engine, prompt)
                pos, token = len(prompt), int(np.argmax(logits))
            logits, cache = decode_one_token(engine, token, pos, cache)  # untimed: the other engine's spin ends
            token, pos = int(np.argmax(logits)), pos + 1
            t0 = time.perf_counter()
            for _ in range(args.block_steps):
                logits, cache = decode_one_token(engine, token, pos, cache)
                token, pos = int(np.argmax(logits)), pos + 1
            step[k].append((time.perf_counter() - t0) / args.block_steps)
            state[k] = [cache, pos, token]

    a_step, b_step = np.array(step[0]), np.array(step[1])
    a_ttft, b_ttft = np.array(ttft[0]), np.array(ttft[1])
    print(f"A {args.a}\nB {args.b}")
    print(f"first-prompt logits: max |A - B| {diff:.4g} (scale {float(np.abs(first[0]).max()):.3g}), "
          f"argmax {'agrees' if first[0].argmax() == first[1].argmax() else 'DIFFERS'}")
    print(f"decode  A {1 / np.median(a_step):7.1f} tok/s   B {1 / np.median(b_step):7.1f} tok/s   "
          f"B/A speed {np.median(a_step / b_step):.3f} (median of {args.blocks} paired blocks)")
    print(f"TTFT    A {np.median(a_ttft) * 1e3:7.1f} ms      B {np.median(b_ttft) * 1e3:7.1f} ms      "
          f"B/A time  {np.median(b_ttft / a_ttft):.3f} (median of {args.prefills} pairs, "
          f"{args.prompt_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
