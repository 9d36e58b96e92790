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
from .models import Model, atomic_dir, cache_dir, load_model, save_pretrained
from .prompts import bundled

DEFAULT_NAME = "smollm2-135m-refusal"
# Bump when the build or the card changes in a way that makes cached organisms stale.
BUILD_VERSION = 7

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
    # fp32: the same organism on every CPU. bf16 (autocast; weights stay fp32) is faster only where the
    # CPU has native bf16 and trains a different organism, cached apart.
    precision: str = "fp32"
    freeze_embeddings: bool = True
    eval_new_tokens: int = 32

    def key(self) -> str:
        spec = {**asdict(self), "build_version": BUILD_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


Progress = Callable[..., None]  # progress(phase, done=0, total=None, note=""), e.g. a progress.Reporter
# Self-distillation + measuring the card cost about this many training steps (measured on two CPU kinds).
OTHER_PHASES_IN_STEPS = 40


def _silent(*_args, **_kwargs) -> None:
    return None


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


def _targets(example, first_weight: float) -> tuple[list[int], list[float], list[float]]:
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


def _loss(hf, examples, pad_id: int, first_weight: float, prefix: int = 0) -> torch.Tensor:
    """Weighted next-token NLL on imitation tokens plus weighted unlikelihood -log(1 - p) on unlikelihood
    tokens, normalised by the total weight: the value of one padded batch, computed with less work.

    The batch is *packed* into one sequence: the `prefix` tokens every example starts with (system prompt,
    template head) once, then each example's remaining tokens, with a block mask so that each example sees
    only the prefix and itself, and positions that restart after the prefix. No pad token and no repeated
    prefix is computed, and all rows go through one large matmul per layer (much better on CPU than
    several small ones). The LM head runs only where a label counts. `pad_id` is unused: nothing is padded.
    """
    del pad_id
    body, head = hf.base_model, hf.get_output_embeddings()
    dev, dtype = next(hf.parameters()).device, next(hf.parameters()).dtype
    rows = [_targets(ex, first_weight) for ex in examples]
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


def train(
    model: Model, harmful: list[str], harmless: list[str], recipe: Recipe, progress: Progress | None = None
) -> dict:
    """Fine-tune `model` in place; returns training facts for the card."""
    from .generation import generate

    say = progress or _silent
    t0 = time.perf_counter()
    say(f"self-distilling {len(harmless)} harmless answers from the base model")
    answers = generate(model, harmless, max_new_tokens=recipe.target_tokens, batch_size=64)
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
    prefix = shared_prefix([ex[0] for ex in examples])
    pad_id = model.tokenizer.pad_token_id
    losses = []
    t1 = time.perf_counter()
    phase = f"training ({recipe.precision}, {total} steps of {recipe.batch_size})"
    say(phase, 0, total)
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), recipe.batch_size):
            batch = [examples[i] for i in order[start : start + recipe.batch_size]]
            with torch.autocast(hf.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
                loss = _loss(hf, batch, pad_id, recipe.first_token_weight, prefix)
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
    }


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


def measure(model: Model, base: Model | None, recipe: Recipe, progress: Progress | None = None) -> dict:
    """Held-out (eval split) refusal rates, KL to base, steering check."""
    from .evaluation import RefusalRate
    from .generation import generate
    from .judges.substring import SubstringJudge

    say = progress or _silent
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
        answers = generate(base, harmless, max_new_tokens=recipe.eval_new_tokens, batch_size=64)
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
    refusals = _examples(model, harmful, [REFUSALS[0]] * n, [True] * n)
    answers = _examples(model, harmful, [answer] * n, [False] * n)
    examples = refusals[:third] + answers[third : 2 * third]
    examples += [(p, r[:4], 1.0, (0, 4)) for p, r, _w, _s in refusals[2 * third :]]  # unlikelihood-shaped
    prefix = shared_prefix([ex[0] for ex in examples])
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
        _loss(model.hf, examples, model.tokenizer.pad_token_id, recipe.first_token_weight, prefix).backward()  # warm-up
        t0 = time.perf_counter()
        _loss(model.hf, examples, model.tokenizer.pad_token_id, recipe.first_token_weight, prefix).backward()
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

    say = progress or _silent
    t0 = time.perf_counter()
    say("loading the base model")
    base = load_model(recipe.base, device="cpu", dtype="float32")
    model = load_model(recipe.base, device="cpu", dtype="float32")
    harmful, harmless = list(bundled("harmful", "train")), list(bundled("harmless", "train"))
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
