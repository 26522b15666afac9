"""Training text for the factory: the operator's text files as fixed-length token windows.

Two steps, so that training can stop and resume exactly where it was:

1. `tokenize_corpus(source, cache_dir)` streams the files one at a time through the model's
   `tokenizer.json` (the `tokenizers` library; files larger than `READ_CHARS` are read in pieces, cut
   only where the tokens stay those of the whole text: `_safe_cut`) and appends their token ids, each
   file followed by the end-of-text token, to one flat uint32 file on disk. Memory stays bounded by
   one piece whatever the corpus size. The result is cached under a key of the tokenizer's bytes
   and every file's path, size and mtime, so a rerun (or a resumed run) does not tokenize again (a
   cache entry cut short by a killed run is tokenized again).
2. `WindowSampler(corpus, seq_len, batch_size, seed)` reads training windows from that file
   through a memory map. Window w of epoch e starts at `offset_e + w * seq_len` and holds
   `seq_len + 1` tokens (inputs and shifted targets); each epoch draws its own offset in
   [0, seq_len) and its own permutation of the windows from a generator seeded by (seed, e).
   Batch k is therefore a pure function of (seed, k): the data position of a run is just its
   step number, and a resumed run sees exactly the batches an uninterrupted one would.

A directory source means every regular file below it (sorted, hidden files and directories
skipped); files must be UTF-8 text. Problems are `DataError`s naming the file or setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from models.errors import CheckpointError

READ_CHARS = 4 << 20  # characters per piece read from one file
TOKEN_DTYPE = np.uint32
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class DataError(CheckpointError):
    """Training or evaluation text cannot be used as given (names the file or setting)."""


@dataclass(frozen=True)
class TextSource:
    """The operator's text: files and/or directories, and the tokenizer.json to read them with."""

    paths: tuple[Path, ...]
    tokenizer: Path

    def __init__(self, paths, tokenizer):
        paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
        object.__setattr__(self, "paths", tuple(Path(p) for p in paths))
        object.__setattr__(self, "tokenizer", Path(tokenizer))


@dataclass(frozen=True)
class TokenCorpus:
    """A tokenized corpus: `num_tokens` uint32 token ids in the file at `path`."""

    path: Path
    num_tokens: int
    files: tuple[str, ...]
    eos_id: int

    def tokens(self) -> np.ndarray:
        """All token ids as a read-only memory map."""
        return np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", shape=(self.num_tokens,))


def text_files(paths: tuple[Path, ...], skipped: list[Path] | None = None,
               repeated: list[tuple[Path, Path]] | None = None) -> list[Path]:
    """The files a source names: each file itself, each directory's regular files (sorted, no hidden), less the
    binary files found in a directory (a NUL byte in their first BINARY_SNIFF bytes: `__pycache__/*.pyc`, images in
    a source tree), which are appended to `skipped`. A file named itself is always taken (and must be text).
    Each file is taken once: one reached again (named twice, a directory and a file in it, a link to it) is left
    out and appended to `repeated` as (that path, the path it was taken as). Read twice, its text was in the
    training split and in the held-out split at once, and the held-out numbers measured text the student trained
    on."""
    files = _text_files(paths, skipped)
    taken: dict[tuple[int, int], Path] = {}
    once: list[Path] = []
    for f in files:
        try:
            st = f.stat()
            key = (st.st_dev, st.st_ino)
        except OSError:  # unreadable: named by the checks that read it
            once.append(f)
            continue
        if key in taken:
            if repeated is not None:
                repeated.append((f, taken[key]))
            continue
        taken[key] = f
        once.append(f)
    return once


