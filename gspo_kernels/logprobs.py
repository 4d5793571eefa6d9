"""The fused log-prob ops: per-token and per-sequence (masked mean, "1/L")
log-probabilities of sampled tokens under ``logits / temperature``.

Math (``x_t`` a row of logits, ``y_t`` its sampled token, tau the temperature)::

    logp_t     = x_t[y_t]/tau - logsumexp(x_t/tau)
    seqlogp    = (1/L) * sum_t mask_t * logp_t            (sum when normalize=False; 0 if L = 0)
    d/dx_t[v]  = g_t * (1[v = y_t] - softmax(x_t/tau)[v]) / tau

Forward reads the logits once and saves only the per-token logsumexp
(O(N*T) floats); backward reads them once and writes the gradient once, in
the logits' dtype. The kernels are registered as ``torch.library`` custom ops
(so ``torch.compile(fullgraph=True)`` traces through them) and wrapped in
``torch.autograd.Function`` s: :class:`TokenLogprobs`, :class:`SequenceLogprobs`.

Devices: CUDA tensors run the Triton kernels; CPU tensors run them too when
``TRITON_INTERPRET=1`` was set before import, else the chunked PyTorch path
(``_torch_path``), same semantics, bounded memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _torch_path
from ._kernels import HAS_TRITON, seq_shrink
from ._validate import (ValueChecks, check_index_dtype, check_logits, check_no_overlap, check_temperature,
                        check_token_range, check_tokens, resolve_mask)
from .errors import DTypeError, OptionError, ShapeError

if HAS_TRITON:
    from . import _kernels

IGNORE_INDEX = -100  # Hugging Face's label padding: such positions count as masked (as in the losses)

# Which implementation CPU tensors use: the Triton kernels through the
# interpreter (TRITON_INTERPRET=1 must be set before triton is imported) or
# the chunked PyTorch path. Tests switch it to cover both.
CPU_BACKEND = "triton" if (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1") else "torch"


def _use_triton(t: Tensor) -> bool:
    if not HAS_TRITON:
        return False
    return t.is_cuda or (t.device.type == "cpu" and CPU_BACKEND == "triton")


# ---------------------------------------------------------------- custom ops
# Eager calls run the implementations directly; under torch.compile they go
# through the ``torch.library`` custom ops below, which the compiler treats as
# opaque nodes (no graph break). Going through the op in eager too would cost
# its first dispatch in a process an import of torch._dynamo (~1 s).
def _fwd_impl(logits: Tensor, tokens: Tensor, valid: Optional[Tensor], inv_temp: float,
              entropy: bool, check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    # The range check lives inside the op so it also runs under torch.compile. A vocab
    # shard's local ids lie outside [0, V) for other shards' tokens: the kernels clamp
    # them (never read out of bounds) and the caller masks those rows.
    if check:
        check_token_range(tokens, logits.shape[-1], valid)
    impl = _kernels.triton_fwd if _use_triton(logits) else _torch_path.torch_fwd
    return impl(logits, tokens, inv_temp, entropy)


def _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out):
    impl = _kernels.triton_bwd if _use_triton(logits) else _torch_path.torch_bwd
    return impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out)


def _bwd_out(logits, tokens, lse, grad, ent, grad_ent, inv_temp):
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out)


def _seq_reduce_impl(logp, maskf, normalize):
    if _use_triton(logp):
        return _kernels.triton_seq_reduce(logp, maskf, normalize)
    return _torch_path.torch_seq_reduce(logp, maskf, normalize)


@torch.library.custom_op("gspo_kernels::logprob_fwd", mutates_args=())
def _logprob_fwd(logits: Tensor, tokens: Tensor, valid: Optional[Tensor], inv_temp: float,
                 entropy: bool, check: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(logits, tokens, valid, inv_temp, entropy, check)


@_logprob_fwd.register_fake
def _(logits, tokens, valid, inv_temp, entropy, check):
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = logits.new_empty(logits.shape[:-1], dtype=dt)
    return out, torch.empty_like(out), torch.empty_like(out) if entropy else out.new_empty(0)


@torch.library.custom_op("gspo_kernels::logprob_bwd", mutates_args=())
def _logprob_bwd(logits: Tensor, tokens: Tensor, lse: Tensor, grad: Tensor, ent: Optional[Tensor],
                 grad_ent: Optional[Tensor], inv_temp: float) -> Tensor:
    return _bwd_out(logits, tokens, lse, grad, ent, grad_ent, inv_temp)


@_logprob_bwd.register_fake
def _(logits, tokens, lse, grad, ent, grad_ent, inv_temp):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("gspo_kernels::logprob_bwd_inplace", mutates_args=("logits",))
def _logprob_bwd_inplace(logits: Tensor, tokens: Tensor, lse: Tensor, grad: Tensor, ent: Optional[Tensor],
                         grad_ent: Optional[Tensor], inv_temp: float) -> None:
    _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, logits)


@_logprob_bwd_inplace.register_fake
def _(logits, tokens, lse, grad, ent, grad_ent, inv_temp):
    return None


@torch.library.custom_op("gspo_kernels::seq_reduce", mutates_args=())
def _seq_reduce(logp: Tensor, maskf: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    return _seq_reduce_impl(logp, maskf, normalize)


@_seq_reduce.register_fake
def _(logp, maskf, normalize):
    out = logp.new_empty(logp.shape[:-1])
    return out, torch.empty_like(out)


def logprob_fwd(logits, tokens, valid, inv_temp, entropy=False, check=True):
    """``(logp, c, ent)`` per row (``c = tau * logsumexp(x / tau)``); ``ent`` is empty unless
    ``entropy``. ``check=False`` skips the id range check here (vocab shards; the public ops,
    which queue it on their :class:`ValueChecks` flag instead)."""
    if torch.compiler.is_compiling():
        return torch.ops.gspo_kernels.logprob_fwd(logits, tokens, valid, inv_temp, entropy, check)
    return _fwd_impl(logits, tokens, valid, inv_temp, entropy, check)


def logprob_bwd(logits, tokens, lse, grad, ent, grad_ent, inv_temp, inplace: bool):
    """Gradient w.r.t. the logits, into a fresh buffer or (``inplace``) into the logits."""
    if torch.compiler.is_compiling():
        if inplace:
            torch.ops.gspo_kernels.logprob_bwd_inplace(logits, tokens, lse, grad, ent, grad_ent, inv_temp)
            return logits
        return torch.ops.gspo_kernels.logprob_bwd(logits, tokens, lse, grad, ent, grad_ent, inv_temp)
    if inplace:
        return _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, logits)
    return _bwd_out(logits, tokens, lse, grad, ent, grad_ent, inv_temp)


def seq_reduce(logp, maskf, normalize):
    if torch.compiler.is_compiling():
        return torch.ops.gspo_kernels.seq_reduce(logp, maskf, normalize)
    return _seq_reduce_impl(logp, maskf, normalize)


# ---------------------------------------------------------------- autograd
@dataclass(frozen=True)
class LogprobOptions:
    """Options of one call, kept on ``ctx`` for backward."""

    inv_temp: float = 1.0
    normalize: bool = True
    inplace_backward: bool = False
    entropy: bool = False
    check_ids: bool = False  # read the id range check in the forward (else the caller queued it)


def _logits_grad(ctx, logits: Tensor, tokens: Tensor, lse: Tensor, grad_tok: Tensor,
                 ent: Optional[Tensor] = None, grad_ent: Optional[Tensor] = None) -> Tensor:
    opts: LogprobOptions = ctx.opts
    if not opts.inplace_backward:
        return logprob_bwd(logits, tokens, lse, grad_tok, ent, grad_ent, opts.inv_temp, False)
    if torch.compiler.is_compiling():  # the custom op declares the mutation; the compiler tracks it
        return logprob_bwd(logits, tokens, lse, grad_tok, ent, grad_ent, opts.inv_temp, True)
    version = logits._version
    logprob_bwd(logits, tokens, lse, grad_tok, ent, grad_ent, opts.inv_temp, True)
    if logits._version == version:
        # The logits now hold their gradient: any other saved use of them must
        # fail autograd's version check instead of reading garbage.
        torch.autograd.graph.increment_version(logits)
    return logits


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
        return _logits_grad(ctx, logits, tokens, lse, grad_logp.contiguous(), ent, grad_ent), None, None, None


class SequenceLogprobs(torch.autograd.Function):
    """``(logits (..., T, V), tokens (..., T), maskf (..., T) float, options) -> (...)``:
    masked mean (or sum) of per-token log-probs per sequence. With ``checks``
    (:class:`~gspo_kernels._kernels.SeqChecks`, Triton path, eager) the reduction kernel also
    computes those value checks: ``-> (values, flags)``, flags int32 per sequence."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, maskf: Tensor, opts: LogprobOptions, checks=None):
        valid = maskf != 0 if opts.check_ids else None  # only the eager id check reads it
        logp, lse, _ = logprob_fwd(logits, tokens, valid, opts.inv_temp, False, opts.check_ids)
        # eager Triton: the reduction kernel also gives the backward's per-sequence factor
        ctx.direct = _use_triton(logp) and not torch.compiler.is_compiling()
        if checks is not None and not ctx.direct:
            raise ValueError("SequenceLogprobs computes value checks only on the eager Triton path")
        if ctx.direct:
            seq, length, *flags = _kernels.triton_seq_reduce(logp, maskf, opts.normalize, checks, grad_scale=True)
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
            return _logits_grad(ctx, logits, tokens, lse, grad_tok), None, None, None, None
        if ctx.opts.normalize:
            grad_seq = torch.where(length > 0, grad_seq / length.clamp(min=1), torch.zeros_like(grad_seq))
        grad_tok = grad_seq.unsqueeze(-1) * maskf
        return _logits_grad(ctx, logits, tokens, lse, grad_tok), None, None, None, None


