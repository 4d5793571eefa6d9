"""Vocab-parallel ops over torch.distributed (gloo, CPU processes): every rank
holds a contiguous V/P shard; values and gradients equal the unsharded op's
within the fp32 tolerance table, for P = 2 and 4, each dtype, masks,
temperature, an empty sequence, tokens concentrated in one shard; the
hidden-state path (hidden, weight, bias gradients); the losses on a 2 x 2 grid
(two data-parallel replicas of a 2-way vocab split) equal to one process over
the whole batch; bad layouts refused on every rank; bitwise determinism."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_logprobs import TOLERANCE

from gspo_kernels import _ops, grpo_loss, gspo_loss, linear_token_logprobs, sequence_logprobs, token_logprobs

N, T, V, H = 3, 5, 48, 6  # V divisible by 2 and 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _data(dtype, concentrated=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 2).to(dtype)
    hi = V // 4 if concentrated else V  # concentrated: every token in the first quarter (one shard)
    tokens = torch.randint(0, hi, (N, T), generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    return logits, tokens, mask


def _outputs(x, tokens, mask, group=None):
    """The ops under test: (outputs, upstream weights) for one backward."""
    lp, ent = token_logprobs(x, tokens, temperature=0.7, valid=mask, return_entropy=True, vocab_group=group)
    seq = sequence_logprobs(x, tokens, mask, temperature=0.7, vocab_group=group)
    return [lp, ent, seq]


def _grads(outs, x):
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, x, ups)[0]


def _worker(rank, world, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    code = 0
    try:
        _ops.CPU_BACKEND = backend
        res = {}
        w = V // world
        sl = slice(rank * w, (rank + 1) * w)
        for dtype in DTYPES:
            for conc in (False, True):
                logits, tokens, mask = _data(dtype, conc)
                x = logits[..., sl].clone().requires_grad_(True)
                outs = _outputs(x, tokens, mask, dist.group.WORLD)
                res[(str(dtype), conc)] = ([o.detach() for o in outs], _grads(outs, x))
        # determinism: the same call twice, bitwise
        logits, tokens, mask = _data(torch.float32)
        a = _outputs(logits[..., sl], tokens, mask, dist.group.WORLD)
        b = _outputs(logits[..., sl], tokens, mask, dist.group.WORLD)
        res["deterministic"] = all(torch.equal(p, q) for p, q in zip(a, b))
        # hidden-state path: weight/bias rows of this shard; hidden's gradient is all-reduced inside
        g = torch.Generator().manual_seed(3)
        hid = torch.randn(N, T, H, generator=g, dtype=torch.float64)
        wt = torch.randn(V, H, generator=g, dtype=torch.float64)
        bias = torch.randn(V, generator=g, dtype=torch.float64)
        hx, wx, bx = (
            hid.clone().requires_grad_(True),
            wt[sl].clone().requires_grad_(True),
            bias[sl].clone().requires_grad_(True),
        )
        lp, ent = linear_token_logprobs(
            hx,
            wx,
            tokens,
            bias=bx,
            temperature=0.7,
            valid=mask,
            chunk_size=4,
            return_entropy=True,
            vocab_group=dist.group.WORLD,
        )
        grads = torch.autograd.grad([lp, ent], [hx, wx, bx], [torch.ones_like(lp), 0.5 * torch.ones_like(ent)])
        res["linear"] = (lp.detach(), ent.detach(), grads)
        # a large common offset: the shards' maxima must combine by MAX (any shift works at scale 2)
        big = _data(torch.float32)[0] + 100.0
        res["offset"] = [o.detach() for o in _outputs(big[..., sl], tokens, mask, dist.group.WORLD)]
        # packed sequences through a loss, vocab-sharded
        res["packed"] = _packed_loss(
            _data(torch.float64, seed=8)[0].reshape(N * T, V)[..., sl].clone().requires_grad_(True), dist.group.WORLD
        )
        # bad layouts, refused on every rank
        errs = []
        try:
            token_logprobs(logits[..., sl], tokens, vocab_group=dist.group.WORLD, vocab_size=V + 2)
        except ValueError as e:
            errs.append(str(e))
        wrong = logits[..., : w + (1 if rank == 1 else 0)]
        try:
            token_logprobs(wrong, tokens.clamp(max=w - 1), vocab_group=dist.group.WORLD)
        except ValueError as e:
            errs.append(str(e))
        res["errors"] = errs
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report, then exit non-zero so mp.spawn fails the test
        traceback.print_exc()
        code = 1
    os._exit(code)  # gloo teardown can abort a rank after all work is done


PACKED_CU = torch.tensor([0, 4, 4, 9, 11, 15], dtype=torch.int32)  # N*T = 15 tokens, 5 sequences, one empty


def _packed_loss(x, group=None):
    """gspo_loss on packed rows (cu_seqlens): the loss and its logits gradient."""
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, V, (N * T,), generator=g)
    mask = torch.rand(N * T, generator=g) > 0.2
    old = -torch.rand(N * T, generator=g, dtype=torch.float64) * 3
    rewards = torch.randn(5, generator=g)
    loss, _ = gspo_loss(
        x,
        tokens,
        rewards,
        mask,
        cu_seqlens=PACKED_CU,
        old_logprobs=old,
        group_size=5,
        entropy_coef=0.01,
        vocab_group=group,
    )
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def _close(a, e, dtype, kind, what):
    atol, rtol = TOLERANCE[dtype][kind]
    torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sharded_equals_unsharded(world, backend, monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", backend)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, backend, d), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    for dtype in DTYPES:
        for conc in (False, True):
            logits, tokens, mask = _data(dtype, conc)
            x = logits.clone().requires_grad_(True)
            outs = _outputs(x, tokens, mask)
            grad = _grads(outs, x)
            for r, res in enumerate(ranks):
                got, gshard = res[(str(dtype), conc)]
                for name, a, e in zip(("logp", "entropy", "sequence"), got, outs):
                    _close(a, e.detach(), dtype, "value", f"{name} rank {r} {dtype} concentrated={conc}")
                w = V // world
                _close(gshard, grad[..., r * w : (r + 1) * w], dtype, "grad_entropy", f"grad rank {r} {dtype}")
    assert all(res["deterministic"] for res in ranks)
    # hidden-state path against the unsharded one
    g = torch.Generator().manual_seed(3)
    hid = torch.randn(N, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens, mask = _data(torch.float32)[1:]
    lp, ent = linear_token_logprobs(
        hid, wt, tokens, bias=bias, temperature=0.7, valid=mask, chunk_size=4, return_entropy=True
    )
    gh, gw, gb = torch.autograd.grad([lp, ent], [hid, wt, bias], [torch.ones_like(lp), 0.5 * torch.ones_like(ent)])
    w = V // world
    for r, res in enumerate(ranks):
        lp_r, ent_r, (gh_r, gw_r, gb_r) = res["linear"]
        _close(lp_r, lp.detach(), torch.float64, "value", "linear logp")
        _close(ent_r, ent.detach(), torch.float64, "value", "linear entropy")
        _close(gh_r, gh, torch.float64, "grad_entropy", "grad hidden (all-reduced)")
        _close(gw_r, gw[r * w : (r + 1) * w], torch.float64, "grad_entropy", "grad weight shard")
        _close(gb_r, gb[r * w : (r + 1) * w], torch.float64, "grad_entropy", "grad bias shard")
    big = _data(torch.float32)[0] + 100.0
    for r, res in enumerate(ranks):
        for name, a, e in zip(("logp", "entropy", "sequence"), res["offset"], _outputs(big, tokens, mask)):
            # entropy = lse - sum p z cancels two terms of magnitude ~100: fp32 rounding of 100
            # (7.6e-6) times a few roundings; a wrong combine gives inf or NaN
            atol = 1e-4 if name == "entropy" else TOLERANCE[torch.float32]["value"][0]
            torch.testing.assert_close(
                a.double(),
                e.detach().double(),
                atol=atol,
                rtol=1e-6,
                msg=lambda m: f"{name} with a +100 offset, rank {r}: {m}",
            )
    x = _data(torch.float64, seed=8)[0].reshape(N * T, V).clone().requires_grad_(True)
    loss, gx = _packed_loss(x)
    for r, res in enumerate(ranks):
        _close(res["packed"][0], loss, torch.float64, "value", f"packed loss rank {r}")
        _close(res["packed"][1], gx[..., r * w : (r + 1) * w], torch.float64, "grad_entropy", f"packed grad rank {r}")
    for res in ranks:
        assert len(res["errors"]) == 2
        assert "vocab_size = 50" in res["errors"][0]
        assert "every rank must hold an equal shard" in res["errors"][1]


# ---------------------------------------------------------------- losses on a 2 x 2 grid
B, G = 2, 3


def _loss_data():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, G, T, H, generator=g)
    tokens = torch.randint(0, V, (B, G, T), generator=g)
    mask = torch.arange(T) < torch.randint(0, T + 1, (B, G, 1), generator=g)
    rewards = torch.randint(0, 3, (B, G), generator=g).float()
    old = -torch.rand(B, G, T, generator=g) * 3
    ref = old - 0.1 * torch.rand(B, G, T, generator=g)
    return hidden, tokens, mask, rewards, old, ref


def _head():
    torch.manual_seed(2)
    return torch.nn.Linear(H, V)


def _losses(logits, tokens, mask, rewards, old, ref, group=None, hidden=None, weight=None, bias=None):
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, vocab_group=group, entropy_coef=0.01)
    if hidden is not None:
        kw.update(hidden=hidden, weight=weight, bias=bias, chunk_size=5)
    l1, _ = gspo_loss(logits, tokens, rewards, mask, advantage="group_norm", **kw)
    # seq-mean-token-mean: a mean over sequences, so averaging equal-sized replicas is exact
    l2, _ = grpo_loss(logits, tokens, rewards, mask, loss_agg="seq-mean-token-mean", **kw)
    return l1 + l2


def _grid_worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=4)
    code = 0
    try:
        dp, tp = rank // 2, rank % 2  # replicas {0, 1} and {2, 3}; vocab halves by tp
        tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        head = _head()
        w = V // 2
        weight = head.weight[tp * w : (tp + 1) * w].detach().clone().requires_grad_(True)
        bias = head.bias[tp * w : (tp + 1) * w].detach().clone().requires_grad_(True)
        data = [t[dp : dp + 1] for t in _loss_data()]  # replica dp holds prompt dp (whole groups)
        out = {}
        for src in ("logits", "hidden"):
            if src == "logits":
                loss = _losses(torch.nn.functional.linear(data[0], weight, bias), *data[1:], group=tp_groups[dp])
            else:
                loss = _losses(None, *data[1:], group=tp_groups[dp], hidden=data[0], weight=weight, bias=bias)
            gw, gb = torch.autograd.grad(loss, [weight, bias])
            for t in (gw, gb):  # data parallel: average the shard gradients over the replicas
                dist.all_reduce(t, group=dp_groups[tp])
                t /= 2
            out[src] = (gw, gb)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    os._exit(code)


def test_losses_on_a_2x2_grid_equal_one_process():
    head = _head()
    hidden, tokens, mask, rewards, old, ref = _loss_data()
    # Data parallel averages the replicas' losses; the entropy bonus is a token mean per call, so
    # one process sees the same objective as the mean of the per-prompt losses.
    loss = (
        sum(
            _losses(head(hidden[b : b + 1]), *(t[b : b + 1] for t in (tokens, mask, rewards, old, ref)))
            for b in range(B)
        )
        / B
    )
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_grid_worker, args=(d,), nprocs=4, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(4)]
    w = V // 2
    for rank, res in enumerate(ranks):
        tp = rank % 2
        for src in ("logits", "hidden"):
            got_w, got_b = res[src]
            torch.testing.assert_close(got_w, gw[tp * w : (tp + 1) * w], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got_b, gb[tp * w : (tp + 1) * w], atol=1e-6, rtol=1e-5)
