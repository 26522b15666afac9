"""Prefix KV cache: the keys and values of token prefixes that requests and sessions share.

    cache = PrefixCache(max_bytes=64 << 20, block_tokens=32, persist_dir=None)
    cache.bind(model_key, engine)   # the agent's: "<bundle sha256>-<backend>-<hash of path and versions>"
    logits, kv, reused = prefill_cached(engine, prompt_ids, cache)   # cache may be None
    cache.resize(max_bytes)     # live; evicts down to the new bound
    cache.stats()               # lookups, hits, hit tokens, bytes, blocks, evictions

`prefill_cached(engine, prompt_ids, prefix_cache | None) -> (logits (vocab,), cache, reused_tokens)`
is the one entry point for a prefill: it restores the longest cached prefix of the prompt
(`engine.cache_from_kv`), runs the rest of the prompt on top of it in one multi-token step
(chunked prefill, batch 1) and stores the prompt's new full blocks (`engine.export_kv`). The
returned cache is the engine's ordinary batch-1 handle at position len(prompt_ids); decoding goes
on as after `runtime.generate.prefill`. `runtime.generate.generate` prefills through it; the
batching scheduler (runtime/batching.py) through `PrefillJob`, the same steps runnable a chunk at
a time, whose lookup happens at its first chunk (after the prompts admitted before it have stored
their blocks, so a burst sharing a system prompt computes it once).

Design.

- Blocks. A prompt is cut into blocks of `block_tokens` tokens; only full blocks are cached. A
  block is named by a chain hash, sha256(parent hash + its tokens), so one name stands for the
  whole prefix up to the block's end and equal prefixes of different requests meet in the same
  blocks (a tree: one system prompt, many suffixes). A block holds its own positions' keys and
  values (per layer, (kv_heads, block_tokens, head_dim), float32).
- Lookup walks the prompt's blocks from the start while they are cached, up to the last full
  block that leaves at least one prompt token to run (that token's forward gives the logits).
- Bound and eviction. The blocks' array bytes stay under `max_bytes`; beyond it the least
  recently used block without cached children is evicted (a leaf), so a block is never
  unreachable while it is stored, and a shared system prompt outlives its suffixes. A lookup
  or insert touches every block of its chain.
- One model. KV is only valid for the weights and execution path that computed it:
  `bind(model_key, engine)` with a key other than the current one drops every block (the agent
  binds on each model activation, OTA included), and once bound to an engine the cache serves
  that engine object only: a prefill on another engine (an old model still draining its
  requests) neither reads nor writes it. `prefill_cached` refuses an unbound cache.
- Persistence (optional). Under `persist_dir/<model_key>/` a block is written, once it was
  reused by a lookup (blocks of one-off prompts never reach the disk), as `<hash>.kvb`: a
  header (model key, parent hash, tokens, shape, sha256 of the arrays) and the arrays, written
  to a temporary name and renamed. Files are read lazily when a lookup misses in memory; a file
  that is truncated, corrupted, of another shape, written for another model key (copied from
  another model's directory) or whose tokens do not hash to its name is ignored with a warning
  and deleted. Evicting a block deletes its file, and `bind` trims the directory to `max_bytes`
  (oldest files first) and removes the block files of other models that no process serves, so
  the disk holds at most what memory may per model: the one in use and the one served just before
  it (kept for a rollback). Every process bound to a model holds
  its directory's LEASE file (a shared flock, gone with the process): two processes (two agents
  given one `cache.persist_dir`) sharing it with different models keep each other's files. A
  bind to another model keeps the directory of the model it leaves (its lease still held, until the
  next switch or the end of the process: another process sharing the directory leaves it) and removes the
  one before that at once (unless another process holds it), and the directory of a model no
  process holds once nothing in it changed for
  IDLE_S (an agent restarting keeps its files; a crashed one's go later). A lookup or
  insert makes its block hashes with one read of block_tokens and gives up (a miss, nothing
  stored) when `reconfigure` changed the size meanwhile.

Thread safety: one lock guards the blocks and counters; the engine work of `prefill_cached`
runs outside it (callers serialize engine use, as for any forward).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.engine import KvBlock, ModelArch

log = logging.getLogger("edgeglm.prefix_cache")

ROOT = b""  # the parent hash of a prompt's first block
MAGIC = b"EDGEGLM-KV1\n"
SUFFIX = ".kvb"
LEASE = ".edgeglm-prefix-cache.lock"  # in each model's directory: held (shared) by every process bound to that model
LEGACY_LEASE = ".lock"  # the lease's name in 0.x agents of 2026-11-26, removed with a directory they left
TEMP = f".*{SUFFIX}.*.tmp"  # a block file being written (`_persist`): only these temporary files are ever deleted
WRITE_PAUSE_S = 60  # after a block file could not be written, none is tried for this long
IDLE_S = 600.0  # another model's directory nobody holds is removed once nothing in it changed for this long
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # a model key is one directory name


def _prompt_graph(engine, prompt_tokens: int) -> str:
    """The graph that runs a prompt of this many tokens on `engine` ("" where it has one)."""
    which = getattr(engine, "prompt_graph", None)
    return which(prompt_tokens) if callable(which) else ""


def block_hash(parent: bytes, tokens) -> bytes:
    """The chain hash of a block: sha256 over its parent's hash and its token ids (int64 LE)."""
    return hashlib.sha256(parent + np.asarray(tokens, "<i8").tobytes()).digest()


