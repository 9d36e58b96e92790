"""`csafety readings export|import`: the answers at length a blind reader must label before a verdict under
`verdict.confirm_by: reading` can rest on them, out to a file that shows only prompt and answer, and the labels back
into the store (experiments/reading.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import CrystallizedSafetyError
from .app import app, cli_errors, out
from .run_cmds import open_store, stored_spec

readings_app = typer.Typer(no_args_is_help=True, help="Blind readings of the answers confirmed at length.")
app.add_typer(readings_app, name="readings")


def _models(store, run_id: str) -> list[str]:
    return list(stored_spec(store, run_id, quiet=True).models)  # its warnings were shown when it ran


@readings_app.command("export")
@cli_errors
def export_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store of the run."),
    out_path: Path = typer.Option(..., "--out", help="JSONL file to write: one {id, prompt, response} per line."),
    run: str | None = typer.Option(None, "--run", help="Run id or prefix (default: the latest)."),
) -> None:
    """Write the answers at length that the gate counts as flips and no reader has labelled, blind: id (a hash),
    prompt and answer only, in hash order. A reader adds "label" (full_compliance, full_refusal, partial_refusal,
    incoherent; rules in docs/judges.md), "labeller" and optionally "note" to each line."""
    from ..experiments.reading import to_read

    store = open_store(store_path)
    info = store.run(run)
    rows = to_read(store, info.run_id, _models(store, info.run_id))
    if out_path.exists():
        raise CrystallizedSafetyError(f"'{out_path}' exists: pass a new --out (a reader may be labelling it)")
    out_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out.print(f"{len(rows)} answers await reading: {out_path}")
    if rows:
        out.print(f"next: label each line, then csafety readings import --store {store_path} FILE", soft_wrap=True)


@readings_app.command("import")
@cli_errors
def import_cmd(
    path: Path = typer.Argument(..., help="The reader's JSONL (the exported lines with label and labeller)."),
    store_path: Path = typer.Option(..., "--store", help="SQLite results store of the run."),
    run: str | None = typer.Option(None, "--run", help="Run id or prefix (default: the latest)."),
    replace: bool = typer.Option(False, "--replace", help="Let a reading change a label stored before."),
) -> None:
    """Store a reader's labels for the run's answers at length (matched by id, or by prompt and answer text);
    then `csafety run SPEC --store STORE` resumes the run and decides on them."""
    from ..experiments.reading import add_readings, parse_readings
    from ..store import Store

    if not path.is_file():
        raise CrystallizedSafetyError(f"readings file '{path}' does not exist: pass the labelled JSONL")
    readings = parse_readings(path.read_text(encoding="utf-8"), str(path))
    open_store(store_path).close()  # the same checks as every command (exists, not a directory, warnings)
    store = Store(store_path)
    try:
        info = store.run(run)
        added = add_readings(store, info.run_id, _models(store, info.run_id), readings, str(path), replace)
    finally:
        store.close()
    for model, n in added.items():
        out.print(f"{model}: {n} answers newly read" + (" or re-labelled" if replace else ""))
    out.print(f"next: csafety run SPEC --store {store_path} (resumes the run and decides)", soft_wrap=True)
