"""`csafety`: a thin Typer front end. Parses, calls the library, prints with rich.

Every user error is a CrystallizedSafetyError: printed as one line on stderr, exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CrystallizedSafetyError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Map how refusal is built into open-weight LLMs: extract, steer, judge, conclude.",
)
out = Console()
err = Console(stderr=True)


def _quiet_libraries() -> None:
    """Library chatter off through the environment, so that no heavy import happens before input is checked."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this too


def cli_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except CrystallizedSafetyError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ModelOpt = typer.Option(..., "--model", "-m", help="Registry alias, local directory, .gguf file or hub id.")
DeviceOpt = typer.Option("auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N.")
DtypeOpt = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
LayersPathOpt = typer.Option(None, "--layers-path", help="Override the decoder-layer lookup, e.g. model.layers.")
RawOpt = typer.Option(False, "--raw", help="Feed prompts as plain text (no chat template).")
SystemOpt = typer.Option(None, "--system", help="System prompt (merged into the user turn where no system role).")
WhereOpt = typer.Option(
    None, "--where", help="Keep rows where COLUMN=VALUE (repeatable: AND across columns, OR within one)."
)
DedupeOpt = typer.Option(False, "--dedupe", help="Keep the first of repeated prompts (and say how many were dropped).")
CalibrationOpt = typer.Option(
    "bundled:harmless:extract", help="Harmless prompts whose greedy answers calibrate the coherence gate."
)
CalibrationLimitOpt = typer.Option(64, help="Calibrate the coherence gate on the first N of --calibration.")


def _prompts(source: str, column: str | None, where: list[str] | None, dedupe: bool, limit: int | None = None):
    """A prompt set from the command line's options; says how many duplicates --dedupe dropped."""
    from .prompts import load_prompts

    filters = {} if source.startswith("bundled:") else {"column": column, "where": where, "dedupe": dedupe}
    found = load_prompts(source, limit=limit, **filters)
    if found.dropped_duplicates:
        err.print(f"note: {escape(source)}: dropped {found.dropped_duplicates} repeated prompts (--dedupe)")
    return found


def _load(model: str, device: str, dtype: str, layers_path: str | None):
    from .models import load_model, resolve_device_dtype
    from .precision import warn_if_emulated

    warning = warn_if_emulated(*reversed(resolve_device_dtype(device, dtype)))
    if warning:
        err.print(f"warning: {escape(warning)}", highlight=False, soft_wrap=True)
    with err.status(f"loading {escape(model)}..."):
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path)


@app.command("models")
@cli_errors
def models_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the model registry."""
    from dataclasses import asdict

    from .models import registry

    entries = registry()
    if json_out:
        for entry in entries.values():
            out.print_json(json.dumps(asdict(entry)))
        return
    # Narrow enough for an 80-column terminal: long sources fold, notes go below the table.
    table = Table(title="crystallized-safety model registry", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("alias", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("system", no_wrap=True)
    table.add_column("source (family: --json)", overflow="fold")
    for e in entries.values():
        table.add_row(e.alias, e.params or "", "yes" if e.system_role else "no", e.source)
    out.print(table)
    for e in entries.values():
        if e.notes:
            out.print(f"{e.alias}: {e.notes}", markup=False, highlight=False)


@app.command("extract")
@cli_errors
def extract_cmd(
    model: str = ModelOpt,
    harmful: str = typer.Option(
        ...,
        help="Harmful prompts: .txt (one per line), .csv, .json, .jsonl, a saved HF "
        "dataset, or bundled:harmful[:train|extract|eval].",
    ),
    harmless: str = typer.Option(..., help="Harmless prompts, same formats (bundled:harmless[:split])."),
    out_path: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    layers: str = typer.Option("all", help="'all' or comma-separated layer indices (0-based block outputs)."),
    position: str = typer.Option("last", help="last | mean | a negative offset into the post-instruction tokens."),
    method: str = typer.Option("mean_diff", help="mean_diff | pca | probe."),
    column: str | None = typer.Option(None, help="Column holding the prompt in .csv/.json/.jsonl files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Extract one refusal direction per layer (harmful - harmless, unit norm) in one batched pass."""
    harmful_set = _prompts(harmful, column, where, dedupe)
    harmless_set = _prompts(harmless, column, where, dedupe)
    if out_path.suffix != ".safetensors":
        raise CrystallizedSafetyError(f"--out must end in .safetensors, e.g. {out_path.with_suffix('.safetensors')}")
    from .directions import extract_directions  # heavy (torch): after the inputs are checked

    m = _load(model, device, dtype, layers_path)
    with err.status(f"extracting {len(harmful_set)} harmful + {len(harmless_set)} harmless prompts..."):
        bank = extract_directions(
            m,
            harmful_set,
            harmless_set,
            layers=layers,
            position=position,
            method=method,
            batch_size=batch_size,
            system=system,
            raw=raw,
        )
    bank.save(out_path)
    table = Table(title=f"{out_path} ({method}, position {position}; layer i = output of block i)")
    table.add_column("layer", justify="right")
    table.add_column("|mean diff|", justify="right")
    table.add_column("mean resid norm", justify="right")
    for row, layer in enumerate(bank.layers):
        table.add_row(str(layer), f"{float(bank.raw_norms[row]):.3f}", f"{float(bank.resid_norms[row]):.2f}")
    out.print(table)


