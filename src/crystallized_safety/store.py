"""Results store: one SQLite file (WAL), resumable, never mixing runs.

A run is identified by its spec hash: rerunning the same spec resumes it, a changed spec is a new run.
Work is committed in *chunks* (one batch of prompts under one condition): the generations of a chunk and
its completion mark land in one transaction, so a `kill -9` at any point loses at most the chunk in
flight, and a resumed run recomputes exactly that chunk with the same batch composition (same tokens).

Each write is followed by a checkpoint (the WAL's pages copied into the main file), so the `.sqlite` file
alone holds everything but the transaction in flight: copying it without its `-wal` loses at most that. A
run holds a lock (`<store>.lock.<run>`, released by the OS even on `kill -9`) so that two processes never
compute the same run twice; a run that raises is marked `failed` with its reason. Read-only stores (media,
permissions) open read-only for status, export and report.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from . import jsonio, store_files
from .errors import StoreError
from .store_files import RunLock

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_yaml TEXT NOT NULL, spec_hash TEXT NOT NULL,
    created REAL NOT NULL, finished REAL, status TEXT NOT NULL, environment TEXT NOT NULL, error TEXT
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
CREATE TABLE IF NOT EXISTS row_sums (
    run_id TEXT NOT NULL, chunk_key TEXT NOT NULL, model TEXT NOT NULL, condition_key TEXT NOT NULL,
    prompt_set TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (run_id, chunk_key)
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


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    spec_hash: str
    created: float
    finished: float | None
    status: str
    error: str | None = None


def wal_damage(path: Path) -> str | None:
    """What is wrong with the store's WAL, in one line, or None. Checked before SQLite opens the store: a damaged
    header makes SQLite ignore the whole WAL (and reset it on the next write), a damaged frame every commit after
    it; either way the WAL is first kept as `<store>-wal.damaged`, so nothing is thrown away."""
    wal = Path(f"{path}-wal")
    try:
        data = wal.read_bytes() if wal.is_file() else b""
    except OSError:
        return None
    problem = store_files.header_problem(data)
    if problem is None:
        lost = wal_commits_beyond_valid(path, data)
        if not lost:
            return None
        problem, missing = "held committed transactions past a damaged frame, which SQLite ignores", str(lost)
    else:
        store_files.keep_damaged(wal, data)
        count = store_files.commits_behind_damaged_header(data, store_files.db_page_size(path))
        missing = "its" if count is None else f"up to {count}"
    return (
        f"{wal.name} {problem}: {missing} committed transaction(s) not yet in {path.name} are missing and a resumed "
        f"run recomputes them (the WAL is kept as {wal.name}.damaged)"
    )


def wal_commits_beyond_valid(path: Path, data: bytes | None = None) -> int:
    """Commit frames of the current WAL generation that follow its first damaged frame: transactions SQLite
    will silently drop on recovery (0 for a WAL whose header is damaged: `wal_damage` handles that first).
    Frame checksums are left to SQLite, whose valid frame count comes from opening the file."""
    if data is None:
        try:
            data = Path(f"{path}-wal").read_bytes()
        except OSError:
            return 0
    if len(data) < store_files.HEADER or store_files.header_problem(data) is not None:
        return 0
    frames = store_files.commit_frames(data, int.from_bytes(data[8:12], "big"))
    valid = _valid_wal_frames(path)  # SQLite recovers the valid prefix (and removes the WAL when it closes)
    lost = 0 if valid is None else sum(1 for commit in frames[valid:] if commit)
    if lost:  # keep the damaged WAL beside the store: nothing is thrown away
        store_files.keep_damaged(Path(f"{path}-wal"), data)
    return lost


def _valid_wal_frames(path: Path) -> int | None:
    """How many WAL frames SQLite accepts (it verifies the checksums), read through a passive checkpoint on a
    private connection; None when that cannot be asked (read-only media, a busy writer)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=1, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        busy, log, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return None if busy or log < 0 else int(log)
    except sqlite3.Error:
        return None
    finally:
        db.close()


