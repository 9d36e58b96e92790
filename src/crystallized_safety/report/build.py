"""Build the report of one run from its SQLite store alone: report.html, report.md + figures, results.json.

Nothing here loads a model or re-runs an analysis: every number comes from the store (analyses, verdicts,
generations, artifacts, chunk timings), so a report can be rebuilt from old results at any time. The same
collected data feed all three outputs, so the HTML, the Markdown and the JSON never disagree.

collect (store -> cells) -> figure_specs, tables, examples, provenance (per model) -> markdown, html, JSON.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from .. import __version__, jsonio
from ..experiments.direction_ref import DirectionRef
from ..experiments.results import best
from ..stats import MIN_N
from ..store import Store, StoreError
from . import figures as F
from . import tables as T
from .canvas import save
from .collect import brief, cells_of, collect, control_for, is_control, iso, judge_agreement
from .examples import answer_spreads, examples
from .figure_specs import FIGURES, figures
from .html import render_html
from .markdown import markdown
from .model_report import KAPPA_BOUND, Finding, ModelReport, ReportError, ReportPaths
from .provenance import provenance, version

__all__ = ["FIGURES", "ReportError", "ReportPaths", "build_report"]


# --------------------------------------------------------------------------- entry point


def build_report(store_path: str | Path, out_dir: str | Path, run_id: str | None = None) -> ReportPaths:
    """Write report.html, report.md (figures beside it) and results.json for one run of a store."""
    store_path = Path(store_path)
    if store_path.is_dir():
        raise ReportError(f"store '{store_path}' is a directory: pass the results .sqlite file")
    if not store_path.is_file():
        raise ReportError(f"store '{store_path}' does not exist: run `csafety run CONFIG.yaml --store {store_path}`")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out '{out}' is a file: pass a directory for the report")
    try:
        store = Store(store_path, readonly=True)  # a report never writes the store (it may be on read-only media)
    except StoreError as exc:  # not a store, another schema: one error family for the report's callers
        raise ReportError(str(exc)) from None
    try:
        return _write_report(store, store_path, out, run_id)
    except OSError as exc:
        raise ReportError(f"cannot write the report under '{out}': {exc.strerror or exc}") from None


def _write_report(store: Store, store_path: Path, out: Path, run_id: str | None) -> ReportPaths:
    """The report files of one run (the store is closed here)."""
    try:
        try:
            info = store.run(run_id)
        except StoreError as exc:  # no runs, unknown run
            raise ReportError(str(exc)) from None
        data = collect(store, info.run_id)
        out.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        reports = [_model_report(store, info.run_id, model, _slug(model, taken), data, out) for model in data["models"]]
    finally:
        store.close()
    findings = [f for r in reports for f in r.summary.pop("_findings")]
    findings[:0] = [Finding("warning", "", "store", w) for w in store.warnings]
    if data["run"]["status"] != "finished":
        findings.insert(
            0,
            Finding(
                "warning",
                "",
                "unfinished",
                f"run status is '{data['run']['status']}': results are partial until it finishes",
            ),
        )
    context = _context(data, reports, findings, store_path)
    context["cross_figures"] = _cross_figures(data, out)
    md_path, html_path, json_path = out / "report.md", out / "report.html", out / "results.json"
    md_path.write_text(markdown(context), encoding="utf-8")
    html_path.write_text(render_html(context), encoding="utf-8")
    json_path.write_text(jsonio.dumps(_results(context, data), indent=1, ensure_ascii=False, default=str) + "\n")
    figs = tuple(p for r in reports for f in r.figures for p in (f.png, f.svg))
    figs += tuple(p for f in context["cross_figures"] for p in (f.png, f.svg))
    return ReportPaths(out, html_path, md_path, json_path, figs)


# --------------------------------------------------------------------------- collecting


def _slug(model: str, taken: set[str]) -> str:
    base = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(model).name or model).strip("-.")
    slug, i = base or "model", 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _model_report(store: Store, run_id: str, model: str, slug: str, data: dict, out: Path) -> ModelReport:
    analyses = [a for a in data["analyses"] if a["model"] == model]
    verdict = next((v for v in data["verdicts"] if v["model"] == model), None)
    gens = store.generations(run_id, model=model)
    conds = {}
    for g in gens:
        if g["condition_key"] not in conds:
            conds[g["condition_key"]] = json.loads(g["condition"])
    cells = cells_of(analyses, conds)
    steered = [c for c in cells.values() if c["layers"] and c["prompt_set"] == "harmful"]
    candidates = [
        c
        for c in steered
        if c["verdict_study"] and not is_control(c) and not DirectionRef.parse(c["direction"]).is_transfer
    ]
    single = [c for c in candidates if len(c["layers"]) == 1]
    multi = [c for c in candidates if len(c["layers"]) > 1]
    best_single, best_multi = best(single), best(multi)
    evidence = (verdict or {}).get("evidence") or {}
    if (evidence.get("rules") or {}).get("confirm_by") == "reading":  # the gate's short counts were overruled
        best_single = _as_read(evidence.get("best_single"), single) or best_single
        best_multi = _as_read(evidence.get("best_multi"), multi) or best_multi
    baseline: dict = next((a["result"] for a in analyses if a["kind"] == "baseline"), {})
    base = baseline.get("harmful") or (verdict or {}).get("evidence", {}).get("baseline_refusal")
    control = control_for(best_single, cells) if best_single else None
    coherence = store.get_artifact(run_id, model, "coherence")
    summary = {
        "model": model,
        "baseline_refusal": base,
        "baseline_harmless_refusal": baseline.get("harmless"),
        "best_single": brief(best_single),
        "best_multi": brief(best_multi),
        "control": control,
        "control_note": (
            "no control at that cell" if best_single else ("n/a (flip rate undefined)" if single else "not run")
        ),
        "verdict": verdict["verdict"] if verdict else None,
        "rule": verdict["rule"] if verdict else "no verdict stored for this model",
        **_readable_steerable(analyses, verdict),
        "decision": _decision(verdict, data, answer_spreads(gens, conds), _gate_of(store, run_id, model, coherence)),
        "single_note": "flip rate undefined (no baseline refusals)" if single and not best_single else None,
        "multi_note": "flip rate undefined (no baseline refusals)" if multi and not best_multi else None,
    }
    report = ModelReport(model, slug, summary)
    directions = store.get_artifact(run_id, model, "directions")
    calibration = next((a["result"] for a in analyses if a.get("kind") == "judges"), None)
    report.agreement, scores = judge_agreement(gens, calibration)
    figures(report, analyses, cells, best_single, directions, scores, out)
    _tables(report, analyses)
    report.examples = examples(gens, conds, cells, best_single, best_multi, candidates, coherence)
    report.provenance = provenance(store, run_id, model, gens, conds, directions, coherence, data)
    summary["_findings"] = _findings(model, analyses, cells, steered, base, verdict, report.agreement, data)
    for c in (summary["decision"] or {}).get("cells", [])[:1]:  # the deciding cell
        sp = c.get("spread")
        if sp and sp["distinct"] * 2 < sp["flips"]:
            summary["_findings"].append(
                Finding(
                    "warning",
                    model,
                    "prompt-independent flips",
                    f"the verdict's deciding cell ({c['condition']}): its {sp['flips']} flips are {sp['distinct']} "
                    f"distinct answers ('{sp['top']}' {sp['top_count']} times): the coherence gate passed answers "
                    "that do not depend on the prompt; read its samples before trusting the verdict",
                )
            )
    return report


# --------------------------------------------------------------------------- judges


# --------------------------------------------------------------------------- figures and tables


def _cross_figures(data: dict, out: Path) -> list:
    """Run-level figures that set the models side by side: K (layers needed together) for every model that
    ran a min_layers study, and the single-layer frontier for every model that ran a frontier study."""
    series: dict[str, dict] = {}
    walks: dict[str, dict] = {}
    for a in data["analyses"]:
        if a["kind"] == "min_layers" and a["model"] not in series:
            series[a["model"]] = a["result"]
        if a["kind"] == "frontier" and a["model"] not in walks:
            walks[a["model"]] = a["result"]
    figs = []
    if series:
        title = "Layers needed together (K), all models"
        caption = (
            "Best coherent flip rate against K, the number of consecutive layers steered at once, per model "
            "(Wilson 95% CIs); dashed: a random direction at the same K and alpha; dotted: the flip threshold. "
            "K* (in the legend) = the verdict's: the smallest K with a cell passing its tests."
        )
        figs.append(save(F.k_curve(series, title), out, "cross-model-k", "all models", title, caption))
    if walks:
        title = "Single-layer frontier, all models"
        caption = (
            "Per layer of the verdict's band, the best coherent flip rate any single-layer attack reached there "
            "(the walk to the coherence cliff and the ladder's rungs), Wilson 95% CIs; filled markers: layers the "
            "verdict excludes, hollow: not excluded; dotted: the flip threshold."
        )
        figs.append(save(F.frontier_curve(walks, title), out, "cross-model-frontier", "all models", title, caption))
    return figs


def _gate_of(store, run_id: str, model: str, stored: tuple | None) -> dict:
    """The coherence gate the run's labels come from (its version and relevance rule, from the `stored`
    thresholds artifact), and the re-judging that set them, if `csafety rejudge` did (then that rule was not fixed
    before generation)."""
    coherence = (stored or [None])[0] or {}
    rejudged = (store.get_artifact(run_id, model, "rejudged") or [None])[0]
    floor = coherence.get("min_relevance")
    return {"text": "v1" if floor is None else f"v2, answers relevant >= {floor:g} nats/token", "rejudged": rejudged}


def _decision(
    verdict: dict | None, data: dict, spreads: dict[str, dict] | None = None, gate_of: dict | None = None
) -> dict | None:
    """What decided the verdict, for a reader: the pre-registered rules, the judges that counted the flips, K*,
    and the deciding and best cells with read-by-hand samples of their answers and how many distinct answers
    their flips are (`answer_spreads`)."""
    evidence = (verdict or {}).get("evidence") or {}
    if "rules" not in evidence:
        return None
    judges = ", ".join(data["spec"].get("judges") or ["substring"])
    version = f" ({gate_of['text']})" if gate_of else ""
    gate = f"on{version}" if evidence.get("coherence_checked", True) else "off (flips not checked for coherence)"
    rejudged = (gate_of or {}).get("rejudged")
    cells: list[dict] = []
    for title, key in (("Deciding cell", "deciding_cell"), ("Best single-layer cell", "best_single"),
                       ("Best multi-layer cell", "best_multi")):  # fmt: skip
        c = evidence.get(key)
        if not c or any(c is not None and c.get("condition") == done["condition"] for done in cells):
            continue
        ctrl = c.get("control")
        cells.append(
            {
                "title": title,
                "condition": c["condition"],
                "rung": c.get("rung", "add"),
                "flip": T.rate(c["flip"]),
                "control": T.rate(ctrl["flip"]) + f" ({ctrl['condition']})" if ctrl else None,
                "samples": c.get("samples") or [],
                "spread": (spreads or {}).get(c["condition"]),
            }
        )
    return {
        "rules": evidence["rules"].get("text", []),
        "judges": f"{judges}; coherence gate {gate}",
        "k_star": T.k_star_text(evidence),
        "confirmation": T.confirmation_text(evidence.get("confirmation"), evidence["rules"].get("confirm_by")),
        "reference": T.reference_text(evidence.get("reference"), evidence["rules"].get("confirm_by")),
        "cells": cells,
        "rejudged": _rejudged_text(rejudged) if rejudged else None,
    }


def _as_read(chosen: dict | None, cells: list[dict]) -> dict | None:
    """The verdict's best cell (its flips as the verdict counts them: read where its answers at length were read)
    in the report's cell form; None when the verdict names no cell of `cells`."""
    match = next((c for c in cells if chosen and c["condition"] == chosen["condition"]), None)
    return None if match is None or chosen is None else {**match, "flip": chosen["flip"]}


