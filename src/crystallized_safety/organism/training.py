"""Training the model organism: examples from prompts and targets, the packed training loss, the loop, and
the base model's own answers it imitates.

An example is (prompt ids, response ids, weight, unlikelihood span). Imitation examples teach a response
(harmful prompt -> a refusal; harmless prompt -> the base model's own answer); unlikelihood examples
(harmless prompt + a refusal) push a refusal's tokens down from where it departs from the base model's
answer. The loss of a batch is computed on one packed sequence (`packed_loss`).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..core.generation.api import Generation, generate
from ..core.model import Model
from ..core.steering import layer_hooks
from ..progress import Progress, silent
from ..prompts import PromptSet, bundled
from .hardening import Attack, Attacker, attack_hooks

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


def _sha(items) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def make_examples(model: Model, prompts: list[str], responses: list[str], finished: list[bool], weight: float = 1.0):
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


def make_unlikely_examples(model: Model, prompts: list[str], answers: list[str], refusals: list[str], recipe):
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


def targets(example, first_weight: float) -> tuple[list[int], list[float], list[float]]:
    """(token ids, imitation weight per label position, unlikelihood weight per label position).

    Position j weighs the prediction of token j (made from position j - 1). Imitation covers the response,
    its first token `first_weight` times (the refusal decision is made there); an unlikelihood example
    weighs only its span."""
    p, r, w, (u0, u1) = example
    seq = list(p) + list(r)
    imitate, unlikely = [0.0] * len(seq), [0.0] * len(seq)
    if u1 > u0:
        for j in range(len(p) + u0, len(p) + u1):
            unlikely[j] = w
    else:
        for j in range(len(p), len(seq)):
            imitate[j] = w
        imitate[len(p)] = first_weight * w
    return seq, imitate, unlikely


def shared_prefix(sequences: list[list[int]]) -> int:
    """Length of the token prefix all sequences share, leaving at least one token of each unshared."""
    shortest = min(len(s) for s in sequences)
    k = 0
    while k < shortest - 1 and all(s[k] == sequences[0][k] for s in sequences):
        k += 1
    return k


def packed_loss(
    model: Model, examples, first_weight: float, prefix: int = 0, attacks: Sequence[Attack] = ()
) -> torch.Tensor:
    """Weighted next-token NLL on imitation tokens plus weighted unlikelihood -log(1 - p) on unlikelihood
    tokens, normalised by the total weight: the value of one padded batch, computed with less work.

    The batch is *packed* into one sequence: the `prefix` tokens every example starts with (system prompt,
    template head) once, then each example's remaining tokens, with a block mask so that each example sees
    only the prefix and itself, and positions that restart after the prefix. No pad token and no repeated
    prefix is computed, and all rows go through one large matmul per layer (much better on CPU than
    several small ones). The LM head runs only where a label counts. `attacks` (hardening) steer single
    examples' spans at one layer each during the forward pass; they need `prefix` 0.
    """
    if attacks and prefix:
        raise ValueError("attacked batches are packed without a shared prefix (prefix=0)")
    body, head = model.body, model.head
    dev, dtype = model.device, model.dtype
    rows = [targets(ex, first_weight) for ex in examples]
    ids, pos, spans = list(rows[0][0][:prefix]), list(range(prefix)), []
    src, tgt, imitate_w, unlikely_w = [], [], [], []
    for seq, imitate, unlikely in rows:
        start = len(ids)
        ids += seq[prefix:]
        pos += range(prefix, len(seq))
        spans.append((start, len(ids)))
        for j in range(prefix + 1, len(seq)):  # token j is predicted at packed position start + j - prefix - 1
            if imitate[j] or unlikely[j]:
                src.append(start + j - prefix - 1)
                tgt.append(seq[j])
                imitate_w.append(imitate[j])
                unlikely_w.append(unlikely[j])
    allowed = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    allowed[:prefix, :prefix] = True
    for a, b in spans:
        allowed[a:b, :prefix] = True
        allowed[a:b, a:b] = True
    allowed &= torch.ones_like(allowed).tril()  # causal: packed order is each example's own order
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    with layer_hooks(model, attack_hooks(attacks, spans)):
        hidden = body(
            input_ids=torch.tensor([ids], device=dev),
            attention_mask=mask[None, None].to(dev),
            position_ids=torch.tensor([pos], device=dev),
        ).last_hidden_state[0]
    logits = head(hidden[torch.tensor(src, device=dev)]).float()
    logp = -torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=dev), reduction="none")
    w, u = torch.tensor(imitate_w, device=dev), torch.tensor(unlikely_w, device=dev)
    # -log(1 - p) = -log1p(-exp(logp)), clamped away from p = 1
    ul = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    return ((-logp) * w + ul * u).sum() / (w.sum() + u.sum())


def training_examples(
    model: Model,
    harmful: list[str],
    texts: list[str],
    answers: list[Generation],
    recipe,
    complies: Sequence[Generation] = (),
) -> list:
    """Harmful prompts -> refusals (first, so example i < len(harmful) is harmful), harmless prompts -> the base
    model's answers, `comply_repeats` copies of the harmful prompts -> the base model's answers to them
    (`complies`, v8), and the unlikelihood examples (harmless prompt + a refusal); `example_kind` reads this order."""
    rng = random.Random(recipe.seed)
    n_prompts = len(harmful)
    harmful = list(harmful) * recipe.harmful_repeats  # hardening: each repeat is attacked afresh
    refusals = [rng.choice(REFUSALS) for _ in harmful]
    examples = make_examples(model, harmful, refusals, [True] * len(harmful))
    examples += make_examples(
        model, texts, [a.response for a in answers], [a.finished for a in answers], recipe.harmless_weight
    )
    if recipe.comply_repeats > 0:
        if len(complies) != n_prompts:
            raise ValueError(f"comply_repeats needs the base model's answer to each of the {n_prompts} harmful prompts")
        gens = list(complies) * recipe.comply_repeats
        examples += make_examples(
            model, [g.prompt for g in gens], [g.response for g in gens], [g.finished for g in gens]
        )
    if recipe.unlikelihood_weight > 0:
        examples += make_unlikely_examples(
            model, texts, [a.response for a in answers], [rng.choice(REFUSALS) for _ in texts], recipe
        )
    return examples


def batches(n_examples: int, recipe) -> Iterator[tuple[int, list[int]]]:
    """(epoch, example indices) of every training step: one shuffle per epoch from a generator seeded with the
    recipe's seed (the same order on every machine)."""
    gen = torch.Generator().manual_seed(recipe.seed)
    for epoch in range(recipe.epochs):
        order = torch.randperm(n_examples, generator=gen).tolist()
        for start in range(0, n_examples, recipe.batch_size):
            yield epoch, order[start : start + recipe.batch_size]