class Store:
    """Thin, explicit access to the SQLite results file. `readonly=True` (status, export, report) never writes
    and also opens stores on read-only media; `warnings` lists what opening found wrong (a damaged WAL)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.warnings: list[str] = []
        if readonly and not self.path.is_file():
            raise StoreError(f"store '{self.path}' does not exist: run `csafety run CONFIG --store {self.path}`")
        damage = wal_damage(self.path) if self.path.is_file() else None
        try:
            self.db = self._open_readonly() if readonly else self._open_writable()
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"'{self.path}' is not a crystallized-safety store ({exc}); pass another --store"
            ) from None
        if row is None and not readonly:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"'{self.path}' has schema v{row[0] if row else '?'}, this tool reads v{SCHEMA_VERSION}: "
                "use a new --store"
            )
        if damage:
            self.warnings.append(damage)

    def _open_writable(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"cannot create store '{self.path}': a parent of it is a file, not a directory") from None
        except OSError as exc:
            raise StoreError(f"cannot create store '{self.path}': {exc.strerror}") from None
        try:
            db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self._refuse_unknown(db)  # before WAL mode or a table is added to another tool's database
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA journal_size_limit=0")  # a reset WAL is truncated: no stale frames left behind
            db.executescript(SCHEMA)
            if "error" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN error TEXT")  # stores written before runs kept a reason
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise StoreError(
                    f"cannot write store '{self.path}' ({exc}): it is on read-only media or not writable; pass a "
                    "writable --store (status, export and report can still read it)"
                ) from None
            raise
        return db

    def _refuse_unknown(self, db: sqlite3.Connection) -> None:
        """A database holding tables but no `meta` is another tool's, one of another schema version another tool
        version's: adopting either would add tables to it and switch it to WAL. Only an empty database (or a new
        file) becomes a store; status/report/check/export refuse the same files."""
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        found = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if "meta" in tables else None
        version = None if found is None else str(found[0])
        if tables and "meta" not in tables:
            db.close()
            shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
            raise StoreError(
                f"'{self.path}' is not a crystallized-safety store (another database: tables {shown}); pass a new "
                "--store"
            )
        if version is not None and version != str(SCHEMA_VERSION):
            db.close()
            raise StoreError(
                f"'{self.path}' has schema v{version}, this tool reads v{SCHEMA_VERSION}: use a new --store"
            )

    def _open_readonly(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        try:
            db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError:  # read-only media: the WAL index cannot be created
            pass
        wal = Path(f"{self.path}-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            self.warnings.append(
                f"{wal.name} cannot be read on read-only media: what was committed only there is not shown; copy the "
                "store with its -wal file to writable storage to see it"
            )
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)

    def checkpoint(self) -> None:
        """Copy the WAL into the main file (the `.sqlite` file alone then holds every committed chunk)."""
        if not self.readonly:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if not self.readonly:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:  # another process holds the WAL: it checkpoints when it ends
                pass
        self.db.close()

    # -- locks, backups, checks
    def lock_run(self, run_id: str) -> RunLock:
        return RunLock(Path(f"{self.path}.lock.{run_id[:16]}"))

    def run_active(self, run_id: str) -> bool:
        """Whether a process holds this run's lock now (a 'running' run without one was interrupted)."""
        try:
            fd = os.open(f"{self.path}.lock.{run_id[:16]}", os.O_RDONLY)
        except OSError:  # no lock file: no process ever ran it here
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def backup(self, target: str | Path) -> Path:
        """A consistent single-file copy (WAL included, even while a run writes)."""
        target = Path(target)
        if target.exists():
            raise StoreError(f"'{target}' exists: pass a new path for the backup")
        try:
            dest = sqlite3.connect(str(target))
        except sqlite3.OperationalError as exc:
            raise StoreError(f"cannot write backup '{target}' ({exc}): pass a path in a writable directory") from None
        with dest:
            self.db.backup(dest)
        dest.execute("PRAGMA journal_mode=DELETE")
        dest.close()
        return target

    def check(self) -> list[str]:
        """Problems found: SQLite's integrity check, a damaged WAL, chunks whose rows are missing."""
        problems = list(self.warnings)
        kept = Path(f"{self.path}-wal.damaged")
        if kept.is_file() and not any(kept.name in p for p in problems):  # found by an earlier open
            problems.append(f"{kept.name} holds a damaged WAL found earlier: transactions in it were lost; resume "
                            "the run to recompute them, then delete the file")  # fmt: skip
        result = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            problems += [f"integrity: {line}" for line in result[:10]]
        for run_id, model, condition, rows, found in self.db.execute(
            "SELECT c.run_id, c.model, c.condition_key, SUM(c.rows), (SELECT COUNT(*) FROM generations g WHERE "
            "g.run_id = c.run_id AND g.model = c.model AND g.condition_key = c.condition_key) FROM chunks c "
            "GROUP BY c.run_id, c.model, c.condition_key"
        ):
            if found != rows:
                problems.append(
                    f"run {run_id}: {model} condition {condition}: its chunks are marked done with {rows} rows but "
                    f"{found} are stored"
                )
        return problems + self._changed_rows()

    def _changed_rows(self) -> list[str]:
        """Chunks whose stored rows no longer match the checksum written with them (stores written before the
        checksums existed have none: nothing to compare)."""
        if "row_sums" not in self.tables():
            return []
        problems = []
        query = (
            f"SELECT {', '.join(store_files.SUM_COLUMNS)} FROM generations WHERE run_id=? AND model=? AND "
            "condition_key=? AND prompt_set=? AND prompt_index BETWEEN ? AND ? ORDER BY prompt_index"
        )
        for run_id, model, condition, prompt_set, first, last, digest in self.db.execute(
            "SELECT run_id, model, condition_key, prompt_set, first, last, digest FROM row_sums ORDER BY rowid"
        ).fetchall():
            rows = self.db.execute(query, (run_id, model, condition, prompt_set, first, last)).fetchall()
            if rows and store_files.rows_digest(rows) != digest:
                problems.append(
                    f"run {run_id}: {model} condition {condition} prompts {first}..{last}: the stored rows changed "
                    "since they were written (checksum mismatch: a flipped bit or an edit); restore a backup or "
                    "rerun the run on a new --store"
                )
        return problems

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
                db.execute("UPDATE runs SET status='running', finished=NULL, error=NULL WHERE run_id=?", (run_id,))
                return True
            db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,NULL,'running',?,NULL)",
                (run_id, name, spec_yaml, spec_hash, time.time(), jsonio.dumps(environment)),
            )
            return False

    def finish_run(self, run_id: str) -> None:
        self.db.execute("UPDATE runs SET status='finished', finished=? WHERE run_id=?", (time.time(), run_id))
        self.checkpoint()

    def fail_run(self, run_id: str, reason: str) -> None:
        """Mark a run failed (or interrupted) with its reason, kept in the run's row."""
        status = "interrupted" if reason == "interrupted" else "failed"
        self.db.execute(
            "UPDATE runs SET status=?, finished=?, error=? WHERE run_id=?", (status, time.time(), reason[:500], run_id)
        )
        self.checkpoint()

    def runs(self) -> list[RunInfo]:
        has_error = "error" in {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        rows = self.db.execute(
            f"SELECT run_id, name, spec_hash, created, finished, status, {'error' if has_error else 'NULL'} "
            "FROM runs ORDER BY created"
        )
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
            (run_id, model, kind, jsonio.dumps(data) if data is not None else None, blob),
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
                if rows:  # the chunk's content checksummed: `check` finds a flipped bit SQLite would not
                    digest = store_files.rows_digest([getattr(r, c) for c in store_files.SUM_COLUMNS] for r in rows)
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

    # -- analyses and verdicts
    def put_analysis(self, run_id: str, model: str, study: str, kind: str, result: dict, seconds: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO analyses VALUES (?,?,?,?,?,?)",
            (run_id, model, study, kind, jsonio.dumps(result), seconds),
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
            "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?)", (run_id, model, verdict, rule, jsonio.dumps(evidence))
        )

    def verdicts(self, run_id: str) -> list[dict]:
        rows = self.db.execute(
            "SELECT model, verdict, rule, evidence FROM verdicts WHERE run_id=? ORDER BY model", (run_id,)
        )
        return [{"model": m, "verdict": v, "rule": r, "evidence": json.loads(e)} for m, v, r, e in rows]

    # -- copies and generic cell access (the blind copy, `blind_store`, scrubs every table through these)
    def copy_run(self, run_id: str, path: str | Path) -> Store:
        """A copy of one run at `path`, without analyses or verdicts: what a blind re-analysis starts from (it
        still names the models: `blind_store.blind_copy` scrubs them)."""
        target = Path(path)
        if target.exists():
            raise StoreError(f"'{target}' exists: pass a new path for the copy")
        with sqlite3.connect(str(target)) as dest:
            self.db.backup(dest)
        dest.close()
        copy = Store(target)
        with copy.transaction() as db:
            for table in ("runs", "artifacts", "chunks", "generations", "row_sums"):
                db.execute(f"DELETE FROM {table} WHERE run_id != ?", (run_id,))
            db.execute("DELETE FROM analyses")
            db.execute("DELETE FROM verdicts")
        return copy

    def tables(self) -> dict[str, list[str]]:
        """Every table of the file and its columns, read from the file itself (not from SCHEMA), so a walk over
        them also covers tables and columns this version does not know."""
        names = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: [c[1] for c in self.db.execute(f'PRAGMA table_info("{t}")')] for t in names}

    def _table(self, table: str, columns: Sequence[str] = ()) -> None:
        known = self.tables()
        if table not in known or any(c not in known[table] for c in columns):
            raise StoreError(f"no table '{table}' with columns {list(columns)} in {self.path}: a bug, report it")

    def rows(self, table: str) -> list[tuple[int, dict[str, Any]]]:
        """(rowid, {column: value}) of every row of `table`."""
        self._table(table)
        cur = self.db.execute(f'SELECT rowid, * FROM "{table}" ORDER BY rowid')
        names = [d[0] for d in cur.description][1:]
        return [(row[0], dict(zip(names, row[1:]))) for row in cur.fetchall()]

    def rewrite(self, table: str, updates: dict[int, dict[str, Any]], deletions: Sequence[int] = ()) -> None:
        """Set columns of rows by rowid and delete rows by rowid, in one transaction."""
        self._table(table, sorted({c for values in updates.values() for c in values}))
        content = {c for values in updates.values() for c in values} & set(store_files.SUM_COLUMNS)
        with self.transaction() as db:
            if table == "generations" and (content or deletions) and "row_sums" in self.tables():
                db.execute("DELETE FROM row_sums")  # rewritten content (a scrubbed copy) has no checksum left
            for rowid in deletions:
                db.execute(f'DELETE FROM "{table}" WHERE rowid=?', (rowid,))
            for rowid, values in updates.items():
                sets = ", ".join(f'"{c}"=?' for c in values)
                db.execute(f'UPDATE "{table}" SET {sets} WHERE rowid=?', (*values.values(), rowid))

    def compact(self) -> None:
        """Rebuild the file (VACUUM) and empty the WAL: deleted or overwritten values leave no bytes behind."""
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- export
    def export(self, run_id: str, fmt: str) -> str:
        """The run as JSON (run, verdicts, analyses, generations) or its generations as CSV."""
        from .store_export import export_run

        return export_run(self, run_id, fmt, GEN_COLUMNS)
