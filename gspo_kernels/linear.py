"""Log-probs straight from hidden states and the LM head, never holding the
full ``(..., T, V)`` logits.

Two implementations, same semantics:

- **Fused kernels** (``_kernels_linear``): CUDA tensors, and CPU tensors under
  ``TRITON_INTERPRET=1`` (as the logits kernels), for bf16, fp16 and fp32.
  Forward tiles ``hidden @ weight.T`` on the tensor cores and folds each tile
  into the online softmax: no logit is written. Backward recomputes the tiles,
  writes ``dz`` one vocabulary slice at a time and forms ``grad_weight`` (each
  element summed once, in fp32 registers), ``grad_bias`` and ``grad_hidden``
  with ``tl.dot``; deterministic. Optional gradient filtering
  (``grad_filter``).
- **Chunked** (this file), for everything else: fp64 (``gradcheck``), and
  CPUs without the interpreter. Forward, per chunk of ``C`` rows:
  ``logits_c = hidden_c @ weight.T (+ bias)`` (one matrix product), reduced by
  the fused logits kernel (or the chunked PyTorch path) and dropped. Backward,
  per chunk: recompute ``logits_c``, overwrite it in place with ``dlogits_c``,
  then ``grad_hidden_c = dlogits_c @ weight``, ``grad_weight += dlogits_c.T @
  hidden_c`` (fp32 accumulator across chunks), ``grad_bias += dlogits_c.sum(0)``.
  Peak extra memory: one chunk of logits, plus the fp32 ``grad_weight``
  accumulator and one ``(V, H)`` partial product when the weight is not fp32.

Saved for backward (both): hidden, weight, bias, tokens, the per-token
``tau * logsumexp`` (and entropy): O(N*T) floats. Rows where ``valid`` is
False give 0 (log-prob and entropy) and a zero gradient, whatever their
upstream gradient; rows with zero upstream gradient cost no products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _launch_linear
from . import vocab_parallel as vp
from ._checks import ValueChecks
from ._ops import logprob_bwd, logprob_fwd, use_triton
from ._validate import check_linear_args, check_mask, check_token_range, resolve_mask
from .errors import OptionError, ShapeError
from .sequences import masked_sequence_mean, resolve_packed

# The memory budget (``memory_budget=``, bytes) of the one buffer whose size the op chooses:
# a chunk of logits (chunked path, when no chunk_size is given) or the fused backward's dz
# slice. An explicit argument, never derived from free memory at run time: the tiling of a
# call depends on its shapes and this budget alone, so a CUDA graph captures what every
# eager call would run. Default (``default_memory_budget``): 256 MiB on a GPU (beyond it, a
# GEMM of 256 MiB / (V * 2 B) >= 512 rows at V = 151,936 already runs the tensor cores near
# peak, so larger chunks buy no speed), 64 MiB elsewhere. Pass less where memory is tight.
MEMORY_BUDGET = 256 << 20
CPU_MEMORY_BUDGET = 64 << 20
# The fused kernels where they run; tests switch it off to cover the chunked
# path with the logits kernels.
FUSED = True
# Fused forward: vocabulary splits enough for (row block, split) programs to
# fill the GPU twice over (2 x SMs), each split at least MIN_SPLIT_BLOCKS
# tiles wide so that its per-row state (16 bytes) and first loads stay
# negligible against its tiles. The interpreter counts SPLIT_PROGRAMS (tests
# lower MIN_SPLIT_BLOCKS to put V over several splits).
MIN_SPLIT_BLOCKS = 8
SPLIT_PROGRAMS = 4
# Fused backward: the R x Vc dz slice's budget, as the chunked path's logits
# chunk (memory_budget, above). Each slice costs a
# read and a write of the fp32 grad_hidden accumulator (8 R H bytes: 0.54 GB
# at R = 16,384, H = 4,096), so slices much under 256 MiB (Vc = 8,192 there:
# 19 slices, 10 GB of accumulator traffic, ~3 ms at an H100's 3.3 TB/s) trade speed for
# memory. MAX_SLICE_COLS caps Vc (tests lower it to run several slices).
MAX_SLICE_COLS = 1 << 30
# Gradient filtering's default threshold: finfo(dtype).eps / 32 (bf16: 2**-12,
# fp16: 2**-15, fp32: 2**-28), Cut Cross-Entropy's choice: a probability
# below it moves a gradient entry by under 1/32 of the dtype's rounding unit
# of the sampled token's term g (1 - p) / tau.
FILTER_DIVISOR = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_threshold(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / FILTER_DIVISOR


def default_memory_budget(device: torch.device) -> int:
    """``MEMORY_BUDGET`` (256 MiB) on a GPU, ``CPU_MEMORY_BUDGET`` (64 MiB) elsewhere: from the
    device's type alone (no query of the device)."""
    return MEMORY_BUDGET if device.type == "cuda" else CPU_MEMORY_BUDGET


