"""The batching worker: one thread that turns concurrently queued requests into batched generate calls
through the reference engine, under the server's one intervention; out-of-memory splits a group in halves."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..core.generation.oom import in_batches
from ..core.generation.reference import Decoding, reference_batch
from ..core.model import Model
from ..core.steering import Intervention
from .request import ChatRequest


@dataclass(frozen=True)
class Completion:
    content: str
    token_ids: tuple[int, ...]
    finished: bool
    batch_size: int
    degenerate: str | None = None  # why a steered output is garbage (core.generation.output): answered as an error


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
        self._cancelled = 0

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
            if item is not None and not item.future.done() and item.future.set_running_or_notify_cancel():
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
                "cancelled": self._cancelled,
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
                if not request.future.set_running_or_notify_cancel():  # its client went away: skip it
                    with self._lock:
                        self._cancelled += 1
                    continue
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
        """Generate for a group; on out-of-memory, in halves (the policy `generate` follows)."""
        return in_batches(len(group), len(group), lambda rows: self._generate(group[rows]))

    def _generate(self, group: Sequence[ChatRequest]) -> list[Completion]:
        """One batched generate over already chat-formatted texts (the reference engine)."""
        first = group[0]
        decoding = Decoding(
            max(r.max_tokens for r in group), first.do_sample, first.temperature, first.top_p, first.seed
        )
        texts = [r.text for r in group]
        gens = reference_batch(self.model, texts, texts, self.intervention, decoding)
        out = []
        for request, gen in zip(group, gens):
            ids = gen.token_ids[: request.max_tokens]
            finished = gen.finished and len(gen.token_ids) < request.max_tokens
            content = gen.response
            if len(ids) < len(gen.token_ids):
                content = self.model.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
            degenerate = gen.degenerate if self.intervention is not None else None  # only steering is to blame
            out.append(Completion(content, tuple(ids), finished, len(group), degenerate))
        return out
