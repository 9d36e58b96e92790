"""Generation on demand: the chunks of chosen conditions, generated through the executor into the store, for the
adaptive steps that decide what to generate next from what was generated (screening's confirmation, the
frontier walk). Chunks already in the store are skipped, so a resumed run repeats nothing."""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

from ..core.model import Model
from ..experiments import reading
from ..experiments.conditions import Condition
from ..experiments.results import Cells
from ..store import Store
from .chunks import Chunk, Pack, make_packs
from .executors.base import Executor
from .worker import ModelContext


class CellGenerator:
    """Generates the planned chunks of given conditions (only those the store lacks) and reads the model's cells."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        executor: Executor,
        load: Callable[[], Model],
        ctx: ModelContext,
        chunks: list[Chunk],
        rows: int = 0,
        read: bool = False,
    ) -> None:
        """`read`: flips at length count only when read (`verdict.confirm_by: reading`), so cells see the readings."""
        self.store, self.run_id, self.executor, self.load, self.ctx = store, run_id, executor, load, ctx
        self.chunks, self.rows, self.read = chunks, rows, read

    def _sink(self, pack: Pack, rows_out, seconds: float, worker: str) -> None:
        entries = [(c.key, c.model, c.study, c.condition.key, r) for c, r in zip(pack, rows_out)]
        self.store.write_chunks(self.run_id, entries, seconds, worker)

    def __call__(
        self, conds: list[Condition], pack_rows: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> None:
        keys = {c.key for c in conds}
        self.run_chunks([c for c in self.chunks if c.condition.key in keys], pack_rows, progress)

    def run_chunks(
        self, chunks: list[Chunk], pack_rows: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Generate the given chunks (packed where they share prompts and length) that the store lacks;
        `progress(packs done, packs)` is called as each pack is stored."""
        done = self.done()
        todo = [c for c in chunks if c.key not in done]
        if not todo:
            return
        rows = self.rows if pack_rows is None else pack_rows
        packs = make_packs(todo, rows)
        sink = self._sink
        if progress is not None:
            progress(0, len(packs))
            stored = count(1)

            def sink(pack: Pack, rows_out, seconds: float, worker: str) -> None:
                self._sink(pack, rows_out, seconds, worker)
                progress(next(stored), len(packs))

        self.executor.run(self.load, self.ctx, packs, sink)

    def done(self) -> set[str]:
        """Keys of the chunks the store holds."""
        return self.store.done_chunks(self.run_id)

    def cells(self) -> Cells:
        name = self.ctx.model_name
        readings = reading.labels(self.store, self.run_id, name) if self.read else None
        return Cells(self.store.generations(self.run_id, name), readings=readings)
