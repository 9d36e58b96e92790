"""Cost as the work grows: time and peak memory of the engine and of the seed's naive loop against prompts per
cell, new tokens, cells and layers steered, so a user can predict a run's cost. One factor varies at a time
around a base point (35 prompts, 32 new tokens, 4 cells, 1 layer); the naive loop is timed on the smaller
settings only (it is one prompt at a time) and its cost per prompt-token is reported beside.

    python benchmarks/cost.py                       # the organism; writes benchmarks/cost-<cpu>.png/.json
    python benchmarks/cost.py --model smollm2-135m --quick

Peak memory: the largest resident set size sampled every 5 ms during each measurement (Linux /proc); on a GPU,
torch's peak allocated memory. The last line
is machine-readable: engine_s_per_token=... naive_s_per_token=... ratio=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crystallized_safety.core.generation import generate  # noqa: E402
from crystallized_safety.core.steering import steer  # noqa: E402
from crystallized_safety.experiments.conditions import HARMFUL, Condition, build_intervention  # noqa: E402
from crystallized_safety.precision import detect  # noqa: E402
from crystallized_safety.prompts import bundled  # noqa: E402
from crystallized_safety.registry import load_model  # noqa: E402
from crystallized_safety.run.chunks import pack_intervention  # noqa: E402

BASE = {"prompts": 35, "tokens": 32, "cells": 4, "layers": 1}
SWEEPS = {"prompts": [8, 16, 35, 70], "tokens": [8, 16, 32, 64], "cells": [1, 2, 4, 8], "layers": [1, 2, 4, 8]}
NAIVE = {"prompts": [4, 8], "tokens": [8, 16], "cells": [1, 2], "layers": [1, 4]}  # small: one prompt at a time


class PeakMemory:
    """Peak memory during a block: torch's peak allocated memory on a GPU; on a CPU the largest resident set
    size seen by a thread sampling /proc/self/statm every 5 ms (the kernel's own high-water mark cannot be reset
    inside every container)."""

    def __enter__(self) -> PeakMemory:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        statm = Path("/proc/self/statm")
        peak = 0
        while not self._stop.is_set():
            try:
                peak = max(peak, int(statm.read_text().split()[1]) * page)
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.005)
        self.peak_mb = peak / 2**20 if peak else None

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()


def conditions(point: dict, n_layers: int) -> list[Condition]:
    """`cells` steered cells of `layers` layers each (middle of the model), alphas spread -0.1 .. -0.4."""
    mid = n_layers // 2
    layers = tuple(range(mid - point["layers"] // 2, mid - point["layers"] // 2 + point["layers"]))
    return [Condition(HARMFUL, layers, -0.1 - 0.3 * i / max(1, point["cells"] - 1)) for i in range(point["cells"])]


def engine(model, bank, prompts, conds, tokens) -> int:
    iv = pack_intervention(conds, len(prompts), bank)
    gens = generate(model, prompts * len(conds), iv, max_new_tokens=tokens, batch_size=len(prompts) * len(conds))
    return sum(len(g.token_ids) for g in gens)


def naive(model, bank, prompts, conds, tokens) -> int:
    tok, count = model.tokenizer, 0
    for cond in conds:
        with steer(model, build_intervention(cond, bank)):
            for text in model.format(prompts):
                ids = tok(text, return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    out = model.hf.generate(
                        **ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
                    )
                count += out.shape[1] - ids["input_ids"].shape[1]
    return count


def measure(fn, model, bank, prompts_all, point) -> dict:
    prompts = prompts_all[: point["prompts"]]
    conds = conditions(point, model.n_layers)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        n = fn(model, bank, prompts, conds, point["tokens"])
        seconds = time.perf_counter() - t0
    return {**point, "seconds": seconds, "tokens_out": n, "peak_mb": mem.peak_mb}


def plot(results: dict, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    labels = {"prompts": "prompts per cell", "tokens": "new tokens", "cells": "cells", "layers": "layers steered"}
    for col, factor in enumerate(SWEEPS):
        for name, color in (("engine", "#1f5fa8"), ("naive", "#8c8c8c")):
            rows = [r for r in results[name] if r["factor"] == factor]
            if not rows:
                continue
            xs = [r[factor] for r in rows]
            label = name if name == "engine" else "naive loop"
            axes[0, col].plot(xs, [r["seconds"] for r in rows], "o-", color=color, label=label)
            if rows[0]["peak_mb"] is not None:
                axes[1, col].plot(xs, [r["peak_mb"] for r in rows], "o-", color=color, label=name)
        axes[0, col].set_xscale("log", base=2)
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xlabel(labels[factor])
        axes[0, col].set_yscale("log")
    axes[0, 0].set_ylabel("seconds (log)")
    axes[1, 0].set_ylabel("peak memory, MB")
    axes[0, 0].legend(frameon=False, fontsize=8)
    fig.suptitle(f"{title}; engine around 35 prompts x 32 tokens x 4 cells x 1 layer, naive around 4 x 8 x 1 x 1",
                 fontsize=9)  # fmt: skip
    fig.savefig(path, dpi=150, metadata={"Software": None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-refusal")
    ap.add_argument("--quick", action="store_true", help="two points per factor, no naive loop")
    ap.add_argument("--out", default=None, help="file stem (default benchmarks/cost-<cpu>)")
    args = ap.parse_args()
    cpu = detect()
    from crystallized_safety.core.directions import extract_directions

    model = load_model(args.model)
    bank = extract_directions(
        model, list(bundled("harmful", "extract"))[:32], list(bundled("harmless", "extract"))[:32]
    )
    prompts = list(bundled("harmful", "eval"))
    prompts = (prompts * (1 + max(SWEEPS["prompts"]) // len(prompts)))[: max(SWEEPS["prompts"])]
    sweeps = {k: v[1:3] for k, v in SWEEPS.items()} if args.quick else SWEEPS
    results: dict = {"engine": [], "naive": []}
    engine(model, bank, prompts[:4], conditions(BASE, model.n_layers)[:1], 4)  # warm-up
    for factor, values in sweeps.items():
        for value in values:
            r = measure(engine, model, bank, prompts, {**BASE, factor: value})
            results["engine"].append({**r, "factor": factor})
            print(f"engine {factor}={value}: {r['seconds']:.2f} s, {r['tokens_out']} tokens, peak {r['peak_mb']} MB",
                  flush=True)  # fmt: skip
        if args.quick:
            continue
        for value in NAIVE[factor]:
            point = {**BASE, "prompts": 4, "tokens": 8, "cells": 1, factor: value}
            r = measure(naive, model, bank, prompts, point)
            results["naive"].append({**r, "factor": factor})
            print(f"naive  {factor}={value}: {r['seconds']:.2f} s, {r['tokens_out']} tokens", flush=True)
    per = {n: sum(r["seconds"] for r in rs) / max(1, sum(r["tokens_out"] for r in rs)) for n, rs in results.items()}
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu.cpu.lower()).strip("-")[:24]
    stem = Path(args.out or Path(__file__).parent / f"cost-{slug}")
    out = {"machine": cpu.cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
           "base": BASE, "results": results, "seconds_per_token": per}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(results, stem.with_suffix(".png"), f"{args.model} on {cpu.cpu}, {torch.get_num_threads()} threads")
    print(f"wrote {stem}.json and {stem}.png", file=sys.stderr)
    ratio = per["naive"] / per["engine"] if results["naive"] else float("nan")
    print(f"engine_s_per_token={per['engine']:.5f} naive_s_per_token={per['naive']:.5f} ratio={ratio:.1f}")


if __name__ == "__main__":
    main()
