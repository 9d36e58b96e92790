"""Choosing one refusal direction among positions x layers, as Arditi et al. 2024 do (andyrdt/refusal_direction),
with forward passes only.

Candidates: the difference-in-means direction at each post-instruction template position (-1 .. -5) and each
layer. Scores per candidate, on held-out prompts (out of sample: disjoint from the eval prompts the steering
evaluation reads, see `scoring_prompts`):
- *bypass*: the mean first-token refusal log-odds on harmful prompts with the direction ablated at the output of
  every block (projection set to zero as in the paper, or with `ablate_to="harmless-mean"` to where harmless
  prompts sit at that layer, the affine ablation that avoids pushing harmless prompts towards refusal where
  they project far from zero): lower = ablating it removes refusal better;
- *induce*: the mean refusal log-odds on harmless prompts with the raw difference-in-means vector added at its
  own layer: > 0 = adding it induces refusal;
- *KL*: the mean first-token KL(unsteered || ablated) on harmless prompts: how much ablation disturbs the model
  where there is nothing to refuse.
Filters as in the paper: KL < 0.1, induce > 0, and not in the last 20% of layers; the kept candidate with the
lowest bypass wins. (The paper also ablates at the embedding output; here ablation acts on every block's
output, which is where this tool's hooks live.)

`criterion="cosmic"` scores as COSMIC does (Siu et al. 2025, wang-research-lab/COSMIC), from activations alone,
no output tokens: on the layers where harmful and harmless mean activations are least alike (lowest cosine, the
lowest 10%), the unit mean of the last-token activations of the ablated harmful prompts is compared (cosine) with
that of the unsteered harmless ones (*bypass*: higher = ablation makes harmful look harmless), and the unit mean
of the harmless prompts with the vector added with that of the unsteered harmful ones (*induce*); the kept
candidate (KL < 0.1, not in the last 20% of layers) with the largest bypass + induce wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.activations import capture
from ..core.directions import DirectionBank, extract_directions
from ..core.generation.fast import first_logits
from ..core.model import Model
from ..core.steering import Intervention, steer
from ..errors import CrystallizedSafetyError
from ..judges.divergence import mean_kl
from ..judges.refusal_score import RefusalScoreJudge, refusal_log_odds
from ..progress import Progress, silent

POSITIONS = (-1, -2, -3, -4, -5)


CRITERIA = ("arditi", "cosmic")


@dataclass(frozen=True)
class Candidate:
    position: int
    layer: int
    bypass: float
    induce: float
    kl: float
    kept: bool
    reason: str  # why it was filtered out ("" when kept)
    score: float = 0.0  # what the choice maximises: -bypass (arditi), bypass + induce (cosmic)


@dataclass
class Selection:
    candidates: list[Candidate]
    chosen: Candidate | None  # None when no candidate passes the filters
    bank: DirectionBank | None  # every layer's direction at the chosen position
    settings: dict = field(default_factory=dict)


def first_token_logits(model: Model, prompts: Sequence[str], iv: Intervention | None, batch: int = 32) -> torch.Tensor:
    """Next-token logits after each prompt under `iv` (float32 [n, vocab], CPU)."""
    ids = model.tokenizer(model.format(list(prompts)), add_special_tokens=False)["input_ids"]
    out = [first_logits(model, ids[i : i + batch], iv).float().cpu() for i in range(0, len(ids), batch)]
    return torch.cat(out)


def unit_mean(acts: torch.Tensor) -> torch.Tensor:
    """The unit vector of the mean over prompts and layers of activations [N, L, d] (float64)."""
    mean = acts.double().mean(dim=(0, 1))
    return mean / mean.norm()


def cosmic_layers(model: Model, harmful: Sequence[str], harmless: Sequence[str], share: float = 0.1) -> list[int]:
    """The layers (at least one; the lowest `share`) where harmful and harmless mean last-token activations have
    the lowest cosine similarity: where the two sets are most told apart."""
    h, n = capture(model, list(harmful)).acts.double().mean(0), capture(model, list(harmless)).acts.double().mean(0)
    cos = torch.nn.functional.cosine_similarity(h, n, dim=-1)
    count = max(1, round(share * model.n_layers))
    return sorted(int(i) for i in torch.argsort(cos)[:count])


def cosmic_scores(
    model: Model, harmful: Sequence[str], harmless: Sequence[str], layers: list[int], ablate: Intervention,
    induce: Intervention, base: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float, float]:  # fmt: skip
    """(bypass, induce) cosines of one candidate; `base` = unit means (harmful, harmless), unsteered."""
    with steer(model, ablate):
        ablated = unit_mean(capture(model, list(harmful), layers=layers).acts)
    with steer(model, induce):
        induced = unit_mean(capture(model, list(harmless), layers=layers).acts)
    return float(ablated @ base[1]), float(induced @ base[0])


class CandidateScorer:
    """Scores one candidate direction: ablated at every block (to zero, or affine) on harmful prompts (bypass),
    added at its layer on harmless ones (induce), and the first-token KL of the ablation on harmless prompts."""

    def __init__(self, model: Model, harmful: list[str], harmless: list[str], criterion: str) -> None:
        self.model, self.harmful, self.harmless = model, harmful, harmless
        self.judge = RefusalScoreJudge(model)
        self.base_harmless = first_token_logits(model, harmless, None)
        self.cosmic: tuple[list[int], tuple[torch.Tensor, torch.Tensor]] | None = None
        if criterion == "cosmic":
            layers = cosmic_layers(model, harmful, harmless)
            base = (unit_mean(capture(model, harmful, layers=layers).acts),
                    unit_mean(capture(model, harmless, layers=layers).acts))  # fmt: skip
            self.cosmic = (layers, base)

    def score(self, bank: DirectionBank, layer: int, affine: bool) -> dict:
        model, every = self.model, list(range(self.model.n_layers))
        v = bank.direction(layer)
        targets = {k: bank.harmless_projection(k, v) for k in every} if affine else {}
        ablate = Intervention(directions=dict.fromkeys(every, v), mode="ablate", ablate_to=targets)
        assert bank.raw_norms is not None  # extracted banks carry their norms
        induce = Intervention(directions={layer: v}, alpha=float(bank.raw_norms[bank.layers.index(layer)]))
        kl = mean_kl(self.base_harmless, first_token_logits(model, self.harmless, ablate))
        if self.cosmic is None:
            logits = first_token_logits(model, self.harmful, ablate)
            bypass = float(refusal_log_odds(logits, self.judge.token_ids).mean())
            return {"bypass": bypass, "induce": float(self.judge.scores(self.harmless, induce).mean()),
                    "score": -bypass, "kl": kl}  # fmt: skip
        layers, base = self.cosmic
        bypass, induced = cosmic_scores(model, self.harmful, self.harmless, layers, ablate, induce, base)
        return {"bypass": bypass, "induce": induced, "score": bypass + induced, "kl": kl}


def filter_reason(c: dict, n_layers: int, kl_max: float, drop_last: float, induce_min: float = 0.0) -> str:
    """Why the paper's filters drop a candidate ("" = kept)."""
    if c["layer"] >= n_layers * (1 - drop_last):
        return f"in the last {drop_last:.0%} of layers"
    if not c["kl"] < kl_max:
        return f"KL {c['kl']:.3f} >= {kl_max}"
    if not c["induce"] > induce_min:
        return f"induce {c['induce']:.2f} <= {induce_min:g}"
    return ""


