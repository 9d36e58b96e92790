"""The record of what the interop tests measured: `results/interop.json` (`make interop` names it in
CSAFETY_INTEROP_RECORD). Each passing test hands its figures to `record`; when the session ends they are merged
into the file (a test not run this time keeps its earlier entry, with the machine it ran on), with the tables that
docs/interop.md and the README render from it (`crystallized_safety.report.docs_tables`, kept in step by
tests/test_results_docs.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .sides import ALPHA, ENVS, LAYER, MAX_NEW, N_HARMFUL, N_HARMLESS, N_PAIRS, ORGANISM

RECORD_ENV = "CSAFETY_INTEROP_RECORD"
FIGURES: dict[str, Any] = {}  # test name -> the figures it measured (this session)
DURATIONS: dict[str, float] = {}  # test name -> seconds of set-up + call (set-up includes shared fixtures)
N_EVAL = N_HARMFUL + N_HARMLESS

LLAMA_CV = "test_control_vector_steers_llama_cpp_as_the_tool_does"
LLAMA_EDIT = "test_weight_edited_model_in_llama_cpp_gives_the_hook_ablation_tokens"
REPENG = "test_repeng_vectors_cross_both_ways_and_steer_the_same"
SV = "test_steering_vectors_extracts_and_steers_as_the_tool_does"


def record(test: str, figures: dict[str, Any]) -> None:
    """Keep `figures` (what test `test` measured, after its assertions passed) for the record file."""
    FIGURES[test] = figures


def _sci(x: float) -> str:
    """4.673e-05 -> '4.7e-5'."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _of(share: float, n: int = N_EVAL) -> str:
    return f"{round(share * n)}/{n}"