# ---------------------------------------------------------------- public API
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


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   inplace_backward: bool = False, valid: Optional[Tensor] = None,
                   return_entropy: bool = False, vocab_group=None, vocab_size: Optional[int] = None,
                   ignore_index: Optional[int] = IGNORE_INDEX, check_inputs: bool = True):
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
        valid = kept if valid is None else resolve_mask(valid, None, tokens, name="valid") & kept
    out = token_logprobs_checked(logits, tokens, checks, temperature=temperature, inplace_backward=inplace_backward,
                                 valid=valid, return_entropy=return_entropy, vocab_group=vocab_group,
                                 vocab_size=vocab_size)
    if kept is not None:  # masked: 0, and a zero gradient (where's backward) into the kernel's backward
        out = tuple(torch.where(kept, o, 0.0) for o in out) if return_entropy else torch.where(kept, out, 0.0)
    if return_entropy:
        return checks.finish(out[0]), out[1]
    return checks.finish(out)


def token_logprobs_checked(logits: Tensor, tokens: Tensor, checks: ValueChecks, *, temperature: float = 1.0,
                           inplace_backward: bool = False, valid: Optional[Tensor] = None,
                           return_entropy: bool = False, vocab_group=None, vocab_size: Optional[int] = None):
    """:func:`token_logprobs` with its value checks queued on ``checks`` (the caller reads them)."""
    inv_temp = 1.0 / _check_common(logits, tokens, temperature, inplace_backward)
    if valid is not None:
        valid = resolve_mask(valid, None, tokens, name="valid")
    opts = LogprobOptions(inv_temp, True, bool(inplace_backward), bool(return_entropy))
    if vocab_group is not None:
        return _vocab_parallel(logits, tokens, opts, valid, vocab_group, vocab_size, checks)
    check_token_range(tokens, logits.shape[-1], valid, checks=checks)
    return TokenLogprobs.apply(logits, tokens, opts, valid)


