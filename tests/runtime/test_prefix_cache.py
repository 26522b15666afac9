"""The prefix KV cache: a cache hit changes nothing in the output, the byte bound holds, KV of one
model never serves another, and persisted blocks survive a restart but never a corruption.

References are plain prefills (`runtime.generate.prefill`, no prefix cache) on the same engine.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import numpy as np
import pytest

from agent.model import load_model
from models.tiny import HELDOUT_MODULES, corpus_text
from runtime.generate import SamplingParams, decode_one_token, generate, prefill, sample
from runtime.prefix_cache import PrefixCache, prefill_cached

BACKENDS = ["onnxruntime", "openvino"]
B = 16  # block tokens: small, so the tiny prompts span several blocks
GREEDY = SamplingParams(max_tokens=20)
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def models(fp32_bundle, int8_bundle):
    loaded = {}

    def get(precision: str, backend: str):
        if (precision, backend) not in loaded:
            loaded[precision, backend] = load_model(fp32_bundle if precision == "fp32" else int8_bundle, backend)
        return loaded[precision, backend]
    return get


@pytest.fixture(scope="module")
def ids(models):
    return models("fp32", "onnxruntime").tokenizer.encode(corpus_text(HELDOUT_MODULES)).ids


def key(model) -> str:
    return f"{model.bundle.sha256}-{model.backend}"


def reference(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    """generate() written out on the plain prefill: no prefix cache anywhere."""
    rng, history, out = np.random.default_rng(params.seed), list(prompt), []
    logits, cache = prefill(engine, prompt)
    for _ in range(params.max_tokens):
        token = sample(logits, params, rng, history)
        if token in engine.arch.eos_token_ids:
            break
        out.append(token)
        history.append(token)
        logits, cache = decode_one_token(engine, token, len(history) - 1, cache)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_kv_restores_a_cache_that_continues_like_the_original(models, ids, backend):
    engine = models("fp32", backend).engine
    seq = ids[:60]
    cache = engine.new_cache()
    engine.forward(np.asarray([seq[:40]]), np.arange(40)[None], np.ones((1, 40), np.int64), cache)
    block = engine.export_kv(cache, 25)
    assert block.length == 25 and block.keys[0].shape == (engine.arch.num_kv_heads, 25, engine.arch.head_dim)
    restored = engine.cache_from_kv(block)
    assert restored.length == 25
    logits, _ = engine.forward(np.asarray([seq[25:]]), np.arange(25, 60)[None], np.ones((1, 60), np.int64), restored)
    full, _ = prefill(engine, seq)
    np.testing.assert_allclose(logits[0], full, atol=1e-5)
    with pytest.raises(ValueError, match="batch-1"):
        engine.export_kv(cache, 41)
    with pytest.raises(ValueError, match="does not fit this model"):
        engine.cache_from_kv(type(block)(block.keys[:1], block.values[:1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_held_as_parts_restores_the_same_cache_as_one_joined_block(models, ids, backend):
    """The prefix cache hands its 16-token blocks over as parts of one KvBlock (joined only where read
    whole); the cache made from them holds exactly the exported positions and continues like the original."""
    engine = models("fp32", backend).engine
    seq = ids[:60]
    cache = engine.new_cache()
    engine.forward(np.asarray([seq[:40]]), np.arange(40)[None], np.ones((1, 40), np.int64), cache)
    whole = engine.export_kv(cache, 40)
    spans = [(0, 16), (16, 32), (32, 40)]
    parts = type(whole).of_parts((tuple(k[:, a:b] for k in whole.keys), tuple(v[:, a:b] for v in whole.values))
                                 for a, b in spans)
    assert parts.length == 40 and parts.nbytes == whole.nbytes
    restored = engine.cache_from_kv(parts)
    again = engine.export_kv(restored, 40)
    for got, want in zip(again.keys + again.values, whole.keys + whole.values):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(parts.keys + parts.values, whole.keys + whole.values):  # joined on demand
        np.testing.assert_array_equal(got, want)
    logits, _ = engine.forward(np.asarray([seq[40:]]), np.arange(40, 60)[None], np.ones((1, 60), np.int64), restored)
    np.testing.assert_allclose(logits[0], prefill(engine, seq)[0], atol=1e-5)
    bad = type(whole).of_parts([(whole.keys, whole.values), (tuple(k[:1] for k in whole.keys), whole.values)])
    with pytest.raises(ValueError, match="does not fit this model"):
        engine.cache_from_kv(bad)  # a part with one kv head too few


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_with_cache_hits_equal_outputs_without(models, ids, precision, backend):
    """A shared system prompt with different suffixes, the system prompt alone again, and a prompt
    that is exactly the cached blocks: greedy and seeded sampling give the tokens of a plain run."""
    model = models(precision, backend)
    system = ids[:70]  # 4 whole blocks + 6 tokens
    prompts = [system + ids[200:215], system + ids[400:433], system, ids[:64], ids[:64] + ids[600:610]]
    want_reused = [0, 64, 64, 48, 64]  # at least one prompt token always runs: ids[:64] reuses 3 blocks
    if getattr(model.engine, "inexact_resume", None):  # OpenVINO int8: activations quantized on the fly: left out
        assert (precision, backend) == ("int8", "openvino"), model.engine.inexact_resume
        want_reused = [0] * len(prompts)
    cache = PrefixCache(64 << 20, block_tokens=B)
    cache.bind(key(model))
    for params in (GREEDY, SEEDED):
        cache.clear()
        for prompt, want in zip(prompts, want_reused):
            expected = reference(model.engine, prompt, params)
            _, _, reused = prefill_cached(model.engine, prompt, cache)
            assert reused == want
            assert list(generate(model.engine, prompt, params, prefix_cache=cache)) == expected
    stats = cache.stats()
    assert (stats.hits > 0 and stats.hit_tokens >= sum(want_reused)) or not any(want_reused)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_prefill_job_run_in_chunks_equals_the_whole_prefill(models, ids, backend):
    """PrefillJob: a prompt run 7 tokens at a time after a prefix-cache hit gives the logits of the
    whole prompt at once, continues like it, and offers its blocks to the prefix cache at the end."""
    from runtime.prefix_cache import PrefillJob

    engine = models("fp32", backend).engine
    system, prompt = ids[:40], ids[:40] + ids[300:330]  # 2 whole blocks shared, 38 tokens left
    cache = PrefixCache(64 << 20, block_tokens=B)
    cache.bind(key(models("fp32", backend)))
    prefill_cached(engine, system, cache)
    whole_logits, whole_cache, _ = prefill_cached(engine, prompt)  # no cache: all 70 tokens at once
    job = PrefillJob(engine, prompt, cache)
    assert (job.reused, job.done, job.remaining) == (0, 0, 70)  # the lookup waits for the first chunk
    chunks = []
    while not job.advance(7):
        chunks.append(job.done)
        assert job.logits is None
    assert job.reused == 32  # 2 blocks from the cache, then 7 tokens a chunk
    assert chunks == [39, 46, 53, 60, 67] and job.done == 70 and job.advance(7)  # complete: nothing more runs
    np.testing.assert_allclose(job.logits, whole_logits, atol=1e-4)
    step = [engine.forward(np.array([[5]]), np.array([[70]]), np.ones((1, 71), np.int64), c)[0][0]
            for c in (job.cache, whole_cache)]
    np.testing.assert_allclose(step[0], step[1], atol=1e-4)
    assert cache.lookup(prompt + [1], engine).length == 64  # its blocks were inserted once complete


def test_lru_eviction_keeps_the_byte_bound_and_the_shared_prefix(models, ids):
    model = models("fp32", "onnxruntime")
    block_bytes = 2 * model.arch.num_layers * model.arch.num_kv_heads * B * model.arch.head_dim * 4
    cache = PrefixCache(6 * block_bytes, block_tokens=B)
    cache.bind(key(model))
    system = ids[:32]  # two blocks every prompt shares
    for i in range(8):  # each adds two blocks of its own suffix
        prefill_cached(model.engine, system + ids[100 + 40 * i:100 + 40 * i + 33], cache)
        assert cache.stats().bytes <= 6 * block_bytes
    stats = cache.stats()
    assert stats.evictions >= 10 and stats.blocks == 6
    _, _, reused = prefill_cached(model.engine, system + ids[100:133], cache)  # the oldest suffix: evicted
    assert reused == 32
    latest = system + ids[380:413]
    _, _, reused = prefill_cached(model.engine, latest, cache)  # the newest suffix: kept
    assert reused == 64
    assert list(generate(model.engine, latest, GREEDY, prefix_cache=cache)) == reference(model.engine, latest, GREEDY)
    cache.resize(2 * block_bytes)  # live: down to the bound now, the shared system prompt stays
    assert cache.stats().bytes <= 2 * block_bytes
    assert prefill_cached(model.engine, system + ids[900:910], cache)[2] == 32
    cache.resize(0)
    assert cache.stats().bytes == 0 and prefill_cached(model.engine, latest, cache)[2] == 0


def test_a_cache_bound_to_one_model_never_serves_another(models, ids):
    a, b = models("fp32", "onnxruntime"), models("int8", "onnxruntime")
    prompt = ids[:50]
    cache = PrefixCache(64 << 20, block_tokens=B)
    with pytest.raises(ValueError, match="not bound"):
        prefill_cached(a.engine, prompt, cache)
    cache.bind(key(a), a.engine)
    prefill_cached(a.engine, prompt, cache)
    assert prefill_cached(a.engine, prompt, cache)[2] == 48
    blocks = cache.stats().blocks
    logits, _, reused = prefill_cached(b.engine, prompt, cache)  # another engine: not served, not stored
    assert reused == 0 and cache.stats().blocks == blocks
    np.testing.assert_array_equal(logits, prefill(b.engine, prompt)[0])
    cache.bind(key(b))  # what the agent does when OTA activates another model
    logits, _, reused = prefill_cached(b.engine, prompt, cache)
    assert reused == 0
    np.testing.assert_array_equal(logits, prefill(b.engine, prompt)[0])
    cache.bind(key(a))  # and back: a's blocks went with the first rebind
    assert prefill_cached(a.engine, prompt, cache)[2] == 0


def test_persisted_blocks_serve_a_new_cache_over_the_same_directory(models, ids, tmp_path):
    model = models("fp32", "openvino")  # (int8 on OpenVINO is left out of the cache: dynamic quantization)
    system, k = ids[:70], key(model)
    first = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    first.bind(k)
    prefill_cached(model.engine, system + ids[200:210], first)
    prefill_cached(model.engine, system + ids[300:310], first)  # a reuse: the shared blocks are written
    assert len(list((tmp_path / k).glob("*.kvb"))) == 4
    restarted = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    restarted.bind(k)
    prompt = system + ids[500:520]
    assert prefill_cached(model.engine, prompt, restarted)[2] == 64
    restarted.clear()
    assert list(generate(model.engine, prompt, SEEDED, prefix_cache=restarted)) == reference(model.engine, prompt, SEEDED)
    first.close(), restarted.close()  # no process serves model k any more
    from runtime.prefix_cache import IDLE_S
    _age(tmp_path / k, IDLE_S + 1)  # ... for longer than a restart takes
    other = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    other.bind("another-model")  # other models' files are removed, never read
    assert prefill_cached(model.engine, prompt, other)[2] == 0 and not (tmp_path / k).exists()


def test_a_corrupted_or_truncated_block_file_is_ignored_with_a_warning(models, ids, tmp_path, caplog):
    model = models("fp32", "openvino")
    system, k = ids[:70], key(model)
    first = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    first.bind(k)
    prefill_cached(model.engine, system + ids[200:210], first)
    prefill_cached(model.engine, system + ids[300:310], first)
    chain = first.chain(system, 4)
    third, fourth = (tmp_path / k / (h.hex() + ".kvb") for h in chain[2:])
    data = bytearray(fourth.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the arrays
    fourth.write_bytes(bytes(data))
    restarted = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    restarted.bind(k)
    prompt = system + ids[500:520]
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        assert prefill_cached(model.engine, prompt, restarted)[2] == 48
    assert "checksum" in caplog.text and not fourth.exists()
    third.write_bytes(third.read_bytes()[:100])  # a torn write: found when the next run binds, or when looked up
    caplog.clear()
    again = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        again.bind(k)
        assert list(generate(model.engine, prompt, GREEDY, prefix_cache=again)) == reference(model.engine, prompt, GREEDY)
    assert "not a usable KV block" in caplog.text and again.stats().hit_tokens == 32


class _StubEngine:
    """What the cache asks of an engine: KV blocks of a prompt (`layers` x 2 heads x 4 dims)."""

    def __init__(self, layers: int = 2):
        self.layers = layers

    def export_kv(self, cache, length):
        from runtime.engine import KvBlock
        return KvBlock(tuple(np.full((2, length, 4), t, np.float32) for t in range(self.layers)),
                       tuple(np.full((2, length, 4), -t, np.float32) for t in range(self.layers)))


class _StubCache:
    def __init__(self, length):
        self.length = length


def test_the_disk_keeps_whole_chains_within_max_bytes_and_never_fails_a_request(tmp_path, monkeypatch):
    """Trimmed by recency, a shared system prompt written first used to go first, leaving its children on
    disk where no lookup could reach them; files of earlier runs and of cleared blocks added up to 2-6x
    max_bytes; and a directory the agent cannot delete in made evictions fail requests."""
    from runtime.prefix_cache import SUFFIX

    block = 2 * 4 * 2 * 32 * 4 * 4  # keys and values of one 32-token block (4 layers), bytes
    system, x, y = list(range(64)), list(range(1000, 1064)), list(range(2000, 2064))

    def use(cache, prompt):
        cache.insert(_StubEngine(layers=4), _StubCache(len(prompt) + 1), prompt + [7])
        assert cache.lookup(prompt + [7], None) is not None  # reused: written to disk
        time.sleep(0.02)
    first = PrefixCache(4 * block, 32, tmp_path)
    first.bind("m")
    use(first, system + x)
    second = PrefixCache(4 * block, 32, tmp_path)  # a restart
    second.bind("m")
    use(second, system + y)
    third = PrefixCache(4 * block, 32, tmp_path)
    third.bind("m")
    assert third.lookup(system + y + [7], None).length == 128  # the shared root is kept with its newest child
    for i in range(5):  # clear() leaves files behind; new prompts must not pile up past the bound
        use(third, list(range(10000 * (i + 1), 10000 * (i + 1) + 128)))
        third.clear()
    assert len(list((tmp_path / "m").glob("*" + SUFFIX))) <= 4
    import pathlib
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    for i in range(3):  # evictions and corrupt files in a directory it cannot delete in: warned, served
        use(third, list(range(50000 * (i + 1), 50000 * (i + 1) + 128)))


def test_an_int8_prompts_tail_runs_on_the_graph_the_whole_prompt_runs_on(models, ids):
    """On an INT8 bundle a prompt runs on the W8A8 prefill graph and single tokens on the MatMulNBits decode graph,
    which round differently. The 1-2 tokens left after a prefix-cache hit (or a prompt's last short chunk) ran on
    the decode graph, so a hit changed the logits by the graphs' rounding, and greedy answers of an untrained model
    (near-ties everywhere) changed with it. Now every part of a prompt runs where the whole prompt would."""
    from runtime.prefix_cache import PrefillJob

    model = models("int8", "onnxruntime")
    engine = model.engine
    assert engine.prefill_graph and engine.prefill_min_rows > 1
    prompt = ids[:2 * B + 1]  # two whole blocks and one token
    cold, _, _ = prefill_cached(engine, prompt)  # no cache: all of it at once
    cache = PrefixCache(64 << 20, block_tokens=B)
    cache.bind(key(model))
    prefill_cached(engine, prompt, cache)  # stores the two blocks
    warm, _, reused = prefill_cached(engine, prompt, cache)
    assert reused == 2 * B
    np.testing.assert_allclose(warm, cold, atol=1e-4)
    job = PrefillJob(engine, ids[:40])
    while not job.advance(1):  # one token at a time
        pass
    np.testing.assert_allclose(job.logits, prefill_cached(engine, ids[:40])[0], atol=1e-4)


def test_an_int8_prompt_never_resumes_from_blocks_the_other_graph_computed(models, ids):
    """Which graph runs a prompt depends on its length (prefill_min_rows): a short prompt sharing its first blocks
    with a long one (or the reverse) resumed from KV the other graph had computed, which is not what its own cold
    prefill computes (the W8A8 and MatMulNBits graphs round differently): a hit changed its logits by about 0.04
    and turned greedy answers. Blocks are keyed by the graph that computed them now."""
    model = models("int8", "onnxruntime")
    engine = model.engine
    keep = engine.prefill_min_rows
    engine.prefill_min_rows = 3 * B  # prompts of 48 tokens or more: the prefill graph
    try:
        short, long = ids[:2 * B + 5], ids[:4 * B]  # the same first two blocks, on the two graphs
        assert engine.prompt_graph(len(short)) == "decode" and engine.prompt_graph(len(long)) == "prefill"
        for first, second in ((long, short), (short, long)):
            cache = PrefixCache(64 << 20, block_tokens=B)
            cache.bind(key(model), engine)
            prefill_cached(engine, first, cache)  # stores blocks of its own graph
            warm, _, reused = prefill_cached(engine, second, cache)
            assert reused == 0  # the other graph's blocks: not taken
            np.testing.assert_array_equal(warm, prefill_cached(engine, second)[0])
            again, _, reused = prefill_cached(engine, second, cache)  # its own graph's blocks: taken
            assert reused == (len(second) - 1) // B * B
            np.testing.assert_allclose(again, warm, atol=1e-4)
    finally:
        engine.prefill_min_rows = keep


def _rewrite_block_file(path, change) -> None:
    """Rewrite a block file's JSON header with `change(header, arrays) -> arrays`; the checksum is made to
    match the arrays again (the damage is in what the header says, not a torn write)."""
    import hashlib
    import json
    import struct

    from runtime.prefix_cache import MAGIC

    data = path.read_bytes()
    at = len(MAGIC) + 4
    (size,) = struct.unpack("<I", data[len(MAGIC):at])
    header = json.loads(data[at:at + size])
    arrays = change(header, data[at + size:])
    header["sha256"] = hashlib.sha256(arrays).hexdigest()
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(raw)) + raw + arrays)


def test_a_block_file_copied_from_another_models_directory_is_not_served(models, ids, tmp_path, caplog):
    """Block files were named by their tokens only: one copied from another model's directory (same shapes,
    other weights) was served as this model's KV. The header names the model key it was written for."""
    a, b = models("fp32", "onnxruntime"), models("int8", "onnxruntime")
    system = ids[:70]
    first = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path / "a")
    first.bind(key(a))
    prefill_cached(a.engine, system + ids[200:210], first)
    prefill_cached(a.engine, system + ids[300:310], first)  # reused: 4 blocks written for a
    written = list((tmp_path / "a" / key(a)).glob("*.kvb"))
    assert len(written) == 4
    other = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path / "b")
    other.bind(key(b))
    (tmp_path / "b" / key(b)).mkdir(parents=True, exist_ok=True)  # (bind made it: it holds its lease)
    prompt = system + ids[500:520]
    # copied by hand into b's directory, under the names b looks up (b's chain is salted with the graph that
    # runs the prompt there: an INT8 bundle has two)
    names = dict(zip(first.chain(system, 4), other.chain(system, 4, graph=b.engine.prompt_graph(len(prompt)))))
    for f in written:
        (tmp_path / "b" / key(b) / (names[bytes.fromhex(f.stem)].hex() + ".kvb")).write_bytes(f.read_bytes())
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        logits, _, reused = prefill_cached(b.engine, prompt, other)
    assert reused == 0
    np.testing.assert_array_equal(logits, prefill(b.engine, prompt)[0])
    root = names[first.chain(system, 1)[0]].hex() + ".kvb"  # the lookup stops at the first block it cannot use
    assert f"written for model '{key(a)}'" in caplog.text and not (tmp_path / "b" / key(b) / root).exists()
    again = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path / "a")  # a's own files still serve a
    again.bind(key(a))
    assert prefill_cached(a.engine, prompt, again)[2] == 64