def select_direction(
    model: Model,
    extract: tuple[Sequence[str], Sequence[str]],
    evaluate: tuple[Sequence[str], Sequence[str]],
    *,
    positions: Sequence[int] = POSITIONS,
    layers: Sequence[int] | None = None,
    kl_max: float = 0.1,
    drop_last: float = 0.2,
    induce_min: float = 0.0,
    ablate_to: str = "zero",
    criterion: str = "arditi",
    progress: Progress | None = None,
    scored_on: str = "",
) -> Selection:
    """Score every (position, layer) candidate and pick one (see the module docstring); `chosen` is None when no
    candidate passes the filters (the scores are still returned, to see which filter failed). `evaluate` must be
    prompts the steering evaluation never reads (`scoring_prompts`), else the choice is in sample; `scored_on`
    says which they are, kept in the settings for the table and the report."""
    if ablate_to not in ("zero", "harmless-mean"):
        raise CrystallizedSafetyError(f"unknown ablate_to '{ablate_to}': use zero or harmless-mean")
    if criterion not in CRITERIA:
        raise CrystallizedSafetyError(f"unknown criterion '{criterion}': use {' or '.join(CRITERIA)}")
    say = progress or silent
    harmful, harmless = list(evaluate[0]), list(evaluate[1])
    layer_list = model.parse_layers(list(layers) if layers is not None else None)
    every = list(range(model.n_layers))  # ablation acts at every block: the harmless means of all of them
    banks = {p: extract_directions(model, extract[0], extract[1], layers=every, position=p) for p in positions}
    scorer = CandidateScorer(model, harmful, harmless, criterion)
    rows: list[dict] = []
    total = len(positions) * len(layer_list)
    for p, bank in banks.items():
        for layer in layer_list:
            rows.append({"position": p, "layer": layer, **scorer.score(bank, layer, ablate_to == "harmless-mean")})
            say("direction selection", len(rows), total, f"position {p} layer {layer}")
    cosmic = scorer.cosmic
    floor = induce_min if criterion == "arditi" else -float("inf")  # COSMIC filters on KL and depth only
    reasons = [filter_reason(r, model.n_layers, kl_max, drop_last, floor) for r in rows]
    candidates = [Candidate(**r, kept=not why, reason=why) for r, why in zip(rows, reasons)]
    settings = {"kl_max": kl_max, "drop_last": drop_last, "induce_min": floor, "positions": list(positions),
                "n_eval": len(harmful), "ablate_to": ablate_to, "criterion": criterion,
                "cosmic_layers": cosmic[0] if cosmic else None, "scored_on": scored_on}  # fmt: skip
    kept = [c for c in candidates if c.kept]
    if not kept:
        return Selection(candidates, None, None, settings)
    chosen = max(kept, key=lambda c: c.score)
    bank = banks[chosen.position]
    rule = (
        f"Arditi et al. 2024: min bypass s.t. KL < {kl_max:g}, induce > 0"
        if criterion == "arditi"
        else f"COSMIC (Siu et al. 2025): max bypass + induce cosine on layers {settings['cosmic_layers']}, "
        f"KL < {kl_max:g}"
    )
    bank.metadata.update(selected_layer=str(chosen.layer), selected_position=str(chosen.position), selection=rule)
    return Selection(candidates, chosen, bank, settings)


def no_choice_message(sel: Selection) -> str:
    """Why nothing was chosen, with the closest candidates, for the one-line error."""
    s = sel.settings
    low_kl = min(sel.candidates, key=lambda c: c.kl)
    high_induce = max(sel.candidates, key=lambda c: c.induce)
    return (
        f"no candidate passes the filters (KL < {s['kl_max']}, induce > {s['induce_min']:g}, first "
        f"{1 - s['drop_last']:.0%} of layers): lowest KL {low_kl.kl:.3f} (position {low_kl.position}, layer "
        f"{low_kl.layer}), highest induce {high_induce.induce:.2f}; try --ablate-to harmless-mean or raise --kl-max"
    )
