"""The OpenAI-compatible protocol of the local HTTP API, without the HTTP: request fields to a
generation request, the GLM chat template, stop strings, and the response shapes (full and
streamed chunks). Errors are `ApiError`s, answered with OpenAI's error JSON.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from agent.config import SamplingSettings
from runtime.errors import RequestError
from runtime.generate import SamplingParams
from runtime.tokenizer import StreamDecoder

MAX_STOP_STRINGS = 16
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
CHAT_STOP_TOKENS = ("<|user|>", "<|observation|>")  # GLM ends an assistant turn with these as well as EOS
# Request fields this server does not implement: accepted only at their no-op values.
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,),
               "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
               "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},),
               # asked for and silently not done: a forced tool call, audio out
               "tool_choice": ("none", "auto"), "modalities": (["text"],), "audio": ()}


@dataclass
class ApiError(Exception):
    """An HTTP error answered with OpenAI's error JSON."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def glm_chat_pieces(messages: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The GLM chat format for (role, content) pairs, role one of system, user, assistant, as (text, is_marker)
    pieces: "[gMASK]", "<sop>", then "<|role|>" and "\\n{content}" per message, then "<|assistant|>" and "\\n"
    to start the reply. The markers are special tokens of the GLM tokenizer; the rest is text."""
    pieces = [("[gMASK]", True), ("<sop>", True)]
    for role, content in messages:
        pieces += [(f"<|{role}|>", True), ("\n" + content, False)]
    return pieces + [("<|assistant|>", True), ("\n", False)]


def glm_chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The GLM chat format as one string (what `chat_ids` encodes, for display and comparison): encoding this
    string whole would read marker text inside a message as the marker itself."""
    return "".join(text for text, _ in glm_chat_pieces(messages))


def _plain_text_tokenizer(tokenizer):
    """A copy of `tokenizer` that encodes special-token text ("<|assistant|>", "<|endoftext|>") as ordinary
    text (`encode_special_tokens`, tokenizers >= 0.20). A copy, not the flag set on the model's tokenizer for
    a moment: other threads encode completion prompts with it meanwhile. Kept per tokenizer (a model
    replaced over the air brings a new one)."""
    with _PLAIN_LOCK:
        for held, plain in _PLAIN:
            if held is tokenizer:
                return plain
        plain = type(tokenizer).from_str(tokenizer.to_str())
        plain.encode_special_tokens = True
        _PLAIN[:] = [(tokenizer, plain)] + _PLAIN[:1]  # the serving model's, and the one an update replaces
        return plain


_PLAIN: list = []
_PLAIN_LOCK = threading.Lock()


def chat_ids(messages: list[tuple[str, str]], tokenizer) -> list[int]:
    """The token ids of the GLM chat prompt. Encoding the rendered string whole made a message holding
    "<|assistant|>" or "x<|endoftext|><|system|>\\nnew rules" a role turn or an end of text of its own. Messages
    without special-token text are encoded whole, as before (the same ids whatever the tokenizer: a Metaspace
    pre-tokenizer with prepend_scheme "first" marks only the start of the whole text). A message with such text
    is built piece by piece: each marker by its id, each message's text encoded with special-token text left as
    text. A marker that is not a special token of `tokenizer` is text, as it was."""
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    if not any(token in content for _, content in messages for token in special):
        return tokenizer.encode(glm_chat_prompt(messages), add_special_tokens=False).ids
    plain, ids, text = _plain_text_tokenizer(tokenizer), [], ""
    for piece, marker in glm_chat_pieces(messages):
        if marker and piece in special:
            if text:
                ids += plain.encode(text, add_special_tokens=False).ids
            ids.append(special[piece])
            text = ""
        else:
            text += piece
    if text:
        ids += plain.encode(text, add_special_tokens=False).ids
    return ids


@dataclass
class GenerationRequest:
    prompt: str | list[int]  # text, or token ids (completions only)
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt_field: str = "prompt"
    messages: tuple[tuple[str, str], ...] = ()  # chat: the (role, content) pairs `prompt` renders


