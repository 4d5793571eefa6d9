"""Nothing silently wrong: masked positions inert, degenerate shapes, exact
shapes only, clear errors, extreme values, overflowing ratios, overlapping
in-place gradients, the losses under torch.compile, the ratio's denominator.
Each class of failure has a test here that would have caught it."""

from __future__ import annotations

import pytest
import torch
from test_logprobs import DEVICE, TOLERANCE, _close

from gspo_kernels import (
    GRPOLoss,
    GSPOLoss,
    _ops,
    _torch_path,
    grpo_loss,
    gspo_loss,
    linear_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from reference import gspo_loss_reference, naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return "cpu" if request.param == "torch" else DEVICE


def _batch(B=2, G=3, T=5, V=13, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, G, T, V, generator=g) * 2).to(dtype).to(device)
    tokens = torch.randint(0, V, (B, G, T), generator=g).to(device)
    mask = torch.ones(B, G, T, dtype=torch.bool)
    mask[0, 1, 3:] = False
    mask[1, 2] = False  # an empty sequence
    rewards = torch.randint(0, 3, (B, G), generator=g).float().to(device)
    old = (-torch.rand(B, G, T, generator=g) * 3).to(device)
    ref = old - 0.1 * torch.rand(B, G, T, generator=g).to(device)
    return dict(logits=logits, tokens=tokens, mask=mask.to(device), rewards=rewards, old=old, ref=ref)


LOSSES = [
    ("gspo", dict()),
    ("gspo_token", dict(level="sequence_token")),
    ("grpo", dict(loss_agg="seq-mean-token-mean")),
    ("grpo_tok", dict(loss_agg="token-mean")),
    ("grpo_sum", dict(loss_agg="seq-mean-token-sum")),
    ("grpo_dr", dict(loss_agg="dr_grpo")),
]


def _loss(name, kw, x, d, **extra):
    fn = gspo_loss if name.startswith("gspo") else grpo_loss
    adv = "group_norm"
    return fn(
        x,
        d["tokens"],
        d["rewards"],
        d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        advantage=extra.pop("advantage", adv),
        beta=0.04,
        **kw,
        **extra,
    )


# ---------------------------------------------------------------- 1. masked positions are inert
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_poisoned_masked_logits_never_reach_value_or_gradient(backend, poison, monkeypatch):
    # A chunk of the torch path mixes masked and unmasked rows (2 rows of 13 per chunk).
    monkeypatch.setattr(_torch_path, "CHUNK_ELEMENTS", 26)
    d = _batch(device=backend)
    clean = d["logits"].clone()
    d["logits"][~d["mask"]] = poison
    for fn in (
        lambda x: sequence_logprobs(x, d["tokens"], d["mask"]).sum(),
        lambda x: torch.where(
            d["mask"], token_logprobs(x, d["tokens"], valid=d["mask"], return_entropy=True)[1], 0
        ).sum(),
    ):
        x = d["logits"].clone().requires_grad_(True)
        xc = clean.clone().requires_grad_(True)
        out, out_c = fn(x), fn(xc)
        (g,) = torch.autograd.grad(out, x)
        (gc,) = torch.autograd.grad(out_c, xc)
        assert torch.equal(out, out_c)
        assert torch.equal(g, gc) and torch.count_nonzero(g[~d["mask"]]) == 0


@pytest.mark.parametrize("name,kw", LOSSES, ids=[n for n, _ in LOSSES])
def test_poisoned_masked_inputs_in_losses(backend, name, kw):
    d = _batch(device=backend)
    token_adv = torch.randn(d["mask"].shape, generator=torch.Generator().manual_seed(3)).to(backend)
    extra = dict(advantage=token_adv) if name != "gspo" else {}
    x0 = d["logits"].clone().requires_grad_(True)
    loss0, _ = _loss(name, kw, x0, d, **dict(extra))
    (g0,) = torch.autograd.grad(loss0, x0)
    bad = dict(d)
    for k in ("old", "ref"):
        bad[k] = d[k].masked_fill(~d["mask"], float("nan"))
    bad["logits"] = d["logits"].masked_fill(~d["mask"].unsqueeze(-1), float("inf"))
    if extra:
        extra["advantage"] = token_adv.masked_fill(~d["mask"], float("nan"))
    x1 = bad["logits"].clone().requires_grad_(True)
    loss1, m1 = _loss(name, kw, x1, bad, **extra)
    (g1,) = torch.autograd.grad(loss1, x1)
    assert torch.isfinite(loss1) and torch.equal(loss0, loss1)
    assert torch.equal(g0, g1) and torch.count_nonzero(g1[~d["mask"]]) == 0
    assert torch.isfinite(m1["entropy"])