@dataclass
class _Block:
    parent: bytes
    tokens: tuple[int, ...]
    keys: tuple[np.ndarray, ...]  # per layer (kv_heads, block_tokens, head_dim)
    values: tuple[np.ndarray, ...]
    children: int = 0  # cached blocks whose parent this is
    persisted: bool = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)


@dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int  # prefills that asked the cache (while it was on)
    hits: int  # ... of them reused at least one block
    hit_tokens: int  # prompt tokens whose KV was reused instead of computed
    bytes: int  # KV bytes held in memory now
    blocks: int
    evictions: int  # blocks evicted to keep the bound (not counting clear/rebind)
    max_bytes: int


BLOCK_TOKENS = 32  # the default block


class PrefixCache:
    """KV of token prefixes in blocks of `block_tokens`, at most `max_bytes` of arrays, LRU by leaf."""

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS, persist_dir: str | Path | None = None):
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"prefix cache block_tokens={block_tokens!r} is invalid: must be an integer >= 1")
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes={max_bytes!r} is invalid: must be >= 0")
        self.max_bytes, self.block_tokens = int(max_bytes), block_tokens
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.model_key: str | None = None
        self._engine = None  # weakref to the one engine served, when bound with one
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._bytes = self._lookups = self._hits = self._hit_tokens = self._evictions = 0
        self._disk_bytes = 0  # bytes of this model's block files, as far as this process knows
        self._lease: tuple[Path, weakref.finalize] | None = None  # (model directory, closes the fd holding its LEASE)
        self._previous: Path | None = None  # the directory of the model served before this one: kept for a flip back
        self._previous_lease: weakref.finalize | None = None  # its LEASE, still held: others sharing the dir keep it
        self._write_paused_until = 0.0  # a block file could not be written (full or read-only disk): no writes until
        self._write_warned = False  # ... then (warned once per model and directory)
        self._rejected: set[bytes] = set()  # block files found unusable and not deletable (a read-only disk): not read again
        self._next_sweep = 0.0  # when other models' idle directories are looked at again while this model serves
        self._lock = threading.RLock()

    # --- model binding ------------------------------------------------------------------------
    def bind(self, model_key: str, engine=None) -> None:
        """Serve KV of this model only (and of this engine object only, if one is given): another key
        than the bound one drops every block."""
        if not isinstance(model_key, str) or not KEY_PATTERN.fullmatch(model_key):
            raise ValueError(f"prefix cache model key {model_key!r} is invalid: letters, digits, '.', '_', '-'")
        inexact = getattr(engine, "inexact_resume", None)
        with self._lock:
            bound = self._engine() if self._engine is not None else None
            if inexact and (model_key != self.model_key or engine is not bound):  # once per model and engine
                log.warning("prefix cache: not used on this execution path (%s): a prompt resumed from cached KV "
                            "would not give the same logits as the whole prompt there; every prompt is prefilled "
                            "in full", inexact)
            self._engine = weakref.ref(engine) if engine is not None else None
            if model_key == self.model_key:
                return
            self._drop_all()
            self.model_key = model_key
            self._write_paused_until, self._write_warned, self._rejected = 0.0, False, set()
            self._tidy_disk()

    def close(self) -> None:
        """Release the model directory's lease (the process exiting does too): another process binding another
        model may then remove this model's files."""
        with self._lock:
            self._hold_lease(None)
            self._release_previous()

    def clear(self) -> None:
        """Drop every block in memory (files on disk stay for the bound model, within max_bytes)."""
        with self._lock:
            self._drop_all()

    def resize(self, max_bytes: int) -> None:
        """A new bound, applied now: blocks are evicted down to it (0 turns the cache off)."""
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes={max_bytes!r} is invalid: must be >= 0")
        with self._lock:
            self.max_bytes = int(max_bytes)
            held = self._bytes
            self._evict_to(self.max_bytes)
            if held and held - self._bytes >= held // 4:  # a bulk drop (turned off, or a much lower bound)
                release_freed_memory()
            if self.model_key is not None and self._disk_bytes > self.max_bytes:
                self._tidy_disk()  # the files too: turned off (0), the disk holds none of them
            if self.max_bytes == 0 and self._previous is not None:  # nor the previous model's, kept for a rollback
                self._release_previous()
                _remove_unused(self._previous, idle_s=None)
                self._previous = None

    def reconfigure(self, max_bytes: int, block_tokens: int, persist_dir: str | Path | None) -> None:
        """Live settings: a new bound resizes; another block size or directory drops the blocks in
        memory (their hashes or files no longer apply). The counters go on."""
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"prefix cache block_tokens={block_tokens!r} is invalid: must be an integer >= 1")
        persist_dir = Path(persist_dir) if persist_dir is not None else None
        with self._lock:
            if (block_tokens, persist_dir) != (self.block_tokens, self.persist_dir):
                self._drop_all()
                if block_tokens != self.block_tokens and self._previous is not None:
                    self._release_previous()
                    _remove_unused(self._previous, idle_s=None)  # its blocks are of the old size: no lookup reads them
                    self._previous = None
                old_root = self.persist_dir if persist_dir != self.persist_dir else None
                self.block_tokens, self.persist_dir = block_tokens, persist_dir
                self._write_paused_until, self._write_warned = 0.0, False
                if self.model_key is not None:
                    self._tidy_disk()
                if old_root is not None:  # no longer used by this process: other models' idle directories there go
                    _sweep_idle(old_root)  # as they would have in it (those of live processes stay: their lease)
            self.resize(max_bytes)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(self._lookups, self._hits, self._hit_tokens, self._bytes, len(self._blocks),
                                    self._evictions, self.max_bytes)

    # --- lookup and insert --------------------------------------------------------------------
    def chain(self, prompt_ids: list[int], blocks: int, block_tokens: int | None = None, graph: str = "") -> list[bytes]:
        """The chain hashes of the prompt's first `blocks` full blocks (of `block_tokens`, default the cache's).
        `graph` names the graph that runs the prompt where an engine has two that round differently (ONNX
        Runtime INT8: the W8A8 prefill graph and the decode graph, chosen by the prompt's length): it salts the
        first block's hash, so that a prompt only ever resumes from KV its own graph computed. A 40-token prompt
        (decode graph) reused blocks a 100-token one (prefill graph) had stored: its KV was not what a cold
        prefill computes, and greedy answers changed with a hit."""
        out, parent, b = [], ROOT, block_tokens or self.block_tokens
        for i in range(blocks):
            parent = block_hash(parent if i else graph.encode(), prompt_ids[i * b:(i + 1) * b])
            out.append(parent)
        return out

    def lookup(self, prompt_ids: list[int], engine=None) -> KvBlock | None:
        """The KV of the longest cached prefix of whole blocks that leaves >= 1 prompt token; None on a
        miss, when off, or for an engine other than the bound one. Blocks read from disk are checked
        against `engine.arch`."""
        b = self.block_tokens
        graph = _prompt_graph(engine, len(prompt_ids))
        hashes = self.chain(prompt_ids, (len(prompt_ids) - 1) // b, b, graph)
        arch: ModelArch | None = getattr(engine, "arch", None)
        with self._lock:
            self._check_bound()
            if self.max_bytes == 0 or not self._serves(engine):  # off, or not this cache's engine
                return None
            if b != self.block_tokens:  # reconfigured since the hashes were made: a miss, not another size's files
                return None
            self._lookups += 1
            if self.persist_dir is not None and time.monotonic() >= self._next_sweep:
                self._sweep_others()  # other models' directories go once idle, while this one serves for months
            found: list[_Block] = []
            for i, h in enumerate(hashes):
                block = self._blocks.get(h) or self._load(h, hashes[i - 1] if i else ROOT, arch, graph)
                if block is None:
                    break
                self._blocks.move_to_end(h)  # touched before the next load may evict
                found.append(block)
            while found and hashes[len(found) - 1] not in self._blocks:  # a bound smaller than the chain
                found.pop()
            if not found:
                return None
            self._hits += 1
            self._hit_tokens += len(found) * self.block_tokens
            for h, block in zip(hashes, found):
                if not block.persisted:
                    self._persist(h, block)
            return KvBlock.of_parts((b.keys, b.values) for b in found)  # joined only where read whole

    def insert(self, engine, cache, prompt_ids: list[int]) -> int:
        """Store the prompt's full blocks that are not cached yet, from `cache` (which holds at least
        the prompt's positions); returns how many blocks were added."""
        b = self.block_tokens
        hashes = self.chain(prompt_ids, min(len(prompt_ids), cache.length) // b, b,
                            _prompt_graph(engine, len(prompt_ids)))
        with self._lock:
            self._check_bound()
            if not self._serves(engine) or b != self.block_tokens:
                return 0
            key, have = self.model_key, 0
            while have < len(hashes) and hashes[have] in self._blocks:
                self._blocks.move_to_end(hashes[have])
                have += 1
        if have == len(hashes) or self.max_bytes == 0:
            return 0
        kv = engine.export_kv(cache, len(hashes) * b)
        with self._lock:
            if key != self.model_key or b != self.block_tokens or not self._serves(engine):
                return 0  # rebound meanwhile: this KV belongs to the model before
            added = 0
            for i in range(have, len(hashes)):
                h, parent = hashes[i], hashes[i - 1] if i else ROOT
                if h in self._blocks or (parent != ROOT and parent not in self._blocks):
                    continue  # stored meanwhile, or its parent evicted by this very insert
                span = slice(i * b, (i + 1) * b)
                block = _Block(parent, tuple(prompt_ids[span]), tuple(k[:, span].copy() for k in kv.keys),
                               tuple(v[:, span].copy() for v in kv.values))
                self._add(h, block)
                added += 1
                self._evict_to(self.max_bytes)
            return added

    # --- internals (called with the lock held) ------------------------------------------------
    def _serves(self, engine) -> bool:
        """Whether this engine's prompts may be resumed from cached KV: the bound engine (or any, if none was
        bound), and one that resumes exactly (`inexact_resume` None: an OpenVINO path in bf16 or with a u8 KV
        cache says why not; there a hit would change the logits by rounding, so the cache stays out of it)."""
        if getattr(engine, "inexact_resume", None):
            return False
        return self._engine is None or (engine is not None and self._engine() is engine)

    def _check_bound(self) -> None:
        if self.model_key is None:
            raise ValueError("the prefix cache is not bound to a model: call bind(model_key) before using it")

    def _add(self, h: bytes, block: _Block) -> None:
        self._blocks[h] = block
        self._bytes += block.nbytes
        if block.parent != ROOT and block.parent in self._blocks:
            self._blocks[block.parent].children += 1

    def _remove(self, h: bytes, delete_file: bool) -> None:
        block = self._blocks.pop(h)
        self._bytes -= block.nbytes
        parent = self._blocks.get(block.parent)
        if parent is not None:
            parent.children -= 1
        if delete_file and block.persisted and _unlink(self._file(h)):
            self._disk_bytes -= block.nbytes

    def _evict_to(self, limit: int) -> None:
        while self._bytes > limit:
            leaf = next(h for h, blk in self._blocks.items() if blk.children == 0)  # a tree always has a leaf
            self._remove(leaf, delete_file=True)
            self._evictions += 1

    def _drop_all(self) -> None:
        had = bool(self._blocks)
        self._blocks.clear()
        self._bytes = 0
        if had:
            release_freed_memory()

    # --- persistence --------------------------------------------------------------------------
    def _dir(self) -> Path | None:
        return self.persist_dir / self.model_key if self.persist_dir is not None and self.model_key else None

    def _file(self, h: bytes) -> Path:
        return self._dir() / (h.hex() + SUFFIX)

    def _persist(self, h: bytes, block: _Block) -> None:
        folder = self._dir()
        if folder is None or time.monotonic() < self._write_paused_until:  # (before the arrays are joined and hashed:
            return  # 10 ms for a 2048-token hit, under the lock, at every hit while a full disk paused the writes)
        payload = b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in block.keys + block.values)
        header = json.dumps({"model": self.model_key, "parent": block.parent.hex(), "tokens": list(block.tokens),
                             "shape": [len(block.keys), *block.keys[0].shape],
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path = self._file(h)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # the prompt's token ids are in the header: readable by the agent's user only, whatever the umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
            os.replace(tmp, path)  # a power cut leaves the old file or none; a torn one fails its checksum
            block.persisted = True
            self._disk_bytes += len(payload)
        except OSError as exc:
            _unlink(tmp)
            # a full or read-only disk fails every write alike: one warning, then no writes for WRITE_PAUSE_S
            # (each cache hit would try again and warn again, tens of lines a minute)
            self._write_paused_until = time.monotonic() + WRITE_PAUSE_S
            if not self._write_warned:
                self._write_warned = True
                log.warning("prefix cache: cannot write %s (%s); blocks stay in memory only, writes are tried again "
                            "every %d s (warned once)", path, exc.strerror or exc, WRITE_PAUSE_S)
            return
        if self._write_warned:
            self._write_warned = False
            log.info("prefix cache: block files are written to %s again", folder)
        if self._disk_bytes > self.max_bytes:  # files of earlier runs, or of blocks dropped by clear()
            self._tidy_disk(keep_fraction=0.75)

    def _load(self, h: bytes, parent: bytes, arch: ModelArch | None, graph: str = "") -> _Block | None:
        """The block of hash `h` from disk, added to memory; None if absent or unusable (warned, deleted).
        `graph`: the salt of the chain's first block (`chain`)."""
        if self._dir() is None or self.max_bytes == 0 or h in self._rejected:
            return None
        path = self._file(h)
        try:
            data = _read_block_file(path, _block_file_limit(self.block_tokens, arch, self.max_bytes))
            block = _parse(data, h, parent, self.block_tokens, arch, self.model_key, graph)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("prefix cache: cannot read %s (%s); ignored", path, exc)
            return None
        except ValueError as exc:
            log.warning("prefix cache: %s is not a usable KV block (%s); ignored and deleted", path, exc)
            if not _unlink(path) and path.exists():  # a read-only disk: not read (and warned about) at every lookup
                self._rejected.add(h)
            return None
        block.persisted = True
        _touch(path)  # used again: the newest for the next trim (bind), as a new block would be
        self._add(h, block)
        self._evict_to(self.max_bytes)
        return self._blocks.get(h)

    def _hold_lease(self, folder: Path | None) -> Path | None:
        """Hold `folder`'s LEASE (shared) while bound to its model, so that another process tidying the same
        persist_dir for another model leaves this model's files alone; the previous lease goes (its file touched:
        the idle time of the directory counts from then). Returns the directory whose lease was released."""
        if self._lease is not None and self._lease[0] == folder:
            return None
        left = None
        if self._lease is not None:
            left = self._lease[0]
            self._lease[1]()  # touches the lease file and closes it, which releases the lock
            self._lease = None
        if folder is None:
            return left
        for _ in range(50):  # the lease file can be removed (with an unused directory) between open and flock
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(folder / LEASE, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:
                continue  # the directory went right after mkdir: make it again
            except OSError as exc:
                log.warning("prefix cache: cannot use %s (%s); blocks are written there as far as it allows",
                            folder, exc)
                return left
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process removes this folder's files
            except OSError as exc:
                os.close(fd)
                log.warning("prefix cache: cannot lock %s (%s): another process sharing %s for another model may "
                            "delete this model's block files", folder / LEASE, exc, folder.parent)
                return left
            if _is_current(fd, folder / LEASE):
                break
            os.close(fd)  # locked a lease file that was removed meanwhile: lock the one in place now
        else:
            log.warning("prefix cache: cannot hold %s (removed again and again); going on without it", folder / LEASE)
            return left
        _touch_fd(fd)
        self._lease = (folder, weakref.finalize(self, _release, fd))  # released with the cache, at the latest
        return left

    def _release_previous(self) -> None:
        """Release the previous model's lease (its file touched: its idle time counts from now)."""
        if self._previous_lease is not None:
            self._previous_lease()
            self._previous_lease = None

    def _sweep_others(self) -> None:
        """Remove the directories of other models in persist_dir that no process holds and nothing changed in for
        IDLE_S (the current model's and the previous one's stay); again IDLE_S later. An upgrade (another key) left
        the old directories "recent" at its bind (the old process's exit touched their lease), and with no model
        switch after it nothing looked at them again: 3 x max_mb on the disk for good."""
        self._next_sweep = time.monotonic() + IDLE_S
        if self.persist_dir is not None:
            _sweep_idle(self.persist_dir, keep=(self._dir(), self._previous))

    def _tidy_disk(self, keep_fraction: float = 1.0) -> None:
        """Remove other models' block files and leftover temporary files, and trim this model's to
        `keep_fraction` of max_bytes. A chain is kept from its root: a file counts as recent as the most
        recent of its descendants (so a shared system prompt written first outlives the prompts built on
        it), and a file whose parent is not kept goes too (no lookup could reach it)."""
        mine = self._dir()
        outgoing = self._lease if self._lease is not None and self._lease[0] != mine else None
        if outgoing is not None:
            self._lease = None  # its lease is kept (below) while its directory is the previous model's
        left = self._hold_lease(mine)
        if outgoing is not None:
            left = outgoing[0]
        if left is not None and left != mine:  # the model this process served until now
            before = self._previous
            keep = self.persist_dir is not None and left.parent == self.persist_dir and any(left.glob("*" + SUFFIX))
            self._release_previous()
            # kept: a rollback (or a flip back) to it starts warm; its lease held, so that another process sharing
            # the persist_dir for another model leaves it alone however long this one serves the new model
            self._previous = left if keep else None
            if outgoing is not None:
                if keep:
                    self._previous_lease = outgoing[1]
                else:
                    outgoing[1]()  # touched and released
            if not keep:
                _remove_unused(left, idle_s=None)  # empty, or in a persist_dir no longer used: at once
            if before is not None and before not in (mine, left):
                _remove_unused(before, idle_s=None)  # the model before that: at once, if nobody else serves it
        if self._previous == mine:
            self._release_previous()
            self._previous = None  # flipped back to it: it is the current one now (under the lease just taken)
        try:
            if self.persist_dir is None or not self.persist_dir.is_dir():
                self._disk_bytes = 0
                return
            self._sweep_others()
            entries = {}  # hash -> (path, mtime, size, parent hash)
            for f in (mine.glob("*" + SUFFIX) if mine.is_dir() else []):
                st = _stat(f)
                if st is None:  # gone since listed: evicted by another process sharing the directory
                    continue
                parent, overhead = _header_of(f)
                entries[f.name[:-len(SUFFIX)]] = (f, st.st_mtime, st.st_size - overhead, parent)
            for f in (mine.glob(TEMP) if mine.is_dir() else []):  # a write cut short by a crash
                st = _stat(f)
                if st is not None and not 0 <= time.time() - st.st_mtime <= 3600:  # (a future mtime: the clock)
                    _unlink(f)
        except OSError as exc:
            log.warning("prefix cache: cannot tidy %s (%s)", self.persist_dir, exc)
            return
        recent = {h: e[1] for h, e in entries.items()}
        for h, (_, mtime, _, parent) in entries.items():  # a chain is as recent as its newest block
            while parent in entries and recent[parent] < mtime:
                recent[parent] = mtime
                parent = entries[parent][3]

        def depth(h: str) -> int:
            n, parent = 0, entries[h][3]
            while parent in entries and n < len(entries):
                n, parent = n + 1, entries[parent][3]
            return n
        kept, total, budget = set(), 0, self.max_bytes * keep_fraction
        for h in sorted(entries, key=lambda h: (-recent[h], depth(h))):  # parents before their children
            path, _, size, parent = entries[h]
            if total + size <= budget and (parent == ROOT.hex() or parent in kept):
                kept.add(h)
                total += size
            else:
                if parent is None:
                    log.warning("prefix cache: %s is not a usable KV block (unreadable header); deleted", path)
                _unlink(path)
        self._disk_bytes = total


def release_freed_memory() -> bool:
    """Hand memory the process freed back to the system (glibc's malloc_trim; elsewhere nothing).

    The cache's blocks are thousands of small arrays allocated on the batching worker's thread; freed all at
    once (a model switch, a new block size, the cache turned off or its bound cut by a quarter or more), glibc kept the pages in that thread's
    arena, between allocations still in use, and the agent's RSS grew with every bulk drop (a 15-minute soak
    that drops the cache every ~3 minutes: +369 MB/h; with this call +8 MB/h; docs/performance.md, "Soak").
    True when the call was made."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        import ctypes

        try:
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (musl, macOS)
            fn = None
        _TRIM.append(fn)
    return _TRIM[0]


def _sweep_idle(root: Path, keep: tuple = ()) -> None:
    """Remove the model directories under `root` (block files, or a lease) but those in `keep` that no process holds
    and that nothing changed in for IDLE_S. (A directory holding only the older `.lock` is not taken for one: other
    programs sharing a persist_dir use that name.)"""
    try:
        folders = [f for f in root.iterdir() if f not in keep and f.is_dir() and (
            any(f.glob("*" + SUFFIX)) or (f / LEASE).exists())]
    except OSError:
        return
    for folder in folders:
        _remove_unused(folder, idle_s=IDLE_S)


def _remove_unused(folder: Path, idle_s: float | None) -> None:
    """Delete another model's directory (its block files, temporary files and lease; the directory itself when
    nothing else is in it) unless a process bound to that model holds its lease (another agent sharing the
    directory, serving another model) or, with `idle_s`, something in it changed less than `idle_s` ago (an
    agent restarting with that model). The lease is taken exclusively meanwhile, so a process binding to that
    model now waits for the end of the removal and then makes a new directory."""
    # idle unless changed within idle_s; a change "in the future" (written while the clock ran ahead, before an
    # NTP step back) is no sign of use: it kept a directory of GBs until real time caught up
    if idle_s is not None and 0 <= time.time() - _newest_change(folder) < idle_s:
        return
    lease = folder / LEASE
    try:
        fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        fd = None  # (a directory this process may not write: deleting its files fails too, and says so)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.debug("prefix cache: %s is in use by another process; left alone", folder)
                return
            if not _is_current(fd, lease):  # another process removed it meanwhile (and maybe a binder made anew)
                return
        for f in folder.glob("*" + SUFFIX):
            _unlink(f)
        for f in folder.glob(TEMP):
            _unlink(f)
        if fd is not None:
            _unlink(folder / LEGACY_LEASE)
            _unlink(lease)  # still locked: a binder waiting on this file finds it gone and opens a new one
            try:
                folder.rmdir()
            except OSError:
                pass  # something else is in it (not ours to delete)
    finally:
        if fd is not None:
            os.close(fd)


def _is_current(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (a lease file can be removed while locked)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _newest_change(folder: Path) -> float:
    """The newest modification time of the directory and its files (0 if it cannot be read)."""
    newest = 0.0
    try:
        newest = folder.stat().st_mtime
        for f in folder.iterdir():
            st = _stat(f)
            if st is not None:
                newest = max(newest, st.st_mtime)
    except OSError:
        pass
    return newest


def _touch_fd(fd: int) -> None:
    try:
        os.utime(fd)
    except OSError:
        pass


def _release(fd: int) -> None:
    """Let go of a lease: its file touched (the directory's idle time starts now), then closed (unlocked)."""
    _touch_fd(fd)
    os.close(fd)


def _unlink(path: Path) -> int:
    """Delete a file; its size (0 if it was not there or cannot be deleted: a read-only directory, files of
    another user, which must not fail the request that evicts a block; warned)."""
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except (FileNotFoundError, NotADirectoryError):  # (a file where its directory should be: not there either)
        return 0
    except OSError as exc:
        log.warning("prefix cache: cannot delete %s (%s)", path, exc)
        return 0


def _stat(path: Path) -> os.stat_result | None:
    """The file's stat; None when it is gone (deleted by another process since it was listed)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


HEADER_MAX = 1 << 20  # the most bytes of a block file's header read (its parent hash, tokens, shape, checksum)


def _open_block_file(path: Path):
    """A block file opened to read: a regular file, opened without following a symbolic link and without
    blocking (a FIFO planted under a block's name hung the lookup, with the cache lock held, and the agent's
    start; a link to /dev/zero was read until memory ran out). ValueError for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("a symbolic link, not a file") from None
        raise
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError("not a regular file")
    return f


def _block_file_limit(block_tokens: int, arch: ModelArch | None, max_bytes: int) -> int:
    """The most bytes a usable block file can hold: its arrays (the model's shape; at most max_bytes, else no
    block is kept) and its header."""
    arrays = max_bytes if arch is None else 2 * arch.num_layers * arch.num_kv_heads * block_tokens * arch.head_dim * 4
    return len(MAGIC) + 4 + HEADER_MAX + arrays


def _read_block_file(path: Path, limit: int) -> bytes:
    """A block file's bytes; ValueError where it is no regular file or holds more than `limit` bytes."""
    with _open_block_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{size} bytes, more than a block file of this model holds ({limit})")
        return f.read(limit + 1)


def _header_of(path: Path) -> tuple[str | None, int]:
    """(the parent hash in hex, the bytes before the arrays) of a block file; (None, 0) when its header cannot
    be read. Disk use is counted in array bytes, as memory is (max_bytes)."""
    try:
        with _open_block_file(path) as f:
            head = f.read(len(MAGIC) + 4)
            if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
                return None, 0
            (size,) = struct.unpack("<I", head[len(MAGIC):])
            parent = json.loads(f.read(min(size, HEADER_MAX)))["parent"]
            return (parent, len(MAGIC) + 4 + size) if isinstance(parent, str) else (None, 0)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None, 0


def _parse(data: bytes, h: bytes, parent: bytes, block_tokens: int, arch: ModelArch | None,
           model_key: str | None = None, graph: str = "") -> _Block:
    """A block file's content, checked against its name (hash), its expected parent, the model key it was
    written for and the model shape."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError("not a prefix cache block file")
    at = len(MAGIC) + 4
    (size,) = struct.unpack("<I", data[len(MAGIC):at])
    try:
        head = json.loads(data[at:at + size])
        layers, heads, tokens, dim = (int(x) for x in head["shape"])
        stored_parent, ids, digest = bytes.fromhex(head["parent"]), [int(t) for t in head["tokens"]], head["sha256"]
        np.asarray(ids, "<i8")  # token ids beyond int64 cannot be hashed
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError(f"bad header: {exc}") from None
    written_for = head.get("model")
    if model_key is not None and written_for != model_key:
        raise ValueError(f"written for model {written_for!r}, not {model_key!r}" if written_for is not None
                         else "written by an older version, without a model key")
    payload = data[at + size:]
    if len(payload) != 2 * layers * heads * tokens * dim * 4:
        raise ValueError(f"{len(payload)} bytes of arrays, expected {2 * layers * heads * tokens * dim * 4}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("checksum mismatch")
    salted = graph.encode() if parent == ROOT else parent  # a chain's first block: salted by its graph
    if stored_parent != parent or len(ids) != block_tokens or block_hash(salted, ids) != h:
        raise ValueError("its tokens do not match its name")
    if tokens != block_tokens:
        raise ValueError(f"its arrays hold {tokens} positions, not a block's {block_tokens}")
    if arch is not None and (layers, heads, dim) != (arch.num_layers, arch.num_kv_heads, arch.head_dim):
        raise ValueError(f"shape {layers}x{heads}x{dim} is not this model's")
    arrays = np.frombuffer(payload, "<f4").astype(np.float32).reshape(2 * layers, heads, tokens, dim)
    return _Block(parent, tuple(ids), tuple(arrays[:layers]), tuple(arrays[layers:]))


class PrefillJob:
    """A prompt's prefill through the prefix cache, runnable in chunks.

    The first `advance` looks the prompt up (`reused` positions come from the prefix cache, at most
    all but the last token) and makes the batch-1 cache; each `advance(max_tokens)` runs the next at
    most `max_tokens` prompt tokens on top of it (all that is left when None) and returns True once
    the prompt is complete: then `logits` holds the last position's (vocab,) logits and the prompt's
    full blocks have been offered to the prefix cache. The batching scheduler runs a long prompt a
    chunk per decode step so that the requests already decoding are not stalled behind it. A chunk
    attends to the cached positions before it, and every chunk (like the rest of a prompt after a
    prefix-cache hit) runs on the graph the whole prompt would run on (`prompt_tokens`: on INT8 the
    prefill graph, even for a 1-token tail), so the logits are the whole prefill's up to float rounding
    of the order of the sums, not the other graph's rounding (which turned greedy answers of an
    untrained model after a hit)."""

    def __init__(self, engine, prompt_ids: list[int], prefix_cache: PrefixCache | None = None):
        self.engine, self.prompt, self.prefix_cache = engine, list(prompt_ids), prefix_cache
        self.reused = 0  # prompt positions that came from the prefix cache (known after the first chunk)
        self.cache = None  # the batch-1 cache, made by the first chunk
        self.done = 0  # prompt positions in the cache
        self.logits: np.ndarray | None = None

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    def _start(self) -> None:
        """Look the prompt up now (not at construction: prompts admitted before this one may still
        be storing the blocks it shares) and make the cache."""
        found = self.prefix_cache.lookup(self.prompt, self.engine) if self.prefix_cache is not None else None
        self.reused = self.done = found.length if found is not None else 0
        self.cache = self.engine.cache_from_kv(found) if found is not None else self.engine.new_cache()

    def advance(self, max_tokens: int | None = None) -> bool:
        """Run the next chunk of the prompt (the first one looks it up in the prefix cache first);
        True when the prompt is complete (then `logits` is set)."""
        n = len(self.prompt)
        if self.cache is None:
            self._start()
        if self.done >= n:
            return True
        end = n if max_tokens is None else min(n, self.done + max(1, int(max_tokens)))
        ids = np.asarray([self.prompt[self.done:end]], dtype=np.int64)
        pos = np.arange(self.done, end, dtype=np.int64)[None]
        logits, self.cache = self.engine.forward(ids, pos, np.ones((1, end), np.int64), self.cache, prompt_tokens=n)
        self.done = end
        if end < n:
            return False
        self.logits = logits[0]
        if self.prefix_cache is not None:
            self.prefix_cache.insert(self.engine, self.cache, self.prompt)
        return True


def prefill_cached(engine, prompt_ids: list[int], prefix_cache: PrefixCache | None = None):
    """Prefill through the prefix cache: (last-position logits (vocab,), batch-1 cache, reused tokens)."""
    job = PrefillJob(engine, prompt_ids, prefix_cache)
    job.advance()
    return job.logits, job.cache, job.reused
