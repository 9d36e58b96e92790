"""The side environments the interop tests run the real clients in, and how a test runs code there.

`make interop` builds them under .venvs/ (gitignored) and a test never installs anything: where one is missing,
the test skips and names that target. Each environment is a `pip install --target` folder holding only the
pinned packages that differ from .venv; a script in this directory runs in a subprocess of this venv's Python with
that folder first on PYTHONPATH (torch and the rest come from .venv). A script reads a JSON request and writes a
JSON answer, plus an .npz file for large arrays (logits, vectors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENVS = ROOT / ".venvs"
ENVS = {
    # llama-cpp-python 0.3.36 built from its sdist (CPU only), with what llama.cpp's converter pins: transformers
    # 4.57.6 (the side-envs folder) and sentencepiece
    "llama-cpp": (VENVS / "llama-cpp", VENVS / "transformers-4.57"),
    "repeng": (VENVS / "repeng",),  # repeng 0.4.0 with numpy 1.26 (it pins numpy < 2), scikit-learn
    "steering-vectors": (VENVS / "steering-vectors", VENVS / "transformers-4.57"),  # pins transformers < 5
}
LLAMA_SRC = VENVS / "llama-cpp-src"  # the unpacked sdist: vendor/llama.cpp/convert_hf_to_gguf.py and its gguf-py
CONVERT = LLAMA_SRC / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def env_missing(name: str) -> str | None:
    """Why side environment `name` cannot be used (the folder missing, and the target that builds it), or None."""
    missing = [p for p in ENVS[name] if not (p / ".installed").is_file()]
    return f"no {name} side environment at {missing[0]}: run `make interop`" if missing else None


def needs(*names: str) -> pytest.MarkDecorator:
    """Skip, before any fixture is built, where one of these side environments is missing."""
    reasons = [r for r in map(env_missing, names) if r]
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))


def env_paths(name: str) -> tuple[Path, ...]:
    """The folders of side environment `name`; skips the calling test, naming the target, where one is missing."""
    reason = env_missing(name)
    if reason:
        pytest.skip(reason)
    return ENVS[name]


def _env(name: str) -> dict[str, str]:
    pythonpath = os.pathsep.join(str(p) for p in env_paths(name))
    # one compute thread: threads that spin-wait on each other are many times slower on a busy 2-core machine
    return {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def run_side(name: str, script: str, request: dict[str, Any], workdir: Path, timeout: int = 1800) -> dict[str, Any]:
    """Run `script` (a file of this directory) in side environment `name` on `request`; its JSON answer, with the
    arrays it saved (if any) under their names."""
    workdir.mkdir(parents=True, exist_ok=True)
    stem = workdir / Path(script).stem
    request_file = stem.with_suffix(".request.json")
    request_file.write_text(json.dumps(request))
    res = subprocess.run(
        [sys.executable, str(HERE / script), str(request_file), str(stem)],
        capture_output=True,
        text=True,
        env=_env(name),
        timeout=timeout,
    )
    assert res.returncode == 0, f"{script} failed in the {name} environment:\n{res.stderr[-4000:]}"
    answer = json.loads(stem.with_suffix(".answer.json").read_text())
    arrays = stem.with_suffix(".npz")
    if arrays.is_file():
        with np.load(arrays) as npz:
            answer.update({key: npz[key] for key in npz.files})
    return answer


def convert_to_gguf(model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """A Hugging Face model directory as a GGUF file, by llama.cpp's own converter (the one in the sdist that the
    llama-cpp environment was built from, with its own gguf-py), in the llama-cpp environment (transformers 4.57)."""
    res = subprocess.run(
        [sys.executable, str(CONVERT), str(model_dir), "--outfile", str(out), "--outtype", outtype],
        capture_output=True,
        text=True,
        env=_env("llama-cpp"),
        timeout=1200,
    )
    assert res.returncode == 0 and out.is_file(), f"convert_hf_to_gguf.py failed:\n{res.stderr[-4000:]}"
    return out


def same_share(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of rows whose token lists are identical."""
    assert len(a) == len(b) and a
    return sum(list(x) == list(y) for x, y in zip(a, b)) / len(a)


def common_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    """The mean share of each row's tokens, from the start, that the two agree on (1.0 = identical rows)."""
    shares = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        shares.append(n / max(len(x), len(y), 1))
    return float(np.mean(shares))


# --------------------------------------------------------------------------- the tool's own side

LAYER, ALPHA = 12, -0.3  # relative alpha: where the direction flips the organism (tests/conftest.py ORGANISM_SPEC)
N_PAIRS = 48  # contrast pairs (bundled extract splits), for this tool, steering-vectors and repeng alike
N_HARMFUL, N_HARMLESS = 16, 8  # eval prompts generated on
MAX_NEW = 32
ORGANISM = "smollm2-135m-refusal"


@dataclass
class Run:
    """One greedy generation over the eval prompts: new tokens per prompt (cut before the end token), the
    responses, and the logits after each prompt [prompts, vocab]."""

    tokens: list[list[int]]
    responses: list[str]
    first: np.ndarray


def our_run(model, prompts, intervention=None) -> Run:
    from crystallized_safety.core.generation.api import generate
    from crystallized_safety.core.generation.fast import FastEngine

    firsts: dict[int, torch.Tensor] = {}
    engine = FastEngine(on_first_logits=lambda rows, logits: firsts.__setitem__(rows.start, logits.float().clone()))
    gens = generate(model, prompts, intervention, max_new_tokens=MAX_NEW, engine=engine)
    first = torch.cat([firsts[k] for k in sorted(firsts)]).numpy()
    return Run([list(g.token_ids) for g in gens], [g.response for g in gens], first)


def refusals(responses: list[str]) -> int:
    from crystallized_safety.judges.substring import SubstringJudge

    judge = SubstringJudge()
    return sum(bool(judge.judge_one(r).refusal) for r in responses)
