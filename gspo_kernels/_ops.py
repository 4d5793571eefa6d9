"""The log-prob kernels as ``torch.library`` custom ops, the backend choice, and the
logits' backward that every autograd function over them shares.

``logprob_fwd`` gives per row ``(logp, c, ent)`` (``c = tau * logsumexp(x / tau)``),
``logprob_bwd`` the gradient w.r.t. the logits (fresh buffer or in place), ``seq_reduce``
the masked per-sequence mean or sum. Eager calls run the implementations directly;
under ``torch.compile`` they go through the custom ops, opaque graph nodes (no graph
break). Devices: CUDA tensors run the Triton kernels; CPU tensors run them too when
``TRITON_INTERPRET=1`` was set before import (``CPU_BACKEND``), else the chunked
PyTorch path (:mod:`._torch_path`), same semantics, bounded memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _torch_path
from ._kernels import HAS_TRITON
from ._validate import check_token_range

if HAS_TRITON:
    from . import _kernels, _kernels_seq

# Which implementation CPU tensors use: the Triton kernels through the
# interpreter (TRITON_INTERPRET=1 must be set before triton is imported) or
# the chunked PyTorch path. Tests switch it to cover both.
CPU_BACKEND = "triton" if (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1") else "torch"


def use_triton(t: Tensor) -> bool:
    if not HAS_TRITON:
        return False
    return t.is_cuda or (t.device.type == "cpu" and CPU_BACKEND == "triton")


# ---------------------------------------------------------------- custom ops
# Eager calls run the implementations directly; under torch.compile they go
# through the ``torch.library`` custom ops below, which the compiler treats as
# opaque nodes (no graph break). Going through the op in eager too would cost
# its first dispatch in a process an import of torch._dynamo (~1 s).
def _fwd_impl(
    logits: Tensor, tokens: Tensor, valid: Optional[Tensor], inv_temp: float, entropy: bool, check: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    # The range check lives inside the op so it also runs under torch.compile. A vocab
    # shard's local ids lie outside [0, V) for other shards' tokens: the kernels clamp
    # them (never read out of bounds) and the caller masks those rows.
    if check:
        check_token_range(tokens, logits.shape[-1], valid)
    impl = _kernels.triton_fwd if use_triton(logits) else _torch_path.torch_fwd
    return impl(logits, tokens, inv_temp, entropy)


def _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out):
    impl = _kernels.triton_bwd if use_triton(logits) else _torch_path.torch_bwd
    return impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out)


def _bwd_out(logits, tokens, lse, grad, ent, grad_ent, inv_temp):
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _bwd_impl(logits, tokens, lse, grad, ent, grad_ent, inv_temp, out)


def _seq_reduce_impl(logp, maskf, normalize):
    if use_triton(logp):
        return _kernels_seq.triton_seq_reduce(logp, maskf, normalize)
    return _torch_path.torch_seq_reduce(logp, maskf, normalize)


@torch.library.custom_op("gspo_kernels::logprob_fwd", mutates_args=())
def _logprob_fwd(
    logits: Tensor, tokens: Tensor, valid: Optional[Tensor], inv_temp: float, entropy: bool, check: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(logits, tokens, valid, inv_temp, entropy, check)


@_logprob_fwd.register_fake
def _(logits, tokens, valid, inv_temp, entropy, check):
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = logits.new_empty(logits.shape[:-1], dtype=dt)
    return out, torch.empty_like(out), torch.empty_like(out) if entropy else out.new_empty(0)


@torch.library.custom_op("gspo_kernels::logprob_bwd", mutates_args=())
def _logprob_bwd(
    logits: Tensor,
    tokens: Tensor,
    lse: Tensor,
    grad: Tensor,
    ent: Optional[Tensor],
    grad_ent: Optional[Tensor],
    inv_temp: float,
) -> Tensor:
    return _bwd_out(logits, tokens, lse, grad, ent, grad_ent, inv_temp)


@_logprob_bwd.register_fake
def _(logits, tokens, lse, grad, ent, grad_ent, inv_temp):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("gspo_kernels::logprob_bwd_inplace", mutates_args=("logits",))
def _logprob_bwd_inplace(
    logits: Tensor,
    tokens: Tensor,
    lse: Tensor,
    grad: Tensor,
    ent: Optional[Tensor],
    grad_ent: Optional[Tensor],
    inv_temp: float,
) -> None:
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


def logits_grad(
    ctx,
    logits: Tensor,
    tokens: Tensor,
    lse: Tensor,
    grad_tok: Tensor,
    ent: Optional[Tensor] = None,
    grad_ent: Optional[Tensor] = None,
) -> Tensor:
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
