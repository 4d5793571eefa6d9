"""Chunked PyTorch path: the same semantics as the Triton kernels, for tensors
on devices where the kernels do not run (CPU without ``TRITON_INTERPRET=1``).

Rows are processed in chunks of at most ``CHUNK_ELEMENTS`` logits, so the
extra memory is one fp32 chunk (two with the entropy) per worker, never a full
``(..., V)`` fp32 log-softmax.

Threads: every op on a chunk runs single-threaded and the chunks are shared
out among ``torch.get_num_threads()`` workers (the calling thread and
``torch.get_num_threads() - 1`` helper threads; torch ops release the GIL),
each taking the next chunk when it is done with its last. A chunk's ops run
back to back on a buffer of the worker's that stays in its core's cache, and
no op waits on a thread barrier: a multi-threaded op per pass (~8 per chunk)
would stall at every barrier whenever another process holds a core. While the
path runs, torch's intra-op thread count is set to 1 process-wide (restored
afterwards). The values do not depend on the thread count: each row is reduced
by one thread in a fixed order.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ._kernels import collapse_rows, seq_shrink

# 2**18 fp32 elements = 1 MiB per chunk: one worker's buffer (and the chunk's
# logits) stay in a core's L2 cache across the chunk's passes, and the per-chunk
# Python overhead (~10 ops of a few microseconds) stays ~1% of the chunk's work.
CHUNK_ELEMENTS = 1 << 18

_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 1


@contextlib.contextmanager
def _single_threaded_ops():
    """Sets torch's intra-op threads to 1 for the duration; yields the count it had (the workers)."""
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved > 1:
                torch.set_num_threads(1)
        _threads_depth += 1
        workers = _threads_saved
    try:
        yield workers
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0 and _threads_saved > 1:
                torch.set_num_threads(_threads_saved)


def _blocks(t: torch.Tensor) -> list:
    """(row_start, (rows, V) view) over the flattened leading dims of ``t``, no copy."""
    V = t.shape[-1]
    (D0, s0), (D1, s1), (D2, s2) = collapse_rows(t.shape[:-1], t.stride()[:-1])
    view = torch.as_strided(t, (D0, D1, D2, V), (s0, s1, s2, t.stride(-1) if V > 1 else 1), t.storage_offset())
    chunk = _chunk_rows(V)
    out: list[tuple[int, torch.Tensor]] = []
    row = 0
    for i0 in range(D0):
        for i1 in range(D1):
            rows = view[i0, i1]
            out.extend((row + r, rows[r : r + chunk]) for r in range(0, D2, chunk))
            row += D2
    return out


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _run(blocks: list, work, V: int, acc: torch.dtype, device, nbuf: int) -> None:
    """``work(block_index, scratch)`` for every block, spread over the workers; ``scratch`` is a list
    of ``nbuf`` (chunk rows, V) ``acc`` buffers owned by the worker (allocated here, once)."""
    if not blocks:
        return
    on_cpu = torch.device(device).type == "cpu"  # other devices' ops are asynchronous: one worker
    with _single_threaded_ops() if on_cpu else contextlib.nullcontext(1) as threads, torch.no_grad():
        n_workers = max(1, min(threads, len(blocks)))
        rows = min(_chunk_rows(V), max(b.shape[0] for _, b in blocks))
        scratch = [[torch.empty(rows, V, dtype=acc, device=device) for _ in range(nbuf)] for _ in range(n_workers)]
        if n_workers == 1:
            for i in range(len(blocks)):
                work(i, scratch[0])
            return
        lock = threading.Lock()
        todo = iter(range(len(blocks)))

        def worker(k: int) -> None:
            with torch.no_grad():  # grad mode is per thread
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    work(i, scratch[k])

        with ThreadPoolExecutor(max_workers=n_workers - 1) as pool:
            helpers = [pool.submit(worker, k) for k in range(1, n_workers)]
            worker(0)
            for h in helpers:
                h.result()


