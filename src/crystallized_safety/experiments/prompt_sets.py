"""The four prompt sets a spec names: directions are extracted on one pair, steering is evaluated on the other, and
the two pairs must not share a prompt."""

from __future__ import annotations

from dataclasses import dataclass

from ..prompts import PromptSet, check_disjoint, load_prompts
from .spec import ExperimentSpec


@dataclass
class PromptSets:
    """The four prompt sets of a spec: directions are extracted on one pair, steering is evaluated on the other."""

    extract_harmful: PromptSet
    extract_harmless: PromptSet
    eval_harmful: PromptSet
    eval_harmless: PromptSet


def load_prompt_sets(spec: ExperimentSpec) -> PromptSets:
    """Load the spec's prompt sets; extraction and evaluation sets must not share a prompt."""
    p = spec.prompts

    def load(source: str, limit: int | None = None) -> PromptSet:
        if source.startswith("bundled:"):
            return load_prompts(source, limit=limit)
        return load_prompts(source, limit=limit, column=p.column, where=p.where, dedupe=p.dedupe)

    sets = PromptSets(
        load(p.extract_harmful), load(p.extract_harmless), load(p.eval_harmful, p.n), load(p.eval_harmless, p.n)
    )
    for a, b in (
        (sets.extract_harmful, sets.eval_harmful),
        (sets.extract_harmless, sets.eval_harmless),
        (sets.extract_harmful, sets.eval_harmless),
        (sets.extract_harmless, sets.eval_harmful),
    ):
        check_disjoint(a, b, "prompts: extraction and evaluation sets must be disjoint")
    return sets
