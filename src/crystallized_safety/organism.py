"""A model organism that really refuses: SmolLM2-135M-Instruct refusal-tuned on CPU, the way safety
tuning is done, in miniature.

Recipe (README, "Model organism"): harmful train prompts -> varied refusal sentences; harmless train
prompts (incl. near-miss twins) -> the base model's own greedy answers (self-distillation, so helpfulness
does not drift); loss on response tokens only, first response token up-weighted (the refusal decision is
made there); plus an unlikelihood term on harmless prompts that pushes down a refusal's tokens from where
it departs from the base model's answer (over-refusal is trained against directly, not only by
imitation); embeddings (tied with the LM head) frozen; AdamW with linear decay; fp32 on every CPU (bf16
only on request: emulated bf16 is many times slower). Each step's batch is packed into one sequence
(shared prefix once, block mask): the same loss and gradients, about 1.5x faster on CPU.
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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import ModelError
from .generation import generate
from .models import Model, atomic_dir, cache_dir, load_model, save_pretrained
from .progress import Progress, silent
from .prompts import bundled
from .training import REFUSALS, base_answers, make_examples, packed_loss, shared_prefix, train

DEFAULT_NAME = "smollm2-135m-refusal"
# Bump when the build or the card changes in a way that makes cached organisms stale.
BUILD_VERSION = 7


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
    # fp32: the same organism on every CPU. bf16 (autocast; weights stay fp32) is faster only where the
    # CPU has native bf16 and trains a different organism, cached apart.
    precision: str = "fp32"
    freeze_embeddings: bool = True
    eval_new_tokens: int = 32

    def key(self) -> str:
        spec = {**asdict(self), "build_version": BUILD_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


# Self-distillation + measuring the card cost about this many training steps (measured on two CPU kinds).
OTHER_PHASES_IN_STEPS = 40


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


def ensure_organism(name: str = DEFAULT_NAME, recipe: Recipe | None = None, progress: Progress | None = None) -> Path:
    """Path of the built organism, building it first if the cache has none (minutes, once)."""
    if name != DEFAULT_NAME:
        raise ModelError(f"unknown organism '{name}': the only one is {DEFAULT_NAME}")
    target = organism_dir(name, recipe)
    if (target / "card.json").exists():
        return target
    with _lock(target.with_suffix(".lock")):
        if not (target / "card.json").exists():
            if progress is not None:
                build_organism(target, recipe or Recipe(), progress=progress)
            else:  # built on first use (e.g. by a model alias): still show progress on stderr
                from .progress import Reporter

                with Reporter(f"building organism {target.name} (once; then cached)") as reporter:
                    build_organism(target, recipe or Recipe(), progress=reporter)
    return target


# --------------------------------------------------------------------------- measuring


def mean_kl_to_base(
    organism: Model, base: Model, prompts: list[str], answers: list[list[int]], batch_size: int = 32
) -> float:
    """Mean KL(base || organism) of next-token distributions, teacher-forced on the base's own answers
    to harmless prompts (the positions where the organism should still behave like the base).
    Right-padded batches; only each answer's own positions count."""
    total, count = 0.0, 0
    seqs, spans = [], []
    for text, answer in zip(base.format(prompts), answers):
        p_ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + list(answer))
        spans.append((len(p_ids) - 1, len(p_ids) - 1 + len(answer)))
    pad = base.tokenizer.pad_token_id or 0

    def log_probs(model: Model, ids, mask, rows) -> torch.Tensor:
        """log-softmax (float64) at the answer positions only: the LM head and the softmax over the
        vocabulary are the costly part, and only these positions count."""
        hidden = model.hf.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        picked = torch.cat([hidden[k, spans[i][0] : spans[i][1]] for k, i in enumerate(rows)])
        return torch.log_softmax(model.hf.get_output_embeddings()(picked).double(), -1)

    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            rows = range(start, min(start + batch_size, len(seqs)))
            width = max(len(seqs[i]) for i in rows)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in rows], device=base.device)
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in rows], device=base.device)
            lb, lo = log_probs(base, ids, mask, rows), log_probs(organism, ids, mask, rows)
            total += float((lb.exp() * (lb - lo)).sum())
            count += lb.shape[0]
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
    from .evaluation import RefusalRate, refusal_rate
    from .judges.substring import SubstringJudge
    from .steering import Intervention, pack_interventions

    bank = extract_directions(model, bundled("harmful", "extract"), bundled("harmless", "extract"), layers=list(layers))
    prompts = harmful_eval[:n_prompts]
    cells = [(layer, rel, -rel * bank.resid_norm(layer)) for layer in layers for rel in rel_alphas]
    # the baseline and every cell in one batched generate (per-row steering vectors, same arithmetic per row)
    ivs = [None] + [Intervention.single(layer, bank.direction(layer), alpha) for layer, _rel, alpha in cells]
    packed = pack_interventions(ivs, len(prompts), model.hidden_size)
    gens = generate(model, prompts * len(ivs), packed, max_new_tokens=recipe.eval_new_tokens, batch_size=len(ivs) * 32)
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


