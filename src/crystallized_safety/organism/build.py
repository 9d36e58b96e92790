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
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.loading import atomic_dir, save_pretrained
from ..core.model import Model
from ..environment import environment
from ..progress import Progress, Reporter, silent
from ..prompts import bundled
from .card import card_markdown, measure
from .hardening import Attacker
from .recipe import DEFAULT_NAME, Recipe, default_recipe, organism_dir, recipe_from_json
from .training import REFUSALS, base_answers, make_examples, packed_loss, planned_attacks, shared_prefix, train

# Self-distillation + measuring the card cost about this many training steps (measured on two CPU kinds).
OTHER_PHASES_IN_STEPS = 40
# ... and for a recipe that attacks, whose card measures more steering checks (multi-layer, the ladder): the v5
# card's measuring (391.1 s) over the liquid card's training step (4.6 s), AMD EPYC.
HARDENED_OTHER_PHASES_IN_STEPS = 85

Loader = Callable[..., Model]  # registry.load_model: opens a model by alias or path


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
    name: str = DEFAULT_NAME, recipe: Recipe | None = None, progress: Progress | None = None, *, load: Loader
) -> Path:
    """Path of the built organism, building it first if the cache has none (minutes, once). `load` opens the
    base model by its alias (`registry.load_model`)."""
    recipe = recipe or default_recipe(name)
    target = organism_dir(name, recipe)
    if (target / "card.json").exists():
        return target
    with _lock(target.with_suffix(".lock")):
        if not (target / "card.json").exists():
            if progress is not None:
                build_organism(target, recipe, load, progress=progress, name=name)
            else:  # built on first use (e.g. by a model alias): still show progress on stderr
                with Reporter(f"building organism {target.name} (once; then cached)") as reporter:
                    build_organism(target, recipe, load, progress=reporter, name=name)
    return target


