"""CUDA graphs: with ``check_inputs=False`` nothing in a loss call reads a device value
on the host, so a whole ``gspo_loss`` forward + backward can be captured with
``torch.cuda.graph`` and replayed with the same result, and a training loop calling
it runs under ``torch.compile(mode="reduce-overhead")`` (which captures CUDA graphs).

These need a CUDA device (capture is a CUDA feature); on a machine without one they
are skipped. The host-sync count that makes capture possible is tested on every
machine in tests/test_syncs.py.
"""
from __future__ import annotations

import pytest
import torch

import gspo_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")

B, G, T, V = 2, 4, 64, 4096


def _batch(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, G, T, V, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, V, (B, G, T), device="cuda", generator=g)
    lengths = torch.randint(0, T + 1, (B, G), device="cuda", generator=g)
    mask = torch.arange(T, device="cuda") < lengths.unsqueeze(-1)
    r = torch.randn(B, G, device="cuda", generator=g)
    old = -torch.rand(B, G, T, device="cuda", generator=g) * 4
    return x, y, mask, r, old


def _step(x, y, mask, r, old):
    loss, metrics = gspo_kernels.gspo_loss(x, y, r, mask, old_logprobs=old, entropy_coef=0.01, check_inputs=False)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, metrics["clip_fraction"]


def test_gspo_loss_captured_in_a_cuda_graph_replays_the_same_result():
    x, y, mask, r, old = _batch()
    x = x.requires_grad_(True)
    want = _step(x, y, mask, r, old)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            _step(x, y, mask, r, old)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(x, y, mask, r, old)
    graph.replay()
    torch.cuda.synchronize()
    for got, exp in zip(out, want):
        assert torch.equal(got, exp)
    # new inputs copied into the captured buffers give the new result
    x2 = _batch()[0]
    with torch.no_grad():
        x.copy_(x2)
    graph.replay()
    fresh = _step(x2.clone().requires_grad_(True), y, mask, r, old)
    for got, exp in zip(out, fresh):
        assert torch.equal(got, exp)


def test_reduce_overhead_compile_loop_equals_eager():
    x, y, mask, r, old = _batch(torch.float32)
    h = torch.randn(B, G, T, V // 8, device="cuda")
    w0 = torch.randn(V, V // 8, device="cuda") * 0.02

    def run(compiled: bool):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.SGD([w], lr=1e-1)

        def step(h):
            loss, _ = gspo_kernels.gspo_loss(h @ w.T, y, r, mask, old_logprobs=old, check_inputs=False)
            loss.backward()
            return loss.detach()

        fn = torch.compile(step, mode="reduce-overhead") if compiled else step
        losses = []
        for _ in range(4):
            opt.zero_grad(set_to_none=False)
            losses.append(fn(h).clone())
            opt.step()
        return torch.stack(losses), w.detach()

    eager_losses, eager_w = run(False)
    losses, w = run(True)
    torch.testing.assert_close(losses, eager_losses, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, eager_w, atol=1e-6, rtol=1e-4)
    assert not torch.equal(eager_w, w0)  # the loop moved the weights
