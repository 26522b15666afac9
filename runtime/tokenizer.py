"""Tokenization through the `tokenizers` library, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from runtime.errors import ModelLoadError


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from None


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding the ids so far and
    holding back while the text ends in U+FFFD (an incomplete byte sequence) keeps the
    emitted text valid.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
