"""Serve a local model, optionally steered, as an OpenAI-compatible chat-completions API.

Any OpenAI client (or `LLMJudge`) can then talk to a steered model: `GET /v1/models`,
`POST /v1/chat/completions` (non-streaming, n=1), plus `GET /v1/stats` (requests, batches, batch sizes).

Concurrent requests are batched: a worker thread takes the first queued request, collects whatever
else arrives within `batch_window` seconds (up to `max_batch`), groups requests whose decoding settings
agree (greedy, or the same temperature / top_p / seed) and runs ONE batched, left-padded generate per
group through the same internals as `generation.generate`, under the server's one `Intervention`.
Requests in a group may ask for different `max_tokens`: the group runs to the largest and each row is
cut to its own limit, which is exact for greedy decoding (a row's tokens never depend on later ones).
A greedy request sent alone gives the same tokens as `generate(model, [prompt], intervention)`.

Bad requests get a 4xx in the OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import CrystallizedSafetyError, InterventionError, ModelError
from .models import Model
from .steering import Intervention

DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "developer", "user", "assistant")  # developer = OpenAI's newer name for system
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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {json.dumps(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"'{name}' must be in {bounds}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be an integer, got {json.dumps(value)}", param=name)
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}: this server takes text only",
                    param=f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_messages(raw: Any, *, system_role: bool = True) -> list[dict[str, str]]:
    """Validate OpenAI-style messages; without a system role, system text is merged into the first user turn."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' is required: a non-empty list of {role, content} objects", param="messages")
    messages, system = [], []
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
        if role == "system" and not system_role:
            system.append(content)
            continue
        messages.append({"role": role, "content": content})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise BadRequest("'messages' needs at least one user message", param="messages")
    if system:
        users[0]["content"] = "\n\n".join(system) + "\n\n" + users[0]["content"]
    return messages


