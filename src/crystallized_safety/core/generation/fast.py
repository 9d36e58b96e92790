"""The sweep engine's greedy decoder: one batch of rows (prompts x interventions), with

- **prefill dedup**: the token prefix every row shares (system prompt, template head) is run once per
  distinct intervention, and each distinct (prompt, intervention) suffix once, then the KV cache is
  expanded to the batch. When steering touches generated positions only, the whole prompt prefill is
  shared by every cell that uses the prompt (prompt-prefix reuse);
- **logits for the last position only** in prefill (the LM head is the widest matmul of a small model);
- **finished-row compaction**: rows that emitted EOS leave the batch (KV cache, mask, intervention rows),
  so a batch of short refusals does not pay for the longest compliance;
- a fresh `steer()` per forward call with the rows still active, so per-row alphas/directions follow
  the compaction and `positions=prompt|generated` is a property of the call (prefill or decode).

Tested token for token against the reference path (`generation.generate(..., engine="hf")`, plain
left-padded `model.generate`); like any change of batch shape, it can differ only where fp arithmetic
breaks a near-tie between two tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..model import Model, flat_rows, positions, select_cache_rows
from ..steering import Intervention, steer
from .oom import is_oom
from .output import Generation, generations


def _acts(iv: Intervention | None, phase: str) -> bool:
    """Whether `iv` steers in this phase ("prompt" = prefill, "generated" = decode steps)."""
    return iv is not None and iv.positions != ("generated" if phase == "prompt" else "prompt")


def _row_keys(iv: Intervention | None, rows: int, phase: str) -> list[tuple]:
    """Rows with equal keys get identical steering in this phase (so identical activations for equal tokens)."""
    if iv is None or not _acts(iv, phase):
        return [()] * rows
    parts: list[list] = [[] for _ in range(rows)]
    if isinstance(iv.alpha, torch.Tensor):
        for r, a in enumerate(iv.alpha.tolist()):
            parts[r].append(a)
    for layer in iv.layers:
        vec = iv.directions[layer]
        if vec.dim() == 2:
            for r in range(rows):
                parts[r].append(vec[r].detach().cpu().numpy().tobytes())  # exact bytes: no hash collisions
    return [tuple(p) for p in parts]


def _phase_iv(iv: Intervention | None, rows: torch.Tensor, phase: str) -> Intervention | None:
    """The intervention for these rows in one forward call; None when it does not act in this phase."""
    if iv is None or not _acts(iv, phase):
        return None
    return replace(iv.select(rows), positions="all")


def _unique(keys: Sequence) -> tuple[list[int], torch.Tensor]:
    """(first row of each distinct key, inverse map row -> distinct index)."""
    index: dict = {}
    reps: list[int] = []
    inverse: list[int] = []
    for r, k in enumerate(keys):
        if k not in index:
            index[k] = len(reps)
            reps.append(r)
        inverse.append(index[k])
    return reps, torch.tensor(inverse, dtype=torch.long)


def _step(model: Model, ids, mask, pos, cache, iv: Intervention | None):
    """One cached forward call under `iv`: (next-token logits, float32 [rows, vocab], the cache)."""
    with steer(model, iv, batch_rows=ids.shape[0]):
        logits, cache = model.forward(ids, mask, pos, cache=cache, keep=1)
    return model.check_logits(logits[:, -1].float()), cache


def _prefill(model: Model, token_ids, intervention: Intervention | None, share_prefix: bool):
    """Prompt prefill over the distinct rows: (last-position logits [U, V], cache [U], mask [U, len], row -> U)."""
    n, dev = len(token_ids), model.device
    keys = _row_keys(intervention, n, "prompt")
    # 1. shared prefix: once per distinct intervention (at least one token stays in every suffix)
    prefix = 0
    if share_prefix:
        shortest = min(len(t) for t in token_ids)
        while prefix < shortest - 1 and all(t[prefix] == token_ids[0][prefix] for t in token_ids):
            prefix += 1
    cache = None
    if prefix:
        g_rep, g_of_row = _unique(keys)
        ids = torch.tensor([list(token_ids[0][:prefix])] * len(g_rep), device=dev)
        pos = torch.arange(prefix, device=dev).expand(len(g_rep), -1)
        _, cache = _step(
            model, ids, torch.ones_like(ids), pos, None, _phase_iv(intervention, torch.tensor(g_rep), "prompt")
        )
    # 2. distinct (intervention, suffix) rows, suffixes left-padded after the prefix
    s_keys = [(keys[r], tuple(token_ids[r][prefix:])) for r in range(n)] if share_prefix else list(range(n))
    u_rep, u_of_row = _unique(s_keys)
    suffixes = [list(token_ids[r][prefix:]) for r in u_rep]
    ids, smask, _ = model.left_pad(suffixes)
    mask = torch.cat([torch.ones(len(u_rep), prefix, dtype=smask.dtype, device=dev), smask], 1)
    pos = positions(mask)[:, prefix:]
    if cache is not None:
        select_cache_rows(cache, g_of_row[torch.tensor(u_rep)].to(dev))
    logits, cache = _step(model, ids, mask, pos, cache, _phase_iv(intervention, torch.tensor(u_rep), "prompt"))
    return logits, cache, mask, u_of_row


def first_logits(
    model: Model, token_ids: Sequence[Sequence[int]], intervention: Intervention | None, *, share_prefix: bool = True
) -> torch.Tensor:
    """Next-token logits after each prompt (float32 [rows, vocab]), through the same deduplicated prefill as
    `greedy_batch`: what screening needs, without generating."""
    with torch.inference_mode():
        logits, _cache, _mask, u_of_row = _prefill(model, token_ids, intervention, share_prefix)
    return logits[u_of_row.to(logits.device)]


def greedy_batch(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    intervention: Intervention | None,
    max_new_tokens: int,
    eos: Sequence[int],
    *,
    share_prefix: bool = True,
    compact: bool = True,
    on_first_logits=None,
    flat: set[int] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Greedy new tokens per row (cut before the first EOS) and whether the row hit EOS; the rows whose logits
    were constant at some step (`flat_rows`: a degenerate output, flagged by the caller) are added to `flat`.
    `intervention` covers all rows; `on_first_logits(logits [rows, vocab])` receives the prefill's next-token
    logits (what the first-token refusal score reads), so a caller need not run the prefill again."""
    n = len(token_ids)
    dev = model.device
    eos_t = torch.tensor(sorted(set(eos)) or [-1], device=dev)
    all_rows = torch.arange(n)

    with torch.inference_mode():
        logits, cache, mask, u_of_row = _prefill(model, token_ids, intervention, share_prefix)
        # expand the distinct rows to every row, then decode with finished-row compaction
        expand = u_of_row.to(dev)
        if logits.shape[0] != n:
            select_cache_rows(cache, expand)
        logits, mask = logits[expand], mask[expand]
        if on_first_logits is not None:
            on_first_logits(logits)
        next_pos = mask.sum(1, keepdim=True)
        active = all_rows.clone()
        stopped = torch.zeros(n, dtype=torch.bool, device=dev)  # without compaction: rows that already ended
        out: list[list[int]] = [[] for _ in range(n)]
        ended = [False] * n
        for step in range(max_new_tokens):
            if flat is not None:
                flat.update(active[(flat_rows(logits) & ~stopped).cpu()].tolist())
            tokens = logits.argmax(-1)
            done = torch.isin(tokens, eos_t) | stopped
            for row, tok, fin in zip(active.tolist(), tokens.tolist(), done.tolist()):
                if fin:
                    ended[row] = True
                else:
                    out[row].append(tok)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if compact and bool(done.any()):
                keep = (~done).nonzero().flatten()
                active, tokens, mask, next_pos = active[keep.cpu()], tokens[keep], mask[keep], next_pos[keep]
                stopped = stopped[keep]
                select_cache_rows(cache, keep)
            elif not compact:  # ended rows keep running on padding, as in a plain batched generate
                stopped = done
                tokens = torch.where(done, torch.full_like(tokens, model.pad_id), tokens)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits, cache = _step(
                model, tokens[:, None], mask, next_pos, cache, _phase_iv(intervention, active, "generated")
            )
            next_pos = next_pos + 1
    return out, ended


