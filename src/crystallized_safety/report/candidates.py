"""The direction-selection grid: each candidate's bypass, induce and KL scores over positions x layers, the ones
the filters keep marked, the chosen one starred (Arditi et al. 2024's figure, or COSMIC's scores)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .canvas import FONT, LAYER_AXIS, new_figure, styled


def scoring_note(settings: dict) -> str:
    """Which prompts the candidates were scored on, for the table and the figure: a reader must see that the
    choice was made out of sample (a table stored before the split was recorded scored on the verdict's own
    first eval prompts, and says so)."""
    where = settings.get("scored_on")
    if where:
        return f"scored on {where}"
    return "scoring prompts not recorded: an older run, scored on the first eval prompts the verdict also reads"


def selection_grid(result: dict, title: str) -> Figure:
    """Three heatmaps (position rows x layer columns): bypass, induce, KL; dots = kept, star = chosen."""
    cands = result.get("candidates", [])
    positions = sorted({c["position"] for c in cands}, reverse=True)
    layers = sorted({c["layer"] for c in cands})
    criterion = (result.get("settings") or {}).get("criterion", "arditi")
    names = (
        ("bypass", "bypass: refusal log-odds, ablated (lower = better)")
        if criterion == "arditi"
        else ("bypass", "bypass: cosine to harmless, ablated (higher = better)"),
        ("induce", "induce: refusal log-odds, added" if criterion == "arditi" else "induce: cosine to harmful, added"),
        ("kl", "KL on harmless prompts, ablated (nats)"),
    )
    with styled():
        fig = new_figure(max(4.5, 0.22 * len(layers) + 2.0), 1.2 + 1.1 * 3 * max(1, len(positions)) / 3)
        axes = fig.subplots(3, 1, sharex=True)
        for ax, (key, label) in zip(axes, names):
            grid = np.full((len(positions), len(layers)), np.nan)
            for c in cands:
                grid[positions.index(c["position"]), layers.index(c["layer"])] = c[key]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
            for c in cands:
                x, y = layers.index(c["layer"]), positions.index(c["position"])
                if c.get("chosen"):
                    ax.plot(x, y, marker="*", color="#e03030", markersize=9, markeredgecolor="white")
                elif c.get("kept"):
                    ax.plot(x, y, marker="o", color="white", markersize=2.5)
            ax.set_yticks(range(len(positions)), [str(p) for p in positions])
            ax.set_ylabel("position", fontsize=FONT)
            ax.set_title(label, fontsize=FONT + 1, loc="left")
        step = max(1, len(layers) // 16)
        axes[-1].set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]])
        axes[-1].set_xlabel(LAYER_AXIS)
        fig.suptitle(title)
    return fig
