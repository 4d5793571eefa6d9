"""Vocab-parallel (tensor-parallel) log-probs and entropy over ``torch.distributed``.

Layout (Megatron's vocab-parallel LM head, verl's Megatron backend): a
process group of P ranks; rank r holds the logits (or the LM-head rows) of
vocabulary ids ``[r * V/P, (r + 1) * V/P)``, a contiguous shard of equal width
``V/P`` in rank order. Tokens are global ids, the same tensor on every rank.
Every rank returns the full per-token results.

Forward, per rank: the fused kernel reads the shard once and gives, per row,
the shard's logsumexp ``lse_r``, the shard-local entropy ``H_r`` and (when the
token falls in the shard) the target logit ``x_y / tau``. The shards combine
through two all-reduces over O(N*T) floats, nothing V-sized:

    MAX over ranks of lse_r                                          N*T floats
    SUM over ranks of [w_r, x_y/tau * 1[y in r], w_r (lse_r - H_r)]  2-3 N*T floats,
        w_r = exp(lse_r - max)

    lse   = max + log(sum w_r)
    logp  = x_y/tau - lse
    H     = lse - sum_r w_r (lse_r - H_r) / sum_r w_r

Every rank must end with the global logsumexp of each row (N*T floats), and a
sum of exponentials needs a shift shared by all ranks to stay finite, hence
the MAX before the SUM: two reductions of O(N*T) floats is the minimum.

Backward: each rank writes its shard's gradient with the fused backward
kernel, from the saved global logsumexp and entropy, in one read and one
write: no collective at all. The hidden-state path all-reduces the gradient
of ``hidden`` over the group (the input of a column-parallel layer, as
Megatron does): done inside this package's backward; ``grad_weight`` stays local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._ops import logits_grad, logprob_fwd
from .errors import OptionError, ShapeError


@dataclass(frozen=True)
class Shard:
    """This rank's place in the vocabulary: ids ``[start, start + width)`` of ``vocab`` in all."""

    group: object
    start: int
    width: int
    vocab: int


def resolve_shard(group, width: int, rows: int, vocab_size: Optional[int] = None, name: str = "logits") -> Shard:
    """Rank layout of ``group`` for a shard of ``width`` ids, checked across ranks.

    The op's first collective is one all-gather of two integers per rank (shard
    width, row count); every check that compares ranks runs on its result, so a
    bad layout raises the same ``ValueError`` on every rank (none is left
    waiting in a collective), and before any data moves."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_group needs torch.distributed to be initialised (dist.init_process_group)")
    P, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise OptionError("vocab_group: this process is not a member of the group")
    device = "cuda" if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available() else "cpu"
    mine = torch.tensor([width, rows], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(everyone, mine, group=group)
    widths = [int(t[0]) for t in everyone]
    counts = [int(t[1]) for t in everyone]
    if len(set(widths)) != 1:
        raise ShapeError(
            f"vocab_group: every rank must hold an equal shard of the vocabulary (V/P ids, rank "
            f"order); {name}' last dims per rank are {widths}. Pad the vocabulary to a multiple "
            f"of P = {P} (Megatron does) so that the shards are equal"
        )
    if len(set(counts)) != 1:
        raise ShapeError(f"vocab_group: every rank must pass the same tokens; token counts per rank are {counts}")
    if vocab_size is not None and width * P != vocab_size:
        raise ShapeError(
            f"{name} shard has {width} ids and vocab_group has P = {P} ranks: {width} * {P} = "
            f"{width * P}, but vocab_size = {vocab_size}; each rank must hold V/P ids"
        )
    return Shard(group, r * width, width, P * width)


def local_ids(tokens: Tensor, shard: Shard) -> tuple[Tensor, Tensor]:
    """``(ids - start, in_shard)``: local ids (out-of-shard ones outside ``[0, width)``, never read)."""
    y = tokens.long() - shard.start
    return y, (y >= 0) & (y < shard.width)


def combine(lse_r: Tensor, target: Tensor, ent_r: Optional[Tensor], group) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Shard statistics (per row, natural units) -> global ``(logp, lse, entropy)``.

    ``lse_r``: this shard's logsumexp of ``x / tau``; ``target``: ``x_y / tau`` on
    the shard that holds ``y`` and 0 elsewhere; ``ent_r``: the shard-local entropy or None."""
    import torch.distributed as dist

    top = lse_r.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # all shards -inf: keep the shift finite
    w = torch.exp(lse_r - top)
    parts = [w, target]
    if ent_r is not None:  # an empty (all -inf) shard has w = 0 and contributes nothing
        parts.append(torch.where(w > 0, w * (lse_r - ent_r), torch.zeros_like(w)))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    lse = top + torch.log(stacked[0])
    logp = stacked[1] - lse
    ent = None if ent_r is None else lse - stacked[2] / stacked[0]
    return logp, lse, ent


def combine_local(
    logp_l: Tensor, c_l: Tensor, ent_l: Optional[Tensor], inside: Tensor, inv_temp: float, group
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The fused forward's per-row outputs on this shard (local log-prob, ``c = tau * lse_r``,
    local entropy) -> global ``(logp, tau * lse, entropy)``, equal on every rank."""
    lse_r = c_l * inv_temp
    target = torch.where(inside, logp_l + lse_r, torch.zeros_like(lse_r))  # x_y / tau where y is here
    logp, lse, ent = combine(lse_r, target, ent_l, group)
    return logp, lse / inv_temp, ent


class VocabParallelTokenLogprobs(torch.autograd.Function):
    """``(logits shard (..., T, V/P), global tokens (..., T), options, shard, valid) -> logp (..., T)``
    (``(logp, entropy)`` with ``options.entropy``), equal on every rank of the group."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, opts, shard: Shard, valid: Optional[Tensor] = None):
        y, inside = local_ids(tokens, shard)
        lp_l, c_l, ent_l = logprob_fwd(logits, y, None, opts.inv_temp, opts.entropy, check=False)
        logp, c, ent = combine_local(lp_l, c_l, ent_l if opts.entropy else None, inside, opts.inv_temp, shard.group)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        # Saved: the global logsumexp in logit units (tau * lse) and entropy: backward needs no collective.
        ctx.save_for_backward(logits, y, c, ent)
        return (logp, ent) if opts.entropy else logp

    @staticmethod
    def backward(ctx, grad_logp: Optional[Tensor], grad_ent: Optional[Tensor] = None):
        logits, y, c, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None
        grad_logp = torch.zeros_like(c) if grad_logp is None else grad_logp.contiguous()
        grad_ent = None if grad_ent is None else grad_ent.contiguous()
        return (
            logits_grad(ctx, logits, y, c, grad_logp, ent if grad_ent is not None else None, grad_ent),
            None,
            None,
            None,
            None,
        )
