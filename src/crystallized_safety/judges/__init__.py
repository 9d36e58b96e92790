"""Judges: decide whether each response refused, and measure how far judges agree.

Every judge implements `Judge` and returns one `Verdict` per (prompt, response). This package must stay
importable without torch or network libraries; judges that need them live in their own modules and
import those dependencies there. Those are exported lazily (module `__getattr__`): the first access to,
say, `judges.RefusalScoreJudge` imports `judges.refusal_score` (and torch) at that moment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crystallized_safety.judges.agreement import Agreement, agreement, cohens_kappa, confusion
from crystallized_safety.judges.base import Judge, Verdict, check_same_length
from crystallized_safety.judges.substring import (
    DEFAULT_REFUSAL_PHRASES,
    DEFAULT_WINDOW,
    SubstringJudge,
    is_refusal,
)

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load on first access
    from crystallized_safety.judges.coherence import CoherenceGate, CoherenceResult, CoherenceThresholds, distinct_n
    from crystallized_safety.judges.llm import LLMJudge
    from crystallized_safety.judges.refusal_score import (
        Calibration,
        RefusalScoreJudge,
        RefusalToken,
        derive_refusal_tokens,
    )

_LAZY: dict[str, str] = {
    "RefusalScoreJudge": "refusal_score",
    "Calibration": "refusal_score",
    "RefusalToken": "refusal_score",
    "derive_refusal_tokens": "refusal_score",
    "CoherenceGate": "coherence",
    "CoherenceResult": "coherence",
    "CoherenceThresholds": "coherence",
    "distinct_n": "coherence",
    "LLMJudge": "llm",
}

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
    # lazy (see _LAZY)
    "Calibration",
    "CoherenceGate",
    "CoherenceResult",
    "CoherenceThresholds",
    "LLMJudge",
    "RefusalScoreJudge",
    "RefusalToken",
    "derive_refusal_tokens",
    "distinct_n",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
