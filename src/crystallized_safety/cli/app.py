"""The `csafety` application object, its consoles, the error wrapper and what several commands share
(options, loading prompts and models quietly, steering options -> an Intervention)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CrystallizedSafetyError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Map how refusal is built into open-weight LLMs: extract, steer, judge, conclude.",
)
out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    """Library chatter off through the environment, so that no heavy import happens before input is checked."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this too


def cli_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            quiet_libraries()
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


def load_prompt_set(source: str, column: str | None, where: list[str] | None, dedupe: bool, limit: int | None = None):
    """A prompt set from the command line's options; says how many duplicates --dedupe dropped."""
    from ..prompts import load_prompts

    # --column is shared by several prompt options (a CSV beside a bundled set); --where on a bundled set is an error
    bundled = source.startswith("bundled:")
    filters = {"where": where} if bundled else {"column": column, "where": where, "dedupe": dedupe}
    found = load_prompts(source, limit=limit, **filters)
    if found.dropped_duplicates:
        err.print(f"note: {escape(source)}: dropped {found.dropped_duplicates} repeated prompts (--dedupe)")
    return found


def load_model_quietly(model: str, device: str, dtype: str, layers_path: str | None):
    from ..core.model import resolve_device_dtype
    from ..precision import warn_if_emulated
    from ..registry import load_model

    warning = warn_if_emulated(*reversed(resolve_device_dtype(device, dtype)))
    if warning:
        err.print(f"warning: {escape(warning)}", highlight=False, soft_wrap=True)
    with err.status(f"loading {escape(model)}..."):
        return load_model(model, device=device, dtype=dtype, layers_path=layers_path)


def intervention_from_options(
    m, path: Path, layers: list[int], alpha: float, mode: str, positions: str, alpha_unit: str, ablate_to: str
):
    from ..core.directions import DirectionBank
    from ..core.steering import Intervention

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
