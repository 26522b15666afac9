"""The local HTTP API through the official `openai` client and raw `http.client`, on a real bundle."""

from __future__ import annotations

import http.client
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from agent.config import BatchingSettings, HttpSettings, SamplingSettings, load_config
from agent.errors import ServeError
from agent.http_api import ApiServer, serve_http
from agent.model import load_model
from agent.openai_compat import CHAT_STOP_TOKENS, glm_chat_prompt
from runtime.generate import SamplingParams, generate
from runtime.golden import GoldenResult
from waiting import StepGate, until

MODEL_ID = "tiny-1.0.0"
PROMPT = "def main(argv=None):\n"


@pytest.fixture(scope="module")
def model(int8_bundle):
    return load_model(int8_bundle, "onnxruntime")


@pytest.fixture(scope="module")
def server(model):
    cfg = load_config(None, {"http.port": 0, "http.max_body_bytes": 4096, "sampling.max_tokens": 16})
    srv = serve_http(cfg, model)
    yield srv
    srv.shutdown(deadline=5.0)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def side_server(model, **http) -> ApiServer:
    """A second server on the same model with other HTTP settings (one request at a time in these tests)."""
    srv = ApiServer(HttpSettings(port=0, **http), SamplingSettings(max_tokens=8))
    srv.start()
    srv.set_model(model, model.golden_check())
    return srv


def direct(model, prompt: str, max_tokens: int, stop_tokens: tuple[str, ...] = ()) -> tuple[list[int], list[int], str]:
    """Prompt ids, generated ids and text from runtime.generate called directly."""
    ids = model.tokenizer.encode(prompt).ids
    stop_ids = tuple(model.tokenizer.token_to_id(t) for t in stop_tokens)
    out = list(generate(model.engine, ids, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop_ids)))
    return ids, out, model.tokenizer.decode(out, skip_special_tokens=True)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None, conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp, resp.read(), conn


# --- OpenAI endpoints ------------------------------------------------------------------------------

def test_models_lists_the_loaded_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "edgeglm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-2.0.0")


def test_a_percent_escaped_model_id_is_the_id(server):
    """A client that escapes the id in the path (JavaScript's encodeURIComponent) asks for the same model."""
    escaped = "".join(f"%{b:02X}" for b in MODEL_ID.encode())
    resp, body, _ = raw(server, "GET", f"/v1/models/{escaped}")
    assert resp.status == 200 and json.loads(body)["id"] == MODEL_ID, body
    resp, body, _ = raw(server, "GET", "/v1/models/other%2D2.0.0")
    assert resp.status == 404 and "'other-2.0.0'" in json.loads(body)["error"]["message"], body


def test_greedy_completion_equals_runtime_generate(client, model):
    ids, out, text = direct(model, PROMPT, 24)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == text and text
    assert r.choices[0].finish_reason == ("length" if len(out) == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(out), len(ids) + len(out))
    assert r.model == MODEL_ID and r.object == "text_completion"


def test_completion_from_token_ids_and_config_default_max_tokens(client, model):
    ids, out, text = direct(model, PROMPT, 16)  # the fixture's sampling.max_tokens
    r = client.completions.create(model=MODEL_ID, prompt=ids)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(out)


def test_streamed_completion_equals_non_streamed(client):
    full = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30)
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_chat_greedy_equals_runtime_generate_on_the_glm_template(client, model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def parse(text):"}]
    prompt = glm_chat_prompt([(m["role"], m["content"]) for m in messages])
    assert prompt == "[gMASK]<sop><|system|>\nYou write Python.<|user|>\ndef parse(text):<|assistant|>\n"
    ids, out, text = direct(model, prompt, 20, CHAT_STOP_TOKENS)
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    assert r.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_seeded_sampling_is_repeatable_and_streams_the_same_text(client):
    kw = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 40, "repetition_penalty": 1.1})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert a == b == streamed


def test_stop_string_cuts_the_text_and_ends_generation(client):
    text = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3 and text.find(stop) >= 0
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, stop=[stop, "never-seen"])
    assert r.choices[0].text == text[:text.find(stop)]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 30
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=30, stop=stop, stream=True))
    assert streamed == r.choices[0].text


# --- request errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(temperature=500), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(extra_body={"top_k": -1}), "top_k"),
    (dict(extra_body={"repetition_penalty": "high"}), "repetition_penalty"),
    (dict(seed=1.5), "seed"),
    (dict(n=2), "n"),
    (dict(extra_body={"tool_choice": "required"}), "tool_choice"),  # asked for, never done: refused, not ignored
    (dict(extra_body={"modalities": ["text", "audio"]}), "modalities"),
])
def test_invalid_sampling_field_is_a_400_naming_it(client, kw, field):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, **kw)
    assert field in err.value.message and err.value.body["param"] == field
    assert err.value.body["type"] == "invalid_request_error"


def test_what_openai_takes_and_this_server_once_refused(client):
    """OpenAI takes any signed 64-bit seed (some clients send -1) and top_p in [0, 1]: both were 400s here."""
    a = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=-1)
    b = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=-1)
    assert a.choices[0].text == b.choices[0].text  # a seed is a seed, negative or not
    greedy = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0)
    top0 = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0, seed=3)
    assert top0.choices[0].text == greedy.choices[0].text  # top_p 0: only the most likely token
    assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          tool_choice="none").choices[0].message.role == "assistant"


def test_bad_chat_messages_and_model_names(client):
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL_ID, messages=[])
    with pytest.raises(openai.NotFoundError, match="tiny-1.0.0"):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).model == MODEL_ID


def test_a_chat_role_that_is_not_a_string_is_a_400(server):
    """A list or object as the role was looked up in a dict: TypeError (unhashable), answered 500."""
    for role in (["user"], {"a": 1}, 5):
        body = json.dumps({"messages": [{"role": role, "content": "x"}]}).encode()
        resp, data, _ = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert resp.status == 400 and json.loads(data)["error"]["param"] == "messages[0].role", data
    for message in (1, "hi", ["user", "x"]):  # said "messages[0].role = null is not supported"
        body = json.dumps({"messages": [message]}).encode()
        resp, data, _ = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        error = json.loads(data)["error"]
        assert resp.status == 400 and error["param"] == "messages[0]", data
        assert error["message"] == f"'messages[0]' must be a {{role, content}} object; got {json.dumps(message)}"


