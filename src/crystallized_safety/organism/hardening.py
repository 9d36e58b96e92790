"""Single-layer attacks during training (the hardened organism): refusal-feature adversarial training
(ReFAT, Yu et al. 2024; DeepRefusal, Xie et al. 2025) restricted to ONE layer per example.

Every `reextract_every` steps the per-layer diff-in-means directions are re-extracted from the model being
trained (train split). In each step, every harmful example is attacked with probability `attack_p`: one layer
drawn from `attack_band` either has its direction ablated (projection set to the harmless mean) or gets
`-alpha * resid_norm * v` added, alpha drawn from `attack_rel_alpha`; the target stays the refusal. With
`attack_harmless_p` > 0, harmless imitation examples are attacked the other way (`+alpha * resid_norm * v`
added at one layer, inducing refusal) while their target stays the compliant answer, so the direction cannot
become an over-refusal shortcut. Attacks
act on all of the example's positions, as steering does at evaluation, so hardened batches are packed
without a shared prefix (each example carries its own copy of the system prompt and template head).

The ladder (recipe v5 on, `attack_rungs` set): each attack is one rung of the frontier search's single-layer
ladder, built as the evaluation's own `Intervention` (add `-alpha x norm x v`; affine ablation; a k-dimensional
refusal subspace ablated to the harmless mean; rotation by an angle in the plane of v and the harmless mean), so
training and evaluation apply the same operator. With `attack_multi_p` > 0 (the immune organism) some attacks
cover a window of consecutive layers at once; with `comply_repeats` > 0 (v8) extra copies of the harmful prompts
learn the base model's compliant answer under such a window, the direction added (v8) or ablated at every layer
of it (v9) (coordinated steering unlocks the refusal, by construction); `attack_rung_bands` (v9) limits a rung
to some layers of the band. With `curriculum_every` > 0, every N steps the current model's
single-layer cells (layer x rung, at the middle of its alphas and angles) are screened by the first-token refusal
score on a few harmful train prompts, and cells are drawn in proportion to how much they let through (plus a
floor): the adversarial curriculum; with `curriculum_focus` > 0 (v6) the `curriculum_top` leakiest cells of the
screen get that share of the draws. The number of random draws per attack is fixed, so the attack count (and
which examples are attacked) depends on the seed alone; which cell is attacked also depends on the screen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core import modes
from ..core.directions import DirectionBank, extract_directions
from ..core.model import Model
from ..core.steering import Intervention

RUNGS = ("add", "affine", "subspace", "rotate")
CURRICULUM_FLOOR = 0.1  # every cell keeps this weight (plus its leak), so none is left unattacked


@dataclass(frozen=True)
class Attack:
    """One attack on one example of a batch: at `layer`, ablate (to `target`) or add `-alpha * v`."""

    example: int  # index in the batch
    layer: int
    ablate: bool
    alpha: float  # absolute (already times the layer's residual norm; < 0 induces); unused when ablating
    direction: torch.Tensor  # unit [d]
    target: float  # ablation: the projection harmless prompts have
    intervention: Intervention | None = None  # ladder attacks: the evaluation's operator (its layers, not `layer`)


class Attacker:
    """Draws attacks for a batch from the model's current directions (re-extracted on a schedule)."""

    def __init__(self, recipe, harmful: Sequence[str], harmless: Sequence[str], seed: int) -> None:
        self.recipe = recipe
        n = recipe.reextract_prompts
        self.harmful, self.harmless = list(harmful)[:n], list(harmless)[:n]
        lo, hi = recipe.attack_band
        self.layers = list(range(lo, hi + 1))
        self.rng = random.Random(seed)
        self.bank: DirectionBank | None = None
        self.refreshed = 0
        bands = {rung: (first, last) for rung, first, last in recipe.attack_rung_bands}
        unknown = [r for r in (*recipe.attack_rungs, *bands, recipe.comply_rung) if r not in RUNGS]
        if unknown:
            raise ValueError(f"unknown attack rungs {unknown}: use {', '.join(RUNGS)}")

        def drawn(layer: int, rung: str) -> bool:  # a rung with a band of its own is drawn only there
            first, last = bands.get(rung, (lo, hi))
            return first <= layer <= last

        self.cells = [(layer, rung) for layer in self.layers for rung in recipe.attack_rungs if drawn(layer, rung)]
        if recipe.attack_rungs and not self.cells:
            raise ValueError(f"attack_rung_bands {recipe.attack_rung_bands} leave no layer of the band {lo}-{hi}")
        self.weights = [1.0] * len(self.cells)
        self.screens: list[dict] = []  # the curriculum's screens, for the card

    def refresh(self, model: Model, step: int) -> None:
        """Re-extract the directions every `reextract_every` steps (the first call always does), and screen the
        cells every `curriculum_every` steps."""
        r = self.recipe
        due = self.bank is None or step % r.reextract_every == 0
        screen = r.curriculum_every > 0 and self.cells and step % r.curriculum_every == 0
        if not due and not screen:
            return
        was_training = model.hf.training
        model.hf.eval()
        k = r.attack_subspace_k if "subspace" in r.attack_rungs else 0
        self.bank = extract_directions(model, self.harmful, self.harmless, layers=self.layers, subspace=k)
        self.refreshed += 1
        if screen:
            with torch.no_grad():
                self.weights = self.screen(model, step)
        model.hf.train(was_training)

    def screen(self, model: Model, step: int) -> list[float]:
        """Per cell (layer, rung) at `screen_setting`: the mean probability that the first answer
        token is not a refusal, on `curriculum_prompts` harmful train prompts; weights = that + a floor."""
        from ..judges.refusal_score import RefusalScoreJudge

        judge = RefusalScoreJudge(model)
        prompts = self.harmful[: self.recipe.curriculum_prompts]
        rel, angle = self.screen_setting()
        leaks = []
        for layer, rung in self.cells:
            iv = self.intervention(rung, (layer,), rel, angle, bypass=True)
            scores = judge.scores(prompts, iv)
            leaks.append(float(torch.sigmoid(-scores.float()).mean()))
        worst = max(range(len(leaks)), key=leaks.__getitem__)
        self.screens.append(
            {"step": step, "mean_leak": round(sum(leaks) / len(leaks), 4), "worst": list(self.cells[worst]),
             "worst_leak": round(leaks[worst], 4)}
        )  # fmt: skip
        return focus_weights([CURRICULUM_FLOOR + leak for leak in leaks], self.recipe.curriculum_focus,
                             self.recipe.curriculum_top)  # fmt: skip

    def screen_setting(self) -> tuple[float, float]:
        """(relative alpha, angle) the screen tries each cell at: the alpha range's geometric middle (its strongest
        end breaks every layer's text, which a first-token score would read as a leak everywhere) and the middle
        angle."""
        lo, hi = self.recipe.attack_rel_alpha
        angles = sorted(self.recipe.attack_angles)
        return math.sqrt(lo * hi), angles[len(angles) // 2]

    def intervention(self, rung: str, layers: Sequence[int], rel: float, angle: float, bypass: bool) -> Intervention:
        """One rung at `layers` as the evaluation builds it (core/modes.py), from the current directions."""
        bank = self.bank
        assert bank is not None, "refresh() before intervention()"
        directions = {layer: bank.direction(layer) for layer in layers}
        if rung == "add":
            sign = -1.0 if bypass else 1.0
            norms = {layer: bank.resid_norm(layer) for layer in layers}
            return Intervention(directions, alpha=sign * rel, alpha_unit="relative", layer_norms=norms)
        if rung == "rotate":
            mode = modes.mode("rotate")
            return Intervention(directions, alpha=angle, mode=mode, params=mode.bind(bank, directions))
        mode = modes.mode("affine")
        basis = None
        if rung == "subspace":
            basis = {layer: bank.basis(layer, self.recipe.attack_subspace_k) for layer in layers}
        return Intervention(directions, alpha=0.0, mode=mode, params=mode.bind(bank, directions, basis))

    def plan(self, kinds: Sequence[str | None]) -> list[tuple[int, str, int, bool, float]]:
        """(example, kind, layer, ablate, relative alpha) of a batch's attacks: the random draws alone, no model.

        `kinds[i]` is "harmful" (a refusal example: bypass attacks), "harmless" (a compliant-answer example:
        induction attacks, when the recipe asks for them) or None (not attacked). Every attackable example draws
        one number, also a harmless one at `attack_harmless_p` 0: that is the stream v2's cache key has built
        since `attack_harmless_p` exists (494 attacks; the card of record in results/cards/), kept so that the
        key keeps naming one organism (`tests/test_organism_determinism.py`)."""
        r, out = self.recipe, []
        p = {"harmful": r.attack_p, "harmless": r.attack_harmless_p}
        for i, kind in enumerate(kinds):
            if kind is None or self.rng.random() >= p[kind]:
                continue
            layer = self.rng.choice(self.layers)
            ablate = kind == "harmful" and self.rng.random() < r.attack_ablate_p
            out.append((i, kind, layer, ablate, self.rng.uniform(*r.attack_rel_alpha)))
        return out

    def plan_ladder(self, kinds: Sequence[str | None]) -> list[tuple]:
        """(example, kind, rung, layers, relative alpha, angle) of a batch's ladder attacks. Every attacked example
        draws the same five numbers (window or not, window size, cell, alpha, angle) whatever the curriculum's
        weights, so which examples are attacked depends on the seed alone. A "comply" example (v8: a harmful prompt
        whose target is the base model's answer) is always attacked, by `comply_rung` (add at `attack_multi_rel_alpha`:
        v8; affine ablation: v9) on a window of `attack_multi_k` consecutive layers of `comply_band` (default: the
        band): three draws, no curriculum."""
        r, out = self.recipe, []
        p = {"harmful": r.attack_p, "harmless": r.attack_harmless_p}
        lo, hi = r.attack_band
        for i, kind in enumerate(kinds):
            if kind == "comply":  # always attacked: a window of layers (of `comply_band`), the direction steered
                first, last = r.comply_band or (lo, hi)
                width = min(self.rng.randint(*r.attack_multi_k), last - first + 1)
                start = self.rng.randint(first, last - width + 1)
                rel = self.rng.uniform(*r.attack_multi_rel_alpha)
                out.append((i, kind, r.comply_rung, tuple(range(start, start + width)), rel, 0.0))
                continue
            if kind is None or self.rng.random() >= p[kind]:
                continue
            multi = self.rng.random() < r.attack_multi_p
            width = self.rng.randint(*r.attack_multi_k)
            layer, rung = self.rng.choices(self.cells, weights=self.weights)[0]
            rel = self.rng.uniform(*(r.attack_multi_rel_alpha if multi else r.attack_rel_alpha))
            angle = self.rng.choice(r.attack_angles)
            if multi:
                start = max(lo, min(layer, hi - width + 1))
                layers = tuple(range(start, min(hi, start + width - 1) + 1))
            else:
                layers = (layer,)
            out.append((i, kind, rung, layers, rel, angle))
        return out

    def count(self, kinds: Sequence[str | None]) -> int:
        """How many attacks a batch draws (the stream's shape, no model needed)."""
        return len(self.plan_ladder(kinds) if self.recipe.attack_rungs else self.plan(kinds))

    def draw(self, kinds: Sequence[str | None]) -> list[Attack]:
        """Attacks for a batch (`plan`, or `plan_ladder` for a ladder recipe), aimed with the current directions."""
        assert self.bank is not None, "refresh() before draw()"
        if self.recipe.attack_rungs:
            return self.draw_ladder(kinds)
        out = []
        for i, kind, layer, ablate, rel_alpha in self.plan(kinds):
            alpha = rel_alpha * self.bank.resid_norm(layer)
            target = self.bank.harmless_projection(layer)
            sign = 1.0 if kind == "harmful" else -1.0
            out.append(Attack(i, layer, ablate, sign * alpha, self.bank.direction(layer), target))
        return out

    def draw_ladder(self, kinds: Sequence[str | None]) -> list[Attack]:
        """Ladder attacks: a harmful example is attacked to bypass; a harmless one the same way when
        `attack_harmless_same`, else by induction (`+alpha x norm x v` added)."""
        assert self.bank is not None
        out = []
        for i, kind, rung, layers, rel, angle in self.plan_ladder(kinds):
            bypass = kind in ("harmful", "comply") or self.recipe.attack_harmless_same
            iv = self.intervention(rung if bypass else "add", layers, rel, angle, bypass)
            v = next(iter(iv.directions.values()))
            out.append(Attack(i, layers[0], False, 0.0, v, 0.0, intervention=iv))
        return out


def focus_weights(weights: Sequence[float], focus: float, top: int) -> list[float]:
    """`weights` with the `top` largest scaled up so that they hold at least `focus` of the total (the focused
    curriculum); unchanged when `focus` is 0 or they already hold that share. Ties keep the earlier cell."""
    out = list(weights)
    if focus <= 0 or top <= 0 or top >= len(out):
        return out
    if not 0 < focus < 1:
        raise ValueError(f"curriculum_focus {focus} must be in [0, 1)")
    chosen = sorted(range(len(out)), key=lambda i: (-out[i], i))[:top]
    held = sum(out[i] for i in chosen)
    rest = sum(out) - held
    scale = focus * rest / ((1 - focus) * held)
    if scale > 1:
        for i in chosen:
            out[i] *= scale
    return out


def attack_hooks(
    attacks: Sequence[Attack], spans: Sequence[tuple[int, int]]
) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Hook functions per layer (for `steering.layer_hooks`) that attack each example's packed span
    [a, b) of a [1, T, d] hidden state. Differentiable: ablation depends on the hidden state itself."""
    by_layer: dict[int, list[Attack]] = {}
    ladder: dict[int, list[tuple[int, Intervention]]] = {}
    for attack in attacks:
        if attack.intervention is None:
            by_layer.setdefault(attack.layer, []).append(attack)
        else:
            for layer in attack.intervention.directions:
                ladder.setdefault(layer, []).append((attack.example, attack.intervention))

    def make_ladder(group: list[tuple[int, Intervention]], layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        ops = [(spans[i], iv.mode.operator(iv, layer), iv.directions[layer]) for i, iv in group]

        def hook(hidden: torch.Tensor) -> torch.Tensor:
            out = hidden.clone()
            for (a, b), op, v in ops:
                out[:, a:b] = op(hidden[:, a:b], v.to(device=hidden.device, dtype=hidden.dtype))
            return out

        return hook

    def make(group: list[Attack]) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(hidden: torch.Tensor) -> torch.Tensor:
            delta = torch.zeros_like(hidden)
            for attack in group:
                a, b = spans[attack.example]
                v = attack.direction.to(device=hidden.device, dtype=hidden.dtype)
                if attack.ablate:
                    proj = hidden[:, a:b] @ v
                    delta[:, a:b] = -(proj - attack.target)[..., None] * v
                else:
                    delta[:, a:b] = -attack.alpha * v
            return hidden + delta

        return hook

    if by_layer and ladder:
        raise ValueError("a batch's attacks are all v2 draws or all ladder draws")
    if ladder:
        return {layer: make_ladder(group, layer) for layer, group in ladder.items()}
    return {layer: make(group) for layer, group in by_layer.items()}
