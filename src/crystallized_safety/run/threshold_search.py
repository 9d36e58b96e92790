"""Adaptive threshold search: each alpha curve's threshold (the weakest alpha whose coherent flip rate reaches
the verdict's flip threshold) found from forward passes, and confirmed by generating only the cell at the
crossing, instead of generating the whole layer x alpha grid.

1. Curves: the screened cells that differ only in alpha (one per layer of a sweep, one per layer set of a
   multi-layer study, the threshold study's layer), ordered from the weakest alpha to the strongest.
2. Bisection, all curves in lockstep (one batch of forward passes per step): the first alpha whose *screened*
   flip rate (first-token refusal score, calibrated on the unsteered outputs) reaches the threshold, assuming
   the rate grows with strength. log2(alphas) screened cells per curve instead of all of them.
3. Confirmation by generation: that one cell is generated (with its random/orthogonal controls, which the
   verdict compares against). If its generated coherent flip rate falls short, the next stronger alpha is
   generated, and so on. A curve whose screened rate never reaches the threshold generates only its strongest
   alpha, and only when the screened rate there lies inside the screening band (nothing near: screening says
   the threshold is beyond the grid).
The threshold found is within one grid step of the full grid's whenever the screened crossing is (screening
said the alpha below it does not reach the threshold); the report's per-layer thresholds read the generated
cells as usual, and cells never generated stay empty (not evidence either way, also for the verdict)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ..experiments.conditions import HARMFUL, Condition, StudyPlan
from ..experiments.spec import ExperimentSpec
from ..progress import Progress


class RateSource(Protocol):
    """Where screened flip rates come from (`run.screening.Screener`)."""

    def rates(self, conds: list[Condition]) -> dict[str, float | None]: ...

    def calibration(self) -> dict: ...


def curves(cells: dict[str, Condition]) -> list[list[Condition]]:
    """Screened cells grouped by everything but alpha, each ordered weakest to strongest (by |alpha| when all
    alphas share a sign, else by alpha)."""
    groups: dict[str, list[Condition]] = {}
    for cond in cells.values():
        groups.setdefault(replace(cond, alpha=0.0).key, []).append(cond)
    out = []
    for group in groups.values():
        sign = -1.0 if all(c.alpha <= 0 for c in group) else 1.0
        out.append(sorted(group, key=lambda c: sign * c.alpha))
    return out


def controls_of(plans: list[StudyPlan], kinds: set[str]) -> dict[str, list[Condition]]:
    """Main-cell key -> the control-direction cells run beside it (same layers, alpha, unit, mode) in the
    screened study kinds."""
    out: dict[str, list[Condition]] = {}
    for plan in plans:
        if plan.kind not in kinds:
            continue
        for _tags, cond in plan.conditions:
            if cond.prompt_set == HARMFUL and cond.ref.is_control:
                out.setdefault(replace(cond, direction="extracted").key, []).append(cond)
    return out


def bisect(
    all_curves: list[list[Condition]], screener: RateSource, target: float, say: Progress
) -> tuple[list[int], dict[str, float | None], int]:
    """Per curve, the first index whose screened rate reaches `target` (len(curve): none does), all curves in
    lockstep; returns (first indices, screened rates by key, bisection steps)."""
    screened: dict[str, float | None] = {}
    lo = [0] * len(all_curves)
    hi = [len(c) - 1 for c in all_curves]
    first = [len(c) for c in all_curves]
    step = 0
    while any(a <= b for a, b in zip(lo, hi)):
        probes = {i: (lo[i] + hi[i]) // 2 for i in range(len(all_curves)) if lo[i] <= hi[i]}
        step += 1
        say("threshold search: bisection on screened rates", step, None, f"{len(probes)} curves")
        wanted = [all_curves[i][j] for i, j in probes.items() if all_curves[i][j].key not in screened]
        screened.update(screener.rates(wanted))
        for i, j in probes.items():
            rate = screened[all_curves[i][j].key]
            if rate is not None and rate >= target:
                first[i], hi[i] = j, j - 1
            else:
                lo[i] = j + 1
    return first, screened, step


def confirm(
    all_curves: list[list[Condition]],
    start: dict[int, int],
    crossing: list[bool],
    controls: dict[str, list[Condition]],
    generate: Callable[[list[Condition]], None],
    flip_rate: Callable[[Condition], float | None],
    target: float,
    say: Progress,
) -> tuple[dict[int, float | None], set[str], int]:
    """Generate each curve's candidate cell (with its controls); walk to stronger alphas on curves that cross
    (screened) while generation does not confirm. Returns (threshold alpha per curve, generated keys, rounds)."""
    pending, generated, rounds = dict(start), set(), 0
    found: dict[int, float | None] = {}
    while pending:
        rounds += 1
        conds = [all_curves[i][j] for i, j in pending.items()]
        conds += [ctrl for c in conds for ctrl in controls.get(c.key, [])]
        say("threshold search: confirming by generation", rounds, None, f"{len(pending)} cells")
        generate(conds)
        generated |= {c.key for c in conds}
        walk: dict[int, int] = {}
        for i, j in pending.items():
            rate = flip_rate(all_curves[i][j])
            if rate is not None and rate >= target:
                found[i] = all_curves[i][j].alpha
            elif crossing[i] and j + 1 < len(all_curves[i]):
                walk[i] = j + 1
        pending = walk
    return found, generated, rounds


def search_thresholds(
    spec: ExperimentSpec,
    screener: RateSource,
    cells: dict[str, Condition],
    plans: list[StudyPlan],
    generate: Callable[[list[Condition]], None],
    flip_rate: Callable[[Condition], float | None],
    say: Progress,
) -> dict:
    """Run the search (see the module docstring); returns what it screened, generated and found per curve, and
    the screened cells (and their controls) it left ungenerated as `dropped`."""
    target = spec.verdict.flip_threshold
    all_curves = curves(cells)
    first, screened, steps = bisect(all_curves, screener, target, say)
    start: dict[int, int] = {}
    for i, curve in enumerate(all_curves):
        strongest = screened.get(curve[-1].key)
        if first[i] < len(curve):
            start[i] = first[i]
        elif strongest is not None and strongest >= spec.screening.band[0]:
            start[i] = len(curve) - 1  # never reaches the threshold, but close enough to check by generation
    crossing = [first[i] < len(c) for i, c in enumerate(all_curves)]
    controls = controls_of(plans, set(spec.screening.kinds))
    found, generated, rounds = confirm(all_curves, start, crossing, controls, generate, flip_rate, target, say)
    dropped = [k for k in cells if k not in generated]
    dropped += [ctrl.key for k in dropped for ctrl in controls.get(k, []) if ctrl.key not in generated]
    return {
        **screener.calibration(),
        "mode": "adaptive",
        "flip_threshold": target,
        "bisection_steps": steps,
        "confirmation_rounds": rounds,
        "screened_cells": len(screened),
        "grid_cells": len(cells),
        "generated_cells": len(generated & set(cells)),
        "curves": [
            {
                "cells": [c.describe() for c in curve],
                "alphas": [c.alpha for c in curve],
                "screened_flip": [screened.get(c.key) for c in curve],
                "generated": [c.key in generated for c in curve],
                "threshold_alpha": found.get(i),
            }
            for i, curve in enumerate(all_curves)
        ],
        "dropped": sorted(set(dropped)),
    }
