"""pytest-benchmark suite, small shapes, runs anywhere (CPU in CI): the fused op's
CPU path and Triton path (the interpreter on CPU, compiled on CUDA) against the
naive reference, modes fwd / bwd / full. Every benchmark also asserts that the
measured function agrees with the naive reference, so it checks as it times.

    python -m pytest benchmarks -q --benchmark-enable   # timings (the suite alone runs each once, untimed)
"""

from __future__ import annotations

import pytest
import torch

import gspo_kernels
from gspo_kernels import _ops
from reference import naive_sequence_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small enough for the interpreter (two token rows per sequence, V over one 4096 block).
B, G, T, V = 1, 2, 3, 5000


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, G, T, V, generator=g).to(DEVICE)
    tokens = torch.randint(0, V, (B, G, T), generator=g).to(DEVICE)
    mask = torch.tensor([[[1, 1, 0], [1, 1, 1]]], dtype=torch.bool).to(DEVICE)
    return logits, tokens, mask


PROVIDERS = {
    "triton": lambda x, y, m: gspo_kernels.sequence_logprobs(x, y, m),
    "torch_path": lambda x, y, m: gspo_kernels.sequence_logprobs(x, y, m),
    "naive": lambda x, y, m: naive_sequence_logprobs(x, y, m),
}


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_sequence_logprobs(benchmark, monkeypatch, inputs, provider, mode):
    if provider == "torch_path":
        monkeypatch.setattr(_ops, "CPU_BACKEND", "torch")
        logits, tokens, mask = (t.cpu() for t in inputs)
    else:
        logits, tokens, mask = inputs
    fn = PROVIDERS[provider]
    x = logits.detach().requires_grad_(True)
    if mode == "fwd":
        out = benchmark.pedantic(lambda: fn(x, tokens, mask), rounds=2, iterations=1)
        grad = None
    elif mode == "bwd":
        o = fn(x, tokens, mask)
        grad = benchmark.pedantic(lambda: torch.autograd.grad(o.sum(), x, retain_graph=True)[0], rounds=2, iterations=1)
        out = o
    else:

        def full():
            o = fn(x, tokens, mask)
            return o, torch.autograd.grad(o.sum(), x)[0]

        out, grad = benchmark.pedantic(full, rounds=2, iterations=1)
    xr = logits.detach().double().requires_grad_(True)
    ref = naive_sequence_logprobs(xr, tokens, mask, dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-6)
    if grad is not None:
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        torch.testing.assert_close(grad.double(), gr, atol=1e-7, rtol=2e-5)
