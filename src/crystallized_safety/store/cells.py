"""Copies of a run and generic cell access: every row of any table the file holds, read and rewritten by rowid.
The blind copy (`blind_store`) scrubs every table through these, including tables this version does not know."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StoreError
from .connection import Connection
from .files import SUM_COLUMNS

CopyT = TypeVar("CopyT", bound="CellAccess")


class CellAccess(Connection):
    """One run copied to a new file; rows of any table read and rewritten by rowid."""

    def copy_run(self: CopyT, run_id: str, path: str | Path) -> CopyT:
        """A copy of one run at `path`, without analyses or verdicts: what a blind re-analysis starts from (it
        still names the models: `blind_store.blind_copy` scrubs them). The copy is opened as this store's class."""
        target = Path(path)
        if target.exists():
            raise StoreError(f"'{target}' exists: pass a new path for the copy")
        with sqlite3.connect(str(target)) as dest:
            self.db.backup(dest)
        dest.close()
        copy = type(self)(target)
        with copy.transaction() as db:
            for table in ("runs", "artifacts", "chunks", "generations", "row_sums"):
                db.execute(f"DELETE FROM {table} WHERE run_id != ?", (run_id,))
            db.execute("DELETE FROM analyses")
            db.execute("DELETE FROM verdicts")
        return copy

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
        content = {c for values in updates.values() for c in values} & set(SUM_COLUMNS)
        with self.transaction() as db:
            if table == "generations" and (content or deletions) and "row_sums" in self.tables():
                db.execute("DELETE FROM row_sums")  # rewritten content (a scrubbed copy) has no checksum left
            for rowid in deletions:
                db.execute(f'DELETE FROM "{table}" WHERE rowid=?', (rowid,))
            for rowid, values in updates.items():
                sets = ", ".join(f'"{c}"=?' for c in values)
                db.execute(f'UPDATE "{table}" SET {sets} WHERE rowid=?', (*values.values(), rowid))
