"""Chat-completions requests: validated against what this server supports, formatted with the model's chat
template. Bad requests raise `BadRequest`, answered in the OpenAI error shape."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.model import Model
from ..errors import PromptError, first_line
from ..validation import is_int, is_real

DEFAULT_MAX_TOKENS = 256
MAX_SEED = 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")  # developer = OpenAI's newer name for system
MAX_DEPTH = 32  # a chat request nests 4 levels (body, messages, message, content parts)
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)
UNSUPPORTED = ("stop", "tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias")


# --------------------------------------------------------------------------- request parsing


class BadRequest(Exception):
    """A client error, answered in the OpenAI error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """One validated chat-completions request, already formatted with the model's chat template."""

    text: str
    prompt_tokens: int
    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    return_token_ids: bool = False
    future: Future = field(default_factory=Future, repr=False)

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys can share one batched generate."""
        return (True, self.temperature, self.top_p, self.seed) if self.do_sample else (False,)


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_real(value, finite=True):
        raise BadRequest(f"'{name}' must be a finite number, got {json.dumps(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{name}' must be in {bounds}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int = -MAX_SEED - 1, high: int = MAX_SEED) -> int | None:
    value = body.get(name)
    if value is not None and not is_int(value):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", param=name)
    if value is not None and not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer in [{low}, {high}], got {str(value)[:40]}", param=name)
    return value


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw`, counted outside strings (vectorised: a 2 MB body in
    milliseconds). An unterminated string counts its brackets too: such a body is invalid JSON anyway."""
    skeleton = _STRINGS.sub(b"", raw)
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.isin(codes, _OPENERS).astype(np.int64) - np.isin(codes, _CLOSERS).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def decode_body(raw: bytes) -> Any:
    """The request's JSON; NaN / Infinity (which Python's json accepts) are refused like any invalid JSON, and so
    is nesting deeper than MAX_DEPTH: a chat request nests 4 levels, while 25,000 levels exhaust the decoder's
    recursion (a RecursionError, once a 500) and any depth makes later checks recurse."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise BadRequest(f"request body nests {depth:,} levels deep (at most {MAX_DEPTH}): send a flat chat request")
    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON ({_clip(exc)}): send a JSON object") from None


def _clip(exc: BaseException) -> str:
    """An exception's first line, short and ASCII (a lone surrogate in a message cannot be encoded as UTF-8)."""
    return ascii(first_line(exc))[1:-1][:200]


def _text(value: str, where: str) -> str:
    """Text the tokenizer can encode: a lone UTF-16 surrogate (legal in JSON escapes) is a client error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} holds an unpaired UTF-16 surrogate: send valid Unicode text", param=where) from None
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}: this server takes text only",
                    param=f"messages[{i}].content",
                )
            parts.append(_text(part["text"], f"messages[{i}].content"))
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """Validate OpenAI-style messages (the model's `chat_text` merges system text where it has no system role)."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of system, user, assistant; got {json.dumps(role)}",
                param=f"messages[{i}].role",
            )
        content = _content(message, i)
        role = "system" if role == "developer" else role
        messages.append({"role": role, "content": content})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise BadRequest("'messages' needs at least one user message", param="messages")
    return messages


def parse_request(body: Any, model: Model, model_name: str, max_tokens_limit: int) -> ChatRequest:
    """Check a decoded JSON body against what this server supports; format the prompt."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"'model' is required: this server serves '{model_name}'", param="model")
    name = _text(name, "model")  # echoed in the error below: a lone surrogate could not be written out
    if name != model_name:
        raise BadRequest(
            f"the model '{name}' does not exist: this server serves '{model_name}'",
            param="model",
            code="model_not_found",
            status=404,
        )
    if body.get("stream"):
        raise BadRequest("'stream': true is not supported: this server answers in one response", param="stream")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n}", param="n")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, "none"):
            raise BadRequest(f"'{key}' is not supported by this server: remove it", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise BadRequest(f"'{key}' is not supported by this server: leave it at 0", param=key)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise BadRequest("'response_format' other than text is not supported", param="response_format")

    max_tokens = _integer(body, "max_tokens")
    param = "max_tokens"
    if max_tokens is None and body.get("max_completion_tokens") is not None:
        max_tokens, param = _integer(body, "max_completion_tokens"), "max_completion_tokens"
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"'{param}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param=param)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed", 0, MAX_SEED)
    return_ids = body.get("return_token_ids", False)
    if not isinstance(return_ids, bool):
        raise BadRequest("'return_token_ids' must be true or false", param="return_token_ids")

    messages = parse_messages(body.get("messages"))
    try:
        text = model.chat_text(messages)
    except Exception as exc:  # noqa: BLE001 - template rules (e.g. strict role alternation) -> one line
        first = first_line(exc)
        raise BadRequest(f"the model's chat template rejected these messages: {first}", param="messages") from None
    try:
        (prompt_tokens,) = model.check_fits([text], max_tokens)
    except PromptError as exc:
        raise BadRequest(str(exc), param="messages", code="context_length_exceeded") from None
    return ChatRequest(
        text=text,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=top_p,
        seed=0 if seed is None else seed,
        return_token_ids=return_ids,
    )
