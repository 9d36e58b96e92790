"""Which figures a report holds: a table of figure specs (kind, the study kind it needs, title, and how to
draw it from one analysis), instead of a branch per kind. Figures whose study did not run are listed as
skipped, with the reason."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..stats import MIN_N
from . import figures as F
from .candidates import scoring_note, selection_grid
from .canvas import save
from .collect import unit, walk
from .model_report import ModelReport
from .tradeoff import KL_FLOOR, refusal_vs_kl, tradeoff_points


@dataclass(frozen=True)
class Drawing:
    """What one analysis gives to draw: the figure, a title suffix and the caption."""

    fig: object
    caption: str
    suffix: str = ""


@dataclass
class Inputs:
    """Everything a figure may read, for one model."""

    model: str
    cells_by_key: dict[str, dict]
    best_single: dict | None
    baseline: dict | None

    def enriched(self, result: dict) -> list[dict]:
        return [self.cells_by_key[c["condition_key"]] for c in walk(result) if c["condition_key"] in self.cells_by_key]


def _heatmap(res: dict, head: str, inp: Inputs) -> Drawing | str:
    cells = [c for c in res.get("cells", []) if "layer" in c]
    if not cells:
        return "no cells"
    return Drawing(
        F.heatmap(cells, unit(inp.enriched(res)), head),
        "Flip rate per (layer, alpha), annotated with the rate and n (baseline refusals in the cell; on very tall "
        f"grids the rate only, n is in the table); hatched cells have n < {MIN_N}; grey cells have no defined "
        "flip rate.",
    )


def _induction(res: dict, head: str, inp: Inputs) -> Drawing | str:
    cells = [c for c in res.get("cells", []) if "layer" in c]
    return Drawing(
        F.heatmap(cells, unit(inp.enriched(res)), head, metric="induced"),
        "Induced-refusal rate on harmless prompts the unsteered model answered, per (layer, alpha).",
    )


def _threshold(res: dict, head: str, inp: Inputs) -> Drawing | str:
    layer_sets = {tuple(c["layers"]) for c in inp.enriched(res)}
    layer = ",".join(map(str, layer_sets.pop())) if len(layer_sets) == 1 else None
    th = res.get("threshold")
    where = f", layer {layer}" if layer is not None else ""
    jump = (
        f"largest jump, {F.jump_text(th, all(c['alpha'] <= 0 for c in res['cells']))}, "
        f"Fisher p = {F.fmt_p(th['p_fisher'])}."
        if th
        else "largest jump (none: fewer than two alphas have a defined flip rate)."
    )
    return Drawing(
        F.threshold_curve(res.get("cells", []), th, unit(inp.enriched(res)), head + where),
        "Flip rate and raw compliance against alpha with Wilson 95% bands; the shaded interval is the " + jump,
        where,
    )


def _controls(res: dict, head: str, inp: Inputs) -> Drawing | str:
    return Drawing(
        F.controls_bars(res, f"{head} ({res['extracted']['condition']})"),
        "Flip rate and raw compliance of the extracted direction and of orthogonal / random directions "
        "(pooled over seeds, dots = single seeds), Wilson 95% CIs; Fisher p-values Holm-adjusted.",
    )


def _sign(res: dict, head: str, inp: Inputs) -> Drawing | str:
    return Drawing(
        F.sign_bars(res, head, inp.baseline),
        f"Refusal rate under +α, −α and the inverted direction at +α. {res.get('note', '')}",
    )


def _multilayer(res: dict, head: str, inp: Inputs) -> Drawing | str:
    unique: dict[str, dict] = {}
    for c in res.get("cells", []):
        unique.setdefault(c["condition_key"], c)  # first occurrence, in order
    return Drawing(
        F.single_vs_multi(list(unique.values()), inp.best_single, head),
        "Best single-layer cell (green) next to each multi-layer cell: flip rate, raw compliance and the random "
        "control at the same layers and alpha, Wilson 95% CIs.",
    )


def _min_layers(res: dict, head: str, inp: Inputs) -> Drawing | str:
    star = res.get("k_star")
    return Drawing(
        F.k_curve({inp.model: res}, head),
        "Best coherent flip rate over windows of K consecutive layers (and alphas) against K, Wilson 95% CIs; "
        f"dashed: a random direction at the same K and alpha. K* = {star if star is not None else 'none'}: the "
        "smallest K whose best flip reaches the threshold with its lower bound above the control's upper bound.",
    )


def _readability(res: dict, head: str, inp: Inputs) -> Drawing | str:
    return Drawing(
        F.readability(res, head),
        "Top: held-out AUC of the projection on the direction and of a linear probe, per layer. Bottom: best flip "
        "rate single-layer steering reached at that layer (Wilson 95% CI).",
    )


def _selection(res: dict, head: str, inp: Inputs) -> Drawing | str:
    if not res.get("candidates"):
        return "no candidates"
    chosen = res.get("chosen")
    pick = (
        f"chosen: position {chosen['position']}, layer {chosen['layer']}"
        if chosen
        else f"nothing passes the filters ({res.get('no_choice') or ''})"
    )
    s = res.get("settings") or {}
    induce = ", induce > 0" if s.get("criterion") == "arditi" else ""
    return Drawing(
        selection_grid(res, head),
        f"Candidate refusal directions (diff-in-means per post-instruction position and layer) scored by "
        f"{s.get('criterion', 'arditi')} ({scoring_note(s)}); dots: kept by the filters (KL < {s.get('kl_max')}, not "
        f"in the last {100 * s.get('drop_last', 0.2):.0f}% of layers{induce}); "
        f"star: {pick}.",
    )


@dataclass(frozen=True)
class FigureSpec:
    kind: str
    needs: str  # the study kind it draws (or "directions" / "score": run-level inputs)
    title: str
    draw: Callable[[dict, str, Inputs], Drawing | str] | None = None  # per analysis; a string = skip reason


SPECS: tuple[FigureSpec, ...] = (
    FigureSpec("heatmap", "layer_sweep", "Flip rate by layer and alpha", _heatmap),
    FigureSpec("threshold", "threshold", "Threshold curve", _threshold),
    FigureSpec("controls", "controls", "Extracted direction vs controls", _controls),
    FigureSpec("sign", "sign", "Sign inversion", _sign),
    FigureSpec("multilayer", "multilayer", "Single vs multi-layer steering", _multilayer),
    FigureSpec("kcurve", "min_layers", "Layers needed together (K)", _min_layers),
    FigureSpec("induction", "induction", "Induced refusal on harmless prompts", _induction),
    FigureSpec("readability", "readability", "Readability vs steerability", _readability),
    FigureSpec("selection", "selection", "Direction selection", _selection),
    FigureSpec("tradeoff", "damage", "Refusals vs KL damage"),
    FigureSpec("norms", "directions", "Direction norms per layer"),
    FigureSpec("agreement", "score", "Judge agreement"),
)
# (figure kind, study kind it needs, title): the figures a complete run yields, in report order.
FIGURES: tuple[tuple[str, str, str], ...] = tuple((s.kind, s.needs, s.title) for s in SPECS)


def figures(
    report: ModelReport,
    analyses: list[dict],
    cells_by_key: dict[str, dict],
    best_single: dict | None,
    directions: tuple | None,
    scores: dict,
    out: Path,
) -> None:
    """Draw every figure the run supports into `out`, recording the skipped ones with their reason."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for a in analyses:
        by_kind[a["kind"]].append(a)
    baseline = by_kind["baseline"][0]["result"] if by_kind.get("baseline") else None
    inputs = Inputs(report.model, cells_by_key, best_single, baseline)
    for spec in SPECS:
        if spec.kind == "norms":
            _norm_figure(report, directions, spec, out)
        elif spec.kind == "tradeoff":
            _tradeoff_figure(report, inputs, spec, out)
        elif spec.kind == "agreement":
            _agreement_figure(report, scores, spec, out)
        elif not by_kind.get(spec.needs):
            _skip(report, spec, f"not run: the run has no {spec.needs} study")
        else:
            assert spec.draw is not None
            for a in by_kind[spec.needs]:
                study = a["study"]
                drawn = spec.draw(a["result"], f"{report.model}: {study}", inputs)
                if isinstance(drawn, str):
                    _skip(report, spec, f"{study}: {drawn}")
                    continue
                title = (spec.title if study == spec.needs else f"{spec.title} ({study})") + drawn.suffix
                _add(report, out, spec, study, drawn.fig, title, drawn.caption)