def _rejudged_text(rejudged: dict) -> str:
    """What `csafety rejudge` changed after generation, and that every other rule was fixed before it."""
    changed = ", ".join(rejudged["changed"])
    if "coherence.min_relevance" not in rejudged["changed"]:
        return (
            f"Re-decided after generation: run {rejudged['from_run']} was generated under the same rules, then copied "
            f"by csafety rejudge under this spec ({changed} set after generation): blind readers' labels of the "
            "answers at length now confirm its flips, no label was changed. Every other rule was fixed before "
            "generation."
        )
    return (
        f"Re-judged after generation: run {rejudged['from_run']} was generated and labelled under the coherence "
        f"gate v1, then re-labelled by csafety rejudge under this spec ({changed} set after its answers were read); "
        f"{rejudged['measured']} answers measured, {rejudged['off_topic']} now off-topic. Every other rule was fixed "
        "before generation."
    )


READABLE_AUC = 0.95  # a direction is "readable" where its projection separates held-out prompts this well
STEERABLE = {"liquid": "yes: one layer", "crystallized": "multi-layer only", "immune": "no"}


def _readable_steerable(analyses: list[dict], verdict: dict | None) -> dict:
    """The seed's two questions per model: can the refusal direction be read (held-out projection AUC), and can
    steering control behaviour (from the verdict), plus K*, the number of layers that must be steered together."""
    evidence = (verdict or {}).get("evidence") or {}
    readability = next((a["result"] for a in analyses if a["kind"] == "readability"), None)
    best_auc = max((r["projection_auc"] for r in readability["layers"]), default=None) if readability else None
    name = (verdict or {}).get("verdict")
    return {
        "k_star": T.k_star_text(evidence) if "k_star_ci" in evidence else "not decided",
        "projection_auc": best_auc,
        "readable": None if best_auc is None else best_auc >= READABLE_AUC,
        "steerable": STEERABLE.get(name or "", "undecided"),
    }


