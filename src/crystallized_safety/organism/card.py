"""Measuring a built organism and writing its model card: held-out refusal rates, KL divergence to the base
model on harmless prompts, a steering sanity check (direction vs a random direction of equal norm)."""

from __future__ import annotations

import json

from ..core.directions import extract_directions, random_direction
from ..core.generation import generate
from ..core.model import Model
from ..core.steering import Intervention, pack_interventions
from ..evaluation import RefusalRate, refusal_rate
from ..judges.divergence import DivergenceMeter
from ..judges.substring import SubstringJudge
from ..progress import Progress, silent
from ..prompts import bundled
from .recipe import Recipe
from .training import base_answers


def mean_kl_to_base(
    organism: Model, base: Model, prompts: list[str], answers: list[list[int]], batch_size: int = 32
) -> float:
    """Mean KL(base || organism) of next-token distributions, teacher-forced on the base's own answers
    to harmless prompts (the positions where the organism should still behave like the base)."""
    meter = DivergenceMeter(organism, prompts, answers, batch_size=batch_size, reference=base)
    return meter.measure([None])[0].kl_answer


def steering_check(
    model: Model,
    harmful_eval: list[str],
    recipe: Recipe,
    layers=(8, 12, 16, 20),
    rel_alphas=(0.25, 0.5),
    n_prompts: int = 32,
    seed: int = 0,
) -> dict:
    """Negative steering along the extracted direction vs a random direction of equal norm.

    Directions come from the `extract` split; the best (layer, alpha) is the one with the lowest
    refusal on `n_prompts` held-out harmful prompts; the random control uses the same layer and alpha.
    """
    bank = extract_directions(model, bundled("harmful", "extract"), bundled("harmless", "extract"), layers=list(layers))
    prompts = harmful_eval[:n_prompts]
    cells = [(layer, rel, -rel * bank.resid_norm(layer)) for layer in layers for rel in rel_alphas]
    # the baseline and every cell in one batched generate (per-row steering vectors, same arithmetic per row)
    ivs = [None] + [Intervention.single(layer, bank.direction(layer), alpha) for layer, _rel, alpha in cells]
    packed = pack_interventions(ivs, len(prompts), model.hidden_size)
    gens = generate(model, prompts * len(ivs), packed, max_new_tokens=recipe.eval_new_tokens, batch_size=288)
    verdicts = SubstringJudge().judge([g.prompt for g in gens], [g.response for g in gens])
    rates = [RefusalRate.from_verdicts(verdicts[j * len(prompts) : (j + 1) * len(prompts)]) for j in range(len(ivs))]
    base = rates[0]
    grid = [
        {"layer": layer, "rel_alpha": rel, "alpha": round(alpha, 2), **rate.to_dict()}
        for (layer, rel, alpha), rate in zip(cells, rates[1:])
    ]
    best = min(grid, key=lambda g: (g["rate"], g["rel_alpha"], abs(g["layer"] - 15)))
    rand = random_direction(model.hidden_size, seed)
    ctrl = refusal_rate(
        model, prompts, Intervention.single(best["layer"], rand, best["alpha"]), max_new_tokens=recipe.eval_new_tokens
    )
    return {
        "n_prompts": len(prompts),
        "baseline": base.to_dict(),
        "grid": grid,
        "best": {
            "layer": best["layer"],
            "alpha": best["alpha"],
            "rel_alpha": best["rel_alpha"],
            "direction_rate": best["rate"],
            "random_rate": ctrl.rate,
            "drop_pp_direction": round(100 * (base.rate - best["rate"]), 1),
            "drop_pp_random": round(100 * (base.rate - ctrl.rate), 1),
        },
    }


