"""The organism's recipe: every setting that changes the weights, hashed into the cache key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.model import cache_dir

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


def organism_dir(name: str = DEFAULT_NAME, recipe: Recipe | None = None) -> Path:
    recipe = recipe or Recipe()
    return cache_dir() / "organisms" / f"{name}-s{recipe.seed}-{recipe.key()}"


def load_card(path: Path) -> dict:
    return json.loads((path / "card.json").read_text())
