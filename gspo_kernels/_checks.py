"""Value checks gathered on the device and read once: the one device flag of a call.

A check that reads tensor values (ids in ``[0, V)``, lengths in ``[0, T]``, finite inputs at
valid positions, a 0/1 float mask, ``cu_seqlens``) is queued on a :class:`ValueChecks` as a
0-d "bad" flag (or a function giving one); :meth:`ValueChecks.finish` packs every flag into
one integer and reads it in a single host sync, after the kernels (which never read out of
bounds, whatever the values). A fused kernel may compute some of the queued checks itself
(:meth:`ValueChecks.take`, :meth:`ValueChecks.from_kernel`). Under ``torch.compile`` the read
is an opaque ``torch.library`` custom op joined to the result. The checks that need no data
(shapes, dtypes, devices) raise at once: :mod:`._validate`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Optional, Union

import torch

from .errors import InputValueError

__all__ = ["LazyMessage", "ValueChecks", "not_finite"]


class LazyMessage:
    """An error message whose details (which read tensor values) are built only on failure;
    ``static`` stands in for it where values cannot be read (under torch.compile)."""

    def __init__(self, static: str, details: Callable[[], str]):
        self.static, self.details = static, details

    def __call__(self) -> str:
        return self.static + self.details()


_SEP = "\x1f"  # joins the messages passed to the custom op


def _raise_flagged(code: int, messages: list[str]) -> None:
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
        self._checks: list[tuple] = []  # (kind or None, bad tensor or function, message), in queue order
        self._taken: dict[str, int] = {}  # kind -> queue index of the check a kernel computes
        self._kernel: Optional[tuple] = None  # (int flag tensor, {kind: bit})

    def require_not(
        self,
        bad: Union[torch.Tensor, Callable[[], torch.Tensor]],
        message: Union[str, Callable[[], str]],
        kind: Optional[str] = None,
    ) -> None:
        if self.enabled:
            self._checks.append((kind, bad, message))

    def take(self, kinds) -> list[str]:
        """Mark the first queued check of each of ``kinds`` as computed by the caller's kernel
        (which reports them to :meth:`from_kernel`); returns the kinds taken."""
        for i, (kind, _, _) in enumerate(self._checks):
            if kind in kinds and kind not in self._taken:
                self._taken[kind] = i
        return [k for k in self._taken if k in kinds]

    def from_kernel(self, flag: torch.Tensor, bits: dict[str, int]) -> None:
        """A kernel's integer flag (0-d, or one per sequence, ORed): bit ``bits[kind]`` set means the
        taken check ``kind`` failed."""
        assert self._kernel is None, "one kernel flag per call"
        self._kernel = (flag, bits)

    def finite(
        self,
        t: torch.Tensor,
        valid: Union[torch.Tensor, Callable[[], torch.Tensor]],
        name: str,
        kind: Optional[str] = None,
    ) -> None:
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
        assert code is not None  # own checks or a kernel flag, else returned above
        value = int(code) if code.dim() == 0 else functools.reduce(operator.or_, code.tolist(), 0)
        failed = [i for bit, i in at.items() if value >> bit & 1]
        if failed:
            msg = checks[min(failed)][2]
            raise InputValueError(msg() if callable(msg) else msg)
        return result
