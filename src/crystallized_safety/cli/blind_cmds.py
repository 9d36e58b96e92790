"""`csafety blind`: a run's verdicts re-derived blind (every model name scrubbed from a copy of the store, the
stored responses re-judged, the verdict and K* recomputed under shuffled anonymous names), beside the originals."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import CrystallizedSafetyError
from .app import app, cli_errors, out
from .run_cmds import open_store


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
    from ..experiments.spec import parse_spec
    from ..registry import load_model

    if not workdir.is_dir():
        raise CrystallizedSafetyError(f"--workdir '{workdir}' is not a directory: create it first")
    store = open_store(store_path)
    info = store.run(run)
    import yaml

    spec = parse_spec(yaml.safe_load(store.run_row(info.run_id)["spec_yaml"]), "the stored spec")
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
