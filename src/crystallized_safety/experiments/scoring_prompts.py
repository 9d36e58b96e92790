"""Which prompts direction selection scores its candidates on: never the ones the steering evaluation reads.

A candidate chosen for its bypass score on the very prompts a verdict then counts flips on is chosen in sample:
its steering result is optimistic by however much the choice fitted those prompts' noise. So a selection study
scores on the eval prompts *after* the first `prompts.n` (the verdict reads eval[:n], the scores come from
eval[n : n + study.prompts]), or on the study's own `score_harmful` / `score_harmless` files, checked disjoint
from eval[:n]. Either way the choice is made before any model loads: a set too short to hold the scoring range
is a one-line error there, not after an hour of extraction. `csafety select` applies the same rule with
`--eval-n` standing in for `prompts.n`. Candidates are still extracted on the extraction sets, which a spec
already keeps disjoint from the eval sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..prompts import PromptSet, check_disjoint, load_prompts
from .spec import DirectionSelection, ExperimentSpec, SpecError


@dataclass(frozen=True)
class ScoringPrompts:
    """The prompts the candidates are scored on, and a sentence saying where they came from (stored in the
    candidate table's settings as `scored_on` and shown in the report, so a reader can see the split)."""

    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    scored_on: str
    first: int | None = None  # the eval index range scored on, [first, stop); None when from other files
    stop: int | None = None


def after_reserved(harmful: PromptSet, harmless: PromptSet, reserved: int, count: int, reader: str,
                   fix: str) -> ScoringPrompts:  # fmt: skip
    """eval[reserved : reserved + count] of both sides: the prompts after the `reserved` ones `reader` (the
    verdict, the steering evaluation) reads. Raises a one-line error naming `fix` when a side is too short."""
    stop = reserved + count
    for side in (harmful, harmless):
        if len(side) < stop:
            raise SpecError(
                f"direction selection scores on eval prompts {reserved}-{stop - 1} ({count} after the {reserved} read "
                f"by {reader}), but {side.source} has {len(side)}: {fix}"
            )
    scored_on = (
        f"eval prompts {reserved}-{stop - 1} of {harmful.source} / {harmless.source}, disjoint from 0-{reserved - 1} "
        f"(read by {reader})"
    )
    return ScoringPrompts(harmful.prompts[reserved:stop], harmless.prompts[reserved:stop], scored_on, reserved, stop)


def from_files(harmful: PromptSet, harmless: PromptSet, reserved: tuple[PromptSet, PromptSet], count: int,
               reader: str, fix: str) -> ScoringPrompts:  # fmt: skip
    """The first `count` prompts of separate scoring files, checked disjoint from the `reserved` eval prompts
    (harmful, harmless) that `reader` reads; a short file or a shared prompt is a one-line error."""
    for side in (harmful, harmless):
        if len(side) < count:
            raise SpecError(f"direction selection scores on {count} prompts per side, but {side.source} has "
                            f"{len(side)}: {fix}")  # fmt: skip
    scoring = (harmful.head(count), harmless.head(count))
    for a in scoring:
        for b in reserved:
            check_disjoint(a, b, f"direction selection: scoring prompts must be disjoint from the eval prompts read "
                                 f"by {reader}")  # fmt: skip
    n = len(reserved[0])
    scored_on = (
        f"the first {count} prompts of {harmful.source} / {harmless.source}, disjoint from eval prompts 0-{n - 1} "
        f"(read by {reader})"
    )
    return ScoringPrompts(scoring[0].prompts, scoring[1].prompts, scored_on)


def _load(spec: ExperimentSpec, source: str) -> PromptSet:
    """A prompt set read as `load_prompt_sets` reads the spec's (file filters apply to files only), untruncated."""
    p = spec.prompts
    if source.startswith("bundled:"):
        return load_prompts(source)
    return load_prompts(source, column=p.column, where=p.where, dedupe=p.dedupe)


def scoring_prompts(spec: ExperimentSpec, study: DirectionSelection) -> ScoringPrompts:
    """The prompts `study` scores its candidates on: eval[n : n + study.prompts] (n = prompts.n, what the verdict
    reads), or the study's score files when it names them (disjoint from eval[:n] and from the extraction sets)."""
    n, count, label = spec.prompts.n, study.prompts, study.label
    harmful, harmless = _load(spec, spec.prompts.eval_harmful), _load(spec, spec.prompts.eval_harmless)
    reader = "the verdict"
    if study.score_harmful is None:
        fix = (
            f"give longer eval sets, lower study '{label}''s prompts, or point its score_harmful / score_harmless "
            "at other files"
        )
        return after_reserved(harmful, harmless, n, count, reader, fix)
    assert study.score_harmless is not None  # the spec asks for both or neither
    files = _load(spec, study.score_harmful), _load(spec, study.score_harmless)
    fix = f"give longer score files or lower study '{label}''s prompts"
    found = from_files(*files, (harmful.head(n), harmless.head(n)), count, reader, fix)
    extraction = _load(spec, spec.prompts.extract_harmful), _load(spec, spec.prompts.extract_harmless)
    for a in (f.head(count) for f in files):
        for b in extraction:
            check_disjoint(a, b, f"study '{label}': scoring and extraction sets must be disjoint")
    return found


def check_scoring(spec: ExperimentSpec) -> dict[str, ScoringPrompts]:
    """Every selection study's scoring prompts by label, resolved before any model loads."""
    studies: Iterable[DirectionSelection] = (s for s in spec.studies if isinstance(s, DirectionSelection))
    return {s.label: scoring_prompts(spec, s) for s in studies}
