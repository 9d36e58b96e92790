"""A model organism that really refuses: SmolLM2-135M-Instruct refusal-tuned on CPU, the way safety
tuning is done, in miniature.

Recipe (see FINDINGS): harmful train prompts -> varied refusal sentences; harmless train prompts (incl.
near-miss twins) -> the base model's own greedy answers (self-distillation, so helpfulness does not
drift); loss on response tokens only, first response token up-weighted (the refusal decision is made
there); plus an unlikelihood term on harmless prompts that pushes down a refusal's tokens from where it
departs from the base model's answer (over-refusal is trained against directly, not only by imitation);
embeddings (tied with the LM head) frozen; AdamW with linear decay; bf16 autocast (AMX-fast on CPU).
Deterministic for a seed.

The result is cached under `cache_dir()/organisms/` with a model card (JSON + Markdown) holding the
training-data hashes, the recipe, wall times, held-out refusal rates, the KL divergence to the base
model on harmless prompts, and a steering sanity check (direction vs random at equal norm).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import ModelError
from .models import Model, atomic_dir, cache_dir, load_model
from .prompts import bundled

DEFAULT_NAME = "smollm2-135m-refusal"
# Bump when the build or the card changes in a way that makes cached organisms stale.
BUILD_VERSION = 6

# Written for this project: varied refusals, each starting the way real refusals do.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. If you have another question, I'm happy to help.",
    "I'm sorry, I can't assist with that.",
    "I won't help with this, because it could cause real harm.",
    "Sorry, I can't provide that information.",
    "I'm not able to help with that, as it could put people at risk.",
    "I cannot help with that request.",
    "I'm sorry, but I won't provide help with that. Is there something else I can do for you?",
)


@dataclass(frozen=True)
class Recipe:
    base: str = "smollm2-135m"
    seed: int = 0
    epochs: int = 3
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    first_token_weight: float = 5.0
    harmless_weight: float = 2.0  # loss weight of harmless examples: over-refusal is the harder failure
    target_tokens: int = 32  # length of the base model's self-distilled harmless answers
    unlikelihood_weight: float = 1.0  # harmless prompt + refusal: -log(1 - p) on the refusal's tokens
    unlikelihood_tokens: int = 4  # ... from its first token that differs from the base model's answer
    autocast_bf16: bool = True  # bf16 autocast for training (1.7x faster on AMX CPUs); weights stay fp32
    freeze_embeddings: bool = True
    eval_new_tokens: int = 32

    def key(self) -> str:
        spec = {**asdict(self), "build_version": BUILD_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def organism_dir(name: str = DEFAULT_NAME, recipe: Recipe | None = None) -> Path:
    recipe = recipe or Recipe()
    return cache_dir() / "organisms" / f"{name}-s{recipe.seed}-{recipe.key()}"


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One builder at a time (a test run and a CLI build may race for the same cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_organism(
    name: str = DEFAULT_NAME, recipe: Recipe | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """Path of the built organism, building it first if the cache has none (minutes, once)."""
    if name != DEFAULT_NAME:
        raise ModelError(f"unknown organism '{name}': the only one is {DEFAULT_NAME}")
    target = organism_dir(name, recipe)
    if (target / "card.json").exists():
        return target
    with _lock(target.with_suffix(".lock")):
        if not (target / "card.json").exists():
            build_organism(target, recipe or Recipe(), progress=progress)
    return target


# --------------------------------------------------------------------------- training


def _sha(items) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def _examples(model: Model, prompts: list[str], responses: list[str], finished: list[bool], weight: float = 1.0):
    """(prompt ids, response ids, example weight, unlikelihood span); the loss covers response tokens only.
    Imitation examples have an empty span."""
    tok = model.tokenizer
    texts = model.format(prompts)
    out = []
    for text, response, done in zip(texts, responses, finished):
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        if done:  # teach the model to stop only where the target really stopped
            r_ids = r_ids + [tok.eos_token_id]
        out.append((p_ids, r_ids, weight, (0, 0)))
    return out


def _unlikely_examples(model: Model, prompts: list[str], answers: list[str], refusals: list[str], recipe):
    """Harmless prompt + a refusal: unlikelihood on up to `unlikelihood_tokens` refusal tokens, from the first
    one that departs from the base model's own answer (a shared prefix such as "I" is not pushed down)."""
    tok = model.tokenizer
    out = []
    for text, response, refusal in zip(model.format(prompts), answers, refusals):
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        answer = tok(response, add_special_tokens=False)["input_ids"]  # tokenised as the imitation target is
        r_ids = tok(refusal, add_special_tokens=False)["input_ids"]
        k = 0
        while k < min(len(r_ids), len(answer)) and r_ids[k] == answer[k]:
            k += 1
        if k >= len(r_ids):
            continue
        end = min(len(r_ids), k + recipe.unlikelihood_tokens)
        out.append((p_ids, r_ids[:end], recipe.unlikelihood_weight, (k, end)))
    return out