@dataclass(frozen=True)
class FastEngine:
    """The fast greedy engine and its switches (defaults: every saving on). `on_first_logits(rows, logits)`
    receives each batch's next-token logits after the prompt (float32 [rows, vocab]), `rows` being the batch's
    slice of the whole prompt list."""

    share_prefix: bool = True
    compact: bool = True
    on_first_logits: Callable[[slice, torch.Tensor], None] | None = None

    def generate(
        self,
        model: Model,
        prompts: Sequence[str],
        texts: Sequence[str],
        intervention: Intervention | None,
        max_new_tokens: int,
        *,
        rows: slice,
        raw: bool = False,
    ) -> list[Generation]:
        """One batch: formatted `texts` (the batch `rows` of the caller's prompt list) under `intervention`."""
        ids = model.tokenizer(list(texts), add_special_tokens=raw)["input_ids"]
        hook = self.on_first_logits
        flat: set[int] = set()
        tokens, ended = greedy_batch(
            model,
            ids,
            intervention,
            max_new_tokens,
            model.eos_ids(),
            share_prefix=self.share_prefix,
            compact=self.compact,
            on_first_logits=None if hook is None else (lambda logits: hook(rows, logits)),
            flat=flat,
        )
        return generations(model, prompts, tokens, ended, flat)


