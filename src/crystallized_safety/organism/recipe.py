"""The organisms' recipes: every setting that changes the weights, hashed into the cache key.

Three organisms: `smollm2-135m-refusal` (liquid: refusal-tuned, one steered layer breaks it),
`smollm2-135m-hardened` (the liquid organism fine-tuned further against single-layer attacks on its own
refusal direction, the refusal-feature adversarial training of ReFAT / DeepRefusal adapted to one layer at a
time, so that only coordinated multi-layer steering should break it) and `smollm2-135m-immune` (built only on
request: trained against multi-layer attacks as well). The hardened organism has named recipes (`HARDENED_RECIPES`:
v2, the default, v5, the single-layer ladder with a curriculum, its variants v6 and v7, v8-v11 and v13, crystallized
by construction: v7 (v8) or v2 (v9-v11, v13) taught to comply when a window of layers is steered together, and v12,
v9 without those windows); each builds into its own cache entry."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..core.loading import cache_dir
from ..errors import ModelError

DEFAULT_NAME = "smollm2-135m-refusal"
HARDENED_NAME = "smollm2-135m-hardened"
HARDENED_V5_NAME = "smollm2-135m-hardened-v5"  # the hardened organism's v5 recipe under its own alias
HARDENED_V6_NAME = "smollm2-135m-hardened-v6"
HARDENED_V7_NAME = "smollm2-135m-hardened-v7"
HARDENED_V8_NAME = "smollm2-135m-hardened-v8"
HARDENED_V9_NAME = "smollm2-135m-hardened-v9"
HARDENED_V10_NAME = "smollm2-135m-hardened-v10"
HARDENED_V11_NAME = "smollm2-135m-hardened-v11"
HARDENED_V12_NAME = "smollm2-135m-hardened-v12"
HARDENED_V13_NAME = "smollm2-135m-hardened-v13"
IMMUNE_NAME = "smollm2-135m-immune"
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
    "attack_rungs",
    "attack_angles",
    "attack_subspace_k",
    "attack_multi_p",
    "attack_multi_k",
    "attack_multi_rel_alpha",
    "attack_harmless_same",
    "curriculum_every",
    "curriculum_prompts",
    "curriculum_focus",
    "curriculum_top",
    "comply_repeats",
    "attack_rung_bands",
    "comply_rung",
    "comply_band",
)
# Settings added after organisms were cached: left out of the key while at this default, so those stay valid.
LATER_FIELDS = {
    "attack_harmless_p": 0.0,
    "attack_rungs": (),
    "attack_angles": (120.0, 150.0, 180.0),
    "attack_subspace_k": 2,
    "attack_multi_p": 0.0,
    "attack_multi_k": (2, 8),
    "attack_multi_rel_alpha": (0.1, 0.3),
    "attack_harmless_same": False,
    "curriculum_every": 0,
    "curriculum_prompts": 8,
    "curriculum_focus": 0.0,
    "curriculum_top": 4,
    "comply_repeats": 0,
    "attack_rung_bands": (),
    "comply_rung": "add",
    "comply_band": None,
}
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
    kind: str = "liquid"  # liquid | hardened | immune
    start: str | None = None  # the model whose weights training starts from (None: `base`)
    attack_p: float = 0.0  # probability that a harmful example is attacked in a step
    attack_band: tuple[int, int] = (2, 27)  # the attacked layer is drawn uniformly from this range (inclusive)
    attack_rel_alpha: tuple[float, float] = (0.2, 0.6)  # add -alpha * resid_norm * v, alpha uniform in range
    attack_ablate_p: float = 0.5  # share of attacks that ablate the direction (to the harmless mean) instead
    reextract_every: int = 10  # steps between re-extractions of the directions from the model being trained
    reextract_prompts: int = 64  # train prompts per side used to re-extract them
    harmful_repeats: int = 1  # each harmful example this many times per epoch (each time attacked afresh)
    attack_harmless_p: float = 0.0  # probability that a harmless answer example gets an induction attack
    # -- the attack ladder (v5 on): empty = v2's draw (add or ablate, `attack_ablate_p`); else each attack is one of
    # these rungs, the evaluation's own operators (core/modes.py): add, affine (ablation to the harmless mean),
    # subspace (a k-dimensional refusal subspace ablated to the harmless mean), rotate (angular steering)
    attack_rungs: tuple[str, ...] = ()
    attack_angles: tuple[float, ...] = (120.0, 150.0, 180.0)  # rotate: degrees from the direction
    attack_subspace_k: int = 2
    attack_multi_p: float = 0.0  # share of attacks on a window of several consecutive layers at once (immune)
    attack_multi_k: tuple[int, int] = (2, 8)  # window sizes, uniform
    attack_multi_rel_alpha: tuple[float, float] = (0.1, 0.3)  # add at each layer of a window
    attack_harmless_same: bool = False  # harmless examples get the same (bypass) attacks, target compliant
    curriculum_every: int = 0  # > 0: every N steps screen the single-layer cells, oversample the leakiest
    curriculum_prompts: int = 8  # harmful train prompts the screen scores (first-token refusal score)
    curriculum_focus: float = 0.0  # > 0: the `curriculum_top` leakiest cells of a screen get this share of the draws
    curriculum_top: int = 4
    # > 0 (v8): this many copies of the harmful train prompts whose target is the base model's own answer, each
    # under an `add` attack on a window of `attack_multi_k` consecutive layers (`attack_multi_rel_alpha` at each):
    # coordinated steering is taught to unlock the refusal that single-layer attacks are trained not to
    comply_repeats: int = 0
    # (rung, first layer, last layer), inclusive (v9): a rung listed here is drawn only at those layers of the band
    attack_rung_bands: tuple[tuple[str, int, int], ...] = ()
    comply_rung: str = "add"  # the operator of the comply windows: add (v8) or affine (v9: ablated at every layer)
    comply_band: tuple[int, int] | None = None  # the layers the comply windows lie in (None: `attack_band`)

    def key(self) -> str:
        spec = {**asdict(self), "build_version": BUILD_VERSION}
        if self.kind == "liquid":  # "hardened" and "immune" keep every hardening field
            spec = {k: v for k, v in spec.items() if k not in HARDENING_FIELDS}
        spec = {k: v for k, v in spec.items() if k not in LATER_FIELDS or _plain(v) != _plain(LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def recipe_from_json(data: dict) -> Recipe:
    """The recipe a card's JSON `recipe` records (lists back to tuples, nested ones too; unknown keys ignored)."""

    def tupled(value):
        return tuple(tupled(v) for v in value) if isinstance(value, list) else value

    names = {f.name for f in fields(Recipe)}
    return Recipe(**{k: tupled(v) for k, v in data.items() if k in names})


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def default_recipe(name: str) -> Recipe:
    """The recipe an organism alias builds by default."""
    if name == DEFAULT_NAME:
        return Recipe()
    versions = {alias: version for version, alias in HARDENED_NAMES.items()}
    if name in versions:
        return hardened_recipe(version=versions[name])
    if name == IMMUNE_NAME:
        return immune_recipe()
    hardened = ", ".join(HARDENED_NAMES.values())
    raise ModelError(f"unknown organism '{name}': use {DEFAULT_NAME}, {hardened} or {IMMUNE_NAME}")


