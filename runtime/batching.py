"""Continuous batching: one worker thread owns the engine and decodes many requests together.

    scheduler = Scheduler(engine, max_batch=8, window_ms=0)
    handle = scheduler.submit(prompt_ids, SamplingParams(...), deadline=None)
    for token in handle: ...          # token ids as they are made; an engine error is raised here
    handle.cancel()                   # from any thread; the row leaves the batch at the next step
    scheduler.configure(max_batch=4)  # live; applies at the next step boundary
    scheduler.close()                 # finish what is queued and running, then stop
    scheduler.call(fn)                # run fn() on the worker between two steps (exclusive engine use)

Design. Requests wait in a queue ordered by deadline (earliest first; requests without a
deadline after those with one, in arrival order). The worker loops over step boundaries:

1. cancelled and finished rows leave the batch;
2. queued requests are admitted while the batch has fewer than `max_batch` rows and, with
   `max_kv_bytes`, while the KV the admitted requests may come to hold fits it (each request may
   grow to its prompt plus its max_tokens, within the context window; the batch says what its
   buffers would come to from those it holds, `DecodeBatch.kv_bound`); the earliest request that does not fit waits
   for rows to leave, and those behind it wait too (a long request is never overtaken for ever); a
   request is always admitted into an empty batch. When the batch
   is empty, the worker first waits up to `window_ms` (from the oldest queued request's arrival)
   for the queue to fill the batch; once it decodes, arrivals join at the next boundary anyway.
   Each admitted request is prefilled alone at batch 1 (through the prefix cache when one is
   given) and its first token sampled from the prefill's logits. With no row decoding, a prompt
   runs whole; while rows decode, at most `prefill_chunk` prompt tokens run per boundary (oldest
   prompt first), so a long prompt stalls the decoding rows for a chunk at a time (not on engines
   that swap one state per request, OpenVINO: there every chunk would copy the batch's state out
   and back, so prompts run whole);
3. the batch (`engine.new_batch()`, a runtime.engine.DecodeBatch) follows: a row that left
   gives up its slot (the last row moves into it), an admitted row's KV is copied into a new
   slot. On ONNX Runtime that is all that is copied and each row attends over its own positions
   (`RaggedBatch`); on OpenVINO and older graphs the rows are re-merged into one left-padded
   cache at the next step (`MergedBatch`: every row's KV copied per change of membership);
4. one batched decode step: each row feeds its last token at its own position; padding is
   masked, so a row's logits are those it would get alone (up to float rounding of the wider
   matrix products, see docs/runtime.md "Batching");
5. each row samples its next token with its own settings, random generator, repetition
   history, stop ids and max_tokens, exactly as `runtime.generate.generate` does.

Errors: a request the runtime refuses (empty, longer than the context) raises RequestError from
`submit`. An engine failure in a prefill fails that request's handle; in a batched step it fails
the handles of the rows in that batch. Either way the error (`EngineFailed`) is raised to the
handle's reader and the scheduler goes on serving the others.

Other work on the same engine (the OTA self-test timing the serving model) goes through
`call(fn)`: the worker runs it between two decode steps, so no two threads ever drive one engine
(an ONNX Runtime IO binding or an OpenVINO infer request is not safe to share across threads).
"""

from __future__ import annotations

import heapq
from concurrent.futures import Future
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from runtime.engine import CacheRow, DecodeBatch, kv_estimate
from runtime.errors import RequestError
from runtime.generate import SamplingParams, TokenHistory, sample
from runtime.prefix_cache import PrefillJob

log = logging.getLogger("edgeglm.batching")

MAX_BATCH_LIMIT = 256
MAX_WINDOW_MS = 10_000.0
MAX_PREFILL_CHUNK = 1 << 20
# Prompt tokens prefilled per decode step while other requests decode (0: each prompt whole). A long
# prompt then stalls the running streams for one chunk at a time instead of its whole prefill; see
# docs/runtime.md "Batching" for the measured trade.
DEFAULT_PREFILL_CHUNK = 128
# batching.max_kv_mb "auto": the KV may take 1/AUTO_KV_DIVISOR of the memory left once the model is loaded
AUTO_KV_DIVISOR = 3