# --------------------------------------------------------------------------- batch-size auto-tuning


def autotune_rows(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    start: int,
    limit: int,
    probe_steps: int = 3,
    tolerance: float = 0.0,
) -> tuple[int, list[dict]]:
    """Rows per batch that generate fastest, as heretic does: double the batch from `start` (up to `limit`)
    while it fits and the estimated seconds per row keep falling.

    One prefill of `start` rows (prompts cycled, every row made distinct by a per-row alpha so no dedup
    flatters it) gives the prefill cost per row; for each candidate size its KV cache is copied up to that
    many rows and `probe_steps` decode steps are timed. A row's cost is extrapolated to `max_new_tokens`:
    prefill per row + (max_new_tokens - 1) x step / rows. Returns (best rows, the probe table)."""
    import copy
    import time

    start = max(1, start)
    direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = model.n_layers // 2

    def iv_for(rows: int) -> Intervention:
        return Intervention({layer: direction / direction.norm()}, alpha=torch.linspace(-1e-3, 1e-3, rows))

    ids = [token_ids[i % len(token_ids)] for i in range(start)]
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits, cache, mask, u_of_row = _prefill(model, ids, iv_for(start), True)
        prefill_per_row = (time.perf_counter() - t0) / start
        first = logits.argmax(-1)
        table: list[dict] = []
        rows, best = start, None
        while True:
            index = torch.arange(rows, device=model.device) % logits.shape[0]
            try:
                c = copy.deepcopy(cache)
                select_cache_rows(c, index)
                m, tokens, iv = mask[index], first[index], iv_for(rows)
                pos = m.sum(1, keepdim=True)
                t1 = time.perf_counter()
                for _ in range(probe_steps):
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    step_logits, c = _step(model, tokens[:, None], m, pos, c, iv)
                    tokens, pos = step_logits.argmax(-1), pos + 1
                step = (time.perf_counter() - t1) / probe_steps
                del c
            except Exception as exc:  # noqa: BLE001 - out of memory ends the search, anything else is a bug
                if not is_oom(exc):
                    raise
                table.append({"rows": rows, "oom": True})
                break
            per_row = prefill_per_row + step * (max_new_tokens - 1) / rows
            table.append({"rows": rows, "prefill_s_per_row": prefill_per_row, "step_s": step, "est_s_per_row": per_row})
            if best is None or per_row < best["est_s_per_row"]:
                best = table[-1]
            elif per_row > best["est_s_per_row"] * (1 + tolerance):
                break
            if rows >= limit:
                break
            rows = min(rows * 2, limit)
    return (best["rows"] if best else start), table
