"""What a spec will cost before it runs (`csafety run SPEC --dry-run`): per model, the cells (conditions), the
generations and new tokens the run will produce, the prompts extraction reads, and a time estimate from one
short calibration on this machine (one batch of the spec's shape through the engine). Nothing is written.

An organism that is not built yet is calibrated on its base model (same architecture and size) and its build
time is estimated from one timed training step (`organism.build.estimate_build_seconds`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.generation.api import generate
from ..core.model import Model
from ..experiments.prompt_sets import PromptSets, load_prompt_sets
from ..experiments.scoring_prompts import check_scoring
from ..experiments.spec import ExperimentSpec
from ..progress import Progress, silent
from ..registry import load_model, organism_pending
from .chunks import expand


@dataclass(frozen=True)
class Estimate:
    model: str
    cells: int  # conditions, baselines included
    generations: int
    new_tokens: int  # at most: generations x max_new_tokens (rows that end early generate fewer)
    extraction_prompts: int
    calibration_rows: int
    calibration_seconds: float
    build_seconds: float  # 0 unless an organism must be built first
    seconds: float  # estimated total for this model, build included
    walk_cells: int = 0  # of `cells`, those of frontier walks: an upper bound, the walk stops at the cliff

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def estimate_spec(spec: ExperimentSpec, progress: Progress | None = None) -> list[Estimate]:
    say = progress or silent
    sets = load_prompt_sets(spec)
    check_scoring(spec)  # a selection study whose scoring range does not fit fails here, as the run would
    return [_estimate_model(spec, name, sets, say) for name in spec.models]


def _estimate_model(spec: ExperimentSpec, name: str, sets: PromptSets, say: Progress) -> Estimate:
    pending = organism_pending(name)  # (base alias, recipe) of an organism not built yet, else None
    say(f"{name}: calibrating", 0, 1)
    model = load_model(pending[0] if pending else name, device=spec.device, dtype=spec.dtype)
    build = _build_seconds(model, pending[1]) if pending else 0.0
    plans, chunks = expand(spec, name, model.n_layers, sets)
    walk = {c.key for plan in plans if plan.kind == "frontier" for _t, c in plan.conditions}
    rows = sum(len(c.prompts) for c in chunks)
    mnt = spec.generation.max_new_tokens
    per_row = _seconds_per_row(model, list(sets.eval_harmful), spec)
    extraction = len(sets.extract_harmful) + len(sets.extract_harmless)
    coherence = spec.coherence.calibration_prompts if spec.coherence.enabled else 0
    # a prompt's forward pass costs about what a few decoding steps of a row cost
    seconds = build + per_row * (rows + coherence) + per_row * extraction * min(1.0, 4 / mnt)
    batch = min(spec.generation.batch_size, len(sets.eval_harmful))
    return Estimate(
        name,
        len({c.condition.key for c in chunks}),
        rows,
        rows * mnt,
        extraction,
        batch,
        round(per_row * batch, 2),
        round(build, 1),
        round(seconds, 1),
        len(walk),
    )


def _seconds_per_row(model: Model, prompts: list[str], spec: ExperimentSpec) -> float:
    """One warm-up and one timed batch of the spec's shape (batch size, token budget) through the engine."""
    batch = prompts[: min(spec.generation.batch_size, len(prompts))]
    generate(model, batch[:2], max_new_tokens=2, system=spec.generation.system)  # warm-up
    t0 = time.perf_counter()
    generate(model, batch, max_new_tokens=spec.generation.max_new_tokens, batch_size=len(batch),
             system=spec.generation.system)  # fmt: skip
    return (time.perf_counter() - t0) / len(batch)


def _build_seconds(base: Model, recipe) -> float:
    from ..organism.build import estimate_build_seconds

    seconds = estimate_build_seconds(base, recipe)
    start = getattr(recipe, "start", None)
    first = organism_pending(start) if start else None
    if first is not None:  # the hardened organism starts from the liquid one, which is built first
        seconds += estimate_build_seconds(base, first[1])
    return seconds
