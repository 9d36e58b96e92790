"""The `csafety` application object, its consoles, the error wrapper and what several commands share
(options, loading prompts and models quietly, steering options -> an Intervention)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from .. import validation
from ..core import modes
from ..errors import CrystallizedSafetyError


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one `error:` line on stderr, exit code 2, like
    every other error of the tool, instead of click's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err.print("aborted")
            sys.exit(1)
        except typer.TyperException as exc:  # typer's click: usage errors, bad values, unknown options
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as before
                exc.show()
                sys.exit(2)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = exc.format_message()
            err.print(Text.assemble(("error:", "bold red"), f" {message}{hint}"), soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Map how refusal is built into open-weight LLMs: extract, steer, judge, conclude.",
)
# No console markup: user-supplied text (model names, paths, prompts, responses, error messages) often holds
# square brackets ("[/INST]"), which rich would read as tags; styled prefixes are built as Text instead.
out = Console(markup=False)
err = Console(stderr=True, markup=False)


def status(message: str):
    """A spinner on stderr whose message is shown literally (rich parses markup in plain status strings)."""
    return err.status(Text(message))


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
            err.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


ModelOpt = typer.Option(..., "--model", "-m", help="Registry alias, local directory, .gguf file or hub id.")
DeviceOpt = typer.Option("auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N.")
DtypeOpt = typer.Option(
    "auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16, mixed (bf16 matmuls, fp32 residual)."
)
DeviceMapOpt = typer.Option(
    None, "--device-map", help="Shard over devices: auto | balanced | a JSON {module: cpu|disk|cuda:N} (or .json file)."
)
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
        err.print(f"note: {source}: dropped {found.dropped_duplicates} repeated prompts (--dedupe)")
    return found


def parse_device_map(value: str | None):
    """--device-map: auto | balanced | sequential, a JSON object {module: device}, or a .json file holding one."""
    from ..core.loading import DEVICE_MAP_PRESETS

    if value is None or value in DEVICE_MAP_PRESETS:
        return value
    import json

    text = Path(value).read_text(errors="replace") if value.endswith(".json") and Path(value).is_file() else value
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        raise CrystallizedSafetyError(
            f"--device-map {value[:60]!r} is neither auto/balanced/sequential nor a JSON object (inline or .json file)"
        ) from None
    return found


def load_model_quietly(model: str, device: str, dtype: str, layers_path: str | None, device_map: str | None = None):
    from transformers.utils import logging as hf_logging

    from ..core.loading import resolve_device_dtype
    from ..precision import warn_if_emulated
    from ..registry import load_model

    hf_logging.disable_progress_bar()  # also when transformers was imported before quiet_libraries() ran
    dev, dt = resolve_device_dtype(device, dtype)
    warning = warn_if_emulated(dt, dev)
    if warning:
        err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    with status(f"loading {model}..."):
        return load_model(
            model, device=device, dtype=dtype, layers_path=layers_path, device_map=parse_device_map(device_map)
        )


# Steering options, declared once and shared by `generate` and `serve` (through `steering_options`, below).
DirectionsOpt = typer.Option(None, help="Direction file (.safetensors, or a plain-tensor .pt): steer the model.")
LayerOpt = typer.Option(None, "--layer", "-l", help="Layer to steer (repeatable).")
AlphaOpt = typer.Option(0.0, help="Steering strength; -alpha removes refusal, +alpha induces it.")
ModeOpt = typer.Option(
    "add", help=" | ".join(f"{m.name} ({m.help})" if m.help else m.name for m in modes.MODES.values()) + "."
)
SubspaceOpt = typer.Option(
    0, help="With ablate/affine: ablate the K-dim refusal subspace of each layer (file from `extract --subspace K`)."
)
PositionsOpt = typer.Option("all", help="all | prompt | generated.")
AlphaUnitOpt = typer.Option("absolute", help="absolute | relative (x the layer's mean residual norm).")
AblateToOpt = typer.Option("zero", help="Ablation target projection: zero | harmless-mean.")


@dataclass(frozen=True)
class Steering:
    """The steering options of a command: checked before the model loads, built into an Intervention after."""

    directions: Path | None
    layers: list[int]
    alpha: float = 0.0
    mode: str = "add"
    positions: str = "all"
    alpha_unit: str = "absolute"
    ablate_to: str = "zero"
    subspace: int = 0

    def check(self) -> None:
        if (self.layers or self.alpha != 0.0 or self.mode != "add") and self.directions is None:
            raise CrystallizedSafetyError("--layer/--alpha/--mode need --directions FILE (from `csafety extract`)")
        if self.directions is not None and not self.layers:
            raise CrystallizedSafetyError("--directions needs at least one --layer L to steer")
        if self.ablate_to not in ("zero", "harmless-mean"):
            raise CrystallizedSafetyError(f"unknown --ablate-to '{self.ablate_to}': use zero or harmless-mean")
        mode = self.steering_mode()
        if mode.angle and self.alpha_unit != "absolute":
            raise CrystallizedSafetyError(
                f"--mode {mode.name} takes --alpha as an angle in degrees: use --alpha-unit absolute"
            )
        validation.integer(self.subspace, "--subspace", 0)
        if self.subspace and not mode.ablates:
            raise CrystallizedSafetyError(
                f"--subspace {self.subspace} works with --mode {modes.one_of(modes.names(modes.is_ablation))}"
            )
        if self.directions is not None:  # a bad file or alpha fails here, before the model loads
            if self.alpha_unit not in validation.ALPHA_LIMITS:
                raise CrystallizedSafetyError(f"unknown --alpha-unit '{self.alpha_unit}': use absolute or relative")
            validation.alpha(self.alpha, self.alpha_unit, "--alpha")  # the same check as a spec's alphas
            from ..core.directions import DirectionBank

            bank = DirectionBank.load(self.directions)
            for layer in self.layers:
                if self.alpha_unit == "relative":
                    bank.resid_norm(layer)
                if self.ablate_to == "harmless-mean" or mode.harmless:
                    bank.harmless_projection(layer)
                if self.subspace:
                    bank.basis(layer, self.subspace)

    def steering_mode(self) -> modes.Mode:
        """The registered mode `--mode` names, or one line listing them."""
        if self.mode not in modes.MODES:
            raise CrystallizedSafetyError(f"unknown mode '{self.mode}': use --mode {' | '.join(modes.MODES)}")
        return modes.mode(self.mode)

    def intervention(self, m: Any) -> Any:
        """The Intervention for model `m` (None when unsteered)."""
        if self.directions is None:
            return None
        from ..core.directions import DirectionBank
        from ..core.steering import Intervention

        bank = DirectionBank.load(self.directions)
        bank.check_model(m)
        layers = [m.check_layer(layer) for layer in self.layers]
        relative = self.alpha_unit == "relative"
        directions = {k: (bank.basis(k, self.subspace)[0] if self.subspace else bank.direction(k)) for k in layers}
        basis = {k: bank.basis(k, self.subspace) for k in layers} if self.subspace else None
        mode = self.steering_mode()
        return Intervention(
            directions=directions,
            alpha=self.alpha,
            mode=mode,
            positions=self.positions,
            alpha_unit=self.alpha_unit,
            layer_norms={layer: bank.resid_norm(layer) for layer in layers} if relative else None,
            params=mode.bind(bank, directions, basis, to_harmless=self.ablate_to == "harmless-mean"),
        )


# (parameter, type, option) of the steering options, in their --help order; `steering_options` puts them in a command
STEERING_OPTIONS: list[tuple[str, Any, Any]] = [
    ("directions", Path | None, DirectionsOpt),
    ("layer", list[int] | None, LayerOpt),
    ("alpha", float, AlphaOpt),
    ("mode", str, ModeOpt),
    ("positions", str, PositionsOpt),
    ("alpha_unit", str, AlphaUnitOpt),
    ("ablate_to", str, AblateToOpt),
    ("subspace", int, SubspaceOpt),
]


SteeringOpts: Any = object()  # `steering: Steering = SteeringOpts`: where `steering_options` puts the options


def steering_options(*, subspace: bool) -> Callable[[Callable], Callable]:
    """The steering options, declared once for `generate` and `serve` (`--subspace` only where `subspace`): the
    command takes one `steering: Steering = SteeringOpts` parameter; its --help shows the options in that place
    (same names, defaults and help), and it is called with the `Steering` they make, unchecked: the command calls
    `steering.check()` where its own checks leave room, so errors come in the order they always did."""
    options = [(name, kind, opt) for name, kind, opt in STEERING_OPTIONS if subspace or name != "subspace"]

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        if "steering" not in signature.parameters:
            raise TypeError(f"{fn.__name__} has no `steering: Steering = SteeringOpts` parameter")
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param.name != "steering":
                params.append(param)
                continue
            params += [inspect.Parameter(name, param.kind, default=opt, annotation=kind) for name, kind, opt in options]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name, _kind, _opt in options}
            given["layers"] = given.pop("layer") or []
            return fn(steering=Steering(**given), **kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
        return command

    return decorate


def main() -> None:
    app(prog_name="csafety")  # also under `python -m crystallized_safety.cli`
