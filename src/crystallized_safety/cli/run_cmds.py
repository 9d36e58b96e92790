"""`csafety run | status | export | report`: experiments into a store, and what is read back out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from .. import jsonio
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
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the cells, generations, tokens and an estimated time; run nothing."
    ),
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
        err.print(f"warning: {str(w.message)}", highlight=False)
    from ..run.executors import resolve_executor
    from ..run.runner import check_models, run_experiment  # heavy (torch): after the spec is checked

    check_models(spec, {})  # every model name resolvable before the store is touched
    preflight(spec)
    if dry_run:
        print_estimate(spec)
        return
    store = Store(store_path)
    print_store_warnings(store)

    with Reporter(f"run {spec.name}", stream=sys.stderr) as reporter:
        result = run_experiment(spec, store, resolve_executor(executor, address, workers), progress=reporter)
    out.print(
        f"run {result.run_id} ({'resumed' if result.resumed else 'new'}): {result.chunks_run} chunks run, "
        f"{result.chunks_skipped} already in {store_path}, {result.seconds:.0f} s"
    )
    print_verdicts(result.verdicts)


def preflight(spec) -> None:
    """What a run checks only when a model loads, checked now (also for --dry-run) by the same functions: the
    device, dtype and device map exist on this machine, and a `directions: {source: file}` file reads."""
    from ..core.directions import DirectionBank
    from ..core.loading import check_device_map, resolve_device_dtype

    resolve_device_dtype(spec.device, spec.dtype)
    check_device_map(spec.device_map)
    if spec.directions.source == "file":
        DirectionBank.load(spec.directions.path)


def print_estimate(spec) -> None:
    """The dry run: per model what the spec will generate and about how long it takes here; nothing written."""
    from ..precision import detect
    from ..progress import Reporter
    from ..run.estimate import estimate_spec

    with Reporter(f"dry run {spec.name}", stream=sys.stderr) as reporter:
        estimates = estimate_spec(spec, progress=reporter)
    table = Table(title=f"{spec.name}: dry run on {detect().cpu} (nothing was run)")
    for column in ("model", "cells", "gens", "tokens", "calibration", "build", "estimate"):
        table.add_column(column, overflow="fold")
    for e in estimates:
        table.add_row(
            e.model, str(e.cells), str(e.generations), str(e.new_tokens),
            f"{e.calibration_rows} rows {e.calibration_seconds:.1f} s",
            f"{e.build_seconds / 60:.0f} min" if e.build_seconds else "-", f"{e.seconds / 60:.1f} min",
        )  # fmt: skip
    out.print(table)
    total = sum(e.seconds for e in estimates)
    cells, gens = sum(e.cells for e in estimates), sum(e.generations for e in estimates)
    tokens = sum(e.new_tokens for e in estimates)
    out.print(
        f"total: about {total / 60:.0f} min on this machine (cells={cells} generations={gens} new_tokens={tokens})",
        highlight=False,
        soft_wrap=True,
    )
    walk = sum(e.walk_cells for e in estimates)
    if walk:
        out.print(
            f"upper bounds: {walk} of the cells are frontier walks and their controls, counted in full; a walk stops "
            "at each layer's coherence cliff and generates a control only for a cell at the threshold, so the run "
            "generates fewer",
            highlight=False,
            soft_wrap=True,
        )


def stored_spec(store, run_id: str, quiet: bool = False):
    """The spec a stored run was made by; `quiet`: without the warnings it gave when it ran."""
    import warnings

    import yaml

    from ..experiments.spec import parse_spec

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return parse_spec(yaml.safe_load(store.run_row(run_id)["spec_yaml"]), "the stored spec")


def open_store(store_path: Path):
    """A store opened read-only (status, export, report: also on read-only media), its warnings printed."""
    from ..store import Store

    if store_path.is_dir():
        raise CrystallizedSafetyError(f"store '{store_path}' is a directory: pass the results .sqlite file")
    if not store_path.exists():
        raise CrystallizedSafetyError(
            f"store '{store_path}' does not exist: run `csafety run CONFIG --store {store_path}`"
        )
    store = Store(store_path, readonly=True)
    print_store_warnings(store)
    return store


def print_store_warnings(store) -> None:
    for warning in store.warnings:
        err.print(f"warning: {warning}", highlight=False, soft_wrap=True)


def write_output(path: Path, text: str) -> None:
    """Write a command's --out file, or one clear error (missing directory, a file in the way, no permission)."""
    if not path.parent.is_dir():
        raise CrystallizedSafetyError(f"cannot write '{path}': directory '{path.parent}' does not exist")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CrystallizedSafetyError(f"cannot write '{path}': {exc.strerror or exc}") from None


