"""The organisms' recipes: every setting that changes the weights, hashed into the cache key.

Two organisms: `smollm2-135m-refusal` (liquid: refusal-tuned, one steered layer breaks it) and
`smollm2-135m-hardened` (the liquid organism fine-tuned further against single-layer attacks on its own
refusal direction, the refusal-feature adversarial training of ReFAT / DeepRefusal adapted to one layer at a
time, so that only coordinated multi-layer steering should break it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.loading import cache_dir
from ..errors import ModelError

DEFAULT_NAME = "smollm2-135m-refusal"
HARDENED_NAME = "smollm2-135m-hardened"
# Settings only the hardened recipe uses; left out of the liquid recipe's cache key, which therefore stays
# the key of every liquid organism built before they existed.
HARDENING_FIELDS = (
    "kind",
    "start",
    "attack_p",
    "attack_band",
    "attack_rel_alpha",
    "attack_ablate_p",
    "reextract_every",
    "reextract_prompts",
    "harmful_repeats",
    "attack_harmless_p",
)
# Settings added after organisms were cached: left out of the key while at this default, so those stay valid.
LATER_FIELDS = {"attack_harmless_p": 0.0}
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
    # -- hardening (kind "hardened"): start from another organism's weights and train against attacks
    kind: str = "liquid"  # liquid | hardened
    start: str | None = None  # the model whose weights training starts from (None: `base`)
    attack_p: float = 0.0  # probability that a harmful example is attacked in a step
    attack_band: tuple[int, int] = (2, 27)  # the attacked layer is drawn uniformly from this range (inclusive)
    attack_rel_alpha: tuple[float, float] = (0.2, 0.6)  # add -alpha * resid_norm * v, alpha uniform in range
    attack_ablate_p: float = 0.5  # share of attacks that ablate the direction (to the harmless mean) instead
    reextract_every: int = 10  # steps between re-extractions of the directions from the model being trained
    reextract_prompts: int = 64  # train prompts per side used to re-extract them
    harmful_repeats: int = 1  # each harmful example this many times per epoch (each time attacked afresh)
    attack_harmless_p: float = 0.0  # probability that a harmless answer example gets an induction attack

    def key(self) -> str:
        spec = {**asdict(self), "build_version": BUILD_VERSION}
        if self.kind == "liquid":
            spec = {k: v for k, v in spec.items() if k not in HARDENING_FIELDS}
        spec = {k: v for k, v in spec.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def default_recipe(name: str) -> Recipe:
    """The recipe an organism alias builds by default."""
    if name == DEFAULT_NAME:
        return Recipe()
    if name == HARDENED_NAME:
        return hardened_recipe()
    raise ModelError(f"unknown organism '{name}': use {DEFAULT_NAME} or {HARDENED_NAME}")


def hardened_recipe(seed: int = 0, precision: str = "fp32") -> Recipe:
    """The liquid organism, one more epoch against single-layer attacks on its current refusal direction."""
    return Recipe(
        seed=seed,
        precision=precision,
        kind="hardened",
        start=DEFAULT_NAME,
        epochs=1,
        lr=1e-4,
        harmless_weight=3.0,
        attack_p=0.9,
        attack_band=(6, 26),
        attack_rel_alpha=(0.3, 1.0),
        harmful_repeats=3,
    )


def organism_dir(name: str = DEFAULT_NAME, recipe: Recipe | None = None) -> Path:
    recipe = recipe or default_recipe(name)
    return cache_dir() / "organisms" / f"{name}-s{recipe.seed}-{recipe.key()}"


def load_card(path: Path) -> dict:
    return json.loads((path / "card.json").read_text())
