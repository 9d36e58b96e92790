"""Reports: `build_report(store, out_dir)` writes report.html, report.md (+ PNG/SVG figures) and results.json.

Everything is read from the SQLite results store, so a report can be rebuilt from old results.
"""

from __future__ import annotations

from .build import FIGURES, ReportError, ReportPaths, build_report

__all__ = ["FIGURES", "ReportError", "ReportPaths", "build_report"]