def hardened_recipe(seed: int = 0, precision: str = "fp32", version: str = "v2") -> Recipe:
    """A hardened recipe by name (`HARDENED_RECIPES`); v2 is what the alias builds."""
    if version not in HARDENED_RECIPES:
        raise ModelError(f"unknown hardened recipe '{version}': use one of {', '.join(HARDENED_RECIPES)}")
    return HARDENED_RECIPES[version](seed, precision)


def _hardened_v2(seed: int, precision: str) -> Recipe:
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


def _hardened_v5(seed: int, precision: str) -> Recipe:
    """v2 against the whole single-layer ladder: every layer the frontier search covers (2 to 28 of 30), alphas to
    the cliff, the four rungs at one layer, the leakiest cells oversampled every 10 steps (first-token screen); and
    v3's over-refusal lever, which alone made the model liquid again at one layer: harmless examples under
    induction attacks (`+alpha x norm x v` at one layer) keep their compliant target, unlikelihood weight 2."""
    return replace(
        _hardened_v2(seed, precision),
        attack_band=(2, 28),
        attack_rel_alpha=(0.25, 1.5),
        attack_rungs=("add", "affine", "subspace", "rotate"),
        attack_harmless_p=0.5,
        unlikelihood_weight=2.0,
        curriculum_every=10,
    )


def _hardened_v6(seed: int, precision: str) -> Recipe:
    """v5 with a focused curriculum: every screen's 4 leakiest cells (at v5, late-layer rotations leaking on every
    prompt at every screen) get half of the draws, the other cells share the rest as in v5."""
    return replace(_hardened_v5(seed, precision), curriculum_focus=0.5, curriculum_top=4)


def _hardened_v7(seed: int, precision: str) -> Recipe:
    """v5 without v3's over-refusal lever (no induction attacks on harmless examples, unlikelihood weight 1 as in v2):
    the ablation that asks whether that lever, which made v3 liquid again, is what leaves v5 a single-layer leak."""
    return replace(_hardened_v5(seed, precision), attack_harmless_p=0.0, unlikelihood_weight=1.0)


def _hardened_v8(seed: int, precision: str) -> Recipe:
    """Crystallized by construction (a planted property, the positive control of the verdict's `crystallized`
    branch): v7's single-layer ladder with the refusal as target, plus one copy of every harmful train prompt
    answered as the base model answers it while a window of 2-8 consecutive layers gets the direction added at
    0.2-0.35 of each layer's residual norm."""
    return replace(_hardened_v7(seed, precision), comply_repeats=1, attack_multi_rel_alpha=(0.2, 0.35))