@pytest.mark.parametrize("line,status", [(b"GET /healthz HTTP/1.1 extra", 400), (b"GET /healthz HTTP/1.x", 400),
                                         (b"GARBAGE", 400), (b"PRI * HTTP/2.0", 505)])
def test_a_request_line_that_does_not_parse_gets_a_status_line_and_headers(server, line, status):
    """http.server answered these with bare JSON: no status line, no headers (its HTTP/0.9 default)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(line + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_prompt_beyond_the_context_window_is_a_400(model):
    srv = side_server(model)  # default max_body_bytes: a prompt of max_positions ids
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="context window") as err:
            client.completions.create(model=MODEL_ID, prompt=[1] * model.arch.max_positions, max_tokens=2)
        assert err.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError, match="vocabulary"):
            client.completions.create(model=MODEL_ID, prompt=[model.arch.vocab_size], max_tokens=2)
    finally:
        srv.shutdown(deadline=5.0)


def test_malformed_json_is_a_400_and_the_connection_stays_usable(server):
    resp, body, conn = raw(server, "POST", "/v1/completions", b'{"prompt": "x",', {"Content-Type": "application/json"})
    assert resp.status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    for payload, needle in [(b"[1, 2]", "JSON object"), (b'{"prompt": 5}', "'prompt' must be"),
                            (b'{"prompt": "x", "temperature": NaN}', "not valid JSON"),
                            (b"\xff\xfe\x00", "not valid JSON")]:
        resp, body, conn = raw(server, "POST", "/v1/completions", payload, conn=conn)
        assert resp.status == 400 and needle in json.loads(body)["error"]["message"], payload
    resp, body, _ = raw(server, "GET", "/healthz", conn=conn)  # same keep-alive connection
    assert resp.status == 200 and json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize("value", ["-5", "+5", "1_0", "\u0661\u0662", "5x", "99999999999999999999"])
def test_a_content_length_that_is_not_a_byte_count_is_a_400_naming_it(server, value):
    """`Content-Length: -5` was read as an empty body and answered "not valid JSON"; int() also took '+5', '1_0'
    and non-ASCII digits."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + value.encode() +
                  b"\r\n\r\n{}")
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, answer[:300]
    message = json.loads(body)["error"]["message"]
    as_read = value.encode().decode("latin-1")  # header bytes are read as ISO-8859-1 (RFC 9110)
    assert message.startswith(f"Content-Length {as_read!r} is not a byte count"), message


@pytest.mark.parametrize("headers,sent,needle", [
    (b"Content-Length: 2\r\nContent-Length: 40\r\n", b"{}", "Content-Length headers that disagree (2, 40)"),
    (b"Content-Length: 100\r\n", b'{"prompt": "x"}', "the request body ended after 15 of the 100 bytes")])
def test_conflicting_or_unfulfilled_content_lengths_are_a_400_then_the_connection_closes(server, headers, sent,
                                                                                          needle):
    """Two Content-Length headers that disagree were read by the first (a request smuggled past a proxy that reads
    the other: RFC 9112 refuses them); a body shorter than its Content-Length, the client half-closed, got no
    answer at all."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + sent)
        s.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, answer[:300]
    assert needle in json.loads(body)["error"]["message"], body


def test_a_huge_integer_in_the_body_is_a_400_without_pythons_advice(model):
    """json.loads refuses integers of over 4300 digits with advice for programmers ("use
    sys.set_int_max_str_digits()"), which the 400 passed on to the client."""
    srv = side_server(model, max_body_bytes=65536)
    try:
        resp, body, _ = raw(srv, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}")
        message = json.loads(body)["error"]["message"]
        assert resp.status == 400 and "integer of over 4300 digits" in message and "sys." not in message, message
    finally:
        srv.shutdown(deadline=5.0)


def test_oversized_body_is_a_413_and_closes(server):
    big = json.dumps({"prompt": "x" * 5000}).encode()
    resp, body, _ = raw(server, "POST", "/v1/completions", big)
    error = json.loads(body)["error"]
    assert resp.status == 413 and "4096" in error["message"] and "http.max_body_bytes" in error["message"]
    assert resp.getheader("Connection") == "close"


def test_unknown_route_and_wrong_method(server):
    resp, body, _ = raw(server, "GET", "/v2/nothing")
    assert resp.status == 404 and json.loads(body)["error"]["code"] == "not_found"
    resp, body, _ = raw(server, "GET", "/v1/completions")
    assert resp.status == 405 and resp.getheader("Allow") == "POST"
    assert "GET is not allowed" in json.loads(body)["error"]["message"]
    resp, body, _ = raw(server, "DELETE", "/metrics")
    assert resp.status == 405 and resp.getheader("Allow") == "GET"
    resp, body, _ = raw(server, "BREW", "/healthz")
    assert resp.status == 501 and "error" in json.loads(body)


# --- auth, readiness, concurrency ------------------------------------------------------------------

def test_api_key_is_required_when_configured(model):
    srv = side_server(model, api_key="s3cret")
    try:
        url = f"{srv.url}/v1"
        for key in ("wrong", "s3cre", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError) as err:
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
            assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        resp, body, _ = raw(srv, "POST", "/v1/completions", b'{"prompt": "x"}')
        assert resp.status == 401 and "Authorization: Bearer" in json.loads(body)["error"]["message"]
        assert resp.getheader("WWW-Authenticate") == "Bearer"
        resp, body, _ = raw(srv, "GET", "/v1/models", None, {"Authorization": "Bearer wrong"})
        assert resp.status == 401 and resp.getheader("WWW-Authenticate") == 'Bearer error="invalid_token"'
        for path, method in (("/v1/nothing-here", "GET"), ("/v1/models", "POST")):  # were 404 and 405 before the key
            resp, body, _ = raw(srv, method, path, b"{}" if method == "POST" else None)
            assert resp.status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", (path, body)
        assert raw(srv, "GET", "/v1/nothing-here", None, {"Authorization": "Bearer s3cret"})[0].status == 404
        for pair in (("s3cret", "wrong"), ("wrong", "s3cret")):  # the first decided: right-then-wrong got in
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            conn.putrequest("GET", "/v1/models")
            for key in pair:
                conn.putheader("Authorization", f"Bearer {key}")
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 400 and "2 Authorization headers: send one" in json.loads(body)["error"]["message"]
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        assert raw(srv, "GET", "/healthz")[0].status == 200  # probes need no key
    finally:
        srv.shutdown(deadline=5.0)


def test_readyz_reports_the_golden_check(server, model):
    resp, body, _ = raw(server, "GET", "/readyz")
    assert resp.status == 200 and "golden check" in json.loads(body)["reason"]

    srv = ApiServer(HttpSettings(port=0), SamplingSettings())
    srv.start()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        resp, body, _ = raw(srv, "GET", "/readyz")
        assert resp.status == 503 and json.loads(body)["reason"] == "no model is loaded"
        srv.set_model(model, GoldenResult(steps=4, exact=3, mismatches=(2,), near_ties=()))
        resp, body, _ = raw(srv, "GET", "/readyz")
        assert resp.status == 503 and "failed its golden check" in json.loads(body)["reason"]
        with pytest.raises(openai.InternalServerError, match="golden check"):
            client.completions.create(model=MODEL_ID, prompt=PROMPT)
        assert raw(srv, "GET", "/healthz")[0].status == 200
    finally:
        srv.shutdown(deadline=5.0)


def test_four_concurrent_requests_all_succeed(server, model):
    prompts = [PROMPT, "import os\n", "class Parser:\n", "def test_"]
    expected = [direct(model, p, 12)[2] for p in prompts]

    def ask(prompt):
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        if prompt.startswith("class"):
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL_ID, prompt=prompt, max_tokens=12, stream=True))
        return c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == expected