@pytest.mark.parametrize("what", ["old_logprobs", "ref_logprobs", "advantage", "rewards"])
def test_non_finite_at_valid_positions_is_refused(what):
    d = _batch()
    kw = dict(old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.04, advantage="group_norm")
    if what == "advantage":
        kw["advantage"] = torch.zeros(2, 3).index_fill_(1, torch.tensor([0]), float("nan")).to(d["logits"].device)
    elif what == "rewards":
        d["rewards"][0, 0] = float("inf")
    else:
        kw[what] = kw[what].clone()
        kw[what][0, 0, 0] = float("nan")
    name = "advantages" if what == "advantage" else what  # the loss core's argument name
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], **kw)


# ---------------------------------------------------------------- 2. degenerate shapes
def test_zero_length_sequences(backend):
    # T = 0: every sequence is empty: value 0 and a zero (empty) gradient; token ops give (..., 0).
    x = torch.randn(2, 3, 0, 7, device=backend, requires_grad=True)
    y = torch.zeros(2, 3, 0, dtype=torch.long, device=backend)
    out = sequence_logprobs(x, y)
    assert out.shape == (2, 3) and torch.count_nonzero(out) == 0
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape
    lp, ent = token_logprobs(x, y, return_entropy=True)
    assert lp.shape == ent.shape == (2, 3, 0)
    loss, m = gspo_loss(x, y, torch.randn(2, 3, device=backend), beta=0.0)
    assert loss.item() == 0.0 and m["entropy"].item() == 0.0
    loss, _ = grpo_loss(x, y, torch.randn(2, 3, device=backend), beta=0.0, loss_agg="dr_grpo")
    assert loss.item() == 0.0


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)], ids=["B=0", "G=0"])
def test_no_sequences(backend, shape):
    x = torch.randn(*shape, 7, device=backend, requires_grad=True)
    y = torch.zeros(shape, dtype=torch.long, device=backend)
    out = sequence_logprobs(x, y)  # the op: a well-defined empty result
    assert out.shape == shape[:2]
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape
    with pytest.raises(ValueError, match=r"holds no sequence \(B \* G = 0\)"):
        gspo_loss(x, y, torch.zeros(shape[:2], device=backend), beta=0.0)
    with pytest.raises(ValueError, match=r"holds no sequence"):
        grpo_loss(x, y, torch.zeros(shape[:2], device=backend), beta=0.0)


# ---------------------------------------------------------------- 3. no silent reshapes
@pytest.mark.parametrize("what", ["old_logprobs", "ref_logprobs"])
@pytest.mark.parametrize("shape", [(3, 2, 5), (1, 6, 5), (6, 5)], ids=["G,B,T", "1,BG,T", "N,T"])
def test_per_token_tensors_must_have_the_documented_shape(what, shape):
    d = _batch()
    kw = dict(old_logprobs=d["old"], ref_logprobs=d["ref"], beta=0.04)
    kw[what] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"{what} must have shape \(2, 3, 5\), got"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], **kw)


