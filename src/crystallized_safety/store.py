"""Results store: one SQLite file (WAL), resumable, never mixing runs.

A run is identified by its spec hash: rerunning the same spec resumes it, a changed spec is a new run.
Work is committed in *chunks* (one batch of prompts under one condition): the generations of a chunk and
its completion mark land in one transaction, so a `kill -9` at any point loses at most the chunk in
flight, and a resumed run recomputes exactly that chunk with the same batch composition (same tokens).
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CrystallizedSafetyError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_yaml TEXT NOT NULL, spec_hash TEXT NOT NULL,
    created REAL NOT NULL, finished REAL, status TEXT NOT NULL, environment TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL, json TEXT, blob BLOB,
    PRIMARY KEY (run_id, model, kind)
);
CREATE TABLE IF NOT EXISTS chunks (
    run_id TEXT NOT NULL, chunk_key TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL,
    condition_key TEXT NOT NULL, rows INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL,
    worker TEXT, PRIMARY KEY (run_id, chunk_key)
);
CREATE TABLE IF NOT EXISTS generations (
    run_id TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL, condition_key TEXT NOT NULL,
    condition TEXT NOT NULL, prompt_set TEXT NOT NULL, prompt_index INTEGER NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, n_tokens INTEGER NOT NULL, finished INTEGER NOT NULL,
    refusal INTEGER, judge TEXT NOT NULL, judge_reason TEXT, score REAL,
    coherent INTEGER, perplexity REAL, distinct_n REAL, token_ids TEXT NOT NULL,
    PRIMARY KEY (run_id, model, condition_key, prompt_set, prompt_index)
);
CREATE TABLE IF NOT EXISTS analyses (
    run_id TEXT NOT NULL, model TEXT NOT NULL, study TEXT NOT NULL, kind TEXT NOT NULL, result TEXT NOT NULL,
    seconds REAL, PRIMARY KEY (run_id, model, study)
);
CREATE TABLE IF NOT EXISTS verdicts (
    run_id TEXT NOT NULL, model TEXT NOT NULL, verdict TEXT NOT NULL, rule TEXT NOT NULL, evidence TEXT NOT NULL,
    PRIMARY KEY (run_id, model)
);
"""


@dataclass(frozen=True)
class GenerationRow:
    """One stored generation: exactly the columns of the `generations` table (after `run_id`)."""

    model: str
    study: str
    condition_key: str
    condition: str  # the condition as JSON
    prompt_set: str
    prompt_index: int
    prompt: str
    response: str
    n_tokens: int
    finished: int
    refusal: int | None
    judge: str
    judge_reason: str | None
    score: float | None
    coherent: int | None
    perplexity: float | None
    distinct_n: float | None
    token_ids: str  # JSON list


GEN_COLUMNS = tuple(f.name for f in fields(GenerationRow))


