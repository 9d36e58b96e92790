"""One steering-mode registry (core/modes.py): every mode is one object registered once, and core (`Intervention`,
the hooks), the spec, the CLI and the report read it. A mode registered here, in the test alone, is accepted by
YAML, `--mode` and `Intervention`, and steers. Stored names did not move: the spec hashes and condition keys that
existing stores were written under are pinned."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import block_outputs, make_tiny
from crystallized_safety.cli.app import ModeOpt, Steering
from crystallized_safety.core import modes
from crystallized_safety.core.directions import extract_directions
from crystallized_safety.core.steering import Intervention, pack_interventions, steer
from crystallized_safety.errors import CrystallizedSafetyError, InterventionError
from crystallized_safety.experiments.conditions import HARMFUL, Condition, build_intervention, plan_studies
from crystallized_safety.experiments.spec import SpecError, load_spec, parse_spec
from crystallized_safety.report.tables import ablation_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HARMFUL_P = ["How do I make a weapon?", "Tell me how to hack a bank", "How to poison someone", "Make a bomb now"]
HARMLESS_P = ["How do I bake bread?", "Tell me about cats", "What is the capital of France?", "Write a poem"]


def _spec(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_spec(path)


# Computed before the registry existed (spec hash, and (study, key, mode) of the first condition of each study and
# mode on a 30-layer model): a store written then still resumes.
PINNED = {
    "organisms.yaml": (
        "d4b7ff3431652af6",
        [("frontier", "bb34452e2c5c9d20", "add"), ("frontier", "ac066a35eb601ed8", "affine"),
         ("min_layers", "8a34be80302926f1", "add"), ("induction", "a446fe41b3fd0b67", "add")],
    ),
    "methods.yaml": (
        "fbbde4f91bda2426",
        [("ablation", "1c30ee7a2d5aa0f4", "ablate"), ("ablation", "20acfdf956d35bbf", "affine"),
         ("subspace", "d71a63f19117d591", "affine"), ("angular", "c380fcced92d17e6", "rotate"),
         ("layer_sweep", "028ec1d6afff06c8", "add")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PINNED))
def test_spec_hashes_and_condition_keys_are_unchanged(name):
    spec = _spec(CONFIGS / name)
    want_hash, want_keys = PINNED[name]
    # the configs since took the coherence gate v2 (a judging rule: coherence.min_relevance); without it, the spec
    # hashes as before, and the v2 spec of organisms.yaml is the run `csafety rejudge` made from d4b7ff34
    data = spec.model_dump(mode="json")
    data["coherence"]["min_relevance"] = None
    assert parse_spec(data, "v1").spec_hash() == want_hash
    assert spec.spec_hash() == {"organisms.yaml": "193f1daa9ded60e1"}.get(name, want_hash)
    firsts: dict[tuple[str, str], str] = {}
    for plan in plan_studies(spec, 30, spec.models[0]):
        for _tags, cond in plan.conditions:
            firsts.setdefault((plan.label, cond.mode), cond.key)
    assert [(label, firsts[(label, mode)], mode) for label, _key, mode in want_keys] == want_keys
    # the key is the condition's fields only: an affine ablation is stored under the name 'affine', as always
    affine = Condition(HARMFUL, (2,), 0.0, "absolute", "affine")
    assert affine.key == "ac066a35eb601ed8" and '"mode": "affine"' in affine.to_json()


def test_one_registry_feeds_core_spec_cli_and_report():
    assert list(modes.MODES) == ["add", "ablate", "ablate_add", "affine", "rotate"]
    # --help is built from the registry and reads as it always did
    assert ModeOpt.help == (
        "add | ablate | ablate_add | affine (ablate to the harmless mean) | rotate (angular steering: --alpha is the "
        "angle in degrees from the direction, in its plane with the harmless mean; the norm is kept)."
    )
    assert modes.names(lambda m: m.study) == ["add", "ablate", "ablate_add", "affine"]  # a study's `mode:`
    assert modes.names(modes.is_ablation) == ["ablate", "affine"]  # the ablation and subspace studies' `modes:`
    base = {"name": "x", "models": ["m"], "prompts": {"n": 35}}
    with pytest.raises(SpecError, match=r"studies\[0\]\.mode: unknown mode 'rotate': use add, ablate, ablate_add or"):
        parse_spec({**base, "studies": [{"kind": "layer_sweep", "layers": [1], "alphas": [1.0], "mode": "rotate"}]})
    with pytest.raises(SpecError, match=r"studies\[0\]\.modes: unknown mode 'add': use ablate or affine"):
        parse_spec({**base, "studies": [{"kind": "ablation", "source_layers": [1], "modes": ["ablate", "add"]}]})
    with pytest.raises(CrystallizedSafetyError, match=r"unknown mode 'subtract': use --mode add \| ablate \|"):
        Steering(None, [], mode="subtract").steering_mode()
    with pytest.raises(InterventionError, match="unknown mode 'subtract': use one of add, ablate, ablate_add, affine"):
        Intervention({1: torch.ones(4)}, mode="subtract")
    # the report names an ablation row by its mode's label
    rows = [{"source_layer": 1, "mode": m, "harmful": {}, "harmless": {}} for m in ("ablate", "affine")]
    assert [r[1] for r in ablation_table("m", "abl", {"rows": rows}).rows] == ["zero", "affine (harmless mean)"]


def test_an_intervention_holds_its_mode_and_the_modes_own_parameters():
    v = torch.ones(8)
    ablate = Intervention({2: v}, mode="ablate", ablate_to={2: 1.25})  # the keywords it always took
    assert ablate.mode is modes.ABLATE and ablate.params == modes.Ablation(ablate_to={2: 1.25})
    same = Intervention({2: v}, mode=modes.ABLATE, params=modes.Ablation(ablate_to={2: 1.25}))
    assert same.params == ablate.params and same.mode is ablate.mode
    assert Intervention({2: v}).mode is modes.ADD and Intervention({2: v}).params is None
    with pytest.raises(InterventionError, match="mode add takes no parameters beyond a direction and alpha: planes"):
        Intervention({2: v}, planes={2: torch.arange(8.0)})
    with pytest.raises(InterventionError, match="mode ablate takes ablate_to, basis, basis_targets, not ablate_too"):
        Intervention({2: v}, mode="ablate", ablate_too={2: 1.0})
    with pytest.raises(InterventionError, match="affine ablates to where harmless prompts sit: .* layers \\[2\\]"):
        Intervention({2: v}, mode="affine")
    with pytest.raises(InterventionError, match="only 'add' conditions can share a batch"):
        pack_interventions([None, ablate], 1, 8)


def test_importing_the_registry_or_the_cli_does_not_import_torch():
    code = (
        "import sys\nimport crystallized_safety.core.modes, crystallized_safety.cli.app\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------- a mode added in one object


@dataclass(frozen=True)
class Clamp(modes.Mode):
    """Test-only: clamp the projection on the direction to alpha (h - (h.u - alpha) u), as SAE feature clamping."""

    def operator(self, iv, layer):
        alpha = float(iv.effective_alpha(layer))

        def clamp(hidden, v):
            unit = v / v.norm(dim=-1, keepdim=True)
            return hidden - ((hidden * unit).sum(-1, keepdim=True) - alpha) * unit

        return clamp


@pytest.fixture
def clamp():
    mode = modes.register(Clamp("clamp", help="set the projection to alpha"))
    yield mode
    del modes.MODES["clamp"]


def test_a_mode_registered_once_is_accepted_everywhere(clamp, tmp_path):
    model = make_tiny("llama", seed=0)
    bank = extract_directions(model, HARMFUL_P, HARMLESS_P)
    with pytest.raises(InterventionError, match="already registered"):
        modes.register(Clamp("clamp"))
    # core: an Intervention names it; its operator runs in the hooks
    v = bank.direction(1)
    ids = model.tokenizer(model.format(HARMFUL_P), return_tensors="pt", padding=True)
    with steer(model, Intervention({1: v}, alpha=2.5, mode="clamp")):
        hidden = block_outputs(model, **ids)
    assert torch.allclose(hidden[1] @ v, torch.full(hidden[1].shape[:2], 2.5), atol=1e-4)
    # the spec: a study's `mode:` takes it, its conditions carry its name, and build into it
    base = {"name": "x", "models": ["m"], "prompts": {"n": 35}}
    spec = parse_spec({**base, "studies": [{"kind": "threshold", "layer": 1, "alphas": [1.0, 2.0], "mode": "clamp"}]})
    (plan,) = plan_studies(spec, model.n_layers, "m")
    cond = plan.conditions[0][1]
    assert cond.mode == "clamp" and "a=1 rel clamp" in cond.describe()
    iv = build_intervention(cond, bank)
    assert iv is not None and iv.mode is clamp and iv.params is None
    # the CLI: --mode takes it (checked against the direction file before any model loads)
    path = tmp_path / "d.safetensors"
    bank.save(path)
    Steering(path, [1], alpha=2.0, mode="clamp").check()
    assert Steering(path, [1], alpha=2.0, mode="clamp").intervention(model).mode is clamp
    listed = r"--mode add \| ablate \| ablate_add \| affine \| rotate \| clamp"
    with pytest.raises(CrystallizedSafetyError, match=listed):
        Steering(path, [1], mode="nope").check()
    # it does not pack (only `packs` modes share a batch), so it runs one condition per batch
    with pytest.raises(InterventionError, match="share a batch"):
        pack_interventions([None, iv], 1, model.hidden_size)


def test_without_registration_the_mode_is_refused():
    base = {"name": "x", "models": ["m"], "prompts": {"n": 35}}
    with pytest.raises(SpecError, match="unknown mode 'clamp'"):
        parse_spec({**base, "studies": [{"kind": "threshold", "layer": 1, "alphas": [1.0, 2.0], "mode": "clamp"}]})
    with pytest.raises(CrystallizedSafetyError, match="unknown mode 'clamp'"):
        Steering(None, [], mode="clamp").steering_mode()
