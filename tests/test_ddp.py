"""Data parallel: gspo_loss / grpo_loss under DistributedDataParallel (gloo, two CPU
processes) give the same averaged gradients as one process over the whole batch,
with whole groups per rank, and with groups split across ranks (process_group)."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gspo_kernels import grpo_loss, gspo_loss

B, G, T, H, V = 2, 4, 5, 6, 11
WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, G, T, H, generator=g)
    tokens = torch.randint(0, V, (B, G, T), generator=g)
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, G, 1), generator=g)
    rewards = torch.tensor([[3.0, 1.0, 1.0, 0.0], [2.0, 2.0, 5.0, 1.0]])
    ref = torch.randn(B, G, T, generator=g) * 0.1 - 2.4
    return hidden, tokens, mask, rewards, ref


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(H, V)


def _loss(kind, model, hidden, tokens, mask, rewards, ref, pg=None):
    logits = model(hidden)
    if kind == "gspo_contrast":
        return gspo_loss(
            logits, tokens, rewards, mask, ref_logprobs=ref, denominator="ref", advantage="contrast", process_group=pg
        )[0]
    if kind == "gspo_group_norm":
        return gspo_loss(
            logits,
            tokens,
            rewards,
            mask,
            ref_logprobs=ref,
            denominator="ref",
            advantage="group_norm",
            kl="k3",
            process_group=pg,
        )[0]
    return grpo_loss(logits, tokens, rewards, mask, ref_logprobs=ref, denominator="ref", process_group=pg)[0]


def _worker(rank, kind, layout, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        data = _data()
        if layout == "whole_groups":  # rank r holds prompt r: every group's completions on one rank
            local = [t[rank : rank + 1] for t in data]
            pg = None
        else:  # each prompt's G completions are split: rank r holds columns [2r, 2r + 2)
            local = [t[:, 2 * rank : 2 * rank + 2] for t in data]
            pg = dist.group.WORLD
        loss = _loss(kind, model, *local, pg=pg)
        loss.backward()  # DDP all-reduces (averages) the gradients
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "grads.pt"))
        dist.barrier()
        code = 0
    except BaseException:  # noqa: BLE001 - report, then exit non-zero so mp.spawn fails the test
        traceback.print_exc()
        code = 1
    # Leave without tearing gloo down: its teardown sometimes aborts one rank
    # ("terminate called without an active exception") after all work is done.
    os._exit(code)


@pytest.mark.parametrize("kind", ["gspo_contrast", "gspo_group_norm", "grpo"])
@pytest.mark.parametrize("layout", ["whole_groups", "split_groups"])
def test_ddp_matches_single_process(kind, layout):
    model = _model()
    _loss(kind, model, *_data()).backward()
    expected = [p.grad for p in model.parameters()]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(kind, layout, d), nprocs=WORLD, join=True)
        got = torch.load(os.path.join(d, "grads.pt"))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_split_groups_without_process_group_differ():
    """Why process_group exists: a split group's advantage computed locally is wrong."""
    data = _data()
    half = [t[:, :2] for t in data]
    model = _model()
    with torch.no_grad():
        logits = model(half[0])
        _, local = gspo_loss(
            logits, half[1], half[3], half[2], ref_logprobs=half[4], denominator="ref", advantage="group_norm"
        )
        _, full = gspo_loss(
            model(data[0]), data[1], data[3], data[2], ref_logprobs=data[4], denominator="ref", advantage="group_norm"
        )
    assert not torch.allclose(local["advantage"], full["advantage"][:, :2])
