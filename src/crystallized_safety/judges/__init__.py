"""Judges: decide whether each response refused, and measure how far judges agree.

Every judge implements `Judge` and returns one `Verdict` per (prompt, response). This package must stay
importable without torch or network libraries; judges that need them live in their own modules and
import those dependencies there.
"""

from __future__ import annotations

from crystallized_safety.judges.agreement import Agreement, agreement, cohens_kappa, confusion
from crystallized_safety.judges.base import Judge, Verdict, check_same_length
from crystallized_safety.judges.substring import (
    DEFAULT_REFUSAL_PHRASES,
    DEFAULT_WINDOW,
    SubstringJudge,
    is_refusal,
)

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "DEFAULT_WINDOW",
    "Agreement",
    "Judge",
    "SubstringJudge",
    "Verdict",
    "agreement",
    "check_same_length",
    "cohens_kappa",
    "confusion",
    "is_refusal",
]