@app.command("generate")
@cli_errors
def generate_cmd(
    model: str = ModelOpt,
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    prompts: str | None = typer.Option(
        None, "--prompts", help="Prompt file (.txt, .csv, .json, .jsonl) or bundled:KIND[:SPLIT]."
    ),
    column: str | None = typer.Option(None, help="Column holding the prompt in structured files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    directions: Path | None = typer.Option(None, help="Direction file (.safetensors, or a plain-tensor .pt)."),
    layer: list[int] | None = typer.Option(None, "--layer", "-l", help="Layer to steer (repeatable)."),
    alpha: float = typer.Option(0.0, help="Steering strength; -alpha removes refusal, +alpha induces it."),
    mode: str = typer.Option("add", help="add | ablate | ablate_add."),
    positions: str = typer.Option("all", help="all | prompt | generated."),
    alpha_unit: str = typer.Option("absolute", help="absolute | relative (x the layer's mean residual norm)."),
    ablate_to: str = typer.Option("zero", help="Ablation target projection: zero | harmless-mean."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    batch_size: int = typer.Option(32, help="Prompts per generate call (halves on out-of-memory)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0, help="Seed for sampling."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Generate (batched, greedy by default), optionally steered at one or more layers."""
    texts = list(prompt or [])
    if prompts is not None:
        texts += list(_prompts(prompts, column, where, dedupe))
    if not texts:
        raise CrystallizedSafetyError("no prompt given: pass --prompt TEXT or --prompts FILE")
    if (layer or alpha != 0.0 or mode != "add") and directions is None:
        raise CrystallizedSafetyError("--layer/--alpha/--mode need --directions FILE (from `csafety extract`)")
    if directions is not None and not layer:
        raise CrystallizedSafetyError("--directions needs at least one --layer L to steer")
    from .generation import generate  # heavy (torch): after the inputs are checked

    m = _load(model, device, dtype, layers_path)
    intervention = None
    if directions is not None:
        intervention = _intervention(m, directions, layer or [], alpha, mode, positions, alpha_unit, ablate_to)
    with err.status(f"generating {len(texts)} responses..."):
        results = generate(
            m,
            texts,
            intervention,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            system=system,
            raw=raw,
        )
    for g in results:
        if json_out:
            record = {
                "prompt": g.prompt,
                "response": g.response,
                "n_tokens": len(g.token_ids),
                "finished": g.finished,
                "model": model,
                "layers": layer or [],
                "alpha": alpha,
                "mode": mode if intervention else None,
            }
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.print(f"[bold]> {g.prompt}[/]", highlight=False)
            out.print(g.response + "\n", highlight=False, markup=False)
    sys.stdout.flush()


def _intervention(
    m, path: Path, layers: list[int], alpha: float, mode: str, positions: str, alpha_unit: str, ablate_to: str
):
    from .directions import DirectionBank
    from .steering import Intervention

    bank = DirectionBank.load(path)
    bank.check_model(m)
    for layer in layers:
        m.check_layer(layer)
    if ablate_to not in ("zero", "harmless-mean"):
        raise CrystallizedSafetyError(f"unknown --ablate-to '{ablate_to}': use zero or harmless-mean")
    norms = {layer: bank.resid_norm(layer) for layer in layers} if alpha_unit == "relative" else None
    targets = {layer: bank.harmless_projection(layer) for layer in layers} if ablate_to == "harmless-mean" else {}
    return Intervention(
        directions={layer: bank.direction(layer) for layer in layers},
        alpha=alpha,
        mode=mode,
        positions=positions,
        alpha_unit=alpha_unit,
        layer_norms=norms,
        ablate_to=targets,
    )


organism_app = typer.Typer(no_args_is_help=True, help="The refusal-tuned SmolLM2 model organism.")
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
@cli_errors
def organism_build_cmd(
    out_dir: Path | None = typer.Option(None, "--out", help="Copy the built organism here (default: cache only)."),
    seed: int = typer.Option(0, help="Training seed (same seed -> same model and verdicts)."),
    precision: str = typer.Option(
        "fp32",
        help="fp32 (the one organism, on every CPU), bf16 (autocast; fast only with native bf16, a different "
        "organism cached apart) or auto (bf16 where this CPU has it natively).",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cache holds one."),
) -> None:
    """Fine-tune SmolLM2-135M-Instruct on CPU into a model that refuses harmful requests."""
    import shutil

    from .organism import DEFAULT_NAME, Recipe, ensure_organism, load_card, organism_dir
    from .precision import detect, resolve
    from .progress import Reporter

    chosen, why = resolve(precision)
    cpu = detect()
    if chosen == "bf16" and not cpu.native_bf16:
        err.print(f"warning: {escape(cpu.reason)}: a bf16 build will be many times slower than fp32", soft_wrap=True)
    recipe = Recipe(seed=seed, precision=chosen)
    target = organism_dir(DEFAULT_NAME, recipe)
    if force and target.exists():
        shutil.rmtree(target)
    if not (target / "card.json").exists():
        _announce_build(recipe, f"{chosen} ({why}) on {cpu.summary()}")
    with Reporter(f"organism {target.name}") as reporter:
        path = ensure_organism(DEFAULT_NAME, recipe, progress=reporter)
    if out_dir is not None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise CrystallizedSafetyError(f"--out {out_dir} exists and is not empty: choose a new directory")
        shutil.copytree(path, out_dir, dirs_exist_ok=True)
        path = out_dir
    card = load_card(path)
    out.print((path / "README.md").read_text(), markup=False, highlight=False)
    out.print(f"organism at {path} (build {card['build_seconds']} s)", markup=False, highlight=False)


def _announce_build(recipe, where: str) -> None:
    """Before a first build: what it will cost on this machine (one timed training step, extrapolated)."""
    from .models import load_model
    from .organism import estimate_build_seconds

    err.print(f"no cached organism for this recipe: building it in {escape(where)}", highlight=False, soft_wrap=True)
    probe = load_model(recipe.base, device="cpu", dtype="float32")
    minutes = estimate_build_seconds(probe, recipe) / 60
    err.print(f"estimated build time on this machine: ~{minutes:.0f} min (once; then cached)", soft_wrap=True)


@app.command("eval-refusal")
@cli_errors
def eval_refusal_cmd(
    model: str = ModelOpt,
    prompts: str = typer.Option(..., "--prompts", help="Prompt file or bundled:KIND[:SPLIT]."),
    judge: str = typer.Option("substring", help="substring (more judges: `csafety judge`)."),
    column: str | None = typer.Option(None, help="Column holding the prompt in structured files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    limit: int | None = typer.Option(None, help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate per prompt (greedy)."),
    batch_size: int = typer.Option(32),
    coherence: bool = typer.Option(
        True, "--coherence/--no-coherence", help="Gate each response for coherence (gibberish is not compliance)."
    ),
    calibration: str = CalibrationOpt,
    calibration_limit: int = CalibrationLimitOpt,
    json_out: bool = typer.Option(
        False, "--json", help="One JSON line per prompt (response, verdict, coherence), then one with the rates."
    ),
    system: str | None = SystemOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Refusal rate of a model on a prompt set, with its Wilson 95% interval and the coherent-compliance rate."""
    from .prompts import load_prompts

    if judge != "substring":
        raise CrystallizedSafetyError(f"unknown judge '{judge}' for eval-refusal: use substring")
    prompt_set = _prompts(prompts, column, where, dedupe, limit)
    calibration_set = load_prompts(calibration, limit=calibration_limit) if coherence else None
    from .evaluation import calibrated_gate, refusal_rate  # heavy (torch): after the inputs are checked

    m = _load(model, device, dtype, layers_path)
    gate = None
    if calibration_set is not None:
        with err.status(f"calibrating the coherence gate on {len(calibration_set)} harmless answers..."):
            gate = calibrated_gate(
                m, list(calibration_set), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system
            )
    with err.status(f"generating and judging {len(prompt_set)} prompts..."):
        res = refusal_rate(
            m, list(prompt_set), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, gate=gate
        )
    if json_out:
        for row in res.records():
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = {
            "model": model,
            "prompts": prompts,
            "prompts_sha256": prompt_set.sha256,
            "judge": judge,
            "max_new_tokens": max_new_tokens,
            "coherence_thresholds": gate.thresholds.to_dict() if gate is not None and gate.thresholds else None,
            **res.to_dict(),
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        text = f"refusal rate of {model} on {prompts}: {res}"
        text += f", {res.undecided} undecided" if res.undecided else ""
        out.print(text if gate is not None else text + " (coherence not checked)", markup=False, highlight=False)


@app.command("serve")
@cli_errors
def serve_cmd(
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; the API has no auth)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_name: str | None = typer.Option(None, "--served-name", help="Model name clients send (default: --model)."),
    directions: Path | None = typer.Option(None, help="Direction file: serve the model steered."),
    layer: list[int] | None = typer.Option(None, "--layer", "-l", help="Layer to steer (repeatable)."),
    alpha: float = typer.Option(0.0, help="Steering strength; -alpha removes refusal, +alpha induces it."),
    mode: str = typer.Option("add", help="add | ablate | ablate_add."),
    positions: str = typer.Option("all", help="all | prompt | generated."),
    alpha_unit: str = typer.Option("absolute", help="absolute | relative (x the layer's mean residual norm)."),
    ablate_to: str = typer.Option("zero", help="Ablation target projection: zero | harmless-mean."),
    max_batch: int = typer.Option(8, help="Most concurrent requests run in one batched generate."),
    batch_window_ms: float = typer.Option(15.0, help="How long the batcher waits for more requests (ms)."),
    max_tokens_limit: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Serve a model (optionally steered) as an OpenAI-compatible chat API; runs until Ctrl-C."""
    from .serve import check_port, describe_intervention, serve

    if (layer or alpha != 0.0 or mode != "add") and directions is None:
        raise CrystallizedSafetyError("--layer/--alpha/--mode need --directions FILE (from `csafety extract`)")
    if directions is not None and not layer:
        raise CrystallizedSafetyError("--directions needs at least one --layer L to steer")
    check_port(host, port)
    m = _load(model, device, dtype, layers_path)
    intervention = None
    if directions is not None:
        intervention = _intervention(m, directions, layer or [], alpha, mode, positions, alpha_unit, ablate_to)
    name = served_name or model
    steering = describe_intervention(intervention)
    how = "unsteered" if steering is None else ", ".join(f"{k} {v}" for k, v in steering.items())
    out.print(f"serving {name} ({how}) at http://{host}:{port}/v1 - Ctrl-C to stop", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}: the API has no authentication", highlight=False)
    sys.stdout.flush()
    serve(
        m,
        host=host,
        port=port,
        model_name=name,
        intervention=intervention,
        max_batch=max_batch,
        batch_window=batch_window_ms / 1000,
        max_tokens_limit=max_tokens_limit,
    )


@app.command("judge")
@cli_errors
def judge_cmd(
    judge: str = typer.Option(..., "--judge", "-j", help="substring | score | llm."),
    input_path: Path = typer.Option(
        ..., "--input", "-i", help="JSONL: one object per line with `prompt` and `response` (generate --json)."
    ),
    json_out: bool = typer.Option(False, "--json", help="One JSON line per record, plus refusal/score/judge/reason."),
    model: str | None = typer.Option(None, "--model", "-m", help="score: the model that produced the responses."),
    base_url: str | None = typer.Option(None, "--base-url", help="llm: OpenAI-compatible endpoint (http://host/v1)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="llm: model name at --base-url."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="llm: env variable holding the API key ('' = no key)."),
    window: int | None = typer.Option(None, help="substring: characters searched from the start (0 = all, def. 160)."),
    threshold: float | None = typer.Option(None, help="score: refusal = first-token log-odds > X (default 0)."),
    batch_size: int = typer.Option(32, help="score: prompts per forward pass."),
    coherence_model: str | None = typer.Option(
        None,
        "--coherence-model",
        help="Gate each response for coherence with this (unsteered) model, the one that wrote the responses; "
        "reports the coherent-compliance rate. Default: --model for --judge score, else no gate.",
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
    from .errors import JudgeError
    from .judges import DEFAULT_WINDOW, SubstringJudge

    judges = ("substring", "score", "llm")
    if judge not in judges:
        raise JudgeError(f"unknown judge '{judge}': use one of {', '.join(judges)}")
    only = {"--model": (model, "score"), "--threshold": (threshold, "score"), "--window": (window, "substring"),
            "--base-url": (base_url, "llm"), "--judge-model": (judge_model, "llm")}  # fmt: skip
    for flag, (value, owner) in only.items():
        if value is not None and judge != owner:
            raise JudgeError(f"{flag} applies to --judge {owner} only; drop it for --judge {judge}")
    if judge == "score" and model is None:
        raise JudgeError("--judge score needs --model M: the model whose first-token refusal odds are scored")
    if judge == "llm" and (base_url is None or judge_model is None):
        raise JudgeError("--judge llm needs --base-url URL and --judge-model NAME (an OpenAI-compatible endpoint)")
    gate_model = coherence_model or (model if judge == "score" else None)
    records = _read_judge_input(input_path, need_response=judge != "score" or coherence_model is not None)
    prompts = [r["prompt"] for r in records]
    if gate_model is not None and not all(isinstance(r.get("response"), str) for r in records):
        gate_model = None  # score on prompts only: there is no response to gate
    if judge == "substring":
        verdicts = SubstringJudge(window=None if window == 0 else (window or DEFAULT_WINDOW)).judge(
            prompts, [r["response"] for r in records]
        )
    elif judge == "score":
        from .judges.refusal_score import RefusalScoreJudge

        m = _load(model, device, dtype, layers_path)
        scorer = RefusalScoreJudge(m, threshold=threshold or 0.0, system=system, raw=raw, batch_size=batch_size)
        with err.status(f"scoring {len(prompts)} prompts..."):
            verdicts = scorer.judge(prompts)
    else:
        try:
            from .judges.llm import LLMJudge
        except ImportError as exc:
            raise JudgeError(f"the llm judge cannot be imported ({exc}); reinstall crystallized-safety") from None
        llm = LLMJudge(base_url=base_url, model=judge_model, api_key_env=api_key_env or None)
        with err.status(f"asking {judge_model} about {len(prompts)} responses..."):
            verdicts = llm.judge(prompts, [r["response"] for r in records])
    gated = None
    if gate_model is not None:
        from .evaluation import calibrated_gate
        from .prompts import load_prompts

        calibration_set = load_prompts(calibration, limit=calibration_limit)
        gm = _load(gate_model, device, dtype, layers_path)
        with err.status(f"calibrating the coherence gate on {len(calibration_set)} harmless answers..."):
            gate = calibrated_gate(gm, list(calibration_set), system=system)
        with err.status(f"gating {len(records)} responses for coherence..."):
            gated = gate.evaluate(prompts, [r["response"] for r in records])
    if json_out:
        for i, (record, v) in enumerate(zip(records, verdicts)):
            row = {**record, "refusal": v.refusal, "score": v.score, "judge": v.judge, "reason": v.reason}
            if gated is not None:
                row.update(coherent=gated[i].coherent, coherence=gated[i].reason, perplexity=gated[i].perplexity)
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    _judge_table(records, verdicts, gated)


def _read_judge_input(path: Path, need_response: bool) -> list[dict]:
    """JSONL records with a string `prompt` (and `response` where the judge reads it); blank lines skipped."""
    from .errors import JudgeError

    what = "'prompt' and 'response'" if need_response else "'prompt'"
    if not path.is_file():
        raise JudgeError(f"input file '{path}' does not exist: pass a JSONL file as `csafety generate --json` prints")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise JudgeError(f"{path} is not UTF-8 text: pass a JSONL file with {what} per line") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JudgeError(f"{path} line {number} is not valid JSON ({exc.msg}): write one object per line") from None
        if not isinstance(record, dict):
            raise JudgeError(f"{path} line {number} is not a JSON object: each line needs {what}")
        for key in ("prompt", "response") if need_response else ("prompt",):
            if not isinstance(record.get(key), str):
                raise JudgeError(f"{path} line {number} has no string '{key}': each line needs {what}")
        records.append(record)
    if not records:
        raise JudgeError(f"{path} holds no records: each line needs a JSON object with {what}")
    return records


def _judge_table(records: list[dict], verdicts: list, gated: list | None) -> None:
    from rich.text import Text

    from .evaluation import RefusalRate

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
        cells = [str(i), cut(record["prompt"]), cut(record.get("response") or ""), labels[v.refusal], score,
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


@app.command("run")
@cli_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Experiment spec (YAML)."),
    store_path: Path = typer.Option(Path("results.sqlite"), "--store", help="SQLite results store (resumable)."),
    executor: str = typer.Option("local", help="local | ray."),
    address: str | None = typer.Option(None, help="Ray cluster address (e.g. auto); default: start a local one."),
    workers: int | None = typer.Option(None, help="Ray workers (default: one per model replica that fits)."),
) -> None:
    """Run (or resume) an experiment: every study of the spec, into the store, ending in a verdict per model."""
    import warnings

    from .experiments.spec import load_spec
    from .progress import Reporter
    from .store import Store

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_spec(config)
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    store = Store(store_path)
    from .runner import resolve_executor, run_experiment  # heavy (torch): after the inputs are checked

    with Reporter(f"run {spec.name}", stream=sys.stderr) as reporter:
        result = run_experiment(spec, store, resolve_executor(executor, address, workers), progress=reporter)
    out.print(
        f"run {result.run_id} ({'resumed' if result.resumed else 'new'}): {result.chunks_run} chunks run, "
        f"{result.chunks_skipped} already in {store_path}, {result.seconds:.0f} s"
    )
    _print_verdicts(result.verdicts)


def _print_verdicts(verdicts: list[dict]) -> None:
    table = Table(title="verdicts")
    for column in ("model", "verdict", "rule"):
        table.add_column(column, overflow="fold")
    for v in verdicts:
        table.add_row(v["model"], v["verdict"], v["rule"])
    out.print(table)


@app.command("status")
@cli_errors
def status_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Runs in a store: progress, timings, verdicts."""
    from .store import Store

    if not store_path.exists():
        raise CrystallizedSafetyError(
            f"store '{store_path}' does not exist: run `csafety run CONFIG --store {store_path}`"
        )
    store = Store(store_path)
    rows = []
    for info in store.runs():
        counts = store.counts(info.run_id)
        rows.append({**info.__dict__, **counts, "verdicts": store.verdicts(info.run_id)})
    if json_out:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title=str(store_path))
    for column in ("run", "name", "status", "chunks", "generations", "gen. seconds"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["run_id"], r["name"], r["status"], str(r["chunks"]), str(r["generations"]), str(r["generation_seconds"])
        )
    out.print(table)
    for r in rows:
        if r["verdicts"]:
            _print_verdicts(r["verdicts"])


@app.command("export")
@cli_errors
def export_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    fmt: str = typer.Option("json", "--format", help="json | csv."),
    run: str | None = typer.Option(None, "--run", help="Run id (default: the latest)."),
    out_path: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Export a run's generations (csv) or everything (json)."""
    from .store import Store

    if not store_path.exists():
        raise CrystallizedSafetyError(f"store '{store_path}' does not exist")
    store = Store(store_path)
    text = store.export(store.run(run).run_id, fmt)
    if out_path is not None:
        out_path.write_text(text)
        err.print(f"wrote {out_path}")
    else:
        sys.stdout.write(text)


@app.command("report")
@cli_errors
def report_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for report.html, report.md, figures, results.json."),
    run: str | None = typer.Option(None, "--run", help="Run id or prefix (default: the latest)."),
) -> None:
    """Write a run's report (HTML, Markdown + figures, JSON) from the store alone."""
    from .report import build_report

    paths = build_report(store_path, out_dir, run)
    err.print(f"wrote {paths.markdown}, {paths.results} and {len(paths.figures)} figure files", soft_wrap=True)
    sys.stdout.write(f"report: {paths.html}\n")  # the last line: `make demo` ends by pointing at the report


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