def context_length(model: Model) -> int | None:
    config = model.hf.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def parse_request(body: Any, model: Model, model_name: str, max_tokens_limit: int) -> ChatRequest:
    """Check a decoded JSON body against what this server supports; format the prompt."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"'model' is required: this server serves '{model_name}'", param="model")
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
    seed = _integer(body, "seed")
    return_ids = body.get("return_token_ids", False)
    if not isinstance(return_ids, bool):
        raise BadRequest("'return_token_ids' must be true or false", param="return_token_ids")

    messages = parse_messages(body.get("messages"), system_role=model.system_role)
    try:
        text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - template rules (e.g. strict role alternation) -> one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadRequest(f"the model's chat template rejected these messages: {first}", param="messages") from None
    prompt_tokens = len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise BadRequest(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {limit}",
            param="messages",
            code="context_length_exceeded",
        )
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


# --------------------------------------------------------------------------- batching worker


@dataclass(frozen=True)
class Completion:
    content: str
    token_ids: tuple[int, ...]
    finished: bool
    batch_size: int


class Batcher:
    """One worker thread that turns concurrently queued requests into batched generate calls."""

    def __init__(self, model: Model, intervention: Intervention | None, *, max_batch: int, window: float) -> None:
        self.model, self.intervention = model, intervention
        self.max_batch, self.window = max_batch, window
        self._queue: queue.Queue[ChatRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()
        self._tokens = {"prompt_tokens": 0, "completion_tokens": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="csafety-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        while True:  # whatever is still queued will not run
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item.future.done():
                item.future.set_exception(RuntimeError("server is shutting down"))

    def submit(self, request: ChatRequest) -> Future:
        self._queue.put(request)
        return request.future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
            return {
                "requests": sum(k * v for k, v in sizes.items()),
                "batches": sum(sizes.values()),
                "max_batch_size": max(sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sizes.items()},
                **self._tokens,
                "queued": self._queue.qsize(),
            }

    def _collect(self, first: ChatRequest) -> tuple[list[ChatRequest], bool]:
        batch, deadline = [first], time.monotonic() + self.window
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            groups: dict[tuple, list[ChatRequest]] = {}
            for request in batch:
                groups.setdefault(request.group_key, []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[ChatRequest]) -> None:
        try:
            completions = self._generate_split(group)
        except Exception as exc:  # noqa: BLE001 - the error goes back to each waiting client
            for request in group:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        with self._lock:
            self._sizes[len(group)] += 1
            self._tokens["prompt_tokens"] += sum(r.prompt_tokens for r in group)
            self._tokens["completion_tokens"] += sum(len(c.token_ids) for c in completions)
        for request, completion in zip(group, completions):
            if not request.future.done():
                request.future.set_result(completion)

    def _generate_split(self, group: list[ChatRequest]) -> list[Completion]:
        """Generate for a group; on out-of-memory, split it in halves (as `generate` halves its batch)."""
        from .generation import _is_oom

        try:
            return self._generate(group)
        except Exception as exc:
            if not _is_oom(exc) or len(group) == 1:
                raise
            half = len(group) // 2
            return self._generate_split(group[:half]) + self._generate_split(group[half:])

    def _generate(self, group: Sequence[ChatRequest]) -> list[Completion]:
        """One batched generate over already chat-formatted texts (the internals of `generation.generate`)."""
        from transformers import GenerationConfig

        from .generation import _eos_ids, _generate_batch

        first = group[0]
        eos = _eos_ids(self.model)
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in group),
            do_sample=first.do_sample,
            temperature=first.temperature if first.do_sample else None,
            top_p=first.top_p if first.do_sample else None,
            top_k=None,
            pad_token_id=self.model.tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        texts = [r.text for r in group]
        rows = slice(0, len(texts))
        gens = _generate_batch(self.model, texts, texts, self.intervention, rows, config, False, first.seed, eos)
        out = []
        for request, gen in zip(group, gens):
            ids = gen.token_ids[: request.max_tokens]
            finished = gen.finished and len(gen.token_ids) < request.max_tokens
            content = gen.response
            if len(ids) < len(gen.token_ids):
                content = self.model.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
            out.append(Completion(content, tuple(ids), finished, len(group)))
        return out


# --------------------------------------------------------------------------- app


def describe_intervention(intervention: Intervention | None) -> dict[str, Any] | None:
    if intervention is None:
        return None
    return {
        "layers": intervention.layers,
        "alpha": float(intervention.alpha),  # type: ignore[arg-type]
        "mode": intervention.mode,
        "positions": intervention.positions,
        "alpha_unit": intervention.alpha_unit,
    }


def _fingerprint(intervention: Intervention | None) -> str:
    if intervention is None:
        return f"csafety-{__version__}-unsteered"
    digest = hashlib.sha256(json.dumps(describe_intervention(intervention), sort_keys=True).encode())
    for layer in intervention.layers:
        digest.update(intervention.directions[layer].numpy().tobytes())
    return f"csafety-{__version__}-steered-{digest.hexdigest()[:12]}"


def create_app(
    model: Model,
    *,
    model_name: str | None = None,
    intervention: Intervention | None = None,
    max_batch: int = 8,
    batch_window: float = 0.015,
    max_tokens_limit: int = 4096,
):
    """The FastAPI app; the batching worker runs for the app's lifespan."""
    if not model.has_chat_template:
        raise ModelError(f"{model.model_id} has no chat template: serve a chat (instruct) model")
    if max_batch < 1:
        raise CrystallizedSafetyError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= batch_window <= 1:
        raise CrystallizedSafetyError(f"the batch window must be 0..1000 ms, got {batch_window * 1000:g} ms")
    if max_tokens_limit < 1:
        raise CrystallizedSafetyError(f"--max-tokens-limit must be >= 1, got {max_tokens_limit}")
    if intervention is not None:
        intervention.check(model)
        if intervention.rows is not None:
            raise InterventionError("a served intervention needs one alpha and direction for every request")
    name = model_name or model.model_id
    created = int(time.time())
    fingerprint = _fingerprint(intervention)
    batcher = Batcher(model, intervention, max_batch=max_batch, window=batch_window)
    counter = itertools.count(1)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="crystallized-safety", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str, **kwargs: Any) -> JSONResponse:
        return JSONResponse(error_body(message, **kwargs), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad value')}")

    model_card = {"id": name, "object": "model", "created": created, "owned_by": "crystallized-safety"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != name:
            return error(404, f"the model '{model_id}' does not exist: this server serves '{name}'",
                         param="model", code="model_not_found")  # fmt: skip
        return model_card

    @app.get("/v1/stats")
    async def stats():
        return {
            "model": name,
            "model_id": model.model_id,
            "steering": describe_intervention(intervention),
            "system_fingerprint": fingerprint,
            "max_batch": max_batch,
            "batch_window_ms": batch_window * 1000,
            **batcher.stats(),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"request body is not valid JSON ({exc}): send a JSON object")
        try:
            chat = parse_request(body, model, name, max_tokens_limit)
        except BadRequest as exc:
            return error(exc.status, exc.message, param=exc.param, code=exc.code)
        try:
            done: Completion = await asyncio.wrap_future(batcher.submit(chat))
        except Exception as exc:  # noqa: BLE001 - generation failed: a one-line 500
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return error(500, f"generation failed: {first}", kind="server_error")
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": done.content},
            "finish_reason": "stop" if done.finished else "length",
            "logprobs": None,
        }
        if chat.return_token_ids:
            choice["token_ids"] = list(done.token_ids)
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": fingerprint,
            "choices": [choice],
            "usage": {
                "prompt_tokens": chat.prompt_tokens,
                "completion_tokens": len(done.token_ids),
                "total_tokens": chat.prompt_tokens + len(done.token_ids),
            },
        }
        headers = {"X-Csafety-Batch-Size": str(done.batch_size), "X-Request-Number": str(next(counter))}
        return JSONResponse(payload, headers=headers)

    app.state.batcher = batcher
    return app


def check_port(host: str, port: int) -> None:
    """Fail fast (before loading a model) when the address is taken."""
    if not 0 <= port <= 65535:
        raise CrystallizedSafetyError(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise CrystallizedSafetyError(f"cannot resolve --host '{host}': use an address like 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise CrystallizedSafetyError(
                f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port"
            ) from None


def serve(
    model: Model,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    intervention: Intervention | None = None,
    max_batch: int = 8,
    batch_window: float = 0.015,
    max_tokens_limit: int = 4096,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted; Ctrl-C or SIGTERM shut it down gracefully (queued requests end).

    After a graceful shutdown Ctrl-C returns normally, while SIGTERM ends the process by that signal
    (uvicorn re-raises it), as process managers expect.
    """
    import uvicorn

    app = create_app(
        model,
        model_name=model_name,
        intervention=intervention,
        max_batch=max_batch,
        batch_window=batch_window,
        max_tokens_limit=max_tokens_limit,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raised the signal
        pass