def _add(report: ModelReport, out: Path, spec: FigureSpec, study: str, fig, title: str, caption: str) -> None:
    # an unnamed study is labelled by its kind; only a named one needs its label in the id
    raw = f"{report.slug}-{spec.kind}" if study == spec.needs else f"{report.slug}-{study}-{spec.kind}"
    fig_id = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in raw)
    used, base, i = {f.id for f in report.figures}, fig_id, 2
    while fig_id in used:
        fig_id, i = f"{base}-{i}", i + 1
    report.figures.append(save(fig, out, fig_id, report.model, title, caption))


def _skip(report: ModelReport, spec: FigureSpec, reason: str) -> None:
    report.skipped.append({"kind": spec.kind, "model": report.model, "title": spec.title, "reason": reason})


def _tradeoff_figure(report: ModelReport, inputs: Inputs, spec: FigureSpec, out: Path) -> None:
    cells = list(inputs.cells_by_key.values())
    points = tradeoff_points(cells)
    if not points:
        _skip(report, spec, "no steered cell has a measured KL (the spec's damage.enabled is false, or no cells)")
        return
    base = (inputs.baseline or {}).get("harmful")
    fig = refusal_vs_kl(points, base, f"{report.model}: refusals vs KL damage")
    caption = (
        f"Every steered cell on harmful prompts ({len(points)}): refusal rate (Wilson 95% CI) against the KL "
        "divergence of the steered model from the unsteered one on harmless prompts, teacher-forced over the "
        f"unsteered answers (log axis; cells below {KL_FLOOR:g} nats drawn at it). Low and left is a clean "
        "bypass; controls show how far damage alone lowers refusal."
    )
    _add(report, out, spec, "damage", fig, spec.title, caption)


