"""Tokenizing a corpus file in pieces gives exactly the tokens of tokenizing its whole text at once."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

import models.data
from models.data import TextSource, tokenize_corpus
from models.tiny import EOS, SPECIAL_TOKENS, train_tokenizer

# GLM-4's tokenizer.json: this Split, then ByteLevel without its own regex
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _text() -> str:
    """Indented code, blank lines, trailing spaces, CRLF lines, tabs, punctuation before newlines, digits, other
    scripts, and a long line without a newline: every kind of whitespace run a cut could fall into."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = (lib / "textwrap.py").read_text(encoding="utf-8") + (lib / "heapq.py").read_text(encoding="utf-8")
    prose = ("Grüße aus Zürich.  Two  spaces,\tand a tab.\n\n\nEnd of a paragraph.   \n  indented 12345678 "
             "numbers,\n\n- item one;\n- item two:\n\n\t\ttabbed\n    \n") * 30
    crlf = "first line\r\nsecond  line\r\n\r\n  third\r\n" * 40
    long_line = " ".join(f"word{i},  more\ttext 中文字符" for i in range(400))
    return code + prose + crlf + long_line + "\n" + code[:5000]


def _glm4_like(text: str) -> Tokenizer:
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizers_and_text(tmp_path_factory):
    root, text = tmp_path_factory.mktemp("tok"), _text()
    paths = {}
    for name, tok in (("tiny (GPT-2 byte level)", train_tokenizer(text, 600)), ("GLM-4 regex", _glm4_like(text))):
        paths[name] = root / f"{name.split()[0]}.json"
        tok.save(str(paths[name]))
    (root / "corpus.txt").write_bytes(text.encode("utf-8"))
    # the whole text as models/data.py reads it: Python's universal newlines (CRLF read as "\n")
    return paths, root / "corpus.txt", (root / "corpus.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("read_chars", [300, 1000, 4096])
@pytest.mark.parametrize("kind", ["tiny (GPT-2 byte level)", "GLM-4 regex"])
def test_tokenizing_in_pieces_gives_the_tokens_of_the_whole_text(tokenizers_and_text, tmp_path, monkeypatch,
                                                                  kind, read_chars):
    """A piece was cut right after a newline, so "\\n" and the next line's indentation (one token of the whole
    text, "\\n        ") became two; also runs of blank lines ("\\n\\n") and trailing spaces ("x  \\n")."""
    paths, corpus, text = tokenizers_and_text
    # many cuts in a small file (4 Mi characters in real use; indented code has a safe cut in far fewer than the
    # 4 * READ_CHARS it may look through)
    monkeypatch.setattr(models.data, "READ_CHARS", read_chars)
    got = tokenize_corpus(TextSource([corpus], paths[kind]), tmp_path, progress=False)
    tok = Tokenizer.from_file(str(paths[kind]))
    whole = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id(EOS)]
    ids = np.asarray(got.tokens()).tolist()
    if ids != whole:
        i = next((i for i, (a, b) in enumerate(zip(ids, whole)) if a != b), min(len(ids), len(whole)))
        pytest.fail(f"token {i} differs: pieces {[tok.id_to_token(t) for t in ids[i - 2:i + 3]]}, whole text "
                    f"{[tok.id_to_token(t) for t in whole[i - 2:i + 3]]}")
    assert len(list(models.data._pieces(corpus))) > len(text) // (4 * read_chars)  # it was cut, many times


def test_binary_files_in_a_corpus_directory_are_left_out_and_named(tmp_path, caplog):
    """`--corpus src/` over a source tree was refused as a whole for its `__pycache__/*.pyc` ("not UTF-8 text"):
    binary files found in a directory (a NUL byte in their first 8 KiB, as git and grep tell) are left out, named
    in a warning; a file named itself is still checked as text, and a directory of binaries alone is refused."""
    import logging

    from models.build import BuildInputs, corpus_files
    from models.data import DataError, text_files
    from models.recipe import load_recipe

    src = tmp_path / "src"
    (src / "__pycache__").mkdir(parents=True)
    (src / "mod.py").write_text("def f():\n    return 'grüße'\n", encoding="utf-8")
    (src / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + bytes(range(256)))
    (src / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (src / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # text, not UTF-8: kept, and refused later
    skipped: list[Path] = []
    assert text_files((src,), skipped) == [src / "latin1.txt", src / "mod.py"]
    assert sorted(p.name for p in skipped) == ["logo.png", "mod.cpython-311.pyc"]
    assert text_files((src / "logo.png",)) == [src / "logo.png"]  # named itself: taken, and refused as not text
    with pytest.raises(DataError, match="holds only binary files"):
        text_files((src / "__pycache__",))
    inputs = BuildInputs.create(tmp_path / "teacher", (src,), load_recipe("quick"), tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="edgeglm.build"):
        assert corpus_files(inputs) == [src / "latin1.txt", src / "mod.py"]
    assert "left out 2 binary file(s)" in caplog.text and "mod.cpython-311.pyc" in caplog.text


def test_a_corpus_file_named_more_than_once_is_read_once_and_named(tmp_path, caplog):
    """`--corpus data data/a.txt` (or a link to a file in it) read a.txt twice: its text was cut into training and
    held-out windows at once, and the held-out loss measured text the student had trained on."""
    import logging

    from models.build import BuildInputs, corpus_files
    from models.recipe import load_recipe

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha\n")
    (data / "b.txt").write_text("beta\n")
    (tmp_path / "link.txt").symlink_to(data / "b.txt")
    inputs = BuildInputs.create(tmp_path / "teacher", (data, data / "a.txt", tmp_path / "link.txt", data),
                                load_recipe("quick"), tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="edgeglm.build"):
        assert corpus_files(inputs) == [data / "a.txt", data / "b.txt"]
    assert "4 file(s) named more than once are read once" in caplog.text, caplog.text
    assert f"{data / 'a.txt'} (is {data / 'a.txt'})" in caplog.text
    assert f"{tmp_path / 'link.txt'} (is {data / 'b.txt'})" in caplog.text


def test_an_empty_corpus_is_named_as_empty(tmp_path):
    """An empty --corpus file got to the size check and read "corpus too small: its 1 tokens give 1 held-out
    tokens" (the one token being the end-of-text the tokenizer adds)."""
    from models.build import BuildError, BuildInputs, corpus_files
    from models.recipe import load_recipe

    empty = tmp_path / "notes.txt"
    empty.write_text("")
    inputs = BuildInputs.create(tmp_path / "teacher", (empty,), load_recipe("quick"), tmp_path / "out")
    with pytest.raises(BuildError) as info:
        corpus_files(inputs)
    assert str(info.value) == (f"--corpus {empty}: the training text is empty (the file is 0 bytes); give files of "
                               "UTF-8 text; nothing was written")
    (tmp_path / "more.txt").write_text("some text\n")  # one empty file among others is fine
    assert corpus_files(BuildInputs.create(tmp_path / "teacher", (empty, tmp_path / "more.txt"), load_recipe("quick"),
                                           tmp_path / "out")) == [empty, tmp_path / "more.txt"]
