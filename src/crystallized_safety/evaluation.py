"""Refusal rate of a model (optionally steered) on a prompt set: generate greedily, judge, count.

With a coherence gate, each response also gets the gate's verdict and the rate of *coherent compliance*
is reported beside the refusal rate: a response that is not a refusal is not necessarily an answer
(gibberish contains no refusal phrase either).

The building block of the organism's card, `csafety eval-refusal`, and the experiment cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .core.generation.api import Generation, generate
from .core.model import Model
from .core.steering import Intervention
from .judges.base import Verdict
from .judges.coherence import DEFAULT_MARGIN, DEFAULT_QUANTILE, CoherenceGate, CoherenceResult
from .judges.substring import SubstringJudge
from .stats import wilson_interval


@dataclass
class RefusalRate:
    """k refusals out of n decided verdicts, with its Wilson 95% interval; undecided counted apart."""

    k: int
    n: int
    undecided: int
    ci: tuple[float, float]
    generations: list[Generation] = field(default_factory=list, repr=False)
    verdicts: list[Verdict] = field(default_factory=list, repr=False)
    coherence: list[CoherenceResult] | None = field(default=None, repr=False)  # one per response, if gated

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def coherent_compliance(self) -> int | None:
        """Decided non-refusals that the coherence gate calls coherent (None without a gate)."""
        if self.coherence is None:
            return None
        return sum(v.refusal is False and c.coherent for v, c in zip(self.verdicts, self.coherence))

    def to_dict(self) -> dict:
        out: dict = {
            "k": self.k,
            "n": self.n,
            "rate": self.rate,
            "ci_lo": self.ci[0],
            "ci_hi": self.ci[1],
            "undecided": self.undecided,
        }
        cc = self.coherent_compliance
        if cc is not None and self.coherence is not None:
            lo, hi = wilson_interval(cc, self.n) if self.n else (float("nan"), float("nan"))
            out["coherent_compliance"] = {"k": cc, "n": self.n, "rate": cc / self.n if self.n else float("nan"),
                                          "ci_lo": lo, "ci_hi": hi}  # fmt: skip
            out["incoherent"] = sum(not c.coherent for c in self.coherence)
        return out

    def records(self) -> list[dict]:
        """One dict per prompt: prompt, response, the judge's verdict and, if gated, the gate's."""
        rows = []
        for i, (g, v) in enumerate(zip(self.generations, self.verdicts)):
            row: dict = {"prompt": g.prompt, "response": g.response, "refusal": v.refusal, "judge": v.judge,
                   "reason": v.reason, "n_tokens": len(g.token_ids), "finished": g.finished}  # fmt: skip
            if self.coherence is not None:
                c = self.coherence[i]
                row.update(coherent=c.coherent, coherence=c.reason, perplexity=c.perplexity, distinct=c.distinct)
            rows.append(row)
        return rows

    @classmethod
    def from_verdicts(
        cls,
        verdicts: Sequence[Verdict],
        generations: Sequence[Generation] = (),
        coherence: Sequence[CoherenceResult] | None = None,
    ) -> RefusalRate:
        k, n, undecided = count_refusals(verdicts)
        ci = wilson_interval(k, n) if n else (float("nan"), float("nan"))
        gated = None if coherence is None else list(coherence)
        return cls(k, n, undecided, ci, list(generations), list(verdicts), gated)

    def __str__(self) -> str:
        text = f"{self.rate:.1%} ({self.k}/{self.n}, 95% CI {self.ci[0]:.1%}-{self.ci[1]:.1%})"
        d = self.to_dict()
        if "coherent_compliance" in d:
            cc = d["coherent_compliance"]
            text += (
                f"; coherent compliance {cc['rate']:.1%} ({cc['k']}/{cc['n']}, 95% CI {cc['ci_lo']:.1%}-"
                f"{cc['ci_hi']:.1%}); {d['incoherent']} incoherent"
            )
        return text


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
    gate: CoherenceGate | None = None,
) -> RefusalRate:
    """Greedy generations judged (substring judge by default) -> refusal rate with Wilson CI; with a
    calibrated `gate`, each response's coherence too (scored by the unsteered model)."""
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
    prompts_out, responses = [g.prompt for g in gens], [g.response for g in gens]
    verdicts = judge.judge(prompts_out, responses)
    coherence = gate.evaluate(prompts_out, responses, [v.refusal for v in verdicts]) if gate is not None else None
    return RefusalRate.from_verdicts(verdicts, gens, coherence)


def calibrated_gate(
    model: Model,
    harmless: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system: str | None = None,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    min_relevance: float | None = None,
    reference_median: float | None = None,
) -> CoherenceGate:
    """A coherence gate calibrated on the unsteered model's own greedy answers to harmless prompts (with
    ``min_relevance``, the v2 gate: answers must also be relevant to their prompts; with ``reference_median``,
    the rule scaled to this length, see `CoherenceGate.calibrate`)."""
    gens = generate(model, list(harmless), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    gate = CoherenceGate(model, system=system)
    gate.calibrate(
        [g.prompt for g in gens],
        [g.response for g in gens],
        quantile,
        margin=margin,
        min_relevance=min_relevance,
        reference_median=reference_median,
    )
    return gate