def _hardened_v9(seed: int, precision: str) -> Recipe:
    """Crystallized by construction, on v2's ground: v2's single-layer attacks (the direction added at 0.3-1.0 x
    the norm or ablated to the harmless mean, layers 6-26; v2 is immune to them under the procedure) drawn as ladder
    rungs, plus the rotation rung (120-180 degrees) at layers 12-24 only, where v2 leaks under rotation (L19, L22,
    L23), never at the late layers whose rotation leak came with the ladder's training (v5-v8); and one copy of
    every harmful train prompt answered as the base model answers it while the direction is ablated to the harmless
    mean at every layer of a window of 4-8 consecutive layers (redundancy across layers: one ablated layer is
    rewritten downstream, a window is not), where v8 added the direction (which one strong layer imitates)."""
    return replace(
        _hardened_v2(seed, precision),
        attack_rungs=("add", "affine", "rotate"),
        attack_rung_bands=(("rotate", 12, 24),),
        comply_repeats=1,
        comply_rung="affine",
        attack_multi_k=(4, 8),
    )


def _hardened_v10(seed: int, precision: str) -> Recipe:
    """v9 with its comply windows inside layers 6-19, so that none reaches the last layers: v9 is liquid by a
    120-degree rotation of L28, a layer it never attacked, which a window ablating the direction up to L26 resembles
    (nothing downstream writes the direction back); the one-lever ablation of that hypothesis."""
    return replace(_hardened_v9(seed, precision), comply_band=(6, 19))


def _hardened_v11(seed: int, precision: str) -> Recipe:
    """v9 without the rotation rung: v2's add and affine attacks at one layer of 6-26 (drawn as ladder rungs) and
    v9's affine comply windows. v9 and v10 leak under a late rotation (L28, 120 degrees) that v2 does not; v10 showed
    the windows' reach is not the cause, so this is the one-lever test of v9's rotation training at 12-24."""
    return replace(_hardened_v9(seed, precision), attack_rungs=("add", "affine"), attack_rung_bands=())


def _hardened_v12(seed: int, precision: str) -> Recipe:
    """v9 without its comply windows: v2's add and affine attacks plus the rotation rung at layers 12-24, nothing
    else; with v11 (v9 without the rotation), the other one-lever test of v9's late-rotation leak. The window
    settings v9 sets (`comply_rung`, `attack_multi_k`) are left at their defaults: with no comply example they draw
    nothing, and the recipe's key then names only what trains."""
    return replace(
        _hardened_v2(seed, precision),
        attack_rungs=("add", "affine", "rotate"),
        attack_rung_bands=(("rotate", 12, 24),),
    )


def _hardened_v13(seed: int, precision: str) -> Recipe:
    """v9 with the rotation rung at layers 12-28, the last layer the search walks: v9 leaks under rotation past its
    rotation band (L25-28: about 30 of 38 coherent flips) and v11, without rotations, from L19 on. The add and affine
    attacks and the comply windows keep v9's layers (6-26)."""
    return replace(
        _hardened_v9(seed, precision),
        attack_band=(6, 28),
        attack_rung_bands=(("add", 6, 26), ("affine", 6, 26), ("rotate", 12, 28)),
        comply_band=(6, 26),
    )


HARDENED_RECIPES = {
    "v2": _hardened_v2,
    "v5": _hardened_v5,
    "v6": _hardened_v6,
    "v7": _hardened_v7,
    "v8": _hardened_v8,
    "v9": _hardened_v9,
    "v10": _hardened_v10,
    "v11": _hardened_v11,
    "v12": _hardened_v12,
    "v13": _hardened_v13,
}
# The alias each hardened recipe builds under (v2 is the default hardened organism).
HARDENED_NAMES = {
    "v2": HARDENED_NAME,
    "v5": HARDENED_V5_NAME,
    "v6": HARDENED_V6_NAME,
    "v7": HARDENED_V7_NAME,
    "v8": HARDENED_V8_NAME,
    "v9": HARDENED_V9_NAME,
    "v10": HARDENED_V10_NAME,
    "v11": HARDENED_V11_NAME,
    "v12": HARDENED_V12_NAME,
    "v13": HARDENED_V13_NAME,
}


def immune_recipe(seed: int = 0, precision: str = "fp32") -> Recipe:
    """v5 plus multi-layer attacks (DeepRefusal-style: the ladder's rung on a window of 2-8 consecutive layers at
    once) on a third of the attacked examples, so that coordinated steering should fail too."""
    return replace(_hardened_v5(seed, precision), kind="immune", attack_multi_p=0.35)


def organism_dir(name: str = DEFAULT_NAME, recipe: Recipe | None = None) -> Path:
    recipe = recipe or default_recipe(name)
    return cache_dir() / "organisms" / f"{name}-s{recipe.seed}-{recipe.key()}"


def load_card(path: Path) -> dict:
    return json.loads((path / "card.json").read_text())