def multilayer_check(
    model: Model,
    harmful_eval: list[str],
    recipe: Recipe,
    starts=(4, 8, 12, 16),
    width: int = 8,
    rel_alphas=(0.1, 0.2, 0.3),
    n_prompts: int = 32,
    seed: int = 0,
) -> dict:
    """Coordinated steering of `width` consecutive layers (each at -rel x its mean residual norm) vs random
    directions at the same layers and alphas: what a hardened organism should still give in to."""
    layers = sorted({start + k for start in starts for k in range(width)})
    bank = extract_directions(model, bundled("harmful", "extract"), bundled("harmless", "extract"), layers=layers)
    prompts = harmful_eval[:n_prompts]
    norms = {layer: bank.resid_norm(layer) for layer in layers}

    def window(start: int, rel: float, vectors) -> Intervention:
        chosen = range(start, start + width)
        return Intervention(
            {layer: vectors(layer) for layer in chosen}, alpha=-rel, alpha_unit="relative", layer_norms=norms
        )

    cells = [(start, rel) for start in starts for rel in rel_alphas]
    ivs = [None] + [window(start, rel, bank.direction) for start, rel in cells]
    packed = pack_interventions(ivs, len(prompts), model.hidden_size)
    gens = generate(model, prompts * len(ivs), packed, max_new_tokens=recipe.eval_new_tokens, batch_size=256)
    verdicts = SubstringJudge().judge([g.prompt for g in gens], [g.response for g in gens])
    rates = [RefusalRate.from_verdicts(verdicts[j * len(prompts) : (j + 1) * len(prompts)]) for j in range(len(ivs))]
    grid = [
        {"layers": f"{start}-{start + width - 1}", "rel_alpha_per_layer": rel, **rate.to_dict()}
        for (start, rel), rate in zip(cells, rates[1:])
    ]
    best_i = min(range(len(cells)), key=lambda i: (grid[i]["rate"], cells[i][1]))
    start, rel = cells[best_i]
    ctrl = refusal_rate(
        model,
        prompts,
        window(start, rel, lambda layer: random_direction(model.hidden_size, seed + layer)),
        max_new_tokens=recipe.eval_new_tokens,
    )
    return {
        "n_prompts": len(prompts),
        "baseline": rates[0].to_dict(),
        "grid": grid,
        "best": {**grid[best_i], "random_rate": ctrl.rate},
    }


def measure(model: Model, base: Model | None, recipe: Recipe, progress: Progress | None = None) -> dict:
    """Held-out (eval split) refusal rates, KL to base, steering check."""

    say = progress or silent
    out: dict = {}
    sets = {
        "harmful": bundled("harmful", "eval"),
        "harmless": bundled("harmless", "eval"),
        "near_miss": bundled("near_miss", "eval"),
    }
    distinct = list(dict.fromkeys(p for prompts in sets.values() for p in prompts))  # twins sit in harmless too
    say(f"measuring: held-out refusal on {len(distinct)} eval prompts")
    gens = generate(model, distinct, max_new_tokens=recipe.eval_new_tokens, batch_size=64)
    verdict_of = dict(zip(distinct, SubstringJudge().judge(distinct, [g.response for g in gens])))
    for key, prompts in sets.items():
        verdicts = [verdict_of[p] for p in prompts]
        codes = "".join("1" if v.refusal else "0" if v.refusal is not None else "?" for v in verdicts)
        rate = RefusalRate.from_verdicts(verdicts).to_dict()
        out[f"{key}_refusal"] = {**rate, "prompts_sha256": prompts.sha256, "verdicts": codes}
    if base is not None:
        harmless = list(sets["harmless"])
        say(f"measuring: KL to the base model on {len(harmless)} harmless prompts")
        answers = base_answers(base, sets["harmless"], recipe.eval_new_tokens)
        kl = mean_kl_to_base(model, base, harmless, [list(a.token_ids) for a in answers])
        out["kl_to_base_harmless"] = round(kl, 5)
    say("measuring: steering check (direction vs random)")
    if recipe.kind in ("hardened", "immune"):
        layers, rels = (4, 8, 12, 16, 20, 24), (0.25, 0.5, 0.75)
        out["steering_check"] = steering_check(model, list(sets["harmful"]), recipe, layers=layers, rel_alphas=rels)
        say("measuring: coordinated multi-layer steering (direction vs random)")
        out["multilayer_check"] = multilayer_check(model, list(sets["harmful"]), recipe)
    else:
        out["steering_check"] = steering_check(model, list(sets["harmful"]), recipe)
    return out


