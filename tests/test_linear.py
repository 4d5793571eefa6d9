"""Log-probs from hidden states and the LM head against the reference that
materialises the logits: values and the three gradients, on the fused
kernels and on both chunked paths (``tests/test_linear_fused.py`` covers the
fused kernels' own edges)."""

from __future__ import annotations

import pytest
import torch

from gspo_kernels import _ops, grpo_loss, gspo_loss, linear, linear_sequence_logprobs, linear_token_logprobs
from gspo_kernels.linear import default_chunk_size
from reference import (
    gspo_loss_reference,
    naive_linear_sequence_logprobs,
    naive_linear_token_entropy,
    naive_linear_token_logprobs,
)

# Errors relative to the largest reference magnitude, against float64 on the same inputs.
# fp32: GEMM + fp32 log-softmax, ~1e-6. bf16/fp16: the logits themselves are
# rounded to the input dtype by the GEMM (as they are when materialised), so
# values carry ~|logit| * 2**-8 (bf16) / 2**-11 (fp16) and gradients one or two
# ulps of their dtype (the fused kernels keep the logits in fp32: well inside);
# a wrong temperature, sign or missing row is off by O(1).
TOLERANCE = {
    torch.float64: dict(value=1e-12, grad=1e-12),
    torch.float32: dict(value=2e-6, grad=2e-5),
    torch.bfloat16: dict(value=5e-3, grad=1.5e-2),  # seen here: 1.1e-3 / 6.1e-3
    torch.float16: dict(value=1e-3, grad=2e-3),  # seen here: 1.6e-4 / 7.4e-4
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["fused", "chunked_triton", "chunked_torch"])
def backend(request, monkeypatch):
    """The fused hidden-state kernels; the chunked path over the Triton logits kernels; the
    chunked path over the chunked PyTorch path (on a CUDA machine the first two run on the GPU)."""
    monkeypatch.setattr(_ops, "CPU_BACKEND", "torch" if request.param == "chunked_torch" else "triton")
    monkeypatch.setattr(linear, "FUSED", request.param == "fused")
    return request.param


def _close(actual, expected, rel, what):
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=rel * scale, rtol=0, msg=lambda m: f"{what}: {m}"
    )