def torch_fwd(logits: torch.Tensor, tokens: torch.Tensor, inv_temp: float, entropy: bool = False):
    """Returns ``(logp, c, ent)`` as the Triton forward: ``c = tau * logsumexp(x / tau)``
    (``ent`` empty unless asked). ``logits`` (..., V), ``tokens`` (...); outputs (...)."""
    V = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(logits.shape[:-1], dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else logp.new_empty(0)
    flat_logp, flat_lse, flat_ent = logp.view(-1), lse.view(-1), ent.view(-1)
    y_all = tokens.reshape(-1).clamp(0, V - 1).long()
    blocks = _blocks(logits.detach())

    def work(i, scratch):
        r, x = blocks[i]
        n = x.shape[0]
        xs = scratch[0][:n]
        xs.copy_(x)
        m = xs.amax(-1, keepdim=True)
        # An all -inf row: shift 0 (no inf - inf). A +inf max stays: x - m is NaN at the +inf
        # logits, so the row's log-prob, entropy and gradient are NaN, as in the kernels.
        m.masked_fill_(m == float("-inf"), 0.0)
        xs.sub_(m).mul_(inv_temp)  # differences before scaling, as the kernel; max 0 (or NaN)
        xy = xs.gather(-1, y_all[r : r + n].unsqueeze(-1)).squeeze(-1)
        if entropy:
            l = torch.exp(xs, out=scratch[1][:n]).sum(-1).log_()  # logsumexp: the max is 0
        else:
            l = xs.exp_().sum(-1).log_()
        flat_lse[r : r + n] = m.squeeze(-1) + l / inv_temp  # c = tau * lse: logit units, as the kernel saves
        flat_logp[r : r + n] = xy - l
        if entropy:  # H = -sum_v p_v log p_v (no lse - E[x] cancellation); p = 0 entries contribute 0
            xs.sub_(l.unsqueeze(-1))
            p = torch.exp(xs, out=scratch[1][:n])
            xs.masked_fill_(p == 0, 0.0)
            flat_ent[r : r + n] = -p.mul_(xs).sum(-1)

    _run(blocks, work, V, acc, logits.device, 2 if entropy else 1)
    return logp, lse, ent


def torch_bwd(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ent,
    grad_ent,
    inv_temp: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``dx = (g (1[v = y] - p) - h p (log p + H)) / tau`` (h term when ``grad_ent`` is given),
    written into ``out`` (the logits' shape; may be the logits themselves). Rows whose upstream
    gradients are all zero get exact zeros, whatever their logits hold."""
    V = logits.shape[-1]
    acc = lse.dtype
    y_raw = tokens.reshape(-1).long()
    inside = (y_raw >= 0) & (y_raw < V)  # another vocabulary shard's id matches no column
    y_all = y_raw.clamp(0, V - 1)
    g_all = grad.reshape(-1).to(acc)
    h_all = None if grad_ent is None else grad_ent.reshape(-1).to(acc)
    H_all = None if grad_ent is None else ent.reshape(-1).to(acc)
    lse_all = lse.reshape(-1)
    # rows with no upstream gradient get exact zeros (masked below), whatever their logits
    # hold; no host-side skip of all-zero chunks: the backward never syncs
    inactive = g_all == 0 if h_all is None else (g_all == 0) & (h_all == 0)
    scale_all = g_all * inv_temp
    blocks = _blocks(logits.detach())
    if out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride():  # in place
        out_blocks = _blocks(out.detach())

        def target(i, r, n):
            return out_blocks[i][1]
    else:
        out_rows = out.detach().view(-1, V)  # a fresh gradient buffer is contiguous

        def target(i, r, n):
            return out_rows[r : r + n]

    def work(i, scratch):
        r, x = blocks[i]
        n = x.shape[0]
        o = target(i, r, n)
        logp = scratch[0][:n]  # log p = (x - c) / tau, then p, in place
        logp.copy_(x)
        logp.sub_(lse_all[r : r + n].unsqueeze(-1)).mul_(inv_temp)
        scale = scale_all[r : r + n].unsqueeze(-1)
        if h_all is None:
            p = logp.exp_()
            p.mul_(-scale)
        else:
            assert h_all is not None and H_all is not None
            p = torch.exp(logp, out=scratch[1][:n])
            hs = (h_all[r : r + n] * inv_temp).unsqueeze(-1)
            logp.add_(H_all[r : r + n].unsqueeze(-1)).masked_fill_(p == 0, 0.0).mul_(hs).add_(scale).mul_(p).neg_()
            p = logp
        p.scatter_add_(-1, y_all[r : r + n].unsqueeze(-1), scale * inside[r : r + n].unsqueeze(-1))
        p.masked_fill_(inactive[r : r + n].unsqueeze(-1), 0.0)
        o.copy_(p)

    _run(blocks, work, V, acc, logits.device, 1 if h_all is None else 2)
    return out


def torch_seq_reduce(logp: torch.Tensor, maskf: torch.Tensor, normalize: bool):
    """As ``_kernels_seq._seq_reduce_kernel``: the sum runs on ``logp * 2^-ceil(log2 T)`` (exact), so a
    mean of finite log-probs never overflows. ``logp``, ``maskf`` (..., T); outputs (...)."""
    shrink = seq_shrink(logp.shape[-1])
    total = torch.where(maskf != 0, logp * shrink, torch.zeros_like(logp)).sum(-1)
    length = maskf.sum(-1)
    if normalize:
        total = torch.where(length > 0, total / length.clamp(min=1), torch.zeros_like(total))
    return total / shrink, length