def _agreement_figure(report: ModelReport, scores: dict, spec: FigureSpec, out: Path) -> None:
    ag = report.agreement
    if ag is None:
        _skip(report, spec, "no row has a first-token refusal score (add 'score' to the spec's judges)")
        return
    fig = F.judge_agreement(ag["table"], ag["kappa"], ag["n"], scores["scores"], scores["labels"], (ag["a"], ag["b"]))
    caption = f"Cohen's κ = {ag['kappa']:.2f} over {ag['n']} responses (all conditions); {ag['threshold_note']}."
    _add(report, out, spec, "score", fig, f"{spec.title}: {ag['a']} vs {ag['b']}", caption)


def _norm_figure(report: ModelReport, directions: tuple | None, spec: FigureSpec, out: Path) -> None:
    if directions is None or directions[1] is None:
        _skip(report, spec, "no directions artifact in the store")
        return
    from safetensors.numpy import load

    try:
        tensors = load(directions[1])
    except Exception as exc:  # noqa: BLE001 - a corrupt blob should not sink the whole report
        _skip(report, spec, f"directions blob unreadable ({str(exc).splitlines()[0]})")
        return
    if "raw_norms" not in tensors:
        _skip(report, spec, "the stored directions carry no raw_norms")
        return
    raw = tensors["raw_norms"].astype(float)
    layers = [int(x) for x in tensors["layers"]] if "layers" in tensors else list(range(len(raw)))
    resid = tensors["resid_norms"].astype(float) if "resid_norms" in tensors else None
    fig = F.direction_norms(layers, raw, resid, f"{report.model}: refusal direction norms")
    caption = (
        "Norm of the raw mean difference (harmful − harmless) and mean residual-stream norm per layer (log scale); "
        "bottom: their ratio, i.e. how large the direction is relative to the stream it steers."
    )
    _add(report, out, spec, "directions", fig, spec.title, caption)
