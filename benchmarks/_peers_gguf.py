"""Convert an edgeglm checkpoint to GGUF with llama.cpp's own converter (benchmark-only helper).

Run as a child process by benchmarks/peers.py:

    python benchmarks/_peers_gguf.py LLAMA_CPP_DIR CHECKPOINT OUT.gguf q8_0

llama.cpp's `convert_hf_to_gguf.py` converts `GlmForCausalLM` (as its "chatglm" architecture:
separate q/k/v with bias, fused gate|up, interleaved partial rotary) unchanged. The one thing it
cannot take is our tokenizer: it names the pre-tokenizer by hashing the ids a fixed text encodes
to, and an unknown hash (every self-trained tokenizer) stops the conversion. edgeglm's tokenizer
is a byte-level BPE with GPT-2's pre-tokenizer (`ByteLevel`, `use_regex`, no prefix space, no
normalizer), which is exactly what llama.cpp calls "gpt-2". So this helper checks that the
tokenizer.json really is that, and only then answers "gpt-2" for the unknown hash; everything
else is the converter's own code, run as it is. The benchmark feeds token ids to every engine,
so the GGUF vocabulary is not on the timed path, and neither this helper nor peers.py checks
that llama.cpp's tokenizer encodes text to the same ids as edgeglm's (docs/performance.md records
a one-off check of a sample text; nothing repeats it per run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def gpt2_pretokenizer_problem(tokenizer_json: Path) -> str | None:
    """Why this tokenizer is not plain GPT-2 byte-level BPE, or None when it is."""
    tok = json.loads(tokenizer_json.read_text())
    pre, model = tok.get("pre_tokenizer") or {}, tok.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    if tok.get("normalizer"):
        return f"it has a normalizer ({tok['normalizer'].get('type')})"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return f"its pre-tokenizer {pre} is not GPT-2's ByteLevel split"
    return None


def main(llama_cpp_dir: str, checkpoint: str, out: str, outtype: str) -> int:
    llama_cpp = Path(llama_cpp_dir).resolve()
    problem = gpt2_pretokenizer_problem(Path(checkpoint) / "tokenizer.json")
    if problem:
        print(f"{checkpoint}/tokenizer.json: {problem}; llama.cpp's converter has no name for it", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is local; never wait on a hub
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion import base  # llama.cpp's converter package (imports its vendored gguf-py)

    known = base.TextModel.get_vocab_base_pre

    def vocab_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"  # checked above: GPT-2's byte-level pre-tokenizer

    base.TextModel.get_vocab_base_pre = vocab_pre
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outtype", outtype, "--outfile", out]
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
