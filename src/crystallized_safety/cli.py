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
from rich.console import Console
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


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


def _load(model: str, device: str, dtype: str, layers_path: str | None):
    from .models import load_model

    with err.status(f"loading {model}..."):
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
    table = Table(title="crystallized-safety model registry")
    for column in ("alias", "source", "family", "system role", "params", "notes"):
        table.add_column(column)
    for e in entries.values():
        table.add_row(e.alias, e.source, e.family, "yes" if e.system_role else "no", e.params or "", e.notes)
    out.print(table)


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
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    system: str | None = SystemOpt,
    raw: bool = RawOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Extract one refusal direction per layer (harmful - harmless, unit norm) in one batched pass."""
    from .directions import extract_directions
    from .prompts import load_prompts

    harmful_set = load_prompts(harmful, column=column)
    harmless_set = load_prompts(harmless, column=column)
    if out_path.suffix != ".safetensors":
        raise CrystallizedSafetyError(f"--out must end in .safetensors, e.g. {out_path.with_suffix('.safetensors')}")
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
    from .generation import generate
    from .prompts import load_prompts

    texts = list(prompt or [])
    if prompts is not None:
        texts += list(load_prompts(prompts, column=column))
    if not texts:
        raise CrystallizedSafetyError("no prompt given: pass --prompt TEXT or --prompts FILE")
    if (layer or alpha != 0.0 or mode != "add") and directions is None:
        raise CrystallizedSafetyError("--layer/--alpha/--mode need --directions FILE (from `csafety extract`)")
    if directions is not None and not layer:
        raise CrystallizedSafetyError("--directions needs at least one --layer L to steer")
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


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