class StoreError(CrystallizedSafetyError):
    """A store file that cannot be used (not SQLite, another schema, unknown run)."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    spec_hash: str
    created: float
    finished: float | None
    status: str


class Store:
    """Thin, explicit access to the SQLite results file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"'{self.path}' is not a crystallized-safety store ({exc}); pass another --store"
            ) from None
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"'{self.path}' has schema v{row[0]}, this tool writes v{SCHEMA_VERSION}: use a new --store"
            )

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- runs
    def open_run(self, run_id: str, name: str, spec_yaml: str, spec_hash: str, environment: dict) -> bool:
        """Create the run if new; returns True when resuming an existing one."""
        with self.transaction() as db:
            row = db.execute("SELECT spec_hash FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is not None:
                if row[0] != spec_hash:
                    raise StoreError(f"run {run_id} in {self.path} was made by another spec; use a new --store")
                db.execute("UPDATE runs SET status='running', finished=NULL WHERE run_id=?", (run_id,))
                return True
            db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,NULL,'running',?)",
                (run_id, name, spec_yaml, spec_hash, time.time(), json.dumps(environment)),
            )
            return False

    def finish_run(self, run_id: str) -> None:
        self.db.execute("UPDATE runs SET status='finished', finished=? WHERE run_id=?", (time.time(), run_id))

    def runs(self) -> list[RunInfo]:
        rows = self.db.execute("SELECT run_id, name, spec_hash, created, finished, status FROM runs ORDER BY created")
        return [RunInfo(*row) for row in rows]

    def run(self, run_id: str | None = None) -> RunInfo:
        runs = self.runs()
        if not runs:
            raise StoreError(f"'{self.path}' holds no runs: run `csafety run CONFIG.yaml --store {self.path}` first")
        if run_id is None:
            return runs[-1]
        for info in runs:
            if info.run_id == run_id or info.run_id.startswith(run_id):
                return info
        raise StoreError(f"no run '{run_id}' in {self.path}; runs: {', '.join(r.run_id for r in runs)}")

    def run_row(self, run_id: str) -> dict:
        cur = self.db.execute("SELECT * FROM runs WHERE run_id=?", (run_id,))
        names = [d[0] for d in cur.description]
        return dict(zip(names, cur.fetchone()))

    # -- artifacts (directions, calibrations): json and/or bytes
    def put_artifact(self, run_id: str, model: str, kind: str, data: Any = None, blob: bytes | None = None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?)",
            (run_id, model, kind, json.dumps(data) if data is not None else None, blob),
        )

    def get_artifact(self, run_id: str, model: str, kind: str) -> tuple[Any, bytes | None] | None:
        row = self.db.execute(
            "SELECT json, blob FROM artifacts WHERE run_id=? AND model=? AND kind=?", (run_id, model, kind)
        ).fetchone()
        if row is None:
            return None
        return (json.loads(row[0]) if row[0] is not None else None), row[1]

    # -- chunks and generations
    def cached(
        self, run_id: str, model: str, kind: str, compute: Callable[[], tuple[Any, bytes | None]]
    ) -> tuple[Any, bytes | None]:
        """The artifact `kind` of (run, model): read from the store, or computed once by `compute()` -> (json
        data, blob), stored, and read back (so a resumed run and a fresh one see the same stored form)."""
        found = self.get_artifact(run_id, model, kind)
        if found is None:
            data, blob = compute()
            self.put_artifact(run_id, model, kind, data, blob)
            found = self.get_artifact(run_id, model, kind)
            assert found is not None
        return found

    def artifact_kinds(self, run_id: str, model: str) -> list[str]:
        rows = self.db.execute("SELECT kind FROM artifacts WHERE run_id=? AND model=? ORDER BY kind", (run_id, model))
        return [r[0] for r in rows]

    def chunk_timing(self, run_id: str) -> list[tuple[str, str, int, int, float]]:
        """(model, study, chunks, rows, generation seconds) per model and study."""
        rows = self.db.execute(
            "SELECT model, study, COUNT(*), SUM(rows), SUM(seconds) FROM chunks WHERE run_id=? GROUP BY model, study",
            (run_id,),
        )
        return [(m, s, n, r or 0, sec or 0.0) for m, s, n, r, sec in rows]

    def done_chunks(self, run_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT chunk_key FROM chunks WHERE run_id=?", (run_id,))}

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
                db.execute(
                    "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)",
                    (run_id, chunk_key, model, study, condition_key, len(rows), share, time.time(), worker),
                )
                new += 1
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

    # -- analyses and verdicts
    def put_analysis(self, run_id: str, model: str, study: str, kind: str, result: dict, seconds: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO analyses VALUES (?,?,?,?,?,?)",
            (run_id, model, study, kind, json.dumps(result), seconds),
        )

    def analyses(self, run_id: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT model, study, kind, result, seconds FROM analyses WHERE run_id=? ORDER BY model, rowid", (run_id,)
        )
        return [
            {"model": m, "study": s, "kind": k, "result": json.loads(r), "seconds": sec} for m, s, k, r, sec in rows
        ]

    def put_verdict(self, run_id: str, model: str, verdict: str, rule: str, evidence: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?)", (run_id, model, verdict, rule, json.dumps(evidence))
        )

    def verdicts(self, run_id: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT model, verdict, rule, evidence FROM verdicts WHERE run_id=? ORDER BY model", (run_id,)
        )
        return [{"model": m, "verdict": v, "rule": r, "evidence": json.loads(e)} for m, v, r, e in rows]

    # -- blind re-analysis
    def blind_copy(self, run_id: str, path: str | Path, names: dict[str, str]) -> Store:
        """A copy of one run at `path` with every model renamed (`names`: real -> anonymous) and no analyses
        or verdicts: what a blind re-analysis starts from."""
        target = Path(path)
        if target.exists():
            raise StoreError(f"'{target}' exists: pass a new path for the blind copy")
        with sqlite3.connect(str(target)) as dest:
            self.db.backup(dest)
        dest.close()
        copy = Store(target)
        with copy.transaction() as db:
            for table in ("runs", "artifacts", "chunks", "generations"):
                db.execute(f"DELETE FROM {table} WHERE run_id != ?", (run_id,))
            db.execute("DELETE FROM analyses")
            db.execute("DELETE FROM verdicts")
            for real, anonymous in names.items():
                for table in ("artifacts", "chunks", "generations"):
                    db.execute(f"UPDATE {table} SET model=? WHERE model=?", (anonymous, real))
        return copy

    # -- export
    def export(self, run_id: str, fmt: str) -> str:
        if fmt == "json":
            row = self.run_row(run_id)
            payload = {
                "run": {**row, "environment": json.loads(row["environment"])},
                "verdicts": self.verdicts(run_id),
                "analyses": self.analyses(run_id),
                "generations": self.generations(run_id),
            }
            return json.dumps(payload, indent=1, ensure_ascii=False)
        if fmt == "csv":
            rows = self.generations(run_id)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["run_id", *GEN_COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
            return buf.getvalue()
        raise CrystallizedSafetyError(f"unknown export format '{fmt}': use json or csv")
