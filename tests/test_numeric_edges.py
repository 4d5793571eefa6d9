"""Numeric edges of the kernels, one behaviour on every backend (the Triton
kernels, here in the interpreter, and the chunked PyTorch path; the
hidden-state kernels and their chunked fallback), as docs/edges.md "Extreme values"
states it:

- finite logits anywhere in the fp32 range: per-token log-probs and entropy
  exact wherever the result is a finite fp32 number (-1.9e38 from logits of
  ~1e38 at tau = 0.5), -inf where it is beyond -3.4e38 (IEEE overflow);
- per-sequence sums and means never overflow in their partial sums: the mean
  of finite log-probs is finite, a sum beyond the fp32 range is -inf;
- a +inf logit at a valid position: that row's log-prob, entropy and gradient
  are NaN (all of it, never a mix of -inf and NaN); a -inf logit is a
  probability of 0 (a -inf log-prob if sampled, a finite gradient); a row
  with no finite logit is NaN; none of it leaks into other rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from gspo_kernels import _ops, linear, linear_token_logprobs, sequence_logprobs, token_logprobs
from reference import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return "cpu" if request.param == "torch" else DEVICE


def _close(actual, expected, rtol, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def test_logits_near_1e38_at_half_temperature(backend):
    # Row 0: the sampled logit 0.95e38 below the max: log-prob -1.9e38, finite in fp32.
    # Row 1: 2e38 below: -4e38 is beyond fp32, -inf (the true value's correct rounding).
    # Row 2: a common offset of 1e38 and ordinary spreads: an ordinary log-prob.
    x = torch.tensor(
        [[1.0e38, 0.05e38, 0.0, -0.1e38], [1.0e38, 1.0e38, -1.0e38, 0.0], [1.0e38, 1.0e38, 1.0e38, 1.0e38]],
        device=backend,
    )
    x[2] += torch.tensor([0.0, 1.0e31, -2.0e31, 3.0e31], device=backend)
    y = torch.tensor([1, 2, 3], device=backend)
    xr = x.detach().requires_grad_(True)
    lp, ent = token_logprobs(xr, y, temperature=0.5, return_entropy=True)
    ref = naive_token_logprobs(x.double(), y, 0.5, dtype=torch.float64)
    assert ref[1].item() < -3.4e38 and math.isfinite(ref[0].item())
    assert lp[1].item() == -INF
    _close(lp[[0, 2]], ref[[0, 2]], 1e-6, "finite log-probs")
    _close(ent, naive_token_entropy(x.double(), 0.5, dtype=torch.float64), 1e-6, "entropy")
    (g,) = torch.autograd.grad(lp[[0, 2]].sum(), xr)
    xd = x.double().requires_grad_(True)
    (gr,) = torch.autograd.grad(naive_token_logprobs(xd, y, 0.5, dtype=torch.float64)[[0, 2]].sum(), xd)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), gr, atol=1e-6, rtol=0)


def test_sequence_mean_of_huge_finite_logprobs_is_finite(backend):
    # Four tokens each near -1.9e38: their sum (-7.6e38) overflows fp32, their mean does not.
    x = torch.tensor([1.0e38, 0.05e38, 0.08e38, 0.02e38], device=backend).repeat(2, 4, 1)
    x[1, :, 1] = 0.9e38  # the second sequence: ordinary log-probs
    y = torch.ones(2, 4, dtype=torch.long, device=backend)
    ref = naive_sequence_logprobs(x.double(), y, temperature=0.5, dtype=torch.float64)
    seq = sequence_logprobs(x, y, temperature=0.5)
    assert torch.isfinite(seq).all()
    _close(seq, ref, 1e-6, "mean")
    total = sequence_logprobs(x, y, temperature=0.5, normalize=False)
    assert total[0].item() == -INF  # -7.6e38: beyond the fp32 range
    _close(
        total[1],
        naive_sequence_logprobs(x.double(), y, temperature=0.5, normalize=False, dtype=torch.float64)[1],
        1e-6,
        "sum",
    )


@pytest.mark.parametrize("where", ["sampled", "elsewhere"])
def test_plus_inf_logit_gives_a_nan_row(backend, where):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g).to(backend)
    y = torch.tensor([3, 1, 4, 0], device=backend)
    x[0, 3 if where == "sampled" else 7] = INF
    x[2, 5] = INF  # a masked row: inert
    x[3] = -INF  # no finite logit: NaN
    valid = torch.tensor([True, True, False, True], device=backend)
    xr = x.clone().requires_grad_(True)
    lp, ent = token_logprobs(xr, y, valid=valid, return_entropy=True)
    assert torch.isnan(lp[[0, 3]]).all() and torch.isnan(ent[[0, 3]]).all()
    (gx,) = torch.autograd.grad([lp, ent], xr, [valid.float(), valid.float()])
    assert torch.isnan(gx[[0, 3]]).all()  # the whole row, never a mix of -inf, finite and NaN
    assert torch.count_nonzero(gx[2]) == 0  # masked: exact zeros
    assert torch.isfinite(gx[1]).all()
    _close(lp[1], naive_token_logprobs(x[1:2].double(), y[1:2], dtype=torch.float64)[0], 1e-6, "clean row")
    seq = sequence_logprobs(x[:2].view(1, 2, 9), y[:2].view(1, 2))
    assert torch.isnan(seq).all()


def test_minus_inf_logit_is_probability_zero(backend):
    x = torch.tensor([[0.5, -INF, 1.0, 2.0], [-INF, 0.0, 0.0, -INF]], device=backend)
    y = torch.tensor([1, 2], device=backend)
    xr = x.clone().requires_grad_(True)
    lp, ent = token_logprobs(xr, y, return_entropy=True)
    assert lp[0].item() == -INF
    _close(lp[1], torch.tensor(math.log(0.5)), 1e-6, "two-way row")
    _close(ent, naive_token_entropy(x.double(), dtype=torch.float64), 1e-6, "entropy")
    (gx,) = torch.autograd.grad(lp[1] + ent.sum(), xr)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_hidden_state_path_inf_gives_a_nan_row(fused, monkeypatch):
    """+inf in a row's hidden state: +inf logits, a NaN row (log-prob, entropy, its hidden
    gradient; through grad_weight every weight row); the other rows' values stay exact."""
    monkeypatch.setattr(_ops, "CPU_BACKEND", "triton")
    monkeypatch.setattr(linear, "FUSED", fused)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=g).to(DEVICE)
    weight = torch.randn(40, 8, generator=g).to(DEVICE)
    tokens = torch.randint(0, 40, (5,), generator=g).to(DEVICE)
    hidden[2, 0] = INF
    h = hidden.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(h, weight, tokens, return_entropy=True, chunk_size=2)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    clean = [0, 1, 3, 4]
    ref = naive_token_logprobs(
        torch.nn.functional.linear(hidden[clean].double(), weight.double()), tokens[clean], dtype=torch.float64
    )
    _close(lp[clean], ref, 1e-5, "other rows")
    (gh,) = torch.autograd.grad(lp.sum(), h)
    assert torch.isnan(gh[2]).all() and torch.isfinite(gh[clean]).all()
