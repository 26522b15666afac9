"""OpenVINO's compiled decoder: the fused nodes the exporter's graph is written for, and results equal
to the PyTorch reference (models/glm.py) for the attention layouts the graph must handle.

The structure is read from `compiled.get_runtime_model()` (what the CPU plugin runs each step), not
from timings: one ScaledDotProductAttention per layer reading its KV-cache state directly (no
Concat, MatMul or Softmax), one RoPE per q and per k, one q|k|v FullyConnected per layer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from agent.model import load_model
from models.config import GlmConfig
from models.export import ENTRY, _write_backend
from models.glm import GlmForCausalLM
from runtime.engine import ModelArch, load_engine


def runtime_nodes(engine) -> list[tuple[str, list[str]]]:
    """(layer type, consumer layer types) of each node a step executes: not inputs, outputs,
    constants, nor nodes computed from constants only (those run once, at compile time)."""
    rt = engine.compiled.get_runtime_model()
    kind = {op.get_friendly_name(): op.get_rt_info()["layerType"].astype(str) for op in rt.get_ordered_ops()}
    constant: set[str] = set()
    nodes = []
    for op in rt.get_ordered_ops():
        name, sources = op.get_friendly_name(), [i.get_source_output().get_node().get_friendly_name()
                                                 for i in op.inputs()]
        if kind[name] == "Const" or (sources and all(s in constant for s in sources)):
            constant.add(name)
        elif kind[name] not in ("Input", "Output"):
            consumers = [kind[t.get_node().get_friendly_name()] for out in op.outputs()
                         for t in out.get_target_inputs()]
            nodes.append((kind[name], consumers))
    return nodes


@pytest.mark.parametrize("bundle", ["fp32_bundle", "int8_bundle"])
def test_compiled_decoder_has_fused_attention_rope_and_qkv(bundle, request):
    model = load_model(request.getfixturevalue(bundle), "openvino")
    L = model.arch.num_layers
    nodes = runtime_nodes(model.engine)
    kinds = Counter(k for k, _ in nodes)
    assert kinds["ScaledDotProductAttention"] == L
    assert kinds["MatMul"] == kinds["Softmax"] == 0  # attention is not decomposed
    assert kinds["RoPE"] == 2 * L
    assert kinds["FullyConnected"] == 4 * L + 1  # q|k|v, o, gate|up, down per layer; lm_head
    # the cache is appended inside the attention node: each state read goes straight into it
    memory = [consumers for k, consumers in nodes if k == "MemoryInput"]
    assert len(memory) == 2 * L and all(c == ["ScaledDotProductAttention"] for c in memory)
    assert kinds["Concatenation"] <= 2  # only the rotary table and the state's initial shape
    assert len(nodes) <= 26 * L + 36, kinds  # 25 per layer; the unfused graph ran about 46 per layer


VARIANTS = {  # (heads, kv heads, partial rotary factor): multi-head, multi-query, full rotary
    "mha-full-rotary": (4, 4, 1.0),
    "mqa": (4, 1, 0.5),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """A random-init GLM of the variant's attention layout, its OpenVINO fp32 export and engine."""
    heads, kv, prf = VARIANTS[request.param]
    cfg = GlmConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, partial_rotary_factor=prf,
                    rms_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = GlmForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp(request.param)
    _write_backend("openvino", "fp32", cfg, {k: v.numpy() for k, v in ref.state_dict().items()}, out, 128)
    engine = load_engine("openvino", out / ENTRY["openvino"], ModelArch.from_manifest(cfg.to_dict()), threads=2)
    return cfg, ref, engine


def _ref_logits(ref, ids) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids]))[0][0].numpy()  # (T, vocab), all positions


def test_variant_fuses_attention(variant):
    cfg, _, engine = variant
    kinds = Counter(k for k, _ in runtime_nodes(engine))
    assert kinds["ScaledDotProductAttention"] == cfg.num_hidden_layers and kinds["Softmax"] == 0


def test_variant_prefill_decode_and_chunks_equal_reference(variant):
    cfg, ref, engine = variant
    seq = np.random.default_rng(1).integers(1, cfg.vocab_size, 12).tolist()
    want = _ref_logits(ref, seq)
    one = lambda n: np.ones((1, n), np.int64)  # noqa: E731
    logits, cache = engine.forward(np.array([seq[:5]]), np.arange(5)[None], one(5), engine.new_cache())
    got = [logits[0]]
    logits, cache = engine.forward(np.array([seq[5:8]]), np.arange(5, 8)[None], one(8), cache)  # a chunk
    got.append(logits[0])
    for n in range(8, 12):  # decode steps, the last after a round trip through export_kv/cache_from_kv
        if n == 11:
            cache = engine.cache_from_kv(engine.export_kv(cache, n))
        logits, cache = engine.forward(np.array([[seq[n]]]), np.array([[n]]), one(n + 1), cache)
        got.append(logits[0])
    np.testing.assert_allclose(np.stack(got), want[[4, 7, 8, 9, 10, 11]], atol=1e-4)