def test_requests_beyond_max_concurrent_get_429(model):
    srv = side_server(model, max_concurrent=1)
    try:
        with srv.engine_slot():  # the one slot is taken
            with pytest.raises(openai.RateLimitError, match="http.max_concurrent"):
                openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0).completions.create(
                    model=MODEL_ID, prompt=PROMPT)
        assert srv.metrics.in_flight.value() == 0 and srv.metrics.queued.value() == 0
    finally:
        srv.shutdown(deadline=5.0)


def test_client_that_leaves_mid_stream_does_not_block_the_engine(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 400, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.fp.readline()  # the first chunk has come
    conn.close()
    assert client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3).usage.completion_tokens >= 1


def _wait(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_a_client_that_leaves_a_non_streamed_or_queued_request_frees_its_place(model):
    """A non-streamed request writes nothing until it is finished, and a queued stream writes nothing until
    it is admitted: when their clients leave (the openai client gives up on its timeout, then retries),
    the requests are cancelled within about half a second instead of decoding to max_tokens for nobody
    and holding their batch row or max_concurrent place."""
    from agent.config import BatchingSettings
    srv = ApiServer(HttpSettings(port=0, max_concurrent=2), SamplingSettings(max_tokens=8),
                    batching=BatchingSettings(max_batch=1))
    gate = StepGate(srv._on_step)  # the first request decodes until both clients have left: not done before
    srv._on_step = gate  # (taken by the scheduler set_model makes)
    srv.start()
    srv.set_model(model, model.golden_check())
    try:
        def send(body: dict) -> socket.socket:
            data = json.dumps(body).encode()
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            return s
        long = {"prompt": PROMPT, "max_tokens": 4000, "temperature": 1.0, "seed": 1}
        gate.arm()
        first = send(long)  # running, answer at the end
        # 30 s: a CI box running other tests beside this one once took over 10 s to admit it
        assert _wait(lambda: srv._scheduler.stats().active == 1, 30.0), srv._scheduler.stats()
        queued = send({**long, "stream": True})  # waits behind it
        assert _wait(lambda: srv._scheduler.stats().queued == 1, 30.0), srv._scheduler.stats()
        queued.close()
        first.close()
        gate.release()
        # both places freed and counted as disconnects (the handler threads count them after the scheduler
        # let them go: waited for, not read at once)
        assert _wait(lambda: srv._scheduler.stats().active == 0 and srv._scheduler.stats().queued == 0, 30.0), \
            srv._scheduler.stats()
        assert _wait(lambda: srv.metrics.errors.value(endpoint="/v1/completions", type="client_disconnected") == 2,
                     30.0), srv.metrics.errors.value(endpoint="/v1/completions", type="client_disconnected")
        resp, body, _ = raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode())
        assert resp.status == 200
    finally:
        srv.shutdown(deadline=5.0)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi \ud83d"}, "prompt"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "half \ud83d an emoji"}]},
     "messages[1].content"),
    ({"prompt": "hi", "stop": ["\udc00"]}, "stop[0]"),
])
def test_a_lone_surrogate_in_text_is_a_400_naming_the_field(server, body, field):
    """JSON lets a client send half of a UTF-16 pair (a JavaScript client cutting text inside an emoji);
    it cannot be tokenized: a 400 naming the field, not a 500."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    resp, data, _ = raw(server, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    error = json.loads(data)["error"]
    assert resp.status == 400 and error["param"] == field and "unpaired UTF-16 surrogate" in error["message"]


def test_request_field_details(server, client):
    """include_usage null is the default (false); an invalid max_completion_tokens names that field."""
    resp, data, _ = raw(server, "POST", "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}}).encode())
    assert resp.status == 200 and b'"usage"' not in data.split(b"[DONE]")[0].rsplit(b"data: ", 2)[-2]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=0)
    assert err.value.body["param"] == "max_completion_tokens" and "max_completion_tokens" in err.value.message


def test_a_stop_string_that_is_a_special_token_becomes_a_stop_token(model):
    """Special tokens are left out of the decoded text, so `stop: ["<|user|>"]` (a client templating the
    chat itself on /v1/completions) could never match as a string: it stops as a token instead."""
    from agent.openai_compat import completion_request, with_special_stops
    req = completion_request({"prompt": "x", "stop": ["<|user|>", "\n\n"]}, SamplingSettings())
    got = with_special_stops(req, model.tokenizer)
    assert got.params.stop_token_ids == (model.tokenizer.token_to_id("<|user|>"),)
    assert got.stop == ("<|user|>", "\n\n")
    assert with_special_stops(completion_request({"prompt": "x", "stop": "user"}, SamplingSettings()),
                              model.tokenizer).params.stop_token_ids == ()


def test_engine_errors_reach_the_log_not_the_client(model, caplog):
    """A 500 says where the details are; the engine's own message (file paths, provider errors) is logged."""
    class Broken:
        def __getattr__(self, name):
            return getattr(model.engine, name)

        def forward(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 6 : /var/lib/edgeglm/slots/b/onnxruntime/model.onnx exploded")

        def new_batch(self):
            raise RuntimeError("[ONNXRuntimeError] : 6 : /var/lib/edgeglm/slots/b/onnxruntime/model.onnx exploded")
    import dataclasses
    broken = dataclasses.replace(model, engine=Broken())
    srv = ApiServer(HttpSettings(port=0), SamplingSettings(max_tokens=4))
    srv.start()
    srv.set_model(broken, model.golden_check())
    try:
        resp, data, _ = raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode())
        assert resp.status == 500 and "/var/lib" not in data.decode() and "agent log" in data.decode()
        assert resp.getheader("x-should-retry") == "false"  # the openai client would send it twice more
        assert "/var/lib/edgeglm/slots/b/onnxruntime/model.onnx exploded" in caplog.text
    finally:
        srv.shutdown(deadline=5.0)


