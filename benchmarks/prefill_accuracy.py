"""INT8 accuracy of ONNX Runtime's two graphs against the fp32 model, on held-out text.

    python benchmarks/prefill_accuracy.py CHECKPOINT [--windows 6] [--window 128] [--start 24]
    python benchmarks/prefill_accuracy.py .bench/compression/student-a-checkpoint   # after compression.py

Exports CHECKPOINT to an INT8 bundle (ONNX Runtime only, in a temporary directory) and scores the
next-token predictions at positions `start`..`window` of `windows` windows of held-out Python
standard-library text (models.tiny.HELDOUT_MODULES) three ways: the PyTorch fp32 model, the decode
graph (MatMulNBits, token by token through the KV cache) and the W8A8 prefill graph (one prefill of
each prefix, its last-position logits). Prints perplexity, top-1 accuracy, agreement of the top-1
with fp32, and the perplexity ratio to fp32 (1.000 = no loss).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--start", type=int, default=24, help="first scored position (shorter prefixes are skipped)")
    args = ap.parse_args(argv)
    import torch

    from agent.model import load_model
    from models.checkpoint import load_checkpoint
    from models.export import ExportOptions, export_bundle
    from models.tiny import HELDOUT_MODULES, corpus_text
    from runtime.generate import decode_one_token, prefill
    from runtime.tokenizer import load_tokenizer

    ckpt = Path(args.checkpoint)
    _, model = load_checkpoint(ckpt)
    ids = load_tokenizer(ckpt / "tokenizer.json").encode(corpus_text(HELDOUT_MODULES)).ids
    stride = max(args.window + 1, (len(ids) - args.window - 1) // max(args.windows, 1))
    if len(ids) < args.window + 1 or not 1 <= args.start < args.window:
        print(f"error: need --start in [1, --window) and at least {args.window + 1} held-out tokens", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "int8"
        export_bundle(ckpt, bundle, ExportOptions(precision="int8", backends=("onnxruntime",)), show_progress=False)
        engine = load_model(bundle, "onnxruntime").engine
        if not engine.prefill_graph:
            print("error: the exported bundle has no prefill graph", file=sys.stderr)
            return 2
        engine.prefill_min_rows = 2  # every prefix below (>= 2 tokens) runs on the prefill graph, single tokens do not
        rows = {"pytorch fp32": [], "decode graph (MatMulNBits)": [], "prefill graph (W8A8)": []}
        targets = []
        for w in range(args.windows):
            win = ids[w * stride: w * stride + args.window + 1]
            if len(win) < args.window + 1:
                break
            with torch.no_grad():
                rows["pytorch fp32"].append(model(torch.tensor([win[:-1]]))[0][0].numpy()[args.start:])
            cache, steps = engine.new_cache(), []
            for pos, token in enumerate(win[:-1]):
                logits, cache = decode_one_token(engine, token, pos, cache)
                steps.append(logits)
            rows["decode graph (MatMulNBits)"].append(np.stack(steps)[args.start:])
            rows["prefill graph (W8A8)"].append(np.stack([prefill(engine, win[:p + 1])[0]
                                                          for p in range(args.start, args.window)]))
            targets.append(np.asarray(win[args.start + 1:]))
    target = np.concatenate(targets)
    ref = np.concatenate(rows["pytorch fp32"])
    ref_ppl = None
    print(f"{len(target)} scored positions ({len(targets)} windows of {args.window}, from position {args.start})")
    print(f"{'':28s} {'perplexity':>11s} {'vs fp32':>8s} {'top-1':>7s} {'= fp32 top-1':>13s}")
    for name, parts in rows.items():
        logits = np.concatenate(parts)
        ppl = float(np.exp(-log_softmax(logits)[np.arange(len(target)), target].mean()))
        ref_ppl = ref_ppl or ppl
        print(f"{name:28s} {ppl:11.3f} {ppl / ref_ppl:8.4f} {float((logits.argmax(-1) == target).mean()):7.3f} "
              f"{float((logits.argmax(-1) == ref.argmax(-1)).mean()):13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
