"""The store's connection to its SQLite file: opening it (writable, or read-only also on read-only media),
refusing another tool's database or another schema version, the transaction, the checkpoint, closing, and the
tables the file holds. Every part of `Store` builds on this class (`self.db`, `self.path`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError
from .schema import SCHEMA, SCHEMA_VERSION
from .wal import wal_damage


class Connection:
    """The open SQLite file of a store. `readonly=True` never writes; `warnings` lists what opening found wrong."""

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
            if "relevance" not in {row[1] for row in db.execute("PRAGMA table_info(generations)")}:
                db.execute("ALTER TABLE generations ADD COLUMN relevance REAL")  # before coherence gate v2
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

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def tables(self) -> dict[str, list[str]]:
        """Every table of the file and its columns, read from the file itself (not from SCHEMA), so a walk over
        them also covers tables and columns this version does not know."""
        names = [r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: [c[1] for c in self.db.execute(f'PRAGMA table_info("{t}")')] for t in names}
