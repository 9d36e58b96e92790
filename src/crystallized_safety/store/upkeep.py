"""The store's upkeep: a consistent backup, the check (SQLite's integrity check, a damaged WAL, chunks whose
rows are missing or changed since they were written) and compaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import StoreError
from .connection import Connection
from .files import SUM_COLUMNS, rows_digest


class Upkeep(Connection):
    """Backup, check and compaction of the whole file."""

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
            f"SELECT {', '.join(SUM_COLUMNS)} FROM generations WHERE run_id=? AND model=? AND "
            "condition_key=? AND prompt_set=? AND prompt_index BETWEEN ? AND ? ORDER BY prompt_index"
        )
        for run_id, model, condition, prompt_set, first, last, digest in self.db.execute(
            "SELECT run_id, model, condition_key, prompt_set, first, last, digest FROM row_sums ORDER BY rowid"
        ).fetchall():
            rows = self.db.execute(query, (run_id, model, condition, prompt_set, first, last)).fetchall()
            if rows and rows_digest(rows) != digest:
                problems.append(
                    f"run {run_id}: {model} condition {condition} prompts {first}..{last}: the stored rows changed "
                    "since they were written (checksum mismatch: a flipped bit or an edit); restore a backup or "
                    "rerun the run on a new --store"
                )
        return problems

    def compact(self) -> None:
        """Rebuild the file (VACUUM) and empty the WAL: deleted or overwritten values leave no bytes behind."""
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
