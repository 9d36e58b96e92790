"""The store's runs: opening (or resuming) a run by its spec hash, finishing or failing it, listing and finding
runs, and the run's lock (`<store>.lock.<run>`, held while a process computes it)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from .. import jsonio
from ..errors import StoreError
from .connection import Connection
from .files import RunLock
from .schema import RunInfo


class Runs(Connection):
    """The `runs` table and the runs' locks."""

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

    def rename_run(self, run_id: str, new_id: str, spec_yaml: str) -> None:
        """Give a run (in a copy) the id and spec of a new spec that re-judges it: every table's rows follow, the
        run is left `interrupted` (a resume generates what the new spec adds, then decides)."""
        tables = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (new_id,)).fetchone() is not None:
                raise StoreError(f"run {new_id} is already in {self.path}: use a new copy")
            for table in tables:
                if "run_id" in {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}:
                    db.execute(f'UPDATE "{table}" SET run_id=? WHERE run_id=?', (new_id, run_id))
            db.execute(
                "UPDATE runs SET spec_yaml=?, spec_hash=?, status='interrupted', finished=NULL, error=? WHERE run_id=?",
                (spec_yaml, new_id, f"re-judged from run {run_id}: resume it to decide", new_id),
            )

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
