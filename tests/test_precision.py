"""bf16 by capability: the CPU report, the decision rule, and a CPU without native bf16 emulated for real
(PyTorch limited to AVX2 kernels, as on AVX2-only machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from crystallized_safety import precision
from crystallized_safety.errors import CrystallizedSafetyError


@pytest.fixture(autouse=True)
def fresh_detect():
    precision.detect.cache_clear()
    yield
    precision.detect.cache_clear()


def test_no_bf16_flags_means_fp32_without_probing(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision, "probe", lambda: pytest.fail("no probe without bf16 instructions"))
    report = precision.detect()
    assert report.native_bf16 is False and report.bf16_flags == ()
    assert "emulated" in report.reason
    assert precision.resolve("auto") == ("fp32", "no native bf16 on cpu")
    assert "emulated" in precision.warn_if_emulated(torch.bfloat16, torch.device("cpu"))
    assert precision.warn_if_emulated(torch.float32, torch.device("cpu")) is None


def test_flags_but_avx2_kernels_is_not_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "avx2"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(precision, "probe", lambda: pytest.fail("no probe for AVX2 kernels"))
    report = precision.detect()
    assert report.native_bf16 is False and "AVX2 kernels" in report.reason


@pytest.mark.parametrize("fp32_ms, bf16_ms, native", [(40.0, 15.0, True), (40.0, 39.0, False), (50.0, 900.0, False)])
def test_probe_decides_when_flags_and_kernels_allow(monkeypatch, fp32_ms, bf16_ms, native):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(precision, "probe", lambda: (fp32_ms, bf16_ms))
    report = precision.detect()
    assert report.native_bf16 is native
    assert report.probe_fp32_ms == fp32_ms and report.probe_bf16_ms == bf16_ms
    assert precision.resolve("auto")[0] == ("bf16" if native else "fp32")


def test_explicit_choice_and_environment_override(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    assert precision.resolve("bf16") == ("bf16", "asked for explicitly")
    assert precision.resolve("FP32")[0] == "fp32"
    monkeypatch.setenv("CSAFETY_PRECISION", "bf16")
    assert precision.resolve("auto")[0] == "bf16"
    monkeypatch.setenv("CSAFETY_PRECISION", "fast")
    with pytest.raises(CrystallizedSafetyError, match="CSAFETY_PRECISION"):
        precision.resolve("auto")
    with pytest.raises(CrystallizedSafetyError, match="unknown precision 'half'"):
        precision.resolve("half")


def test_probe_measures_both_precisions():
    fp32_ms, bf16_ms = precision.probe(repeats=1)
    assert fp32_ms > 0 and bf16_ms > 0


def test_real_cpu_without_native_bf16_kernels_says_fp32():
    """PyTorch restricted to AVX2 (ATen and oneDNN), as on an AVX2-only CPU: whatever this machine is,
    the report must say bf16 is not native and `auto` must choose fp32."""
    code = (
        "import json; from crystallized_safety import precision as p; r = p.detect(); "
        "print(json.dumps([r.native_bf16, r.torch_capability, p.resolve('auto')[0]]))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CSAFETY_PRECISION": "auto"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    native, capability, chosen = json.loads(out.stdout.strip().splitlines()[-1])
    assert (native, capability, chosen) == (False, "AVX2", "fp32")


def test_a_bf16_spec_on_a_cpu_without_bf16_warns_and_a_loaded_probe_does_not(monkeypatch):
    from crystallized_safety.experiments.spec import parse_spec

    data = {"name": "t", "models": ["m"], "prompts": {"n": 40}, "dtype": "mixed", "studies": [{"kind": "readability"}]}
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(UserWarning, match="dtype mixed: this CPU emulates bf16"):
        parse_spec(data)
    assert precision.emulated_bf16("cuda") is None
    # flags and AVX-512 kernels: no warning, whatever a probe on a busy machine would read
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(precision, "probe", lambda: (10.0, 11.0))
    assert precision.emulated_bf16("auto") is None