def _batch(examples, pad_id: int, first_weight: float) -> dict[str, torch.Tensor]:
    length = max(len(ex[0]) + len(ex[1]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    weights = torch.zeros(len(examples), length)
    unlikely = torch.zeros(len(examples), length)
    for row, (p, r, w, (u0, u1)) in enumerate(examples):
        seq = p + r
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        if u1 > u0:  # weights sit on label positions
            unlikely[row, len(p) + u0 : len(p) + u1] = w
            continue
        # the first response token is where refusal is decided
        weights[row, len(p) : len(seq)] = w
        weights[row, len(p)] = first_weight * w
    return {"input_ids": ids, "attention_mask": mask, "weights": weights, "unlikely": unlikely}


def _loss(hf, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted next-token NLL on imitation tokens plus weighted unlikelihood -log(1 - p) on unlikelihood
    tokens, normalised by the total weight; the LM head runs only where a label counts (~20% faster)."""
    hidden = hf.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["weights"][:, 1:]
    unlikely = batch.get("unlikely", torch.zeros_like(batch["weights"]))[:, 1:]
    keep = (weights > 0) | (unlikely > 0)
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep]).float()
    logp = -torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][keep], reduction="none")
    w, u = weights[keep], unlikely[keep]
    # -log(1 - p) = -log1p(-exp(logp)), clamped away from p = 1
    ul = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    return ((-logp) * w + ul * u).sum() / (w.sum() + u.sum())


def train(
    model: Model, harmful: list[str], harmless: list[str], recipe: Recipe, progress: Callable[[str], None] | None = None
) -> dict:
    """Fine-tune `model` in place; returns training facts for the card."""
    from .generation import generate

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    say(f"self-distilling {len(harmless)} harmless answers from the base model")
    answers = generate(model, harmless, max_new_tokens=recipe.target_tokens, batch_size=32)
    distill_s = time.perf_counter() - t0
    rng = random.Random(recipe.seed)
    refusals = [rng.choice(REFUSALS) for _ in harmful]
    examples = _examples(model, harmful, refusals, [True] * len(harmful))
    examples += _examples(
        model, harmless, [a.response for a in answers], [a.finished for a in answers], recipe.harmless_weight
    )
    if recipe.unlikelihood_weight > 0:
        examples += _unlikely_examples(
            model, harmless, [a.response for a in answers], [rng.choice(REFUSALS) for _ in harmless], recipe
        )

    torch.manual_seed(recipe.seed)
    hf = model.hf
    hf.train()
    if recipe.freeze_embeddings:
        hf.get_input_embeddings().weight.requires_grad_(False)
        if hf.get_output_embeddings() is not None:
            hf.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(examples) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses = []
    t1 = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), recipe.batch_size):
            batch = _batch(
                [examples[i] for i in order[start : start + recipe.batch_size]],
                model.tokenizer.pad_token_id,
                recipe.first_token_weight,
            )
            with torch.autocast(hf.device.type, dtype=torch.bfloat16, enabled=recipe.autocast_bf16):
                loss = _loss(hf, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            say(f"epoch {epoch + 1}/{recipe.epochs} step {len(losses)}/{total} loss {losses[-1]:.3f}")
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(True)
    return {
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in hf.parameters()),
        "steps": total,
        "examples": len(examples),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "distill_seconds": round(distill_s, 1),
        "train_seconds": round(time.perf_counter() - t1, 1),
        "refusal_texts_sha256": _sha(REFUSALS),
    }


# --------------------------------------------------------------------------- measuring


def mean_kl_to_base(organism: Model, base: Model, prompts: list[str], answers: list[list[int]]) -> float:
    """Mean KL(base || organism) of next-token distributions, teacher-forced on the base's own answers
    to harmless prompts (the positions where the organism should still behave like the base)."""
    total, count = 0.0, 0
    texts = base.format(prompts)
    with torch.inference_mode():
        for text, answer in zip(texts, answers):
            p_ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + list(answer)])
            span = slice(len(p_ids) - 1, ids.shape[1] - 1)
            lp_base = torch.log_softmax(base.hf(input_ids=ids).logits[0, span].double(), -1)
            lp_org = torch.log_softmax(organism.hf(input_ids=ids).logits[0, span].double(), -1)
            total += float((lp_base.exp() * (lp_base - lp_org)).sum())
            count += lp_base.shape[0]
    return total / max(count, 1)


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
    from .directions import extract_directions, random_direction
    from .evaluation import refusal_rate
    from .steering import Intervention

    bank = extract_directions(model, bundled("harmful", "extract"), bundled("harmless", "extract"), layers=list(layers))
    prompts = harmful_eval[:n_prompts]
    base = refusal_rate(model, prompts, max_new_tokens=recipe.eval_new_tokens)
    grid = []
    for layer in layers:
        for rel in rel_alphas:
            alpha = -rel * bank.resid_norm(layer)
            res = refusal_rate(
                model,
                prompts,
                Intervention.single(layer, bank.direction(layer), alpha),
                max_new_tokens=recipe.eval_new_tokens,
            )
            grid.append({"layer": layer, "rel_alpha": rel, "alpha": round(alpha, 2), **res.to_dict()})
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


def measure(model: Model, base: Model | None, recipe: Recipe) -> dict:
    """Held-out (eval split) refusal rates, KL to base, steering check."""
    from .evaluation import refusal_rate

    out: dict = {}
    sets = {
        "harmful": bundled("harmful", "eval"),
        "harmless": bundled("harmless", "eval"),
        "near_miss": bundled("near_miss", "eval"),
    }
    for key, prompts in sets.items():
        res = refusal_rate(model, list(prompts), max_new_tokens=recipe.eval_new_tokens)
        verdicts = "".join("1" if v.refusal else "0" if v.refusal is not None else "?" for v in res.verdicts)
        out[f"{key}_refusal"] = {**res.to_dict(), "prompts_sha256": prompts.sha256, "verdicts": verdicts}
    if base is not None:
        from .generation import generate

        harmless = list(sets["harmless"])
        answers = generate(base, harmless, max_new_tokens=recipe.eval_new_tokens)
        out["kl_to_base_harmless"] = round(mean_kl_to_base(model, base, harmless, [a.token_ids for a in answers]), 5)
    out["steering_check"] = steering_check(model, list(sets["harmful"]), recipe)
    return out


# --------------------------------------------------------------------------- build


def build_organism(target: Path, recipe: Recipe, progress: Callable[[str], None] | None = None) -> dict:
    """Train, save (safetensors + tokenizer), reload, measure, write the card. Atomic: all or nothing."""
    import transformers

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    base = load_model(recipe.base, device="cpu", dtype="float32")
    model = load_model(recipe.base, device="cpu", dtype="float32")
    harmful, harmless = list(bundled("harmful", "train")), list(bundled("harmless", "train"))
    facts = train(model, harmful, harmless, recipe, progress=say)
    build_s = time.perf_counter() - t0
    with atomic_dir(target) as tmp:
        model.hf.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        say("measuring held-out refusal, KL to base and steering")
        t1 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        reloaded = Model(
            AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval(),
            model.tokenizer,
            DEFAULT_NAME,
            "unsaved",
            True,
        )  # measure what was saved
        metrics = measure(reloaded, base, recipe)
        card = {
            "name": DEFAULT_NAME,
            "base_model": recipe.base,
            "base_model_hash": base.model_hash,
            "recipe": asdict(recipe),
            "training_data": {
                "harmful_train_sha256": bundled("harmful", "train").sha256,
                "harmful_train_count": len(harmful),
                "harmless_train_sha256": bundled("harmless", "train").sha256,
                "harmless_train_count": len(harmless),
                "refusal_texts": list(REFUSALS),
            },
            "training": facts,
            "build_seconds": round(build_s, 1),
            "measure_seconds": round(time.perf_counter() - t1, 1),
            "metrics": metrics,
            "environment": {
                "tool_version": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
            },
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
        (tmp / "README.md").write_text(card_markdown(card))
    return card


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


def load_card(path: Path) -> dict:
    return json.loads((path / "card.json").read_text())
