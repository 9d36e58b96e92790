"""`csafety vectors export | import`: control vectors for llama.cpp and repeng (GGUF), to and from direction
files."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import validation
from ..errors import CrystallizedSafetyError
from .app import app, cli_errors, err

vectors_app = typer.Typer(help="Control vectors for llama.cpp / repeng (GGUF), to and from direction files.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(vectors_app, name="vectors")


@vectors_app.command("export")
@cli_errors
def export_cmd(
    directions: Path = typer.Option(..., help="Direction file (from `csafety extract`)."),
    layer: list[int] = typer.Option(..., "--layer", "-l", help="Layer to export (repeatable; >= 1 for llama.cpp)."),
    alpha: float = typer.Option(..., help="Steering strength folded into the vectors (-alpha removes refusal)."),
    alpha_unit: str = typer.Option("absolute", help="absolute | relative (x the layer's mean residual norm)."),
    model_hint: str = typer.Option("llama", help="The model's architecture, as llama.cpp names it."),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write (a new path: outputs are never overwritten)."),
) -> None:
    """Write `alpha x direction` per layer as a llama.cpp control vector (`llama-cli --control-vector FILE`)."""
    validation.alpha(alpha, alpha_unit, "--alpha")  # the same check as generate's and a spec's alphas
    if alpha == 0:  # the vectors are alpha x direction: import (and any steering) would reject all-zero ones
        raise CrystallizedSafetyError("--alpha 0 writes all-zero vectors that steer nothing: pass a non-zero --alpha")
    if out.suffix != ".gguf":
        raise CrystallizedSafetyError(f"control vectors are GGUF files: name the output '{out.with_suffix('.gguf')}'")
    validation.new_output(out)
    from ..core.control_vectors import export_gguf
    from ..core.directions import DirectionBank

    bank = DirectionBank.load(directions)
    with validation.writing(out):
        path = export_gguf(bank, out, layer, alpha, alpha_unit, model_hint)
    err.print(f"wrote {path} ({len(set(layer))} layers)", soft_wrap=True)


@vectors_app.command("import")
@cli_errors
def import_cmd(
    source: Path = typer.Option(..., "--in", help="A llama.cpp / repeng control vector (.gguf)."),
    out: Path = typer.Option(..., "--out", help="The direction file to write (.safetensors; a new path)."),
) -> None:
    """Read a control vector into a direction file (unit directions; their norms kept in the metadata)."""
    if out.suffix != ".safetensors":
        raise CrystallizedSafetyError(f"--out must end in .safetensors, e.g. {out.with_suffix('.safetensors')}")
    validation.new_output(out)
    from ..core.control_vectors import import_gguf

    bank = import_gguf(source)
    with validation.writing(out):
        bank.save(out)
    err.print(f"wrote {out}: layers {', '.join(map(str, bank.layers))} (no residual norms: use absolute alphas)",
              soft_wrap=True)  # fmt: skip
