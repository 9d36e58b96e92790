"""Which precision to compute in: bf16 only where this processor runs it natively, fp32 elsewhere.

On a CPU, bf16 is fast only with native instructions (Intel AMX, AVX512-BF16); elsewhere PyTorch
emulates it, e.g. 18-27x slower than fp32 for a linear layer's forward + backward on AVX2-only CPUs.
So nothing here assumes bf16 is fast: `detect()` reads the processor's flags, checks which kernels
PyTorch will really run (ATen's CPU capability, oneDNN's bf16 support), and times a short probe.
`resolve()` turns a user's `auto | fp32 | bf16` into a decision with its reason.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from .errors import CrystallizedSafetyError

CHOICES = ("auto", "fp32", "bf16")
# x86: Intel AMX and AVX512-BF16 (Sapphire Rapids, Zen 4+); Arm: the BF16 extension.
NATIVE_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
# bf16 must beat fp32 by this factor in the probe to count as native (emulation is 10x+ slower).
PROBE_MAX_RATIO = 0.9


@dataclass(frozen=True)
class CpuReport:
    """What this CPU offers for bf16, and how it measured."""

    cpu: str
    bf16_flags: tuple[str, ...]
    torch_capability: str
    onednn_bf16: bool
    probe_fp32_ms: float | None
    probe_bf16_ms: float | None
    native_bf16: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        native = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.cpu} ({native}: {self.reason})"


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo; platform's guess elsewhere)."""
    info = _cpuinfo()
    for key in ("model name", "Model", "Hardware"):
        if key in info:
            return info[key]
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def _onednn_bf16() -> bool:
    """Whether oneDNN (which runs autocast's bf16 matmuls on CPU) has bf16 kernels for this CPU."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def probe(repeats: int = 3) -> tuple[float, float]:
    """(fp32 ms, bf16-autocast ms) for a 256x576 -> 1536 linear layer's forward + backward on this CPU."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(576, 1536)
    x = torch.randn(256, 576, generator=gen, requires_grad=True)

    def once(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.float().sum().backward()
        return time.perf_counter() - t0

    times = {}
    for bf16 in (False, True):
        once(bf16)  # warm-up: kernel selection, allocation
        times[bf16] = min(once(bf16) for _ in range(repeats)) * 1000
    return round(times[False], 2), round(times[True], 2)


@lru_cache(maxsize=1)
def detect() -> CpuReport:
    """This CPU's bf16 capability: flags, the kernels PyTorch will run, and a timed probe (~0.2 s)."""
    flags = tuple(sorted(cpu_flags() & set(NATIVE_FLAGS)))
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = _onednn_bf16()
    fp32_ms = bf16_ms = None
    if not flags:
        native, reason = False, "no AMX or AVX512-BF16 instructions; bf16 would be emulated"
    elif not onednn or capability in ("DEFAULT", "AVX2", "NO AVX"):
        native, reason = False, f"bf16 instructions present but PyTorch runs {capability} kernels"
    else:
        fp32_ms, bf16_ms = probe()
        native = bf16_ms <= PROBE_MAX_RATIO * fp32_ms
        verb = "faster" if native else "not faster"
        reason = f"{'+'.join(flags)}; probe: bf16 {bf16_ms} ms vs fp32 {fp32_ms} ms ({verb})"
    return CpuReport(cpu_name(), flags, capability, onednn, fp32_ms, bf16_ms, native, reason)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 is fast on `device` (CUDA: the GPU supports it; CPU: `detect()`)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return detect().native_bf16


def resolve(choice: str, device: str | torch.device = "cpu", timed: bool = True) -> tuple[str, str]:
    """`auto | fp32 | bf16` -> (`fp32` or `bf16`, why). `CSAFETY_PRECISION` sets the default for `auto`.
    `timed=False` decides `auto` from the CPU's flags and PyTorch's kernels only, never the timed probe (which
    reads 'not faster' on a loaded machine): what an organism build uses, since the precision picks the organism."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        choice = os.environ.get("CSAFETY_PRECISION", "auto").strip().lower() or "auto"
        if choice not in CHOICES:
            raise CrystallizedSafetyError(f"CSAFETY_PRECISION={choice!r} is not one of: {', '.join(CHOICES)}")
    if choice not in CHOICES:
        raise CrystallizedSafetyError(f"unknown precision '{choice}': use {', '.join(CHOICES)}")
    if choice != "auto":
        return choice, "asked for explicitly"
    dev = torch.device(device)
    native = native_bf16(dev) if timed or dev.type != "cpu" else bf16_kernels()
    if native:
        return "bf16", f"native bf16 on {torch.device(device).type}"
    return "fp32", f"no native bf16 on {torch.device(device).type}"


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> str | None:
    """A one-line warning when bf16 was asked for on a CPU that would emulate it, else None."""
    if dtype is torch.bfloat16 and device.type == "cpu" and not detect().native_bf16:
        return (
            f"bf16 on this CPU is emulated ({detect().reason}): expect it to be many times slower than float32; "
            "use --dtype float32"
        )
    return None


def emulated_bf16(device: str = "auto") -> str | None:
    """For a spec whose dtype computes in bf16 (bfloat16, float16, mixed): a warning when it would run on a CPU
    without bf16 instructions or kernels (emulated, many times slower than float32 there), else None. Decided
    from the CPU's flags and PyTorch's kernels only: the timed probe reads 'not faster' on a loaded machine."""
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and not bf16_kernels():
        capability = torch.backends.cpu.get_cpu_capability()
        return f"this CPU emulates bf16 ({capability} kernels): expect it many times slower; use dtype: float32"
    return None


def bf16_kernels() -> bool:
    """Whether this CPU has bf16 instructions and PyTorch runs bf16 kernels for them: `detect()` without its timed
    probe, so the same answer on an idle and on a loaded machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags() & set(NATIVE_FLAGS)
    return bool(flags) and _onednn_bf16() and capability not in ("DEFAULT", "AVX2", "NO AVX")