def _vocab_parallel(logits, tokens, opts, valid, group, vocab_size, checks: ValueChecks):
    """Layout checked across ranks (one metadata all-gather), ids queued on ``checks`` (global
    ids, the same tensor on every rank: every rank raises alike), then the sharded op."""
    from . import vocab_parallel as vp

    shard = vp.resolve_shard(group, logits.shape[-1], tokens.numel(), vocab_size)
    check_token_range(tokens, shard.vocab, valid, checks=checks, kind=None)  # V is the global one
    return vp.VocabParallelTokenLogprobs.apply(logits, tokens, opts, shard, valid)


def sequence_logprobs(logits: Tensor, tokens: Tensor, mask: Optional[Tensor] = None, *,
                      lengths: Optional[Tensor] = None, temperature: float = 1.0, normalize: bool = True,
                      inplace_backward: bool = False, vocab_group=None, vocab_size: Optional[int] = None,
                      cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                      ignore_index: Optional[int] = IGNORE_INDEX, check_inputs: bool = True) -> Tensor:
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
        return _packed_sequence_logprobs(logits, tokens, mask, lengths, cu_seqlens, max_seqlen, normalize,
                                         check_inputs, ignore_index, temperature=temperature,
                                         inplace_backward=inplace_backward, vocab_group=vocab_group,
                                         vocab_size=vocab_size)
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
        out = masked_sequence_mean(_vocab_parallel(logits, tokens, opts, v, vocab_group, vocab_size, checks), v,
                                   normalize)
        return checks.finish(out)
    check_token_range(tokens, logits.shape[-1], valid, checks=checks)
    maskf = torch.ones(tokens.shape, dtype=acc, device=tokens.device) if valid is None else valid.to(acc)
    opts = LogprobOptions(inv_temp, bool(normalize), bool(inplace_backward))
    seq_checks = None
    # eager Triton: the reduction kernel computes the checks (no token, no kernel: finish does)
    if _use_triton(logits) and not torch.compiler.is_compiling() and tokens.numel():
        taken = checks.take({"lengths", "ids"} if lengths is not None else {"ids"})
        if taken:
            seq_checks = _kernels.SeqChecks(tokens=tokens if "ids" in taken else None, vocab=logits.shape[-1],
                                            lengths=lengths if "lengths" in taken else None)
    if seq_checks is None:
        return checks.finish(SequenceLogprobs.apply(logits, tokens, maskf.contiguous(), opts))
    seq, flags = SequenceLogprobs.apply(logits, tokens, maskf.contiguous(), opts, seq_checks)
    checks.from_kernel(flags, seq_checks.bits)
    return checks.finish(seq)