def test_a_request_that_fails_partway_is_an_error_in_telemetry_not_a_request_served(model):
    """The latency of every request was recorded in a `finally`: one whose engine failed after some tokens counted
    as served and as an error (over MQTT only as an error), pulling the window's percentiles with a partial
    answer's timing."""
    import dataclasses

    from agent.telemetry import LatencyWindow

    class FailingBatch:
        def __init__(self, batch):
            self.batch = batch

        def __getattr__(self, name):
            return getattr(self.batch, name)

        def step(self, input_ids):
            FailsLater.calls += 1
            if FailsLater.calls > 3:  # a few decode steps, then the engine fails
                raise RuntimeError("exploded")
            return self.batch.step(input_ids)

    class FailsLater:
        calls = 0

        def __getattr__(self, name):
            return getattr(model.engine, name)

        def new_batch(self):
            return FailingBatch(model.engine.new_batch())

    window = LatencyWindow()
    srv = ApiServer(HttpSettings(port=0), SamplingSettings(max_tokens=32), window=window,
                    batching=BatchingSettings(max_batch=1))
    srv.start()
    srv.set_model(dataclasses.replace(model, engine=FailsLater()), model.golden_check())
    try:
        for stream in (False, True):
            window.take("dev")
            FailsLater.calls = 0
            raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 32, "stream": stream,
                                                            "temperature": 0}).encode())
            reports = window.take("dev")
            assert (sum(r.count for r in reports), sum(r.errors for r in reports)) == (0, 1), (stream, FailsLater.calls,
                                                                                              reports)
    finally:
        srv.shutdown(deadline=5.0)


def test_a_model_swapped_while_a_request_starts_is_a_503_to_retry(model, int8_bundle, monkeypatch):
    """An OTA update lands between the request taking its engine slot and submitting: the old scheduler is
    closed, and the client gets the documented 503 with Retry-After: 1, not a 500."""
    import agent.http_api as http_api
    srv = side_server(model)
    new = load_model(int8_bundle, "onnxruntime")
    golden = new.golden_check()
    real = http_api.prompt_ids

    def tokenize_while_an_update_lands(req, m):
        ids = real(req, m)
        srv.set_model(new, golden)
        return ids
    monkeypatch.setattr(http_api, "prompt_ids", tokenize_while_an_update_lands)
    try:
        resp, data, _ = raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode())
        assert resp.status == 503 and resp.getheader("Retry-After") == "1", data
    finally:
        srv.shutdown(deadline=5.0)


