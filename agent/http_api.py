"""The local OpenAI-compatible HTTP API, on the standard library's `http.server`.

    POST /v1/completions, /v1/chat/completions   OpenAI-compatible; streaming as server-sent events
    GET  /v1/models[/ID]                         the loaded model, as `name-version`
    GET  /healthz                                the process answers
    GET  /readyz                                 200 once a verified model passed its golden check
                                                 (?no_model_ok=1: also while no model is installed yet)
    GET  /metrics                                Prometheus text (agent.metrics.ServingMetrics)

No web framework: the edge install stays lean. One engine, owned by a continuous-batching
scheduler (runtime/batching.py): concurrent requests are decoded together, up to
`batching.max_batch` at a time, the rest queued; requests beyond `http.max_concurrent`
(running + queued) get 429. Errors are OpenAI's
JSON shape (`{"error": {"message", "type", "param", "code"}}`); a client never sees a traceback.
docs/http-api.md has the details and examples.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import logging
import signal
import io
import ipaddress
import math
import select
import socket
import sys
import threading
import time
import functools
import gc
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from agent import DEVICE_HELP, __version__
from agent.config import BatchingSettings, CacheSettings, HttpSettings, SamplingSettings
from agent.errors import ServeError
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServingMetrics
from agent.openai_compat import (ApiError, ChatShape, CompletionShape, GenerationRequest, Outcome, chat_request,
                                 check_model_field, completion_request, generate_text, model_card, model_id,
                                 prompt_ids, reject_constant, with_special_stops)
from agent.telemetry import serving_label
from runtime.batching import AUTO_KV_DIVISOR, EngineFailed, Handle, Scheduler, SchedulerClosed, SchedulerStats
from runtime.errors import RequestError
from runtime.generate import SamplingParams
from runtime.prefix_cache import release_freed_memory

log = logging.getLogger("edgeglm.http")

AUTO_AGAIN_WAIT_S = 600.0  # how long a model switch waits for the old model's requests before measuring "auto" again
SOCKET_TIMEOUT_S = 60.0  # an idle keep-alive connection, or a client that stops reading, is dropped after this
# beyond http.max_connections: a few more connections, each for one GET/HEAD of these paths (the kubelet's probes,
# a Prometheus scrape), read within PROBE_TIMEOUT_S; anything else is refused as before
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
PROBE_RESERVE = 4
PROBE_TIMEOUT_S = 2.0
INFERENCE_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})


def kv_budget_bytes(max_kv_mb, auto: int | None = None) -> int | None:
    """`batching.max_kv_mb` in bytes; "auto": `auto` (what `auto_kv_budget()` said when the model was set)."""
    return auto if max_kv_mb == "auto" else max(1, int(max_kv_mb * 2**20))


def auto_kv_budget(held: int = 0, engine=None) -> int | None:
    """A third of what the process can still take now (the model loaded: MemAvailable, or less under a
    cgroup limit), plus `held` (KV bytes the serving batch holds now, part of the budget); None (no bound)
    where the system does not say. Where `engine` keeps the KV in GPU memory (the CUDA and TensorRT
    providers), a third of the GPU memory still free instead (host memory there says nothing of the GPU's)."""
    from runtime.probe import gpu_memory, probe_memory

    if kv_on_gpu(engine):
        gpu = gpu_memory()
        if gpu is not None:
            return max(1, (gpu[0] + held) // AUTO_KV_DIVISOR)
    budget = probe_memory().budget_bytes()
    return None if budget is None else max(1, (budget + held) // AUTO_KV_DIVISOR)


def kv_on_gpu(engine) -> bool:
    return getattr(engine, "kv_memory", None) == "cuda memory"


# --- the server ------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Load:
    """What one scheduler reported last (active, queued). During a model switch the outgoing scheduler
    drains while the new one serves: the gauges are the sums, or the last one to report hid the other."""

    active: int = 0
    queued: int = 0
    retired: bool = False  # no longer the serving scheduler: forgotten once it reports nothing left


@dataclass
class Slot:
    """One of the `http.max_concurrent` places: the ready model and the scheduler that runs it."""

    model: object
    scheduler: Scheduler

    def submit(self, ids: list[int], params: SamplingParams, deadline: float | None = None) -> Handle:
        """`deadline`: a time.monotonic() time; requests with one are admitted first, earliest first."""
        return self.scheduler.submit(ids, params, deadline=deadline)


def stream_tokens(handle: Handle, alive=None):
    """The handle's tokens; the scheduler's errors as ApiErrors. Leaving early cancels the request, and so
    does `alive()` turning False (the client disconnected: see Handle.watch)."""
    try:
        yield from (handle if alive is None else handle.watch(alive))
    except EngineFailed as exc:  # the engine's own text (paths, provider messages) stays in the log
        log.error("HTTP API: generation failed: %s", exc)
        # an engine failure is not one a retry fixes: the openai client retries a 5xx twice unless told not to
        raise ApiError(500, "generation failed; the agent log has the details", type="server_error",
                       headers={"x-should-retry": "false"}) from None
    except SchedulerClosed as exc:
        raise ApiError(503, str(exc), type="server_error", headers={"Retry-After": "1"}) from None
    finally:
        handle.cancel()


class ApiServer:
    """The local HTTP API. `start()` serves on a background thread; `shutdown(deadline)` drains and stops.

    `set_model` installs (or swaps) the model and its golden-check result; until a model passed
    its golden check, /readyz and the inference endpoints answer 503 with the reason.
    """

    def __init__(self, http: HttpSettings, sampling: SamplingSettings, metrics: ServingMetrics | None = None,
                 window=None, batching: BatchingSettings | None = None):
        self.http, self.sampling = http, sampling
        self.batching = batching or BatchingSettings()
        self.metrics = metrics or ServingMetrics()
        self.window = window  # an agent.telemetry.LatencyWindow, or None
        self._state = threading.Condition()  # guards everything below
        self._model = self._golden = None
        self._scheduler: Scheduler | None = None  # owns the model's engine
        self._load: _Load | None = None  # what self._scheduler reported last
        self._loads: set[_Load] = set()  # it and the draining ones'; guarded by _loads_lock (taken on their workers)
        self._loads_lock = threading.Lock()
        self.prefix_cache = None  # a runtime.prefix_cache.PrefixCache for the next model's scheduler, or None
        self._admitted = self._active = 0
        self._kv_auto: int | None = None  # batching.max_kv_mb "auto" in bytes, measured when the model was set
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()  # no new inference
        self._abort = threading.Event()  # cut generations still running at the shutdown deadline
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # model and readiness
    def set_model(self, model, golden) -> None:
        """Serve `model` (None: nothing). A new model gets its own scheduler; the old one's requests finish."""
        retired = None
        with self._state:
            old = self._scheduler if model is not self._model else None
            if model is not self._model:
                self._bind_prefix_cache(model)
                if model is not None:
                    self._kv_auto = auto_kv_budget(engine=model.engine)
                    if self.batching.max_kv_mb == "auto":
                        log.info("batching.max_kv_mb = \"auto\": %s", "no bound (the memory available is not "
                                 "known)" if self._kv_auto is None else f"{self._kv_auto / 2**20:.0f} MiB of KV (a "
                                 + ("third of the GPU memory still free)" if kv_on_gpu(model.engine) else
                                    "third of the memory this process can still take)"))
                retired, self._load = self._load, None if model is None else _Load()
                self._scheduler = None if model is None else Scheduler(
                    model.engine, self.batching.max_batch, self.batching.window_ms, prefix_cache=self.prefix_cache,
                    prefill_chunk=self.batching.prefill_chunk,
                    on_step=self._on_step, on_load=functools.partial(self._on_load, self._load),
                    max_kv_bytes=kv_budget_bytes(self.batching.max_kv_mb, self._kv_auto),
                    on_kv_wait=self.metrics.kv_waits.inc)
                # no model: no bound applies (the old model's stayed on /metrics)
                self.metrics.kv_bound.set(0 if model is None else self._scheduler.max_kv_bytes or 0)
            self._model, self._golden = model, golden
        if retired is not None:
            self._retire_load(retired)
        if old is not None:
            old.close(wait=False)  # drains what it runs, then its worker ends
            if model is not None:  # "auto" was measured with the outgoing model still loaded: again once it is gone
                threading.Thread(target=self._measure_kv_auto_again, args=(weakref.ref(old), self._scheduler),
                                 name="edgeglm-kv-auto", daemon=True).start()

    def _measure_kv_auto_again(self, old_ref, new: Scheduler) -> None:
        """After a model switch: once the old scheduler has drained (its engine let go), measure
        batching.max_kv_mb "auto" again and apply it; the value measured at the switch counted the
        outgoing model's memory as taken, a lower bound that stayed until the next restart."""
        old = old_ref()
        drained = old is None or old.wait_closed(AUTO_AGAIN_WAIT_S)
        del old
        if not drained:
            return
        gc.collect()
        release_freed_memory()
        with self._state:
            if self._scheduler is not new:
                return
        try:
            auto = auto_kv_budget(new.kv_held_bytes(), new.engine)
        except Exception as exc:  # the scheduler closed meanwhile (another switch): nothing to apply
            log.debug("batching.max_kv_mb \"auto\" not measured again: %s", exc)
            return
        with self._state:
            if self._scheduler is not new:
                return
            self._kv_auto = auto
            if self.batching.max_kv_mb == "auto":
                new.configure(max_kv_bytes=auto)
                self.metrics.kv_bound.set(auto or 0)
                log.info("batching.max_kv_mb = \"auto\": %s once the previous model was let go",
                         "no bound" if auto is None else f"{auto / 2**20:.0f} MiB of KV")

    def on_engine(self, model, fn):
        """Run `fn()` with `model`'s engine to itself: through its scheduler (between two decode steps)
        while it serves, directly when it does not (the OTA self-test times the serving model so)."""
        with self._state:
            scheduler = self._scheduler if model is self._model else None
        return scheduler.call(fn) if scheduler is not None else fn()

    def set_prefix_cache(self, cache) -> None:
        """Use `cache` (a runtime.prefix_cache.PrefixCache, or None) from the next model on; its
        counters are exported on /metrics. The agent sets it once and reconfigures it live."""
        with self._state:
            self.prefix_cache = cache
            self._bind_prefix_cache(self._model)
        if cache is not None:
            self.metrics.collectors.append(lambda: self.metrics.observe_prefix_cache(cache.stats()))

    def _bind_prefix_cache(self, model) -> None:
        """KV of another model must never be served: the cache follows the model (and its engine)."""
        if self.prefix_cache is not None and model is not None:
            self.prefix_cache.bind(prefix_cache_key(model), model.engine)

    def set_batching(self, batching: BatchingSettings) -> None:
        """Apply batching limits live (from the desired config); the batch adapts at the next step."""
        with self._state:
            self.batching, scheduler = batching, self._scheduler
        if scheduler is not None:
            scheduler.configure(max_batch=batching.max_batch, window_ms=batching.window_ms,
                                prefill_chunk=batching.prefill_chunk,
                                max_kv_bytes=kv_budget_bytes(batching.max_kv_mb, self._kv_auto))
            self.metrics.kv_bound.set(scheduler.max_kv_bytes or 0)

    def _on_step(self, batch_size: int) -> None:
        self.metrics.batch_size.observe(batch_size)

    def _on_load(self, load: _Load, stats: SchedulerStats) -> None:
        """One scheduler's report (on its worker or a submitting thread, holding its lock: quick)."""
        with self._loads_lock:
            load.active, load.queued = stats.active, stats.queued
            self._loads.add(load)
            self._publish_loads(load)

    def _retire_load(self, load: _Load) -> None:
        with self._loads_lock:
            load.retired = True
            self._publish_loads(load)

    def _publish_loads(self, changed: _Load) -> None:
        """(holding _loads_lock) The gauges as the sums over the schedulers; a drained old one is dropped."""
        if changed.retired and not changed.active and not changed.queued:
            self._loads.discard(changed)
        self.metrics.in_flight.set(sum(load.active for load in self._loads))
        self.metrics.queued.set(sum(load.queued for load in self._loads))

    def readiness(self, no_model_ok: bool = False) -> tuple[bool, str]:
        """(ready, reason). `no_model_ok` (`/readyz?no_model_ok=1`): a box with no model installed at all, waiting
        for its first update, counts as ready (the agent's server knows; this one never has such a box)."""
        with self._state:
            model, golden = self._model, self._golden
        if self._stopping.is_set():
            return False, "the agent is shutting down"
        if model is None:
            return False, "no model is loaded"
        if golden is None:
            return False, f"model {model_id(model)} is loaded; its golden check has not finished"
        if not golden.passed:
            return False, f"model {model_id(model)} failed its golden check: {golden.describe()}"
        return True, f"model {model_id(model)} on {model.backend}; golden check: {golden.describe()}"

    def current_model(self):
        with self._state:
            return self._model

    @contextmanager
    def engine_slot(self):
        """Hold one of the `http.max_concurrent` places for one generation; yields a `Slot` (the ready
        model and its scheduler). 429 when all places are taken, 503 if no model is ready or the agent stops."""
        with self._state:
            # stopping: 503, the place full or not (a client told to retry in 1 s retried a box going away)
            if self._admitted >= self.http.max_concurrent and not self._stopping.is_set():
                raise ApiError(429, f"{self._admitted} requests are running or queued, the limit "
                               f"(http.max_concurrent) is {self.http.max_concurrent}; retry later",
                               type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self._admitted += 1
        try:
            ready, reason = self.readiness()
            if not ready:
                raise ApiError(503, f"not ready to generate: {reason}", type="server_error",
                               code="model_not_ready", headers={"Retry-After": "5"})
            with self._state:
                slot = Slot(self._model, self._scheduler)
            yield slot
        finally:
            with self._state:
                self._admitted -= 1

    # lifecycle
    def start(self) -> None:
        try:
            self._httpd = _HttpServer((self.http.host, self.http.port), self)
        except OSError as exc:
            raise ServeError(f"the HTTP API cannot listen on {self.http.host}:{self.http.port}: {exc.strerror or exc}; "
                             f"set http.host/http.port (EDGEGLM_HTTP__PORT) or stop what uses the port") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"edgeglm-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("HTTP API listening on %s", self.url)
        if self.http.api_key is None and not _loopback(self.http.host):
            log.warning("the HTTP API listens on %s without an API key: anyone who reaches port %d can generate; "
                        "set http.api_key (EDGEGLM_HTTP__API_KEY) or bind http.host to 127.0.0.1 (/healthz, /readyz "
                        "and /metrics stay open with a key too: firewall the port where they should not be read)", self.http.host, self.port)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the HTTP API is not started: call start() first")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0] if self._httpd else self.http.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def shutdown(self, deadline: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish for up to `deadline` seconds, then cut them."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        with self._state:
            if not self._state.wait_for(lambda: self._active == 0, timeout=deadline):
                log.warning("HTTP API: %d request(s) still running after %.1f s; cutting them", self._active, deadline)
                self._abort.set()
                if self._scheduler is not None:  # queued ones have no token at which to be cut
                    self._scheduler.close(error="the agent is shutting down; the answer was cut", wait=False)
                self._state.wait_for(lambda: self._active == 0, timeout=max(1.0, deadline))
            connections, scheduler = list(self._connections), self._scheduler
        if scheduler is not None:
            scheduler.close(wait=False)
        for conn in connections:  # idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None

    def _connection(self, conn: socket.socket, open: bool) -> None:
        with self._state:
            (self._connections.add if open else self._connections.discard)(conn)

    @contextmanager
    def _request(self):
        """Counts a request in progress, for shutdown's drain."""
        with self._state:
            self._active += 1
        try:
            yield
        finally:
            with self._state:
                self._active -= 1
                self._state.notify_all()


def _loopback(host: str) -> bool:
    """Whether `host` (http.host) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to is reachable from elsewhere as far as we know
        return False


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # shutdown() drains requests itself, with a deadline

    def __init__(self, address: tuple[str, int], api: ApiServer):
        self.api = api
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # one thread per connection: bounded, so that clients holding connections open (slow or idle ones)
        # cannot take every thread and the memory they need; beyond the bound a connection gets a 503 at once,
        # unless it asks a probe path and a place of the small reserve kept for those is free
        self._connections = threading.BoundedSemaphore(api.http.max_connections)
        self._reserve = threading.BoundedSemaphore(PROBE_RESERVE)
        self._lingering = _Lingering()
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        super().server_close()
        self._lingering.close()

    def process_request(self, request, client_address) -> None:
        if self._connections.acquire(blocking=False):
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._connections.release()
                raise
            return
        # at the cap (idle keep-alive clients can hold every place for SOCKET_TIMEOUT_S): the kubelet's probes
        # got the 503 too, and a failed liveness probe restarted a healthy agent, cutting every generation
        if self._reserve.acquire(blocking=False):
            try:
                threading.Thread(target=self._serve_reserved, args=(request, client_address),
                                 name=f"edgeglm-http-probe-{self.server_address[1]}", daemon=True).start()
            except BaseException:
                self._reserve.release()
                raise
            return
        self.count_refusal(client_address)
        try:  # answered here, on the accepting thread: a small write, then close
            request.sendall(self.refusal_bytes())
        except OSError:
            pass
        self.let_go(request)

    def _serve_reserved(self, request, client_address) -> None:
        refused = True
        try:
            refused = _ReserveHandler(request, client_address, self).refused
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if refused:
                self.let_go(request)
            else:
                self.shutdown_request(request)
            self._reserve.release()

    def refusal(self) -> ApiError:
        """The answer to a connection beyond http.max_connections."""
        return ApiError(503, f"{self.api.http.max_connections} connections are open, the limit "
                             "(http.max_connections); retry later", type="server_error",
                        code="too_many_connections", headers={"Retry-After": "1"})

    def refusal_bytes(self) -> bytes:
        """The refusal as a whole HTTP answer, written without a handler (no request was read)."""
        body = json.dumps(self.refusal().body()).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\nServer: %s\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (_Handler.server_version.encode(), len(body), body))

    def count_refusal(self, client_address) -> None:
        self.api.metrics.connections_refused.inc()
        log.warning("HTTP API: %d connections are open (http.max_connections); refused one from %s",
                    self.api.http.max_connections, client_address[0])

    def let_go(self, request) -> None:
        """Close a refused connection (its answer written) once its client is done sending."""
        if not self._lingering.take(request):  # too many already: dropped and closed at once
            _drop_arrived(request)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address) -> None:  # a connection failed outside a request
        log.debug("HTTP API: connection from %s failed", client_address, exc_info=True)


class _Lingering:
    """Refused connections (the 503 of http.max_connections) kept open for reading after their answer: a
    client still sending a request body gets its writes accepted and reads the 503, where closing at once
    reset the connection under it (BrokenPipe / ConnectionReset instead of the answer). One thread for all
    of them, started when first needed; each socket is read and dropped until the client closes, sends
    nothing for IDLE_S, or LIMIT_BYTES or DEADLINE_S are reached; beyond MAX_SOCKETS they are closed at once
    as before (a flood of refused connections must not hold more than that)."""

    MAX_SOCKETS, IDLE_S, DEADLINE_S, LIMIT_BYTES = 32, 1.0, 10.0, 64 << 20

    def __init__(self):
        self._lock = threading.Lock()
        self._socks: dict[socket.socket, list[float]] = {}  # socket -> [deadline, idle deadline, bytes left]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._closed = False

    def take(self, sock: socket.socket) -> bool:
        """Keep `sock` (its answer written) until its client is done sending; False when full or closed."""
        with self._lock:
            if self._closed or len(self._socks) >= self.MAX_SOCKETS:
                return False
            try:
                sock.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees the end of it
                sock.setblocking(False)
            except OSError:
                return False
            now = time.monotonic()
            self._socks[sock] = [now + self.DEADLINE_S, now + self.IDLE_S, self.LIMIT_BYTES]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgeglm-http-linger", daemon=True)
                self._thread.start()
        self._wake_w.send(b"x")
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = list(self._socks), {}
        for sock in socks:
            sock.close()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                socks = list(self._socks)
            try:
                readable, _, _ = select.select([self._wake_r, *socks], [], [], 0.2)
            except (OSError, ValueError):  # closed meanwhile (close())
                continue
            now = time.monotonic()
            done = []
            for sock in readable:
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    continue
                state = self._socks.get(sock)
                if state is None:
                    continue
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                state[1], state[2] = now + self.IDLE_S, state[2] - len(data)
                if not data or state[2] <= 0:
                    done.append(sock)
            with self._lock:
                done += [s for s, (deadline, idle, _) in self._socks.items() if now > deadline or now > idle]
                for sock in done:
                    if self._socks.pop(sock, None) is not None:
                        sock.close()
        self._wake_r.close()
        self._wake_w.close()


def _drop_arrived(sock: socket.socket) -> None:
    """Read and drop what the client already sent, without waiting: a socket closed with unread bytes is
    reset, and the reset can destroy the answer just written before the client reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(128):  # at most 8 MiB
            if not sock.recv(1 << 16):
                break
    except OSError:  # nothing more has arrived (EAGAIN), or the client is gone
        pass


# route -> method -> handler method name
ROUTES = {
    "/healthz": {"GET": "healthz"},
    "/readyz": {"GET": "readyz"},
    "/metrics": {"GET": "metrics"},
    "/v1/models": {"GET": "models"},
    "/v1/models/{model}": {"GET": "model"},
    "/v1/completions": {"POST": "completions"},
    "/v1/chat/completions": {"POST": "chat_completions"},
}


class _DeadlineReader(io.RawIOBase):
    """The reading side of a handler's connection, each request to arrive whole (its line, headers and body, and
    the idle wait before it) within the handler's `timeout` of its start. A timeout per read let a client that
    sends a byte every 30 s hold its place for good, and with enough connections every place: 503 to everyone
    else. The socket's own timeout (what writes to a client that stops reading wait for) is left as it was."""

    def __init__(self, handler: "_Handler"):
        self._handler, self._sock = handler, handler.connection

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._handler.read_by - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive whole within the connection's timeout")
        self._sock.settimeout(min(left, self._handler.timeout))
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._handler.timeout)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"  # keep-alive, as OpenAI clients expect
    timeout = SOCKET_TIMEOUT_S
    disable_nagle_algorithm = True  # one small write per streamed token
    server_version = f"edgeglm/{__version__}"

    def version_string(self) -> str:
        return self.server_version  # the `Server:` header; the base class appends the Python version

    def setup(self) -> None:
        super().setup()
        self.read_by = math.inf
        self.rfile.close()  # (socketserver's makefile: it holds a reference that keeps the socket open)
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        self.server.api._connection(self.connection, open=True)

    def handle_one_request(self) -> None:
        self.read_by = time.monotonic() + self.timeout  # (_DeadlineReader)
        super().handle_one_request()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._connection(self.connection, open=False)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, ...), as JSON. A request line that did not
        parse leaves the version at http.server's HTTP/0.9 default, under which it writes no status line and no
        headers: the client got bare JSON (and a 505 for HTTP/2.0 never said so)."""
        self.close_connection = True
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"
        error = ApiError(code, message or self.responses.get(code, ("error",))[0],
                         type="server_error" if code >= 500 else "invalid_request_error")
        # answered before any route: counted here (they never reach _dispatch's counters), as "unmatched"; before
        # the answer goes out, so that a scrape after it sees them
        metrics = self.server.api.metrics
        metrics.requests.inc(endpoint="unmatched", code=str(code))
        metrics.errors.inc(endpoint="unmatched", type=error.type)
        self._send_json(code, error.body())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = lambda self: self._dispatch()

    # dispatch
    def _dispatch(self) -> None:
        api = self.server.api
        path = urlsplit(self.path).path
        route = "/v1/models/{model}" if path.startswith("/v1/models/") else path
        endpoint = route if route in ROUTES else "unmatched"
        self._status, self._streaming, self._t0 = 0, False, time.perf_counter()
        self._body_pending = self._has_body()
        self._label = None  # the telemetry label of the model that took the request, once one did
        self._window = None  # and the telemetry window the request began in (LatencyWindow.serving)
        with api._request(), ExitStack() as self._serving:  # (its window waits for the answer and its error)
            try:
                self._route(api, route, path)
            except ApiError as exc:
                self._fail(endpoint, exc)
            except RequestError as exc:
                self._fail(endpoint, ApiError(400, str(exc)))
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                self.close_connection = True
                api.metrics.errors.inc(endpoint=endpoint, type="client_disconnected")
                if not self._streaming:  # the answer never reached the client: not counted as answered
                    self._status = 0
            except Exception:
                log.exception("HTTP API: %s %s failed", self.command, path)
                self._fail(endpoint, ApiError(500, "internal error; the agent log has the details",
                                              type="server_error"))
            finally:
                if self._status:
                    api.metrics.requests.inc(endpoint=endpoint, code=str(self._status))
                if endpoint in INFERENCE_ROUTES and self.command == "POST":  # whatever the outcome: docs/http-api.md
                    api.metrics.request_latency.observe(time.perf_counter() - self._t0, endpoint=endpoint)
        if self._body_pending and self._status and not self._streaming:
            self._linger()

    def _has_body(self) -> bool:
        return self.headers.get("Content-Length", "0") not in ("", "0") or \
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _linger(self) -> None:
        """After an answer sent before the request body was read (413, 401, 404, ...): half-close and read
        and drop what the client still sends (up to 8 MiB or 1 s). Closing with unread bytes makes the
        kernel reset the connection, which can destroy the answer before the client reads it (clients on
        http.client saw BrokenPipeError instead of the 413)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            left, deadline = 8 << 20, time.monotonic() + 1.0
            while left > 0 and time.monotonic() < deadline:
                data = self.connection.recv(min(1 << 16, left))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def _route(self, api: ApiServer, route: str, path: str) -> None:
        methods = ROUTES.get(route)
        if path.startswith("/v1/"):  # before 404/405: who has no key learns nothing of the routes
            self._authorize(api)
        if methods is None:
            raise ApiError(404, f"no such endpoint: {path}; see docs/http-api.md (e.g. POST /v1/chat/completions)",
                           code="not_found")
        method = "GET" if self.command == "HEAD" else self.command
        if method not in methods:
            raise ApiError(405, f"{self.command} is not allowed on {path}; use {', '.join(methods)}",
                           code="method_not_allowed", headers={"Allow": ", ".join(methods)})
        getattr(self, "_" + methods[method])(api, path)

    def _authorize(self, api: ApiServer) -> None:
        key = api.http.api_key
        if key is None:
            return
        given = self.headers.get_all("Authorization") or []
        if len(given) > 1:  # which one counts would be ours to guess, and a proxy in front may have checked the other
            raise ApiError(400, f"{len(given)} Authorization headers: send one", code="invalid_api_key")
        scheme, _, token = (given[0] if given else "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "an API key is required: send 'Authorization: Bearer KEY' (http.api_key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode("latin-1", "replace"), key.get_secret_value().encode()):
            raise ApiError(401, "the API key is not correct", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def _fail(self, endpoint: str, exc: ApiError) -> None:
        self.server.api.metrics.errors.inc(endpoint=endpoint, type=exc.type)
        if self.server.api.window is not None and exc.status >= 500:
            self.server.api.window.record_error(label=self._label, window=self._window)
        if self._status and not self._streaming:  # a response is half out: only closing is left
            self.close_connection = True
            return
        if not self._streaming:
            self._send_json(exc.status, exc.body(), exc.headers)
            return
        try:  # headers are out: tell the client in the stream, then end it cleanly
            self._write_event(exc.body())
            self._write_chunk(b"")
        except OSError:
            self.close_connection = True

    # bodies
    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length", code="length_required")
        given = self.headers.get("Content-Length")
        if len({v.strip() for v in self.headers.get_all("Content-Length") or []}) > 1:  # RFC 9112 6.3: refused
            raise ApiError(400, "the request has Content-Length headers that disagree "
                                f"({', '.join(v.strip()[:20] for v in self.headers.get_all('Content-Length'))}); the "
                                "connection is closed", code="invalid_request")
        if given is None or not given.strip():
            raise ApiError(411, "a request body with Content-Length is required", code="length_required")
        if not re.fullmatch(r"[0-9]{1,19}", given.strip()):  # int() takes '-5', '+5', '1_0' and non-ASCII digits
            raise ApiError(400, f"Content-Length {given.strip()[:40]!r} is not a byte count (a non-negative "
                                "decimal integer); the connection is closed", code="invalid_request")
        length = int(given)
        limit = self.server.api.http.max_body_bytes
        if length > limit:
            raise ApiError(413, f"the request body is {length} bytes; the limit (http.max_body_bytes) is {limit}",
                           code="request_too_large")
        raw = self.rfile.read(max(length, 0))
        if len(raw) < length:  # said (a client that only half-closed still reads it), then the connection closes
            raise ApiError(400, f"the request body ended after {len(raw)} of the {length} bytes its Content-Length "
                                "gives; the connection is closed", code="invalid_request")
        self._body_pending = False
        try:
            body = json.loads(raw, parse_constant=reject_constant)
        except (ValueError, RecursionError) as exc:
            if "integer string conversion" in str(exc):  # Python's int limit: its advice is for programmers
                raise ApiError(400, f"the request body holds an integer of over {sys.get_int_max_str_digits()} "
                                    "digits; no field takes one", code="invalid_json") from None
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if getattr(self, "_body_pending", False):  # an unread body would be taken for the next request
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # HTTP/1.0 has no chunked framing: the events go as they are and closing the connection ends them
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._streaming = True

    def _write_chunk(self, data: bytes) -> None:
        if not self._chunked:
            if data:
                self.wfile.write(data)
            return
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")

    def _write_event(self, obj: dict | str) -> None:
        self._write_chunk(b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n")

    def _client_connected(self) -> bool:
        """False once the client closed its side of the connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return not readable or self.connection.recv(1, socket.MSG_PEEK) != b""
        except ValueError:  # a socket that cannot peek: no way to tell, keep going
            return True
        except OSError:  # reset by the peer
            return False

    def _send_stream(self, shape, pieces, outcome: Outcome, include_usage: bool) -> None:
        """Server-sent events: one chunk per text piece, the finish reason, usage if asked, [DONE]."""
        self._start_stream()
        for chunk in shape.first_chunks():
            self._write_event(chunk)
        for piece in pieces:
            self._write_event(shape.chunk(piece))
        self._write_event(shape.chunk("", outcome.finish_reason))
        if include_usage:
            self._write_event(shape.usage_chunk(outcome))
        self._write_event("[DONE]")
        self._write_chunk(b"")

    # endpoints
    def _healthz(self, api: ApiServer, path: str) -> None:
        self._send_json(200, {"status": "ok"})

    def _readyz(self, api: ApiServer, path: str) -> None:
        # ?no_model_ok=1: what a K3s readiness probe asks, so that an agent image upgrade does not stall on boxes
        # still waiting for their first model (a DaemonSet's rolling update counts an unready new pod as
        # unavailable); an installed model that does not serve still fails it
        query = parse_qs(urlsplit(self.path).query)
        no_model_ok = query.get("no_model_ok", [""])[-1].lower() in ("1", "true", "yes")
        ready, reason = api.readiness(no_model_ok=no_model_ok)
        self._send_json(200 if ready else 503, {"status": "ready" if ready else "not ready", "reason": reason})

    def _metrics(self, api: ApiServer, path: str) -> None:
        self._send(200, api.metrics.exposition().encode(), METRICS_CONTENT_TYPE)

    def _models(self, api: ApiServer, path: str) -> None:
        model = api.current_model()
        self._send_json(200, {"object": "list", "data": [model_card(model)] if model else []})

    def _model(self, api: ApiServer, path: str) -> None:
        # percent-escapes decoded: a client that escapes the id (JavaScript's encodeURIComponent on "m+build.1") got 404
        model, wanted = api.current_model(), unquote(path[len("/v1/models/"):])
        if model is None:
            raise ApiError(404, f"model {wanted!r} is not served here: no model is loaded", param="model",
                           code="model_not_found")
        check_model_field(wanted, model)
        self._send_json(200, model_card(model))

    def _completions(self, api: ApiServer, path: str) -> None:
        body = self._read_json()
        self._generate(api, "/v1/completions", body, completion_request(body, api.sampling), CompletionShape)

    def _chat_completions(self, api: ApiServer, path: str) -> None:
        body = self._read_json()
        model = api.current_model()
        if model is None:  # the chat template needs the model's tokenizer; the reason as engine_slot gives it
            raise ApiError(503, f"not ready to generate: {api.readiness()[1]}", type="server_error",
                           code="model_not_ready", headers={"Retry-After": "5"})
        req = chat_request(body, api.sampling, model.tokenizer)
        self._generate(api, "/v1/chat/completions", body, req, ChatShape)

    def _generate(self, api: ApiServer, endpoint: str, body: dict, req: GenerationRequest, shape_cls) -> None:
        m = api.metrics
        check_model_field(body.get("model"), api.current_model())
        with api.engine_slot() as slot:
            model = slot.model
            if api.window is not None:  # latency and errors from here on belong to this model
                self._label = serving_label(model)
                self._window = self._serving.enter_context(api.window.serving(self._label))
            req = with_special_stops(req, model.tokenizer)
            ids = prompt_ids(req, model)
            try:
                handle = slot.submit(ids, req.params)  # prompt errors surface here, before any byte is sent
            except RequestError as exc:
                raise ApiError(400, str(exc), param=req.prompt_field) from None
            except SchedulerClosed as exc:  # the model was swapped (an OTA update) since the slot was taken
                raise ApiError(503, str(exc), type="server_error", headers={"Retry-After": "1"}) from None
            tokens = stream_tokens(handle, self._client_connected)
            first = next(tokens, None)  # an engine error before the first token is answered as such
            outcome, shape, last = Outcome(len(ids)), shape_cls(model_id(model)), [None]

            timing = {"ttft": None, "gaps": []}

            def on_token():  # timing of each token; the shutdown deadline cuts here
                now = time.perf_counter()
                if last[0] is None:
                    timing["ttft"] = now - self._t0
                    m.ttft.observe(timing["ttft"], endpoint=endpoint)
                else:
                    timing["gaps"].append(now - last[0])
                    m.token_latency.observe(now - last[0], endpoint=endpoint)
                last[0] = now
                if api._abort.is_set():
                    raise ApiError(503, "the agent is shutting down; the answer was cut", type="server_error")

            stream = chain([] if first is None else [first], tokens)
            pieces = generate_text(model, ids, stream, req.params, req.stop, outcome, on_token)
            answered = False
            try:
                if req.stream:
                    self._send_stream(shape, pieces, outcome, req.include_usage)
                else:
                    self._send_json(200, shape.full("".join(pieces), outcome))
                answered = True
            finally:
                tokens.close()
                m.prompt_tokens.inc(outcome.prompt_tokens, endpoint=endpoint)
                m.completion_tokens.inc(outcome.completion_tokens, endpoint=endpoint)
                # telemetry counts a request served once it was answered whole: one that failed partway is an error
                # (counted where it fails, as over MQTT), one whose client left is neither
                if api.window is not None and answered:
                    api.window.record(timing["ttft"], timing["gaps"], len(timing["gaps"]), sum(timing["gaps"]),
                                      label=self._label, window=self._window)


class _ReserveHandler(_Handler):
    """A connection beyond http.max_connections, on a place of the probes' reserve (PROBE_RESERVE): one request,
    to be sent within PROBE_TIMEOUT_S. GET or HEAD of a PROBE_PATHS path is answered as usual; anything else,
    or nothing in time, gets the 503 of http.max_connections. `refused` tells the server which it was."""

    timeout = PROBE_TIMEOUT_S

    def handle(self) -> None:
        self._status, self.refused = 0, False
        self.handle_one_request()  # one only: the place is free again for the next probe
        if not self._status:  # nothing came in time (or the client left): refused like any connection over the cap
            self.refused = True
            self.server.count_refusal(self.client_address)
            try:
                self.connection.sendall(self.server.refusal_bytes())
            except OSError:
                pass

    def _dispatch(self) -> None:
        self.close_connection = True
        if self.command in ("GET", "HEAD") and urlsplit(self.path).path in PROBE_PATHS:
            super()._dispatch()
            return
        self.refused = True
        self.server.count_refusal(self.client_address)
        self._body_pending = self._has_body()  # read and dropped by the server's lingering thread (let_go)
        if not self.request_version.startswith("HTTP/1."):  # an HTTP/0.9 line: it would get no status line
            self.request_version = "HTTP/1.1"
        error = self.server.refusal()
        self._send_json(error.status, error.body(), error.headers)


def prefix_cache_key(model) -> str:
    """What prefix-cache KV is valid for: one bundle on one execution path (backend, device, precision,
    threads), computed by one build of the code on one kind of CPU, e.g. `3f2a...-onnxruntime-1c9e0b7d4a21`.
    It names the cache's directory on disk, so blocks written by another version of edgeglm, ONNX Runtime or
    OpenVINO (whose kernels may round otherwise: ORT 1.32 changed how MatMulNBits splits its blocks) or on
    another CPU (a disk image cloned to a box with other instructions) are never resumed from; the old
    directory goes with the idle sweep (runtime/prefix_cache.py IDLE_S)."""
    path = getattr(model, "path", None)
    about = path.to_dict() if path is not None else {"backend": model.backend}
    # the graph that runs prompts makes the KV: the W8A8 prefill graph's differs from the decode graph's
    # (model.prefill_graph on / off over the same bundle and path)
    prompts_on = getattr(getattr(model, "engine", None), "prefill_graph", None)
    if prompts_on:
        about = {**about, "prompts_on": prompts_on}
    about = {**about, **numerics_identity(model.backend, about.get("threads"))}
    text = json.dumps(about, sort_keys=True)
    return f"{model.bundle.sha256}-{model.backend}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def numerics_identity(backend: str, threads: int | None) -> dict:
    """What decides the bits of KV a backend computes besides the bundle and the path: the versions of edgeglm and
    of the backend, the CPU's model and instruction sets, and the thread count (the usable CPUs where the path
    leaves it to the backend)."""
    from runtime.probe import probe_cpu, usable_cpus

    cpu = probe_cpu()
    module = sys.modules.get(backend)
    return {"edgeglm": __version__, "backend_version": getattr(module, "__version__", None),
            "cpu": [cpu.architecture, cpu.model, list(cpu.features), _cpu_identity()],
            "threads": threads or usable_cpus()}


# /proc/cpuinfo fields of the first processor that tell CPUs apart beyond the probe's model name and short feature
# list: "AMD EPYC" alone names many; an ARM board may have no model name, its core in "CPU part" (A55 or A76)
CPU_IDENTITY_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "CPU implementer",
                       "CPU architecture", "CPU variant", "CPU part", "CPU revision", "Features", "isa", "uarch")


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    first = text.split("\n\n", 1)[0]
    fields = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in CPU_IDENTITY_FIELDS:
            fields[key.strip()] = " ".join(value.split())
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def make_prefix_cache(cache: CacheSettings, state_dir: Path):
    """The agent's prefix cache from the `[cache]` settings; persistence is dropped, with a warning,
    when its directory cannot be created."""
    from runtime.prefix_cache import PrefixCache

    return PrefixCache(cache.max_bytes(), cache.block_tokens, _usable_dir(cache.directory(state_dir)))


def configure_prefix_cache(prefix_cache, cache: CacheSettings, state_dir: Path) -> None:
    """Apply `[cache]` settings live: a smaller max_mb evicts now; another block size or directory
    drops what is in memory."""
    prefix_cache.reconfigure(cache.max_bytes(), cache.block_tokens, _usable_dir(cache.directory(state_dir)))


def _usable_dir(path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as exc:
        log.warning("prefix cache: %s cannot be created (%s); cached prefixes are kept in memory only "
                    "(set cache.persist_dir)", path, exc.strerror or exc)
        return None


# --- entry points ----------------------------------------------------------------------------------

def serve_http(config, model) -> ApiServer:
    """Start the HTTP API for `config` (an AgentConfig) serving `model` (a LoadedModel); returns the running server.

    The server answers /healthz at once; /readyz and inference wait for the golden check, run here.
    """
    server = ApiServer(config.http, config.sampling, batching=config.batching)
    cache = config.cache if config.cache.persist_dir else config.cache.model_copy(update={"persist": False})
    server.set_prefix_cache(make_prefix_cache(cache, config.model.slots_dir))  # on disk only where told
    server.start()
    server.set_model(model, None)
    golden = model.golden_check()
    server.set_model(model, golden)
    log.info("model %s on %s: golden check %s", model_id(model), model.backend, golden.describe())
    return server


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.http_api --bundle BUNDLE [--port N]`: serve until Ctrl-C (for manual testing)."""
    from agent.config import load_config
    from agent.errors import AgentError
    from agent.model import load_model
    from ota.errors import BundleError
    from runtime.errors import RuntimeUserError

    p = argparse.ArgumentParser(prog="python -m agent.http_api", description=main.__doc__)
    p.add_argument("--bundle", required=True)
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--backend", help="auto, onnxruntime or openvino")
    p.add_argument("--device", help=DEVICE_HELP)
    args = p.parse_args(argv)
    overrides = {"model.bundle": args.bundle, "http.host": args.host, "http.port": args.port,
                 "model.backend": args.backend, "model.device": args.device}
    try:
        cfg = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
        logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        model = load_model(cfg.model.bundle, cfg.model.backend, cfg.model.threads, prefill_graph=cfg.model.prefill_graph,
                           device=cfg.model.device)
        server = serve_http(cfg, model)
    except (AgentError, BundleError, RuntimeUserError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {model_id(model)} ({model.backend}) on {server.url}/v1 — Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    server.shutdown(deadline=5.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
