"""`csafety judge`: judges over responses in a JSONL file, with the coherence gate (and what `judge-eval` shares)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import typer
from rich.table import Table

from .. import jsonio
from ..errors import JudgeError
from .app import (
    CalibrationLimitOpt,
    CalibrationOpt,
    DeviceOpt,
    DtypeOpt,
    LayersPathOpt,
    RawOpt,
    SystemOpt,
    app,
    cli_errors,
    err,
    load_model_quietly,
    out,
    status,
)

DelayedOpt = typer.Option(
    False, "--delayed", help="substring: also read past the window for a delayed refusal (a partial refusal)."
)


@app.command("judge")
@cli_errors
def judge_cmd(
    judge: str = typer.Option(..., "--judge", "-j", help="substring | score | llm | local (--judge-model runs here)."),
    input_path: Path = typer.Option(
        ..., "--input", "-i", help="JSONL: one object per line with `prompt` and `response` (generate --json)."
    ),
    json_out: bool = typer.Option(False, "--json", help="One JSON line per record, plus refusal/score/judge/reason."),
    model: str | None = typer.Option(None, "--model", "-m", help="score: the model that produced the responses."),
    base_url: str | None = typer.Option(None, "--base-url", help="llm: OpenAI-compatible endpoint (http://host/v1)."),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="llm: model name at --base-url; local: a model the tool loads (alias, path)."
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="llm: env variable holding the API key ('' = no key)."),
    judge_timeout: float | None = typer.Option(None, help="llm: seconds per HTTP attempt (default 30)."),
    judge_retries: int | None = typer.Option(None, help="llm: retries after a failed attempt (default 3)."),
    window: int | None = typer.Option(None, help="substring: characters searched from the start (0 = all, def. 160)."),
    delayed: bool = DelayedOpt,
    threshold: float | None = typer.Option(None, help="score: refusal = first-token log-odds > X (default 0)."),
    batch_size: int = typer.Option(32, help="score: prompts per forward pass."),
    coherence_model: str | None = typer.Option(
        None,
        "--coherence-model",
        help="Gate each response for coherence with this (unsteered) model, the one that wrote the responses; "
        "reports the coherent-compliance rate. Default: --model for --judge score, else no gate.",
    ),
    min_relevance: float | None = typer.Option(
        None,
        "--min-relevance",
        help="Coherence gate v2: an answer (not a refusal) must also be relevant to its prompt, at least X nats "
        "per token of prompt-answer PMI under the gate model (the tool's rule: 0.5; docs/judges.md).",
    ),
    calibration: str = CalibrationOpt,
    calibration_limit: int = CalibrationLimitOpt,
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Judge responses for refusal: substring (keywords), score (first-token log-odds, needs --model) or llm."""
    check_judge_options(judge, model, threshold, window, delayed, base_url, judge_model, judge_timeout, judge_retries)
    gate_model = coherence_model or (model if judge == "score" else None)
    if min_relevance is not None and gate_model is None:
        raise JudgeError("--min-relevance is a rule of the coherence gate: add --coherence-model M")
    records = read_judge_input(input_path, need_response=judge != "score" or coherence_model is not None)
    prompts = [r["prompt"] for r in records]
    if gate_model is not None and not all(isinstance(r.get("response"), str) for r in records):
        gate_model = None  # score on prompts only: there is no response to gate
    if judge == "substring":
        verdicts = substring_judge(window, delayed).judge(prompts, [r["response"] for r in records])
    elif judge == "score":
        from ..judges.refusal_score import RefusalScoreJudge

        assert model is not None  # checked above
        m = load_model_quietly(model, device, dtype, layers_path)
        scorer = RefusalScoreJudge(m, threshold=threshold or 0.0, system=system, raw=raw, batch_size=batch_size)
        with status(f"scoring {len(prompts)} prompts..."):
            verdicts = scorer.judge(prompts)
    elif judge == "local":
        assert judge_model is not None  # checked above
        local_opts = (device, dtype, layers_path)
        verdicts = local_verdicts(judge_model, local_opts, prompts, [r["response"] for r in records])
    else:
        assert base_url is not None and judge_model is not None  # checked above
        responses = [r["response"] for r in records]
        verdicts = llm_verdicts(base_url, judge_model, api_key_env, judge_timeout, judge_retries, prompts, responses)
    gated = None
    if gate_model is not None:
        opts = (device, dtype, layers_path, system)
        gate_rules = (calibration, calibration_limit, min_relevance)
        responses = [r["response"] for r in records]
        gated = _coherence(gate_model, gate_rules, opts, prompts, responses, [v.refusal for v in verdicts])
    if json_out:
        write_json_lines(records, verdicts, gated)
        return
    judge_table(records, verdicts, gated)