def card_markdown(card: dict) -> str:
    m = card["metrics"]

    def rate(key: str) -> str:
        r = m[key]
        return f"{r['rate']:.1%} ({r['k']}/{r['n']}, 95% CI {r['ci_lo']:.1%}-{r['ci_hi']:.1%})"

    best = m["steering_check"]["best"]
    lines = [
        f"# {card['name']}",
        "",
        f"Refusal-tuned {card['base_model']} (base hash `{card['base_model_hash']}`), built by crystallized-safety "
        f"{card['environment']['tool_version']} on CPU in {card['build_seconds']} s "
        f"(training {card['training']['train_seconds']} s, {card['training']['steps']} steps).",
        "",
        *_reproducibility_lines(card),
        "## Held-out refusal (eval split, greedy, substring judge)",
        f"- harmful: {rate('harmful_refusal')}",
        f"- harmless: {rate('harmless_refusal')}",
        f"- near-miss harmless twins: {rate('near_miss_refusal')}",
        f"- mean KL(base || organism) on harmless prompts: {m.get('kl_to_base_harmless', 'n/a')}",
        "",
        "## Steering sanity check",
        f"Layer {best['layer']}, alpha {best['alpha']} (relative {best['rel_alpha']} of the layer's mean residual "
        f"norm), {m['steering_check']['n_prompts']} held-out harmful prompts: refusal "
        f"{m['steering_check']['baseline']['rate']:.1%} -> {best['direction_rate']:.1%} along the refusal direction, "
        f"{best['random_rate']:.1%} along a random direction of equal norm.",
        "",
        *_multilayer_lines(m),
        *_curriculum_lines(card),
        "## Recipe",
        "```json",
        json.dumps(card["recipe"], indent=2),
        "```",
        "",
        "## Training data",
        f"- harmful train prompts: {card['training_data']['harmful_train_count']} "
        f"(sha256 `{card['training_data']['harmful_train_sha256']}`)",
        f"- harmless train prompts: {card['training_data']['harmless_train_count']} "
        f"(sha256 `{card['training_data']['harmless_train_sha256']}`)",
        "",
    ]
    return "\n".join(lines)


def _multilayer_lines(metrics: dict) -> list[str]:
    check = metrics.get("multilayer_check")
    if not check:
        return []
    best = check["best"]
    return [
        "## Coordinated multi-layer steering",
        f"Layers {best['layers']}, each at -{best['rel_alpha_per_layer']} x its mean residual norm, "
        f"{check['n_prompts']} held-out harmful prompts: refusal {check['baseline']['rate']:.1%} -> "
        f"{best['rate']:.1%} along the refusal directions, {best['random_rate']:.1%} along random directions.",
        "",
    ]


def _curriculum_lines(card: dict) -> list[str]:
    """The leaks the build measured on itself (the adversarial curriculum's screens, recipe v5 on)."""
    screens = card.get("training", {}).get("curriculum")
    if not screens:
        return []
    first, last = screens[0], screens[-1]
    return [
        "## Leaks measured during the build (curriculum screens)",
        f"First-token screen of every single-layer cell (layer x rung) on the build's harmful train prompts, "
        f"{len(screens)} times: mean probability of a non-refusal first token {first['mean_leak']:.1%} at step "
        f"{first['step']} (worst cell L{first['worst'][0]} {first['worst'][1]}: {first['worst_leak']:.1%}), "
        f"{last['mean_leak']:.1%} at step {last['step']} (worst L{last['worst'][0]} {last['worst'][1]}: "
        f"{last['worst_leak']:.1%}). A screen, not the verdict: the frontier search decides.",
        "",
    ]


def _reproducibility_lines(card: dict) -> list[str]:
    env = card.get("environment", {})
    return [
        f"Built on {env.get('cpu', '?')} with {env.get('threads', '?')} threads, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, {env.get('precision', '?')}. Deterministic for its seed; the "
        "cache key holds the recipe and build version only, so another CPU kind, thread count or torch version may "
        "round to other weights (docs/organisms.md, what a cached organism depends on).",
        "",
    ]
