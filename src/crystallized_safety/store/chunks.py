"""The store's chunks and their generations: a chunk (one batch of prompts under one condition) is written with
its rows, their checksum and its completion mark in one transaction, so a resumed run recomputes exactly the
chunks not marked done; and the generations read back, counted and timed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import astuple

from .connection import Connection
from .files import SUM_COLUMNS, rows_digest
from .schema import GEN_COLUMNS, GenerationRow


class Chunks(Connection):
    """The `chunks`, `generations` and `row_sums` tables."""

    def chunk_timing(self, run_id: str) -> list[tuple[str, str, int, int, float]]:
        """(model, study, chunks, rows, generation seconds) per model and study."""
        rows = self.db.execute(
            "SELECT model, study, COUNT(*), SUM(rows), SUM(seconds) FROM chunks WHERE run_id=? GROUP BY model, study",
            (run_id,),
        )
        return [(m, s, n, r or 0, sec or 0.0) for m, s, n, r, sec in rows]

    def done_chunks(self, run_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT chunk_key FROM chunks WHERE run_id=?", (run_id,))}

    def generated_conditions(self, run_id: str, model: str) -> set[str]:
        """Keys of the conditions of (run, model) with at least one chunk done."""
        rows = self.db.execute("SELECT DISTINCT condition_key FROM chunks WHERE run_id=? AND model=?", (run_id, model))
        return {r[0] for r in rows}

    def write_chunks(
        self,
        run_id: str,
        entries: Sequence[tuple[str, str, str, str, Sequence[GenerationRow]]],
        seconds: float,
        worker: str = "local",
    ) -> int:
        """Write several chunks (chunk_key, model, study, condition_key, rows) and their completion marks in
        ONE transaction: a batch that served several chunks lands whole or not at all. Returns how many
        were new (a chunk already marked done is left as it is)."""
        new = 0
        share = seconds / max(len(entries), 1)
        with self.transaction() as db:
            for chunk_key, model, study, condition_key, rows in entries:
                if db.execute("SELECT 1 FROM chunks WHERE run_id=? AND chunk_key=?", (run_id, chunk_key)).fetchone():
                    continue
                db.executemany(
                    f"INSERT OR REPLACE INTO generations (run_id, {', '.join(GEN_COLUMNS)}) "
                    f"VALUES (?{', ?' * len(GEN_COLUMNS)})",
                    [(run_id, *astuple(row)) for row in rows],
                )
                if rows:  # the chunk's content checksummed: `check` finds a flipped bit SQLite would not
                    digest = rows_digest([getattr(r, c) for c in SUM_COLUMNS] for r in rows)
                    index = [r.prompt_index for r in rows]
                    db.execute("INSERT OR REPLACE INTO row_sums VALUES (?,?,?,?,?,?,?,?)",
                               (run_id, chunk_key, model, condition_key, rows[0].prompt_set, min(index), max(index),
                                digest))  # fmt: skip
                db.execute(
                    "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)",
                    (run_id, chunk_key, model, study, condition_key, len(rows), share, time.time(), worker),
                )
                new += 1
        self.checkpoint()
        return new

    def generations(
        self, run_id: str, model: str | None = None, condition_key: str | None = None, prompt_set: str | None = None
    ) -> list[dict]:
        query, args = "SELECT * FROM generations WHERE run_id=?", [run_id]
        for col, value in (("model", model), ("condition_key", condition_key), ("prompt_set", prompt_set)):
            if value is not None:
                query += f" AND {col}=?"
                args.append(value)
        cur = self.db.execute(query + " ORDER BY model, condition_key, prompt_set, prompt_index", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def counts(self, run_id: str) -> dict[str, int]:
        n_chunks = self.db.execute("SELECT COUNT(*) FROM chunks WHERE run_id=?", (run_id,)).fetchone()[0]
        n_gen = self.db.execute("SELECT COUNT(*) FROM generations WHERE run_id=?", (run_id,)).fetchone()[0]
        seconds = self.db.execute("SELECT COALESCE(SUM(seconds),0) FROM chunks WHERE run_id=?", (run_id,)).fetchone()[0]
        return {"chunks": n_chunks, "generations": n_gen, "generation_seconds": round(seconds, 1)}
