"""One error family for everything a user can get wrong.

Every message is one line that says what to fix; the CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception as one line (its first), or its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CrystallizedSafetyError(Exception):
    """Base class: a user-facing, one-line, actionable error."""


class ModelError(CrystallizedSafetyError):
    """Unknown model/alias, unloadable weights, missing chat template, unknown architecture."""


class LayerError(CrystallizedSafetyError):
    """Layer index out of range or malformed layer spec."""


class PromptError(CrystallizedSafetyError):
    """Empty, duplicate, overlapping or unreadable prompt sets."""


class VectorFileError(CrystallizedSafetyError):
    """Corrupt, non-safetensors or mismatched direction files."""


class InterventionError(CrystallizedSafetyError):
    """An intervention that cannot be applied as specified (shape, alpha count, mode)."""


class StatsError(CrystallizedSafetyError):
    """Statistics asked of impossible counts (n = 0, k > n, ...)."""


class JudgeError(CrystallizedSafetyError):
    """A judge misconfigured (unknown judge, bad endpoint settings)."""


class StoreError(CrystallizedSafetyError):
    """A store file that cannot be used (not SQLite, another schema, unknown run)."""
