"""Input checks shared by every public op.

Every check runs before any kernel launches and raises a ``ValueError`` or
``TypeError`` that names the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._kernels import collapse_rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"{name} must have shape (..., T, V) with at least 2 dims, got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have V >= 1 (last dim), got shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 on the vocabulary (last) dim, got strides {tuple(logits.stride())}; "
            "slice the leading dims freely, but keep V contiguous"
        )
    collapse_rows(logits.shape[:-1], logits.stride()[:-1])  # raises if the rows cannot be addressed


def check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def _same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_tokens(tokens, logits: torch.Tensor, name: str = "tokens", logits_name: str = "logits") -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have shape {tuple(logits.shape[:-1])} ({logits_name}.shape[:-1]), "
            f"got {tuple(tokens.shape)}"
        )
    _same_device(tokens, logits, name, logits_name)


def check_token_range(tokens: torch.Tensor, vocab: int, valid: Optional[torch.Tensor] = None,
                      name: str = "tokens") -> None:
    """Token ids must lie in [0, V) (only where ``valid`` is true, if given)."""
    if tokens.numel() == 0:
        return
    bad = (tokens < 0) | (tokens >= vocab)
    if valid is not None:
        bad &= valid
    if bool(bad.any()):  # one device sync on the fast path; details only on failure
        t = tokens if valid is None else tokens[valid]
        lo, hi = int(t.min()), int(t.max())
        where = "" if valid is None else " (at unmasked positions)"
        raise ValueError(f"{name} must lie in [0, V) = [0, {vocab}){where}, got values in [{lo}, {hi}]")


def resolve_mask(mask, lengths, tokens: torch.Tensor, check_values: bool = True,
                 name: str = "mask") -> Optional[torch.Tensor]:
    """Turn ``mask`` (..., T) or ``lengths`` (...) into a bool mask (..., T), or None (all valid).

    ``check_values=False`` skips the data-dependent range check of ``lengths``
    (used under torch.compile, where reading values would break the graph).
    """
    if mask is not None and lengths is not None:
        raise ValueError("give either mask or lengths, not both")
    T = tokens.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"{name} must have shape {tuple(tokens.shape)} (tokens' shape), got {tuple(mask.shape)}")
        _same_device(mask, tokens, name, "tokens")
        if mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
        return mask if mask.dtype == torch.bool else mask != 0
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor):
            raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if tuple(lengths.shape) != tuple(tokens.shape[:-1]):
            raise ValueError(
                f"lengths must have shape {tuple(tokens.shape[:-1])} (tokens.shape[:-1]), got {tuple(lengths.shape)}"
            )
        _same_device(lengths, tokens, "lengths", "tokens")
        if check_values and lengths.numel():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{lo}, {hi}]")
        return torch.arange(T, device=tokens.device) < lengths.unsqueeze(-1)
    return None
