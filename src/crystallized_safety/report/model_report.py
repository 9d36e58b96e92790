"""What a report is made of, per model: summary, figures, tables, examples, provenance; and its findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CrystallizedSafetyError
from ..experiments.verdict import NOT_VERDICT_KINDS as VERDICT_SKIPS
from . import tables as T
from .canvas import FigureFile

KAPPA_BOUND = 0.6  # judge agreement below this is flagged
NOT_VERDICT_KINDS = (*VERDICT_SKIPS, "baseline")  # studies the verdict does not read


class ReportError(CrystallizedSafetyError):
    """A report that cannot be built (missing store, unknown or empty run)."""


@dataclass(frozen=True)
class ReportPaths:
    out_dir: Path
    html: Path
    markdown: Path
    results: Path
    figures: tuple[Path, ...]


@dataclass
class Finding:
    level: str  # "warning" | "note"
    model: str
    kind: str
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "model": self.model, "kind": self.kind, "message": self.message}


@dataclass
class ModelReport:
    model: str
    slug: str
    summary: dict
    figures: list[FigureFile] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    tables: list[T.Table] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    agreement: dict | None = None
    provenance: dict = field(default_factory=dict)
