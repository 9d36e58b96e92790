"""`csafety models | extract | generate | serve`: the registry, directions, steered generation and serving."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .. import jsonio, validation
from ..errors import CrystallizedSafetyError
from .app import (
    DedupeOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    LayersPathOpt,
    ModelOpt,
    RawOpt,
    Steering,
    SteeringOpts,
    SystemOpt,
    WhereOpt,
    app,
    cli_errors,
    err,
    load_model_quietly,
    load_prompt_set,
    out,
    status,
    steering_options,
)


@app.command("models")
@cli_errors
def models_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the model registry."""
    from dataclasses import asdict

    from ..registry import registry

    entries = registry()
    if json_out:
        for entry in entries.values():
            out.print_json(jsonio.dumps(asdict(entry)))
        return
    # Narrow enough for an 80-column terminal: long sources fold, notes go below the table.
    table = Table(title="crystallized-safety model registry", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("alias", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("sys", no_wrap=True)  # takes a system message
    table.add_column("source (family: --json)", overflow="fold")
    for e in entries.values():
        wheels = f" ({len(e.parts)} wheels)" if len(e.parts) > 1 else ""
        source = f"{e.source}: {e.parts[0].package}{wheels}" if e.parts else e.source
        table.add_row(e.alias, e.params or "", "yes" if e.system_role else "no", source)
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
    out_path: Path = typer.Option(
        ..., "--out", help="Output .safetensors file (a new path: outputs are never overwritten)."
    ),
    layers: str = typer.Option("all", help="'all' or comma-separated layer indices (0-based block outputs)."),
    position: str = typer.Option("last", help="last | mean | a negative offset into the post-instruction tokens."),
    method: str = typer.Option("mean_diff", help="mean_diff | pca | probe."),
    subspace: int = typer.Option(0, help="Also store each layer's K-dim refusal subspace (top-K PCA of paired diffs)."),
    column: str | None = typer.Option(None, help="Column holding the prompt in .csv/.json/.jsonl files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
    device_map: str | None = DeviceMapOpt,
) -> None:
    """Extract one refusal direction per layer (harmful - harmless, unit norm) in one batched pass."""
    harmful_set = load_prompt_set(harmful, column, where, dedupe)
    harmless_set = load_prompt_set(harmless, column, where, dedupe)
    validation.positive_int(batch_size, "--batch-size")
    validation.integer(subspace, "--subspace", 0)
    if out_path.suffix != ".safetensors":
        raise CrystallizedSafetyError(f"--out must end in .safetensors, e.g. {out_path.with_suffix('.safetensors')}")
    validation.new_output(out_path)  # before the model loads: a bad path fails now, not after the extraction
    from ..core.directions import extract_directions  # heavy (torch): after the inputs are checked

    m = load_model_quietly(model, device, dtype, layers_path, device_map)
    with status(f"extracting {len(harmful_set)} harmful + {len(harmless_set)} harmless prompts..."):
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
            subspace=subspace,
        )
    with validation.writing(out_path):
        bank.save(out_path)
    table = Table(title=f"{out_path} ({method}, position {position}; layer i = output of block i)")
    table.add_column("layer", justify="right")
    table.add_column("|mean diff|", justify="right")
    table.add_column("mean resid norm", justify="right")
    assert bank.raw_norms is not None and bank.resid_norms is not None  # an extracted bank has both
    for row, layer in enumerate(bank.layers):
        table.add_row(str(layer), f"{float(bank.raw_norms[row]):.3f}", f"{float(bank.resid_norms[row]):.2f}")
    out.print(table)


@app.command("generate")
@cli_errors
@steering_options(subspace=True)
def generate_cmd(
    model: str = ModelOpt,
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    prompts: str | None = typer.Option(
        None, "--prompts", help="Prompt file (.txt, .csv, .json, .jsonl) or bundled:KIND[:SPLIT]."
    ),
    column: str | None = typer.Option(None, help="Column holding the prompt in structured files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    steering: Steering = SteeringOpts,  # --directions, --layer, --alpha, --mode, ... (`steering_options`)
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
    device_map: str | None = DeviceMapOpt,
) -> None:
    """Generate (batched, greedy by default), optionally steered at one or more layers."""
    texts = list(prompt or [])
    if prompts is not None:
        texts += list(load_prompt_set(prompts, column, where, dedupe))
    if not texts:
        raise CrystallizedSafetyError("no prompt given: pass --prompt TEXT or --prompts FILE")
    validation.prompt_lengths(texts)  # what can be checked is checked before the model loads
    validation.max_new_tokens(max_new_tokens, "--max-new-tokens")
    validation.positive_int(batch_size, "--batch-size")
    validation.sampling(temperature, top_p, seed)
    steering.check()
    from ..core.generation import generate  # heavy (torch): after the inputs are checked

    m = load_model_quietly(model, device, dtype, layers_path, device_map)
    intervention = steering.intervention(m)
    with status(f"generating {len(texts)} responses..."):
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
                "layers": steering.layers,
                "alpha": steering.alpha,
                "mode": steering.mode if intervention else None,
            }
            sys.stdout.write(jsonio.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.print(Text(f"> {g.prompt}", style="bold"), highlight=False)
            out.print(g.response + "\n", highlight=False, markup=False)
    sys.stdout.flush()


@app.command("serve")
@cli_errors
@steering_options(subspace=False)
def serve_cmd(
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; the API has no auth)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_name: str | None = typer.Option(None, "--served-name", help="Model name clients send (default: --model)."),
    steering: Steering = SteeringOpts,  # the steering options but --subspace (`steering_options`)
    max_batch: int = typer.Option(8, help="Most concurrent requests run in one batched generate."),
    batch_window_ms: float = typer.Option(15.0, help="How long the batcher waits for more requests (ms)."),
    max_tokens_limit: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
    device_map: str | None = DeviceMapOpt,
) -> None:
    """Serve a model (optionally steered) as an OpenAI-compatible chat API; runs until Ctrl-C."""
    from ..serve.app import ServeConfig, check_port, describe_intervention, serve

    steering.check()
    validation.positive_int(max_batch, "--max-batch")
    validation.finite(batch_window_ms, "--batch-window-ms", 0.0, 10_000.0)
    validation.max_new_tokens(max_tokens_limit, "--max-tokens-limit")
    check_port(host, port)
    m = load_model_quietly(model, device, dtype, layers_path, device_map)
    intervention = steering.intervention(m)
    name = served_name or model
    described = describe_intervention(intervention)
    how = "unsteered" if described is None else ", ".join(f"{k} {v}" for k, v in described.items())
    out.print(f"serving {name} ({how}) at http://{host}:{port}/v1 - Ctrl-C to stop", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}: the API has no authentication", highlight=False)
    sys.stdout.flush()
    config = ServeConfig(name, intervention, max_batch=max_batch, batch_window=batch_window_ms / 1000,
                         max_tokens_limit=max_tokens_limit)  # fmt: skip
    serve(m, config, host=host, port=port)


@app.command("export-model")
@cli_errors
def export_model_cmd(
    model: str = ModelOpt,
    directions: Path = typer.Option(..., help="Direction file (from `csafety extract`)."),
    layer: int = typer.Option(..., "--layer", "-l", help="Layer whose direction is folded out of every weight."),
    out_dir: Path = typer.Option(
        ..., "--out", help="New directory for the edited Hugging Face model (never overwritten)."
    ),
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Fold the ablation of a refusal direction into the weights (orthogonalisation) and save the model."""
    from ..core.directions import DirectionBank

    validation.new_output(out_dir, directory=True)  # exists, unwritable: refused before the model loads
    DirectionBank.load(directions).direction(layer)  # a bad file or layer fails before the model loads
    from ..core.orthogonalization import export_model

    m = load_model_quietly(model, "cpu", dtype, layers_path)
    with validation.writing(out_dir):
        path = export_model(m, directions, layer, out_dir)
    err.print(f"wrote {path} (direction of layer {layer} folded out; see csafety-edit.json)", soft_wrap=True)


@app.command("select")
@cli_errors
def select_cmd(
    model: str = ModelOpt,
    harmful: str = typer.Option("bundled:harmful:extract", help="Harmful prompts the candidates are extracted from."),
    harmless: str = typer.Option(
        "bundled:harmless:extract", help="Harmless prompts the candidates are extracted from."
    ),
    eval_harmful: str = typer.Option(
        "bundled:harmful:eval",
        help="Harmful eval prompts: the first --eval-n are left to the steering evaluation, the next --n score "
        "the candidates (bypass).",
    ),
    eval_harmless: str = typer.Option(
        "bundled:harmless:eval",
        help="Harmless eval prompts: the first --eval-n are left to the steering evaluation, the next --n score "
        "the candidates (induce, KL).",
    ),
    eval_n: int | None = typer.Option(
        None,
        min=1,
        help="Eval prompts per side your steering evaluation reads (a spec's prompts.n; default 35, its default): "
        "the scores never use them.",
    ),
    score_harmful: str | None = typer.Option(
        None, help="Score on these harmful prompts instead (checked disjoint from the first --eval-n eval prompts)."
    ),
    score_harmless: str | None = typer.Option(
        None, help="Score on these harmless prompts instead (checked disjoint from the first --eval-n eval prompts)."
    ),
    n: int = typer.Option(32, min=2, help="Scoring prompts per side."),
    positions: str = typer.Option("-1,-2,-3,-4,-5", help="Post-instruction positions (comma-separated)."),
    layers: str | None = typer.Option(None, help="Candidate layers (default: all)."),
    kl_max: float = typer.Option(0.1, help="Keep candidates whose ablation KL on harmless prompts is below this."),
    induce_min: float = typer.Option(0.0, help="Keep candidates whose induced refusal log-odds exceed this."),
    ablate_to: str = typer.Option(
        "zero", help="zero (the paper) | harmless-mean (affine: where harmless prompts sit)."
    ),
    criterion: str = typer.Option(
        "arditi", help="arditi (refusal log-odds: bypass, induce, KL) | cosmic (activation cosines, no output tokens)."
    ),
    out: Path = typer.Option(..., "--out", help="Direction file of the chosen position (.safetensors; a new path)."),
    table: Path | None = typer.Option(None, help="Write every candidate's scores here (JSON; a new path)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Choose a refusal direction over positions x layers as Arditi et al. 2024 (bypass, induce, KL) or COSMIC do,
    scored out of sample: never on the eval prompts the steering evaluation will read."""
    import sys

    from ..experiments.selection import select_direction
    from ..progress import Reporter
    from ..stats import MIN_N

    pos = select_checks(criterion, positions, kl_max, induce_min)
    sets = [load_prompt_set(s, None, None, False) for s in (harmful, harmless, eval_harmful, eval_harmless)]
    scoring = cli_scoring(sets[2], sets[3], eval_n or MIN_N, n, score_harmful, score_harmless)  # before the model
    select_outputs(out, table)  # scoring takes minutes: a bad path fails now
    m = load_model_quietly(model, device, dtype, layers_path)
    layer_list = m.parse_layers(layers)
    with Reporter("direction selection", stream=sys.stderr) as reporter:
        sel = select_direction(m, (sets[0], sets[1]), (scoring.harmful, scoring.harmless), positions=pos,
                               layers=layer_list, kl_max=kl_max, induce_min=induce_min, ablate_to=ablate_to,
                               criterion=criterion, progress=reporter, scored_on=scoring.scored_on)  # fmt: skip
    if table is not None:
        rows = [{**c.__dict__, "chosen": c == sel.chosen} for c in sel.candidates]
        data = {"scored_on": scoring.scored_on, "settings": sel.settings, "candidates": rows}
        with validation.writing(table, "--table"):
            table.write_text(jsonio.dumps(data, indent=1) + "\n")
    if sel.chosen is None or sel.bank is None:
        from ..experiments.selection import no_choice_message

        raise CrystallizedSafetyError(no_choice_message(sel) + (f" (scores in {table})" if table else ""))
    with validation.writing(out):
        sel.bank.save(out)
    c = sel.chosen
    err.print(f"chosen: position {c.position}, layer {c.layer} (bypass {c.bypass:.2f}, induce {c.induce:.2f}, "
              f"KL {c.kl:.3f}; {sum(x.kept for x in sel.candidates)} of {len(sel.candidates)} kept; scored on "
              f"{scoring.scored_on}); wrote {out}", soft_wrap=True)  # fmt: skip


def select_checks(criterion: str, positions: str, kl_max: float, induce_min: float) -> list[int]:
    """`csafety select`'s options checked before any prompt or model loads; the parsed --positions."""
    from ..experiments.selection import CRITERIA

    if criterion not in CRITERIA:  # before the model loads
        raise CrystallizedSafetyError(f"unknown --criterion '{criterion}': use {' or '.join(CRITERIA)}")
    validation.finite(kl_max, "--kl-max", 0.0, low_open=True)
    validation.finite(induce_min, "--induce-min")
    try:
        pos = [int(x) for x in positions.split(",")]
    except ValueError:
        raise CrystallizedSafetyError(f"--positions '{positions}': give negative integers like -1,-2") from None
    if any(p >= 0 for p in pos) or not pos:
        raise CrystallizedSafetyError(f"--positions '{positions}': post-instruction positions are negative (-1 = last)")
    return pos


def select_outputs(out: Path, table: Path | None) -> None:
    """--out and --table new and writable (one rule for every artifact: never overwritten), before the scoring."""
    if out.suffix != ".safetensors":
        raise CrystallizedSafetyError(f"--out must end in .safetensors, e.g. {out.with_suffix('.safetensors')}")
    validation.new_output(out)
    if table is not None:
        validation.new_output(table, "--table")


def cli_scoring(eval_harmful, eval_harmless, eval_n: int, n: int, score_harmful: str | None,
                score_harmless: str | None):  # fmt: skip
    """`csafety select`'s scoring prompts: eval[eval_n : eval_n + n], or the --score-* files checked disjoint from
    eval[:eval_n]; the CLI cannot know which prompts the user will steer on, so --eval-n stands for a spec's n."""
    from ..experiments.scoring_prompts import after_reserved, from_files

    reader = f"the steering evaluation (--eval-n {eval_n})"
    if score_harmful is None and score_harmless is None:
        fix = (
            "give longer --eval-harmful/--eval-harmless files, lower --n or --eval-n, or pass --score-harmful and "
            "--score-harmless"
        )
        return after_reserved(eval_harmful, eval_harmless, eval_n, n, reader, fix)
    if score_harmful is None or score_harmless is None:
        raise CrystallizedSafetyError("pass both --score-harmful and --score-harmless, or neither")
    files = [load_prompt_set(s, None, None, False) for s in (score_harmful, score_harmless)]
    reserved = (eval_harmful.head(eval_n), eval_harmless.head(eval_n))
    return from_files(files[0], files[1], reserved, n, reader, "give longer --score-* files or lower --n")
