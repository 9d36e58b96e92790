"""Ray executor: the same interface as the local one, packs spread over actors that each open the model
once, with the spec's device and dtype (from the `ModelContext`). The driver writes every result to the
store as it arrives, so resume works exactly as locally.

Results equal the local executor's: actors use the driver's torch thread count (float reductions, hence
greedy tokens, depend on it) and the same pack composition.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...core.model import Model
from ...errors import CrystallizedSafetyError
from ...store import GenerationRow
from ..chunks import Pack
from ..worker import ChunkWorker, ModelContext
from .base import ResultSink


class _Actor:
    def __init__(self, ctx: ModelContext, threads: int, fail_once: frozenset[str]) -> None:
        torch.set_num_threads(threads)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from ...registry import load_model

        model = load_model(ctx.model_name, device=ctx.device, dtype=ctx.dtype)
        self.worker = ChunkWorker(model, ctx)
        self.fail_once = set(fail_once)
        self.name = f"ray:{os.getpid()}"

    def run(self, pack: Pack) -> tuple[list[list[GenerationRow]], float, str]:
        for chunk in pack:
            if chunk.key in self.fail_once:  # fault injection for tests: fail this chunk's first attempt
                self.fail_once.discard(chunk.key)
                raise RuntimeError(f"injected failure for chunk {chunk.key}")
        t0 = time.perf_counter()
        rows = self.worker.run_pack(pack)
        return rows, time.perf_counter() - t0, self.name

    def describe(self) -> dict:
        """What the actor opened (tests check that the spec's device and dtype reached it)."""
        model = self.worker.model
        return {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}


class RayExecutor:
    """Packs over `workers` Ray actors (default 1; each loads the model once); a failed task is resubmitted up
    to `max_retries` times, then the run stops with a one-line error (rerun to resume)."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        max_retries: int = 2,
        fail_once: Sequence[str] = (),
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise CrystallizedSafetyError(
                "the ray executor needs Ray: pip install 'crystallized-safety[ray]'"
            ) from None
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.fail_once = frozenset(fail_once)
        self.retried = 0
        self.actor_info: list[dict] = []

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=max(1, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=256 * 1024 * 1024,
            )

    def run(self, load: Callable[[], Model], ctx: ModelContext, packs: Sequence[Pack], sink: ResultSink) -> None:
        if not packs:
            return
        import ray

        self._init()
        n = self.workers or 1
        cpus = max(1.0, float(ray.available_resources().get("CPU", 1)) / n)
        remote: Any = ray.remote
        actor_cls = remote(num_cpus=cpus, max_restarts=self.max_retries, max_task_retries=self.max_retries)(_Actor)
        threads = torch.get_num_threads()
        actors = [actor_cls.remote(ctx, threads, self.fail_once) for _ in range(n)]
        try:
            self.actor_info = ray.get([a.describe.remote() for a in actors])
            self._drain(actors, list(packs), sink)
        finally:
            for actor in actors:
                ray.kill(actor)

    def _drain(self, actors: list, queue: list[Pack], sink: ResultSink) -> None:
        """Keep every actor busy until the queue is empty; retry a failed pack at the front of the queue."""
        import ray

        pending: dict = {}
        attempts: dict[str, int] = {}

        def submit(actor) -> None:
            pack = queue.pop(0)
            pending[actor.run.remote(pack)] = (pack, actor)

        for actor in actors:
            if queue:
                submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            pack, actor = pending.pop(done[0])
            try:
                rows, seconds, worker = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - a failed task is retried, then reported in one line
                key = pack[0].key
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] > self.max_retries:
                    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    raise CrystallizedSafetyError(
                        f"chunk {key} failed {attempts[key]} times on Ray ({first}); rerun to resume"
                    ) from None
                self.retried += 1
                queue.insert(0, pack)
            else:
                sink(pack, rows, seconds, worker)
            if queue:
                submit(actor)