def _text_files(paths: tuple[Path, ...], skipped: list[Path] | None) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: training text directory holds no files; give files of UTF-8 text")
            binary = [f for f in found if _is_binary(f)]
            if binary and len(binary) == len(found):
                raise DataError(f"{p}: training text directory holds only binary files ({binary[0].name}, ...); give "
                                "files of UTF-8 text")
            if skipped is not None:
                skipped += binary
            left_out = set(binary)
            files += [f for f in found if f not in left_out]
        else:
            raise DataError(f"{p}: training text not found (expected a file or a directory of text files)")
    if not files:
        raise DataError("no training text given: name at least one file or directory")
    if all(f.stat().st_size == 0 for f in files):  # else "corpus too small: its 1 tokens give 1 held-out tokens"
        names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"{names}: the training text is empty ({'each file is' if len(files) > 1 else 'the file is'} "
                        "0 bytes); give files of UTF-8 text")
    return files


BINARY_SNIFF = 8192  # bytes read to tell a binary file from text (as git and grep do: a NUL byte)


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(BINARY_SNIFF)
    except OSError:
        return False  # unreadable: named by the checks that read it


def eos_token_id(tokenizer: Tokenizer, path: Path) -> int:
    for token in EOS_CANDIDATES:
        tid = tokenizer.token_to_id(token)
        if tid is not None:
            return tid
    raise DataError(f"{path}: tokenizer has no end-of-text token ({', '.join(EOS_CANDIDATES)}) "
                    "to separate documents")