@pytest.mark.parametrize("plant", ["fifo", "link to /dev/zero", "oversized file"])
def test_something_planted_under_a_blocks_name_is_refused_without_hanging(models, ids, tmp_path, caplog, plant):
    """A FIFO under a block's name hung the next start's bind and the lookup (with the cache lock held: every
    request of the agent); a link to /dev/zero was read until memory ran out; a file of any size was read
    whole. Each is refused and deleted (the link, not what it points to), and the prompt runs as without a
    cache. (The timeouts only tell a hang from a refusal.)"""
    model = models("fp32", "onnxruntime")
    system = ids[:40]
    folder = tmp_path / key(model)
    PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path).bind(key(model))
    path = folder / (PrefixCache(64 << 20, block_tokens=B).chain(system, 1)[0].hex() + ".kvb")

    def put() -> None:
        if plant == "fifo":
            os.mkfifo(path)
        elif plant == "link to /dev/zero":
            path.symlink_to("/dev/zero")
        else:
            with open(path, "wb") as f:
                f.truncate(256 << 20)  # (sparse)
    put()
    restarted = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        bind = threading.Thread(target=restarted.bind, args=(key(model),), daemon=True)
        bind.start()
        bind.join(120)
    assert not bind.is_alive(), "the bind hung"
    assert "not a usable KV block" in caplog.text and not os.path.lexists(path)
    caplog.clear()
    put()  # again, while it serves
    prompt, got = system + ids[100:110], []
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        lookup = threading.Thread(target=lambda: got.append(prefill_cached(model.engine, prompt, restarted)),
                                  daemon=True)
        lookup.start()
        lookup.join(120)
    assert not lookup.is_alive(), "the lookup hung"
    logits, _, reused = got[0]
    assert reused == 0
    np.testing.assert_array_equal(logits, prefill(model.engine, prompt)[0])
    assert "not a usable KV block" in caplog.text and not os.path.lexists(path)
    if plant == "oversized file":
        assert "more than a block file of this model holds" in caplog.text
    assert os.path.exists("/dev/zero")