TABLES: dict[str, Callable[[str, str, dict], T.Table | list[T.Table]]] = {  # study kind -> its table(s)
    "layer_sweep": lambda m, s, r: T.sweep_table(m, s, r, "flip"),
    "multilayer": lambda m, s, r: T.sweep_table(m, s, r, "flip"),
    "transfer": lambda m, s, r: T.sweep_table(m, s, r, "flip"),
    "induction": lambda m, s, r: T.sweep_table(m, s, r, "induced"),
    "threshold": T.threshold_table,
    "controls": T.controls_table,
    "sign": T.sign_table,
    "readability": T.readability_table,
    "min_layers": T.min_layers_table,
    "frontier": lambda m, s, r: [T.frontier_table(m, s, r), T.ladder_table(m, s, r)],
    "ablation": T.ablation_table,
    "angular": T.angular_table,
    "subspace": T.subspace_table,
    "selection": T.candidates_table,
}


def _tables(report: ModelReport, analyses: list[dict]) -> None:
    model = report.model
    for a in analyses:
        table = TABLES.get(a["kind"])
        if table is not None:
            made: T.Table | list[T.Table] = table(model, a["study"], a["result"])
            report.tables.extend(made if isinstance(made, list) else [made])
    if report.agreement:
        report.tables.append(T.agreement_table(model, report.agreement))
        shown = T.disagreement_table(model, report.agreement)
        if shown is not None:
            report.tables.append(shown)


