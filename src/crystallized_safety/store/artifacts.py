"""The store's artifacts: what a run computes once per model (directions, calibrations, ...), kept as JSON
and/or bytes, and `cached()`, which computes one on first use and reads it back from the store after."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .. import jsonio
from .connection import Connection


class Artifacts(Connection):
    """The `artifacts` table: (run, model, kind) -> JSON data and/or a blob."""

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

    def artifacts_of(self, run_id: str, kind: str) -> dict[str, Any]:
        """{model: JSON data} of every model of the run holding an artifact `kind`, by model name."""
        rows = self.db.execute(
            "SELECT model, json FROM artifacts WHERE run_id=? AND kind=? ORDER BY model", (run_id, kind)
        )
        return {m: json.loads(data) if data is not None else None for m, data in rows}

    def artifact_kinds(self, run_id: str, model: str) -> list[str]:
        rows = self.db.execute("SELECT kind FROM artifacts WHERE run_id=? AND model=? ORDER BY kind", (run_id, model))
        return [r[0] for r in rows]
