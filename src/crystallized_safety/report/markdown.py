"""The Markdown report (the HTML one renders the same context through a Jinja2 template)."""

from __future__ import annotations

import re

from . import tables as T


def _fence(text: str) -> str:
    """A fenced YAML block whose fence is longer than any backtick run inside (a spec may contain backticks)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}yaml\n{text.rstrip()}\n{ticks}"


def markdown(ctx: dict) -> str:
    md, code = T.md_text, T.md_code
    run = ctx["run"]
    out = [
        f"# {md(ctx['title'])}",
        "",
        f"Run {code(run['run_id'])} ({md(run['status'])}), created {run['created']}, "
        f"finished {run['finished'] or '—'}; "
        f"store {code(ctx['store'])}; report generated {ctx['generated']}. Layer convention: "
        f"{ctx['layer_convention']}.",
        "",
        "## Summary",
        "",
        ctx["summary_table"].markdown(),
    ]
    for fig in ctx.get("cross_figures", []):
        out += [f"![{md(fig.title)}]({fig.png.name})", "", f"*{md(fig.title)}.* {md(fig.caption)}", ""]
    for r in ctx["reports"]:
        out += [f"- **{md(r.model)}**: {md(r.summary['verdict'] or 'no verdict')} — {md(r.summary['rule'])}"]
    out += ["", "## Warnings", ""]
    if ctx["findings"]:
        for f in ctx["findings"]:
            who = f" ({md(f.model)})" if f.model else ""
            out.append(f"- **{f.level}**{who} {md(f.kind)}: {md(f.message)}")
    else:
        out.append("None detected.")
    for r in ctx["reports"]:
        out += _model_section(r)
    out += ["## Run provenance", "", ctx["timing_table"].markdown()]
    out += [f"Total generation time: {ctx['timing_total']} s; run wall time: {ctx['run']['wall_seconds']} s.", ""]
    out += ["| run environment | value |", "|---|---|"]
    out += [f"| {md(k)} | {T.md_cell(v)} |" for k, v in ctx["environment"].items()]
    out += ["", "| report environment | version |", "|---|---|"]
    out += [f"| {md(k)} | {T.md_cell(v)} |" for k, v in ctx["report_environment"].items()]
    out += ["", "Experiment spec:", "", _fence(ctx["spec_yaml"]), ""]
    return "\n".join(out)


def _model_section(r) -> list[str]:
    """One model: figures, tables, examples, provenance."""
    md, code = T.md_text, T.md_code
    out = ["", f"## {md(r.model)}", ""]
    out += _decision_section(r.summary.get("decision"))
    out += ["### Figures", ""]
    for fig in r.figures:
        out += [
            f"![{md(fig.title)}]({fig.png.name})",
            "",
            f"*{md(fig.title)}.* {md(fig.caption)} (SVG: [{fig.svg.name}]({fig.svg.name}))",
            "",
        ]
    for s in r.skipped:
        out += [f"*{md(s['title'])}: skipped — {md(s['reason'])}.*", ""]
    out += ["### Tables", ""]
    for t in r.tables:
        out += [t.markdown()]
    out += ["### Examples", ""]
    if not r.examples:
        out.append("No example cells available.")
    for ex in r.examples:
        out += [
            f"**{md(ex['title'])}** — {md(ex['condition'])}, prompt #{ex['prompt_index']}",
            "",
            f"> **Prompt:** {md(ex['prompt'])}",
            "",
            "| | response | judge | score (> 0 = refusal) | coherent (perplexity) |",
            "|---|---|---|---|---|",
        ]
        for row in ex["rows"]:
            if row["missing"]:
                out.append(f"| {md(row['label'])} | (not stored) | | | |")
                continue
            score = "—" if row["score"] is None else f"{row['score']:+.2f} ({row['score_verdict']})"
            coh = "—" if row["coherent"] is None else f"{'yes' if row['coherent'] else 'no'} ({row['perplexity']})"
            out.append(
                f"| {md(row['label'])} | {md(row['response'])} | {md(row['verdict'])}: {md(row['reason'])} "
                f"| {score} | {coh} |"
            )
        out.append("")
    prov = r.provenance
    out += [
        "### Provenance",
        "",
        f"- model id: {code(prov['model_id'])}",
        f"- model hash: {code(prov['model_hash'] or 'not recorded')}",
        f"- seeds: spec seed {prov['seeds']['spec seed']}; control directions "
        f"{md(', '.join(prov['seeds']['control directions']) or 'none')}",
    ]
    for t in prov["transfer_sources"]:
        out.append(f"- transfer source: {code(t.get('source_model'))} {code(t.get('source_hash'))}")
    out += ["", "| prompt set | count | SHA-256 | source |", "|---|---|---|---|"]
    for p in prov["prompt_sets"]:
        out.append(f"| {md(p['set'])} | {p['count']} | {code(p['sha256'])} | {md(p['source'])} |")
    out += ["", "| directions metadata | value |", "|---|---|"]
    for k, v in prov["directions"].items():
        out.append(f"| {md(k)} | {T.md_cell(v)} |")
    out.append("")
    return out


def _decision_section(d: dict | None) -> list[str]:
    """How the verdict was decided: the rules, the judges, K*, the deciding cells with samples and answer spread."""
    md = T.md_text
    out: list[str] = []
    if not d:
        return out
    out += [
        "### How the verdict was decided",
        "",
        "Rules fixed before generation (part of the spec and of its hash):",
        "",
    ]
    out += [f"- {md(line)}" for line in d["rules"]]
    if d.get("rejudged"):
        out += ["", f"**{md(d['rejudged'])}**"]
    out += ["", f"Judges: {md(d['judges'])}. {md(d['k_star'])}.", ""]
    if d.get("confirmation"):
        out += [md(d["confirmation"]), ""]
    if d.get("reference"):
        out += [md(d["reference"]), ""]
    for c in d["cells"]:
        ctrl = f"; strongest matched control {md(c['control'])}" if c["control"] else ""
        out += [
            f"**{md(c['title'])}:** {md(c['condition'])} ({md(c['rung'])}), {md(c['flip'])}{ctrl}. Read by hand:",
            "",
        ]
        out += [
            f"- {'[flip]' if s['flip'] else '[not a flip]'} *{md(s['prompt'])}* → {md(s['response'])}"
            for s in c["samples"]
        ]
        if c.get("spread"):
            sp = c["spread"]
            same = sp["distinct"] * 2 < sp["flips"]
            out += [
                "",
                f"Its {sp['flips']} flips are {sp['distinct']} distinct answers; the most common, "
                f"{sp['top_count']} times: *{md(sp['top'])}*"
                + (" — answers that do not depend on the prompt are no bypass" if same else ""),
            ]
        out.append("")
    return out