# --------------------------------------------------------------------------- examples


# --------------------------------------------------------------------------- warnings


def _findings(
    model: str,
    analyses: list[dict],
    cells: dict[str, dict],
    steered: list[dict],
    base: dict | None,
    verdict: dict | None,
    agreement: dict | None,
    data: dict,
) -> list[Finding]:
    out: list[Finding] = []
    floor = ((verdict or {}).get("evidence") or {}).get("floor", (data["spec"].get("verdict") or {}).get("floor", 0.2))
    if base and base.get("rate") is not None and base["rate"] < floor:
        out.append(
            Finding(
                "warning",
                model,
                "floor effect",
                f"baseline harmful refusal {T.rate(base)} is below the floor of {floor:.0%}: the model barely "
                "refuses unsteered, so flip rates are undefined or rest on a handful of prompts",
            )
        )
    all_cells = [c for c in cells.values() if c["layers"]]
    small = [c for c in all_cells if c["n"] < MIN_N]
    if small:
        out.append(
            Finding(
                "warning",
                model,
                "underpowered",
                f"{len(small)} of {len(all_cells)} steered cells have n < {MIN_N} prompts (underpowered): "
                f"read their rates as anecdotes (smallest n = {min(c['n'] for c in small)})",
            )
        )
    thin = [c for c in steered if c.get("flip") and 0 < c["flip"]["n"] < MIN_N and c["n"] >= MIN_N]
    if thin:
        out.append(
            Finding(
                "note",
                model,
                "underpowered",
                f"{len(thin)} cells have n >= {MIN_N} prompts but fewer than {MIN_N} baseline refusals, the flip "
                "rate's denominator",
            )
        )
    if base and base.get("n", 0) and base["n"] < MIN_N:
        out.append(Finding("warning", model, "underpowered", f"the baseline rests on n = {base['n']} < {MIN_N}"))
    if agreement and agreement["kappa"] < KAPPA_BOUND:
        out.append(
            Finding(
                "warning",
                model,
                "judge disagreement",
                f"substring judge vs first-token score: Cohen's κ = {agreement['kappa']:.2f} < {KAPPA_BOUND} over "
                f"{agreement['n']} responses ({agreement['percent_agreement']:.0f}% raw agreement): check the judges "
                "on a sample by hand before trusting the rates",
            )
        )
    bypasses = sum(c.get("incoherent_bypasses") or 0 for c in steered)
    if bypasses:
        with_any = sum(1 for c in steered if c.get("incoherent_bypasses"))
        out.append(
            Finding(
                "note",
                model,
                "incoherent bypasses",
                f"{bypasses} incoherent 'bypasses' (compliance without coherent text) across {with_any} cells "
                "were excluded from the flip counts (they still count in raw compliance)",
            )
        )
    undecided = sum(c.get("undecided") or 0 for c in cells.values())
    if undecided:
        out.append(Finding("note", model, "undecided", f"{undecided} undecided verdicts are left out of every rate"))
    for a in analyses:
        if a["kind"] == "sign":
            ok = a["result"].get("equivalent")
            where = "" if a["study"] == "sign" else f"{a['study']}: "
            out.append(Finding("note" if ok else "warning", model, "sign", where + a["result"].get("note", "")))
    return out


