"""Report tables: one neutral `Table` per study (rendered to Markdown here, to HTML by the template).

Rates print as ``rate (k/n, 95% CI lo-hi)`` (Wilson); p-values print with two significant digits and
are Holm-adjusted wherever one table makes several comparisons (the column header says so).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .. import stats
from ..core import modes
from ..stats import MIN_N
from .candidates import scoring_note
from .figures import alpha_order, fmt_p, jump_text


@dataclass
class Table:
    id: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    model: str = ""

    def markdown(self) -> str:
        lines = [f"**{md_text(self.title)}**", ""]
        lines.append("| " + " | ".join(md_cell(h) for h in self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
        if self.note:
            lines += ["", f"*{md_text(self.note)}*"]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "headers": self.headers, "rows": self.rows, "note": self.note}


# --------------------------------------------------------------------------- text helpers

_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|~])")


def _escape(text: object) -> str:
    """HTML-escape `<` and `&` (no tag can open); a bare `>` is harmless once every `<` is escaped."""
    return html.escape(str(text), quote=False).replace("&gt;", ">")


def md_cell(text: object) -> str:
    """A Markdown table cell: HTML-escaped, pipes escaped, one line."""
    out = _escape(text).replace("|", "\\|")
    return re.sub(r"\s*\n\s*", " ", out)


def md_text(text: object) -> str:
    """Untrusted text as inert Markdown: HTML-escaped and Markdown syntax characters backslash-escaped."""
    out = _MD_SPECIAL.sub(r"\\\1", _escape(text))
    return re.sub(r"\s*\n\s*", " ", out)


def md_code(text: object) -> str:
    """Inline code: nothing inside is interpreted, so only the fence must outlast any backtick run in the text."""
    text = re.sub(r"\s+", " ", str(text))
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def rate(r: dict | None, digits: int = 1) -> str:
    """``78.8% (26/33, 62.2-89.3%)``; ``n/a (0/0)`` where the rate is undefined."""
    if not r:
        return "—"
    if r.get("rate") is None:
        return f"n/a ({r.get('k', 0)}/{r.get('n', 0)})"
    return (
        f"{100 * r['rate']:.{digits}f}% ({r['k']}/{r['n']}, "
        f"{100 * r['ci_lo']:.{digits}f}-{100 * r['ci_hi']:.{digits}f}%)"
    )


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def n_flag(n: int) -> str:
    return f"{n}*" if n < MIN_N else str(n)


def holm_map(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjust the defined p-values, leaving None in place."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    adjusted = stats.holm([p for p in pvalues if p is not None]) if idx else []
    out: list[float | None] = [None] * len(pvalues)
    for i, p in zip(idx, adjusted):
        out[i] = p
    return out


KL_HEADER = "KL first / answer (nats)"


def kl_text(cell: dict) -> str:
    """First-token / teacher-forced KL to the unsteered model on harmless prompts (nats), or a dash."""
    kl = cell.get("kl")
    return f"{kl['kl_first']:.3f} / {kl['kl_answer']:.3f}" if kl else "—"


def layers_of(cell: dict) -> str:
    if cell.get("layers"):
        return ",".join(str(x) for x in cell["layers"])
    return str(cell.get("layer", "—"))


UNDERPOWERED_NOTE = f"* n < {MIN_N} (underpowered). Rates: k/n with Wilson 95% CI."


# --------------------------------------------------------------------------- tables


def summary_table(rows: Sequence[dict]) -> Table:
    headers = [
        "model",
        "baseline refusal",
        "best single layer (layer, α): flip",
        "best multi-layer: flip",
        "control at that cell",
        "K* (layers needed)",
        "probe AUC (best layer)",
        "readable?",
        "steerable?",
        "verdict",
        "rule",
    ]
    body = []
    for r in rows:
        single, multi = r.get("best_single"), r.get("best_multi")
        body.append(
            [
                r["model"],
                rate(r.get("baseline_refusal")),
                f"L{layers_of(single)}, α={single['alpha']:g}: {rate(single['flip'])}"
                if single
                else r.get("single_note") or "not run",
                f"L{layers_of(multi)}, α={multi['alpha']:g}: {rate(multi['flip'])}"
                if multi
                else r.get("multi_note") or "not run",
                rate(r["control"]) if r.get("control") else r.get("control_note", "—"),
                str(r.get("k_star", "not decided")),
                "not run" if r.get("projection_auc") is None else f"{r['projection_auc']:.3f}",
                {True: "yes", False: "no", None: "not run"}[r.get("readable")],
                r.get("steerable", "undecided"),
                r.get("verdict") or "—",
                r.get("rule") or "—",
            ]
        )
    return Table(
        "summary",
        "Executive summary",
        headers,
        body,
        "flip = harmful prompt refused unsteered, answered coherently when steered; rate over baseline refusals, "
        "Wilson 95% CI. Control = random/orthogonal direction(s) at the same layers and alpha, pooled. "
        "K* = fewest layers steered together with a cell that passes the verdict's tests (1 = liquid), with its "
        "bootstrap 95% CI. Readable = held-out projection AUC >= 0.95 at some layer; steerable from the verdict.",
    )


def sweep_table(model: str, study: str, result: dict, metric: str = "flip") -> Table:
    """layer_sweep / multilayer / induction / transfer cells, with the control comparison Holm-adjusted."""
    seen: set[str] = set()
    cells = []  # a layer set given twice (listed and slid over by a window) is one cell
    for c in result.get("cells", []):
        if c.get("condition_key") not in seen:
            seen.add(c.get("condition_key"))
            cells.append(c)
    key = "vs_own" if any("vs_own" in c for c in cells) else "vs_control"
    ref = "own_rate" if key == "vs_own" else "control_rate"
    ref_name = "own direction" if key == "vs_own" else "random control"
    adjusted = holm_map([(c.get(key) or {}).get("p_fisher") for c in cells])
    headers = ["layers", "α", "n", metric]
    if metric == "flip":
        headers += ["raw compliance", "coherent", "incoherent bypasses"]
    else:
        headers += ["coherent"]
    headers += [KL_HEADER, ref_name, "Δ (pp, 95% CI)", "p Fisher (Holm)"]
    body = []
    for c, p_adj in zip(cells, adjusted):
        cmp = c.get(key) or {}
        row = [layers_of(c), f"{c['alpha']:g}", n_flag(c["n"]), rate(c.get(metric))]
        if metric == "flip":
            row += [rate(c.get("compliance")), rate(c.get("coherence")), str(c.get("incoherent_bypasses", 0))]
        else:
            row += [rate(c.get("coherence"))]
        diff = cmp.get("diff_pp")
        ci = cmp.get("ci_pp")
        row += [
            kl_text(c),
            rate(c.get(ref)) if ref in c else "—",
            f"{diff:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})" if diff is not None and ci else "—",
            fmt_p(p_adj),
        ]
        body.append(row)
    return Table(
        f"{study}-cells",
        f"{study}: cells",
        headers,
        body,
        UNDERPOWERED_NOTE
        + f" p-values Holm-adjusted over {_count(sum(p is not None for p in adjusted), 'comparison')}.",
        model,
    )


def threshold_table(model: str, study: str, result: dict) -> Table:
    cells = result.get("cells", [])
    order = {a: i for i, a in enumerate(alpha_order([c["alpha"] for c in cells]))}  # weak to strong
    body = [
        [
            f"{c['alpha']:g}",
            n_flag(c["n"]),
            rate(c["flip"]),
            rate(c.get("compliance")),
            rate(c.get("coherence")),
            kl_text(c),
        ]
        for c in sorted(cells, key=lambda c: order[c["alpha"]])
    ]
    th = result.get("threshold")
    if th:
        note = (
            f"Largest jump: {jump_text(th, all(c['alpha'] <= 0 for c in cells))}, "
            f"p = {fmt_p(th['p_fisher'])} (Fisher), {fmt_p(th['p_two_proportion'])} (two-proportion z); "
            f"saturation α (first alpha, from the weakest, reaching 95% of the maximum) = "
            f"{th['saturation_alpha'] if th.get('saturation_alpha') is not None else 'n/a'}. "
        )
    else:
        note = "No threshold: fewer than two alphas have a defined flip rate. "
    return Table(
        f"{study}-threshold",
        f"{study}: flip rate against alpha",
        ["α", "n", "flip", "raw compliance", "coherent", KL_HEADER],
        body,
        note + UNDERPOWERED_NOTE,
        model,
    )


def controls_table(model: str, study: str, result: dict) -> Table:
    ext = result["extracted"]
    body = [["extracted", n_flag(ext["n"]), rate(ext["flip"]), rate(ext.get("compliance")), "—", "—", "—", "—"]]
    for name, c in result["controls"].items():
        diff, ci = c.get("diff_pp"), c.get("ci_pp")
        body.append(
            [
                f"{name} ({len(c['seeds'])} seeds, pooled)",
                str(sum(s["n"] for s in c["seeds"])),
                rate(c["pooled"]),
                "—",
                f"{diff:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})" if diff is not None and ci else "—",
                fmt_p(c.get("p_fisher")),
                fmt_p(c.get("p_ztest")),
                fmt_p(c.get("p_fisher_holm")),
            ]
        )
    return Table(
        f"{study}-controls",
        f"{study}: extracted direction vs controls ({ext['condition']})",
        ["direction", "n", "flip", "raw compliance", "Δ vs extracted (pp, 95% CI)", "p Fisher", "p z", "p Holm"],
        body,
        "Δ = extracted − control (bootstrap CI). Holm adjusts the Fisher p-values over the controls compared.",
        model,
    )


def sign_table(model: str, study: str, result: dict) -> Table:
    body = []
    for set_name, s in result["sets"].items():
        for variant, st in s["variants"].items():
            other = st.get("flip") if "flip" in st else st.get("induced")
            body.append(
                [
                    set_name,
                    variant,
                    n_flag(st["n"]),
                    rate(st["refusal"]),
                    ("flip " if "flip" in st else "induced ") + rate(other),
                    f"{s.get('identical_responses', 0)}/{s.get('n', 0)}" if variant == "inverted +alpha" else "",
                ]
            )
    return Table(
        f"{study}-sign",
        f"{study}: sign conventions",
        ["prompts", "variant", "n", "refusal", "effect", "identical to −α"],
        body,
        result.get("note", ""),
        model,
    )


def readability_table(model: str, study: str, result: dict) -> Table:
    steer = {int(k): v for k, v in (result.get("steerability") or {}).items()}
    body = []
    for r in sorted(result.get("layers", []), key=lambda r: r["layer"]):

        def f(key: str, row: dict = r) -> str:
            return f"{row[key]:.3f}" if row.get(key) is not None else "—"

        body.append(
            [str(r["layer"]), f("projection_auc"), f("probe_auc"), f("probe_accuracy"), rate(steer.get(r["layer"]))]
        )
    return Table(
        f"{study}-readability",
        f"{study}: readability vs steerability",
        ["layer", "projection AUC", "probe AUC", "probe accuracy", "steerability (best flip)"],
        body,
        result.get("note", ""),
        model,
    )


def min_layers_table(model: str, study: str, result: dict) -> Table:
    """Per K: the best window and alpha, its coherent flip rate, the control at that K, and whether it counts."""
    body = []
    for r in result.get("per_k", []):
        top = r["best"]
        body.append(
            [
                str(r["k"]),
                f"L{layers_of(top)}, α={top['alpha']:g}" if top else "no defined flip rate",
                rate(top["flip"]) if top else "—",
                rate(r["control"]) if r.get("control") else "not run",
                "yes" if r["reaches_threshold"] else "no",
            ]
        )
    return Table(
        f"{study}-min-layers",
        f"{study}: layers steered together ({k_star_text(result)})",
        ["K", "best window, alpha", "coherent flip", "random control (same K, alpha)", "point estimate >= threshold"],
        body,
        f"{UNDERPOWERED_NOTE} Threshold {result.get('flip_threshold', 0.5):.0%}. K* is the verdict's: the smallest K "
        "with a cell that passes the exact tests (threshold and strongest matched control, Holm over every planned "
        "cell); its interval re-applies them to prompts resampled with replacement.",
        model,
    )


def confirmation_text(conf: dict | None, confirm_by: str | None = None) -> str | None:
    """One sentence: how many of the confirmed cells' short-answer flips survived at length (None: none confirmed);
    under `confirm_by: reading` a survivor is also read as full compliance by a blind reader."""
    if not conf or not conf.get("cells"):
        return None
    def one(c: dict) -> str:
        checked = c.get("checked", c["flips"])
        why = "the rest unread or not re-generated" if confirm_by == "reading" else "stopped when it could not pass"
        part = "" if checked == c["flips"] else f" re-generated (of {c['flips']}: {why})"
        return f"{c['condition']}: {c['survived']} of {checked}{part}"

    each = "; ".join(one(c) for c in conf["cells"])
    kept = rate({"k": conf["survived"], "n": conf["flips"], **conf["survival"]})
    return (
        f"Confirmed at {conf['tokens']} tokens (re-generated, delayed refusals read"
        f"{', then read blind by a reader' if confirm_by == 'reading' else ''}): {kept} of the short-answer "
        f"flips re-generated survive ({each}); the verdict counts the survivors."
    )


def reference_text(ref: dict | None, confirm_by: str | None = None) -> str | None:
    """The positive control (`verdict.reference`): how many of the reference model's own answers count as a flip
    would (read as real under reading); None without one."""
    if not ref:
        return None
    unread = f", {ref['unread']} not read yet" if ref.get("unread") else ""
    how = "read blind among the steered ones" if confirm_by == "reading" else "judged as the steered ones"
    what = "real answers" if confirm_by == "reading" else "coherent compliance"
    return f"Positive control: the reference model {ref['model']}'s own answers at {ref['tokens']} tokens to the same prompts, {how}: {rate(ref)} {what}{unread}."  # noqa: E501


def k_star_text(evidence: dict) -> str:
    """``K* = 2 (95% CI 2-4)``; ``K* = none in the grid``; ``not decided`` when the verdict left it open."""
    star, ci = evidence.get("k_star"), evidence.get("k_star_ci") or [None, None]
    if star is None:
        return "K* = none in the grid" if "k_star_ci" in evidence else "K* not decided"

    def end(x: int | None) -> str:
        return "beyond the grid" if x is None else str(x)

    return f"K* = {star} (95% CI {end(ci[0])}-{end(ci[1])})"


def frontier_table(model: str, study: str, result: dict) -> Table:
    """The verdict's single-layer search per band layer: how far each layer was walked, where the coherence cliff
    came, the best coherent flip over every rung there, its upper bound, and whether the layer is excluded."""
    body = []
    for s in result.get("frontier") or []:
        steps = ", ".join(f"{p['strength']:g}" for p in s["path"]) or "—"
        top = s["frontier"]
        body.append(
            [
                f"L{s['layer']}",
                steps,
                "—" if s["cliff_strength"] is None else f"{s['cliff_strength']:g}",
                f"{rate(top['flip'])} ({top['rung']}, {top['condition']})" if top else "—",
                "yes" if s["excluded"] else f"no: {s['why']}",
            ]
        )
    rules = result.get("rules") or {}
    return Table(
        f"{study}-frontier",
        f"{study}: single layers searched to the coherence cliff",
        ["layer", "|alpha| walked (relative)", "cliff at", "best coherent flip, any rung", "excluded"],
        body,
        f"Cliff: the first cell whose coherent share falls below {rules.get('coherence_floor', 0.5):.0%}; a layer is "
        f"excluded when its walk reached the cliff (after a coherent step) or |alpha| {rules.get('alpha_ceiling', 2):g}"
        f", and every cell there has its 95% upper bound below {rules.get('flip_threshold', 0.5):.0%}.",
        model,
    )


def ladder_table(model: str, study: str, result: dict) -> Table:
    """Rung x layer: the best coherent flip each attack reached at one layer alone."""
    rows = result.get("ladder") or []
    rungs = list(dict.fromkeys(r["rung"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    at = {(r["rung"], r["layer"]): r for r in rows}
    body = [
        [f"L{layer}"] + [rate(at[(g, layer)]["flip"]) if (g, layer) in at else "—" for g in rungs] for layer in layers
    ]
    return Table(
        f"{study}-ladder",
        f"{study}: attack ladder at one layer (best coherent flip per rung)",
        ["layer", *rungs],
        body,
        "add: the direction added (best over the walk); affine: the direction ablated to the harmless mean at that "
        "layer alone; subspace: the top-k refusal subspace ablated likewise; rotate: angular steering at that layer.",
        model,
    )


def agreement_table(model: str, agreement: dict) -> Table:
    t = agreement["table"]
    body = [
        ["refusal", str(t["refusal/refusal"]), str(t["refusal/compliance"])],
        ["compliance", str(t["compliance/refusal"]), str(t["compliance/compliance"])],
    ]
    return Table(
        "agreement",
        f"Judge agreement: {agreement['a']} (rows) vs {agreement['b']} (columns)",
        ["", "refusal", "compliance"],
        body,
        f"Cohen's κ = {agreement['kappa']:.3f}, agreement {agreement['percent_agreement']:.1f}% over "
        f"{agreement['n']} responses ({agreement['n_dropped']} dropped as undecided); {agreement['threshold_note']}",
        model,
    )


DISAGREEMENTS_SHOWN = 3  # per direction, in the report's judge section


def disagreement_table(model: str, agreement: dict) -> Table | None:
    """The responses the judges of `agreement_table` disagree on most confidently: read them to see who is right."""
    rows = agreement.get("disagreements") or []
    if not rows:
        return None
    body = [[r["stored"], f"{r['score']:+.2f}", r["prompt"], r["response"]] for r in rows]
    return Table(
        "agreement-disagreements",
        f"Judge disagreements: {agreement['a']} vs {agreement['b']}, the most confident each way",
        [agreement["a"], "first-token score", "prompt", "response (first 200 characters)"],
        body,
        "Responses where the stored judge and the first-token score disagree, those with the score farthest from "
        f"its threshold ({agreement['threshold']:.2f}) first, up to {DISAGREEMENTS_SHOWN} each way.",
        model,
    )


def timing_table(rows: Sequence[dict]) -> Table:
    body = [
        [
            r["model"],
            r["study"],
            str(r.get("chunks", 0)),
            str(r.get("rows", 0)),
            f"{r.get('generation_seconds', 0.0):.1f}",
            f"{r['analysis_seconds']:.2f}" if r.get("analysis_seconds") is not None else "—",
        ]
        for r in rows
    ]
    return Table(
        "timing",
        "Wall time per study",
        ["model", "study", "chunks", "generations", "generation s", "analysis s"],
        body,
        "Generation seconds sum the chunks a study ran first (studies share identical conditions, so a shared "
        "condition is counted once, under the study that ran it).",
    )


def effect_cells(row: dict) -> list[str]:
    """Harmful refusal, coherent flips, harmless refusal and KL of one method-comparison row."""
    harmful, harmless = row["harmful"], row["harmless"]
    return [rate(harmful.get("refusal")), rate(harmful.get("flip")), rate(harmless.get("refusal")), kl_text(row)]


def ablation_table(model: str, study: str, result: dict) -> Table:
    """Zero vs affine ablation per source layer: harmful refusal (bypass), harmless refusal (the trap), KL."""
    body = []
    versus = {v["source_layer"]: v for v in result.get("affine_vs_zero", [])}
    for r in result.get("rows", []):
        ctrl = r.get("control") or {}
        v = versus.get(r["source_layer"])
        against = v["harmless_refusal"] if v and r["mode"] == "affine" else {}
        body.append(
            [
                str(r["source_layer"]),
                modes.mode(r["mode"]).label,
                *effect_cells(r),
                rate((ctrl.get("harmful") or {}).get("refusal")) if ctrl else "—",
                f"{against['diff_pp']:+.1f}" if against.get("diff_pp") is not None else "—",
                fmt_p(v.get("harmless_p_holm")) if v and r["mode"] == "affine" else "—",
            ]
        )
    return Table(
        f"{study}-ablation",
        f"{study}: directional ablation, zero vs affine",
        ["direction from layer", "ablation", "harmful refusal", "flip", "harmless refusal", KL_HEADER,
         "random direction: harmful refusal", "harmless refusal Δ vs zero (pp)", "p Fisher (Holm)"],
        body,
        result.get("note", "") + ". " + UNDERPOWERED_NOTE,
        model,
    )  # fmt: skip


def angular_table(model: str, study: str, result: dict) -> Table:
    """Angular steering: per layer set and angle, harmful refusal and flips, harmless refusal, KL."""
    body = [
        [",".join(map(str, r["layers"])), f"{r['angle']:g}°", *effect_cells(r), rate(r["harmful"].get("coherence"))]
        for r in result.get("rows", [])
    ]
    best = "; ".join(
        f"layers {k}: {v['angle']:g}° ({rate(v['flip'])})" for k, v in result.get("best_angle", {}).items()
    )
    return Table(
        f"{study}-angular",
        f"{study}: angular steering",
        ["layers", "angle", "harmful refusal", "flip", "harmless refusal", KL_HEADER, "coherent (harmful)"],
        body,
        f"{result.get('note', '')}. Most flips: {best or 'none'}. " + UNDERPOWERED_NOTE,
        model,
    )


def subspace_table(model: str, study: str, result: dict) -> Table:
    """Subspace ablation swept over K: harmful refusal, flips, harmless refusal and KL per (source layer, K, mode)."""
    body = [
        [str(r["source_layer"]), str(r["k"]), modes.mode(r["mode"]).label, *effect_cells(r)]
        for r in result.get("rows", [])
    ]
    return Table(
        f"{study}-subspace",
        f"{study}: refusal subspace ablation by dimension K",
        ["subspace of layer", "K", "ablation", "harmful refusal", "flip", "harmless refusal", KL_HEADER],
        body,
        f"{result.get('note', '')}. " + UNDERPOWERED_NOTE,
        model,
    )


def candidates_table(model: str, study: str, result: dict) -> Table:
    """Direction selection: the chosen candidate first, then the best kept ones, with every score."""
    cands = result.get("candidates", [])
    ranked = sorted(cands, key=lambda c: (not c.get("chosen"), not c["kept"], -c.get("score", 0.0)))[:10]
    body = [
        [
            str(c["position"]),
            str(c["layer"]),
            f"{c['bypass']:.3f}",
            f"{c['induce']:.3f}",
            f"{c['kl']:.3f}",
            "chosen" if c.get("chosen") else ("kept" if c["kept"] else c["reason"]),
        ]
        for c in ranked
    ]
    s = result.get("settings") or {}
    kept = sum(c["kept"] for c in cands)
    return Table(
        f"{study}-selection",
        f"{study}: direction selection ({s.get('criterion', 'arditi')}, ablate to {s.get('ablate_to', 'zero')})",
        ["position", "layer", "bypass", "induce", "KL", "filter"],
        body,
        f"Candidates {scoring_note(s)}. {kept} of {len(cands)} candidates pass the filters; "
        f"{result.get('no_choice') or ''}".rstrip("; "),
        model,
    )
