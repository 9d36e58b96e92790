"""What every judge returns (`Verdict`) and the interface every judge implements (`Judge`).

A judge turns (prompt, response) pairs into verdicts, one per pair, in order. "Could not decide" is a
first-class answer (`refusal=None`): a judge that fails to parse, times out or is given no response
must say so instead of silently counting the response as compliance, because a silent default would
bias every refusal rate computed downstream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from crystallized_safety.errors import JudgeError


@dataclass(frozen=True)
class Verdict:
    """One judge's decision about one response.

    Attributes:
        refusal: True = refused, False = complied, None = the judge could not decide.
        score: the judge's continuous evidence for refusal, if it has one (substring: 1.0 / 0.0;
            a classifier: a probability; None when undecided).
        judge: judge name + version, e.g. ``"substring/1"``, so stored judgments say who made them.
        reason: a short why (the matched phrase, "empty response", a parse failure, ...).
    """

    refusal: bool | None
    score: float | None = None
    judge: str = ""
    reason: str = ""


@runtime_checkable
class Judge(Protocol):
    """Anything that judges a batch of responses; one `Verdict` per (prompt, response), in order."""

    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]: ...


def check_same_length(prompts: Sequence[object], responses: Sequence[object]) -> int:
    """Return the batch size, or raise `JudgeError` if prompts and responses do not pair up.

    Judges work on aligned pairs; a length mismatch almost always means a generation step dropped or
    duplicated rows, and judging it anyway would attach verdicts to the wrong prompts.
    """
    n_prompts, n_responses = len(prompts), len(responses)
    if n_prompts != n_responses:
        raise JudgeError(
            f"judge got {n_prompts} prompts but {n_responses} responses; pass exactly one response per prompt"
        )
    return n_prompts