# --------------------------------------------------------------------------- provenance


# --------------------------------------------------------------------------- rendering


def _context(data: dict, reports: list[ModelReport], findings: list[Finding], store_path: Path) -> dict:
    env = dict(data["environment"])
    report_env = {
        "crystallized-safety": __version__,
        "python": platform.python_version(),
        **{name: version(name) for name in ("numpy", "scipy", "matplotlib", "jinja2", "safetensors")},
    }
    timing = data["timing"]
    total_gen = sum(t["generation_seconds"] for t in timing)
    return {
        "title": f"crystallized-safety report: {data['run']['name']}",
        "run": data["run"],
        "store": str(store_path),
        "generated": iso(time.time()),
        "summary_table": T.summary_table([r.summary for r in reports]),
        "reports": reports,
        "findings": findings,
        "timing_table": T.timing_table(timing),
        "timing_total": round(total_gen, 1),
        "spec_yaml": data["spec_yaml"],
        "environment": env,
        "report_environment": report_env,
        "layer_convention": "layer i = output of decoder block i (0-based) = HF hidden_states[i + 1]",
    }


def _results(ctx: dict, data: dict) -> dict:
    return {
        "report": "crystallized-safety report",
        "report_version": 1,
        "tool_version": __version__,
        "generated": ctx["generated"],
        "store": ctx["store"],
        "run": data["run"],
        "verdicts": data["verdicts"],
        "summary": [{k: v for k, v in r.summary.items() if not k.startswith("_")} for r in ctx["reports"]],
        "warnings": [f.as_dict() for f in ctx["findings"]],
        "cross_figures": [
            {"id": f.id, "title": f.title, "caption": f.caption, "png": f.png.name, "svg": f.svg.name}
            for f in ctx.get("cross_figures", [])
        ],
        "models": [
            {
                "model": r.model,
                "figures": [
                    {"id": f.id, "title": f.title, "caption": f.caption, "png": f.png.name, "svg": f.svg.name}
                    for f in r.figures
                ],
                "skipped_figures": r.skipped,
                "tables": [t.as_dict() for t in r.tables],
                "agreement": r.agreement,
                "examples": r.examples,
                "provenance": r.provenance,
            }
            for r in ctx["reports"]
        ],
        "analyses": data["analyses"],
        "timing": data["timing"],
        "environment": {"run": ctx["environment"], "report": ctx["report_environment"]},
        "spec_yaml": data["spec_yaml"],
    }
