"""The house style of report figures: fonts, colours, axis labels, number formats, a fresh Agg figure, and
saving a figure as PNG + SVG (with the PNG kept for embedding in the HTML). Nothing here touches global
matplotlib state: each figure is drawn inside `styled()`."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FONT = 8  # smallest font anywhere in a figure, in points
STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": FONT,
    "ytick.labelsize": FONT,
    "legend.fontsize": FONT,
    "legend.title_fontsize": FONT,
    "figure.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "hatch.linewidth": 0.6,
    "svg.hashsalt": "crystallized-safety",  # deterministic SVG ids
    "savefig.dpi": 200,
}


def styled():
    """The house style for one figure (matplotlib types rcParams keys as literals; ours is a plain dict)."""
    return matplotlib.rc_context(STYLE)


LAYER_AXIS = "layer i (output of decoder block i)"
LAYER_AXIS_2 = "layer i\n(output of decoder block i)"
RATE_AXIS = "rate (Wilson 95% CI)"
C_MAIN, C_COMPLY, C_CONTROL, C_OTHER = "#1f5fa8", "#e08a1e", "#8c8c8c", "#3a9d5d"


def alpha_axis(unit: str | None) -> str:
    """Axis label for alpha in the unit the study used."""
    if unit == "relative":
        return "alpha (relative: × mean residual norm of the layer)"
    if unit == "absolute":
        return "alpha (absolute, on a unit direction)"
    return "alpha"


def num(x: float) -> str:
    """A number as matplotlib prints tick labels (true minus sign)."""
    return f"{x:g}".replace("-", "−")


def pct(rate: dict | None, digits: int = 0) -> str:
    if not rate or rate.get("rate") is None:
        return "n/a"
    return f"{100 * rate['rate']:.{digits}f}%"


def rate_value(rate: dict | None) -> float:
    return float("nan") if not rate or rate.get("rate") is None else float(rate["rate"])


def wilson_err(rates: Sequence[dict | None]) -> np.ndarray:
    """Asymmetric error bars (2 x n) from Wilson bounds; 0 where a rate is undefined."""
    lo, hi = [], []
    for r in rates:
        if not r or r.get("rate") is None:
            lo.append(0.0)
            hi.append(0.0)
        else:
            lo.append(max(0.0, r["rate"] - r["ci_lo"]))
            hi.append(max(0.0, r["ci_hi"] - r["rate"]))
    return np.array([lo, hi])


def p_eq(p: float | None) -> str:
    text = fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    if p < 1e-4:
        return "< 1e-4"
    return f"{p:.2g}"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=FONT, color="#555555", wrap=True)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class FigureFile:
    """One saved figure: PNG and SVG beside report.md, and the PNG as base64 for the HTML."""

    id: str
    model: str
    title: str
    caption: str
    png: Path
    svg: Path
    width_in: float
    png_base64: str


def save(fig: Figure, out_dir: Path, fig_id: str, model: str, title: str, caption: str) -> FigureFile:
    """Write `fig-<id>.png` (200 dpi) and `.svg` into out_dir; keep the PNG bytes for embedding."""
    png, svg = out_dir / f"fig-{fig_id}.png", out_dir / f"fig-{fig_id}.svg"
    buf = io.BytesIO()
    with styled():
        fig.savefig(buf, format="png", metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None})
    png.write_bytes(buf.getvalue())
    width = float(fig.get_figwidth())
    fig.clear()
    return FigureFile(fig_id, model, title, caption, png, svg, width, base64.b64encode(buf.getvalue()).decode("ascii"))
