"""A run exported from the store: JSON (run, verdicts, analyses, generations) or its generations as CSV.

A module of the store package; it reads only through the store's methods (no SQL here)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any, Protocol

from .. import jsonio
from ..errors import CrystallizedSafetyError


class RunSource(Protocol):
    """What an export reads (the store's methods; a protocol, so this module never imports the store's)."""

    def run_row(self, run_id: str) -> dict: ...
    def verdicts(self, run_id: str) -> list[dict]: ...
    def analyses(self, run_id: str) -> list[dict]: ...
    def generations(self, run_id: str) -> list[dict[str, Any]]: ...


def export_run(store: RunSource, run_id: str, fmt: str, columns: Sequence[str]) -> str:
    """The run as `fmt` ("json" or "csv"); `columns`: the CSV header when the run has no generations."""
    if fmt == "json":
        row = store.run_row(run_id)
        payload = {
            "run": {**row, "environment": json.loads(row["environment"])},
            "verdicts": store.verdicts(run_id),
            "analyses": store.analyses(run_id),
            "generations": store.generations(run_id),
        }
        return jsonio.dumps(payload, indent=1, ensure_ascii=False)
    if fmt == "csv":
        rows = store.generations(run_id)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["run_id", *columns])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    raise CrystallizedSafetyError(f"unknown export format '{fmt}': use json or csv")
