"""Which tokens belong to which sequence, for packed (padding-free) batches.

A packed batch holds its N sequences back to back as ``(total, V)`` logits (or
``(1, total, V)``), with flash-attention's ``cu_seqlens``: int32/int64 ``(N+1,)``
offsets, ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[N] = total``;
sequence i is rows ``[cu[i], cu[i+1])`` (two equal offsets: an empty sequence).

The row kernels do not care about the layout: they run on the packed rows as
they are (no copy of the logits). Only the O(total) per-token results are laid
out per sequence, by :meth:`Packed.pad` (an index_put at unique positions: a
deterministic scatter, no atomics; its backward is a gather), into ``(N, T_max)``
rows that every per-sequence reduction (masked means, sums, the losses) then
treats exactly as padded rows. ``T_max`` is the longest sequence: pass
``max_seqlen`` (flash-attention's companion argument) to save the one host read
it otherwise costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._checks import LazyMessage
from ._kernels import seq_shrink
from .errors import DTypeError, InputValueError, OptionError, ShapeError

__all__ = ["Packed", "cu_seqlens_from_position_ids", "masked_sequence_mean", "resolve_packed"]


@dataclass(frozen=True)
class Packed:
    """``N`` sequences over ``total`` packed tokens."""

    cu_seqlens: Tensor  # (N+1,) int64
    seq_id: Tensor  # (total,) int64: the sequence of each token
    pos: Tensor  # (total,) int64: the token's position inside its sequence
    n: int
    t_max: int
    total: int

    def pad(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """``(total,)`` per-token values -> ``(N, T_max)`` rows (``fill`` past each sequence's end);
        differentiable (its backward gathers the rows' gradient back to the tokens)."""
        out = torch.full((self.n, self.t_max), fill, dtype=x.dtype, device=x.device)
        return out.index_put((self.seq_id, self.pos), x)

    def sequence_mean(self, logp: Tensor, valid: Optional[Tensor], normalize: bool = True) -> Tensor:
        """``(total,)`` per-token log-probs -> ``(N,)`` masked mean over each sequence's valid tokens
        (sum when not ``normalize``; 0 for an empty sequence)."""
        logp = logp.reshape(self.total)
        v = torch.ones(self.total, dtype=torch.bool, device=logp.device) if valid is None else valid.reshape(self.total)
        return masked_sequence_mean(self.pad(torch.where(v, logp, 0)), self.pad(v), normalize)

    def unpad(self, x: Tensor) -> Tensor:
        """``(N, T_max)`` rows -> ``(total,)`` packed tokens."""
        return x[self.seq_id, self.pos]


def masked_sequence_mean(logp: Tensor, valid: Tensor, normalize: bool = True) -> Tensor:
    """Differentiable ``(..., T) -> (...)``: the sum of ``logp`` over valid tokens, divided by
    their count when ``normalize`` (0 for an empty sequence); invalid entries never reach it."""
    # summed as logp * 2^-ceil(log2 T), then scaled back: T finite terms near the float limit
    # (logits ~1e38 at a small temperature) give a finite mean, not an overflowed sum
    shrink = seq_shrink(logp.shape[-1])
    total = torch.where(valid, logp * shrink, torch.zeros_like(logp)).sum(-1)
    if not normalize:
        return total / shrink
    L = valid.sum(-1).to(logp.dtype)
    return torch.where(L > 0, (total / L.clamp(min=1)) / shrink, torch.zeros_like(total))


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """``cu_seqlens`` (int32, ``(N+1,)``) of a padding-free batch whose ``position_ids``
    ``(total,)`` or ``(1, total)`` restart at 0 at each sequence (Hugging Face's
    ``DataCollatorWithFlattening``). One host read (the number of sequences)."""
    if not isinstance(position_ids, Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
        raise DTypeError("position_ids must be an int32 or int64 tensor")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ShapeError(f"position_ids must have shape (total,) or (1, total), got {tuple(position_ids.shape)}")
    total = position_ids.numel()
    starts = (position_ids == 0).nonzero().flatten()
    if total and (starts.numel() == 0 or int(starts[0]) != 0):
        raise InputValueError("position_ids must start at 0 (the first token opens a sequence)")
    end = torch.tensor([total], device=position_ids.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def resolve_packed(
    cu_seqlens,
    total: int,
    max_seqlen: Optional[int] = None,
    group_size: Optional[int] = None,
    check_inputs: bool = True,
    checks=None,
) -> Packed:
    """Check ``cu_seqlens`` against ``total`` tokens and lay out the packed batch.

    Shape, dtype and ``group_size`` errors raise at once; the value checks (starts at 0,
    non-decreasing, ends at ``total``, no sequence longer than ``max_seqlen``) and ``T_max``
    (when ``max_seqlen`` is not given) are read together in one host sync, before any
    kernel runs. With ``max_seqlen`` given and a call's :class:`ValueChecks` (``checks``),
    the value checks are queued on it instead (read once with the call's other checks,
    after the kernels: every index derived here is clamped into range, so bad offsets never
    address out of bounds). ``check_inputs=False`` with ``max_seqlen`` given: no sync.
    """
    if checks is not None:
        check_inputs = checks.enabled
    if not isinstance(cu_seqlens, Tensor):
        raise DTypeError(f"cu_seqlens must be an int32/int64 tensor of shape (N+1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ShapeError(f"cu_seqlens must be 1-D of shape (N+1,), got shape {tuple(cu_seqlens.shape)}")
    n = cu_seqlens.numel() - 1
    if n == 0:
        raise ShapeError("cu_seqlens holds no sequence (shape (1,)): the loss is a mean over sequences")
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size
    ):
        raise OptionError(f"cu_seqlens holds N = {n} sequences, not a multiple of group_size={group_size!r}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise OptionError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    reads = []
    if check_inputs and checks is not None and max_seqlen is not None:
        _queue_checks(checks, cu, lengths, total, max_seqlen)
    elif check_inputs:
        reads += [cu[0] != 0, (lengths < 0).any(), cu[-1] != total]
        if max_seqlen is not None:
            reads.append((lengths > max_seqlen).any())
    if max_seqlen is None:
        reads.append(lengths.max())
    if reads:
        got = torch.stack([r.to(torch.int64) for r in reads]).tolist()  # the one host read
        if check_inputs:
            first, decreasing, end = got[:3]
            if first:
                raise InputValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
            if decreasing:
                raise InputValueError("cu_seqlens must be non-decreasing (each sequence's length >= 0)")
            if end:
                raise InputValueError(f"cu_seqlens must end at the token count {total}, got {int(cu[-1])}")
            if max_seqlen is not None and got[3]:
                raise InputValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence of cu_seqlens")
        t_max = got[-1] if max_seqlen is None else max_seqlen
    else:
        t_max = max_seqlen
    t_max = max(int(t_max), 0)
    tok = torch.arange(total, device=cu.device)  # indices clamped into range, whatever cu holds
    seq_id = torch.searchsorted(cu[1:], tok, right=True).clamp(max=n - 1)
    pos = (tok - cu[seq_id]).clamp(0, max(t_max - 1, 0))  # clamped: a too-small max_seqlen never writes out of rows
    return Packed(cu_seqlens=cu, seq_id=seq_id, pos=pos, n=n, t_max=t_max, total=total)


def _queue_checks(checks, cu: Tensor, lengths: Tensor, total: int, max_seqlen: int) -> None:
    """resolve_packed's value checks as flags on ``checks``, with the same messages."""
    checks.require_not(lambda: cu[0] != 0, LazyMessage("cu_seqlens must start at 0", lambda: f", got {int(cu[0])}"))
    checks.require_not(lambda: (lengths < 0).any(), "cu_seqlens must be non-decreasing (each sequence's length >= 0)")
    checks.require_not(
        lambda: cu[-1] != total,
        LazyMessage(f"cu_seqlens must end at the token count {total}", lambda: f", got {int(cu[-1])}"),
    )
    checks.require_not(
        lambda: (lengths > max_seqlen).any(),
        f"max_seqlen={max_seqlen} is shorter than the longest sequence of cu_seqlens",
    )
