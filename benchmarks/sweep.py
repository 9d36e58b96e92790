"""Sweep benchmark: the seed's naive loop vs the engine, on the same grid, in one process.

Naive (what the seed's scripts did): one prompt at a time, one hook registered and removed per cell,
plain `generate`, one layer per extraction pass. Engine: several cells per batch (per-row steering
vectors) at an auto-tuned batch size, the engine's own greedy decoder (shared-prefix prefill, last-position
logits, finished-row compaction), all layers in one extraction pass, and a screening mode that scores the
whole grid with the first-token refusal score in forward passes only.

    python benchmarks/sweep.py                # 6 layers x 5 alphas x 35 harmful prompts x 32 new tokens
    python benchmarks/sweep.py --techniques   # + the engine with techniques switched off one by one
    python benchmarks/sweep.py --quick        # 2 x 2 x 8 x 16, a smoke run

The last line is machine-readable:
speedup_vs_naive=X.XX verdict_agreement=Y.YYY naive_s=... engine_s=... tokens_per_s=...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.core.directions import extract_directions  # noqa: E402
from crystallized_safety.experiments.conditions import HARMFUL, Condition, baseline  # noqa: E402
from crystallized_safety.judges.refusal_score import RefusalScoreJudge  # noqa: E402
from crystallized_safety.judges.substring import SubstringJudge  # noqa: E402
from crystallized_safety.precision import detect  # noqa: E402
from crystallized_safety.prompts import bundled  # noqa: E402
from crystallized_safety.registry import load_model  # noqa: E402
from crystallized_safety.run.chunks import Chunk, make_packs  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def cli_startup(repeats: int = 3) -> dict:
    """Seconds until `csafety --help` returns, and until a bad prompt file gives its one-line error (no model
    is loaded, so this is import cost only); the best of `repeats` runs each."""
    csafety = [sys.executable, "-m", "crystallized_safety.cli"]
    cases = {
        "cli_help_s": [*csafety, "--help"],
        "cli_fail_fast_s": [*csafety, "eval-refusal", "--model", "smollm2-135m", "--prompts", "/no/such/file.txt"],
    }
    out = {}
    for key, cmd in cases.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False)
            best = min(best, time.perf_counter() - t0)
        out[key] = best
    return out


# --------------------------------------------------------------------------- naive (the seed's way)


def naive_extract(model, harmful, harmless, layers):
    """One forward pass per prompt per layer, a hook on that layer, last token: the seed's loop."""
    out = {}
    for layer in layers:
        means = []
        for prompts in (harmful, harmless):
            acc = []
            for text in model.format(prompts):
                ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
                seen = {}
                handle = model.layers[layer].register_forward_hook(
                    lambda m, a, o, seen=seen: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[0, -1])
                )
                with torch.no_grad():
                    model.hf(**ids)
                handle.remove()
                acc.append(seen["h"])
            means.append(torch.stack(acc).mean(0))
        diff = means[0] - means[1]
        out[layer] = diff / diff.norm()
    return out