def test_variant_left_padded_batch_equals_rows_alone(variant):
    cfg, ref, engine = variant
    rng = np.random.default_rng(2)
    rows = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (7, 4)]
    ids = np.zeros((2, 7), np.int64)
    mask = np.zeros((2, 7), np.int64)
    pos = np.zeros((2, 7), np.int64)
    for r, row in enumerate(rows):
        ids[r, 7 - len(row):], mask[r, 7 - len(row):], pos[r, 7 - len(row):] = row, 1, np.arange(len(row))
    logits, cache = engine.forward(ids, pos, mask, engine.new_cache(2))
    nxt = logits.argmax(-1)
    logits2, _ = engine.forward(nxt[:, None], np.array([[7], [4]]), np.concatenate([mask, np.ones((2, 1),
                                                                                                   np.int64)], 1),
                                cache)
    for r, row in enumerate(rows):
        want = _ref_logits(ref, row + [int(nxt[r])])
        np.testing.assert_allclose(logits[r], want[-2], atol=1e-4)
        np.testing.assert_allclose(logits2[r], want[-1], atol=1e-4)


def test_loading_openvino_models_leaves_the_threads_signal_stack_as_it_was(int8_bundle):
    """OpenVINO's Core and each compiled model set a new alternate signal stack on the loading thread and freed it
    with a later one: after the autotune compiled two OpenVINO paths at an agent's start, its SIGTERM (`systemctl
    stop`) was delivered onto freed memory and the agent died with SIGSEGV instead of shutting down cleanly
    (tests/agent/test_daemon.py -k sighup runs that agent)."""
    import gc
    import threading

    from ota.bundle import open_bundle
    from runtime.signals import _key, _sigaltstack

    def load_two_and_drop(out: list) -> None:
        bundle = open_bundle(int8_bundle)
        arch = ModelArch.from_manifest(bundle.manifest.architecture)
        before = _key(_sigaltstack())
        engines = [load_engine("openvino", bundle.path(bundle.manifest.backends["openvino"].entry), arch, 1,
                               pinned=pinned) for pinned in (True, False)]
        out.append(_key(_sigaltstack()) == before)
        del engines
        gc.collect()
        out.append(_key(_sigaltstack()) == before)
    out: list = []
    worker = threading.Thread(target=load_two_and_drop, args=(out,))  # a thread of its own: nothing else touched
    worker.start()
    worker.join(120)
    assert out == [True, True]


RELOAD_CHECK = """
import gc, json, os, sys
import numpy as np
from ota.bundle import open_bundle
from runtime.engine import ModelArch, load_engine

bundle = open_bundle(sys.argv[1])
arch = ModelArch.from_manifest(bundle.manifest.architecture)
entry = bundle.path(bundle.manifest.backends["openvino"].entry)
threads = []
for _ in range(5):  # what an agent does at each OTA switch, self-test and autotune trial: load, serve, let go
    engine = load_engine("openvino", entry, arch, 2)
    ids = np.arange(1, 17, dtype=np.int64)[None]
    logits, cache = engine.forward(ids, np.arange(16, dtype=np.int64)[None], np.ones((1, 16), np.int64),
                                   engine.new_cache())
    for p in range(16, 24):
        token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        logits, cache = engine.forward(np.array([[token]], np.int64), np.array([[p]], np.int64),
                                       np.ones((1, p + 1), np.int64), cache)
    del engine, cache, logits
    gc.collect()
    threads.append(len(os.listdir("/proc/self/task")))
print(json.dumps(threads))
"""


def test_an_openvino_model_let_go_leaves_no_thread_behind(int8_bundle):
    """The CPU plugin's runtime cache kept every compiled model alive after it was released: one more thread (and
    ~10 MB on glm-s) per load that served a request, at every OTA switch, self-test and autotune trial, for the
    agent's whole life (a 15-minute soak whose autotune picked OpenVINO: threads 23 -> 30, RSS +86 MB). Measured in
    a fresh process: the thread count after each of five load-serve-release rounds stays the same."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(int8_bundle)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2], timeout=300)
    threads = json.loads(out.stdout.strip().splitlines()[-1])
    assert threads == [threads[0]] * 5, threads