def test_an_http_1_0_client_gets_a_stream_without_chunked_framing(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert body.startswith(b"data: {") and body.rstrip().endswith(b"data: [DONE]")


def test_an_error_sent_before_the_body_was_read_reaches_a_client_still_sending_it(model):
    """A 413 for an 8 MiB body: the server reads and drops what the client still sends instead of closing
    on it (a reset that http.client clients saw as BrokenPipeError, not the 413)."""
    srv = side_server(model, max_body_bytes=4096)
    try:
        big = json.dumps({"prompt": "x" * (8 << 20)}).encode()
        resp, data, _ = raw(srv, "POST", "/v1/completions", big, {"Content-Type": "application/json"})
        assert resp.status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    finally:
        srv.shutdown(deadline=5.0)


# --- metrics and lifecycle -------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_metrics(text: str) -> tuple[dict, dict]:
    """Check each line of Prometheus text format; return {TYPE name: type} and {sample line key: value}."""
    types, samples = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert base in types, f"{name} has no TYPE line"
        samples[name + (m.group(2) or "")] = float(m.group(4))
    return types, samples


def test_metrics_grow_after_requests_and_parse(server, client):
    def scrape():
        resp, body, _ = raw(server, "GET", "/metrics")
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        return body.decode()

    _, before = parse_metrics(scrape())
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt=PROMPT, temperature=-1)
    ep = 'endpoint="/v1/completions"'
    ok = f'edgeglm_http_requests_total{{{ep},code="200"}}'
    bad = f'edgeglm_http_requests_total{{{ep},code="400"}}'
    tokens = f"edgeglm_completion_tokens_total{{{ep}}}"
    durations = f"edgeglm_request_duration_seconds_count{{{ep}}}"  # the 400 too: every outcome is observed

    def settled(s: dict) -> bool:
        # a request is counted (code, tokens, duration) just after its response is written, and the gauges
        # follow the scheduler's boundary: the client can read /metrics before that; wait for it to happen
        return s.get(ok, 0) >= before.get(ok, 0) + 1 and s.get(bad, 0) >= before.get(bad, 0) + 1 \
            and s.get(tokens, 0) >= before.get(tokens, 0) + r.usage.completion_tokens \
            and s.get(durations, 0) >= before.get(durations, 0) + 2 \
            and s.get("edgeglm_inference_in_flight") == 0 and s.get("edgeglm_inference_queue_depth") == 0

    deadline = time.monotonic() + 30
    types, after = parse_metrics(scrape())
    while not settled(after) and time.monotonic() < deadline:
        time.sleep(0.05)
        types, after = parse_metrics(scrape())

    assert types["edgeglm_time_to_first_token_seconds"] == "histogram"
    assert types["edgeglm_inference_queue_depth"] == "gauge"
    assert types["edgeglm_prefix_cache_hits_total"] == "counter"
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    err = f'edgeglm_http_errors_total{{{ep},type="invalid_request_error"}}'
    assert after[err] == before.get(err, 0) + 1
    assert after[tokens] == before.get(tokens, 0) + r.usage.completion_tokens
    for hist, n in (("edgeglm_time_to_first_token_seconds", 1), ("edgeglm_request_duration_seconds", 2)):
        count = f"{hist}_count{{{ep}}}"
        assert after[count] == before.get(count, 0) + n
        buckets = [v for k, v in after.items() if k.startswith(f"{hist}_bucket{{{ep},")]
        assert buckets == sorted(buckets) and buckets[-1] == after[count]
        assert after[f'{hist}_bucket{{{ep},le="+Inf"}}'] == after[count]
    assert after[f"edgeglm_inter_token_latency_seconds_count{{{ep}}}"] >= 1
    assert after["edgeglm_inference_in_flight"] == 0 and after["edgeglm_inference_queue_depth"] == 0
    lookups = "edgeglm_prefix_cache_lookups_total"
    assert after[lookups] == before.get(lookups, 0) + 1  # the answered request's prefill asked the cache


