"""Argument checks shared by every public op: shapes, dtypes, devices, temperature.

Every check here runs before any kernel launches and raises one of :mod:`gspo_kernels.errors`'
classes (``ShapeError``, ``DTypeError``, ``DeviceError``, ``OptionError``: subclasses of
``ValueError`` / ``TypeError``) naming the argument, what was expected and what came.

Checks that read tensor values (token ids in range, lengths in ``[0, T]``) are queued on the
call's :class:`~gspo_kernels._checks.ValueChecks` (one device flag, read once), or, without
one, read at once -- inside a ``torch.library`` custom op under ``torch.compile(fullgraph=True)``,
an opaque graph node that still runs (and raises) at run time, with no graph break.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import LazyMessage, ValueChecks
from ._kernels import collapse_rows
from .errors import DeviceError, DTypeError, InputValueError, OptionError, ShapeError, reshape_hint

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One rule for ids and lengths, on every backend: int32 or int64 (what tokenizers,
# torch.randint and .sum() give); narrower or unsigned ids are refused, not cast.
INDEX_DTYPES = (torch.int32, torch.int64)
# Temperatures whose 1/tau is a normal fp32 number with room to spare: the
# kernels take 1/tau in fp32 and scale differences of logits by it.
TEMPERATURE_RANGE = (1e-30, 1e30)


def check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ShapeError(f"{name} must have shape (..., T, V) with at least 2 dims, got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ShapeError(f"{name} must have V >= 1 (last dim), got shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ShapeError(
            f"{name} must have stride 1 on the vocabulary (last) dim, got strides {tuple(logits.stride())}; "
            "slice the leading dims freely, but keep V contiguous"
        )
    collapse_rows(logits.shape[:-1], logits.stride()[:-1])  # raises if the rows cannot be addressed


def check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise OptionError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        if temperature.device.type == "meta":
            raise OptionError("temperature must be a number or a tensor holding a value, got a meta tensor")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise DTypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise OptionError(f"temperature must be finite and > 0, got {temperature}")
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        raise OptionError(
            f"temperature must lie in [{lo:g}, {hi:g}] (1/temperature is taken in fp32), got {temperature:g}"
        )
    return temperature


def _same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise DeviceError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_index_dtype(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise DTypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def tokens_shape_message(name: str, got, lead, src_name: str = "logits") -> str:
    """Why ``name`` of shape ``got`` does not fit ``src_name`` whose leading shape is ``lead``
    (``src.shape[:-1]``), with the fix: logits left unsliced (more positions than tokens, e.g.
    prompt + completion) get the slice that keeps the completion's positions; anything else of
    the right size, the reshape."""
    got, lead = tuple(got), tuple(lead)
    msg = f"{name} must have shape {lead} ({src_name}.shape[:-1]), got {got}"
    if len(got) == len(lead) and got[:-1] == lead[:-1] and lead[-1] > got[-1]:
        T, P = got[-1], lead[-1] - got[-1]
        return (
            f"{msg}: {src_name} have {lead[-1]} positions for T = {T} tokens, so they look unsliced "
            f"(prompt + completion). Keep the {T} positions that predict the completion tokens "
            f"(position t predicts token t + 1): {src_name}[..., -{T + 1}:-1, :], i.e. "
            f"{src_name}[..., P-1:-1, :] for a prompt of P = {P} tokens"
        )
    return msg + reshape_hint(name, got, [lead])


def check_tokens(tokens, logits: torch.Tensor, name: str = "tokens", logits_name: str = "logits") -> None:
    check_index_dtype(tokens, name)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(tokens_shape_message(name, tokens.shape, logits.shape[:-1], logits_name))
    _same_device(tokens, logits, name, logits_name)


def check_linear_args(hidden, weight, tokens, bias, temperature, chunk_size, memory_budget=None) -> float:
    """The hidden-state ops' arguments: ``hidden`` ``(..., T, H)`` float, ``weight`` ``(V, H)`` and
    ``bias`` ``(V,)`` of its dtype and device, ``tokens`` ``(..., T)``; returns ``1 / temperature``."""
    if not isinstance(hidden, torch.Tensor) or not hidden.dtype.is_floating_point:
        raise DTypeError(
            f"hidden must be a float tensor (..., T, H), got "
            f"{hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    if hidden.dim() < 2:
        raise ShapeError(f"hidden must have shape (..., T, H), got {tuple(hidden.shape)}")
    if hidden.shape[-1] < 1:
        raise ShapeError(f"hidden must have H >= 1 (last dim), got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(
            f"weight must be the 2-D (V, H) LM head, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if weight.shape[0] < 1:
        raise ShapeError(f"weight must have V >= 1 rows (the (V, H) LM head), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ShapeError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise DTypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ShapeError(
            f"bias must have shape ({weight.shape[0]},) (V), got "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
        )
    if bias is not None and bias.dtype != hidden.dtype:
        raise DTypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise DeviceError(f"{name} is on {t.device} but hidden is on {hidden.device}; put them on one device")
    check_tokens(tokens, hidden[..., :1], logits_name="hidden")
    inv_temp = 1.0 / check_temperature(temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise OptionError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise OptionError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    return inv_temp


def _may_overlap(t: torch.Tensor) -> bool:
    """True unless every element provably has its own address: dims sorted by stride,
    each stride must pass the extent of the smaller ones (slices and permutations pass;
    ``expand`` and overlapping ``as_strided`` views do not)."""
    verdict = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard to tell
    if verdict != 2:
        return verdict == 1
    extent = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def check_no_overlap(t: torch.Tensor, name: str = "logits") -> None:
    """In-place writes need every element at its own address (not ``expand`` or an overlapping ``as_strided``)."""
    if _may_overlap(t):
        raise ShapeError(
            f"inplace_backward=True needs {name} whose elements do not share memory, got strides "
            f"{tuple(t.stride())} for shape {tuple(t.shape)} (an expanded or overlapping view); "
            "pass inplace_backward=False"
        )


def check_token_range(
    tokens: torch.Tensor,
    vocab: int,
    valid: Optional[torch.Tensor] = None,
    name: str = "tokens",
    checks: Optional[ValueChecks] = None,
    kind: Optional[str] = "ids",
) -> None:
    """Token ids must lie in [0, V) (only where ``valid`` is true, if given). With ``checks``
    the test is queued on its device flag instead of read here (as ``kind``: a fused loss
    tail computes an "ids" check over the loss's own mask and V, see ValueChecks.take)."""
    if tokens.numel() == 0 or (checks is not None and not checks.enabled):
        return

    def bad():
        out = (tokens < 0) | (tokens >= vocab)
        return (out & valid if valid is not None else out).any()

    where = "" if valid is None else " (at unmasked positions)"

    def details():
        t = tokens if valid is None else tokens[valid]
        return f", got values in [{int(t.min())}, {int(t.max())}]"

    msg = LazyMessage(f"{name} must lie in [0, V) = [0, {vocab}){where}", details)
    if checks is not None:
        checks.require_not(bad, msg, kind=kind)
    elif bool(bad()):  # one device sync on the fast path; details only on failure
        raise InputValueError(msg())


def check_mask(mask, tokens: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` (..., T), tokens' shape, bool / integer / float (nonzero: valid) -> a bool mask."""
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ShapeError(
            f"{name} must have shape {tuple(tokens.shape)} (tokens' shape), got {tuple(mask.shape)}"
            + reshape_hint(name, mask.shape, [tokens.shape])
        )
    _same_device(mask, tokens, name, "tokens")
    if mask.dtype.is_complex:
        raise DTypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def resolve_mask(
    mask, lengths, tokens: torch.Tensor, name: str = "mask", checks: Optional[ValueChecks] = None
) -> Optional[torch.Tensor]:
    """Turn ``mask`` (..., T) or ``lengths`` (...) into a bool mask (..., T), or None (all valid).

    ``lengths`` are range-checked: queued on ``checks`` when given, else read here (inside a
    custom op under torch.compile).
    """
    if mask is not None and lengths is not None:
        raise OptionError("give either mask or lengths, not both")
    T = tokens.shape[-1]
    if mask is not None:
        return check_mask(mask, tokens, name)
    if lengths is not None:
        check_index_dtype(lengths, "lengths")
        if tuple(lengths.shape) != tuple(tokens.shape[:-1]):
            raise ShapeError(
                f"lengths must have shape {tuple(tokens.shape[:-1])} (tokens.shape[:-1]), got {tuple(lengths.shape)}"
                + reshape_hint("lengths", lengths.shape, [tokens.shape[:-1]])
            )
        _same_device(lengths, tokens, "lengths", "tokens")
        if checks is not None:

            def details():
                lo, hi = torch.aminmax(lengths)
                return f", got values in [{int(lo)}, {int(hi)}]"

            if lengths.numel() and checks.enabled:
                checks.require_not(
                    lambda: ((lengths < 0) | (lengths > T)).any(),
                    LazyMessage(f"lengths must lie in [0, T] = [0, {T}]", details),
                    kind="lengths",
                )
            return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)
        if torch.compiler.is_compiling():
            return torch.ops.gspo_kernels.lengths_mask(lengths, T)
        return _lengths_mask(lengths, T)
    return None


def _lengths_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    if lengths.numel():
        lo_t, hi_t = torch.aminmax(lengths)
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi > T:
            raise InputValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{lo}, {hi}]")
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)


@torch.library.custom_op("gspo_kernels::lengths_mask", mutates_args=())
def _lengths_mask_op(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return _lengths_mask(lengths, T)


@_lengths_mask_op.register_fake
def _(lengths, T):
    return lengths.new_empty((*lengths.shape, T), dtype=torch.bool)