def measure(model: Model, base: Model | None, recipe: Recipe, progress: Progress | None = None) -> dict:
    """Held-out (eval split) refusal rates, KL to base, steering check."""
    from .evaluation import RefusalRate
    from .judges.substring import SubstringJudge

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
        out["kl_to_base_harmless"] = round(mean_kl_to_base(model, base, harmless, [a.token_ids for a in answers]), 5)
    say("measuring: steering check (direction vs random)")
    out["steering_check"] = steering_check(model, list(sets["harmful"]), recipe)
    return out


# --------------------------------------------------------------------------- build


def estimate_build_seconds(model: Model, recipe: Recipe) -> float:
    """Seconds a build will take on this machine: one timed training step on a batch shaped like the
    recipe's (prompts + refusals, + 32-token answers, + unlikelihood spans), times the steps, plus
    self-distillation and measuring in units of that step (ratios measured on two CPU kinds)."""
    harmful = list(bundled("harmful", "train"))[: recipe.batch_size]
    n = len(harmful)
    answer = " ".join(["word"] * recipe.target_tokens)
    third = max(1, n // 3)
    refusals = make_examples(model, harmful, [REFUSALS[0]] * n, [True] * n)
    answers = make_examples(model, harmful, [answer] * n, [False] * n)
    examples = refusals[:third] + answers[third : 2 * third]
    examples += [(p, r[:4], 1.0, (0, 4)) for p, r, _w, _s in refusals[2 * third :]]  # unlikelihood-shaped
    prefix = shared_prefix([ex[0] for ex in examples])
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
        # warm-up (kernel selection, allocation), then the timed step
        packed_loss(model.hf, examples, model.tokenizer.pad_token_id, recipe.first_token_weight, prefix).backward()
        t0 = time.perf_counter()
        packed_loss(model.hf, examples, model.tokenizer.pad_token_id, recipe.first_token_weight, prefix).backward()
        step = time.perf_counter() - t0
    model.hf.zero_grad(set_to_none=True)
    n_examples = len(bundled("harmful", "train")) + len(bundled("harmless", "train")) * (
        2 if recipe.unlikelihood_weight > 0 else 1
    )
    steps = -(-n_examples // recipe.batch_size) * recipe.epochs
    return step * (steps + OTHER_PHASES_IN_STEPS)


def build_organism(target: Path, recipe: Recipe, progress: Progress | None = None) -> dict:
    """Train, save (safetensors + tokenizer), reload, measure, write the card. Atomic: all or nothing."""
    import transformers

    from .precision import detect

    say = progress or silent
    t0 = time.perf_counter()
    say("loading the base model")
    base = load_model(recipe.base, device="cpu", dtype="float32")
    model = load_model(recipe.base, device="cpu", dtype="float32")
    harmful, harmless = list(bundled("harmful", "train")), bundled("harmless", "train")
    facts = train(model, harmful, harmless, recipe, progress=say)
    build_s = time.perf_counter() - t0
    with atomic_dir(target) as tmp:
        save_pretrained(model.hf, model.tokenizer, tmp)
        t1 = time.perf_counter()
        say("measuring: reloading what was saved")
        reloaded = load_model(str(tmp), device="cpu", dtype="float32")  # measure what was saved
        metrics = measure(reloaded, base, recipe, progress=say)
        cpu = detect()
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
                "cpu": cpu.cpu,
                "native_bf16": cpu.native_bf16,
                "bf16_report": cpu.reason,
                "precision": recipe.precision,
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