def test_flat_form_only_with_flat_logits_and_group_size():
    d = _batch()
    B, G, T, V = d["logits"].shape
    flat = lambda t: t.reshape(B * G, *t.shape[2:])  # noqa: E731
    l4, _ = gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], old_logprobs=d["old"], beta=0.0)
    l3, _ = gspo_loss(
        flat(d["logits"]),
        flat(d["tokens"]),
        d["rewards"].reshape(-1),
        flat(d["mask"]),
        old_logprobs=flat(d["old"]),
        group_size=G,
        beta=0.0,
    )
    assert torch.equal(l3, l4)
    with pytest.raises(ValueError, match=r"group_size=2 does not match G = 3"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], group_size=2, beta=0.0)
    with pytest.raises(ValueError, match=r"tokens must have shape \(2, 3, 5\)"):
        gspo_loss(d["logits"], flat(d["tokens"]), d["rewards"], d["mask"], beta=0.0)
    with pytest.raises(ValueError, match=r"rewards must have shape \(2, 3\), got \(6,\)"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"].reshape(-1), d["mask"], beta=0.0)


# ---------------------------------------------------------------- 4. clear errors
TOKEN_DTYPES = [torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool]


@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_one_rule_for_token_dtypes(backend, dtype):
    x = torch.randn(2, 3, 5, device=backend)
    y = torch.zeros(2, 3, dtype=dtype, device=backend)
    msg = rf"tokens must be an int32 or int64 tensor, got {dtype}"
    for call in (
        lambda: token_logprobs(x, y),
        lambda: sequence_logprobs(x, y),
        lambda: linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), y),
        lambda: gspo_loss(x.unsqueeze(0), y.unsqueeze(0), torch.zeros(1, 2), beta=0.0),
    ):
        with pytest.raises(TypeError, match=msg):
            call()
    for ok in (torch.int32, torch.int64):
        token_logprobs(x, y.to(ok) if dtype != torch.bool else y.long().to(ok))


def test_errors_name_the_argument():
    d = _batch()
    x, y, r, m = d["logits"], d["tokens"], d["rewards"], d["mask"]
    cases = [
        (lambda: token_logprobs(x, y, valid=torch.ones(2, 3)), ValueError, r"valid must have shape \(2, 3, 5\)"),
        (
            lambda: gspo_loss(x, y, r, m, ref_logits=x[..., :4], beta=0.1, denominator="ref"),
            ValueError,
            r"ref_logits must have the logits' shape",
        ),
        (lambda: gspo_loss(x, y, r, m, ref_logits=x.long(), beta=0.1), TypeError, r"ref_logits must be float16"),
        (lambda: gspo_loss(x, y[..., :4], r, m, beta=0.0), ValueError, r"tokens must have shape \(2, 3, 5\)"),
        (lambda: token_logprobs(x.tolist(), y), TypeError, r"logits must be a torch.Tensor, got list"),
        (lambda: token_logprobs(x, y.tolist()), TypeError, r"tokens must be a torch.Tensor, got list"),
        (lambda: gspo_loss(x.tolist(), y, r, m, beta=0.0), TypeError, r"logits must be a torch.Tensor, got list"),
        (
            lambda: linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), y[0, :2], bias=torch.zeros(5).double()),
            TypeError,
            r"bias must have hidden's dtype torch.float32, got torch.float64",
        ),
        (
            lambda: linear_token_logprobs(torch.randn(2, 4), torch.randn(0, 4), y[0, :2]),
            ValueError,
            r"weight must have V >= 1 rows",
        ),
        (
            lambda: linear_token_logprobs(torch.randn(2, 0), torch.randn(5, 0), y[0, :2]),
            ValueError,
            r"hidden must have H >= 1",
        ),
        (
            lambda: token_logprobs(x, y, temperature=torch.ones((), device="meta")),
            ValueError,
            r"temperature must be a number or a tensor holding a value",
        ),
        (lambda: gspo_loss(x, y, r.to("meta"), m, beta=0.0), ValueError, r"rewards is on meta"),
        (lambda: GSPOLoss(advantage="bad"), ValueError, r"advantage must be one of"),
        (lambda: GSPOLoss(level="bad"), ValueError, r"level must be one of"),
        (lambda: GRPOLoss(loss_agg="bad"), ValueError, r"loss_agg must be one of"),
        (lambda: GSPOLoss(temperature=0), ValueError, r"temperature must be finite and > 0"),
        (lambda: GRPOLoss(entropy_coef=float("nan")), ValueError, r"entropy_coef must be a finite float"),
        (
            lambda: gspo_loss(x, y, r, m, advantage=torch.full((2, 3), float("nan"), device=x.device), beta=0.0),
            ValueError,
            r"advantages must be finite at valid",
        ),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


