"""Input checks shared by every public op.

Every check runs before any kernel launches and raises one of :mod:`gspo_kernels.errors`'
classes (``ShapeError``, ``DTypeError``, ``DeviceError``, ``OptionError``: subclasses of
``ValueError`` / ``TypeError``) naming the argument, what was expected and what came.

Checks that read tensor values (token ids in range, lengths in ``[0, T]``,
finite advantages and reference log-probs at valid positions) live inside
``torch.library`` custom ops: under ``torch.compile(fullgraph=True)`` they are
opaque graph nodes that still run (and raise) at run time, with no graph
break; eager calls run the same functions directly.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable, Dict, List, Optional, Union

import torch

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
        raise DTypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    if logits.dim() < 2:
        raise ShapeError(
            f"{name} must have shape (..., T, V) with at least 2 dims, got shape {tuple(logits.shape)}"
        )
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
        raise OptionError(f"temperature must lie in [{lo:g}, {hi:g}] (1/temperature is taken in fp32), "
                         f"got {temperature:g}")
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
        return (f"{msg}: {src_name} have {lead[-1]} positions for T = {T} tokens, so they look unsliced "
                f"(prompt + completion). Keep the {T} positions that predict the completion tokens "
                f"(position t predicts token t + 1): {src_name}[..., -{T + 1}:-1, :], i.e. "
                f"{src_name}[..., P-1:-1, :] for a prompt of P = {P} tokens")
    return msg + reshape_hint(name, got, [lead])


def check_tokens(tokens, logits: torch.Tensor, name: str = "tokens", logits_name: str = "logits") -> None:
    check_index_dtype(tokens, name)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(tokens_shape_message(name, tokens.shape, logits.shape[:-1], logits_name))
    _same_device(tokens, logits, name, logits_name)


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


class LazyMessage:
    """An error message whose details (which read tensor values) are built only on failure;
    ``static`` stands in for it where values cannot be read (under torch.compile)."""

    def __init__(self, static: str, details: Callable[[], str]):
        self.static, self.details = static, details

    def __call__(self) -> str:
        return self.static + self.details()


def check_token_range(tokens: torch.Tensor, vocab: int, valid: Optional[torch.Tensor] = None,
                      name: str = "tokens", checks: "Optional[ValueChecks]" = None,
                      kind: Optional[str] = "ids") -> None:
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


def resolve_mask(mask, lengths, tokens: torch.Tensor, name: str = "mask",
                 checks: "Optional[ValueChecks]" = None) -> Optional[torch.Tensor]:
    """Turn ``mask`` (..., T) or ``lengths`` (...) into a bool mask (..., T), or None (all valid).

    ``lengths`` are range-checked: queued on ``checks`` when given, else read here (inside a
    custom op under torch.compile).
    """
    if mask is not None and lengths is not None:
        raise OptionError("give either mask or lengths, not both")
    T = tokens.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ShapeError(f"{name} must have shape {tuple(tokens.shape)} (tokens' shape), got {tuple(mask.shape)}"
                             + reshape_hint(name, mask.shape, [tokens.shape]))
        _same_device(mask, tokens, name, "tokens")
        if mask.dtype.is_complex:
            raise DTypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
        return mask if mask.dtype == torch.bool else mask != 0
    if lengths is not None:
        check_index_dtype(lengths, "lengths")
        if tuple(lengths.shape) != tuple(tokens.shape[:-1]):
            raise ShapeError(
                f"lengths must have shape {tuple(tokens.shape[:-1])} (tokens.shape[:-1]), got {tuple(lengths.shape)}"
                + reshape_hint("lengths", lengths.shape, [tokens.shape[:-1]]))
        _same_device(lengths, tokens, "lengths", "tokens")
        if checks is not None:
            def details():
                lo, hi = torch.aminmax(lengths)
                return f", got values in [{int(lo)}, {int(hi)}]"

            if lengths.numel() and checks.enabled:
                checks.require_not(lambda: ((lengths < 0) | (lengths > T)).any(),
                                   LazyMessage(f"lengths must lie in [0, T] = [0, {T}]", details), kind="lengths")
            return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)
        if torch.compiler.is_compiling():
            return torch.ops.gspo_kernels.lengths_mask(lengths, T)
        return _lengths_mask(lengths, T)
    return None


def _lengths_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    if lengths.numel():
        lo, hi = torch.aminmax(lengths)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi > T:
            raise InputValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{lo}, {hi}]")
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)


@torch.library.custom_op("gspo_kernels::lengths_mask", mutates_args=())
def _lengths_mask_op(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return _lengths_mask(lengths, T)


@_lengths_mask_op.register_fake
def _(lengths, T):
    return lengths.new_empty((*lengths.shape, T), dtype=torch.bool)


def _finite_where(t: torch.Tensor, valid: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(t) & valid
    if bool(bad.any()):
        raise InputValueError(f"{name} must be finite at valid (unmasked) positions, got {int(bad.sum())} "
                         f"NaN/inf value(s) there")
    return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))


@torch.library.custom_op("gspo_kernels::finite_where", mutates_args=())
def _finite_where_op(t: torch.Tensor, valid: torch.Tensor, name: str) -> torch.Tensor:
    return _finite_where(t, valid, name)


@_finite_where_op.register_fake
def _(t, valid, name):
    return torch.empty_like(t)


def finite_where(t: torch.Tensor, valid: torch.Tensor, name: str) -> torch.Tensor:
    """``where(valid, t, 0)`` after refusing NaN/inf at valid positions: whatever sits at a
    masked position never reaches a value or a gradient. Runs under torch.compile too."""
    valid = valid.expand(t.shape) if valid.shape != t.shape else valid
    if torch.compiler.is_compiling():
        return torch.ops.gspo_kernels.finite_where(t, valid, name)
    return _finite_where(t, valid, name)


# ---------------------------------------------------------------- value checks: one device flag
_SEP = "\x1f"  # joins the messages passed to the custom op


def _raise_flagged(code: int, messages: List[str]) -> None:
    for i, msg in enumerate(messages):
        if code >> i & 1 and msg:
            raise InputValueError(msg() if callable(msg) else msg)


@torch.library.custom_op("gspo_kernels::raise_flagged", mutates_args=())
def _raise_flagged_op(code: torch.Tensor, messages: str, like: torch.Tensor) -> torch.Tensor:
    _raise_flagged(int(code), messages.split(_SEP))
    return like.new_zeros(())


@_raise_flagged_op.register_fake
def _(code, messages, like):
    return like.new_empty(())


def not_finite(t: torch.Tensor) -> torch.Tensor:
    """``~isfinite(t)`` in two ops in eager mode (``t * 0`` is 0 exactly when ``t`` is finite: NaN
    and +-inf give NaN); under torch.compile ``isfinite`` itself, since a compiler may fold
    ``t * 0`` to 0."""
    if torch.compiler.is_compiling():
        return ~torch.isfinite(t)
    return t * 0 != 0


class ValueChecks:
    """Value checks of one call, gathered on the device and read once.

    Shape, dtype and device checks raise at once (they need no data). A check that
    reads values (ids in ``[0, V)`` at valid positions, lengths in ``[0, T]``, finite
    inputs at valid positions, a 0/1 float mask) is queued as a 0-d bool "bad" flag,
    or as a function giving one, evaluated only in :meth:`finish`. A queued check may
    carry a ``kind``: a fused kernel that computes that check itself (the loss tail,
    beside its own reads of those values) :meth:`take` s it and hands back one integer
    flag (:meth:`from_kernel`), so the check costs no launch of its own. :meth:`finish`
    packs every flag into one integer on the device and reads it in a single host sync,
    then raises the first failed check's message (built only then, so the details it
    reads cost nothing on the fast path). The kernels never read out of bounds whatever
    the values, so the read can come after them. Under ``torch.compile`` the read is an
    opaque custom op joined to the result. With ``enabled=False`` (``check_inputs=False``)
    nothing is queued and nothing syncs.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self._checks: List[tuple] = []  # (kind or None, bad tensor or function, message), in queue order
        self._taken: Dict[str, int] = {}  # kind -> queue index of the check a kernel computes
        self._kernel: Optional[tuple] = None  # (int flag tensor, {kind: bit})

    def require_not(self, bad: Union[torch.Tensor, Callable[[], torch.Tensor]],
                    message: Union[str, Callable[[], str]], kind: Optional[str] = None) -> None:
        if self.enabled:
            self._checks.append((kind, bad, message))

    def take(self, kinds) -> List[str]:
        """Mark the first queued check of each of ``kinds`` as computed by the caller's kernel
        (which reports them to :meth:`from_kernel`); returns the kinds taken."""
        for i, (kind, _, _) in enumerate(self._checks):
            if kind in kinds and kind not in self._taken:
                self._taken[kind] = i
        return [k for k in self._taken if k in kinds]

    def from_kernel(self, flag: torch.Tensor, bits: Dict[str, int]) -> None:
        """A kernel's integer flag (0-d, or one per sequence, ORed): bit ``bits[kind]`` set means the
        taken check ``kind`` failed."""
        assert self._kernel is None, "one kernel flag per call"
        self._kernel = (flag, bits)

    def finite(self, t: torch.Tensor, valid: Union[torch.Tensor, Callable[[], torch.Tensor]], name: str,
               kind: Optional[str] = None) -> None:
        """Queue "``name`` must be finite at valid (unmasked) positions" (``valid``: a bool tensor
        broadcastable to ``t``, or a function giving one)."""
        def bad():
            v = valid() if callable(valid) else valid
            return not_finite(torch.where(v.expand(t.shape), t, 0.0)).any()

        self.require_not(bad, f"{name} must be finite at valid (unmasked) positions, got NaN/inf there", kind=kind)

    def finish(self, result: torch.Tensor) -> torch.Tensor:
        """``result``, after raising the first failed check in queue order (one host sync; none
        when nothing was queued)."""
        checks, taken, kernel = self._checks, self._taken, self._kernel
        self._checks, self._taken, self._kernel = [], {}, None
        by_kernel = set(taken.values()) if kernel is not None else set()
        own = [i for i in range(len(checks)) if i not in by_kernel]  # evaluated here; bit j <- check own[j]
        if not own and kernel is None:
            return result
        assert len(own) < 48, "too many queued checks for one int64 flag"
        code = None
        if own:
            flags = [checks[i][1]() if callable(checks[i][1]) else checks[i][1] for i in own]
            weights = torch.tensor([1 << j for j in range(len(own))], device=flags[0].device)
            code = (torch.stack([f.reshape(()).to(weights.device) for f in flags]).to(torch.int64) * weights).sum()
        at = dict(enumerate(own))  # bit of code -> queue index
        if kernel is not None:
            flag, bits = kernel
            if flag.dim() and code is not None:  # per-sequence flags beside own ones: OR them here
                w = torch.tensor(sorted(1 << b for b in bits.values()), dtype=flag.dtype, device=flag.device)
                flag = (((flag.unsqueeze(-1) & w) != 0).any(0).to(torch.int64) * w).sum()
            at.update((len(own) + bits[kind], i) for kind, i in taken.items())
            code = flag if code is None else code + (flag.to(torch.int64) << len(own))
        if torch.compiler.is_compiling():  # no fused kernel under compile: the bits are own's, in order
            text = _SEP.join(m.static if isinstance(m, LazyMessage) else m for _, _, m in (checks[i] for i in own))
            return result + torch.ops.gspo_kernels.raise_flagged(code, text, result.detach())
        # the one host sync (per-sequence flags: one copy, ORed here)
        value = int(code) if code.dim() == 0 else functools.reduce(operator.or_, code.tolist(), 0)
        failed = [i for bit, i in at.items() if value >> bit & 1]
        if failed:
            msg = checks[min(failed)][2]
            raise InputValueError(msg() if callable(msg) else msg)
        return result
