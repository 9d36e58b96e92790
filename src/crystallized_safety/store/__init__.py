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

The package, one job per module (all of the project's SQL lives here): `schema` (tables, `GenerationRow`,
`RunInfo`), `files` (the WAL read as bytes, run locks, chunk checksums), `wal` (WAL damage found before
opening), `connection` (opening, transactions), `runs`, `artifacts`, `chunks` (chunks and generations),
`results` (analyses and verdicts), `upkeep` (backup, check, compaction), `cells` (copies, generic row access),
`export` (JSON / CSV), and `store` (`Store`, made of those parts).
"""

from __future__ import annotations

from ..errors import StoreError
from .files import RunLock
from .schema import GEN_COLUMNS, SCHEMA, SCHEMA_VERSION, GenerationRow, RunInfo
from .store import Store
from .wal import wal_commits_beyond_valid, wal_damage

__all__ = [
    "GEN_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "GenerationRow",
    "RunInfo",
    "RunLock",
    "Store",
    "StoreError",
    "wal_commits_beyond_valid",
    "wal_damage",
]
