"""The fused log-prob ops: per-token and per-sequence (masked mean, "1/L")
log-probabilities of sampled tokens under ``logits / temperature``.

Math (``x_t`` a row of logits, ``y_t`` its sampled token, tau the temperature)::

    logp_t     = x_t[y_t]/tau - logsumexp(x_t/tau)
    seqlogp    = (1/L) * sum_t mask_t * logp_t            (sum when normalize=False; 0 if L = 0)
    d/dx_t[v]  = g_t * (1[v = y_t] - softmax(x_t/tau)[v]) / tau

Forward reads the logits once and saves only the per-token logsumexp
(O(N*T) floats); backward reads them once and writes the gradient once, in
the logits' dtype. The kernels are ``torch.library`` custom ops (:mod:`._ops`, so
``torch.compile(fullgraph=True)`` traces through them), wrapped here in
``torch.autograd.Function`` s: :class:`TokenLogprobs`, :class:`SequenceLogprobs`.
A vocabulary sharded over a process group goes through :mod:`.vocab_parallel`; packed
sequences through :mod:`.sequences`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import vocab_parallel as vp
from ._checks import ValueChecks
from ._kernels import HAS_TRITON
from ._ops import LogprobOptions, logits_grad, logprob_fwd, seq_reduce, use_triton
from ._validate import (
    check_index_dtype,
    check_logits,
    check_mask,
    check_no_overlap,
    check_temperature,
    check_token_range,
    check_tokens,
    resolve_mask,
)
from .errors import DTypeError, OptionError, ShapeError
from .sequences import masked_sequence_mean, resolve_packed

if HAS_TRITON:
    from . import _kernels_seq

__all__ = [
    "IGNORE_INDEX",
    "LogprobOptions",
    "SequenceLogprobs",
    "TokenLogprobs",
    "masked_sequence_mean",
    "sequence_logprobs",
    "token_logprobs",
    "token_logprobs_checked",
]

IGNORE_INDEX = -100  # Hugging Face's label padding: such positions count as masked (as in the losses)


class TokenLogprobs(torch.autograd.Function):
    """``(logits (..., T, V), tokens (..., T), options) -> logp (..., T)``, float32 (float64 for
    float64 logits); with ``options.entropy``: ``(logp, entropy)``, both ``(..., T)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, opts: LogprobOptions, valid: Optional[Tensor] = None):
        # valid (..., T) bool, optional: ids are range-checked only there (masked ids are never read).
        logp, lse, ent = logprob_fwd(logits, tokens, valid, opts.inv_temp, opts.entropy, opts.check_ids)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        if opts.entropy:
            ctx.save_for_backward(logits, tokens, lse, ent)
            return logp, ent
        ctx.save_for_backward(logits, tokens, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Optional[Tensor], grad_ent: Optional[Tensor] = None):
        logits, tokens, lse = ctx.saved_tensors[:3]
        ent = ctx.saved_tensors[3] if ctx.opts.entropy else None
        if grad_logp is None:
            if grad_ent is None:
                return None, None, None, None
            grad_logp = torch.zeros_like(lse)
        grad_ent = None if grad_ent is None else grad_ent.contiguous()
        return logits_grad(ctx, logits, tokens, lse, grad_logp.contiguous(), ent, grad_ent), None, None, None


