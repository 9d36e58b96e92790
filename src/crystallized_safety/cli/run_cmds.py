"""`csafety run | status | export | report`: experiments into a store, and what is read back out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CrystallizedSafetyError
from .app import (
    app,
    cli_errors,
    err,
    out,
)


@app.command("run")
@cli_errors
def run_cmd(
    config: Path = typer.Argument(..., help="Experiment spec (YAML)."),
    store_path: Path = typer.Option(Path("results.sqlite"), "--store", help="SQLite results store (resumable)."),
    executor: str = typer.Option("local", help="local | ray."),
    address: str | None = typer.Option(None, help="Ray cluster address (e.g. auto); default: start a local one."),
    workers: int | None = typer.Option(None, help="Ray actors, each opening the model once (default 1)."),
) -> None:
    """Run (or resume) an experiment: every study of the spec, into the store, ending in a verdict per model."""
    import warnings

    from ..experiments.spec import load_spec
    from ..progress import Reporter
    from ..store import Store

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_spec(config)
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    store = Store(store_path)
    from ..run.executors import resolve_executor
    from ..run.runner import run_experiment  # heavy (torch): after the inputs are checked

    with Reporter(f"run {spec.name}", stream=sys.stderr) as reporter:
        result = run_experiment(spec, store, resolve_executor(executor, address, workers), progress=reporter)
    out.print(
        f"run {result.run_id} ({'resumed' if result.resumed else 'new'}): {result.chunks_run} chunks run, "
        f"{result.chunks_skipped} already in {store_path}, {result.seconds:.0f} s"
    )
    print_verdicts(result.verdicts)


def print_verdicts(verdicts: list[dict]) -> None:
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
    from ..store import Store

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
            print_verdicts(r["verdicts"])


@app.command("export")
@cli_errors
def export_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    fmt: str = typer.Option("json", "--format", help="json | csv."),
    run: str | None = typer.Option(None, "--run", help="Run id (default: the latest)."),
    out_path: Path | None = typer.Option(None, "--out", help="Write here instead of stdout."),
) -> None:
    """Export a run's generations (csv) or everything (json)."""
    from ..store import Store

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
    from ..report import build_report

    paths = build_report(store_path, out_dir, run)
    err.print(f"wrote {paths.markdown}, {paths.results} and {len(paths.figures)} figure files", soft_wrap=True)
    sys.stdout.write(f"report: {paths.html}\n")  # the last line: `make demo` ends by pointing at the report