def agreement_rows(tests: dict[str, Any]) -> list[list[str]]:
    """The docs' agreement table, one row per check, from the figures of the tests on record."""
    rows: list[list[str]] = []
    if LLAMA_CV in tests:
        f = tests[LLAMA_CV]["figures"]
        plain, steered, ref = f["plain"], f["steered"], f["refusals_of_harmful"]
        rows += [
            [f"llama.cpp (llama-cpp-python {f['version']}, built from its sdist)",
             "the organism converted to an f32 GGUF by llama.cpp's own `convert_hf_to_gguf.py`: llama.cpp's tokenizer "
             "reads our chat-formatted prompts, unsteered greedy tokens and first-token logits",
             f"token ids of all {N_EVAL} prompts identical; same tokens {_of(plain['same_tokens'])}; first-token "
             f"logits max abs diff {_sci(plain['max_abs_logit_diff'])}",
             "same tokens >= 90%, logits within 1e-3"],
            ["llama.cpp",
             f"`csafety vectors export -l {LAYER} --alpha {ALPHA} --alpha-unit relative` read by llama.cpp's own GGUF "
             "parser (ggml `gguf_init_from_file`, the steps of `--control-vector`) and applied with "
             "`llama_set_adapter_cvec` over layers 1..n",
             f"the file's one layer found at layer {LAYER} with norm {abs(ALPHA)} x the residual norm (rel. 1e-5); "
             f"same tokens {_of(steered['same_tokens'])}; first-token logits max abs diff "
             f"{_sci(steered['max_abs_logit_diff'])}; the logit shift the vector causes (up to "
             f"{f['max_abs_shift']:.1f}) equals ours within {_sci(f['max_abs_shift_diff'])}",
             "same tokens >= 90%, logits within 1e-3, shift within 2e-3"],
            ["llama.cpp: sign and scale",
             f"the vector exported at {ALPHA} relative, judged by the substring judge on the {N_HARMFUL} harmful "
             "prompts",
             f"refusals {ref['plain']}/{ref['of']} unsteered, {ref['steered']}/{ref['of']} steered in llama.cpp; the "
             "same counts as this tool's",
             "llama.cpp refuses less steered; its counts match ours wherever the tokens match"],
        ]  # fmt: skip
    if LLAMA_EDIT in tests:
        f = tests[LLAMA_EDIT]["figures"]
        kept = f["refusals_of_harmful"]
        rows.append(
            ["llama.cpp: weight edit",
             f"`csafety export-model -l {LAYER}` (the direction folded out of every residual writer), converted to an "
             "f32 GGUF, against this tool's hook ablation of the same direction",
             f"same tokens {_of(f['same_tokens'])}; first-token logits max abs diff {_sci(f['max_abs_logit_diff'])}; "
             f"the edit changes {round(f['differs_from_plain'] * N_EVAL)} of {N_EVAL} answers ({kept['edited']} of the "
             f"{kept['of']} harmful prompts are still refused: this direction alone does not remove the organism's "
             "refusal)",
             "same tokens >= 90%, logits within 1e-3, the edit changes some answers"]
        )  # fmt: skip
    if REPENG in tests:
        f = tests[REPENG]["figures"]
        layers = sorted(int(k) for k in f["cosine_with_ours"])
        cosines = ", ".join(f"{f['cosine_with_ours'][str(k)]:.2f}" for k in layers)
        rows += [
            [f"repeng 0.4.0 (numpy {f['numpy']})",
             f"a vector repeng trains (`ControlVector.train`, layers {layers[0]}-{layers[-1]}, {N_PAIRS} pairs) and "
             "writes (`export_gguf`), read by `csafety vectors import`; steering with it in repeng's `ControlModel` "
             f"(coefficient {ALPHA / len(layers):.2f} x the layer-{LAYER} residual norm per layer) and in this tool",
             f"layers and vectors identical (atol 1e-6); same tokens {_of(f['repeng_vector_same_tokens'])}; the "
             f"steering changes {round(f['steered_differs_from_plain'] * N_EVAL)} of {N_EVAL} answers; its cosine "
             f"with our direction at layers {layers[0]}-{layers[-1]}: "
             f"{cosines}; steered by it, "
             f"{f['refusals_of_harmful']['repeng_vector']} of the {N_HARMFUL} harmful prompts are still refused",
             "same tokens >= 90%, steering changes more than half"],
            ["repeng: our file",
             "`csafety vectors export`'s file loaded by repeng's `import_gguf` and steering repeng's `ControlModel` "
             "(coefficient 1: the file holds alpha x direction)",
             f"layer {LAYER} and its vector identical (rel. 1e-6); same tokens {_of(f['our_vector_same_tokens'])} as "
             "this tool's steering",
             "same tokens >= 90%"],
        ]  # fmt: skip
    if SV in tests:
        f = tests[SV]["figures"]
        v = f["versions"]
        rows += [
            [f"steering-vectors {v['steering_vectors']} (transformers {v['transformers']})",
             f"extraction with `train_steering_vector` (mean of paired differences, last token) on the same {N_PAIRS} "
             "pairs, every layer, against this tool's directions",
             f"cosine >= {math.floor(f['min_cosine'] * 1e7) / 1e7:.7f} at every layer; norms equal to our raw norms "
             "(rel. 1e-3)",
             "cosine >= 0.9999 at every layer"],
            ["steering-vectors: steering",
             f"its own vector at layer {LAYER}, scaled by `SteeringVector.apply`'s multiplier to {ALPHA} x the "
             "residual norm, against this tool's steering",
             f"same tokens {_of(f['steered_same_tokens'])} (unsteered {_of(f['plain_same_tokens'])} too)",
             "same tokens >= 90%"],
            [f"transformers {v['transformers']} on our saved directory",
             "`save_pretrained` output (what `export-model` and the organism build write) loaded by AutoTokenizer and "
             "AutoModelForCausalLM of transformers 4",
             f"rope theta read as 100,000; first-token logits max abs diff {_sci(f['max_abs_logit_diff_plain'])}; the "
             "same directory without the transformers-4 rope key: theta 10,000, logits off by up to "
             f"{f['max_abs_logit_diff_without_rope_keys']:.1f}",
             "logits within 1e-3; without the key, theta 10,000 and logits off by > 0.1"],
        ]  # fmt: skip
    return rows