class SequenceLogprobs(torch.autograd.Function):
    """``(logits (..., T, V), tokens (..., T), maskf (..., T) float, options) -> (...)``:
    masked mean (or sum) of per-token log-probs per sequence. With ``checks``
    (:class:`~gspo_kernels._kernels_seq.SeqChecks`, Triton path, eager) the reduction kernel also
    computes those value checks: ``-> (values, flags)``, flags int32 per sequence."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, maskf: Tensor, opts: LogprobOptions, checks=None):
        valid = maskf != 0 if opts.check_ids else None  # only the eager id check reads it
        logp, lse, _ = logprob_fwd(logits, tokens, valid, opts.inv_temp, False, opts.check_ids)
        # eager Triton: the reduction kernel also gives the backward's per-sequence factor
        ctx.direct = use_triton(logp) and not torch.compiler.is_compiling()
        if checks is not None and not ctx.direct:
            raise ValueError("SequenceLogprobs computes value checks only on the eager Triton path")
        if ctx.direct:
            seq, length, *flags = _kernels_seq.triton_seq_reduce(logp, maskf, opts.normalize, checks, grad_scale=True)
        else:
            seq, length = seq_reduce(logp, maskf, opts.normalize)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, tokens, maskf, lse, length)
        if checks is None:
            return seq
        ctx.mark_non_differentiable(flags[0])
        return seq, flags[0]

    @staticmethod
    def backward(ctx, grad_seq: Optional[Tensor], *_):
        if grad_seq is None:
            return None, None, None, None, None
        logits, tokens, maskf, lse, length = ctx.saved_tensors
        if ctx.direct:  # length holds d seq / d (mask * logp) per sequence; masked tokens get exact 0
            grad_tok = torch.where(maskf != 0, (grad_seq * length).unsqueeze(-1), 0.0)
            return logits_grad(ctx, logits, tokens, lse, grad_tok), None, None, None, None
        if ctx.opts.normalize:
            grad_seq = torch.where(length > 0, grad_seq / length.clamp(min=1), torch.zeros_like(grad_seq))
        grad_tok = grad_seq.unsqueeze(-1) * maskf
        return logits_grad(ctx, logits, tokens, lse, grad_tok), None, None, None, None


def _kept(tokens, ignore_index) -> Optional[Tensor]:
    """``tokens != ignore_index`` (bool, tokens' shape), or None for ``ignore_index=None``."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise DTypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    check_index_dtype(tokens, "tokens")
    return tokens != ignore_index


def _check_common(logits, tokens, temperature, inplace_backward=False) -> float:
    check_logits(logits)
    check_tokens(tokens, logits)
    if inplace_backward and not torch.compiler.is_compiling():  # compiled graphs functionalise the mutation
        check_no_overlap(logits)
    return check_temperature(temperature)


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    valid: Optional[Tensor] = None,
    return_entropy: bool = False,
    vocab_group=None,
    vocab_size: Optional[int] = None,
    ignore_index: Optional[int] = IGNORE_INDEX,
    check_inputs: bool = True,
):
    """Per-token log-probabilities ``log softmax(logits / temperature)[tokens]``,
    and (``return_entropy=True``) the entropy of ``softmax(logits / temperature)``
    from the same single read of the logits.

    Args:
        logits: ``(..., T, V)`` float16/bfloat16/float32/float64, stride 1 on V;
            any strides on the leading dims (slices such as ``out[:, :-1]`` are not copied).
        tokens: ``(..., T)`` int32/int64 ids in ``[0, V)``.
        temperature: tau > 0; the logits are divided by it inside the kernel.
        inplace_backward: write the gradient into the logits' storage (saves
            one logits-sized buffer). The logits are then overwritten; any
            later autograd use of them raises autograd's in-place error.
        valid: optional ``(..., T)`` mask; token ids are then range-checked
            only where it is nonzero, and ids elsewhere are never read. Their
            log-probs are meaningless: mask them out.
        ignore_index: ids equal to it (default -100, Hugging Face's label padding; None: none)
            are masked, as in the losses: their log-prob (and entropy) is 0 and their
            gradient exactly 0; they are never range-checked nor read.
        return_entropy: also return ``H_t = logsumexp(x_t/tau) - sum_v p_v x_t[v]/tau``.
        vocab_group: a ``torch.distributed`` process group over which the vocabulary
            is sharded: ``logits`` are then this rank's contiguous shard
            ``(..., T, V/P)`` (rank r: ids ``[r V/P, (r+1) V/P)``), ``tokens`` global
            ids; every rank returns the full results (see :mod:`gspo_kernels.vocab_parallel`).
        vocab_size: optional global V, checked against ``V/P * P`` (on every rank alike).
        check_inputs: check that ids lie in ``[0, V)`` at valid positions: computed on the
            device beside the kernel and read once, after it (one host sync per call).
            ``False``: no check, no sync; an id outside ``[0, V)`` is clamped into it by the
            kernels (never read out of bounds) and yields the log-prob of the clamped id.
            Shapes, dtypes and devices are always checked.

    Returns:
        ``logp`` ``(..., T)`` float32 (float64 for float64 logits), or
        ``(logp, entropy)`` with ``return_entropy=True``; differentiable w.r.t.
        ``logits`` (the backward takes both upstream gradients and still reads
        the logits once and writes the gradient once:
        ``dx = (g (1[v = y] - p) - h p (log p + H)) / tau``).
    """
    checks = ValueChecks(check_inputs)
    kept = _kept(tokens, ignore_index)
    if kept is not None:
        check_logits(logits)
        check_tokens(tokens, logits)
        valid = kept if valid is None else check_mask(valid, tokens, name="valid") & kept
    out = token_logprobs_checked(
        logits,
        tokens,
        checks,
        temperature=temperature,
        inplace_backward=inplace_backward,
        valid=valid,
        return_entropy=return_entropy,
        vocab_group=vocab_group,
        vocab_size=vocab_size,
    )
    if kept is not None:  # masked: 0, and a zero gradient (where's backward) into the kernel's backward
        out = tuple(torch.where(kept, o, 0.0) for o in out) if return_entropy else torch.where(kept, out, 0.0)
    if return_entropy:
        return checks.finish(out[0]), out[1]
    return checks.finish(out)


