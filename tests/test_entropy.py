"""Per-token entropy from the same pass as the log-probs: values and gradients
against the float64 reference, every backend, dtypes, shapes, masks,
temperature, strides; gradcheck in fp64; unaligned vocabularies; long T."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import DEVICE, TOLERANCE, _close, _inputs

from gspo_kernels import _kernels, _ops, _torch_path, token_logprobs
from reference import naive_token_entropy, naive_token_logprobs

# Entropy values carry the same fp32 summation error as the log-probs
# (|H| <= log V ~ 12 at V = 151,936), so the value tolerance row applies.
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return "cpu" if request.param == "torch" else DEVICE


def _check(logits, tokens, temperature=1.0, g_seed=3, grads=("logp", "ent"), **kw):
    dtype = logits.dtype
    x = logits.detach().requires_grad_(True)
    lp, ent = token_logprobs(x, tokens, temperature=temperature, return_entropy=True, **kw)
    xr = logits.detach().cpu().double().requires_grad_(True)
    lp_r = naive_token_logprobs(xr, tokens.cpu(), temperature, dtype=torch.float64)
    ent_r = naive_token_entropy(xr, temperature, dtype=torch.float64)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == ent.dtype == out_dt and ent.shape == tokens.shape
    _close(lp.cpu(), lp_r, TOLERANCE[dtype]["value"], "logp")
    _close(ent.cpu(), ent_r, TOLERANCE[dtype]["value"], "entropy")
    gen = torch.Generator().manual_seed(g_seed)
    g = torch.randn(tokens.shape, generator=gen, dtype=torch.float64)
    h = torch.randn(tokens.shape, generator=gen, dtype=torch.float64)
    outs, ups, outs_r, ups_r = [], [], [], []
    if "logp" in grads:
        outs.append(lp), ups.append(g.to(out_dt).to(lp.device)), outs_r.append(lp_r), ups_r.append(g)
    if "ent" in grads:
        outs.append(ent), ups.append(h.to(out_dt).to(lp.device)), outs_r.append(ent_r), ups_r.append(h)
    (gx,) = torch.autograd.grad(outs, x, ups)
    (gr,) = torch.autograd.grad(outs_r, xr, ups_r)
    assert gx.dtype == dtype
    _close(gx.cpu(), gr, TOLERANCE[dtype]["grad_entropy" if "ent" in grads else "grad"], "grad")
    return lp, ent, gx


# V: 7 (odd, below one block, several rows per program), 4099 (one full
# block plus a 3-wide tail), 50,257 (GPT-2: rows not 16-byte aligned, the
# kernels use narrower loads), 151,936 (a real LLM vocabulary, 38 blocks).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,shape", [(7, (2, 3, 5)), (4099, (2, 3)), (50_257, (1, 2)), (151_936, (1, 2))])
def test_entropy_values_and_grads(backend, dtype, V, shape):
    logits, tokens = _inputs(shape, V, dtype, backend, scale=3.0)
    _check(logits, tokens, temperature=0.8)


@pytest.mark.parametrize("which", [("logp",), ("ent",)])
def test_one_upstream_gradient(backend, which):
    # Only the entropy used (logp's gradient is None), or only the log-prob.
    logits, tokens = _inputs((2, 4), 37, torch.float32, backend)
    _check(logits, tokens, temperature=1.7, grads=which)


def test_entropy_many_blocks_and_strides(backend):
    # Block lowered to 64: a 300-wide row takes five blocks (the online
    # per-lane update across blocks); a [:, 1:-1] slice with odd leading strides.
    big, _ = _inputs((2, 7), 300, torch.bfloat16, backend)
    logits = big[:, 1:-1]
    tokens = torch.randint(0, 300, logits.shape[:-1], generator=torch.Generator().manual_seed(4)).to(backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_kernels, "MAX_BLOCK_V", 64)
        mp.setattr(_torch_path, "CHUNK_ELEMENTS", 600)
        _check(logits, tokens, temperature=0.6)


def test_entropy_extremes(backend):
    # One-hot-like row (entropy ~0), uniform row (entropy log V), a row with
    # -inf entries (a masked vocabulary: p = 0, no NaN), a common offset of 20.
    V = 40
    x = torch.zeros(4, V, dtype=torch.float32)
    x[0, 3] = 60.0
    x[2, ::2] = float("-inf")
    x[3] = torch.linspace(-5, 5, V) + 20.0
    x = x.to(backend)
    y = torch.tensor([3, 0, 1, 7], device=backend)
    lp, ent, gx = _check(x, y)
    assert abs(ent[1].item() - torch.log(torch.tensor(float(V))).item()) < 1e-5
    assert ent[0].item() < 1e-20 and torch.isfinite(gx).all()


def test_large_common_offset_forward(backend):
    # Logits around 1e4: differences are taken before scaling, so log-probs and
    # entropy keep fp32 relative precision (a scale-then-subtract kernel loses
    # ~1e-3 here). The gradient goes through the saved fp32 logsumexp (~1e4,
    # ulp 1e-3), so only the forward is held to the fp32 table at this offset.
    logits, tokens = _inputs((3, 4), 1000, torch.float32, backend)
    logits += 1e4
    lp, ent = token_logprobs(logits, tokens, temperature=0.9, return_entropy=True)
    xr = logits.double()
    _close(lp, naive_token_logprobs(xr, tokens, 0.9, dtype=torch.float64), TOLERANCE[torch.float32]["value"], "lp")
    _close(ent, naive_token_entropy(xr, 0.9, dtype=torch.float64), TOLERANCE[torch.float32]["value"], "ent")


def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).to(backend).requires_grad_(True)
    y = torch.randint(0, 6, (2, 3), generator=g).to(backend)

    def f(x):
        lp, ent = token_logprobs(x, y, temperature=0.7, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (x,))


def test_no_entropy_backward_matches_logp_only(backend):
    # Entropy computed but not differentiated: the gradient is the log-prob one, bitwise.
    logits, tokens = _inputs((3, 5), 129, torch.float32, backend)
    x1 = logits.detach().requires_grad_(True)
    x2 = logits.detach().requires_grad_(True)
    lp1 = token_logprobs(x1, tokens)
    lp2, _ = token_logprobs(x2, tokens, return_entropy=True)
    g = torch.randn(lp1.shape, generator=torch.Generator().manual_seed(2)).to(backend)
    assert torch.equal(torch.autograd.grad(lp1, x1, g)[0], torch.autograd.grad(lp2, x2, g)[0])
    assert torch.equal(lp1, lp2)


def test_masked_rows_are_inert(backend):
    # NaN/inf logits in rows the caller masks (zero upstream gradient for
    # both outputs) give exact zero gradient there, and leave other rows alone.
    logits, tokens = _inputs((2, 4), 33, torch.float32, backend)
    logits[0, 1] = float("nan")
    logits[1, 2, 5] = float("inf")
    x = logits.detach().requires_grad_(True)
    lp, ent = token_logprobs(x, tokens, return_entropy=True)
    keep = torch.ones(2, 4, dtype=torch.bool, device=backend)
    keep[0, 1] = keep[1, 2] = False
    loss = torch.where(keep, lp + ent, 0).sum()
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(gx[0, 1]) == 0 and torch.count_nonzero(gx[1, 2]) == 0
    assert torch.isfinite(gx).all() and torch.count_nonzero(gx[0, 0]) > 0


def test_long_sequence(backend):
    # T = 70,000 rows in one (1, T, V) call: the grid is 1-D over row blocks,
    # far from CUDA's 2^31 - 1 limit (a per-T grid dimension would stop at 65,535).
    T, V = 70_000, 6
    logits, tokens = _inputs((1, T), V, torch.float32, backend)
    lp, ent = token_logprobs(logits, tokens, return_entropy=True)
    ref = naive_token_logprobs(logits.double(), tokens, dtype=torch.float64)
    _close(lp, ref, TOLERANCE[torch.float32]["value"], "logp")
    _close(ent, naive_token_entropy(logits.double(), dtype=torch.float64), TOLERANCE[torch.float32]["value"], "ent")
