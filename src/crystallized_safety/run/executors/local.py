"""In-process executor: packs run in order on the model the runner already loaded."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ...core.model import Model
from ..chunks import Pack
from ..worker import ChunkWorker, ModelContext
from .base import ResultSink


class LocalExecutor:
    name = "local"

    def run(self, load: Callable[[], Model], ctx: ModelContext, packs: Sequence[Pack], sink: ResultSink) -> None:
        if not packs:
            return
        worker = ChunkWorker(load(), ctx)
        for pack in packs:
            t0 = time.perf_counter()
            rows = worker.run_pack(pack)
            sink(pack, rows, time.perf_counter() - t0, "local")
