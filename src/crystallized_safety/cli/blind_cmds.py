"""`csafety blind`: a run's verdicts re-derived blind (every model name scrubbed from a copy of the store, the
stored responses re-judged, the verdict and K* recomputed under shuffled anonymous names), beside the originals."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.table import Table

from ..errors import CrystallizedSafetyError
from .app import app, cli_errors, out
from .run_cmds import open_store, stored_spec


@app.command("blind")
@cli_errors
def blind_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store of a finished run."),
    workdir: Path = typer.Option(..., "--workdir", help="An existing directory for the blind copies."),
    run: str | None = typer.Option(None, "--run", help="Run id or prefix (default: the latest)."),
    seeds: int = typer.Option(1, min=1, max=26, help="How many shuffles of the anonymous names."),
    coherence: bool = typer.Option(
        False, "--coherence", help="Also re-run the coherence gate (loads each model under its anonymous name)."
    ),
) -> None:
    """Re-derive every verdict blind and compare it with the stored one; exit 1 if any differs."""
    from ..experiments.blind import blind_verdicts
    from ..registry import load_model

    if not workdir.is_dir():
        raise CrystallizedSafetyError(f"--workdir '{workdir}' is not a directory: create it first")
    store = open_store(store_path)
    info = store.run(run)
    spec = stored_spec(store, info.run_id)
    named = {v["model"]: v for v in store.verdicts(info.run_id)}
    if not named:
        raise CrystallizedSafetyError(f"run {info.run_id} has no verdicts yet: finish it with `csafety run` first")
    table = Table(title=f"blind re-derivation of run {info.run_id}")
    for column in ("model", "shuffle", "stored verdict", "blind verdict", "K* (stored / blind)", "labels changed"):
        table.add_column(column, overflow="fold")
    differ = 0
    for seed in range(seeds):
        blind = blind_verdicts(store, info.run_id, spec, workdir, seed=seed, load=load_model if coherence else None)
        for model, v in blind.items():
            mine = named.get(model, {})
            same = (mine.get("verdict"), (mine.get("evidence") or {}).get("k_star")) == (
                v["verdict"],
                v["evidence"].get("k_star"),
            )
            differ += not same
            changes = (v.get("rejudged") or {}).get("changed") or {}
            changed = ", ".join(f"{k} {n}" for k, n in changes.items()) or "none"
            stars = f"{(mine.get('evidence') or {}).get('k_star')} / {v['evidence'].get('k_star')}"
            table.add_row(model, str(seed), str(mine.get("verdict")), v["verdict"], stars, str(changed))
    out.print(table)
    if differ:
        raise typer.Exit(1)


@app.command("rejudge")
@cli_errors
def rejudge_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store of the run to re-judge (read only)."),
    config: Path = typer.Option(
        ...,
        "--spec",
        help="The run's spec with a new judging rule (coherence.min_relevance, verdict.confirm_by) and nothing else "
        "changed.",
    ),
    out_path: Path = typer.Option(..., "--out", help="A new store file: the re-judged copy is written there."),
    run: str | None = typer.Option(None, "--run", help="Run id or prefix (default: the latest)."),
) -> None:
    """Re-judge a stored run under a new coherence rule (gate v1 -> v2, relevance) or with blind readers confirming
    flips at length (verdict.confirm_by: reading) into a copy, without generating; then `csafety run SPEC --store
    OUT` generates any cell the new labels call for and decides."""
    from ..experiments.rejudge import rejudge_run
    from ..experiments.spec import load_spec
    from ..progress import Reporter
    from ..registry import load_model

    spec = load_spec(config)
    store = open_store(store_path)
    info = store.run(run)
    with Reporter(f"rejudge {info.run_id}", stream=sys.stderr) as reporter:
        # the spec's device and dtype: the gate scores as it did in the run (its stored perplexities are reused)
        load = functools.partial(load_model, device=spec.device, dtype=spec.dtype)
        copy, report = rejudge_run(store, info.run_id, spec, out_path, load, reporter)
    copy.close()
    table = Table(title=f"run {info.run_id} re-judged as run {spec.spec_hash()} in {out_path}")
    for column in ("model", "answers measured", "now off-topic (incoherent)"):
        table.add_column(column)
    for model, r in report.items():
        table.add_row(model, str(r.rows), str(r.changed.get("coherent", 0)))
    out.print(table)
    out.print(f"next: csafety run {config} --store {out_path}", soft_wrap=True)
    out.print("(generates any cell the new labels call for, then decides)")