def print_verdicts(verdicts: list[dict]) -> None:
    table = Table(title="verdicts")
    for column in ("model", "verdict", "rule"):
        table.add_column(column, overflow="fold")
    for v in verdicts:
        table.add_row(v["model"], v["verdict"], v["rule"])
    out.print(table)
    shown: list = []
    for v in verdicts:
        rules = (v.get("evidence") or {}).get("rules")
        if rules and rules.get("text") not in shown:
            shown.append(rules.get("text"))
            out.print(
                f"decision rules, fixed before generation (band for {v['model']}: layers {rules['band']}):",
                markup=False,
            )
            for line in rules.get("text") or []:
                out.print(f"  - {line}", markup=False, highlight=False)


@app.command("status")
@cli_errors
def status_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Runs in a store: progress, timings, verdicts (a 'running' run whose process is gone shows as interrupted)."""
    store = open_store(store_path)
    rows = []
    for info in store.runs():
        counts = store.counts(info.run_id)
        row = {**info.__dict__, **counts, "verdicts": store.verdicts(info.run_id)}
        if info.status == "running" and not store.run_active(info.run_id):
            row["status"] = "interrupted"
        rows.append(row)
    if json_out:
        sys.stdout.write(jsonio.dumps(rows) + "\n")
        return
    table = Table(title=str(store_path))
    for column in ("run", "name", "status", "chunks", "generations", "gen. seconds"):
        table.add_column(column)
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        table.add_row(
            r["run_id"], r["name"], status, str(r["chunks"]), str(r["generations"]), str(r["generation_seconds"])
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
    summary: bool = typer.Option(
        False,
        "--summary",
        help="json only: the run, verdicts and analyses without the generations (small enough "
        "to commit beside a results table).",
    ),
) -> None:
    """Export a run's generations (csv) or everything (json)."""
    if fmt not in ("json", "csv"):
        raise CrystallizedSafetyError(f"unknown export format '{fmt}': use json or csv")
    if summary and fmt != "json":
        raise CrystallizedSafetyError("--summary is a json export: add --format json")
    store = open_store(store_path)
    text = store.export(store.run(run).run_id, fmt)
    if summary:
        data = json.loads(text)
        data.pop("generations", None)
        text = jsonio.dumps(data, indent=1, ensure_ascii=False)
    if out_path is not None:
        write_output(out_path, text)
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


store_app = typer.Typer(help="Look after a results store: consistent backups and checks.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("backup")
@cli_errors
def store_backup_cmd(
    store_path: Path = typer.Option(..., "--store", help="SQLite results store."),
    out_path: Path = typer.Option(..., "--out", help="The backup file to create (a single .sqlite, WAL included)."),
) -> None:
    """A consistent single-file copy of the store, also while a run writes to it."""
    store = open_store(store_path)
    if not out_path.parent.is_dir():
        raise CrystallizedSafetyError(f"cannot write '{out_path}': directory '{out_path.parent}' does not exist")
    store.backup(out_path)
    err.print(f"wrote {out_path}")


@store_app.command("check")
@cli_errors
def store_check_cmd(store_path: Path = typer.Option(..., "--store", help="SQLite results store.")) -> None:
    """SQLite's integrity check, a damaged WAL, chunks marked done whose rows are missing; exit 1 on a problem."""
    from ..store import Store

    if not store_path.is_file():
        raise CrystallizedSafetyError(f"store '{store_path}' does not exist")
    store = Store(store_path, readonly=True)
    problems = store.check()
    for problem in problems:
        out.print(f"problem: {problem}", highlight=False, soft_wrap=True)
    runs = store.runs()
    out.print(f"{store_path}: {len(runs)} runs, {len(problems)} problems", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