def kv_bytes_per_token(engine) -> int:
    """Bytes of keys and values one position of one row takes in the engine's batch (float32 on the
    host; the GPU graph's float16 in device memory)."""
    arch = engine.arch
    itemsize = np.dtype(getattr(engine, "_kv_dtype", np.float32)).itemsize
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * itemsize


class EngineFailed(Exception):
    """The engine raised while running this request; the request was ended, the scheduler serves on."""


class SchedulerClosed(Exception):
    """The scheduler stopped before this request was finished (or accepted)."""


_END = object()  # end of a handle's token stream


class Handle:
    """One submitted request: iterate it for token ids; `cancel()` ends it from any thread."""

    def __init__(self, scheduler: "Scheduler", params: SamplingParams, deadline: float | None):
        self.params, self.deadline = params, deadline
        self._scheduler = scheduler
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.admitted_at: float | None = None  # time.monotonic() when it left the queue for the batch

    def __iter__(self) -> Iterator[int]:
        while not self._cancelled.is_set():
            item = self._events.get()
            if item is _END:
                self._events.put(_END)  # a second iterator ends too
                if self.error is not None:
                    raise self.error
                return
            yield item

    def watch(self, alive: Callable[[], bool], poll_s: float = 0.5) -> Iterator[int]:
        """As iterating the handle, but `alive()` is asked every `poll_s` seconds, whether tokens come or
        not (queued, prefilling, or a whole answer gathered for a reply sent at the end); when it says
        False the request is cancelled and ConnectionResetError raised: the client that wanted it is gone."""
        checked = time.monotonic()
        while not self._cancelled.is_set():
            try:
                item = self._events.get(timeout=poll_s)
            except queue.Empty:
                item = None
            if time.monotonic() - checked >= poll_s:
                if not alive():
                    self.cancel()
                    raise ConnectionResetError("the client went away before the answer was complete")
                checked = time.monotonic()
            if item is None:
                continue
            if item is _END:
                self._events.put(_END)
                if self.error is not None:
                    raise self.error
                return
            yield item

    def tokens(self, timeout: float | None = None) -> list[int]:
        """All the tokens, once the request is finished (for callers that do not stream)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        return list(self)

    def cancel(self) -> None:
        """End the request: it leaves the queue at once, or the batch at the next step boundary."""
        if not self._done.is_set():
            self._cancelled.set()
            self._scheduler._cancelled(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # the worker's side
    def _emit(self, token: int) -> None:
        self._events.put(token)

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._done.is_set():
            self.error = error
            self._done.set()
            self._events.put(_END)


@dataclass(order=True)
class _Queued:
    key: tuple[float, int]  # (deadline or +inf, arrival number)
    prompt: list[int] = field(compare=False)
    handle: Handle = field(compare=False)
    arrived: float = field(compare=False)
    need: int = field(compare=False, default=0)  # positions it may come to hold (prompt + max_tokens)


@dataclass
class _Row:
    """A request in the batch: its sampling state and the positions it holds in the cache."""

    handle: Handle
    params: SamplingParams
    rng: np.random.Generator
    history: list[int]  # prompt + tokens made; its last token is the one to feed next
    stops: set[int]
    made: int = 0
    cached: int = 0  # positions this row holds in the batch (the scheduler's rows are in slot order)
    job: PrefillJob | None = None  # its prompt's prefill while the prompt is not complete
    need: int = 0  # positions it may come to hold: prompt + max_tokens, within the context window

    def take(self, logits: np.ndarray, limit: int) -> bool:
        """Sample the next token and emit it; True while the row goes on (as runtime.generate.generate)."""
        token = sample(logits, self.params, self.rng, self.history)
        if token in self.stops:
            return False
        self.handle._emit(token)
        self.history.append(token)
        self.made += 1
        return self.made < self.params.max_tokens and len(self.history) < limit


@dataclass(frozen=True)
class SchedulerStats:
    active: int  # rows in the batch
    queued: int  # requests waiting to be admitted
    max_batch: int
    window_ms: float
    max_kv_bytes: int | None = None
    kv_waits: int = 0  # admissions held back so far because the KV would not fit max_kv_bytes


class Scheduler:
    """Owns `engine` on one worker thread; see the module docstring.

    `on_step(batch_size)` is called after each batched decode step (on the worker thread) and
    `on_load(stats)` whenever the number of active or queued requests changes (on the worker
    thread, or on the thread that submits or cancels); both are for metrics and must be quick.
    `prefix_cache` (a runtime.prefix_cache.PrefixCache bound to this model, or None) is handed to
    `prefill_cached`: a prompt that shares a cached prefix prefills only the rest.
    `start=False` leaves the worker stopped until `start()` (tests queue requests first).
    `max_kv_bytes` bounds the KV the admitted requests may come to hold (None: no bound; see step 2 of
    the module docstring); `on_kv_wait()` is called (on the worker, holding the lock: be quick) each time
    a request is first held back by it.
    """

    def __init__(self, engine, max_batch: int = 8, window_ms: float = 0.0, *, prefix_cache=None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, on_step: Callable[[int], None] | None = None,
                 on_load: Callable[[SchedulerStats], None] | None = None, start: bool = True,
                 name: str = "edgeglm-batching", max_kv_bytes: int | None = None,
                 on_kv_wait: Callable[[], None] | None = None):
        self.engine, self.prefix_cache = engine, prefix_cache
        self.on_step, self.on_load = on_step or (lambda n: None), on_load or (lambda s: None)
        self.on_kv_wait = on_kv_wait or (lambda: None)
        self.max_batch, self.window_ms = _check_limits(max_batch, window_ms)
        self.prefill_chunk = _check_chunk(prefill_chunk)
        self.max_kv_bytes = _check_kv(max_kv_bytes)
        self._per_token = kv_bytes_per_token(engine)
        self._kv_waits = 0
        self._kv_waiting: _Queued | None = None  # the queued request last held back (counted once)
        self._empty_batch: DecodeBatch | None = None  # sizes the first rows' KV while no batch exists
        self._cond = threading.Condition()
        self._queue: list[_Queued] = []
        self._arrivals = itertools.count()
        self._rows: list[_Row] = []  # self._rows[i] is the batch's slot i
        self._prefills: list[_Row] = []  # admitted, their prompts not complete yet (admission order)
        self._batch: DecodeBatch | None = None
        self._closing = False
        self._abort: str | None = None
        self._calls: list[tuple[Callable, Future]] = []  # work to run on the worker between steps
        self._stopped = False  # the worker has ended: `call` runs inline
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if start:
            self.start()

    # --- the callers' side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> Handle:
        """Queue a request; `deadline` is a `time.monotonic()` time, earlier ones are admitted first."""
        limit = self.engine.arch.max_positions
        if not prompt_ids:
            raise RequestError("prompt is empty: give at least one token of text")
        if len(prompt_ids) >= limit:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens; the model's context window is {limit} tokens, "
                               f"so a prompt may have at most {limit - 1} (one position is kept for the first new "
                               "token): shorten the prompt")
        handle = Handle(self, params, deadline)
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the scheduler is closed (the model was swapped or the agent is stopping); "
                                      "send the request again")
            key = (math.inf if deadline is None else float(deadline), next(self._arrivals))
            need = min(len(prompt_ids) + params.max_tokens, limit)
            heapq.heappush(self._queue, _Queued(key, list(prompt_ids), handle, time.monotonic(), need))
            self.on_load(self._stats())
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], object], timeout: float | None = None):
        """Run `fn()` with the engine to itself (on the worker, between two decode steps); its result
        or exception. Once the worker has ended, `fn` runs on the caller's thread."""
        future: Future = Future()
        with self._cond:
            inline = self._stopped
            if not inline:
                self._calls.append((fn, future))
                self._cond.notify_all()
        if inline:
            return fn()
        return future.result(timeout)

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)

    def configure(self, max_batch: int | None = None, window_ms: float | None = None,
                  prefill_chunk: int | None = None, max_kv_bytes: int | None | object = ...) -> None:
        """Change the limits live; they apply at the next step boundary (`max_kv_bytes=None`: no bound;
        left out: unchanged)."""
        with self._cond:
            if max_kv_bytes is not ...:
                self.max_kv_bytes = _check_kv(max_kv_bytes)
            self.max_batch, self.window_ms = _check_limits(
                self.max_batch if max_batch is None else max_batch,
                self.window_ms if window_ms is None else window_ms)
            if prefill_chunk is not None:
                self.prefill_chunk = _check_chunk(prefill_chunk)
            self._cond.notify_all()

    def kv_held_bytes(self, timeout: float | None = 30.0) -> int:
        """KV bytes the batch holds in host memory now (read on the worker between two steps)."""
        return self.call(lambda: self._batch.host_kv_bytes() if self._batch is not None else 0, timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """After `close()`: wait for the worker to end (what it ran finished); True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> SchedulerStats:
        with self._cond:
            return self._stats()

    def close(self, error: str | None = None, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. Without `error`, finish those queued and running first; with it, end
        them all at the next step boundary with SchedulerClosed(error). `wait`: join the worker."""
        with self._cond:
            self._closing = True
            if error is not None:
                self._abort = error
            self._cond.notify_all()
        if wait and self._thread.is_alive():
            self._thread.join(timeout)

    def _cancelled(self, handle: Handle) -> None:
        with self._cond:
            for i, q in enumerate(self._queue):
                if q.handle is handle:
                    self._queue.pop(i)
                    heapq.heapify(self._queue)
                    handle._finish()
                    self.on_load(self._stats())
                    break
            self._cond.notify_all()

    def _stats(self) -> SchedulerStats:
        # rows that ended in the last step leave the batch at the next boundary; they are no longer in flight
        active = sum(1 for r in list(self._rows) if not r.handle.done) + len(self._prefills)
        return SchedulerStats(active, len(self._queue), self.max_batch, self.window_ms, self.max_kv_bytes,
                              self._kv_waits)

    # --- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    self._run_calls()
                    if not self._boundary():
                        return
                    if self._rows:
                        self._step()
                except Exception as exc:  # never let the worker die: fail the batch, serve on
                    log.exception("batching worker: unexpected error")
                    self._fail_rows(EngineFailed(f"the batching worker failed ({exc}); the request was ended"))
        finally:
            with self._cond:
                self._stopped = True
            self._run_calls()  # those queued before the worker ended

    def _boundary(self) -> bool:
        """Drop ended rows, admit queued requests into the batch; False when the worker should stop."""
        changed = self._drop_ended()
        if changed:  # before _admissions, which may wait for work
            with self._cond:
                self.on_load(self._stats())
        for item in self._admissions():
            try:
                if self._admit(item):
                    changed = True
            except Exception as exc:  # this request only; the others taken with it are still admitted
                log.warning("batching: admitting a request failed: %s", exc)
                item.handle._finish(EngineFailed(f"the request could not be started ({exc}); "
                                                 "the request was ended, others go on"))
        with self._cond:
            if self._abort is not None:
                self._end_all(SchedulerClosed(self._abort))
                return False
        if self._prefills and self._prefill_chunks():
            changed = True
        with self._cond:
            if self._closing and not self._rows and not self._queue and not self._prefills:
                return False
        if changed:
            with self._cond:
                self.on_load(self._stats())
        return True

    def _drop_ended(self) -> bool:
        """Remove cancelled and finished rows from the batch (highest slot first, so each move is valid)
        and cancelled requests from the prefills."""
        gone = [r for r in self._prefills if r.handle.cancelled]
        for r in gone:
            r.handle._finish()
        self._prefills = [r for r in self._prefills if not r.handle.cancelled]
        ended = [i for i, r in enumerate(self._rows) if r.handle.cancelled or r.handle.done]
        for i in reversed(ended):
            if self._rows[i].handle.cancelled:
                self._rows[i].handle._finish()
            moved = self._batch.remove(i)
            if moved is not None:
                self._rows[i] = self._rows[moved]
            self._rows.pop()
        if not self._rows:
            self._batch = None
        return bool(ended or gone)

    def _admissions(self) -> list[_Queued]:
        """Requests to admit now, earliest deadline first; waits while idle (for work, or the window)."""
        with self._cond:
            while not self._rows and not self._prefills and not self._queue and not self._closing and not self._calls:
                self._cond.wait()
            if not self._rows and not self._prefills and self._queue and self.window_ms > 0 and not self._closing:
                until = min(q.arrived for q in self._queue) + self.window_ms / 1000
                while len(self._queue) < self.max_batch and not self._closing and time.monotonic() < until:
                    self._cond.wait(max(0.0, until - time.monotonic()))
            if self._abort is not None:
                return []
            taken, held = [], len(self._rows) + len(self._prefills)
            needs = [r.need for r in self._rows + self._prefills if not r.handle.done]
            while self._queue and held + len(taken) < self.max_batch:
                head = self._queue[0]
                if self.max_kv_bytes is not None and needs and self._kv_bytes(needs + [head.need]) > \
                        self.max_kv_bytes:
                    if self._kv_waiting is not head:  # counted (and logged) once per request held back
                        self._kv_waiting = head
                        self._kv_waits += 1
                        self.on_kv_wait()
                        log.info("batching: a request of up to %d positions waits: with the %d running it could "
                                 "take %.3g MiB of KV, over batching.max_kv_mb = %.3g", head.need, len(needs),
                                 self._kv_bytes(needs + [head.need]) / 2**20, self.max_kv_bytes / 2**20)
                    break
                taken.append(heapq.heappop(self._queue))
                needs.append(head.need)
            if taken:
                self.on_load(SchedulerStats(held + len(taken), len(self._queue), self.max_batch, self.window_ms,
                                            self.max_kv_bytes, self._kv_waits))
            return taken

    def _kv_bytes(self, needs: list[int]) -> int:
        """The most KV the batch can come to hold with rows growing to `needs` positions: its own sizing rules
        from the buffers it has now (a batch keeps grown buffers until a quarter of them would do)."""
        batch = self._batch
        if batch is None and hasattr(self.engine, "new_batch"):
            batch = self._empty_batch = self._empty_batch or self.engine.new_batch()
        bound = getattr(batch, "kv_bound", None)
        return bound(needs, self._per_token) if bound is not None else \
            kv_estimate(needs, self._per_token, self.engine.arch)

    def _admit(self, item: _Queued) -> bool:
        """Queue one request's prefill (it runs in `_prefill_chunks`); False if it already ended."""
        handle, params = item.handle, item.handle.params
        handle.admitted_at = time.monotonic()
        if handle.cancelled:
            handle._finish()
            return False
        row = _Row(handle, params, np.random.default_rng(params.seed), TokenHistory(item.prompt),
                   set(params.stop_token_ids) | set(self.engine.arch.eos_token_ids), need=item.need)
        row.job = PrefillJob(self.engine, item.prompt, self.prefix_cache)
        self._prefills.append(row)
        return True

    def _prefill_chunks(self) -> bool:
        """Run admitted prompts, oldest first. While no row decodes, a prompt runs whole; once rows
        decode (from before this boundary, or a prompt that just joined), at most `prefill_chunk`
        more prompt tokens run before the next step, so the rows decoding wait for one chunk per
        step rather than for whole prompts. A prompt that completes samples its first token and
        joins the batch. True if the set of requests changed."""
        changed, budget = False, None
        chunked = self.prefill_chunk and not getattr(self.engine, "swaps_state", False)  # see OpenVinoEngine
        while self._prefills:
            if self._rows and chunked:
                budget = self.prefill_chunk if budget is None else budget
                if budget <= 0:
                    break
            row = self._prefills[0]
            before = row.job.done
            try:
                complete = row.job.advance(budget)
            except Exception as exc:
                self._prefills.pop(0)
                self._prefill_failed(row, exc)
                changed = True
                continue
            if budget is not None:
                budget -= row.job.done - before
            if not complete:
                break
            self._prefills.pop(0)
            self._join(row)
            changed = True
        return changed

    def _prefill_failed(self, row: _Row, exc: BaseException) -> None:
        n = len(row.history)
        log.warning("batching: prefill of a %d-token prompt failed: %s", n, exc)
        row.handle._finish(EngineFailed(f"the engine failed on the {n}-token prompt ({exc}); "
                                        "the request was ended, others go on"))

    def _join(self, row: _Row) -> None:
        """A complete prompt: sample its first token and add its KV to the batch (unless it ended)."""
        job, row.job = row.job, None
        row.cached = len(row.history)
        if self._advance(row, job.logits, self.engine.arch.max_positions) is None:
            return
        if self._batch is None:
            self._batch = self.engine.new_batch()
        try:
            self._batch.add(CacheRow(job.cache, 0, row.cached))  # its KV copied into the batch's next slot
        except Exception as exc:
            log.warning("batching: adding a %d-position row to the batch failed: %s", row.cached, exc)
            row.handle._finish(EngineFailed(f"the engine could not add the request to the batch ({exc}); "
                                            "the request was ended, others go on"))
            if not self._rows:
                self._batch = None
            return
        self._rows.append(row)

    def _advance(self, row: _Row, logits: np.ndarray, limit: int) -> _Row | None:
        try:
            going = row.take(logits, limit)
        except Exception as exc:  # e.g. NaN logits: this row only
            row.handle._finish(EngineFailed(f"sampling failed ({exc}); the request was ended"))
            return None
        if not going:
            row.handle._finish()
            return None
        return row

    def _step(self) -> None:
        """One batched decode step and per-row sampling."""
        rows, limit = self._rows, self.engine.arch.max_positions
        try:
            logits = self._batch.step(np.array([r.history[-1] for r in rows], np.int64))
        except Exception as exc:
            log.warning("batching: a decode step of %d row(s) failed: %s", len(rows), exc)
            self._fail_rows(EngineFailed(f"the engine failed in a decode step of a batch of {len(rows)} ({exc}); "
                                         "the request was ended, others go on"))
            return
        self.on_step(len(rows))
        for r, row_logits in zip(rows, logits):
            r.cached += 1
            self._advance(r, row_logits, limit)  # a row that ends is finished here, dropped at the boundary

    def _fail_rows(self, error: BaseException) -> None:
        for r in self._rows:
            r.handle._finish(error)
        self._rows, self._batch = [], None
        with self._cond:
            self.on_load(self._stats())

    def _end_all(self, error: BaseException) -> None:
        """(holding the lock) End every queued and active request with `error`."""
        for q in self._queue:
            q.handle._finish(error)
        for r in self._rows + self._prefills:
            r.handle._finish(error)
        self._queue, self._rows, self._prefills, self._batch = [], [], [], None
        self.on_load(self._stats())


def _check_limits(max_batch, window_ms) -> tuple[int, float]:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch={max_batch!r} is invalid: must be an integer in [1, {MAX_BATCH_LIMIT}]")
    if isinstance(window_ms, bool) or not isinstance(window_ms, (int, float)) or not 0 <= window_ms <= MAX_WINDOW_MS:
        raise ValueError(f"window_ms={window_ms!r} is invalid: must be a number of milliseconds in "
                         f"[0, {MAX_WINDOW_MS:g}]")
    return max_batch, float(window_ms)


def _check_kv(max_kv_bytes) -> int | None:
    if max_kv_bytes is None:
        return None
    if isinstance(max_kv_bytes, bool) or not isinstance(max_kv_bytes, int) or max_kv_bytes < 1:
        raise ValueError(f"max_kv_bytes={max_kv_bytes!r} is invalid: must be a number of bytes >= 1, or None "
                         "(no bound)")
    return max_kv_bytes


def _check_chunk(prefill_chunk) -> int:
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or \
            not 0 <= prefill_chunk <= MAX_PREFILL_CHUNK:
        raise ValueError(f"prefill_chunk={prefill_chunk!r} is invalid: must be a number of prompt tokens in "
                         f"[0, {MAX_PREFILL_CHUNK}] (0: each prompt whole)")
    return prefill_chunk