def token_logprobs_checked(
    logits: Tensor,
    tokens: Tensor,
    checks: ValueChecks,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    valid: Optional[Tensor] = None,
    return_entropy: bool = False,
    vocab_group=None,
    vocab_size: Optional[int] = None,
):
    """:func:`token_logprobs` with its value checks queued on ``checks`` (the caller reads them)."""
    inv_temp = 1.0 / _check_common(logits, tokens, temperature, inplace_backward)
    if valid is not None:
        valid = check_mask(valid, tokens, name="valid")
    opts = LogprobOptions(inv_temp, True, bool(inplace_backward), bool(return_entropy))
    if vocab_group is not None:
        return _vocab_parallel(logits, tokens, opts, valid, vocab_group, vocab_size, checks)
    check_token_range(tokens, logits.shape[-1], valid, checks=checks)
    return TokenLogprobs.apply(logits, tokens, opts, valid)


def _vocab_parallel(logits, tokens, opts, valid, group, vocab_size, checks: ValueChecks):
    """Layout checked across ranks (one metadata all-gather), ids queued on ``checks`` (global
    ids, the same tensor on every rank: every rank raises alike), then the sharded op."""
    shard = vp.resolve_shard(group, logits.shape[-1], tokens.numel(), vocab_size)
    check_token_range(tokens, shard.vocab, valid, checks=checks, kind=None)  # V is the global one
    return vp.VocabParallelTokenLogprobs.apply(logits, tokens, opts, shard, valid)