def peer_rows(tests: dict[str, Any]) -> list[list[str]]:
    """The README's short table: per peer, what was checked and the agreement in tokens."""
    rows = []
    if LLAMA_CV in tests and LLAMA_EDIT in tests:
        cv, edit = tests[LLAMA_CV]["figures"], tests[LLAMA_EDIT]["figures"]
        worst = max(cv["plain"]["max_abs_logit_diff"], cv["steered"]["max_abs_logit_diff"], edit["max_abs_logit_diff"])
        rows.append([f"llama.cpp {cv['version']}", "the organism as GGUF; our control vector applied; our weight edit",
                     f"same tokens {_of(cv['plain']['same_tokens'])} plain, {_of(cv['steered']['same_tokens'])} "
                     f"steered, {_of(edit['same_tokens'])} edited; first-token logits within "
                     f"{_sci(worst)}"])  # fmt: skip
    if REPENG in tests:
        f = tests[REPENG]["figures"]
        rows.append(
            [
                "repeng 0.4.0",
                "its trained vector imported by us; our exported vector loaded by it",
                f"same tokens {_of(f['repeng_vector_same_tokens'])} and {_of(f['our_vector_same_tokens'])}",
            ]
        )
    if SV in tests:
        f = tests[SV]["figures"]
        rows.append([f"steering-vectors {f['versions']['steering_vectors']}",
                     "its extraction and steering on our saved model (transformers 4)",
                     f"cosine >= {math.floor(f['min_cosine'] * 1e7) / 1e7:.7f} at every layer; same tokens "
                     f"{_of(f['steered_same_tokens'])} steered"])  # fmt: skip
    return rows


def time_rows(tests: dict[str, Any]) -> list[list[str]]:
    return [[name, f"{t['seconds']:.0f} s", f"{t['machine']['cpu']}, {t['machine']['cores']} cores"]
            for name, t in tests.items()]  # fmt: skip


def build_rows(envs: dict[str, Any]) -> list[list[str]]:
    return [[name, f"{e['seconds'] / 60:.1f} min", f"{e['machine']['cpu']}, {e['machine']['cores']} cores"]
            for name, e in envs.items()]  # fmt: skip


def built_envs(machine: dict[str, Any]) -> dict[str, Any]:
    """The side environments whose build `make interop` timed (the seconds it wrote into `.installed`)."""
    out = {}
    for name, folders in ENVS.items():
        text = (folders[0] / ".installed").read_text().strip() if (folders[0] / ".installed").is_file() else ""
        if text.isdigit():
            out[name] = {"seconds": int(text), "machine": machine}
    return out


def tables(tests: dict[str, Any], envs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    setup = (f"{ORGANISM}, float32 on CPU; {N_EVAL} eval prompts ({N_HARMFUL} harmful, {N_HARMLESS} harmless), greedy, "
             f"up to {MAX_NEW} new tokens; directions from {N_PAIRS} contrast pairs; steering {ALPHA} relative at "
             f"layer {LAYER}")  # fmt: skip
    return [
        {"id": "peers", "title": "Interop with the real clients", "note": setup,
         "headers": ["peer", "what was checked", "measured agreement"], "rows": peer_rows(tests)},
        {"id": "agreement", "title": "Interop: what was checked, what was measured", "note": setup,
         "headers": ["peer (version)", "what was checked", "measured agreement", "the test asserts"],
         "rows": agreement_rows(tests)},
        {"id": "time", "title": "Interop tests: seconds each (set-up of the shared fixtures included in the first)",
         "headers": ["test", "seconds", "machine"], "rows": time_rows(tests)},
        {"id": "build", "title": "Side environments: build time, once (make interop-envs)",
         "headers": ["environment", "build time", "machine"], "rows": build_rows(envs or {})},
    ]  # fmt: skip


def write_record(path: Path) -> None:
    """Merge this session's figures into the JSON file at `path`, with the tables rendered from all of it."""
    from crystallized_safety.precision import cpu_name, native_bf16

    if not FIGURES:
        return
    old = json.loads(path.read_text()) if path.is_file() else {}
    machine = {"cpu": cpu_name(), "native_bf16": native_bf16(), "cores": os.cpu_count(), "torch": torch.__version__}
    tests = dict(old.get("tests", {}))
    for name, figures in FIGURES.items():
        figures = json.loads(json.dumps(figures))  # as the file will hold them (integer keys become strings)
        tests[name] = {"figures": figures, "seconds": round(DURATIONS.get(name, float("nan")), 1), "machine": machine}
    tests = dict(sorted(tests.items()))
    setup = {"organism": ORGANISM, "layer": LAYER, "alpha_relative": ALPHA, "contrast_pairs": N_PAIRS,
             "eval_prompts": {"harmful": N_HARMFUL, "harmless": N_HARMLESS}, "max_new_tokens": MAX_NEW}  # fmt: skip
    envs = {**old.get("environments", {}), **built_envs(machine)}
    data = {"setup": setup, "tests": tests, "environments": envs,
            "models": [{"model": "interop", "tables": tables(tests, envs)}]}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
