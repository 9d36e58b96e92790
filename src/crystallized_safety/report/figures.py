"""Report figures: matplotlib (Agg, no pyplot), sized and labelled for a paper column or page.

Every function takes plain result dicts from the store (the shapes `experiments/analysis.py` writes) and
returns a `Figure`; nothing here reads the store or touches global matplotlib state (each figure is a
`matplotlib.figure.Figure` rendered with the Agg canvas inside an `rc_context`). Fonts are >= 8 pt at
the figure's own width (3.5-6.5 in), axes name their units, layers follow the project convention
(layer i = output of decoder block i) and alphas say whether they are relative or absolute.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..experiments.results import pool
from ..stats import MIN_N
from .canvas import (
    C_COMPLY,
    C_CONTROL,
    C_MAIN,
    C_OTHER,
    FONT,
    LAYER_AXIS,
    LAYER_AXIS_2,
    RATE_AXIS,
    alpha_axis,
    empty_note,
    fmt_p,
    new_figure,
    num,
    p_eq,
    pct,
    rate_value,
    styled,
    wilson_err,
)

# --------------------------------------------------------------------------- figures


def alpha_order(alphas: Sequence[float]) -> list[float]:
    """Weakest to strongest steering left to right when all alphas share a sign; numeric otherwise."""
    uniq = sorted(set(alphas))
    if all(a <= 0 for a in uniq) or all(a >= 0 for a in uniq):
        return sorted(uniq, key=abs)
    return uniq


def heatmap(cells: Sequence[dict], unit: str | None, title: str, metric: str = "flip") -> Figure:
    """Layer x alpha grid of a rate; cells annotated with rate and n, n < MIN_N hatched, undefined grey."""
    layers = sorted({c["layer"] for c in cells})
    alphas = alpha_order([c["alpha"] for c in cells])
    grid = np.full((len(layers), len(alphas)), np.nan)
    by = {(c["layer"], c["alpha"]): c for c in cells}
    width = min(6.5, max(4.8, 2.2 + 0.85 * len(alphas)))
    row_in = min(0.36, 7.7 / max(1, len(layers)))  # at most 9 in tall: a page
    height = min(9.0, max(2.4, 1.3 + row_in * len(layers)))
    two_lines = row_in >= 0.27 and len(alphas) <= 10  # "rate / n=" where two 8 pt lines fit, else the rate only
    with styled():
        fig = new_figure(width, height)
        ax = fig.add_subplot()
        for (li, layer), (ai, alpha) in ((x, y) for x in enumerate(layers) for y in enumerate(alphas)):
            cell = by.get((layer, alpha))
            if cell is not None and cell[metric].get("rate") is not None:
                grid[li, ai] = cell[metric]["rate"]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        image = ax.imshow(
            np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, origin="lower", aspect="auto", interpolation="none"
        )
        for li, layer in enumerate(layers):
            for ai, alpha in enumerate(alphas):
                cell = by.get((layer, alpha))
                if cell is None:
                    continue
                rate = cell[metric]
                n = rate.get("n", 0)
                value = grid[li, ai]
                label = pct(rate) + (f"\nn={n}" if two_lines else "")
                color = "black" if np.isnan(value) or value > 0.55 else "white"
                if n < MIN_N:
                    ax.add_patch(
                        Rectangle(
                            (ai - 0.5, li - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#ffffff99", linewidth=0
                        )
                    )
                bg = "#d9d9d9" if np.isnan(value) else image.cmap(image.norm(value))
                ax.text(
                    ai,
                    li,
                    label,
                    ha="center",
                    va="center",
                    fontsize=FONT,
                    color=color,
                    linespacing=1.0,
                    bbox={"boxstyle": "round,pad=0.12", "facecolor": bg, "edgecolor": "none", "alpha": 0.85},
                )
        ax.set_xticks(range(len(alphas)), [num(a) for a in alphas])
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel(alpha_axis(unit))
        ax.set_ylabel(LAYER_AXIS_2)
        ax.set_title(title, loc="left")
        for side in ("top", "right"):
            ax.spines[side].set_visible(True)
        bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
        bar.set_label(f"{metric} rate", fontsize=FONT)
        bar.ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        handles = [
            Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white", label=f"n < {MIN_N} (underpowered)"),
            Patch(facecolor="#d9d9d9", label="undefined (no baseline refusals)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    return fig


def threshold_curve(cells: Sequence[dict], threshold: dict | None, unit: str | None, title: str) -> Figure:
    """Flip (and raw compliance) rate against alpha with Wilson bands; the largest jump shaded with its p."""
    cells = sorted(cells, key=lambda c: c["alpha"])
    alphas = np.array([c["alpha"] for c in cells], dtype=float)
    with styled():
        fig = new_figure(5.0, 3.0)
        ax = fig.add_subplot()
        for key, color, style, name in (
            ("flip", C_MAIN, "-", "flip rate (coherent)"),
            ("compliance", C_COMPLY, "--", "raw compliance"),
        ):
            rates = [c.get(key) for c in cells]
            y = np.array([rate_value(r) for r in rates])
            lo = np.array([np.nan if r is None or r.get("rate") is None else r["ci_lo"] for r in rates], dtype=float)
            hi = np.array([np.nan if r is None or r.get("rate") is None else r["ci_hi"] for r in rates], dtype=float)
            ax.fill_between(alphas, lo, hi, color=color, alpha=0.18, linewidth=0)
            ax.plot(alphas, y, style, marker="o", markersize=4, color=color, label=name)
        negative = bool(len(alphas)) and bool((alphas <= 0).all())
        if threshold:
            ax.axvspan(threshold["alpha_lo"], threshold["alpha_hi"], color="#d62728", alpha=0.12, linewidth=0)
            ax.annotate(
                f"largest jump {jump_text(threshold, negative)}\n"
                f"p = {fmt_p(threshold['p_fisher'])} (Fisher), {fmt_p(threshold['p_two_proportion'])} (z)",
                xy=((threshold["alpha_lo"] + threshold["alpha_hi"]) / 2, 1.02),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=FONT,
                color="#a01c1c",
            )
            by_strength = "strength" in threshold.get("ordered_by", "")
            if threshold.get("saturation_alpha") is not None and (by_strength or not negative):
                # stats.threshold scans alphas upwards: for negative (refusal-removing) alphas its saturation
                # point sits at the weak end of the curve, so it is drawn only where that reads as saturation
                ax.axvline(threshold["saturation_alpha"], color="#555555", linestyle=":", linewidth=1)
                ax.text(
                    threshold["saturation_alpha"],
                    0.02,
                    " saturation",
                    rotation=90,
                    va="bottom",
                    ha="right",
                    fontsize=FONT,
                    color="#555555",
                )
        elif not any(c["flip"].get("rate") is not None for c in cells):
            empty_note(ax, "flip rate undefined: the baseline refused none of these prompts")
        if negative:
            ax.invert_xaxis()  # stronger (more negative) steering to the right
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_xlabel(alpha_axis(unit) + (", stronger →" if negative else ""))
        ax.set_ylabel(RATE_AXIS)
        ax.set_title(title, loc="left", pad=26 if threshold else 6)
        fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def jump_text(th: dict, negative: bool) -> str:
    """The jump read in the direction of stronger steering (towards more negative alphas when all are <= 0)."""
    a0, a1, r0, r1 = th["alpha_lo"], th["alpha_hi"], th["rate_lo"], th["rate_hi"]
    # analyses order negative sweeps by strength (alpha_lo is the weaker end) and say so in `ordered_by`;
    # older stores ordered by alpha value, where the weak end of a negative sweep is alpha_hi
    if negative and "strength" not in th.get("ordered_by", ""):
        a0, a1, r0, r1 = a1, a0, r1, r0
    return f"{100 * r0:.0f}% → {100 * r1:.0f}% (α {num(a0)} → {num(a1)})"


def _bar_labels(ax, xs, rates, offset=0.02) -> None:
    for x, r in zip(xs, rates):
        top = r["ci_hi"] if r and r.get("rate") is not None else 0.0
        ax.text(x, top + offset, pct(r), ha="center", va="bottom", fontsize=FONT)


def controls_bars(result: dict, title: str) -> Figure:
    """Extracted direction vs orthogonal / random controls: flip and compliance with CIs, Holm p above."""
    extracted = result["extracted"]
    names = ["extracted", *result["controls"].keys()]
    flips = [extracted["flip"], *(c["pooled"] for c in result["controls"].values())]
    comps = [extracted.get("compliance"), *(pool(c["seeds"], "compliance") for c in result["controls"].values())]
    x = np.arange(len(names))
    w = 0.38
    with styled():
        fig = new_figure(max(3.5, 1.6 + 1.3 * len(names)), 3.0)
        ax = fig.add_subplot()
        ax.bar(
            x - w / 2,
            [rate_value(r) for r in flips],
            w,
            yerr=wilson_err(flips),
            color=C_MAIN,
            capsize=3,
            label="flip rate",
        )
        ax.bar(
            x + w / 2,
            [rate_value(r) for r in comps],
            w,
            yerr=wilson_err(comps),
            color=C_COMPLY,
            capsize=3,
            label="raw compliance",
        )
        _bar_labels(ax, x - w / 2, flips)
        _bar_labels(ax, x + w / 2, comps)
        for i, comp in enumerate(result["controls"].values(), start=1):
            seeds = [s["flip"]["rate"] for s in comp["seeds"] if s["flip"].get("rate") is not None]
            ax.plot([i - w / 2] * len(seeds), seeds, "o", color="black", markersize=3, zorder=3)
            p = comp.get("p_fisher_holm", comp.get("p_fisher"))
            diff = comp.get("diff_pp")
            text = f"Δ {diff:+.0f} pp\np(Holm) {p_eq(p)}" if diff is not None else "p n/a"
            ax.text(i, 1.2, text, ha="center", va="top", fontsize=FONT)
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1.25)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_ylabel(RATE_AXIS)
        ax.set_xlabel("direction (controls pooled over seeds; dots = single seeds)")
        ax.set_title(title, loc="left")
        fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def sign_bars(result: dict, title: str, baselines: dict | None = None) -> Figure:
    """Refusal rate under +alpha, -alpha and the inverted direction, on harmful and harmless prompts."""
    sets = result["sets"]
    with styled():
        fig = new_figure(6.5, 2.9)
        axes = fig.subplots(1, len(sets), sharey=True, squeeze=False)[0]
        colors = {"+alpha": C_MAIN, "-alpha": C_COMPLY, "inverted +alpha": C_OTHER}
        for ax, (name, s) in zip(axes, sets.items()):
            variants = list(s["variants"].items())
            x = np.arange(len(variants))
            rates = [v["refusal"] for _n, v in variants]
            ax.bar(
                x,
                [rate_value(r) for r in rates],
                0.6,
                yerr=wilson_err(rates),
                capsize=3,
                color=[colors.get(n, C_CONTROL) for n, _v in variants],
            )
            _bar_labels(ax, x, rates)
            if baselines and baselines.get(name) and baselines[name].get("rate") is not None:
                ax.axhline(baselines[name]["rate"], color="#555555", linestyle="--", linewidth=1)
                ax.text(len(variants) - 0.5, baselines[name]["rate"] + 0.02, "baseline", ha="right", fontsize=FONT)
            ax.set_xticks(x, [n.replace("alpha", "α").replace("-", "−") for n, _v in variants])
            same = "yes" if s.get("inverted_equals_negative") else "NO"
            ax.set_title(
                f"{name} prompts\ninverted +α ≡ −α token for token: {same} "
                f"({s.get('identical_responses', 0)}/{s.get('n', 0)})",
                loc="left",
            )
            ax.set_ylim(0, 1.15)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        axes[0].set_ylabel("refusal " + RATE_AXIS)
        fig.suptitle(title, x=0.01, ha="left")
    return fig


def single_vs_multi(multi_cells: Sequence[dict], best_single: dict | None, title: str) -> Figure:
    """Best single-layer cell next to every multi-layer cell: flip rate, raw compliance, random control."""
    groups: list[tuple[str, dict, str]] = []
    if best_single is not None:
        groups.append(
            (f"best single\n{_layers_label(best_single)}\nα={num(best_single['alpha'])}", best_single, "single")
        )
    for c in multi_cells:
        groups.append((f"{_layers_label(c)}\nα={num(c['alpha'])}", c, "multi"))
    x = np.arange(len(groups))
    has_control = any(c.get("control_rate") for _l, c, _k in groups)
    w = 0.27 if has_control else 0.38
    many = len(groups) > 8
    with styled():
        fig = new_figure(6.5 if len(groups) > 3 else 4.5, 3.4 if many else 3.0)
        ax = fig.add_subplot()
        flips = [c["flip"] for _l, c, _k in groups]
        comps = [c.get("compliance") for _l, c, _k in groups]
        colors = [C_OTHER if k == "single" else C_MAIN for _l, _c, k in groups]
        ax.bar(
            x - w, [rate_value(r) for r in flips], w, yerr=wilson_err(flips), color=colors, capsize=2, label="flip rate"
        )
        ax.bar(
            x,
            [rate_value(r) for r in comps],
            w,
            yerr=wilson_err(comps),
            color=C_COMPLY,
            capsize=2,
            label="raw compliance",
        )
        if has_control:
            ctrl = [c.get("control_rate") for _l, c, _k in groups]
            ax.bar(
                x + w,
                [rate_value(r) for r in ctrl],
                w,
                yerr=wilson_err(ctrl),
                color=C_CONTROL,
                capsize=2,
                label="random control",
            )
        if not many:
            _bar_labels(ax, x - w, flips)
        ax.set_xticks(x, [g[0] for g in groups], rotation=90 if many else 0)
        ax.set_ylim(0, 1.15)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_ylabel(RATE_AXIS)
        ax.set_xlabel("layers steered (i = output of decoder block i) and alpha")
        ax.set_title(title, loc="left")
        handles = [Patch(color=C_MAIN, label="flip rate, multi-layer")]
        if best_single is not None:
            handles.insert(0, Patch(color=C_OTHER, label="flip rate, best single layer"))
        handles.append(Patch(color=C_COMPLY, label="raw compliance"))
        if has_control:
            handles.append(Patch(color=C_CONTROL, label="random control (flip)"))
        ncols = len(handles) if fig.get_figwidth() >= 6 else 2
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)
    return fig


def k_curve(series: dict[str, dict], title: str) -> Figure:
    """Best coherent flip rate against the number of layers steered together (K), one line per model, with
    Wilson 95% bars; dashed: the random control of each K; dotted: the verdict's flip threshold. `series`:
    model -> a min_layers analysis result (per_k, k_star, flip_threshold)."""
    colors = [C_MAIN, C_OTHER, C_COMPLY, "#a23b72", "#555555"]
    with styled():
        fig = new_figure(5.5, 3.3)
        ax = fig.add_subplot()
        ks: set[int] = {r["k"] for res in series.values() for r in res["per_k"]}
        threshold = None
        for i, (model, res) in enumerate(series.items()):
            color = colors[i % len(colors)]
            rows = [r for r in res["per_k"] if r["best"] is not None]
            xs = [r["k"] for r in rows]
            flips = [r["best"]["flip"] for r in rows]
            star = res.get("k_star")
            label = f"{model} (K* = {star if star is not None else 'none'})"
            ax.errorbar(
                xs,
                [rate_value(f) for f in flips],
                yerr=wilson_err(flips),
                marker="o",
                color=color,
                capsize=3,
                label=label,
            )
            ctrl = [r["control"] for r in rows]
            if any(c and c.get("rate") is not None for c in ctrl):
                ax.plot(xs, [rate_value(c) for c in ctrl], linestyle="--", marker="x", color=color, alpha=0.7)
            threshold = res.get("flip_threshold", threshold)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"flip threshold {threshold:.0%}")
        if not any(r["best"] for res in series.values() for r in res["per_k"]):
            empty_note(ax, "no K has a defined flip rate (no baseline refusals)")
        if ks and min(ks) > 0:
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(ks) / 1.3, max(ks) * 1.3)
            ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("best coherent flip rate (Wilson 95% CI)")
        ax.set_xlabel("layers steered together, K (dashed: random control at that K)")
        ax.set_title(title, loc="left")
        fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def frontier_curve(series: dict[str, dict], title: str) -> Figure:
    """Per model, the single-layer frontier: the best coherent flip rate reached at each layer of the band over
    every rung, with Wilson 95% bars; filled: the layer is excluded (searched far enough, upper bound below the
    threshold), hollow: not excluded; dotted: the flip threshold. `series`: model -> a frontier analysis result."""
    colors = [C_MAIN, C_OTHER, C_COMPLY, "#a23b72", "#555555"]
    with styled():
        fig = new_figure(6.5, 3.4)
        ax = fig.add_subplot()
        threshold = None
        for i, (model, res) in enumerate(series.items()):
            color = colors[i % len(colors)]
            rows = [s for s in res.get("frontier") or [] if s["frontier"] is not None]
            xs = [s["layer"] for s in rows]
            flips = [s["frontier"]["flip"] for s in rows]
            ax.errorbar(xs, [rate_value(f) for f in flips], yerr=wilson_err(flips), color=color, capsize=2,
                        marker="", linewidth=1, label=model)  # fmt: skip
            for x, f, s in zip(xs, flips, rows):
                ax.plot(
                    [x], [rate_value(f)], marker="o", color=color, markerfacecolor=color if s["excluded"] else "white"
                )
            threshold = (res.get("rules") or {}).get("flip_threshold", threshold)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"flip threshold {threshold:.0%}")
        if not any(s["frontier"] for res in series.values() for s in res.get("frontier") or []):
            empty_note(ax, "no single-layer cell was generated")
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("best coherent flip (Wilson 95% CI)")
        ax.set_xlabel("layer (output of block i); filled: excluded, hollow: not excluded")
        ax.set_title(title, loc="left")
        fig.legend(loc="outside lower center", ncols=3, frameon=False)
    return fig


def _layers_label(cell: dict) -> str:
    if "layers" in cell and cell["layers"]:
        return "L" + ",".join(str(x) for x in cell["layers"])
    return f"L{cell.get('layer', '?')}"


def readability(result: dict, title: str) -> Figure:
    """Probe / projection AUC per layer (top) against the best flip rate steering reached there (bottom)."""
    rows = sorted(result.get("layers", []), key=lambda r: r["layer"])
    steer = {int(k): v for k, v in (result.get("steerability") or {}).items()}
    with styled():
        fig = new_figure(6.5, 4.0)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.2, 1])
        layers = [r["layer"] for r in rows]
        for key, color, name in (("probe_auc", C_MAIN, "probe AUC"), ("projection_auc", C_COMPLY, "projection AUC")):
            ys = [r.get(key) for r in rows]
            ys = [np.nan if y is None else y for y in ys]
            top.plot(layers, ys, marker="o", markersize=3, color=color, label=name)
        top.axhline(0.5, color="#555555", linestyle=":", linewidth=1)
        top.text(
            1.0,
            0.51,
            "chance ",
            transform=top.get_yaxis_transform(),
            fontsize=FONT,
            color="#555555",
            ha="right",
            va="bottom",
        )
        top.set_ylim(0, 1.05)
        top.set_ylabel("readability\n(held-out AUC)")
        top.legend(loc="lower right", frameon=False, ncols=2)
        top.set_title(title, loc="left")
        if steer:
            ls = sorted(steer)
            rates = [steer[x] for x in ls]
            bottom.errorbar(
                ls,
                [rate_value(r) for r in rates],
                yerr=wilson_err(rates),
                fmt="o",
                color=C_OTHER,
                capsize=3,
                markersize=4,
            )
            bottom.set_ylim(-0.02, 1.05)
        else:
            empty_note(bottom, "no single-layer flip rate was measured at these layers")
            bottom.set_ylim(0, 1)
        bottom.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        bottom.set_ylabel("steerability\n(best flip rate)")
        bottom.set_xlabel(LAYER_AXIS)
        if layers:
            bottom.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
        bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return fig


def direction_norms(layers: Sequence[int], raw_norms, resid_norms, title: str) -> Figure:
    """Per-layer norm of the raw mean difference and the mean residual norm (log scale), and their ratio.
    `raw_norms` and `resid_norms` (or None) are sequences or arrays of floats, one per layer."""
    layers = list(layers)
    raw = np.asarray(raw_norms, dtype=float)
    resid = None if resid_norms is None else np.asarray(resid_norms, dtype=float)
    with styled():
        fig = new_figure(6.5, 3.8)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.3, 1])
        top.plot(layers, raw, marker="o", markersize=3, color=C_MAIN, label="‖mean harmful − mean harmless‖")
        if resid is not None:
            top.plot(layers, resid, marker="s", markersize=3, color=C_COMPLY, label="mean residual norm")
            with np.errstate(divide="ignore", invalid="ignore"):
                bottom.plot(layers, 100 * raw / resid, marker="o", markersize=3, color=C_OTHER)
            bottom.set_ylabel("ratio (%)")
        else:
            empty_note(bottom, "no residual norms stored with these directions")
        top.set_yscale("log")
        top.set_ylabel("L2 norm\n(residual units, log)")
        top.legend(loc="best", frameon=False)
        top.set_title(title, loc="left")
        bottom.set_xlabel(LAYER_AXIS)
        bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return fig


def judge_agreement(
    table: dict[str, int], kappa: float, n: int, scores: Sequence[float], labels: Sequence[bool], names: tuple[str, str]
) -> Figure:
    """2x2 confusion of two judges (left) and the score distribution split by the first judge (right)."""
    a, b = names
    with styled():
        fig = new_figure(6.5, 2.8)
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.4])
        grid = np.array(
            [
                [table["refusal/refusal"], table["refusal/compliance"]],
                [table["compliance/refusal"], table["compliance/compliance"]],
            ]
        )
        left.imshow(grid, cmap="Blues", vmin=0, vmax=max(1, grid.max()))
        for i in range(2):
            for j in range(2):
                color = "white" if grid[i, j] > 0.6 * grid.max() else "black"
                left.text(j, i, str(grid[i, j]), ha="center", va="center", fontsize=9, color=color)
        left.set_xticks([0, 1], ["refusal", "compliance"])
        left.set_yticks([0, 1], ["refusal", "compliance"])
        left.set_xlabel(b)
        left.set_ylabel(a)
        left.set_title(f"Cohen's κ = {kappa:.2f} (n = {n})", loc="left")
        for side in ("top", "right"):
            left.spines[side].set_visible(True)
        s = np.asarray(scores, dtype=float)
        lab = np.asarray(labels, dtype=bool)
        span = (min(-0.5, float(s.min())), max(0.5, float(s.max()))) if len(s) else (-1.0, 1.0)
        bins = np.linspace(*span, min(30, max(6, len(s) // 4)) + 1)
        right.hist(s[lab], bins=bins, color=C_MAIN, alpha=0.7, label=f"{a}: refusal")
        right.hist(s[~lab], bins=bins, color=C_COMPLY, alpha=0.7, label=f"{a}: compliance")
        right.axvline(0.0, color="#a01c1c", linestyle="--", linewidth=1)
        right.text(0.0, 1.0, " threshold 0", transform=right.get_xaxis_transform(), fontsize=FONT, color="#a01c1c")
        right.set_xlabel("first-token refusal score (log-odds)")
        right.set_ylabel("responses")
        fig.legend(loc="outside lower right", ncols=2, frameon=False)
    return fig