def estimate_build_seconds(model: Model, recipe: Recipe) -> float:
    """Seconds a build will take on this machine: one timed training step on a batch shaped like the
    recipe's (prompts + refusals, + 32-token answers, + unlikelihood spans), times the steps, plus
    self-distillation and measuring in units of that step (ratios measured on two CPU kinds). A recipe that
    attacks (hardened, immune) times its step under the attacks it draws, and adds one timed re-extraction of
    its directions per `reextract_every` steps and one curriculum screen (timed on about 8 of its cells, scaled)
    per `curriculum_every` steps."""
    harmful = list(bundled("harmful", "train"))[: recipe.batch_size]
    n = len(harmful)
    answer = " ".join(["word"] * recipe.target_tokens)
    third = max(1, n // 3)
    refusals = make_examples(model, harmful, [REFUSALS[0]] * n, [True] * n)
    answers = make_examples(model, harmful, [answer] * n, [False] * n)
    examples = refusals[:third] + answers[third : 2 * third]
    examples += [(p, r[:4], 1.0, (0, 4)) for p, r, _w, _s in refusals[2 * third :]]  # unlikelihood-shaped
    n_examples = len(bundled("harmful", "train")) * (recipe.harmful_repeats + recipe.comply_repeats) + len(
        bundled("harmless", "train")
    ) * (2 if recipe.unlikelihood_weight > 0 else 1)
    steps = -(-n_examples // recipe.batch_size) * recipe.epochs
    prefix = shared_prefix([ex[0] for ex in examples])

    def timed_step(attacks: list, prefix: int) -> float:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
            # warm-up (kernel selection, allocation), then the mean of two timed steps (one step's time varies)
            packed_loss(model, examples, recipe.first_token_weight, prefix, attacks).backward()
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                packed_loss(model, examples, recipe.first_token_weight, prefix, attacks).backward()
                seconds.append(time.perf_counter() - t0)
        model.hf.zero_grad(set_to_none=True)
        return sum(seconds) / len(seconds)

    step = timed_step([], prefix)  # the unit of the other phases (measured in unattacked steps)
    if recipe.attack_p <= 0:
        return step * (steps + OTHER_PHASES_IN_STEPS)
    attacks, overhead = _attack_overhead(model, recipe, steps, [True] * third + [False] * (n - third))
    attacked = timed_step(attacks, 0)  # attacked batches are packed without a shared prefix
    return attacked * steps + step * HARDENED_OTHER_PHASES_IN_STEPS + overhead


def _attack_overhead(model: Model, recipe: Recipe, steps: int, harmful_rows: list[bool]) -> tuple[list, float]:
    """(a batch's attacks, seconds of re-extraction and curriculum screens over the build), timed on `model`."""
    attacker = Attacker(recipe, bundled("harmful", "train").prompts, bundled("harmless", "train").prompts, recipe.seed)
    cells = attacker.cells
    attacker.cells = []  # the first refresh re-extracts only; the screen is timed apart below
    t0 = time.perf_counter()
    attacker.refresh(model, 0)
    extract_s = time.perf_counter() - t0
    attacker.cells = cells
    attacks = attacker.draw(["harmful" if h else "harmless" for h in harmful_rows])
    screen_s = 0.0
    if recipe.curriculum_every > 0 and cells:
        with torch.no_grad():
            attacker.cells = cells[:1]
            attacker.screen(model, 0)  # warm-up: the judge's first call, not to be scaled by the cell count
            attacker.cells = cells[:: max(1, len(cells) // 8)]
            t0 = time.perf_counter()
            attacker.screen(model, 0)
            screen_s = (time.perf_counter() - t0) * len(cells) / len(attacker.cells)
        attacker.cells = cells
    refreshes = -(-steps // recipe.reextract_every)
    screens = -(-steps // recipe.curriculum_every) if recipe.curriculum_every > 0 else 0
    return attacks, refreshes * extract_s + screens * screen_s


def build_organism(
    target: Path, recipe: Recipe, load: Loader, progress: Progress | None = None, name: str = DEFAULT_NAME
) -> dict:
    """Train, save (safetensors + tokenizer), reload, measure, write the card. Atomic: all or nothing.
    Training starts from `recipe.start` (another organism, built first if needed) or the base model."""
    say = progress or silent
    t0 = time.perf_counter()
    say("loading the base model")
    base = load(recipe.base, device="cpu", dtype="float32")
    harmful, harmless = list(bundled("harmful", "train")), bundled("harmless", "train")
    answers = base_answers(base, harmless, recipe.target_tokens)  # shipped with the package for the base
    if recipe.start:
        say(f"loading {recipe.start} to start from")
    model = load(recipe.start or recipe.base, device="cpu", dtype="float32")
    start_hash = model.model_hash
    complies = []
    if recipe.comply_repeats:  # the comply examples' targets (v8, v9): the base model's own answers to them
        say(f"the base model's answers to {len(harmful)} harmful prompts (the comply targets: shipped, else generated)")
        complies = base_answers(base, bundled("harmful", "train"), recipe.target_tokens)
    facts = train(model, harmful, harmless, recipe, progress=say, answers=answers, complies=complies)
    build_s = time.perf_counter() - t0
    with atomic_dir(target) as tmp:
        save_pretrained(model.hf, model.tokenizer, tmp)
        t1 = time.perf_counter()
        say("measuring: reloading what was saved")
        reloaded = load(str(tmp), device="cpu", dtype="float32")  # measure what was saved
        metrics = measure(reloaded, base, recipe, progress=say)
        card = {
            "name": name,
            "base_model": recipe.base,
            "started_from": recipe.start or recipe.base,
            "started_from_hash": start_hash,  # the start organism's cache is keyed by its recipe, not its weights
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
            "environment": {**environment(), "precision": recipe.precision},
        }
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
        (tmp / "README.md").write_text(card_markdown(card))
    return card


def stale_attack_stream(card: dict) -> str | None:
    """Why a cached hardened organism is not what its cache key builds today, or None: its card's attack count
    differs from the count the recipe's seeded attack stream gives (`planned_attacks`, no model needed). Builds
    before the commit that added `attack_harmless_p` drew no random number for harmless examples, so the same key
    trained a different organism then (v2: 486 attacks, not 494)."""
    done = card.get("training", {}).get("attacks")
    if not done or not card.get("recipe", {}).get("attack_p"):
        return None
    data = card["training_data"]
    want = planned_attacks(
        recipe_from_json(card["recipe"]),
        data["harmful_train_count"],
        data["harmless_train_count"],
        card["training"]["examples"],
    )
    if want == done:
        return None
    return (
        f"this cached {card['name']} was trained with {done} attacks, its recipe's seeded stream draws {want}: it "
        "was built by a version whose attack sampling drifted under the same cache key, and a fresh build gives a "
        "different organism (rebuild it with `csafety organism build --kind hardened --force`)"
    )