# ---------------------------------------------------------------- 5. extreme values
@pytest.mark.parametrize("tau", [1e-39, 1e-31, 1e31, 1e300])
def test_temperatures_outside_the_computable_range_are_refused(tau):
    x, y = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must lie in \[1e-30, 1e\+30\]"):
        token_logprobs(x, y, temperature=tau)


def test_logits_near_the_fp32_limit(backend):
    # Differences are taken before scaling by 1/tau: finite logits of +-3e38 at tau = 0.5
    # give the float64 answer, not -inf or NaN.
    x = torch.tensor([[3.0e38, 2.9e38, -3.0e38, 0.0, 3.0e38], [-3.0e38, -3.0e38, -2.0e38, -3.0e38, -3.0e38]])
    x = x.to(backend)
    y = torch.tensor([1, 2], device=backend)
    lp, ent = token_logprobs(x, y, temperature=0.5, return_entropy=True)
    ref = naive_token_logprobs(x.double(), y, 0.5, dtype=torch.float64)
    _close(lp, ref, TOLERANCE[torch.float32]["value"], "logp")
    _close(ent, naive_token_entropy(x.double(), 0.5, dtype=torch.float64), TOLERANCE[torch.float32]["value"], "H")


# ---------------------------------------------------------------- 6. overflowing ratios
@pytest.mark.parametrize("name,kw", LOSSES, ids=[n for n, _ in LOSSES])
def test_zero_advantage_keeps_an_overflowing_ratio_finite(name, kw):
    # Group 0 has equal rewards (advantage exactly 0) and a ratio of exp(200): the
    # loss and its gradient stay finite, and equal those with that group removed.
    d = _batch(seed=5)
    d["rewards"][0] = 1.0
    d["old"][0] = d["old"][0] - 200.0
    x = d["logits"].clone().requires_grad_(True)
    loss, m = _loss(name, kw, x, d)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.count_nonzero(g[0][d["mask"][0]]) > 0  # the KL term still moves group 0
    assert torch.isinf(m["ratio"][0]).any()  # the metric reports the real (overflowed) ratio


# ---------------------------------------------------------------- 7. overlapping in-place gradients
def test_inplace_backward_refuses_overlapping_logits(backend):
    base = torch.randn(1, 4, 9, device=backend)
    expanded = base.expand(3, 4, 9)
    y = torch.zeros(3, 4, dtype=torch.long, device=backend)
    overlapping = torch.randn(40, device=backend).as_strided((3, 4, 9), (9, 1, 1))
    for x in (expanded, overlapping):
        with pytest.raises(ValueError, match="inplace_backward=True needs logits whose elements do not share"):
            sequence_logprobs(x, y, inplace_backward=True)
    # out of place, the expanded logits are fine: equal to the materialised copy
    x1 = base.clone().requires_grad_(True)
    out = sequence_logprobs(x1.expand(3, 4, 9), y)
    out_ref = naive_sequence_logprobs(base.double().expand(3, 4, 9), y, dtype=torch.float64)
    _close(out, out_ref, TOLERANCE[torch.float32]["value"], "expanded")


