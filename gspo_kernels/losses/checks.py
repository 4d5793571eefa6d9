"""Value checks of the losses, gathered into one device flag and read once.

Shape, dtype and device checks raise at once (they need no data). Checks that
read values (finite inputs at valid positions, a 0/1 float mask) are queued
as boolean device scalars; :meth:`ValueChecks.result` stacks them and reads
them in one host sync, inside a ``torch.library`` custom op so that
``torch.compile(fullgraph=True)`` keeps it as an opaque node that still runs
and raises. With ``check_inputs=False`` nothing is queued and nothing syncs.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

_SEP = "\x1f"  # unit separator: joins the messages passed to the custom op


def _raise_flagged(flags: Tensor, messages: str) -> None:
    bad = flags.tolist() if flags.numel() else []  # the one host sync
    for is_bad, msg in zip(bad, messages.split(_SEP)):
        if is_bad:
            raise ValueError(msg)


@torch.library.custom_op("gspo_kernels::raise_flagged", mutates_args=())
def _raise_flagged_op(flags: Tensor, messages: str, like: Tensor) -> Tensor:
    _raise_flagged(flags, messages)
    return like.new_zeros(())


@_raise_flagged_op.register_fake
def _(flags, messages, like):
    return like.new_empty(())


class ValueChecks:
    """Collects ``bad`` flags (0-d bool tensors) with their messages; :meth:`result` reads them once."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._flags: List[Tensor] = []
        self._messages: List[str] = []

    def require_not(self, bad: Tensor, message: str) -> None:
        if self.enabled:
            self._flags.append(bad.reshape(()))
            self._messages.append(message)

    def finite(self, t: Tensor, valid: Tensor, name: str, keep_finite: bool = False) -> Tensor:
        """``where(valid, t, 0)`` (``keep_finite``: only non-finite values are zeroed, finite ones
        kept everywhere); queues "``name`` must be finite at valid positions"."""
        valid = valid.expand(t.shape)
        finite = torch.isfinite(t)
        self.require_not((~finite & valid).any(),
                         f"{name} must be finite at valid (unmasked) positions, got NaN/inf there")
        return torch.where((valid | finite) if keep_finite else valid, t, torch.zeros((), dtype=t.dtype,
                                                                                      device=t.device))

    def finish(self, loss: Tensor) -> Tensor:
        """``loss``, after raising the first failed check: one host sync (none when nothing was
        queued). Under torch.compile the read is an opaque custom op joined to the loss."""
        if not self._flags:
            return loss
        flags = torch.stack([f.to(loss.device) for f in self._flags])
        messages = _SEP.join(self._messages)
        if torch.compiler.is_compiling():
            return loss + torch.ops.gspo_kernels.raise_flagged(flags, messages, loss.detach())
        _raise_flagged(flags, messages)
        return loss