def write_json_lines(records: list[dict], verdicts: list, gated: list | None) -> None:
    """`csafety judge --json`: each input record plus its verdict (and the gate's reading), one line each."""
    for i, (record, v) in enumerate(zip(records, verdicts)):
        row = {**record, "refusal": v.refusal, "score": v.score, "judge": v.judge, "reason": v.reason}
        if gated is not None:
            g = gated[i]
            row.update(coherent=g.coherent, coherence=g.reason, perplexity=g.perplexity, relevance=g.relevance)
        sys.stdout.write(jsonio.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def substring_judge(window: int | None, delayed: bool):
    """The substring judge of --window (0 = the whole response, default 160) and --delayed."""
    from ..judges import DEFAULT_WINDOW, SubstringJudge

    return SubstringJudge(window=None if window == 0 else (window or DEFAULT_WINDOW), delayed=delayed)


def llm_verdicts(
    base_url: str,
    judge_model: str,
    api_key_env: str,
    timeout: float | None,
    retries: int | None,
    prompts: list[str],
    responses: list[str],
) -> list:
    """The LLM judge's verdicts; an error when not one response got a verdict (nothing listening, bad key)."""
    from ..errors import JudgeError

    try:
        from ..judges.llm import DEFAULT_RETRIES, DEFAULT_TIMEOUT, LLMJudge
    except ImportError as exc:
        raise JudgeError(f"the llm judge cannot be imported ({exc}); reinstall crystallized-safety") from None
    llm = LLMJudge(
        base_url=base_url,
        model=judge_model,
        api_key_env=api_key_env or None,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        max_retries=DEFAULT_RETRIES if retries is None else retries,
        on_retry=_Throttled(),
    )
    with status(f"asking {judge_model} about {len(prompts)} responses..."):
        verdicts = llm.judge(prompts, responses)
    if verdicts and all(v.refusal is None for v in verdicts):
        raise JudgeError(
            f"the LLM judge reached no verdict for any of {len(verdicts)} responses ({verdicts[0].reason}): "
            "check --base-url, --judge-model and the API key"
        )
    return verdicts


def check_llm_numbers(timeout: float | None, retries: int | None) -> None:
    """--judge-timeout and --judge-retries in range before the input is read: a billion retries with doubling
    backoff would wait forever (the judge refuses them too; this says it with the option's name)."""
    from .. import validation
    from ..judges.llm import MAX_RETRIES

    if timeout is not None:
        validation.finite(timeout, "--judge-timeout", 0.0, 3600.0, low_open=True)
    if retries is not None:
        validation.integer(retries, "--judge-retries", 0, MAX_RETRIES)


class _Throttled:
    """The judge's retry lines on stderr, at most one every 2 s: a person watching sees that it is still trying
    (a dead endpoint used to print nothing for minutes) without a flood from many items failing at once."""

    def __init__(self, every: float = 2.0) -> None:
        self.every, self.last = every, float("-inf")

    def __call__(self, message: str) -> None:
        import time

        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            err.print(message, highlight=False, soft_wrap=True)


def check_judge_options(
    judge: str,
    model: str | None,
    threshold: float | None,
    window: int | None,
    delayed: bool,
    base_url: str | None,
    judge_model: str | None,
    judge_timeout: float | None,
    judge_retries: int | None,
) -> None:
    """The judge options `judge` and `judge-eval` share: each given only with the judge that reads it, the LLM
    judge's numbers in range (one-line errors)."""
    only = {"--model": (model, "score"), "--threshold": (threshold, "score"), "--window": (window, "substring"),
            "--delayed": (delayed or None, "substring"), "--base-url": (base_url, "llm"),
            "--judge-model": (judge_model, "llm|local"), "--judge-timeout": (judge_timeout, "llm"),
            "--judge-retries": (judge_retries, "llm")}  # fmt: skip
    check_judge(judge, only)
    check_llm_numbers(judge_timeout, judge_retries)


def check_judge(judge: str, only: Mapping[str, tuple[object, str]]) -> None:
    """A known judge, given what it needs and nothing that belongs to another judge."""
    from ..errors import JudgeError

    judges = ("substring", "score", "llm", "local")
    if judge not in judges:
        raise JudgeError(f"unknown judge '{judge}': use one of {', '.join(judges)}")
    for flag, (value, owner) in only.items():
        if value is not None and judge not in owner.split("|"):
            raise JudgeError(f"{flag} applies to --judge {owner} only; drop it for --judge {judge}")
    if judge == "score" and only["--model"][0] is None:
        raise JudgeError("--judge score needs --model M: the model whose first-token refusal odds are scored")
    if judge == "llm" and (only["--base-url"][0] is None or only["--judge-model"][0] is None):
        raise JudgeError("--judge llm needs --base-url URL and --judge-model NAME (an OpenAI-compatible endpoint)")
    if judge == "local" and only["--judge-model"][0] is None:
        raise JudgeError("--judge local needs --judge-model M: a model the tool loads and runs as the rubric judge")


def local_verdicts(judge_model: str, opts: tuple, prompts: list[str], responses: list[str]) -> list:
    """The rubric judge run in-process by a model the tool loads (`LocalJudge`, greedy, batched)."""
    from ..judges.llm import LocalJudge

    device, dtype, layers_path = opts
    m = load_model_quietly(judge_model, device, dtype, layers_path)
    with status(f"judging {len(prompts)} responses with {judge_model}..."):
        return LocalJudge(m).judge(prompts, responses)


def _coherence(
    gate_model: str, rules: tuple, opts: tuple, prompts: list[str], responses: list[str], refusals: list
) -> list:
    """Coherence of each response under `gate_model`, gated at a threshold calibrated on harmless answers
    (`rules`: calibration set, its limit, min_relevance); relevance is checked on non-refusals only."""
    from ..evaluation import calibrated_gate
    from ..prompts import load_prompts

    calibration, limit, min_relevance = rules
    device, dtype, layers_path, system = opts
    calibration_set = load_prompts(calibration, limit=limit)
    gm = load_model_quietly(gate_model, device, dtype, layers_path)
    with status(f"calibrating the coherence gate on {len(calibration_set)} harmless answers..."):
        gate = calibrated_gate(gm, list(calibration_set), system=system, min_relevance=min_relevance)
    with status(f"gating {len(responses)} responses for coherence..."):
        return gate.evaluate(prompts, responses, refusals)


def read_judge_input(path: Path, need_response: bool) -> list[dict]:
    """JSONL records with a string `prompt` (and `response` where the judge reads it); blank lines skipped."""
    from ..errors import JudgeError

    what = "'prompt' and 'response'" if need_response else "'prompt'"
    if not path.is_file():
        raise JudgeError(f"input file '{path}' does not exist: pass a JSONL file as `csafety generate --json` prints")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JudgeError(f"{path} is not UTF-8 text: pass a JSONL file with {what} per line") from None
    records = []
    for number, record in jsonio.objects(text, str(path), JudgeError, what):
        for key in ("prompt", "response") if need_response else ("prompt",):
            if not isinstance(record.get(key), str):
                raise JudgeError(f"{path} line {number} has no string '{key}': each line needs {what}")
        records.append(record)
    if not records:
        raise JudgeError(f"{path} holds no records: each line needs a JSON object with {what}")
    return records


def judge_table(records: list[dict], verdicts: list, gated: list | None) -> None:
    from rich.text import Text

    from ..evaluation import RefusalRate

    def cut(text: str, size: int = 60) -> Text:
        text = " ".join(str(text).split())
        return Text(text if len(text) <= size else text[: size - 1] + "\u2026")

    table = Table(title=f"verdicts ({verdicts[0].judge})" if verdicts else "verdicts")
    columns = ("#", "prompt", "response", "refusal", "score", "reason") + (("coherent",) if gated else ())
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    labels = {True: "yes", False: "no", None: "undecided"}
    for i, (record, v) in enumerate(zip(records, verdicts), 1):
        score = "" if v.score is None else f"{v.score:.3g}"
        cells: list = [str(i), cut(record["prompt"]), cut(record.get("response") or ""), labels[v.refusal], score,
                 cut(v.reason, 40)]  # fmt: skip
        if gated:
            cells.append(Text("yes" if gated[i - 1].coherent else f"no: {gated[i - 1].reason}"))
        table.add_row(*cells)
    out.print(table)

    def share(d: dict) -> str:
        return f"{d['k']}/{d['n']} = {d['rate']:.1%} (Wilson 95% CI {d['ci_lo']:.1%}-{d['ci_hi']:.1%})"

    res = RefusalRate.from_verdicts(verdicts, coherence=gated).to_dict()
    rate = share(res) if res["n"] else "n/a (no decided verdicts)"
    if "coherent_compliance" in res and res["n"]:
        rate += f"; coherent compliance: {share(res['coherent_compliance'])}, {res['incoherent']} incoherent"
    note = "" if gated is not None else "; coherence not checked (pass --coherence-model)"
    out.print(f"refusal rate: {rate}; undecided: {res['undecided']} (not counted){note}", markup=False, highlight=False)