# ---------------------------------------------------------------- 8. losses under torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_losses_compile_fullgraph(backend, compiler):
    d = _batch(device=backend, seed=7)
    lengths = torch.tensor([[5, 2, 0], [3, 5, 1]], device=backend)

    def f(x, y, L, r, old, ref):
        l1, m1 = gspo_loss(x, y, r, lengths=L, old_logprobs=old, ref_logprobs=ref, entropy_coef=0.01)
        l2, _ = grpo_loss(x, y, r, lengths=L, old_logprobs=old, ref_logprobs=ref, loss_agg="token-mean")
        return l1 + l2, m1["entropy"]

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=compiler)
    args = (d["tokens"], lengths, d["rewards"], d["old"], d["ref"])
    x1 = d["logits"].clone().requires_grad_(True)
    x2 = d["logits"].clone().requires_grad_(True)
    (a, ea), (b, eb) = f(x1, *args), cf(x2, *args)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(eb, ea, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.autograd.grad(b, x2)[0], torch.autograd.grad(a, x1)[0], rtol=1e-5, atol=1e-7)
    # bad input is still refused inside the compiled graph
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
        cf(x2, d["tokens"], lengths + 1, *args[2:])
    bad_ref = d["ref"].clone()
    bad_ref[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ref_logprobs must be finite at valid"):
        cf(x2, d["tokens"], lengths, d["rewards"], d["old"], bad_ref)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_inplace_backward_under_compile(backend, compiler):
    d = _batch(device=backend, seed=8)

    def f(w, y, m):
        return sequence_logprobs(w * 1.0, y, m, inplace_backward=True).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=compiler)
    w1 = d["logits"].clone().requires_grad_(True)
    w2 = d["logits"].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(f(w1, d["tokens"], d["mask"]), w1)
    (g2,) = torch.autograd.grad(cf(w2, d["tokens"], d["mask"]), w2)
    assert torch.equal(g1, g2)


# ---------------------------------------------------------------- 9. hidden-state path, masked rows
def test_linear_fully_masked_chunk_has_zero_gradient():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    valid = torch.tensor([True, True, False, False, True, False])
    out = linear_token_logprobs(h, w, y, valid=valid, chunk_size=2)
    assert out[2].item() == 0.0 and out[3].item() == 0.0  # rows 2-3: one fully masked chunk
    (gh,) = torch.autograd.grad(out, h, torch.ones(6))  # the caller sends a gradient there anyway
    # every invalid row (a whole masked chunk, or row 5 alone) is inert; valid rows are not
    assert torch.count_nonzero(gh[2:4]) == 0 and torch.count_nonzero(gh[5]) == 0
    assert torch.count_nonzero(gh[4]) > 0 and out[5].item() == 0.0


# ---------------------------------------------------------------- 10. the ratio's denominator
def test_denominator_is_explicit():
    d = _batch(seed=9)
    x, y, r, m = d["logits"], d["tokens"], d["rewards"], d["mask"]
    # no old_logprobs: the detached current policy, as TRL (the reference enters through the KL only)
    _, m_default = gspo_loss(x, y, r, m, ref_logprobs=d["ref"])
    assert torch.equal(m_default["ratio"], torch.ones_like(m_default["ratio"]))
    with pytest.raises(ValueError, match="denominator must be one of"):
        gspo_loss(x, y, r, m, ref_logprobs=d["ref"], denominator="reference")
    with pytest.raises(ValueError, match="denominator='old' needs old_logprobs"):
        grpo_loss(x, y, r, m, ref_logprobs=d["ref"], denominator="old")
    _, m_det = gspo_loss(x, y, r, m, ref_logprobs=d["ref"], denominator="detached", advantage="group_norm")
    assert torch.equal(m_det["ratio"], torch.ones_like(m_det["ratio"]))  # on-policy: ratio 1
    loss_ref, m_ref = gspo_loss(x, y, r, m, ref_logprobs=d["ref"], denominator="ref", advantage="group_norm")
    expect, _ = gspo_loss_reference(
        x.double(), y, r, m, ref_logprobs=d["ref"], denominator="ref", advantage="group_norm"
    )
    _close(loss_ref, expect, TOLERANCE[torch.float32]["value"], "loss")
    assert not torch.equal(m_ref["ratio"], m_det["ratio"])
    # old given: "old" by default, whatever the reference
    l_old, _ = gspo_loss(x, y, r, m, ref_logprobs=d["ref"], old_logprobs=d["old"], advantage="group_norm")
    l_old2, _ = gspo_loss(
        x, y, r, m, ref_logprobs=d["ref"], old_logprobs=d["old"], advantage="group_norm", denominator="old"
    )
    assert torch.equal(l_old, l_old2)
