"""`Store`: the results store, one class made of the package's parts, each one job (`connection`: opening and
transactions; `runs`; `artifacts`; `chunks`: chunks and generations; `results`: analyses and verdicts;
`upkeep`: backup, check, compaction; `cells`: copies and generic row access) plus the run's export."""

from __future__ import annotations

from .artifacts import Artifacts
from .cells import CellAccess
from .chunks import Chunks
from .export import export_run
from .results import Results
from .runs import Runs
from .schema import GEN_COLUMNS
from .upkeep import Upkeep


class Store(Runs, Artifacts, Chunks, Results, Upkeep, CellAccess):
    """Thin, explicit access to the SQLite results file. `readonly=True` (status, export, report) never writes
    and also opens stores on read-only media; `warnings` lists what opening found wrong (a damaged WAL)."""

    def export(self, run_id: str, fmt: str) -> str:
        """The run as JSON (run, verdicts, analyses, generations) or its generations as CSV."""
        return export_run(self, run_id, fmt, GEN_COLUMNS)
