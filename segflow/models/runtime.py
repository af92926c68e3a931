"""Where a model runs and in which precision.

CPU inference is fp32 without autocast unless bf16 is asked for, so CPU results are
reproducible by default; on CUDA ``"auto"`` is reduced precision (bf16 where supported, else
fp16). fp16 runs on CUDA only: CPU autocast to fp16 is slow and loses range.
"""

from __future__ import annotations

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; an explicit CUDA request must be
    satisfiable rather than silently falling back to a much slower CPU run."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return resolved


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32."""
    if precision not in ("auto", "fp32", *_AUTOCAST_DTYPES):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError(
                f"precision (--precision) 'fp16' needs a CUDA device; on the CPU use fp32 or "
                f"bf16 (device is {device})"
            )
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _AUTOCAST_DTYPES.get(precision)


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """channels_last by default on CUDA only, where convolutions are faster in NHWC; CPU keeps
    the default layout so its results do not depend on the layout-specific kernels."""
    use_channels_last = device.type == "cuda" if channels_last is None else channels_last
    return torch.channels_last if use_channels_last else torch.contiguous_format


def prepare_module(
    module: torch.nn.Module, device: torch.device, layout: torch.memory_format
) -> torch.nn.Module:
    """Put a network in inference state on its device and in its memory layout."""
    return module.eval().requires_grad_(False).to(device=device, memory_format=layout)
