"""The trade-off researchers look for: refusal against damage, one point per steered cell of a run (harmful
prompts), as heretic and refusal_direction report it. A good intervention sits low (few refusals) and left
(small KL to the unsteered model on harmless prompts); the controls show where damage alone takes refusal."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from ..experiments.direction_ref import DirectionRef
from .canvas import C_CONTROL, C_MAIN, C_OTHER, RATE_AXIS, new_figure, rate_value, styled, wilson_err

KL_FLOOR = 1e-4  # nats: a cell below this is drawn at the floor (a log axis has no zero)


def tradeoff_points(cells: Sequence[dict]) -> list[dict]:
    """Harmful-prompt steered cells that have both a refusal rate and a measured KL."""
    return [
        c
        for c in cells
        if c.get("prompt_set") == "harmful" and c.get("kl") and (c.get("refusal") or {}).get("rate") is not None
    ]


def _group(cell: dict) -> str:
    ref = DirectionRef.parse(cell.get("direction", "extracted"))
    if ref.is_control:
        return "control (random / orthogonal)"
    return "extracted direction" if len(cell.get("layers", [])) == 1 else "extracted, several layers / ablation"


def refusal_vs_kl(cells: Sequence[dict], baseline: dict | None, title: str, key: str = "kl_answer") -> Figure:
    """Refusal rate (Wilson 95% CI) against KL to the unsteered model on harmless prompts (log axis)."""
    points = tradeoff_points(cells)
    colors = {"extracted direction": C_MAIN, "extracted, several layers / ablation": C_OTHER}
    with styled():
        fig = new_figure(4.8, 3.4)
        ax = fig.add_subplot()
        for name in ("extracted direction", "extracted, several layers / ablation", "control (random / orthogonal)"):
            group = [c for c in points if _group(c) == name]
            if not group:
                continue
            xs = [max(KL_FLOOR, float(c["kl"][key])) for c in group]
            rates = [c["refusal"] for c in group]
            ax.errorbar(
                xs,
                [rate_value(r) for r in rates],
                yerr=wilson_err(rates),
                fmt="o",
                markersize=3.5,
                capsize=2,
                elinewidth=0.6,
                color=colors.get(name, C_CONTROL),
                label=f"{name} ({len(group)})",
            )
        if baseline and baseline.get("rate") is not None:
            ax.axhline(baseline["rate"], color="#555555", linestyle="--", linewidth=0.8, label="unsteered refusal")
        ax.set_xscale("log")
        what = "teacher-forced" if key == "kl_answer" else "first token"
        ax.set_xlabel(f"KL to the unsteered model on harmless prompts (nats, {what})")
        ax.set_ylabel(f"refusal on harmful prompts, {RATE_AXIS}")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(title)
        ax.legend(loc="best", frameon=False)
    return fig
