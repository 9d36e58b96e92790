"""Where a result was computed: tool, library and Python versions, the CPU (and whether it runs bf16
natively), the accelerator and thread count. Recorded in every store run and organism card, because greedy
tokens depend on float rounding and so on all of these."""

from __future__ import annotations

import platform

import torch

from . import __version__


def environment() -> dict:
    import transformers

    from .precision import detect

    cpu = detect()
    return {
        "tool_version": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpu": cpu.cpu,
        "native_bf16": cpu.native_bf16,
        "bf16_report": cpu.reason,
    }
