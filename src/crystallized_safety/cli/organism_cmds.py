"""`csafety organism build` and `csafety eval-refusal`: the model organism and refusal rates with coherence."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .. import jsonio
from ..errors import CrystallizedSafetyError
from .app import (
    CalibrationLimitOpt,
    CalibrationOpt,
    DedupeOpt,
    DeviceOpt,
    DtypeOpt,
    LayersPathOpt,
    ModelOpt,
    SystemOpt,
    WhereOpt,
    app,
    cli_errors,
    err,
    load_model_quietly,
    load_prompt_set,
    out,
    status,
)

organism_app = typer.Typer(no_args_is_help=True, help="The refusal-tuned SmolLM2 model organism.")
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
@cli_errors
def organism_build_cmd(
    out_dir: Path | None = typer.Option(None, "--out", help="Copy the built organism here (default: cache only)."),
    seed: int = typer.Option(0, help="Training seed (same seed -> same model and verdicts)."),
    precision: str = typer.Option(
        "fp32",
        help="fp32 (the one organism, on every CPU), bf16 (autocast; fast only with native bf16, a different "
        "organism cached apart) or auto (bf16 where this CPU has it natively).",
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cache holds one."),
    kind: str = typer.Option(
        "liquid",
        help="liquid (smollm2-135m-refusal: refusal-tuned), hardened (smollm2-135m-hardened: the liquid "
        "organism trained further against single-layer attacks on its refusal direction) or immune "
        "(smollm2-135m-immune: against multi-layer attacks too; only on request).",
    ),
    recipe_name: str = typer.Option(
        "v2",
        "--recipe",
        help="The hardened recipe: v2 (what smollm2-135m-hardened builds) or v5-v13, each under its own alias "
        "smollm2-135m-hardened-vN (v5-v7: the single-layer ladder; v8-v11, v13: crystallized by construction; "
        "v12: v9 without windows); docs/organisms.md has the table.",
    ),
) -> None:
    """Fine-tune SmolLM2-135M-Instruct on CPU into a model that refuses harmful requests."""
    import shutil

    from ..organism.build import ensure_organism, stale_attack_stream
    from ..organism.recipe import (
        DEFAULT_NAME,
        HARDENED_NAMES,
        HARDENED_RECIPES,
        IMMUNE_NAME,
        Recipe,
        hardened_recipe,
        immune_recipe,
        load_card,
        organism_dir,
    )
    from ..precision import bf16_kernels, detect, resolve
    from ..progress import Reporter
    from ..registry import load_model

    if kind not in ("liquid", "hardened", "immune"):
        raise CrystallizedSafetyError(f"unknown --kind '{kind}': use liquid, hardened or immune")
    if recipe_name not in HARDENED_RECIPES:
        raise CrystallizedSafetyError(f"unknown --recipe '{recipe_name}': use one of {', '.join(HARDENED_RECIPES)}")
    if recipe_name != "v2" and kind != "hardened":
        raise CrystallizedSafetyError("--recipe names a hardened recipe: use it with --kind hardened")
    chosen, why = resolve(precision, timed=False)  # the precision picks the organism: never by a timing
    cpu = detect()
    if chosen == "bf16" and not bf16_kernels():  # emulated: flags and kernels, not the load-dependent probe
        err.print(f"warning: {cpu.reason}: a bf16 build will be many times slower than fp32", soft_wrap=True)
    if kind == "liquid":
        name, recipe = DEFAULT_NAME, Recipe(seed=seed, precision=chosen)
    elif kind == "immune":
        name, recipe = IMMUNE_NAME, immune_recipe(seed, chosen)
    else:
        name = HARDENED_NAMES[recipe_name]
        recipe = hardened_recipe(seed, chosen, version=recipe_name)
    target = organism_dir(name, recipe)
    if force and target.exists():
        shutil.rmtree(target)
    if not (target / "card.json").exists():
        announce_build(recipe, f"{chosen} ({why}) on {cpu.summary()}")
    with Reporter(f"organism {target.name}") as reporter:
        path = ensure_organism(name, recipe, progress=reporter, load=load_model)
    if out_dir is not None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise CrystallizedSafetyError(f"--out {out_dir} exists and is not empty: choose a new directory")
        shutil.copytree(path, out_dir, dirs_exist_ok=True)
        path = out_dir
    card = load_card(path)
    stale = stale_attack_stream(card)
    if stale:
        err.print(f"warning: {stale}", highlight=False, soft_wrap=True)
    out.print((path / "README.md").read_text(), markup=False, highlight=False)
    out.print(f"organism at {path} (build {card['build_seconds']} s)", markup=False, highlight=False)


def announce_build(recipe, where: str) -> None:
    """Before a first build: what it will cost on this machine (one timed training step, extrapolated)."""
    from ..organism.build import estimate_build_seconds
    from ..registry import load_model

    err.print(f"no cached organism for this recipe: building it in {where}", highlight=False, soft_wrap=True)
    probe = load_model(recipe.base, device="cpu", dtype="float32")
    minutes = estimate_build_seconds(probe, recipe) / 60
    err.print(f"estimated build time on this machine: ~{minutes:.0f} min (once; then cached)", soft_wrap=True)


@app.command("eval-refusal")
@cli_errors
def eval_refusal_cmd(
    model: str = ModelOpt,
    prompts: str = typer.Option(..., "--prompts", help="Prompt file or bundled:KIND[:SPLIT]."),
    judge: str = typer.Option("substring", help="substring (more judges: `csafety judge`)."),
    column: str | None = typer.Option(None, help="Column holding the prompt in structured files."),
    where: list[str] | None = WhereOpt,
    dedupe: bool = DedupeOpt,
    limit: int | None = typer.Option(None, help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate per prompt (greedy)."),
    batch_size: int = typer.Option(32),
    coherence: bool = typer.Option(
        True, "--coherence/--no-coherence", help="Gate each response for coherence (gibberish is not compliance)."
    ),
    calibration: str = CalibrationOpt,
    calibration_limit: int = CalibrationLimitOpt,
    json_out: bool = typer.Option(
        False, "--json", help="One JSON line per prompt (response, verdict, coherence), then one with the rates."
    ),
    system: str | None = SystemOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    layers_path: str | None = LayersPathOpt,
) -> None:
    """Refusal rate of a model on a prompt set, with its Wilson 95% interval and the coherent-compliance rate."""
    from ..prompts import load_prompts

    if judge != "substring":
        raise CrystallizedSafetyError(f"unknown judge '{judge}' for eval-refusal: use substring")
    prompt_set = load_prompt_set(prompts, column, where, dedupe, limit)
    calibration_set = load_prompts(calibration, limit=calibration_limit) if coherence else None
    from ..evaluation import calibrated_gate, refusal_rate  # heavy (torch): after the inputs are checked

    m = load_model_quietly(model, device, dtype, layers_path)
    gate = None
    if calibration_set is not None:
        with status(f"calibrating the coherence gate on {len(calibration_set)} harmless answers..."):
            gate = calibrated_gate(
                m, list(calibration_set), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system
            )
    with status(f"generating and judging {len(prompt_set)} prompts..."):
        res = refusal_rate(
            m, list(prompt_set), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system, gate=gate
        )
    if json_out:
        for row in res.records():
            sys.stdout.write(jsonio.dumps(row, ensure_ascii=False) + "\n")
        summary = {
            "model": model,
            "prompts": prompts,
            "prompts_sha256": prompt_set.sha256,
            "judge": judge,
            "max_new_tokens": max_new_tokens,
            "coherence_thresholds": gate.thresholds.to_dict() if gate is not None and gate.thresholds else None,
            **res.to_dict(),
        }
        sys.stdout.write(jsonio.dumps(summary) + "\n")
    else:
        text = f"refusal rate of {model} on {prompts}: {res}"
        text += f", {res.undecided} undecided" if res.undecided else ""
        out.print(text if gate is not None else text + " (coherence not checked)", markup=False, highlight=False)