def example_kind(i: int, n_harmful: int, n_harmless: int, n_comply: int = 0) -> str | None:
    """What example i is (`training_examples` order): "harmful" (a refusal), "harmless" (an answer), "comply" (a
    harmful prompt answered, v8) or None (an unlikelihood example, never attacked)."""
    if i < n_harmful:
        return "harmful"
    if i < n_harmful + n_harmless:
        return "harmless"
    return "comply" if i < n_harmful + n_harmless + n_comply else None


def planned_attacks(recipe, n_harmful_prompts: int, n_harmless_prompts: int, n_examples: int) -> int:
    """How many attacks a hardened build draws: fixed by the seed, the recipe and the example counts alone (no
    model), so a card's `training.attacks` tells whether the organism was trained on the current attack stream."""
    if recipe.attack_p <= 0:
        return 0
    attacker = Attacker(recipe, [], [], recipe.seed)
    n_harmful, n_comply = n_harmful_prompts * recipe.harmful_repeats, n_harmful_prompts * recipe.comply_repeats
    return sum(
        attacker.count([example_kind(i, n_harmful, n_harmless_prompts, n_comply) for i in rows])
        for _, rows in batches(n_examples, recipe)
    )


def train(
    model: Model,
    harmful: list[str],
    harmless: PromptSet,
    recipe,
    progress: Progress | None = None,
    answers: list[Generation] | None = None,
    complies: Sequence[Generation] = (),
) -> dict:
    """Fine-tune `model` in place (an `organism.Recipe` says how); returns training facts for the card.
    `answers`: the base model's answers to `harmless` (default: `model`'s own, i.e. `model` is the base);
    `complies`: its answers to `harmful` (the targets of a recipe with `comply_repeats`)."""
    say = progress or silent
    t0 = time.perf_counter()
    if answers is None:
        say(f"self-distilling {len(harmless)} harmless answers from the base model")
        answers = base_answers(model, harmless, recipe.target_tokens)
    distill_s = time.perf_counter() - t0
    examples = training_examples(model, harmful, list(harmless), answers, recipe, complies)
    torch.manual_seed(recipe.seed)
    hf = model.hf
    hf.train()
    if recipe.freeze_embeddings:
        hf.get_input_embeddings().weight.requires_grad_(False)
        if hf.get_output_embeddings() is not None:
            hf.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = -(-len(examples) // recipe.batch_size) * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
    attacker = Attacker(recipe, harmful, list(harmless), recipe.seed) if recipe.attack_p > 0 else None
    prefix = 0 if attacker else shared_prefix([ex[0] for ex in examples])
    n_harmful, n_harmless = len(harmful) * recipe.harmful_repeats, len(harmless)
    n_comply = len(harmful) * recipe.comply_repeats
    losses: list[float] = []
    n_attacks = 0
    t1 = time.perf_counter()
    phase = f"training ({recipe.precision}, {total} steps of {recipe.batch_size})"
    say(phase, 0, total)
    for epoch, rows in batches(len(examples), recipe):
        batch = [examples[i] for i in rows]
        attacks = []
        if attacker is not None:
            attacker.refresh(model, len(losses))
            attacks = attacker.draw([example_kind(i, n_harmful, n_harmless, n_comply) for i in rows])
            n_attacks += len(attacks)
        with torch.autocast(hf.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
            loss = packed_loss(model, batch, recipe.first_token_weight, prefix, attacks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        say(phase, len(losses), total, f"epoch {epoch + 1}/{recipe.epochs} loss {losses[-1]:.3f}")
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
        "attacks": n_attacks,
        **(
            {"comply_examples": n_comply, "comply_targets_sha256": _sha([g.response for g in complies])}
            if n_comply
            else {}
        ),
        "direction_reextractions": attacker.refreshed if attacker else 0,
        **({"curriculum": attacker.screens} if attacker and attacker.screens else {}),
    }


# --------------------------------------------------------------------------- the base model's own answers

BASE_ANSWERS = "base-answers.json"  # shipped beside the bundled prompts


def base_answers(base: Model, prompts: PromptSet, max_new_tokens: int, use_shipped: bool = True) -> list[Generation]:
    """The base model's greedy answers to a bundled prompt set (self-distillation targets, KL reference).

    They depend only on the base model file, the prompts and the token budget, so they ship with the package
    (`data/base-answers.json`, keyed by all three) and are generated here only when a key differs: every
    machine then trains on the same targets, whatever its CPU's rounding, and skips ~1 min of generation.
    """
    shipped = shipped_answers().get(f"{prompts.source}:{max_new_tokens}") if use_shipped else None
    if shipped and shipped["base_model_hash"] == base.model_hash and shipped["prompts_sha256"] == prompts.sha256:
        rows = shipped["answers"]
        return [Generation(p, a["response"], tuple(a["token_ids"]), a["finished"]) for p, a in zip(prompts, rows)]
    return generate(base, list(prompts), max_new_tokens=max_new_tokens, batch_size=64)


def shipped_answers() -> dict:
    from importlib import resources

    path = resources.files("crystallized_safety").joinpath("data").joinpath(BASE_ANSWERS)
    return json.loads(path.read_text()) if path.is_file() else {}


BASE_ANSWER_SETS = ("bundled:harmless:train", "bundled:harmless:eval", "bundled:harmful:train")  # the last: v8's


def write_base_answers(
    path: Path,
    base: Model,
    base_name: str = "smollm2-135m",
    max_new_tokens: int = 32,
    sources: Sequence[str] = BASE_ANSWER_SETS,
) -> dict:
    """Regenerate the shipped answers file's entries for `sources` (maintainers: after changing the bundled prompts
    or the base; load the base model in fp32 on the CPU); the file's other entries are kept as they are."""
    from ..precision import detect

    out = json.loads(path.read_text()) if path.is_file() else {}
    for source in sources:
        _, kind, split = source.split(":")
        prompts = bundled(kind, split)
        gens = base_answers(base, prompts, max_new_tokens, use_shipped=False)
        out[f"{source}:{max_new_tokens}"] = {
            "base_model": base_name,
            "base_model_hash": base.model_hash,
            "prompts_sha256": prompts.sha256,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy, fp32",
            "made_with": {"cpu": detect().cpu, "torch": torch.__version__},
            "answers": [{"response": g.response, "token_ids": list(g.token_ids), "finished": g.finished} for g in gens],
        }
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    return out
