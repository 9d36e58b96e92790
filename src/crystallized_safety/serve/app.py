"""Serve a local model, optionally steered, as an OpenAI-compatible chat-completions API.

Any OpenAI client (or `LLMJudge`) can then talk to a steered model: `GET /v1/models`,
`POST /v1/chat/completions` (non-streaming, n=1), plus `GET /v1/stats` (requests, batches, batch sizes).

Concurrent requests are batched: a worker thread takes the first queued request, collects whatever
else arrives within `batch_window` seconds (up to `max_batch`), groups requests whose decoding settings
agree (greedy, or the same temperature / top_p / seed) and runs ONE batched, left-padded generate per
group through the reference engine (`core.generation.reference`, as `generate(engine="hf")`), under the
server's one `Intervention`.
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
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..core.model import Model
from ..core.steering import Intervention
from ..errors import CrystallizedSafetyError, InterventionError, ModelError, first_line
from .batching import Batcher, Completion
from .request import BadRequest, ChatRequest, decode_body, error_body, parse_request

MAX_BODY_BYTES = 2 * 1024 * 1024  # far above any prompt that fits a context window; larger bodies get a 413
DISCONNECT_POLL_S = 0.2

# --------------------------------------------------------------------------- app


def describe_intervention(intervention: Intervention | None) -> dict[str, Any] | None:
    if intervention is None:
        return None
    return {
        "layers": intervention.layers,
        "alpha": float(intervention.alpha),
        "mode": intervention.mode.name,
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


@dataclass(frozen=True)
class ServeConfig:
    """What a server serves and how it batches, for `create_app` and `serve` (`csafety serve` builds one from its
    options). `model_name`: the name clients send (default: the model's id); `intervention`: the one steering
    applied to every request (None: unsteered); `max_batch` requests at most per batched generate, collected for
    up to `batch_window` seconds; `max_tokens_limit`: the largest `max_tokens` a request may ask for; request
    bodies over `max_body_bytes` are refused unread (413)."""

    model_name: str | None = None
    intervention: Intervention | None = None
    max_batch: int = 8
    batch_window: float = 0.015
    max_tokens_limit: int = 4096
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(model: Model, config: ServeConfig | None = None):
    """The FastAPI app serving `model` as `config` says; the batching worker runs for the app's lifespan.
    Decoding and tokenising run off the event loop; a request whose client disconnects before its batch starts
    is dropped from the queue."""
    config = config or ServeConfig()
    _check_settings(model, config)
    intervention, max_batch, batch_window = config.intervention, config.max_batch, config.batch_window
    max_tokens_limit, max_body_bytes = config.max_tokens_limit, config.max_body_bytes
    name = config.model_name or model.model_id
    fingerprint = _fingerprint(intervention)
    batcher = Batcher(model, intervention, max_batch=max_batch, window=batch_window)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="crystallized-safety", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    model_card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "crystallized-safety"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != name:
            return _error(404, f"the model '{model_id}' does not exist: this server serves '{name}'",
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

    counter = itertools.count(1)

    def parse(raw: bytes) -> ChatRequest:
        return parse_request(decode_body(raw), model, name, max_tokens_limit)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await _read_body(request, max_body_bytes)
            chat = await asyncio.to_thread(parse, raw)  # tokenising a long prompt must not block other requests
        except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing worth a traceback
            return Response(status_code=499)
        except BadRequest as exc:
            return _error(exc.status, exc.message, param=exc.param, code=exc.code)
        done = await _wait_for(request, batcher, chat)
        if not isinstance(done, Completion):
            return done
        if done.degenerate is not None:  # the server's steering is at fault, not the request: a 500, not empty text
            return _error(500, f"the steered model's output is degenerate ({done.degenerate}): the server's "
                          "steering is too strong; restart it with a smaller --alpha", kind="server_error",
                          code="degenerate_output")  # fmt: skip
        headers = {"X-Csafety-Batch-Size": str(done.batch_size), "X-Request-Number": str(next(counter))}
        return JSONResponse(_completion_payload(chat, done, name, fingerprint), headers=headers)

    app.state.batcher = batcher
    return app


async def _wait_for(request: Request, batcher: Batcher, chat: ChatRequest) -> Completion | Response:
    """The request's completion; a 499 (and the queued request dropped) when its client disconnects first; a
    one-line 500 when generation fails."""
    future = asyncio.wrap_future(batcher.submit(chat))
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if not future.done() and await request.is_disconnected():
                future.cancel()  # cancels the queued request too: the batcher skips it
                return Response(status_code=499)
        return future.result()
    except Exception as exc:  # noqa: BLE001 - generation failed: a one-line 500
        first = first_line(exc)
        return _error(500, f"generation failed: {first}", kind="server_error")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    too_big = f"request body over {limit:,} bytes: send a shorter prompt"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(too_big, code="request_too_large", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(too_big, code="request_too_large", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_settings(model: Model, config: ServeConfig) -> None:
    if not model.has_chat_template:
        raise ModelError(f"{model.model_id} has no chat template: serve a chat (instruct) model")
    if config.max_batch < 1:
        raise CrystallizedSafetyError(f"--max-batch must be >= 1, got {config.max_batch}")
    if not 0 <= config.batch_window <= 1:
        raise CrystallizedSafetyError(f"the batch window must be 0..1000 ms, got {config.batch_window * 1000:g} ms")
    if config.max_tokens_limit < 1:
        raise CrystallizedSafetyError(f"--max-tokens-limit must be >= 1, got {config.max_tokens_limit}")
    intervention = config.intervention
    if intervention is not None:
        intervention.check(model)
        if intervention.rows is not None:
            raise InterventionError("a served intervention needs one alpha and direction for every request")


def _error(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Framework errors (404 routes, validation) in the OpenAI error shape too."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad value')}")


def _completion_payload(chat: ChatRequest, done: Completion, name: str, fingerprint: str) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": done.content},
        "finish_reason": "stop" if done.finished else "length",
        "logprobs": None,
    }
    if chat.return_token_ids:
        choice["token_ids"] = list(done.token_ids)
    return {
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
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Run `create_app(model, config)` on host:port until interrupted; Ctrl-C or SIGTERM shut it down gracefully
    (queued requests end).

    After a graceful shutdown Ctrl-C returns normally, while SIGTERM ends the process by that signal
    (uvicorn re-raises it), as process managers expect.
    """
    import uvicorn

    app = create_app(model, config)
    server = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on")
    try:
        uvicorn.Server(server).run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully, then re-raised the signal
        pass
