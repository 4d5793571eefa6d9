"""The fused log-prob ops against the float64 reference: values, gradients,
masks, strides, temperature, determinism, in-place backward, torch.compile,
both CPU implementations (Triton interpreter and chunked PyTorch)."""

from __future__ import annotations

import pytest
import torch

import gspo_kernels
from gspo_kernels import _kernels, _ops, _torch_path, sequence_logprobs, token_logprobs
from reference import naive_sequence_logprobs, naive_token_logprobs

# Errors against a float64 reference computed from the *same* (rounded) logits.
# value: the op accumulates in fp32 whatever the input dtype, so values carry
#   only fp32 summation error (lse of up to ~10 at V = 151,936: ~1e-5 absolute).
# grad: written in the logits' dtype, so one unit in the last place of that
#   dtype (Triton's interpreter truncates when it narrows; GPUs round to
#   nearest, half an ulp) plus fp32 arithmetic error.
# grad_entropy: the entropy's gradient -p (log p + H) / tau is a difference of
#   two O(log V) terms times p, so its absolute error is ~ p * log V * eps:
#   an absolute floor of 1e-6 (fp32) where the terms cancel, same rtol.
TOLERANCE = {
    #                 value (atol, rtol)  grad (atol, rtol)       grad_entropy (atol, rtol)
    torch.float32: dict(value=(2e-5, 1e-6), grad=(1e-7, 2e-5), grad_entropy=(1e-6, 2e-5)),
    torch.bfloat16: dict(value=(2e-5, 1e-6), grad=(1e-7, 2.0**-7), grad_entropy=(1e-6, 2.0**-7)),
    torch.float16: dict(value=(2e-5, 1e-6), grad=(1e-7, 2.0**-10), grad_entropy=(1e-6, 2.0**-10)),
    torch.float64: dict(value=(1e-12, 1e-12), grad=(1e-14, 1e-12), grad_entropy=(1e-13, 1e-12)),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Both CPU implementations; on a CUDA machine "triton" runs on the GPU."""
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return "cpu" if request.param == "torch" else DEVICE


def _close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _inputs(shape, V, dtype, device, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype).to(device)
    tokens = torch.randint(0, V, shape, generator=g).to(device)
    return logits, tokens


def _check_sequence(logits, tokens, mask=None, lengths=None, temperature=1.0, normalize=True, **kw):
    dtype = logits.dtype
    x = logits.detach().requires_grad_(True)
    out = sequence_logprobs(x, tokens, mask, lengths=lengths, temperature=temperature, normalize=normalize, **kw)
    xr = logits.detach().double().requires_grad_(True)
    ref = naive_sequence_logprobs(xr, tokens, mask, lengths, temperature, normalize, dtype=torch.float64)
    assert out.shape == ref.shape and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(out, ref, TOLERANCE[dtype]["value"], "values")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (gx,) = torch.autograd.grad(out, x, g.to(out.dtype))
    (gr,) = torch.autograd.grad(ref, xr, g.double())
    assert gx.dtype == dtype and gx.shape == logits.shape
    _close(gx, gr, TOLERANCE[dtype]["grad"], "grad")
    return out, gx


# Vocabulary sizes: 1 (degenerate: log-prob 0, zero gradient), 7 (odd, below
# one block), 4099 (one full 4096 block plus a 3-wide tail), 151,936 (a real
# LLM vocabulary: 38 blocks) at a tiny row count to keep the interpreter fast.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,shape", [(1, (2, 3, 4)), (7, (2, 3, 5)), (4099, (2, 2, 3)), (151_936, (1, 2, 2))])
def test_sequence_values_and_grads(backend, dtype, V, shape):
    logits, tokens = _inputs(shape, V, dtype, backend)
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.3).to(backend)
    mask[0, 0] = False  # one empty sequence: value 0, zero gradient
    out, gx = _check_sequence(logits, tokens, mask, temperature=0.7)
    assert out[0, 0].item() == 0.0 and torch.count_nonzero(gx[0, 0]).item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_values_and_grads(backend, dtype):
    # V = 300 with the block lowered to 64: five blocks, a ragged last one.
    V = 300
    logits, tokens = _inputs((2, 3, 5), V, dtype, backend)
    x = logits.detach().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_kernels, "MAX_BLOCK_V", 64)
        mp.setattr(_torch_path, "CHUNK_ELEMENTS", 2 * V)  # several row chunks on the torch path
        out = token_logprobs(x, tokens, temperature=1.3)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(backend)
        (gx,) = torch.autograd.grad(out, x, g)
    xr = logits.detach().double().requires_grad_(True)
    ref = naive_token_logprobs(xr, tokens, 1.3, dtype=torch.float64)
    (gr,) = torch.autograd.grad(ref, xr, g.double())
    _close(out, ref, TOLERANCE[dtype]["value"], "values")
    _close(gx, gr, TOLERANCE[dtype]["grad"], "grad")


@pytest.mark.parametrize("normalize", [True, False])
def test_lengths_match_mask_and_sum(backend, normalize):
    # Ragged lengths including 0 (empty) and T (full).
    logits, tokens = _inputs((2, 3, 6), 33, torch.float32, backend)
    lengths = torch.tensor([[0, 6, 3], [1, 5, 2]], device=backend)
    out_len, _ = _check_sequence(logits, tokens, lengths=lengths, normalize=normalize)
    mask = torch.arange(6, device=backend) < lengths.unsqueeze(-1)
    out_mask = sequence_logprobs(logits, tokens, mask.to(torch.int32), normalize=normalize)
    assert torch.equal(out_len, out_mask)


def test_no_mask_means_all_tokens(backend):
    logits, tokens = _inputs((4, 5), 19, torch.float32, backend)  # 3-D: (N, T, V)
    _check_sequence(logits, tokens, temperature=2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_leading_dims(backend, dtype):
    # The usual trainer slice out[:, :, P-1:-1] of a bigger model output, plus a
    # slice over G, giving leading strides that do not collapse: no copy allowed.
    big, _ = _inputs((2, 5, 9), 37, dtype, backend)
    logits = big[:, 1:4, 2:-1]
    assert not logits.is_contiguous()
    tokens = torch.randint(0, 37, logits.shape[:-1], generator=torch.Generator().manual_seed(5)).to(backend)
    mask = (torch.rand(logits.shape[:-1], generator=torch.Generator().manual_seed(6)) > 0.2).to(backend)
    _check_sequence(logits, tokens, mask)
    # 5-D input whose leading dims merge into three
    x5 = big.view(2, 5, 3, 3, 37)[:, :, :, 1:]
    t5 = torch.randint(0, 37, x5.shape[:-1], generator=torch.Generator().manual_seed(7)).to(backend)
    _check_sequence(x5, t5)


def test_out_of_range_ids_at_masked_positions_are_ignored(backend):
    logits, tokens = _inputs((2, 4), 11, torch.float32, backend)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool, device=backend)
    bad = tokens.clone()
    bad[~mask] = -100  # a common ignore index: never read, never counted
    out = sequence_logprobs(logits, bad, mask)
    ref = naive_sequence_logprobs(logits.double(), tokens, mask, dtype=torch.float64)
    _close(out, ref, TOLERANCE[torch.float32]["value"], "values")
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\)"):
        token_logprobs(logits, bad, ignore_index=None)  # -100 is only masked when it is the ignore_index


@pytest.mark.slow
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(backend).requires_grad_(True)
    y = torch.randint(0, 5, (2, 3, 4), generator=g).to(backend)
    m = (torch.rand(2, 3, 4, generator=g) > 0.4).to(backend)
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, y, m, temperature=0.7), (x,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, y, temperature=1.9), (x,))


def test_deterministic(backend):
    logits, tokens = _inputs((2, 2, 3), 4099, torch.bfloat16, backend)
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=backend)
    runs = []
    for _ in range(2):
        x = logits.detach().requires_grad_(True)
        out = sequence_logprobs(x, tokens, mask)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        runs.append((out, gx))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_no_grad_saves_nothing(backend):
    logits, tokens = _inputs((2, 3), 13, torch.float32, backend)
    x = logits.requires_grad_(True)
    with torch.no_grad():
        out = sequence_logprobs(x, tokens)
    assert out.grad_fn is None and not out.requires_grad


# ---------------------------------------------------------------- in place
def _leaf_and_logits(backend, V=29):
    base, tokens = _inputs((2, 3, 4), V, torch.float32, backend)
    w = base.detach().clone().requires_grad_(True)
    return w, tokens


def test_inplace_backward_matches_and_reuses_storage(backend):
    w, tokens = _leaf_and_logits(backend)
    mask = (torch.rand(tokens.shape, generator=torch.Generator().manual_seed(9)) > 0.3).to(backend)
    expected = torch.autograd.grad(sequence_logprobs(w * 1.0, tokens, mask).sum(), w)[0]
    logits = w * 1.0  # a non-leaf, as a model output is
    out = sequence_logprobs(logits, tokens, mask, inplace_backward=True)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert g.data_ptr() == logits.data_ptr()  # the gradient lives in the logits' storage
    assert torch.equal(g, expected)


def test_inplace_backward_refuses_later_use_of_overwritten_logits(backend):
    w, tokens = _leaf_and_logits(backend)
    logits = w * 1.0
    squared = logits.pow(2).sum()  # saves `logits` for its backward, which runs after ours
    out = sequence_logprobs(logits, tokens, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + squared).backward()


def test_inplace_backward_twice_raises(backend):
    w, tokens = _leaf_and_logits(backend)
    out = token_logprobs(w * 1.0, tokens, inplace_backward=True).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# ---------------------------------------------------------------- compile
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend, compiler):
    logits, tokens = _inputs((2, 2, 5), 41, torch.float32, backend)
    lengths = torch.tensor([[5, 2], [0, 3]], device=backend)

    def f(x, y, L):
        return sequence_logprobs(x, y, lengths=L, temperature=0.9) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    x1 = logits.detach().requires_grad_(True)
    x2 = logits.detach().requires_grad_(True)
    o1, o2 = f(x1, tokens, lengths), compiled(x2, tokens, lengths)
    assert torch.equal(o1, o2)
    g1 = torch.autograd.grad(o1.sum(), x1)[0]
    g2 = torch.autograd.grad(o2.sum(), x2)[0]
    assert torch.equal(g1, g2)


# ---------------------------------------------------------------- bad input
def _bad(V=5, shape=(2, 3)):
    return _inputs(shape, V, torch.float32, "cpu")


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("token_high", ValueError, r"tokens must lie in \[0, V\) = \[0, 5\).*\[0, 5\]"),
        ("token_negative", ValueError, r"tokens must lie in \[0, V\)"),
        ("float_tokens", TypeError, r"tokens must be an int32 or int64 tensor, got torch.float32"),
        ("bool_tokens", TypeError, r"tokens must be an int32 or int64 tensor, got torch.bool"),
        ("token_shape", ValueError, r"tokens must have shape \(2, 3\).*got \(2, 4\)"),
        ("mask_shape", ValueError, r"mask must have shape \(2, 3\).*got \(3, 2\)"),
        ("lengths_shape", ValueError, r"lengths must have shape \(2,\).*got \(2, 3\)"),
        ("lengths_range", ValueError, r"lengths must lie in \[0, T\] = \[0, 3\].*\[0, 4\]"),
        ("lengths_float", TypeError, r"lengths must be an int32 or int64 tensor"),
        ("mask_and_lengths", ValueError, r"either mask or lengths"),
        ("temperature_zero", ValueError, r"temperature must be finite and > 0, got 0.0"),
        ("temperature_nan", ValueError, r"temperature must be finite and > 0, got nan"),
        ("temperature_neg", ValueError, r"temperature must be finite and > 0, got -1.0"),
        ("int_logits", TypeError, r"logits must be float16, bfloat16, float32 or float64, got torch.int64"),
        ("logits_1d", ValueError, r"logits must have shape \(..., T, V\)"),
        ("stride_v", ValueError, r"logits must have stride 1 on the vocabulary"),
        ("device", ValueError, r"tokens is on meta but logits is on cpu"),
    ],
)
def test_bad_input(case, exc, match):
    logits, tokens = _bad()
    kw, mask = {}, None
    if case == "token_high":
        tokens[0, 0] = 5
    elif case == "token_negative":
        tokens[1, 2] = -1
    elif case == "float_tokens":
        tokens = tokens.float()
    elif case == "bool_tokens":
        tokens = tokens > 0
    elif case == "token_shape":
        tokens = torch.zeros(2, 4, dtype=torch.long)
    elif case == "mask_shape":
        mask = torch.ones(3, 2)
    elif case == "lengths_shape":
        kw["lengths"] = torch.ones(2, 3, dtype=torch.long)
    elif case == "lengths_range":
        kw["lengths"] = torch.tensor([0, 4])
    elif case == "lengths_float":
        kw["lengths"] = torch.tensor([1.0, 2.0])
    elif case == "mask_and_lengths":
        mask, kw["lengths"] = torch.ones(2, 3), torch.tensor([1, 2])
    elif case.startswith("temperature"):
        kw["temperature"] = {"temperature_zero": 0.0, "temperature_nan": float("nan"), "temperature_neg": -1.0}[case]
    elif case == "int_logits":
        logits = torch.zeros(2, 3, 5, dtype=torch.long)
    elif case == "logits_1d":
        logits, tokens = torch.zeros(5), torch.zeros((), dtype=torch.long)
    elif case == "stride_v":
        logits = torch.zeros(2, 3, 10)[..., ::2]
    elif case == "device":
        tokens = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with pytest.raises(exc, match=match):
        sequence_logprobs(logits, tokens, mask, **kw)


def test_collapse_rows_refuses_unaddressable_strides():
    x = torch.zeros(6, 4, 5, 6, 7)[::2, ::2, ::2, ::2]  # four leading dims, none mergeable
    with pytest.raises(ValueError, match="cannot be addressed as three strided dims"):
        token_logprobs(x, torch.zeros(x.shape[:-1], dtype=torch.long))


def test_public_api_exports():
    for name in ("sequence_logprobs", "token_logprobs", "SequenceLogprobs", "TokenLogprobs"):
        assert hasattr(gspo_kernels, name)


def test_eager_first_call_does_not_import_dynamo():
    # The custom ops are for torch.compile; an eager call runs the implementation
    # directly, so a short script's first call does not pay torch._dynamo's import (~1 s).
    import subprocess
    import sys

    code = (
        "import sys, torch, gspo_kernels\n"
        "x = torch.randn(2, 3, 50, requires_grad=True)\n"
        "y = torch.randint(0, 50, (2, 3))\n"
        "gspo_kernels.sequence_logprobs(x, y).sum().backward()\n"
        "lp, h = gspo_kernels.token_logprobs(x, y, return_entropy=True)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
