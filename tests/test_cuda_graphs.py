"""CUDA graphs: with ``check_inputs=False`` nothing in a loss call reads a device value
on the host, so a whole ``gspo_loss`` forward + backward can be captured with
``torch.cuda.graph`` and replayed with the same result, and a training loop calling
it runs under ``torch.compile(mode="reduce-overhead")`` (which captures CUDA graphs).

Replays stay right after any number of other option sets between capture and replay,
and through the hidden-state path. These need a CUDA device (capture is a CUDA feature);
on a machine without one they are skipped (tests/test_graph_safety.py checks on any
machine what they rely on). The host-sync count that makes capture possible is tested on every
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


def _capture(fn):
    """``fn()`` warmed up on a side stream, then captured; returns (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_replay_after_100_other_option_sets_gives_the_captured_options_result():
    """The option parameters a captured call read stay alive (and unchanged) however many other
    option sets run eagerly between capture and replay: a beta / epsilon schedule, a sweep."""
    x, y, mask, r, old = _batch()
    x = x.requires_grad_(True)
    opts = dict(epsilon=0.13, epsilon_high=0.29, entropy_coef=0.01)

    def step(**o):
        loss, metrics = gspo_kernels.gspo_loss(x, y, r, mask, old_logprobs=old, check_inputs=False, **o)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad, metrics["clip_fraction"]

    want = step(**opts)
    graph, out = _capture(lambda: step(**opts))
    for i in range(100):  # each a new option set, and enough new allocations to reuse a freed block
        step(epsilon=0.05 + 0.002 * i, epsilon_high=0.1 + 0.003 * i, entropy_coef=1e-4 * i)
        torch.empty(4096, device="cuda").fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for got, exp in zip(out, want):
        assert torch.equal(got, exp)


def test_hidden_state_loss_captured_in_a_cuda_graph_replays_the_same_result():
    """``gspo_loss(hidden=, weight=)`` (the fused hidden-state kernels) forward + backward, weight
    gradient on, under capture: no host read, no free-memory query, the same result replayed."""
    g = torch.Generator(device="cuda").manual_seed(1)
    H = 256
    x, y, mask, r, old = _batch()
    hidden = torch.randn(B, G, T, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16).requires_grad_(True)

    def step():
        loss, _ = gspo_kernels.gspo_loss(
            hidden=hidden,
            weight=weight,
            tokens=y,
            rewards=r,
            mask=mask,
            old_logprobs=old,
            check_inputs=False,
            memory_budget=1 << 20,
        )
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    want = step()
    graph, out = _capture(step)
    graph.replay()
    torch.cuda.synchronize()
    for got, exp in zip(out, want):
        assert torch.equal(got, exp)
    with torch.no_grad():  # new hidden states copied into the captured input give the new result
        hidden.copy_(torch.randn(B, G, T, H, device="cuda", generator=g).to(torch.bfloat16))
    graph.replay()
    fresh = step()
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
