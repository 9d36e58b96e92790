"""The store's results: each study's analysis (per model) and each model's verdict, stored as JSON."""

from __future__ import annotations

import json

from .. import jsonio
from .connection import Connection


class Results(Connection):
    """The `analyses` and `verdicts` tables."""

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