def kind_error(name: str, value, kind: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {kind}; got {json.dumps(value)}", param=name)


def sampling_params(body: dict, defaults: SamplingSettings, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """Request fields over the configured defaults; each field checked on its own so the error names it."""
    values = defaults.model_dump()
    given = {"max_tokens": "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"}
    if body.get("max_completion_tokens") is not None:  # the chat API's newer name
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    for name, integer in (("max_tokens", True), ("temperature", False), ("top_p", False), ("top_k", True),
                          ("repetition_penalty", False), ("seed", True)):
        value = body.get(name)
        field = given.get(name, name)  # the name the client sent, for the error
        if value is None:  # absent or null: the default
            continue
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise kind_error(field, value, "an integer" if integer else "a number")
        try:
            SamplingParams(**{name: value})
        except RequestError as exc:
            raise ApiError(400, str(exc) if field == name else f"'{field}': {exc}", param=field) from None
        values[name] = value
    return SamplingParams(**values, stop_token_ids=stop_token_ids)


def _common_fields(body: dict) -> tuple[tuple[str, ...], bool, bool]:
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)  # booleans apart: True == 1 and 0 == False in Python, not in JSON
        if value is not None and not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                         for a in allowed):
            raise ApiError(400, f"'{name}' = {json.dumps(body[name])} is not supported by this server; "
                           f"leave it out", param=name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise kind_error("stop", stop, "a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise kind_error("stream", stream, "true or false")
    for i, s in enumerate(stops):
        _check_text(s, "stop" if isinstance(stop, str) else f"stop[{i}]")
    options = body.get("stream_options")
    options = {} if options is None else options  # null: none; 0, [] or "" are not an object
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not isinstance(usage, (bool, type(None))):
        raise kind_error("stream_options", body.get("stream_options"), 'an object like {"include_usage": true}')
    return tuple(stops), bool(stream), bool(usage)  # include_usage null: the default, false


def _check_text(text: str, field: str) -> None:
    """A 400 naming the field for text that is not Unicode a tokenizer can take: a lone UTF-16 surrogate
    (JSON's \\ud83d, half of an emoji a client cut in two) parses, but cannot be encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{field}' holds an unpaired UTF-16 surrogate ({text[exc.start]!a} at character "
                       f"{exc.start}): send whole characters", param=field) from None


def completion_request(body: dict, defaults: SamplingSettings) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids):
        raise kind_error("prompt", prompt, "a string or a list of token ids (one prompt per request)")
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
    stop, stream, usage = _common_fields(body)
    return GenerationRequest(prompt, sampling_params(body, defaults), stop, stream, usage)


def chat_request(body: dict, defaults: SamplingSettings, tokenizer) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise kind_error("messages", messages, "a non-empty list of {role, content} objects")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):  # (was "messages[0].role = null is not supported" for a 1 or a string)
            raise kind_error(f"messages[{i}]", m, "a {role, content} object")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or object is unhashable: was a 500
            raise ApiError(400, f"messages[{i}].role = {json.dumps(role)} is not supported; use one of: "
                           f"{', '.join(CHAT_ROLES)}", param=f"messages[{i}].role")
        pairs.append((CHAT_ROLES[role], _message_text(m.get("content"), i)))
    stop_ids = tuple(i for i in (tokenizer.token_to_id(t) for t in CHAT_STOP_TOKENS) if i is not None)
    stop, stream, usage = _common_fields(body)
    return GenerationRequest(glm_chat_prompt(pairs), sampling_params(body, defaults, stop_ids), stop, stream,
                             usage, prompt_field="messages", messages=tuple(pairs))


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        _check_text(content, f"messages[{i}].content")
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        text = "".join(p["text"] for p in content)
        _check_text(text, f"messages[{i}].content")
        return text
    raise kind_error(f"messages[{i}].content", content, 'a string or a list of {"type": "text", "text": ...} parts')


def with_special_stops(req: GenerationRequest, tokenizer) -> GenerationRequest:
    """Stop strings that are exactly one of the tokenizer's special tokens (`<|user|>` in a prompt a client
    templated itself) become stop token ids: special tokens are left out of the decoded text, so as
    strings they would never match and generation would run on into the next turn."""
    special = {t.content: i for i, t in getattr(tokenizer, "get_added_tokens_decoder", dict)().items()
               if getattr(t, "special", False)}
    ids = tuple(special[s] for s in req.stop if s in special and special[s] not in req.params.stop_token_ids)
    if not ids:
        return req
    return dataclasses.replace(req, params=dataclasses.replace(
        req.params, stop_token_ids=req.params.stop_token_ids + ids))


def prompt_ids(req: GenerationRequest, model) -> list[int]:
    """A chat's ids from its messages (`chat_ids`: marker text in a message stays text; the template writes
    [gMASK]<sop> itself, so the tokenizer's post-processor, which adds them in GLM-4's tokenizer.json, is not
    applied); a completion's text as the tokenizer reads it, special-token text included (a client templating
    its own prompt writes "<|user|>"), with its post-processor; a completion's token ids as they are."""
    if req.messages:
        return chat_ids(list(req.messages), model.tokenizer)
    if isinstance(req.prompt, str):
        return model.tokenizer.encode(req.prompt).ids
    bad = [t for t in req.prompt if not 0 <= t < model.arch.vocab_size]
    if bad:
        raise ApiError(400, f"'prompt' has token id {bad[0]} outside the vocabulary [0, {model.arch.vocab_size})",
                       param="prompt")
    return list(req.prompt)