def default_chunk_size(V: int, dtype: torch.dtype, device: torch.device, budget: Optional[int] = None) -> int:
    """Rows per chunk: a power of two whose ``rows * V`` logits fit ``budget`` bytes (default
    :func:`default_memory_budget`), at least 1."""
    budget = default_memory_budget(device) if budget is None else budget
    rows = max(1, budget // (V * torch.empty((), dtype=dtype).element_size()))
    return 1 << (rows.bit_length() - 1)


def uses_fused(hidden: Tensor) -> bool:
    """Whether ``hidden`` (and its head) go through the fused kernels."""
    return FUSED and _launch_linear.supported(hidden) and use_triton(hidden)


@dataclass(frozen=True)
class LinearOptions:
    inv_temp: float
    chunk_size: Optional[int]  # rows per chunk (chunked path); None: default_chunk_size
    entropy: bool = False
    shard: Optional[vp.Shard] = None  # weight holds rows [start, start + width) of V
    threshold: Optional[float] = None  # gradient filtering (fused path), None: exact
    budget: Optional[int] = None  # memory_budget in bytes (chunk / dz slice), None: default_memory_budget


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.nn.functional.linear(h, weight, bias)


def _chunked_fwd(hidden, weight, bias, tokens, valid, opts, C):
    R = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.zeros(R, dtype=acc, device=hidden.device)
    lse = torch.zeros(R, dtype=acc, device=hidden.device)
    ent = torch.zeros(R, dtype=acc, device=hidden.device) if opts.entropy else None
    # Every chunk runs (skipping fully masked ones would cost a host read each); the ids were
    # checked by the caller (ValueChecks), and the logits kernels clamp them anyway.
    for r in range(0, R, C):
        v = None if valid is None else valid[r : r + C]
        lp, l, e = logprob_fwd(
            _logits(hidden[r : r + C], weight, bias), tokens[r : r + C], v, opts.inv_temp, opts.entropy, check=False
        )
        logp[r : r + C], lse[r : r + C] = lp, l
        if ent is not None:  # opts.entropy
            ent[r : r + C] = e
    return logp, lse, ent


def _chunked_bwd(hidden, weight, bias, tokens, lse, ent, g, h_ent, opts, C, need):
    R = hidden.shape[0]
    need_h, need_w, need_b = need
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = (
        torch.zeros(
            weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype, device=weight.device
        )
        if need_w
        else None
    )
    grad_b = (
        torch.zeros(bias.shape, dtype=grad_w.dtype if grad_w is not None else torch.float32, device=bias.device)
        if (need_b and bias is not None)
        else None
    )
    for r in range(0, R, C):
        gc = g[r : r + C]
        hc = None if h_ent is None else h_ent[r : r + C]
        hid = hidden[r : r + C]
        dl = _logits(hid, weight, bias)
        logprob_bwd(
            dl, tokens[r : r + C], lse[r : r + C], gc, None if hc is None else ent[r : r + C], hc, opts.inv_temp, True
        )
        if grad_h is not None:
            grad_h[r : r + C] = dl @ weight
        if grad_w is not None:
            act = gc != 0 if hc is None else (gc != 0) | (hc != 0)
            hid = torch.where(act[:, None], hid, torch.zeros((), dtype=hid.dtype, device=hid.device))  # NaN stays out
            if grad_w.dtype == dl.dtype:
                grad_w.addmm_(dl.t(), hid)
            else:  # low-precision product (fp32 accumulation inside the GEMM), fp32 sum across chunks
                grad_w += dl.t() @ hid
        if grad_b is not None:
            grad_b += dl.sum(0, dtype=grad_b.dtype)
    return (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


def split_span(R: int, V: int, tiles: dict, programs: int) -> tuple[int, int]:
    """``(span, n_split)``: the fused forward's vocabulary split width (a multiple of BLOCK_N) and count."""
    t = tiles["fwd"]
    n = max(1, min(_cdiv(programs, _cdiv(max(R, 1), t.block_m)), V // (t.block_n * MIN_SPLIT_BLOCKS)))
    span = _cdiv(_cdiv(V, n), t.block_n) * t.block_n
    return span, _cdiv(V, span)


def slice_cols(
    R: int, V: int, dtype: torch.dtype, device: torch.device, tiles: dict, budget: Optional[int] = None
) -> int:
    """The fused backward's vocabulary slice ``Vc``: a multiple of the dz tile whose ``R x Vc``
    buffer fits ``budget`` bytes (default :func:`default_memory_budget`), at least one tile."""
    budget = default_memory_budget(device) if budget is None else budget
    bn = tiles["dz"].block_n
    cols = budget // (max(R, 1) * torch.empty((), dtype=dtype).element_size()) // bn * bn
    return max(bn, min(cols, MAX_SLICE_COLS // bn * bn, _cdiv(V, bn) * bn))


def fused_fwd(hidden, weight, bias, tokens, valid, inv_temp: float, entropy: bool):
    """``(logp, c, ent)`` per row from the fused kernels, as ``logprob_fwd`` returns them for the
    logits (``c = tau * logsumexp``; ``ent`` empty unless ``entropy``); rows where ``valid`` is
    False get zeros. ``hidden (R, H)``, ``weight (V, H)``, ``tokens (R,)`` (ids outside
    ``[0, V)`` match no column: another shard's)."""
    R, V, dev = hidden.shape[0], weight.shape[0], hidden.device
    logp = torch.zeros(R, dtype=torch.float32, device=dev)
    lse = torch.zeros_like(logp)
    ent = torch.zeros_like(logp) if entropy else logp.new_empty(0)
    if R == 0:
        return logp, lse, ent
    tiles = _launch_linear.tile_set(hidden.dtype, dev, _launch_linear.aligned_rows(hidden, weight))
    programs = 2 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else SPLIT_PROGRAMS
    span, n_split = split_span(R, V, tiles, programs)
    stats = torch.empty((4, R, n_split), dtype=torch.float32, device=dev)
    for launch in _launch_linear.fwd_launches(
        hidden, weight, bias, tokens, valid, inv_temp, logp, lse, ent if entropy else None, stats, span, tiles
    ):
        launch()
    return logp, lse, ent


def fused_bwd(hidden, weight, bias, tokens, c, g, ent, gh, inv_temp: float, need, threshold=None, budget=None):
    """Gradients ``(grad_hidden, grad_weight, grad_bias)`` (None where ``need`` says not) from
    the fused kernels, one vocabulary slice at a time, from the saved ``c`` (and ``ent``) for
    upstream ``g`` (and ``gh``, the entropy's), fp32 ``(R,)``; rows with zero upstream gradient
    contribute nothing. ``threshold``: gradient filtering (None: exact). ``budget``: the dz
    slice's bytes (:func:`slice_cols`)."""
    (R, K), V, dev = hidden.shape, weight.shape[0], hidden.device
    grad_h = torch.empty((R, K), dtype=hidden.dtype, device=dev) if need[0] else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need[1] else None
    grad_b = torch.empty(V, dtype=bias.dtype, device=dev) if (need[2] and bias is not None) else None
    if R == 0:
        return tuple(None if x is None else x.zero_() for x in (grad_h, grad_w, grad_b))
    active = ((g != 0) if gh is None else (g != 0) | (gh != 0)).to(torch.int8)
    tiles = _launch_linear.tile_set(hidden.dtype, dev, _launch_linear.aligned_rows(hidden, weight))
    vc = slice_cols(R, V, hidden.dtype, dev, tiles, budget)
    t = tiles["dz"]
    dz = torch.empty((R, vc), dtype=hidden.dtype, device=dev)
    flags = torch.empty((_cdiv(R, t.block_m), _cdiv(vc, t.block_n)), dtype=torch.int8, device=dev)
    acc_h = None  # fp32 running sum of grad_hidden over slices, when grad_h itself is not fp32
    if grad_h is not None:
        acc_h = (
            grad_h
            if (hidden.dtype == torch.float32 or vc >= V)
            else torch.empty((R, K), dtype=torch.float32, device=dev)
        )
    for v0 in range(0, V, vc):
        ncols = min(vc, V - v0)
        dst = None if grad_h is None else (grad_h if v0 + ncols >= V else acc_h)
        dz_launch, *products = _launch_linear.bwd_launches(
            hidden,
            weight,
            bias,
            tokens,
            c,
            g,
            ent,
            gh,
            inv_temp,
            threshold,
            dz,
            flags,
            v0,
            ncols,
            dst,
            acc_h if v0 > 0 else None,
            grad_w,
            grad_b,
            active,
            tiles,
        )
        dz_launch()
        for product in products:  # built after dz ran: their K-block lists come from its flags
            product()()
    return grad_h, grad_w, grad_b


class LinearTokenLogprobs(torch.autograd.Function):
    """``(hidden (R, H), weight (V, H), bias (V,) | None, tokens (R,), valid (R,) | None, opts) -> logp (R,)``,
    or ``(logp, entropy)`` with ``opts.entropy``. Rows where ``valid`` is False give 0 and
    a zero gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, valid, opts: LinearOptions):
        fused = uses_fused(hidden)
        if opts.shard is not None:
            tokens, inside = vp.local_ids(tokens, opts.shard)
        if fused:
            logp, lse, ent = fused_fwd(hidden, weight, bias, tokens, valid, opts.inv_temp, opts.entropy)
            ent = ent if opts.entropy else None
        else:
            C = opts.chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device, opts.budget)
            logp, lse, ent = _chunked_fwd(hidden, weight, bias, tokens, valid, opts, C)
        if opts.shard is not None:  # this shard's statistics -> global ones (two all-reduces over R floats)
            logp, lse, ent = vp.combine_local(logp, lse, ent, inside, opts.inv_temp, opts.shard.group)
        if valid is not None:
            logp = torch.where(valid, logp, torch.zeros_like(logp))
            ent = None if ent is None else torch.where(valid, ent, torch.zeros_like(ent))
        ctx.opts, ctx.fused = opts, fused
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, valid, ent)
        return (logp, ent) if opts.entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        hidden, weight, bias, tokens, lse, valid, ent = ctx.saved_tensors
        opts: LinearOptions = ctx.opts
        need = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_ent is None:
            return None, None, None, None, None, None
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        if valid is not None:  # outputs there are constants: their upstream gradient goes nowhere
            g = torch.where(valid, g, torch.zeros_like(g))
            grad_ent = None if grad_ent is None else torch.where(valid, grad_ent, torch.zeros_like(grad_ent))
        g = g.contiguous()
        h_ent = None if grad_ent is None else grad_ent.to(lse.dtype).contiguous()
        if ctx.fused:
            grad_h, grad_w, grad_b = fused_bwd(
                hidden,
                weight,
                bias,
                tokens,
                lse,
                g,
                None if h_ent is None else ent,
                h_ent,
                opts.inv_temp,
                need,
                opts.threshold,
                opts.budget,
            )
        else:
            C = opts.chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device, opts.budget)
            grad_h, grad_w, grad_b = _chunked_bwd(hidden, weight, bias, tokens, lse, ent, g, h_ent, opts, C, need)
        if grad_h is not None and opts.shard is not None:
            # hidden feeds every shard (a column-parallel layer's input): sum its gradient over the group
            import torch.distributed as dist

            dist.all_reduce(grad_h, group=opts.shard.group)
        return grad_h, grad_w, grad_b, None, None, None


def _threshold(grad_filter, dtype: torch.dtype) -> Optional[float]:
    if grad_filter is None or grad_filter is False:
        return None
    if grad_filter is True:
        return default_threshold(dtype)
    if isinstance(grad_filter, (int, float)) and 0.0 < float(grad_filter) < 1.0:
        return float(grad_filter)
    raise OptionError(
        f"grad_filter must be False, True (the dtype's default threshold) or a probability in (0, 1), "
        f"got {grad_filter!r}"
    )


def _rows(hidden: Tensor) -> Tensor:
    """``(..., T, H) -> (R, H)``: a view when the leading dims allow it, else a copy of
    ``hidden`` (O(N*T*H), never V-sized). The matrix products take any row stride."""
    return hidden.reshape(-1, hidden.shape[-1])


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    valid: Optional[Tensor] = None,
    return_entropy: bool = False,
    vocab_group=None,
    vocab_size: Optional[int] = None,
    grad_filter=False,
    check_inputs: bool = True,
    memory_budget: Optional[int] = None,
):
    """Per-token log-probs of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    (and, with ``return_entropy=True``, that distribution's entropy, from the same pass).

    Args:
        hidden: ``(..., T, H)`` last hidden states (any strides), bf16/fp16/fp32/fp64.
        weight: ``(V, H)`` LM head (may be tied to the embedding), hidden's dtype.
        tokens: ``(..., T)`` ids in ``[0, V)``.
        bias: optional ``(V,)``.
        temperature: tau > 0.
        chunk_size: rows per chunk of the chunked path; default :func:`default_chunk_size`
            (from V and ``memory_budget``). The fused kernels do not chunk rows.
        valid: optional ``(..., T)`` mask: ids are checked only there; elsewhere the
            outputs are 0 and the gradient is 0 (in the fused kernels, rows of masked
            tokens cost no products in backward, nor, in blocks of rows fully masked, in
            forward; the chunked path computes every chunk: skipping one would cost a host read).
        return_entropy: also return the per-token entropy (its gradient flows
            to hidden, weight and bias like the log-prob's).
        vocab_group: process group over which the LM head is sharded by rows:
            ``weight`` (and ``bias``) are this rank's ``(V/P, H)`` rows (a
            ``ColumnParallelLinear`` output shard, rank order); tokens are global
            ids. The gradient of ``hidden`` is all-reduced over the group here
            (Megatron's column-parallel input rule); ``grad_weight`` stays local.
        vocab_size: optional global V, checked against ``V/P * P`` (on every rank alike).
        grad_filter: gradient filtering in the fused backward, off by default
            (exact). ``True``: skip each (rows x vocabulary) tile whose
            probabilities are all below ``finfo(dtype).eps / 32`` (bf16:
            2**-12) and that holds no sampled token; a float: that threshold.
            An approximation (error measured in docs/layouts.md, "From hidden states");
            the chunked path ignores it and stays exact.
        check_inputs: check that ids lie in ``[0, V)`` at valid positions, on the device, read
            once after the kernels (one host sync). ``False``: no check, no sync; the kernels
            never read out of bounds, and an out-of-range id's log-prob is meaningless (the
            fused kernels match it to no column, the chunked path clamps it).
        memory_budget: bytes for the one buffer the op sizes itself: the chunked path's chunk of
            logits (without ``chunk_size``) and the fused backward's ``R x Vc`` dz slice. Default
            :func:`default_memory_budget`: 256 MiB on a GPU, 64 MiB elsewhere. Never derived from
            free memory, so a CUDA graph replays what an eager call runs.

    Returns:
        ``(..., T)`` float32 (float64 for float64 input), or ``(logp, entropy)``;
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    checks = ValueChecks(check_inputs)
    out = linear_token_logprobs_checked(
        hidden,
        weight,
        tokens,
        checks,
        bias=bias,
        temperature=temperature,
        chunk_size=chunk_size,
        valid=valid,
        return_entropy=return_entropy,
        vocab_group=vocab_group,
        vocab_size=vocab_size,
        grad_filter=grad_filter,
        memory_budget=memory_budget,
    )
    if return_entropy:
        return checks.finish(out[0]), out[1]
    return checks.finish(out)


def linear_token_logprobs_checked(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    checks: ValueChecks,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    valid: Optional[Tensor] = None,
    return_entropy: bool = False,
    vocab_group=None,
    vocab_size: Optional[int] = None,
    grad_filter=False,
    memory_budget: Optional[int] = None,
):
    """:func:`linear_token_logprobs` with its id check queued on ``checks`` (the caller reads it)."""
    inv_temp = check_linear_args(hidden, weight, tokens, bias, temperature, chunk_size, memory_budget)
    threshold = _threshold(grad_filter, hidden.dtype)
    vm = None if valid is None else check_mask(valid, tokens, name="valid")
    v = None if vm is None else vm.reshape(-1).contiguous()
    shard = None
    if vocab_group is None:
        check_token_range(tokens, weight.shape[0], vm, checks=checks)
    else:
        shard = vp.resolve_shard(vocab_group, weight.shape[0], tokens.numel(), vocab_size, name="weight")
        check_token_range(tokens, shard.vocab, vm, checks=checks, kind=None)  # the global V
    opts = LinearOptions(inv_temp, chunk_size, bool(return_entropy), shard, threshold, memory_budget)
    out = LinearTokenLogprobs.apply(_rows(hidden), weight, bias, tokens.reshape(-1).contiguous(), v, opts)
    if return_entropy:
        return out[0].reshape(tokens.shape), out[1].reshape(tokens.shape)
    return out.reshape(tokens.shape)


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    mask: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: bool = True,
    chunk_size: Optional[int] = None,
    vocab_group=None,
    vocab_size: Optional[int] = None,
    grad_filter=False,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    check_inputs: bool = True,
    memory_budget: Optional[int] = None,
) -> Tensor:
    """Masked mean (``normalize=True``, GSPO's 1/L) or sum of :func:`linear_token_logprobs`
    over T: ``(..., T, H) -> (...)`` float32; a sequence with L = 0 gives 0 and zero gradients.
    ``cu_seqlens``: packed sequences, ``hidden`` ``(total, H)`` or ``(1, total, H)``, tokens/mask
    ``(total,)`` or ``(1, total)``, ``-> (N,)`` (see :func:`gspo_kernels.sequence_logprobs`).
    ``check_inputs``: ids and lengths (and cu_seqlens) checked on one device flag read once;
    ``False``: none, no host sync (with ``max_seqlen`` given when packed). ``memory_budget``: see
    :func:`linear_token_logprobs`."""
    check_linear_args(hidden, weight, tokens, bias, temperature, chunk_size, memory_budget)
    checks = ValueChecks(check_inputs)
    kw = dict(
        bias=bias,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_group=vocab_group,
        vocab_size=vocab_size,
        grad_filter=grad_filter,
        memory_budget=memory_budget,
    )
    if cu_seqlens is not None:
        if lengths is not None:
            raise OptionError("with cu_seqlens, give a mask (total,) or none, not lengths")
        lead = tuple(hidden.shape[:-1])
        if len(lead) not in (1, 2) or (len(lead) == 2 and lead[0] != 1):
            raise ShapeError(f"packed hidden must be (total, H) or (1, total, H), got shape {tuple(hidden.shape)}")
        packed = resolve_packed(cu_seqlens, lead[-1], max_seqlen, checks=checks)
        valid = None if mask is None else check_mask(mask, tokens)
        logp = linear_token_logprobs_checked(hidden, weight, tokens, checks, valid=valid, **kw)
        return checks.finish(packed.sequence_mean(logp, valid, normalize))
    valid = resolve_mask(mask, lengths, tokens, checks=checks)
    if valid is None:
        valid = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    logp = linear_token_logprobs_checked(hidden, weight, tokens, checks, valid=valid, **kw)
    return checks.finish(masked_sequence_mean(logp, valid, normalize))
