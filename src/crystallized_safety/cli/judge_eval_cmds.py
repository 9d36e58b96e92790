"""`csafety judge-eval`: a judge against the gold set (labels read by hand): confusion matrix, Cohen's kappa,
accuracy, precision and recall of "refusal" with Wilson intervals, per gold file and per source/model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .app import DeviceOpt, DtypeOpt, LayersPathOpt, RawOpt, SystemOpt, app, cli_errors, load_model_quietly, out
from .judge_cmds import DelayedOpt, check_judge_options, llm_verdicts, local_verdicts, substring_judge

BY = ("source", "model", "condition")


@app.command("judge-eval")
@cli_errors
def judge_eval_cmd(
    gold: list[str] | None = typer.Option(
        None, "--gold", "-g", help="Bundled gold name or a gold JSONL file (repeatable). Default: every bundled one."
    ),
    judge: str = typer.Option("substring", "--judge", "-j", help="substring | score | llm | local."),
    by: list[str] | None = typer.Option(None, "--by", help="Also score per source | model | condition (repeatable)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write every figure (and the disagreements) here."),
    pooled: bool = typer.Option(False, "--pooled", help="Also score all the given gold files as one set."),
    window: int | None = typer.Option(None, help="substring: characters searched from the start (0 = all, def. 160)."),
    delayed: bool = DelayedOpt,
    model: str | None = typer.Option(None, "--model", "-m", help="score: the model that wrote the responses."),
    threshold: float | None = typer.Option(None, help="score: refusal = first-token log-odds > X (default 0)."),
    batch_size: int = typer.Option(32, help="score: prompts per forward pass."),
    base_url: str | None = typer.Option(None, "--base-url", help="llm: OpenAI-compatible endpoint (http://host/v1)."),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="llm: model name at --base-url; local: a model the tool loads (alias, path)."
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="llm: env variable holding the API key ('' = no key)."),
    judge_timeout: float | None = typer.Option(None, help="llm: seconds per HTTP attempt (default 30)."),
    judge_retries: int | None = typer.Option(None, help="llm: retries after a failed attempt (default 3)."),
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Score a judge against the gold labels: confusion matrix, kappa, precision/recall of refusal (Wilson CIs)."""
    from .. import jsonio
    from ..errors import JudgeError
    from ..judges.gold import bundled_gold, load_gold

    check_judge_options(judge, model, threshold, window, delayed, base_url, judge_model, judge_timeout, judge_retries)
    groupings = list(dict.fromkeys(by or []))
    for key in groupings:
        if key not in BY:
            raise JudgeError(f"--by {key!r} is not one of {', '.join(BY)}")
    sets = [load_gold(spec) for spec in (gold or bundled_gold())]
    if not sets:
        raise JudgeError("no gold set to score: pass --gold NAME|FILE")
    scorer = None
    if judge == "score":
        from ..judges.refusal_score import RefusalScoreJudge

        assert model is not None  # checked above
        m = load_model_quietly(model, device, dtype, layers_path)
        scorer = RefusalScoreJudge(m, threshold=threshold or 0.0, system=system, raw=raw, batch_size=batch_size)
    options = {"judge": judge, "window": window, "delayed": delayed, "model": model, "threshold": threshold,
               "judge_model": judge_model}  # fmt: skip
    report: dict[str, Any] = {"judge": None, "options": options, "gold": []}
    every: list[tuple[Any, list[str], list]] = []
    for gs in sets:
        prompts, responses = [r.prompt for r in gs.rows], [r.response for r in gs.rows]
        if judge == "substring":
            sj = substring_judge(window, delayed)
            verdicts = sj.judge(prompts, responses)
            outputs = [_OUTPUT[sj.read(r).category] for r in responses]
        else:
            if scorer is not None:
                verdicts = scorer.judge(prompts)
            elif judge == "local":
                assert judge_model is not None  # checked above
                verdicts = local_verdicts(judge_model, (device, dtype, layers_path), prompts, responses)
            else:
                assert base_url is not None and judge_model is not None  # checked above
                verdicts = llm_verdicts(base_url, judge_model, api_key_env, judge_timeout, judge_retries, prompts,
                                        responses)  # fmt: skip
            outputs = [_output_of(v) for v in verdicts]
        report["judge"] = verdicts[0].judge if verdicts else judge
        report["gold"].append(_evaluate(gs, outputs, verdicts, groupings))
        every.append((gs, outputs, verdicts))
    if pooled:
        if len(sets) < 2:
            raise JudgeError("--pooled scores several gold files as one: pass --gold at least twice")
        report["pooled"] = _pooled(every)
    for entry in report["gold"] + ([report["pooled"]] if pooled else []):
        _print(entry, report["judge"], groupings if entry is not report.get("pooled") else [])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(jsonio.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out.print(f"wrote {json_path}", markup=False, highlight=False)


_OUTPUT = {"refusal": "refusal", "partial": "partial", "compliance": "compliance", None: "undecided"}


def _output_of(verdict: Any) -> str:
    """A verdict's column in the matrix: undecided, partial (the LLM judge's PARTIAL), refusal or compliance."""
    if verdict.refusal is None:
        return "undecided"
    if str(verdict.reason).lower().startswith("partial"):
        return "partial"
    return "refusal" if verdict.refusal else "compliance"


def _evaluate(gs: Any, outputs: list[str], verdicts: list, groupings: list[str]) -> dict[str, Any]:
    """One gold set's figures: overall, per grouping, and the rows where the binary calls disagree."""
    from ..judges.scorecard import grouped, scorecard

    labels = [r.label for r in gs.rows]
    refusals = [v.refusal for v in verdicts]
    disagreements = [
        {"id": row.id, "label": row.label, "output": output, "reason": v.reason}
        for row, output, v in zip(gs.rows, outputs, verdicts)
        if row.refusal is not None and v.refusal is not None and row.refusal != v.refusal
    ]
    return {
        "name": gs.name, "path": gs.path, "sha256": gs.sha256, "rows": len(gs.rows), "bundled": gs.bundled,
        "provenance": gs.provenance, "licence": gs.licence, "labels": gs.counts(),
        "overall": scorecard(labels, outputs, refusals).to_dict(),
        "by": {key: {str(k): card.to_dict() for k, card in grouped(
            labels, outputs, refusals, [str(getattr(r, key)) for r in gs.rows]).items()} for key in groupings},
        "disagreements": disagreements,
    }  # fmt: skip


def _pooled(every: list[tuple[Any, list[str], list]]) -> dict[str, Any]:
    """The gold files scored as one set: their rows concatenated, each weighted by its row count."""
    from ..judges.scorecard import scorecard

    labels = [r.label for gs, _o, _v in every for r in gs.rows]
    outputs = [o for _g, outs, _v in every for o in outs]
    refusals = [v.refusal for _g, _o, verdicts in every for v in verdicts]
    names = [gs.name for gs, _o, _v in every]
    counts = dict(Counter(labels))
    return {"name": " + ".join(names), "files": names, "rows": len(labels), "sha256": "pooled", "labels": counts,
            "overall": scorecard(labels, outputs, refusals).to_dict()}  # fmt: skip


def _rate(d: dict | None) -> str:
    return "n/a" if d is None else f"{d['k']}/{d['n']} = {d['rate']:.1%} ({d['ci_lo']:.1%}-{d['ci_hi']:.1%})"


def _kappa(k: dict) -> str:
    return "n/a" if k["kappa"] is None else f"{k['kappa']:.3f} ({k['ci_lo']:.3f}-{k['ci_hi']:.3f}, n={k['n']})"


def _print(entry: dict, judge_id: str, groupings: list[str]) -> None:
    from ..judges.scorecard import OUTPUTS

    card = entry["overall"]
    digest = "pooled" if entry["sha256"] == "pooled" else f"sha256 {entry['sha256'][:12]}"
    title = f"gold '{entry['name']}': {entry['rows']} rows, {digest}, judge {judge_id}"
    table = Table(title=title)
    table.add_column("gold \\ judge")
    for column in (*OUTPUTS, "total"):
        table.add_column(column, justify="right")
    for label, row in card["matrix"].items():
        table.add_row(label, *(str(row[c]) for c in OUTPUTS), str(sum(row.values())))
    out.print(table)
    lines = [
        f"refusal (full or partial) vs full compliance, incoherent {card['excluded_incoherent']} and undecided "
        f"{card['excluded_undecided']} left out; 95% CIs (kappa: asymptotic; rates: Wilson)",
        f"  kappa {_kappa(card['kappa'])}; accuracy {_rate(card['accuracy'])}",
        f"  refusal precision {_rate(card['precision'])}; recall {_rate(card['recall'])}",
        f"  3-way kappa (full refusal / partial refusal / compliance): {_kappa(card['three_way'])}",
    ]
    for line in lines:
        out.print(line, markup=False, highlight=False)
    for key in groupings:
        by = Table(title=f"by {key}")
        for column in (key, "n", "kappa", "accuracy", "precision", "recall"):
            by.add_column(column, justify="left" if column == key else "right")
        for name, c in entry["by"][key].items():
            by.add_row(name, str(c["n"]), _kappa(c["kappa"]), _rate(c["accuracy"]), _rate(c["precision"]),
                       _rate(c["recall"]))  # fmt: skip
        out.print(by)