def naive_sweep(model, prompts, cells, bank, max_new_tokens):
    """For each cell: register a hook, generate prompt by prompt, remove the hook."""
    tok = model.tokenizer
    results = {}
    for layer, alpha in cells:
        vec = bank.direction(layer) * (alpha * bank.resid_norm(layer)) if layer is not None else None

        def hook(module, args, output, vec=vec):
            return (output[0] + vec, *output[1:]) if isinstance(output, tuple) else output + vec

        handle = model.layers[layer].register_forward_hook(hook) if layer is not None else None
        texts = []
        for text in model.format(prompts):
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                gen = model.hf.generate(
                    **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            new = gen[0, ids["input_ids"].shape[1] :].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            texts.append(tok.decode(new, skip_special_tokens=True).strip())
        if handle is not None:
            handle.remove()
        results[(layer, alpha)] = texts
    return results


# --------------------------------------------------------------------------- engine


VARIANTS = {
    # name: (engine, packed cells, shared-prefix prefill, finished-row compaction); each adds one technique
    "batched": ("hf", False, False, False),  # one cell per batched, left-padded model.generate
    "packed": ("hf", True, False, False),  # + several cells (per-row vectors) per generate
    "fast_decoder": ("fast", True, False, False),  # + own decoder: last-position logits, fresh per-call hooks
    "prefix_dedup": ("fast", True, True, False),  # + shared prompt prefix run once per cell
    "compaction": ("fast", True, True, True),  # + finished rows leave the batch (the full engine)
}


def engine_sweep(model, prompts, cells, bank, max_new_tokens, pack_rows, variant="compaction"):
    """The engine's generation over the grid; `variant` switches techniques off (see VARIANTS)."""
    from crystallized_safety.core.generation import FastEngine, generate
    from crystallized_safety.run.chunks import pack_intervention

    engine, packed, share, compact = VARIANTS[variant]
    conds = {}
    for layer, alpha in cells:
        conds[(layer, alpha)] = baseline(HARMFUL) if layer is None else Condition(HARMFUL, (layer,), alpha)
    chunks = [Chunk("m", "bench", c, 0, tuple(prompts), max_new_tokens) for c in conds.values()]
    by_key = {c.condition.key: cell for cell, c in zip(conds, chunks)}
    results = {}
    n_tokens = 0
    for pack in make_packs(chunks, pack_rows if packed else 0):
        iv = pack_intervention([c.condition for c in pack], len(prompts), bank)
        rows = [p for c in pack for p in c.prompts]
        gens = generate(
            model,
            rows,
            iv,
            max_new_tokens=max_new_tokens,
            batch_size=len(rows),
            engine=FastEngine(share_prefix=share, compact=compact) if engine == "fast" else engine,
        )
        for j, chunk in enumerate(pack):
            block = gens[j * len(prompts) : (j + 1) * len(prompts)]
            results[by_key[chunk.condition.key]] = [g.response for g in block]
            n_tokens += sum(len(g.token_ids) for g in block)
    return results, n_tokens


def screen(model, prompts, cells, bank, judge: RefusalScoreJudge):
    """First-token refusal score for every (cell, prompt) in batched forward passes (per-row vectors)."""
    from crystallized_safety.run.chunks import pack_intervention

    conds = [baseline(HARMFUL) if layer is None else Condition(HARMFUL, (layer,), alpha) for layer, alpha in cells]
    per = max(1, 256 // len(prompts))
    scores = {}
    for i in range(0, len(conds), per):
        group = conds[i : i + per]
        iv = pack_intervention(group, len(prompts), bank)
        s = judge.scores(list(prompts) * len(group), iv).view(len(group), len(prompts))
        for j, cell in enumerate(cells[i : i + per]):
            scores[cell] = s[j].tolist()
    return scores


# --------------------------------------------------------------------------- measures


def flip_rates(refusals: dict, base_key) -> dict:
    base = refusals[base_key]
    refused = [i for i, r in enumerate(base) if r]
    return {
        cell: (sum(1 for i in refused if not r[i]) / len(refused) if refused else float("nan"))
        for cell, r in refusals.items()
        if cell != base_key
    }


def matmul_peak(seconds: float = 2.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def forward_flops(model, prompts) -> tuple[float, float]:
    batch = model.encode(model.format(prompts))
    # matrix parameters; a tied embedding counts once, as the LM head matmul it also is
    params = sum(p.numel() for p in model.hf.parameters() if p.dim() > 1)
    tokens = int(batch["attention_mask"].sum())
    with torch.inference_mode():
        model.hf(**batch)
        t0 = time.perf_counter()
        model.hf(**batch)
        dt = time.perf_counter() - t0
    return 2 * params * tokens / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", default=None, help="comma-separated (default 8,10,12,14,16,20)")
    ap.add_argument("--alphas", default=None, help="relative alphas (default -0.1,-0.2,-0.3,-0.4,-0.5)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--pack-rows", default="auto", help="rows per generate, or auto (measured: largest and fastest)")
    ap.add_argument(
        "--techniques", action="store_true", help="also time the engine with techniques switched off, one by one"
    )
    ap.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time the full engine on a bfloat16 copy of the model: auto = only where this CPU has native "
        "bf16 (emulated bf16 is many times slower), on = always, off = never",
    )
    ap.add_argument("--json", default=None, help="also write all numbers here")
    ap.add_argument("--skip-extract-naive", action="store_true", help="skip the (slow) per-layer naive extraction")
    args = ap.parse_args()
    q = args.quick
    layers = [int(x) for x in (args.layers or ("12,16" if q else "8,10,12,14,16,20")).split(",")]
    alphas = [float(x) for x in (args.alphas or ("-0.2,-0.5" if q else "-0.1,-0.2,-0.3,-0.4,-0.5")).split(",")]
    n = args.prompts or (8 if q else 35)
    mnt = args.max_new_tokens or (16 if q else 32)
    torch.manual_seed(0)

    model = load_model(args.model)
    prompts = list(bundled("harmful", "eval"))[:n]
    ext_h, ext_n = list(bundled("harmful", "extract"))[:32], list(bundled("harmless", "extract"))[:32]
    cells = [(None, 0.0)] + [(layer, a) for layer in layers for a in alphas]
    cpu = detect()
    out: dict = {
        "machine": cpu.cpu,
        "arch": platform.machine(),
        "native_bf16": cpu.native_bf16,
        "bf16_report": cpu.reason,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "layers": layers,
        "alphas": alphas,
        "prompts": n,
        "max_new_tokens": mnt,
        "cells": len(cells),
    }
    log(f"cpu: {cpu.summary()}")
    out.update(cli_startup())
    log(f"cli start-up: --help {out['cli_help_s']:.2f} s, bad prompt file -> error {out['cli_fail_fast_s']:.2f} s")
    log(f"grid: {len(layers)} layers x {len(alphas)} alphas (+ baseline) x {n} prompts x {mnt} tokens")

    # extraction: all layers in one batched pass vs one pass per layer, prompt by prompt
    t0 = time.perf_counter()
    bank = extract_directions(model, ext_h, ext_n)
    out["extract_engine_s"] = time.perf_counter() - t0
    if not args.skip_extract_naive:
        t0 = time.perf_counter()
        naive_dirs = naive_extract(model, ext_h, ext_n, list(range(model.n_layers)))
        out["extract_naive_s"] = time.perf_counter() - t0
        out["extract_speedup"] = out["extract_naive_s"] / out["extract_engine_s"]
        out["extract_min_cosine"] = min(float(naive_dirs[i] @ bank.direction(i)) for i in range(model.n_layers))
        log(
            f"extraction: naive {out['extract_naive_s']:.1f} s, engine {out['extract_engine_s']:.1f} s "
            f"({out['extract_speedup']:.1f}x), min cosine {out['extract_min_cosine']:.5f}"
        )

    judge = SubstringJudge()
    if args.pack_rows == "auto":
        from crystallized_safety.core.generation.fast import autotune_rows

        t0 = time.perf_counter()
        ids = model.tokenizer(model.format(prompts), add_special_tokens=False)["input_ids"]
        pack_rows, probes = autotune_rows(model, ids, mnt, start=n, limit=n * len(cells))
        out["autotune_s"] = time.perf_counter() - t0
        out["autotune_probes"] = probes
        log(
            f"batch autotune ({out['autotune_s']:.1f} s): "
            + ", ".join(f"{p['rows']} rows {p.get('est_s_per_row', float('nan')) * 1000:.0f} ms/row" for p in probes)
            + f" -> {pack_rows}"
        )
    else:
        pack_rows = int(args.pack_rows)
    out["pack_rows"] = pack_rows

    variants = list(VARIANTS) if args.techniques else ["compaction"]
    runs: dict[str, dict] = {}
    for variant in variants:
        t0 = time.perf_counter()
        texts, n_tokens = engine_sweep(model, prompts, cells, bank, mnt, pack_rows, variant)
        runs[variant] = {"s": time.perf_counter() - t0, "tokens": n_tokens, "texts": texts}
        log(f"engine [{variant}]: {runs[variant]['s']:.1f} s, {n_tokens} tokens")
    if args.bf16 == "on" or (args.bf16 == "auto" and cpu.native_bf16):
        # a model loaded in bf16 (a shallow copy with a converted `hf` would keep the fp32 model's decoder
        # layers, so steering hooks would land on the fp32 model and the bf16 run would go unsteered)
        model16 = load_model(args.model, dtype="bfloat16")
        t0 = time.perf_counter()
        texts, n_tokens = engine_sweep(model16, prompts, cells, bank, mnt, pack_rows)
        runs["bf16"] = {"s": time.perf_counter() - t0, "tokens": n_tokens, "texts": texts}
        log(f"engine [bf16]: {runs['bf16']['s']:.1f} s, {n_tokens} tokens")
        del model16
    engine, n_tokens = runs["compaction"]["texts"], runs["compaction"]["tokens"]
    out["engine_s"] = runs["compaction"]["s"]
    out["engine_tokens"] = n_tokens

    t0 = time.perf_counter()
    naive = naive_sweep(model, prompts, cells, bank, mnt)
    out["naive_s"] = time.perf_counter() - t0
    log(f"naive: {out['naive_s']:.1f} s")

    def agreement(texts: dict) -> tuple[float, float]:
        ref = {c: [bool(v.refusal) for v in judge.judge(prompts, texts[c])] for c in cells}
        same = sum(a == b for c in cells for a, b in zip(ref_naive[c], ref[c]))
        identical = sum(a == b for c in cells for a, b in zip(naive[c], texts[c]))
        return same / (len(cells) * n), identical / (len(cells) * n)

    ref_naive = {c: [bool(v.refusal) for v in judge.judge(prompts, naive[c])] for c in cells}
    ref_engine = {c: [bool(v.refusal) for v in judge.judge(prompts, engine[c])] for c in cells}
    out["verdict_agreement"], out["identical_responses"] = agreement(engine)
    out["techniques"] = {}
    for name, r in runs.items():
        agree, ident = agreement(r["texts"])
        out["techniques"][name] = {
            "seconds": r["s"],
            "speedup_vs_naive": out["naive_s"] / r["s"],
            "verdict_agreement": agree,
            "identical_responses": ident,
            "tokens": r["tokens"],
        }
    if len(runs) > 1:
        log("technique           seconds  x naive  verdicts  identical")
        for name, t in out["techniques"].items():
            log(
                f"{name:<18} {t['seconds']:8.1f} {t['speedup_vs_naive']:8.2f} {t['verdict_agreement']:9.3f} "
                f"{t['identical_responses']:10.3f}"
            )

    # screening: first-token score over the whole grid, forward passes only
    scorer = RefusalScoreJudge(model)
    t0 = time.perf_counter()
    base_gens = engine[(None, 0.0)]
    cal = scorer.calibrate(prompts, judge.judge(prompts, base_gens))
    scores = screen(model, prompts, cells, bank, scorer)
    out["screen_s"] = time.perf_counter() - t0
    ref_screen = {c: [s > cal.threshold for s in scores[c]] for c in cells}
    fr_screen = flip_rates(ref_screen, (None, 0.0))
    fr_gen = flip_rates(ref_engine, (None, 0.0))
    keys = [c for c in fr_gen if not (np.isnan(fr_gen[c]) or np.isnan(fr_screen[c]))]
    rho = float("nan")
    if len(keys) > 2:
        rho = spearmanr([fr_screen[c] for c in keys], [fr_gen[c] for c in keys]).statistic
    out["screen_spearman"] = float(rho)
    out["screen_speedup"] = out["naive_s"] / out["screen_s"]
    out["screen_threshold"] = cal.threshold
    out["screen_calibration_accuracy"] = cal.accuracy

    out["forward_flops"], out["forward_s"] = forward_flops(model, prompts)
    out["matmul_peak_flops"] = matmul_peak()
    out["flops_ratio"] = out["forward_flops"] / out["matmul_peak_flops"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["speedup_vs_naive"] = out["naive_s"] / out["engine_s"]
    out["tokens_per_s"] = n_tokens / out["engine_s"]
    log(
        f"screening: {out['screen_s']:.1f} s ({out['screen_speedup']:.1f}x naive), Spearman {rho:.3f} "
        f"vs generation-judged flip rates over {len(keys)} cells"
    )
    log(
        f"batched forward: {out['forward_flops'] / 1e9:.1f} GFLOP/s = {out['flops_ratio']:.1%} of measured matmul "
        f"peak {out['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; peak RSS {out['peak_rss_mb']:.0f} MB"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    print(
        f"speedup_vs_naive={out['speedup_vs_naive']:.2f} verdict_agreement={out['verdict_agreement']:.3f} "
        f"naive_s={out['naive_s']:.1f} engine_s={out['engine_s']:.1f} tokens_per_s={out['tokens_per_s']:.1f}"
    )


if __name__ == "__main__":
    main()
