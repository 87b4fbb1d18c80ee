"""What `--dtype auto` means on this machine, the same for both engines.

On a CPU, bf16 pays only where the CPU computes it natively: AMX or AVX512-BF16 on x86 (the flags
vLLM's CPU backend checks to load its bf16 kernels), the BF16 extension on Arm. Elsewhere it is
emulated and slower than fp32. The Δ-Mem state is fp32 whatever the model's dtype.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import cache

import torch


@cache
def cpu_has_native_bf16() -> bool:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if machine in ("aarch64", "arm64"):
        if sys.platform == "darwin":
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, check=False)
            return out.stdout.strip() == b"1"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                return any(line.startswith("Features") and " bf16" in line for line in f)
        except OSError:
            return False
    return False


def auto_dtype(device: str) -> str:
    """The model dtype `--dtype auto` picks: bf16 on a GPU and on a CPU with native bf16, else fp32."""
    if not device.startswith("cpu"):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def resolve_dtype(requested: str, device: str) -> str:
    return auto_dtype(device) if requested == "auto" else requested