@pytest.mark.parametrize("damage", ["parent not a string", "token id beyond int64", "fewer positions than a block",
                                    "no model key"])
def test_a_block_file_with_a_damaged_header_is_ignored_never_raised(models, ids, tmp_path, caplog, damage):
    """A header whose parent is not a hex string made bind() raise TypeError (unhashable) and one with a token
    id beyond int64 made the lookup raise OverflowError: a damaged file failed the agent's model activation or
    the request. Arrays of fewer positions than a block were served as a whole block."""
    model = models("fp32", "onnxruntime")
    system, k = ids[:70], key(model)
    first = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
    first.bind(k)
    prefill_cached(model.engine, system + ids[200:210], first)
    prefill_cached(model.engine, system + ids[300:310], first)
    files = [tmp_path / k / (h.hex() + ".kvb") for h in first.chain(system, 4)]
    per_position = model.arch.num_layers * model.arch.num_kv_heads * model.arch.head_dim * 4  # one of keys, values

    def change(header, arrays):
        if damage == "parent not a string":
            header["parent"] = [header["parent"]]
        elif damage == "token id beyond int64":
            header["tokens"][0] = 1 << 70
        elif damage == "fewer positions than a block":
            header["shape"][2] = B // 2
            heads = model.arch.num_kv_heads
            full = np.frombuffer(arrays, "<f4").reshape(2 * model.arch.num_layers, heads, B, -1)
            arrays = np.ascontiguousarray(full[:, :, :B // 2]).tobytes()
            assert len(arrays) == B // 2 * per_position * 2
        else:
            header.pop("model", None)  # a file written before the header named its model
        return arrays
    _rewrite_block_file(files[0], change)  # the root block: nothing of the chain can be served
    prompt = system + ids[500:520]
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        restarted = PrefixCache(64 << 20, block_tokens=B, persist_dir=tmp_path)
        restarted.bind(k)
        logits, _, reused = prefill_cached(model.engine, prompt, restarted)
    assert reused == 0 and "not a usable KV block" in caplog.text and not files[0].exists()
    np.testing.assert_array_equal(logits, prefill(model.engine, prompt)[0])


@pytest.mark.parametrize("precision,kv", [("bf16", "f32"), ("f32", "u8")])
def test_an_openvino_path_that_cannot_resume_exactly_is_left_out_of_the_cache(models, ids, tmp_path, caplog, precision,
                                                                               kv):
    """On OpenVINO in bf16 (what the autotune picks where the CPU computes bf16), a step's rounding depends on how
    many tokens it runs, and a u8 KV cache is quantized again when cached KV is put back: a hit changed logits by
    about 0.03 and could turn a greedy near-tie. Such an engine neither reads nor writes the cache, says so once,
    and its answers with the cache are those without it; the f32 path keeps the cache."""
    from runtime.engine import OpenVinoEngine

    loaded = models("int8", "openvino")
    # the default f32 / f32 path of an int8 bundle quantizes activations on the fly, per group of 32: a prompt
    # split in two steps (as after a hit) gave logits 0.012 off the whole prompt's on glm-s; fp32 resumes exactly
    assert loaded.engine.inexact_resume == "DYNAMIC_QUANTIZATION_GROUP_SIZE 32"
    assert models("fp32", "openvino").engine.inexact_resume is None
    xml = loaded.bundle.path(loaded.bundle.manifest.backends["openvino"].entry)
    engine = OpenVinoEngine(xml, loaded.engine.arch, precision=precision, kv_cache_precision=kv)
    assert engine.precisions == {"INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": kv}
    assert f"{'INFERENCE_PRECISION_HINT' if precision != 'f32' else 'KV_CACHE_PRECISION'} " \
           f"{precision if precision != 'f32' else kv}" in engine.inexact_resume
    cache = PrefixCache(max_bytes=1 << 26, block_tokens=B, persist_dir=tmp_path / "kv")
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        cache.bind("ov-inexact", engine)
        cache.bind("ov-inexact", engine)  # bound again (the same model and engine): not said again
    assert caplog.text.count("prefix cache: not used on this execution path") == 1
    prompt = ids[:70]
    want = reference(engine, prompt, GREEDY)
    for _ in range(2):
        assert list(generate(engine, prompt, GREEDY, prefix_cache=cache)) == want
    assert cache.stats().hits == 0 and cache.stats().bytes == 0 and not list((tmp_path / "kv").rglob("*.kvb"))


def _persist(cache: PrefixCache, prompt: list[int]) -> None:
    """Store the prompt's blocks and reuse them once (what writes them to disk)."""
    cache.insert(_StubEngine(), _StubCache(len(prompt) + 1), prompt + [7])
    assert cache.lookup(prompt + [7], None) is not None


SERVE_MODEL_A = """
import sys
sys.path[:0] = [{tests!r}]
from test_prefix_cache import PrefixCache, _persist
cache = PrefixCache(64 << 20, 32, {dir!r})
cache.bind("model-a")
_persist(cache, list(range(64)))
print("ready", flush=True)
sys.stdin.read()  # serves until the test closes stdin
"""


def test_two_processes_sharing_a_directory_with_different_models_keep_each_others_files(tmp_path):
    """Each bind removed every other model's block files: an agent and `edgeglm bench --cache-dir` (or two agents)
    sharing one persist_dir with different models deleted each other's cache at every start. A model some process
    serves keeps its files; so does one whose process stopped moments ago (an agent restarting); the files of a
    model nobody served for IDLE_S go, with their directory (no empty folder per model ever bound)."""
    import subprocess
    import sys
    from pathlib import Path

    from runtime.prefix_cache import IDLE_S, SUFFIX

    code = SERVE_MODEL_A.format(tests=str(Path(__file__).parent), dir=str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).parents[2])
    try:
        assert other.stdout.readline().strip() == "ready"
        a_files = sorted((tmp_path / "model-a").glob("*" + SUFFIX))
        assert len(a_files) == 2
        _age(tmp_path / "model-a", IDLE_S + 60)  # held: its age does not matter
        b = PrefixCache(64 << 20, 32, tmp_path)
        b.bind("model-b")  # model-a is served by the other process: its files stay
        _persist(b, list(range(100, 164)))
        assert sorted((tmp_path / "model-a").glob("*" + SUFFIX)) == a_files
    finally:
        other.stdin.close()
        other.wait(30)
    c = PrefixCache(64 << 20, 32, tmp_path)
    c.bind("model-c")  # model-a's process stopped just now (its lease file touched at the release): kept
    assert sorted((tmp_path / "model-a").glob("*" + SUFFIX)) == a_files
    _age(tmp_path / "model-a", IDLE_S + 1)
    _age(tmp_path / "model-b", IDLE_S + 1)
    c.bind("model-c2")  # model-a nobody served for IDLE_S: gone; model-b is held by cache b however old
    assert not (tmp_path / "model-a").exists()
    assert len(list((tmp_path / "model-b").glob("*" + SUFFIX))) == 2
    assert not (tmp_path / "model-c").exists()  # c's own previous model, empty: removed at its rebind
    b.close()
    PrefixCache(64 << 20, 32, tmp_path).bind("model-d")
    assert len(list((tmp_path / "model-b").glob("*" + SUFFIX))) == 2  # released just now
    _age(tmp_path / "model-b", IDLE_S + 1)
    PrefixCache(64 << 20, 32, tmp_path).bind("model-e")
    assert not (tmp_path / "model-b").exists()


def _age(folder, seconds: float) -> None:
    """Make the directory and everything in it look last changed `seconds` ago."""
    import os
    when = time.time() - seconds
    for f in [*folder.iterdir(), folder]:
        os.utime(f, (when, when))


def test_an_ota_switch_keeps_the_previous_models_files_and_removes_older_ones_at_once(tmp_path):
    """Each model ever bound left its directory behind (empty but for its lease file): one per OTA version. Now
    the model served just before stays on disk (a rollback to it starts warm), and the one before that goes."""
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("v1")
    _persist(cache, list(range(64)))
    assert len(list((tmp_path / "v1").glob("*.kvb"))) == 2
    for version in ("v2", "v3", "v4"):
        cache.bind(version)
        _persist(cache, list(range(64)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v3", "v4"]
    assert len(list((tmp_path / "v4").glob("*.kvb"))) == 2 and len(list((tmp_path / "v3").glob("*.kvb"))) == 2
    cache.bind("v5")  # v5 never writes a block: left empty, it is not worth keeping
    cache.bind("v6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v6"]


def test_a_rollback_to_the_previous_model_finds_its_prefixes_on_disk(tmp_path):
    """A model switch deleted the outgoing model's block files at once: an OTA update that failed its probation and
    rolled back (or an operator's A -> B -> A) started cold on the model it had served for days."""
    prompt = list(range(64))
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("a")
    _persist(cache, prompt)
    cache.bind("b")
    assert cache.lookup(prompt + [7], None) is None  # b's prompts never resume from a's KV
    _persist(cache, list(range(100, 164)))
    cache.bind("a")  # the rollback: nothing of a is in memory any more, its files are read back
    assert cache.stats().blocks == 0
    hit = cache.lookup(prompt + [7], None)
    assert hit is not None and hit.length == 64 and cache.stats().blocks == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # b is now the one a rollback would need
    cache.bind("c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]
    cache.reconfigure(64 << 20, 16, tmp_path)  # a's blocks are of 32 tokens: no lookup of 16 could read them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_the_previous_models_files_are_leased_against_other_processes_sharing_the_directory(tmp_path):
    """The kept previous model was this process's memory only: another process sharing the persist_dir (a second
    agent, `edgeglm bench --cache-dir`) removed it once it had been idle for IDLE_S, so a rollback after a long
    probation started cold. Its lease is now held until the next switch (or the process ends)."""
    from runtime.prefix_cache import IDLE_S, SUFFIX

    prompt = list(range(64))
    agent = PrefixCache(64 << 20, 32, tmp_path)
    agent.bind("a")
    _persist(agent, prompt)
    agent.bind("b")  # a is the previous model now
    _age(tmp_path / "a", IDLE_S + 60)
    other = PrefixCache(64 << 20, 32, tmp_path)  # (a lease is a flock: another open file, as another process's)
    other.bind("c")
    assert len(list((tmp_path / "a").glob("*" + SUFFIX))) == 2  # leased: left alone however old
    agent.bind("a")  # the rollback finds it
    assert agent.lookup(prompt + [7], None) is not None
    agent.bind("d")  # a is the previous one again; b, the one before, goes at once
    assert not (tmp_path / "b").exists() and (tmp_path / "a").is_dir()
    agent.close()  # the process ends: the lease goes, and the idle rule applies again
    _age(tmp_path / "a", IDLE_S + 60)
    other.bind("e")
    assert not (tmp_path / "a").exists()


def test_a_bind_waiting_on_a_removal_holds_the_new_lease_not_the_removed_one(tmp_path, monkeypatch):
    """A removal deletes the lease file it holds exclusively: a process that was waiting on that file must lock
    the new one, or a third process could take the new file exclusively and delete the files it serves."""
    import fcntl
    import os
    import threading

    from runtime.prefix_cache import LEASE, _remove_unused

    folder = tmp_path / "m"
    folder.mkdir()
    remover = os.open(folder / LEASE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(remover, fcntl.LOCK_EX)  # a removal under way in another process
    cache = PrefixCache(64 << 20, 32, tmp_path)
    real_flock, waiting = fcntl.flock, threading.Event()

    def flock(fd, op):  # the bind's first lock: it is about to wait on the removal's file (not a sleep's guess)
        if threading.current_thread() is binding and op == fcntl.LOCK_SH:
            waiting.set()
        return real_flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", flock)
    binding = threading.Thread(target=cache.bind, args=("m",))
    binding.start()
    assert waiting.wait(30)
    time.sleep(0.1)  # (inside flock by now; were it not, the bind would find the new file, as checked below)
    assert binding.is_alive()  # waits for the removal
    os.unlink(folder / LEASE)
    folder.rmdir()
    os.close(remover)  # the removal ends
    binding.join(10)
    assert not binding.is_alive()
    _persist(cache, list(range(64)))
    _remove_unused(folder, idle_s=None)  # another process's removal: the model is served here, so nothing goes
    assert len(list(folder.glob("*.kvb"))) == 2
    cache.close()
    _remove_unused(folder, idle_s=None)
    assert not folder.exists()


def test_a_lookup_racing_a_block_size_change_is_a_miss_and_deletes_nothing(tmp_path, caplog):
    """A lookup made its block hashes with the old block_tokens and then read files with the new one: a valid
    block file of the old size failed the new size's check and was deleted with a warning."""
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("m")
    prompt = list(range(64))
    _persist(cache, prompt)
    files = sorted((tmp_path / "m").glob("*.kvb"))
    cache.clear()  # the blocks are on disk only now
    real_chain = cache.chain

    def chain_then_reconfigure(*args):
        hashes = real_chain(*args)
        cache.reconfigure(64 << 20, 16, tmp_path)  # the desired config changes block_tokens right now
        return hashes
    cache.chain = chain_then_reconfigure
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        assert cache.lookup(prompt + [7], None) is None
    assert sorted((tmp_path / "m").glob("*.kvb")) == files and "not a usable KV block" not in caplog.text


def test_a_persist_dir_shared_with_other_programs_loses_none_of_their_files(tmp_path):
    """Removing an unused model directory deleted every `.*.tmp` file in it and its `.lock`: names other programs
    use too, in a cache.persist_dir such as /var/cache. Only the cache's own files go, its directories only when
    emptied of them."""
    from runtime.prefix_cache import IDLE_S

    other = tmp_path / "someapp"
    other.mkdir()
    for name in (".lock", ".download.tmp", "data.bin"):
        (other / name).write_text("theirs")
    _age(other, IDLE_S + 60)
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("m1")
    _persist(cache, list(range(64)))
    (tmp_path / "m1" / ".notes.tmp").write_text("someone's")
    cache.bind("m2")  # m1 is left: kept while it is the model before
    cache.bind("m3")  # now its block files and lease go, the folder stays for the file that is not ours
    assert sorted(p.name for p in (tmp_path / "m1").iterdir()) == [".notes.tmp"]
    assert sorted(p.name for p in other.iterdir()) == [".download.tmp", ".lock", "data.bin"]


TRIM_CHECK = """
import json, sys, threading
import numpy as np
import runtime.prefix_cache as pc

def rss_anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "off":
    pc.release_freed_memory = lambda: False
cache = pc.PrefixCache(1 << 30, block_tokens=32)
cache.bind("m")
kept = []

def fill():  # as the batching worker does: blocks of small arrays, other allocations in between
    for i in range(2048):
        kv = [tuple(np.ones((2, 32, 32), np.float32) for _ in range(2)) for _ in range(2)]
        cache._add(i.to_bytes(8, "big"), pc._Block(pc.ROOT, tuple(range(32)), kv[0], kv[1]))
        if i % 16 == 0:
            kept.append(np.ones(1024))

t = threading.Thread(target=fill)
t.start()
t.join()
held = cache.stats().bytes / 2**20
before = rss_anon_mb()
{"clear": cache.clear, "resize0": lambda: cache.resize(0)}[sys.argv[2]]()
print(json.dumps({"held_mb": held, "freed_share": (before - rss_anon_mb()) / held}))
"""


def test_dropping_the_cache_gives_its_memory_back_to_the_system():
    """Freed all at once (a model switch, a new block size, the cache turned off), the cache's blocks stayed in
    glibc's arena of the thread that made them: the agent's RSS grew by the cache's size at each bulk drop
    (a 15-minute soak: +369 MB/h). Measured in a fresh process, against the same drop without the release."""
    import json
    import subprocess
    from pathlib import Path

    from runtime.prefix_cache import _malloc_trim

    if _malloc_trim() is None:
        pytest.skip("not glibc: malloc_trim is not there")

    def run(mode, drop):
        out = subprocess.run([sys.executable, "-c", TRIM_CHECK, mode, drop], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parents[2])
        return json.loads(out.stdout)

    for drop in ("clear", "resize0"):  # a model switch / new block size; cache.max_mb = 0 (evicted block by block)
        released, kept = run("on", drop), run("off", drop)
        assert released["held_mb"] == kept["held_mb"] == 64.0
        assert released["freed_share"] > 0.75, (drop, released)
        assert kept["freed_share"] < 0.25, (drop, kept)  # without it glibc keeps the pages: what this is about


def test_files_changed_in_the_future_are_idle_not_in_use(tmp_path):
    """A directory written while the box's clock ran hours ahead (no RTC, before NTP stepped it back) looked changed
    "in the future" and was kept until real time caught up: another model's blocks (GBs) and a crashed write's
    temporary file stayed on the disk for hours or years."""
    import os

    from runtime.prefix_cache import SUFFIX

    old = PrefixCache(64 << 20, 32, tmp_path)
    old.bind("model-a")
    _persist(old, list(range(100, 164)))
    old.close()
    assert len(list((tmp_path / "model-a").glob("*" + SUFFIX))) == 2
    _age(tmp_path / "model-a", -6 * 3600)  # written 6 h "from now"
    new = PrefixCache(64 << 20, 32, tmp_path)
    new.bind("model-b")
    assert not (tmp_path / "model-a").exists()
    crashed = tmp_path / "model-b" / ".x.kvb.1234.tmp"
    crashed.write_bytes(b"half")
    when = time.time() + 6 * 3600
    os.utime(crashed, (when, when))
    new.bind("model-b2")
    new.bind("model-b")
    assert not crashed.exists()


def test_a_disk_that_refuses_writes_is_warned_about_once_and_files_are_private(tmp_path, monkeypatch, caplog):
    """A full or read-only disk failed every block write alike, and each cache hit tried again and warned
    again (50 warnings for 5 lookups); block files (their headers hold the prompt's token ids) were readable
    by everyone under the usual umask."""
    import errno
    import os
    import stat

    import runtime.prefix_cache as pc

    old_umask = os.umask(0o022)
    try:
        cache = PrefixCache(64 << 20, 32, tmp_path)
        cache.bind("m")
        _persist(cache, list(range(64)))
    finally:
        os.umask(old_umask)
    files = list((tmp_path / "m").glob("*.kvb"))
    assert len(files) == 2
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o700

    real_open = os.open

    def full_disk(path, flags, *args, **kw):
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args, **kw)
    monkeypatch.setattr(pc.os, "open", full_disk)
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        for i in range(5):  # five prompts reused five times: each hit would write
            prompt = list(range(1000 * (i + 1), 1000 * (i + 1) + 64))
            for _ in range(5):
                _persist(cache, prompt)
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert cache.stats().hits >= 25  # served from memory all along
    monkeypatch.setattr(pc.os, "open", real_open)  # space again: written once the pause is over
    monkeypatch.setattr(pc, "WRITE_PAUSE_S", 0)
    cache._write_paused_until = 0.0
    with caplog.at_level(logging.INFO, logger="edgeglm.prefix_cache"):
        _persist(cache, list(range(1000, 1064)))
    assert "written to" in caplog.text and len(list((tmp_path / "m").glob("*.kvb"))) == 4


def test_turning_the_cache_off_deletes_its_files(tmp_path):
    """cache.max_mb = 0 emptied memory but left the block files of earlier runs (not read back yet) on the disk
    until the next model change."""
    earlier = PrefixCache(64 << 20, 32, tmp_path)
    earlier.bind("m")
    _persist(earlier, list(range(64)))
    earlier.close()
    cache = PrefixCache(64 << 20, 32, tmp_path)  # a restart: the files are on disk, not in memory
    cache.bind("m")
    assert len(list((tmp_path / "m").glob("*.kvb"))) == 2
    cache.resize(0)
    assert list((tmp_path / "m").glob("*.kvb")) == []
    cache.resize(64 << 20)  # on again: starts empty, writes again
    _persist(cache, list(range(64)))
    assert len(list((tmp_path / "m").glob("*.kvb"))) == 2


def test_moving_the_persist_dir_live_sweeps_the_old_ones_idle_model_directories(tmp_path):
    """Other models' directories in a persist_dir the agent stopped using were tidied by no one, ever."""
    old, new = tmp_path / "old", tmp_path / "new"
    before = PrefixCache(64 << 20, 32, old)
    before.bind("model-a")
    _persist(before, list(range(64)))
    before.close()  # an earlier run's model, not served by anyone now ...
    from runtime.prefix_cache import IDLE_S
    _age(old / "model-a", IDLE_S + 1)  # ... for longer than a restart takes
    cache = PrefixCache(64 << 20, 32, old)
    cache.bind("model-b")
    assert not (old / "model-a").exists()  # (the bind there sweeps it: the rule being extended)
    other = PrefixCache(64 << 20, 32, old)  # another model's directory left idle again
    other.bind("model-c")
    _persist(other, list(range(64)))
    other.close()
    _age(old / "model-c", IDLE_S + 1)
    cache.reconfigure(64 << 20, 32, new)
    assert not (old / "model-c").exists() and not (old / "model-b").exists()
    _persist(cache, list(range(64)))
    assert len(list((new / "model-b").glob("*.kvb"))) == 2


def test_other_models_idle_directories_go_while_one_model_serves_for_long(tmp_path, monkeypatch):
    """After an upgrade (a new key), the old directories looked recent at the bind (the old process's exit had just
    touched their lease) and nothing looked at them again while the model served: 3 x max_mb on the disk for good.
    Lookups look again once IDLE_S has passed."""
    import runtime.prefix_cache as pc

    monkeypatch.setattr(pc, "IDLE_S", 0.3)
    old = PrefixCache(64 << 20, 32, tmp_path)
    old.bind("before-the-upgrade")
    _persist(old, list(range(64)))
    old.close()  # the old process exits: its lease touched now
    new = PrefixCache(64 << 20, 32, tmp_path)
    new.bind("after-the-upgrade")
    assert (tmp_path / "before-the-upgrade").exists()  # recent at the bind: kept
    time.sleep(0.4)
    _persist(new, list(range(1000, 1064)))  # served on: its lookups sweep
    assert not (tmp_path / "before-the-upgrade").exists()
    assert len(list((tmp_path / "after-the-upgrade").glob("*.kvb"))) == 2


def test_turning_the_cache_off_deletes_the_previous_models_files_too(tmp_path):
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("a")
    _persist(cache, list(range(64)))
    cache.bind("b")  # an OTA switch: a's files are kept for a rollback
    assert len(list((tmp_path / "a").glob("*.kvb"))) == 2
    cache.resize(0)
    assert not (tmp_path / "a").exists()


def test_a_damaged_block_on_a_read_only_disk_is_warned_about_once(tmp_path, monkeypatch, caplog):
    """Each lookup read the file again, warned it was not usable and "deleted", then warned it could not be deleted:
    20 warnings for 10 lookups on a disk remounted read-only."""
    import pathlib

    first = PrefixCache(64 << 20, 32, tmp_path)
    first.bind("m")
    _persist(first, list(range(64)))
    first.close()
    damaged = sorted((tmp_path / "m").glob("*.kvb"))[0]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("m")
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        for _ in range(10):
            cache.lookup(list(range(64)) + [7], None)
    assert sum("not a usable KV block" in r.getMessage() for r in caplog.records) == 1, caplog.text
    assert sum("cannot delete" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_a_file_where_the_model_directory_should_be_is_warned_about_once(tmp_path, monkeypatch, caplog):
    import runtime.prefix_cache as pc

    monkeypatch.setattr(pc, "WRITE_PAUSE_S", 0)  # every hit tries to write again
    cache = PrefixCache(64 << 20, 32, tmp_path)
    cache.bind("m")
    import shutil
    shutil.rmtree(tmp_path / "m")
    (tmp_path / "m").write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="edgeglm.prefix_cache"):
        for i in range(5):
            _persist(cache, list(range(64)))
    assert [r.getMessage()[:40] for r in caplog.records] == ["prefix cache: cannot write " + str(tmp_path)[:13]], \
        caplog.text