def sequence_logprobs(
    logits: Tensor,
    tokens: Tensor,
    mask: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: bool = True,
    inplace_backward: bool = False,
    vocab_group=None,
    vocab_size: Optional[int] = None,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    ignore_index: Optional[int] = IGNORE_INDEX,
    check_inputs: bool = True,
) -> Tensor:
    """Per-sequence log-probability: the masked mean over T of the per-token
    log-probs (GSPO's ``1/L`` geometric normalisation), or the masked sum.

    Args:
        logits: ``(..., T, V)``, e.g. ``(B, G, T, V)`` or ``(N, T, V)``; see :func:`token_logprobs`.
        tokens: ``(..., T)`` integer ids; ids at masked positions may be anything; ids equal to
            ``ignore_index`` (default -100, Hugging Face's label padding; None: none) count as
            masked, as in the losses (not in ``L``, zero gradient).
        mask: ``(..., T)``, nonzero/True for real completion tokens. Or
        lengths: ``(...)`` integers in ``[0, T]``: the first ``L`` tokens are valid.
            With neither, every token counts.
        temperature: tau > 0.
        normalize: divide by ``L`` (True, GSPO) or return the plain sum (False).
        inplace_backward: see :func:`token_logprobs`.
        vocab_group, vocab_size: vocabulary sharded over a process group, see :func:`token_logprobs`.
        cu_seqlens: packed sequences (see :mod:`gspo_kernels.sequences`): ``logits`` ``(total, V)``
            or ``(1, total, V)``, ``tokens``/``mask`` ``(total,)`` or ``(1, total)``; sequence i is
            rows ``[cu[i], cu[i+1])``, ``L`` its count of masked-in rows. ``max_seqlen``: its
            longest sequence (saves a host read).
        check_inputs: ids in ``[0, V)`` at valid positions and lengths in ``[0, T]``, on one
            device flag read once per call; ``False``: no check, no host sync (see :func:`token_logprobs`).

    Returns:
        ``(...)`` (``(B, G)`` for 4-D logits, ``(N,)`` packed) float32; a sequence with
        ``L = 0`` gives 0 and a zero gradient.
    """
    if cu_seqlens is not None:
        return _packed_sequence_logprobs(
            logits,
            tokens,
            mask,
            lengths,
            cu_seqlens,
            max_seqlen,
            normalize,
            check_inputs,
            ignore_index,
            temperature=temperature,
            inplace_backward=inplace_backward,
            vocab_group=vocab_group,
            vocab_size=vocab_size,
        )
    inv_temp = 1.0 / _check_common(logits, tokens, temperature, inplace_backward)
    checks = ValueChecks(check_inputs)
    valid = resolve_mask(mask, lengths, tokens, checks=checks)
    kept = _kept(tokens, ignore_index)
    if kept is not None:
        valid = kept if valid is None else valid & kept
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if vocab_group is not None:  # per-token results from the sharded op, then the O(N*T) masked mean
        v = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if valid is None else valid
        opts = LogprobOptions(inv_temp, bool(normalize), bool(inplace_backward))
        out = masked_sequence_mean(
            _vocab_parallel(logits, tokens, opts, v, vocab_group, vocab_size, checks), v, normalize
        )
        return checks.finish(out)
    check_token_range(tokens, logits.shape[-1], valid, checks=checks)
    maskf = torch.ones(tokens.shape, dtype=acc, device=tokens.device) if valid is None else valid.to(acc)
    opts = LogprobOptions(inv_temp, bool(normalize), bool(inplace_backward))
    seq_checks = None
    # eager Triton: the reduction kernel computes the checks (no token, no kernel: finish does)
    if use_triton(logits) and not torch.compiler.is_compiling() and tokens.numel():
        taken = checks.take({"lengths", "ids"} if lengths is not None else {"ids"})
        if taken:
            seq_checks = _kernels_seq.SeqChecks(
                tokens=tokens if "ids" in taken else None,
                vocab=logits.shape[-1],
                lengths=lengths if "lengths" in taken else None,
            )
    if seq_checks is None:
        return checks.finish(SequenceLogprobs.apply(logits, tokens, maskf.contiguous(), opts))
    seq, flags = SequenceLogprobs.apply(logits, tokens, maskf.contiguous(), opts, seq_checks)
    checks.from_kernel(flags, seq_checks.bits)
    return checks.finish(seq)


def _packed_sequence_logprobs(
    logits, tokens, mask, lengths, cu_seqlens, max_seqlen, normalize, check_inputs, ignore_index=IGNORE_INDEX, **kw
):
    """The token op on the packed rows as they are, then the per-sequence masked mean over
    ``cu_seqlens`` (the O(total) log-probs laid out per sequence; see :class:`~gspo_kernels.sequences.Packed`)."""
    check_logits(logits)
    if lengths is not None:
        raise OptionError("with cu_seqlens, give a mask (total,) or none, not lengths")
    lead = tuple(logits.shape[:-1])
    if len(lead) not in (1, 2) or (len(lead) == 2 and lead[0] != 1):
        raise ShapeError(f"packed logits must be (total, V) or (1, total, V), got shape {tuple(logits.shape)}")
    total = lead[-1]
    checks = ValueChecks(check_inputs)
    packed = resolve_packed(cu_seqlens, total, max_seqlen, checks=checks)
    valid = check_mask(mask, tokens) if mask is not None else None
    kept = _kept(tokens, ignore_index)
    if kept is not None:
        valid = kept if valid is None else valid & kept
    logp = token_logprobs_checked(logits, tokens, checks, valid=valid, **kw)
    return checks.finish(packed.sequence_mean(logp, valid, normalize))