def test_requests_http_server_answers_itself_are_counted(server):
    """A bad request line (400) or an unknown method (501) is answered by http.server before any route: it was in
    neither edgeglm_http_requests_total nor edgeglm_http_errors_total."""
    def scrape():
        return parse_metrics(raw(server, "GET", "/metrics")[1].decode())[1]
    before = scrape()
    for line in (b"GARBAGE\r\n\r\n", b"BREW /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(line)
            assert s.recv(65536).split(b" ", 2)[1] in (b"400", b"501")
    after = scrape()
    for code, kind in (("400", "invalid_request_error"), ("501", "server_error")):
        key = f'edgeglm_http_requests_total{{endpoint="unmatched",code="{code}"}}'
        assert after.get(key, 0) == before.get(key, 0) + 1, key
        key = f'edgeglm_http_errors_total{{endpoint="unmatched",type="{kind}"}}'
        assert after.get(key, 0) == before.get(key, 0) + 1, key


def test_metrics_show_the_process_and_the_memory_left(server):
    """An operator's Prometheus could not see the agent's memory, CPU or file descriptors (a box running out
    of memory showed nothing until the OOM kill). The server runs in this process: compare with what the
    kernel says of it, read here another way."""
    import os

    def status(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    types, m = parse_metrics(raw(server, "GET", "/metrics")[1].decode())
    assert types["process_resident_memory_bytes"] == "gauge" and types["process_cpu_seconds_total"] == "counter"
    assert abs(m["process_resident_memory_bytes"] - status("VmRSS") * 1024) < 0.2 * status("VmRSS") * 1024
    assert abs(m["process_cpu_seconds_total"] - time.process_time()) < 1.0
    assert abs(m["process_open_fds"] - len(os.listdir("/proc/self/fd"))) <= 4
    assert abs(m["process_threads"] - status("Threads")) <= 4
    assert time.time() - 86400 < m["process_start_time_seconds"] < time.time()
    starts = {parse_metrics(raw(server, "GET", "/metrics")[1].decode())[1]["process_start_time_seconds"]
              for _ in range(30)}
    assert starts == {m["process_start_time_seconds"]}  # "the agent restarted" alerts watch it change
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert 0 < m["edgeglm_memory_available_bytes"] <= available * 1.1
    assert m["edgeglm_inference_kv_bound_bytes"] == (server._scheduler.max_kv_bytes or 0) > 0  # "auto"


def test_kv_auto_is_measured_again_once_the_previous_model_is_let_go(int8_bundle, model, monkeypatch):
    """batching.max_kv_mb "auto" was measured when a model was set: at an OTA switch the outgoing model is
    still loaded then, so every box got a lower bound after each update until it restarted. It is measured
    again once the old scheduler has drained (the memory probe stands in for the machine here: it says
    more is free once the old model is gone), and a box with a number of its own keeps it."""
    import agent.http_api as http_api

    free, let_go, measured_again = [300 << 20], threading.Event(), []

    def budget(held=0, engine=None):
        if threading.current_thread() is not threading.main_thread():
            let_go.wait(30)  # the measurement after the switch: not before the test has freed the memory
            measured_again.append(free[0])
        return (free[0] + held) // 3

    monkeypatch.setattr(http_api, "auto_kv_budget", budget)
    srv = side_server(model)
    try:
        assert srv._scheduler.max_kv_bytes == 100 << 20
        other = load_model(int8_bundle, "onnxruntime")  # the update's model, loaded beside the serving one
        free[0] = 150 << 20
        srv.set_model(other, other.golden_check())
        assert srv._scheduler.max_kv_bytes == 50 << 20  # measured with both loaded
        free[0] = 450 << 20  # ... the old one's memory comes back
        let_go.set()
        deadline = time.monotonic() + 30
        while srv._scheduler.max_kv_bytes != 150 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv._scheduler.max_kv_bytes == 150 << 20
        _, m = parse_metrics(raw(srv, "GET", "/metrics")[1].decode())
        assert m["edgeglm_inference_kv_bound_bytes"] == 150 << 20

        srv.set_batching(BatchingSettings(max_kv_mb=64))  # a number is kept through a switch
        free[0] = 30 << 20
        srv.set_model(model, model.golden_check())
        deadline = time.monotonic() + 30  # the measurement after this switch has run (and must not apply)
        while measured_again[-1:] != [30 << 20] and time.monotonic() < deadline:
            time.sleep(0.05)
        for t in threading.enumerate():
            if t.name == "edgeglm-kv-auto":
                t.join(30)
        assert measured_again[-1:] == [30 << 20]
        assert srv._scheduler.max_kv_bytes == 64 << 20
    finally:
        srv.shutdown(deadline=5.0)


def test_port_zero_binds_a_free_port_and_shutdown_stops_serving(model):
    srv = side_server(model)
    port = srv.port
    assert port != 0 and raw(srv, "GET", "/healthz")[0].status == 200
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a keep-alive connection left open
    raw(srv, "GET", "/healthz", conn=idle)
    srv.shutdown(deadline=2.0)
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/healthz")


def test_module_entry_point_serves_until_interrupted(int8_bundle):
    proc = subprocess.Popen([sys.executable, "-m", "agent.http_api", "--bundle", str(int8_bundle), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://\S+)/v1", line)
        assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
        client = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=3).usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 and "stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_port_in_use_is_a_serve_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=rf"127\.0\.0\.1:{port}: .*; set http.host/http.port"):
            ApiServer(HttpSettings(port=port), SamplingSettings()).start()


def test_server_header_names_edgeglm_and_its_version():
    from agent import __version__

    srv = ApiServer(HttpSettings(port=0), SamplingSettings())
    srv.start()
    try:
        resp, _, conn = raw(srv, "GET", "/healthz")
        conn.close()
        assert resp.getheader("Server") == f"edgeglm/{__version__}"
    finally:
        srv.shutdown(deadline=5.0)


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.20", False), ("edge-box.local", False)])
def test_hosts_reachable_from_elsewhere_are_told_apart_from_loopback(host, loopback):
    """A non-loopback http.host without http.api_key is warned about at start (agent/http_api.py)."""
    from agent.http_api import _loopback

    assert _loopback(host) is loopback


def test_a_refused_connection_still_sending_its_body_reads_the_503():
    """The 503 of http.max_connections was written and the connection closed at once: a client still sending a
    request body (a long prompt) had its next write refused (BrokenPipe) or the answer reset under it, so it
    never saw the 503 and its Retry-After. Now the refused connection is read and dropped until the client is
    done; one that then sends nothing is closed after a second."""
    srv = ApiServer(HttpSettings(port=0, max_connections=1), SamplingSettings())
    srv.start()
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        time.sleep(0.2)  # accepted: the one place is taken
        body = b"x" * (4 << 20)
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.putrequest("POST", "/v1/completions")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            for i in range(0, len(body), 256 << 10):  # a client on a slow link: the body arrives over time
                conn.send(body[i:i + (256 << 10)])
                time.sleep(0.02)
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("Retry-After")) == (503, "1")
            assert json.loads(resp.read())["error"]["code"] == "too_many_connections"
            conn.close()
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        answer = b""
        # the answer, then the end: the server does not wait for ever (the socket's 10 s timeout fails this if it
        # never closes; no wall-clock bound beyond that, a loaded box is slow)
        while chunk := raw.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503")
        raw.close()
    finally:
        idle.close()
        srv.shutdown(deadline=5.0)


def test_connections_beyond_max_connections_get_503_and_a_freed_place_serves_again():
    """Each connection holds a thread: clients that open connections and send nothing (slowloris) take
    at most http.max_connections of them; the next connection is answered 503 at once, not queued."""
    from agent import __version__

    srv = ApiServer(HttpSettings(port=0, max_connections=2), SamplingSettings())
    srv.start()
    idle = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            idle.append(s)
        # the server accepts connections in order, one at a time: the third comes after both idle ones
        # (a request that is no probe: those are still answered, see the next test)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Retry-After")) == (503, "1")
        # like every other error: OpenAI's JSON, and the Server header every answer carries
        assert resp.getheader("Server") == f"edgeglm/{__version__}"
        assert resp.getheader("Content-Type") == "application/json"
        error = json.loads(resp.read())["error"]
        assert (error["type"], error["code"]) == ("server_error", "too_many_connections")
        assert "http.max_connections" in error["message"]
        conn.close()
        idle.pop().close()  # a place frees when the server sees the connection end
        deadline = time.monotonic() + 10
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.request("GET", "/v1/models")
            status = conn.getresponse().status
            conn.close()
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        for s in idle:
            s.close()
        srv.shutdown(deadline=5.0)


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_client_trickling_its_request_loses_its_place_after_the_timeout(monkeypatch, part):
    """The connection's timeout held for each read, not for the request: a client sending a byte every 30 s (under
    the 60 s) kept its place for good, and with http.max_connections such connections, everyone else got 503 for
    as long as it liked. Here the timeout is 1 s and the client sends a byte every 0.2 s for up to 20 s."""
    import agent.http_api as http_api

    monkeypatch.setattr(http_api._Handler, "timeout", 1.0)
    srv = ApiServer(HttpSettings(port=0, max_connections=1), SamplingSettings())
    srv.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        if part == "body":
            s.sendall(head)
        closed, started = False, time.monotonic()
        trickle = (b"X-Slow: " + b"a" * 200) if part == "headers" else b"{" * 100
        for byte in trickle:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # reset by the server
                closed = True
                break
            ready, _, _ = select.select([s], [], [], 0.2)
            if ready and not s.recv(4096, socket.MSG_PEEK):  # the server closed it
                closed = True
                break
            if time.monotonic() - started > 20:
                break
        s.close()
        assert closed, "the trickling client kept its connection"
        # its place is free again
        until(lambda: _ask(srv, "GET", "/v1/models")[0].status == 200, timeout=10)
    finally:
        srv.shutdown(deadline=5.0)


def _ask(srv, method: str, path: str, body: bytes | None = None, timeout: float = 30.0):
    """One request on a connection of its own: (response, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def test_probes_are_answered_at_max_connections_and_inference_is_not(model):
    """Idle keep-alive clients holding every one of http.max_connections made /healthz answer 503, and the K3s
    liveness probe restarted a healthy, merely busy agent (cutting every generation). Probes and scrapes get
    through on a few more connections; anything else gets the 503 as before, counted on /metrics."""
    import agent.http_api as http_api

    srv = side_server(model, max_connections=2)
    idle = []

    def ask(method, path, body=None):
        # each answer's thread gives its reserve place back just after the answer went out: a loaded box ran the
        # next ask before any had, and it was refused (a probe's retry would get through; a test's must not race)
        assert _wait(lambda: srv._httpd._reserve._value == http_api.PROBE_RESERVE, 30.0)
        return _ask(srv, method, path, body)

    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("HEAD", "/healthz"), ("HEAD", "/readyz")):
            resp, body = ask(method, path)
            assert resp.status == 200, (method, path, body)
            assert resp.getheader("Connection") == "close"  # one request each: the place is free again at once
        assert json.loads(ask("GET", "/readyz")[1])["status"] == "ready"
        _, before = parse_metrics(ask("GET", "/metrics")[1].decode())
        assert before["edgeglm_http_connections_refused_total"] == 0

        refused = []
        for method, path, body in (("POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode()),
                                   ("POST", "/v1/chat/completions", b'{"messages": []}'),
                                   ("GET", "/v1/models", None), ("POST", "/healthz", b"{}")):
            resp, data = ask(method, path, body)
            assert (resp.status, resp.getheader("Retry-After")) == (503, "1"), (method, path, data)
            error = json.loads(data)["error"]
            assert (error["type"], error["code"]) == ("server_error", "too_many_connections")
            assert error["message"] == "2 connections are open, the limit (http.max_connections); retry later"
            refused.append(path)
        _, after = parse_metrics(ask("GET", "/metrics")[1].decode())
        assert after["edgeglm_http_connections_refused_total"] == len(refused)
        assert after.get('edgeglm_http_requests_total{endpoint="/v1/completions",code="503"}', 0) == 0
        assert after['edgeglm_http_requests_total{endpoint="/healthz",code="200"}'] == 2
    finally:
        for s in idle:
            s.close()
        srv.shutdown(deadline=5.0)


def test_the_probes_reserve_beyond_max_connections_is_bounded(model, monkeypatch):
    """The places kept for probes beyond http.max_connections are few (PROBE_RESERVE), each for one request
    sent within PROBE_TIMEOUT_S: clients that take them and send nothing do not add threads beyond that; the
    next connection gets the 503 at once, a probe included, and one that sends nothing in time gets it too."""
    import agent.http_api as http_api

    monkeypatch.setattr(http_api._ReserveHandler, "timeout", 60.0)  # the silent ones hold their place here
    srv = side_server(model, max_connections=1)
    held = []
    try:
        held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))  # the one place
        held += [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(http_api.PROBE_RESERVE)]
        resp, data = _ask(srv, "GET", "/healthz")
        assert resp.status == 503 and json.loads(data)["error"]["code"] == "too_many_connections"
        assert srv.metrics.connections_refused.value() == 1
        held.pop().close()  # a reserve place frees once the server sees its connection end ...

        def healthy() -> bool:  # (one ask that waits on a busy machine is given up and asked again)
            try:
                return _ask(srv, "GET", "/healthz", timeout=15.0)[0].status == 200
            except OSError:
                return False
        # (a CI run beside heavy load once starved this process for a minute: the bound is for a hang, not speed)
        assert _wait(healthy, 180.0)  # ... probes get it again
    finally:
        for s in held:
            s.close()
        srv.shutdown(deadline=5.0)

    def half_a_request(srv, give_up: bool) -> bytes:
        """Part of a request line on a reserve place, then nothing (or the client's end); all the answer."""
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        silent.sendall(b"GET /heal")
        if give_up:
            silent.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := silent.recv(65536):
            answer += chunk
        silent.close()
        return answer

    srv = side_server(model, max_connections=1)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10):
            answers = [half_a_request(srv, give_up=True)]
            monkeypatch.setattr(http_api._ReserveHandler, "timeout", 0.2)  # PROBE_TIMEOUT_S, shorter here
            answers.append(half_a_request(srv, give_up=False))
        for answer in answers:  # refused, not dropped without a word
            assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer
        assert srv.metrics.connections_refused.value() == 2
    finally:
        srv.shutdown(deadline=5.0)


def test_request_duration_is_observed_whatever_the_outcome(model):
    """edgeglm_request_duration_seconds is "request received -> last byte written": it was observed only when
    the generation returned normally, so requests that failed, or whose client left, were missing from it."""
    import dataclasses

    class Broken:
        def __getattr__(self, name):
            return getattr(model.engine, name)

        def forward(self, *args, **kwargs):
            raise RuntimeError("exploded")

        def new_batch(self):
            raise RuntimeError("exploded")

    count = 'edgeglm_request_duration_seconds_count{endpoint="/v1/completions"}'

    def observed(srv) -> float:
        return parse_metrics(raw(srv, "GET", "/metrics")[1].decode())[1].get(count, 0)

    srv = side_server(model)
    try:
        assert raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode())[0].status == 200
        assert _wait(lambda: observed(srv) == 1, 30.0), observed(srv)  # observed after the last byte: soon
        bad = json.dumps({"prompt": PROMPT, "temperature": -1}).encode()
        assert raw(srv, "POST", "/v1/completions", bad)[0].status == 400
        assert _wait(lambda: observed(srv) == 2, 30.0), observed(srv)
        gate = StepGate(srv._scheduler.on_step, at=20).arm()  # the stream goes on until its client has left
        srv._scheduler.on_step = gate
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)  # a client that leaves mid-stream
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 4000, "stream": True,
                                                            "temperature": 1.0, "seed": 1}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.fp.readline()
        conn.close()
        gate.release()
        assert _wait(lambda: observed(srv) == 3, 30.0), observed(srv)
        assert srv.metrics.errors.value(endpoint="/v1/completions", type="client_disconnected") == 1
    finally:
        srv.shutdown(deadline=5.0)

    srv = ApiServer(HttpSettings(port=0), SamplingSettings(max_tokens=4))
    srv.start()
    srv.set_model(dataclasses.replace(model, engine=Broken()), model.golden_check())
    try:
        assert raw(srv, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode())[0].status == 500
        assert _wait(lambda: observed(srv) == 1, 30.0), observed(srv)  # observed after the last byte: soon
    finally:
        srv.shutdown(deadline=5.0)