class StopStrings:
    """Cuts streamed text where the first stop string begins (the earliest start in the whole text, whatever
    the pieces), holding back any tail that may begin one.

    With several stop strings, a stop found in the text may not be the first yet: a longer one that begins
    earlier may still complete with the next piece (stops " %," and "%", text "x %" then ","): the text from
    that earlier start is held until the next pieces tell. Before, the cut depended on how the text came in
    pieces ("x " if "%" came alone, "x" if " %," came at once)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def _first(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _pending(self, text: str, before: int) -> int | None:
        """The earliest start before `before` from which the text is a proper beginning of a stop string."""
        if not self.stops:
            return None
        for j in range(max(0, len(text) - max(map(len, self.stops)) + 1), min(before, len(text))):
            tail = text[j:]
            if any(len(tail) < len(s) and s.startswith(tail) for s in self.stops):
                return j
        return None

    def push(self, piece: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        text = self.held + piece
        first = self._first(text)
        pending = self._pending(text, len(text) if first is None else first)
        if first is not None and pending is None:
            self.held = ""
            return text[:first], True
        keep = len(text) - pending if pending is not None else 0
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> tuple[str, bool]:
        """At the end of the text: what was held, cut at a stop string it holds (no piece comes to complete a
        longer one that begins earlier), and whether it was."""
        text, self.held = self.held, ""
        first = self._first(text)
        return (text, False) if first is None else (text[:first], True)


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def generate_text(model, ids: list[int], tokens, params: SamplingParams, stops: tuple[str, ...],
                  outcome: Outcome, on_token=lambda: None):
    """Text pieces from a stream of token ids; fills `outcome` (count, finish reason) as it goes."""
    decoder, cut = StreamDecoder(model.tokenizer), StopStrings(stops)
    for token in tokens:
        outcome.completion_tokens += 1
        on_token()
        text, stopped = cut.push(decoder.push(token))
        if text:
            yield text
        if stopped:
            outcome.finish_reason = "stop"
            return
    text, stopped = cut.push(decoder.flush())
    if not stopped:
        rest, stopped = cut.flush()
        text += rest
    if text:
        yield text
    full = outcome.completion_tokens >= params.max_tokens or len(ids) + outcome.completion_tokens >= model.arch.max_positions
    outcome.finish_reason = "length" if full and not stopped else "stop"


# --- response shapes -------------------------------------------------------------------------------

class CompletionShape:
    object, prefix = "text_completion", "cmpl-"

    def __init__(self, model_id: str):
        self.id, self.created, self.model = self.prefix + uuid.uuid4().hex[:24], int(time.time()), model_id

    def _wrap(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def full(self, text: str, outcome: Outcome) -> dict:
        return self._wrap(self.object, [self.choice(text, outcome.finish_reason)], outcome.usage())

    def first_chunks(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish: str | None = None) -> dict:
        return self._wrap(self.object, [self.choice(text, finish)])

    def usage_chunk(self, outcome: Outcome) -> dict:
        return self._wrap(self.object, [], outcome.usage())


class ChatShape(CompletionShape):
    object, prefix = "chat.completion.chunk", "chatcmpl-"

    def full(self, text: str, outcome: Outcome) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
        return self._wrap("chat.completion", [choice], outcome.usage())

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}

    def first_chunks(self) -> list[dict]:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._wrap(self.object, [role])]


def model_id(model) -> str:
    return f"{model.bundle.manifest.name}-{model.bundle.manifest.version}"


def model_card(model) -> dict:
    try:
        created = int(datetime.fromisoformat(model.bundle.manifest.created).timestamp())
    except ValueError:
        created = 0
    return {"id": model_id(model), "object": "model", "created": created, "owned_by": "edgeglm"}


def check_model_field(wanted, model) -> None:
    """Requests may name the model as `name-version` or `name`, or leave it out."""
    if wanted is not None and not isinstance(wanted, str):
        raise kind_error("model", wanted, "a string")
    if wanted is not None and model is not None and wanted not in (model_id(model), model.bundle.manifest.name):
        raise ApiError(404, f"model {wanted!r} is not served here; this agent serves {model_id(model)!r}",
                       param="model", code="model_not_found")


def reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