def _inputs(shape, H, V, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    tokens = torch.randint(0, V, shape, generator=g).to(DEVICE)
    return hidden, weight, b, tokens


def _grads(out, params, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    return torch.autograd.grad(out, params, g.to(out.dtype))


def _leaves(*ts):
    return [None if t is None else t.detach().requires_grad_(True) for t in ts]


def _leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


# (rows, H, V, chunk): odd H and V; a chunk that does not divide N*T (3 into 2*2*5 = 20 rows);
# V = 4099 crosses one kernel block; chunk=None exercises the default chunk size.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,V,chunk", [(37, 101, 3), (16, 4099, 7), (8, 33, None)])
def test_token_logprobs_values_and_three_grads(backend, dtype, H, V, chunk):
    hidden, weight, bias, tokens = _inputs((2, 2, 5), H, V, dtype)
    h, w, b = _leaves(hidden, weight, bias)
    out = linear_token_logprobs(h, w, tokens, bias=b, temperature=0.8, chunk_size=chunk)
    # reference: the logits materialised in the input dtype (as a trainer would), then float64
    h64, w64, b64 = _leaves64(hidden, weight, bias)
    ref = naive_linear_token_logprobs(h64, w64, tokens, b64, 0.8, dtype=torch.float64)
    _close(out, ref, TOLERANCE[dtype]["value"], "values")
    for name, got, exp in zip(("hidden", "weight", "bias"), _grads(out, (h, w, b)), _grads(ref, (h64, w64, b64))):
        assert got.dtype == dtype
        _close(got, exp, TOLERANCE[dtype]["grad"], f"grad {name}")


def test_sequence_logprobs_masks_and_fully_masked_chunks(backend):
    hidden, weight, bias, tokens = _inputs((3, 4, 6), 12, 29, torch.float64, seed=2)
    mask = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[1] = False  # 24 masked rows: with chunk_size=4, six chunks that skip their products
    mask = mask.to(DEVICE)
    bad_tokens = tokens.clone()
    bad_tokens[~mask] = -1  # never read where masked
    h, w, b = _leaves(hidden, weight, bias)
    out = linear_sequence_logprobs(h, w, bad_tokens, mask, bias=b, chunk_size=4)
    h64, w64, b64 = _leaves64(hidden, weight, bias)
    ref = naive_linear_sequence_logprobs(h64, w64, tokens, mask, bias=b64, dtype=torch.float64)
    _close(out, ref, TOLERANCE[torch.float64]["value"], "values")
    grads = _grads(out, (h, w, b))
    for got, exp in zip(grads, _grads(ref, (h64, w64, b64))):
        _close(got, exp, TOLERANCE[torch.float64]["grad"], "grad")
    assert torch.count_nonzero(grads[0][1]) == 0  # masked rows: exact zero gradient


def test_lengths_normalize_and_strided_hidden(backend):
    big, weight, _, _ = _inputs((2, 3, 9), 10, 23, torch.float32, seed=4, bias=False)
    hidden = big[:, :, 1:-1]  # (2, 3, 7, 10) slice of a longer sequence
    tokens = torch.randint(0, 23, (2, 3, 7), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    lengths = torch.tensor([[0, 7, 3], [2, 5, 1]], device=DEVICE)
    h, w = _leaves(hidden, weight)
    out = linear_sequence_logprobs(h, w, tokens, lengths=lengths, normalize=False, temperature=1.7, chunk_size=5)
    h64, w64 = _leaves64(hidden, weight)
    ref = naive_linear_sequence_logprobs(
        h64, w64, tokens, lengths=lengths, temperature=1.7, normalize=False, dtype=torch.float64
    )
    _close(out, ref, TOLERANCE[torch.float32]["value"], "values")
    for got, exp in zip(_grads(out, (h, w)), _grads(ref, (h64, w64))):
        _close(got, exp, TOLERANCE[torch.float32]["grad"], "grad")


def test_tied_weights_accumulate():
    """The LM head tied to the embedding: both uses contribute to one gradient."""
    V, H = 31, 8
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64).to(DEVICE)
    ids = torch.randint(0, V, (2, 5), generator=g).to(DEVICE)
    tokens = torch.randint(0, V, (2, 5), generator=g).to(DEVICE)
    grads = []
    for fn in (
        lambda h, w: linear_sequence_logprobs(h, w, tokens, chunk_size=3),
        lambda h, w: naive_linear_sequence_logprobs(h, w, tokens, dtype=torch.float64),
    ):
        w = emb.detach().requires_grad_(True)
        hidden = torch.tanh(w[ids])  # embedding lookup -> "model" -> hidden states
        (gw,) = torch.autograd.grad(fn(hidden, w).sum(), w)
        grads.append(gw)
    _close(grads[0], grads[1], 1e-12, "tied weight grad")


def test_losses_from_hidden_states():
    B, G, T, H, V = 2, 3, 4, 6, 17
    hidden, weight, _, tokens = _inputs((B, G, T), H, V, torch.float64, seed=7, bias=False)
    ref_hidden = hidden + 0.1 * torch.randn(
        hidden.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    ).to(DEVICE)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 3.0, 1.0]], device=DEVICE)
    mask = torch.ones(B, G, T, dtype=torch.bool, device=DEVICE)
    mask[0, 1, 2:] = False
    h, w = _leaves(hidden, weight)
    loss, m = gspo_loss(
        None, tokens, rewards, mask, hidden=h, weight=w, ref_hidden=ref_hidden, chunk_size=5, denominator="ref"
    )
    logits = torch.nn.functional.linear(hidden, weight)
    h64, w64 = _leaves64(hidden, weight)
    ref_lp = naive_linear_token_logprobs(ref_hidden, weight, tokens, dtype=torch.float64)
    ref_loss, _ = gspo_loss_reference(
        torch.nn.functional.linear(h64, w64), tokens, rewards, mask, ref_logprobs=ref_lp, denominator="ref"
    )
    _close(loss, ref_loss, 1e-12, "gspo loss")
    for got, exp in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref_loss, (h64, w64))):
        _close(got, exp, 1e-12, "gspo grad")
    # GRPO through hidden states equals GRPO through the materialised logits
    l_hidden, _ = grpo_loss(None, tokens, rewards, mask, hidden=hidden, weight=weight, beta=0.0, chunk_size=2)
    l_logits, _ = grpo_loss(logits, tokens, rewards, mask, beta=0.0)
    _close(l_hidden, l_logits, 1e-12, "grpo loss")