def test_load_gauges_sum_the_old_and_the_new_model_during_a_switch(int8_bundle, model):
    """At a model switch the outgoing scheduler drains while the new one serves, and both reported into the same
    gauges: the last to report won (one request in flight shown while two were, then none while the new model
    generated). Each decode step is held here until the test lets it go, so both requests are in flight."""
    srv = ApiServer(HttpSettings(port=0), SamplingSettings(max_tokens=16))
    arrived, gates, lock = [], {}, threading.Condition()

    def held_step(batch_size: int) -> None:  # on a scheduler's worker, after each decode step
        me = threading.current_thread()
        with lock:
            if me not in gates:
                gates[me] = threading.Event()
                arrived.append(me)
                lock.notify_all()
            gate = gates[me]
        gate.wait(60)

    srv._on_step = held_step  # taken by each scheduler the server makes
    srv.start()

    def gauges() -> tuple[float, float]:
        m = parse_metrics(raw(srv, "GET", "/metrics")[1].decode())[1]
        return m["edgeglm_inference_in_flight"], m["edgeglm_inference_queue_depth"]

    def generate_in_background() -> tuple[threading.Thread, list]:
        result = []
        body = json.dumps({"prompt": PROMPT, "max_tokens": 16, "stream": True}).encode()
        t = threading.Thread(target=lambda: result.append(raw(srv, "POST", "/v1/completions", body)[1]), daemon=True)
        t.start()
        return t, result

    def worker(n: int) -> threading.Thread:  # the worker of the n-th scheduler, once its request decodes
        with lock:
            assert lock.wait_for(lambda: len(arrived) >= n, 60), "no decode step"
            return arrived[n - 1]

    other = load_model(int8_bundle, "onnxruntime")  # the update's model
    try:
        srv.set_model(model, model.golden_check())
        old_request, old_answer = generate_in_background()
        old = worker(1)
        assert gauges() == (1, 0)
        srv.set_model(other, other.golden_check())  # the old scheduler drains its request
        new_request, new_answer = generate_in_background()
        new = worker(2)
        assert gauges() == (2, 0)

        gates[old].set()  # the old model's request ends, its scheduler with it
        old_request.join(60)
        old.join(60)
        assert not old.is_alive() and b"[DONE]" in old_answer[0]
        assert gauges() == (1, 0)  # the new model's request still decodes

        gates[new].set()
        new_request.join(60)
        assert b"[DONE]" in new_answer[0]
        assert _wait(lambda: gauges() == (0, 0), 30.0), gauges()
        srv.set_model(None, None)
        assert gauges() == (0, 0)
    finally:
        for gate in gates.values():
            gate.set()
        srv.shutdown(deadline=5.0)