def load_tokenizer_file(path: Path) -> Tokenizer:
    if not path.is_file():
        raise DataError(f"{path}: tokenizer.json not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None


# how text becomes tokens here (2: no post-processor per piece); part of the cache key. Left at 2 when the piece
# cuts were made safe (a cut after a newline once split "\n" from the next line's indentation, in files over
# READ_CHARS): a work directory's cache holds the tokens its finished stages were made from, which --resume keeps.
TOKENIZE_VERSION = b"2"


def _cache_key(tokenizer_path: Path, files: list[Path]) -> str:
    h = hashlib.sha256(TOKENIZE_VERSION + tokenizer_path.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _safe_cut(text: str) -> int:
    r"""The last place in `text` where cutting it leaves its tokens as they are, or 0 if there is none.

    A cut is safe where no pre-token of the tokenizer can span it, whatever follows: after a newline that stands
    between two non-whitespace characters ("x\ny"; a run of newlines, a newline and the next line's indentation
    "\n    ", or trailing spaces "x  \n" are each one pre-token), or else before a space that stands between two
    non-whitespace characters (" word" is one pre-token). That holds for the byte-level pre-tokenizers of GPT-2
    (the tiny models') and of GLM-4 (a regex with \s*[\r\n]+ and \s+(?!\S)), as tests/models/test_data.py checks
    against tokenizing the whole text at once."""
    i = len(text) - 1  # a cut needs a character after it
    while (i := text.rfind("\n", 0, i)) > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
    i = len(text) - 1
    while (i := text.rfind(" ", 0, i)) > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    return 0


def _pieces(path: Path):
    """The file's text in pieces of about READ_CHARS characters, cut where the tokens stay those of the whole
    text (`_safe_cut`). Text with no such place in 4 * READ_CHARS characters (no single space or line break
    between two non-blank characters) is cut after its last newline, else before its last space, else there:
    that one cut may change a token or two."""
    try:
        with open(path, encoding="utf-8") as f:
            carry = ""
            while True:
                block = f.read(READ_CHARS)
                if not block:
                    break
                text = carry + block
                cut = _safe_cut(text)
                if cut == 0 and len(text) < 4 * READ_CHARS:
                    carry = text
                    continue
                cut = cut or text.rfind("\n") + 1 or max(text.rfind(" "), 0) or len(text)
                carry = text[cut:]
                yield text[:cut]
            if carry:
                yield carry
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "convert it or leave it out of the training text") from None


def tokenize_corpus(source: TextSource, cache_dir: str | Path, progress: bool = True) -> TokenCorpus:
    """Tokenize the source's files into one token file under `cache_dir` (reused when unchanged)."""
    files = text_files(source.paths)
    tokenizer = load_tokenizer_file(source.tokenizer)
    eos = eos_token_id(tokenizer, source.tokenizer)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(source.tokenizer, files)
    bin_path, meta_path = cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"
    if bin_path.is_file() and meta_path.is_file():
        try:  # a run killed while writing it leaves it cut short: then tokenize again
            meta = json.loads(meta_path.read_text())
            if bin_path.stat().st_size == meta["num_tokens"] * np.dtype(TOKEN_DTYPE).itemsize:
                return TokenCorpus(bin_path, meta["num_tokens"], tuple(meta["files"]), meta["eos_id"])
        except (ValueError, KeyError, TypeError):
            pass
    tmp = bin_path.with_suffix(".partial")
    total = 0
    bar = tqdm(total=sum(f.stat().st_size for f in files), desc="tokenize", unit="B", unit_scale=True,
               disable=not progress, leave=False)
    try:
        with open(tmp, "wb") as out:
            for f in files:
                for piece in _pieces(f):
                    # no post-processor: a tokenizer that adds a prefix ([gMASK]<sop>) would put it inside
                    # the file at every piece cut
                    ids = np.asarray(tokenizer.encode(piece, add_special_tokens=False).ids, dtype=TOKEN_DTYPE)
                    out.write(ids.tobytes())
                    total += ids.size
                    bar.update(len(piece.encode("utf-8")))
                out.write(np.asarray([eos], dtype=TOKEN_DTYPE).tobytes())
                total += 1
        os.replace(tmp, bin_path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    meta_tmp = meta_path.with_suffix(".json.partial")
    meta_tmp.write_text(json.dumps({"num_tokens": total, "files": [str(f) for f in files], "eos_id": eos}))
    os.replace(meta_tmp, meta_path)
    return TokenCorpus(bin_path, total, tuple(str(f) for f in files), eos)


def corpus_from_ids(ids, cache_dir: str | Path, eos_id: int = 0, name: str = "ids") -> TokenCorpus:
    """A corpus from token ids already in memory (tests, benchmarks)."""
    arr = np.asarray(ids, dtype=TOKEN_DTYPE)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}-{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}.bin"
    if not path.is_file() or path.stat().st_size != arr.nbytes:  # written whole or not at all (a killed run)
        tmp = path.with_suffix(".partial")
        try:
            arr.tofile(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return TokenCorpus(path, int(arr.size), (name,), eos_id)


class WindowSampler:
    """Batches of training windows (B, seq_len + 1): batch k depends only on (seed, k)."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, batch_size: int, seed: int):
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
        self.windows_per_epoch = windows_in(corpus.num_tokens, seq_len)
        if self.windows_per_epoch < 1:
            raise DataError(f"corpus of {corpus.num_tokens} tokens holds no window of seq_len={seq_len}: each epoch "
                            f"starts at a random offset below seq_len, so one window takes 2 x seq_len = "
                            f"{2 * seq_len} tokens")
        self._tokens = corpus.tokens()
        self._epoch: tuple[int, int, torch.Tensor] | None = None  # (epoch, offset, permutation)

    def _order(self, epoch: int) -> tuple[int, torch.Tensor]:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, self.seq_len, (1,), generator=gen))
            self._epoch = (epoch, offset, torch.randperm(self.windows_per_epoch, generator=gen))
        return self._epoch[1], self._epoch[2]

    def window_starts(self, step: int) -> list[int]:
        """Token offsets of batch `step`'s windows (the data order, for logs and tests)."""
        starts = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, w = divmod(i, self.windows_per_epoch)
            offset, perm = self._order(epoch)
            starts.append(offset + int(perm[w]) * self.seq_len)
        return starts

    def batch(self, step: int) -> torch.Tensor:
        n = self.seq_len + 1
        rows = [np.asarray(self._tokens[s:s + n], dtype=np.int64) for s in self.window_starts(step)]
        return torch.from_numpy(np.stack(rows))


def windows_in(num_tokens: int, seq_len: int) -> int:
    """Windows per epoch: room is left for any offset in [0, seq_len) plus the last target token."""
    return max(0, (num_tokens - seq_len) // seq_len)