def test_default_chunk_size_is_a_power_of_two_within_budget():
    c = default_chunk_size(151_936, torch.bfloat16, torch.device("cpu"))
    assert c & (c - 1) == 0 and c * 151_936 * 2 <= 64 << 20 < 2 * c * 151_936 * 2
    assert default_chunk_size(10**9, torch.float32, torch.device("cpu")) == 1


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("h_mismatch", ValueError, r"weight must have shape \(V, H\) with H = hidden.shape\[-1\] = 8, got \(5, 7\)"),
        ("weight_1d", ValueError, r"weight must be the 2-D \(V, H\) LM head, got \(40,\)"),
        ("bias_shape", ValueError, r"bias must have shape \(5,\) \(V\), got \(4,\)"),
        ("dtype", TypeError, r"weight must have hidden's dtype torch.float32, got torch.float64"),
        ("tokens", ValueError, r"tokens must lie in \[0, V\) = \[0, 5\)"),
        ("chunk", ValueError, r"chunk_size must be a positive int"),
        ("int_hidden", TypeError, r"hidden must be a float tensor"),
    ],
)
def test_bad_input(case, exc, match):
    hidden, weight, tokens, kw = torch.zeros(2, 3, 8), torch.zeros(5, 8), torch.zeros(2, 3, dtype=torch.long), {}
    if case == "h_mismatch":
        weight = torch.zeros(5, 7)
    elif case == "weight_1d":
        weight = torch.zeros(40)
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(4)
    elif case == "dtype":
        weight = weight.double()
    elif case == "tokens":
        tokens[0, 0] = 5
    elif case == "chunk":
        kw["chunk_size"] = 0
    elif case == "int_hidden":
        hidden = hidden.long()
    with pytest.raises(exc, match=match):
        linear_token_logprobs(hidden, weight, tokens, **kw)


# ---------------------------------------------------------------- entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("which", ["both", "entropy_only"])
def test_linear_entropy_values_and_grads(backend, dtype, which):
    # V = 37 odd, chunk 3 not dividing the 2*5 = 10 rows; a fully masked chunk
    # (rows 3-5) returns 0 for both outputs and gets a zero gradient.
    hidden, weight, bias, tokens = _inputs((2, 5), 12, 37, dtype)
    valid = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    valid.view(-1)[3:6] = False
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(
        h, w, tokens, bias=b, temperature=0.8, chunk_size=3, valid=valid, return_entropy=True
    )
    h64, w64, b64 = _leaves64(hidden, weight, bias)
    lp_r = naive_linear_token_logprobs(h64, w64, tokens, b64, 0.8, dtype=torch.float64)
    ent_r = naive_linear_token_entropy(h64, w64, b64, 0.8, dtype=torch.float64)
    keep = valid.view(-1)
    lp_r, ent_r = lp_r * valid, ent_r * valid  # the skipped chunk's outputs are 0, constant
    tol = TOLERANCE[dtype]
    _close(lp, lp_r, tol["value"], "logp")
    _close(ent, ent_r, tol["value"], "entropy")
    assert torch.count_nonzero(ent.view(-1)[~keep]) == 0
    outs = [ent] if which == "entropy_only" else [lp, ent]
    outs_r = [ent_r] if which == "entropy_only" else [lp_r, ent_r]
    gs = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(DEVICE)
        for i, o in enumerate(outs)
    ]
    got = torch.autograd.grad(outs, [h, w, b], [g.to(o.dtype) for g, o in zip(gs, outs)])
    ref = torch.autograd.grad(outs_r, [h64, w64, b64], gs)
    for name, a, e in zip(("hidden", "weight", "bias"), got, ref):
        _close(a, e, tol["grad"], f"grad {name}")
    assert torch.count_nonzero(got[0].view(-1, 12)[3:6]) == 0  # masked chunk: zero hidden gradient
