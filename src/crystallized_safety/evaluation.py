"""Refusal rate of a model (optionally steered) on a prompt set: generate greedily, judge, count.

The building block of the organism's card, `csafety eval-refusal`, and the experiment cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .generation import Generation, generate
from .judges.base import Verdict
from .judges.substring import SubstringJudge
from .models import Model
from .stats import wilson_interval
from .steering import Intervention


@dataclass
class RefusalRate:
    """k refusals out of n decided verdicts, with its Wilson 95% interval; undecided counted apart."""

    k: int
    n: int
    undecided: int
    ci: tuple[float, float]
    generations: list[Generation] = field(default_factory=list, repr=False)
    verdicts: list[Verdict] = field(default_factory=list, repr=False)

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "ci_lo": self.ci[0],
            "ci_hi": self.ci[1],
            "undecided": self.undecided,
        }

    def __str__(self) -> str:
        return f"{self.rate:.1%} ({self.k}/{self.n}, 95% CI {self.ci[0]:.1%}-{self.ci[1]:.1%})"


def count_refusals(verdicts: Sequence[Verdict]) -> tuple[int, int, int]:
    """(refusals, decided, undecided): a judge's None is never silently counted as compliance."""
    decided = [v for v in verdicts if v.refusal is not None]
    return sum(bool(v.refusal) for v in decided), len(decided), len(verdicts) - len(decided)


def refusal_rate(
    model: Model,
    prompts: Sequence[str],
    intervention: Intervention | None = None,
    *,
    judge=None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system: str | None = None,
    engine: str = "fast",
) -> RefusalRate:
    """Greedy generations judged (substring judge by default) -> refusal rate with Wilson CI."""
    judge = judge or SubstringJudge()
    gens = generate(
        model,
        list(prompts),
        intervention,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system=system,
        engine=engine,
    )
    verdicts = judge.judge([g.prompt for g in gens], [g.response for g in gens])
    k, n, undecided = count_refusals(verdicts)
    ci = wilson_interval(k, n) if n else (float("nan"), float("nan"))
    return RefusalRate(k, n, undecided, ci, gens, verdicts)
