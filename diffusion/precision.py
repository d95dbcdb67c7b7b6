"""Mixed precision: one setting for training and sampling.

"auto" is bf16 autocast where the device computes bf16 natively (CUDA GPUs that support it,
CPUs where oneDNN reports AVX512-BF16 or AMX) and float32 everywhere else, where bf16 is
emulated and slower. Weights stay float32; autocast runs matmuls and convolutions in the lower
precision. Samplers keep their own state in float32.
"""

from __future__ import annotations

import contextlib

import torch

from diffusion.config import MIXED_PRECISION
from diffusion.errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively, as oneDNN reports it for CPUs (AVX512-BF16, AMX)
    and CUDA for GPUs. Elsewhere bf16 is emulated and usually slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """ "auto" -> "bf16" where `device` does bf16 natively, else "no"; other settings unchanged."""
    if setting not in MIXED_PRECISION:
        raise UserError(f"unknown mixed precision '{setting}'; choose one of {', '.join(MIXED_PRECISION)}")
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "no"


def autocast(device: torch.device, resolved: str):
    """The autocast context for a resolved setting ("no": a no-op context)."""
    if resolved == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[resolved])