def _packed_sequence_logprobs(logits, tokens, mask, lengths, cu_seqlens, max_seqlen, normalize, check_inputs,
                              ignore_index=IGNORE_INDEX, **kw):
    """The token op on the packed rows as they are, then the per-sequence masked mean over
    ``cu_seqlens`` (the O(total) log-probs laid out per sequence; see :class:`~gspo_kernels.sequences.Packed`)."""
    from .sequences import resolve_packed

    check_logits(logits)
    if lengths is not None:
        raise OptionError("with cu_seqlens, give a mask (total,) or none, not lengths")
    lead = tuple(logits.shape[:-1])
    if len(lead) not in (1, 2) or (len(lead) == 2 and lead[0] != 1):
        raise ShapeError(f"packed logits must be (total, V) or (1, total, V), got shape {tuple(logits.shape)}")
    total = lead[-1]
    checks = ValueChecks(check_inputs)
    packed = resolve_packed(cu_seqlens, total, max_seqlen, checks=checks)
    valid = resolve_mask(mask, None, tokens, checks=checks) if mask is not None else None
    kept = _kept(tokens, ignore_index)
    if kept is not None:
        valid = kept if valid is None else valid & kept
    logp = token_logprobs_checked(logits, tokens, checks, valid=valid, **kw)
    return checks.finish(packed.sequence_mean(logp, valid, normalize))