def test_kv_bound_is_zero_once_no_model_is_served(model):
    srv = side_server(model, max_connections=4)
    try:
        bound = parse_metrics(raw(srv, "GET", "/metrics")[1].decode())[1]["edgeglm_inference_kv_bound_bytes"]
        assert bound == (srv._scheduler.max_kv_bytes or 0) > 0
        srv.set_model(None, None)
        assert parse_metrics(raw(srv, "GET", "/metrics")[1].decode())[1]["edgeglm_inference_kv_bound_bytes"] == 0
    finally:
        srv.shutdown(deadline=5.0)


def test_kv_auto_reads_the_gpus_free_memory_where_the_kv_lives_there(monkeypatch):
    """batching.max_kv_mb "auto" is a third of the host memory the process can still take, except where the
    engine keeps the KV in GPU memory (CUDA, TensorRT): there a third of the GPU's free memory (a discrete
    card's, which host memory says nothing of); without a CUDA runtime to ask, host memory as before."""
    import types

    import agent.http_api as http_api
    import runtime.probe as probe

    host = probe.probe_memory().budget_bytes()
    gpu_engine = types.SimpleNamespace(kv_memory="cuda memory")
    cpu_engine = types.SimpleNamespace(kv_memory="host memory")
    monkeypatch.setattr(probe, "gpu_memory", lambda: (3_000 << 20, 24_000 << 20))
    assert http_api.auto_kv_budget(engine=gpu_engine) == 1_000 << 20
    assert http_api.auto_kv_budget(300 << 20, gpu_engine) == 1_100 << 20  # the batch's KV counts back
    host_now = http_api.auto_kv_budget(engine=cpu_engine)
    assert abs(host_now - host // 3) < (256 << 20) // 3  # host memory moves a little between the reads
    monkeypatch.setattr(probe, "gpu_memory", lambda: None)
    assert abs(http_api.auto_kv_budget(engine=gpu_engine) - host // 3) < (256 << 20) // 3


def test_gpu_memory_is_none_without_a_cuda_runtime(monkeypatch):
    import runtime.probe as probe

    monkeypatch.setattr(probe, "CUDA_RUNTIMES", ("libcudart-not-here.so.99",))
    assert probe.gpu_memory() is None
