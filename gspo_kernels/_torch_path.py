"""Chunked PyTorch path: the same semantics as the Triton kernels, for tensors
on devices where the kernels do not run (CPU without ``TRITON_INTERPRET=1``).

Rows are processed in chunks of at most ``CHUNK_ELEMENTS`` logits, so the
extra memory is one fp32 chunk (and its exp) at a time, never a full
``(..., V)`` fp32 log-softmax.
"""
from __future__ import annotations

import torch

from ._kernels import collapse_rows, seq_shrink

# 2**20 fp32 elements = 4 MiB per chunk: large enough that the per-chunk
# Python overhead is negligible against the chunk's arithmetic, small enough
# to stay a few percent of a naive log-softmax at realistic sizes.
CHUNK_ELEMENTS = 1 << 20


def _blocks(t: torch.Tensor):
    """Yield (row_start, (rows, V) view) over the flattened leading dims of ``t``, no copy."""
    V = t.shape[-1]
    (D0, s0), (D1, s1), (D2, s2) = collapse_rows(t.shape[:-1], t.stride()[:-1])
    view = torch.as_strided(t, (D0, D1, D2, V), (s0, s1, s2, t.stride(-1) if V > 1 else 1),
                            t.storage_offset())
    chunk = max(1, CHUNK_ELEMENTS // max(V, 1))
    row = 0
    for i0 in range(D0):
        for i1 in range(D1):
            rows = view[i0, i1]
            for r in range(0, D2, chunk):
                yield row + r, rows[r:r + chunk]
            row += D2


def torch_fwd(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float, entropy: bool = False):
    """Returns ``(logp, c, ent)`` as the Triton forward: ``c = tau * logsumexp(x / tau)``
    (``ent`` empty unless asked)."""
    V = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(logits.shape[:-1], dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp.new_empty(0)
    flat_logp, flat_lse, flat_ent = logp.view(-1), lse.view(-1), ent.view(-1)
    y_all = tokens.reshape(-1).clamp(0, V - 1).long()
    for r, x in _blocks(logits):
        n = x.shape[0]
        xa = x.to(acc, copy=True)
        m = xa.amax(-1, keepdim=True)
        # An all -inf row: shift 0 (no inf - inf). A +inf max stays: x - m is NaN at the +inf
        # logits, so the row's log-prob, entropy and gradient are NaN, as in the kernels.
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
        xs = xa.sub_(m).mul_(inv_temp)  # differences before scaling, as the kernel
        l = torch.logsumexp(xs, dim=-1)  # one more chunk-sized temporary inside
        y = y_all[r:r + n].unsqueeze(-1)
        flat_lse[r:r + n] = m.squeeze(-1) + l / inv_temp  # c = tau * lse: logit units, as the kernel saves
        flat_logp[r:r + n] = xs.gather(-1, y).squeeze(-1) - l
        if entropy:  # H = -sum_v p_v log p_v (no lse - E[x] cancellation); p = 0 entries contribute 0
            xs.sub_(l.unsqueeze(-1))
            p = xs.exp()
            flat_ent[r:r + n] = -torch.where(p == 0, 0.0, p * xs).sum(-1)
    return logp, lse, ent


def torch_bwd(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
              ent, grad_ent, inv_temp: float, out: torch.Tensor) -> torch.Tensor:
    """``dx = (g (1[v = y] - p) - h p (log p + H)) / tau`` (h term when ``grad_ent`` is given);
    rows whose upstream gradients are all zero get exact zeros, whatever their logits hold."""
    V = logits.shape[-1]
    acc = lse.dtype
    y_raw = tokens.reshape(-1).long()
    inside = (y_raw >= 0) & (y_raw < V)  # another vocabulary shard's id matches no column
    y_all = y_raw.clamp(0, V - 1)
    g_all = grad.reshape(-1).to(acc)
    h_all = None if grad_ent is None else grad_ent.reshape(-1).to(acc)
    H_all = None if grad_ent is None else ent.reshape(-1).to(acc)
    lse_all = lse.reshape(-1)
    same = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
    outs = _blocks(out) if same else None
    out_rows = None if same else out.view(-1, V)  # a fresh gradient buffer is contiguous
    for r, x in _blocks(logits):
        n = x.shape[0]
        o = next(outs)[1] if same else out_rows[r:r + n]
        g = g_all[r:r + n]
        # rows with no upstream gradient get exact zeros (masked below), whatever their logits
        # hold; no host-side skip of all-zero chunks: the backward never syncs
        active = g != 0 if h_all is None else (g != 0) | (h_all[r:r + n] != 0)
        logp = x.to(acc, copy=True)  # the chunk's temporaries: log p = (x - c) / tau, then p, in place
        logp.sub_(lse_all[r:r + n].unsqueeze(-1)).mul_(inv_temp)
        scale = (g * inv_temp).unsqueeze(-1)
        if h_all is None:
            p = logp.exp_()
            p.mul_(-scale)
        else:
            p = logp.exp()
            hs = (h_all[r:r + n] * inv_temp).unsqueeze(-1)
            logp.add_(H_all[r:r + n].unsqueeze(-1)).masked_fill_(p == 0, 0.0).mul_(hs).add_(scale).mul_(p).neg_()
            p = logp
        p.scatter_add_(-1, y_all[r:r + n].unsqueeze(-1), scale * inside[r:r + n].unsqueeze(-1))
        p.masked_fill_(~active.unsqueeze(-1), 0.0)
        o.copy_(p)
    return out


def torch_seq_reduce(logp: torch.Tensor, maskf: torch.Tensor, normalize: bool):
    """As ``_kernels._seq_reduce_kernel``: the sum runs on ``logp * 2^-ceil(log2 T)`` (exact), so a
    mean of finite log-probs never overflows."""
    shrink = seq_shrink(logp.shape[-1])
    total = torch.where(maskf != 0, logp * shrink, torch.zeros_like(logp)).sum(-1)
    length = maskf.sum(-1)
    if normalize:
        total = torch.where(length > 0, total / length.clamp(min=1), torch.zeros_like(total))
    return total / shrink, length
