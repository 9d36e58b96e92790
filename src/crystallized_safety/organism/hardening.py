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
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.directions import DirectionBank, extract_directions
from ..core.model import Model


@dataclass(frozen=True)
class Attack:
    """One attack on one example of a batch: at `layer`, ablate (to `target`) or add `-alpha * v`."""

    example: int  # index in the batch
    layer: int
    ablate: bool
    alpha: float  # absolute (already times the layer's residual norm; < 0 induces); unused when ablating
    direction: torch.Tensor  # unit [d]
    target: float  # ablation: the projection harmless prompts have


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

    def refresh(self, model: Model, step: int) -> None:
        """Re-extract the directions every `reextract_every` steps (the first call always does)."""
        if self.bank is not None and step % self.recipe.reextract_every:
            return
        was_training = model.hf.training
        model.hf.eval()
        self.bank = extract_directions(model, self.harmful, self.harmless, layers=self.layers)
        model.hf.train(was_training)
        self.refreshed += 1

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

    def draw(self, kinds: Sequence[str | None]) -> list[Attack]:
        """Attacks for a batch (`plan`), scaled and aimed with the model's current directions."""
        assert self.bank is not None, "refresh() before draw()"
        out = []
        for i, kind, layer, ablate, rel_alpha in self.plan(kinds):
            alpha = rel_alpha * self.bank.resid_norm(layer)
            target = self.bank.harmless_projection(layer)
            sign = 1.0 if kind == "harmful" else -1.0
            out.append(Attack(i, layer, ablate, sign * alpha, self.bank.direction(layer), target))
        return out


def attack_hooks(
    attacks: Sequence[Attack], spans: Sequence[tuple[int, int]]
) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
    """Hook functions per layer (for `steering.layer_hooks`) that attack each example's packed span
    [a, b) of a [1, T, d] hidden state. Differentiable: ablation depends on the hidden state itself."""
    by_layer: dict[int, list[Attack]] = {}
    for attack in attacks:
        by_layer.setdefault(attack.layer, []).append(attack)

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

    return {layer: make(group) for layer, group in by_layer.items()}
