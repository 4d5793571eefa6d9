"""GSPO / GRPO losses against the plain-PyTorch reference (reference/losses.py):
values and gradients for every mode, the article's worked example, edge cases
and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import gspo_kernels
from gspo_kernels import GRPOLoss, GSPOLoss, _ops, grpo_loss, gspo_loss
from reference import contrast_advantage_reference, grpo_loss_reference, gspo_loss_reference, naive_token_logprobs

# Loss value and logits-gradient errors against the float64 reference on the
# same logits. float64 logits run the kernels in fp64: agreement to rounding.
# float32/bfloat16: per-token log-probs carry fp32 summation error (~1e-6),
# amplified at most by exp() of ratios near 1 and by advantages of order 1;
# gradients are rounded to the logits' dtype (one ulp: 2**-7 for bf16, whose
# interpreter narrowing truncates).
TOLERANCE = {
    torch.float64: dict(value=(1e-12, 1e-10), grad=(1e-13, 1e-10)),
    torch.float32: dict(value=(2e-6, 1e-5), grad=(1e-7, 5e-5)),
    torch.bfloat16: dict(value=(2e-6, 1e-5), grad=(1e-6, 2.0**-7)),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _batch(B=2, G=4, T=6, V=37, dtype=torch.float64, seed=0, spread=0.3):
    """Random logits, a ragged mask with one empty sequence, rewards with a tie,
    and old/ref log-probs spread around the policy's so that some sequences clip."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, G, T, V, generator=g) * 2).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, (B, G, T), generator=g).to(DEVICE)
    lengths = torch.randint(1, T + 1, (B, G), generator=g)
    lengths[0, min(1, G - 1)] = 0  # an empty sequence
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).to(DEVICE)
    rewards = torch.randint(0, 4, (B, G), generator=g).double()
    rewards[0, min(2, G - 1)] = rewards[0, 0]  # a tie
    with torch.no_grad():
        lp = naive_token_logprobs(logits.double(), tokens, dtype=torch.float64)
    old = (
        lp + spread * torch.randn(B, G, 1, generator=g).to(DEVICE) + 0.05 * torch.randn(B, G, T, generator=g).to(DEVICE)
    )
    ref = lp + 0.2 * torch.randn(B, G, T, generator=g).to(DEVICE)
    return dict(logits=logits, tokens=tokens, mask=mask, rewards=rewards.to(DEVICE), old=old, ref=ref)


def _run(fn, ref_fn, d, dtype_tol, **kw):
    """Value and logits-gradient of fn vs ref_fn (float64 reference)."""
    x = d["logits"].detach().requires_grad_(True)
    loss, metrics = fn(x, d["tokens"], d["rewards"], d["mask"], **kw)
    xr = d["logits"].detach().double().requires_grad_(True)
    ref_loss, ref_metrics = ref_fn(xr, d["tokens"], d["rewards"], d["mask"], **kw)
    _close(loss, ref_loss, TOLERANCE[dtype_tol]["value"], "loss")
    (gx,) = torch.autograd.grad(loss, x)
    (gr,) = torch.autograd.grad(ref_loss, xr)
    _close(gx, gr, TOLERANCE[dtype_tol]["grad"], "grad")
    return loss, metrics, ref_metrics, gx


@pytest.mark.parametrize("advantage", ["contrast", "group_norm", "tensor"])
@pytest.mark.parametrize("kl", ["k1", "k3"])
@pytest.mark.parametrize("denominator", ["old", "ref"])
def test_gspo_matches_reference(advantage, kl, denominator):
    d = _batch()
    kw = dict(
        ref_logprobs=d["ref"],
        kl=kl,
        beta=0.05,
        temperature=0.8,
        epsilon=0.2,
        epsilon_high=0.28,
        denominator=denominator,
    )
    if denominator == "old":
        kw["old_logprobs"] = d["old"]
    g = torch.Generator().manual_seed(21)
    kw["advantage"] = (
        torch.randn(2, 4, dtype=torch.float64, generator=g).to(DEVICE) if advantage == "tensor" else advantage
    )
    loss, m, rm, _ = _run(gspo_loss, gspo_loss_reference, d, torch.float64, **kw)
    _close(m["ratio"], rm["ratio"], (1e-12, 1e-10), "ratio")
    _close(m["advantage"], rm["advantage"], (1e-12, 1e-10), "advantage")
    _close(m["kl"], rm["kl"], (1e-12, 1e-10), "kl")
    if denominator == "old":  # the spread makes both clipped and unclipped sequences
        s, A = m["ratio"], m["advantage"]
        clipped = ((A > 0) & (s > 1.28)) | ((A < 0) & (s < 0.8))
        assert 0 < int(clipped.sum()) < 7 or advantage == "contrast"
    assert m["ratio"][0, 1].item() == 1.0  # the empty sequence: ratio 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gspo_low_precision(dtype):
    d = _batch(dtype=dtype, seed=3)
    _run(gspo_loss, gspo_loss_reference, d, dtype, ref_logprobs=d["ref"], old_logprobs=d["old"])


@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_gspo_token_level(kl):
    d = _batch(seed=4)
    A_t = torch.randn(2, 4, 6, dtype=torch.float64).to(DEVICE)
    _run(
        gspo_loss,
        gspo_loss_reference,
        d,
        torch.float64,
        ref_logprobs=d["ref"],
        old_logprobs=d["old"],
        level="sequence_token",
        advantage=A_t,
        kl=kl,
    )


def test_gspo_token_with_constant_advantage_equals_gspo():
    d = _batch(seed=5)
    A = torch.randn(2, 4, dtype=torch.float64).to(DEVICE)
    kw = dict(ref_logprobs=d["ref"], old_logprobs=d["old"])
    x1 = d["logits"].detach().requires_grad_(True)
    x2 = d["logits"].detach().requires_grad_(True)
    l1, _ = gspo_loss(x1, d["tokens"], None, d["mask"], advantage=A, **kw)
    l2, _ = gspo_loss(
        x2, d["tokens"], None, d["mask"], advantage=A.unsqueeze(-1).expand(2, 4, 6), level="sequence_token", **kw
    )
    _close(l2, l1, (1e-14, 1e-12), "loss")
    g1, g2 = torch.autograd.grad(l1, x1)[0], torch.autograd.grad(l2, x2)[0]
    _close(g2, g1, (1e-14, 1e-12), "grad")


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "dr_grpo"])
@pytest.mark.parametrize("advantage", ["group_norm", "seq_tensor", "token_tensor"])
def test_grpo_matches_reference(loss_agg, advantage):
    d = _batch(seed=6)
    adv = {
        "group_norm": "group_norm",
        "seq_tensor": torch.randn(2, 4, dtype=torch.float64).to(DEVICE),
        "token_tensor": torch.randn(2, 4, 6, dtype=torch.float64).to(DEVICE),
    }[advantage]
    _, m, rm, _ = _run(
        grpo_loss,
        grpo_loss_reference,
        d,
        torch.float64,
        ref_logprobs=d["ref"],
        old_logprobs=d["old"],
        advantage=adv,
        loss_agg=loss_agg,
        kl="k3",
        temperature=1.2,
    )
    mask = d["mask"]
    _close(m["ratio"][mask], rm["ratio"][mask], (1e-12, 1e-10), "token ratios")


def test_article_worked_example():
    """B=1, G=3, lengths (5, 7, 6), rewards (8, 6, 4), per-token log-ratios
    0.05, 0.342/7, -0.308/6 against the reference; eps = 0.2, beta = 0.05, k1.
    Built exactly with V = 2: log_softmax([a, 0])[0] = lp for a = log(p/(1-p))."""
    T, lp = 7, -0.5
    p = math.exp(lp)
    logits = torch.zeros(1, 3, T, 2, dtype=torch.float64)
    logits[..., 0] = math.log(p / (1 - p))
    tokens = torch.zeros(1, 3, T, dtype=torch.long)
    lengths = torch.tensor([[5, 7, 6]])
    log_ratio = torch.tensor([0.05, 0.342 / 7, -0.308 / 6], dtype=torch.float64)
    ref_logprobs = (lp - log_ratio).view(1, 3, 1).expand(1, 3, T).contiguous()
    rewards = torch.tensor([[8.0, 6.0, 4.0]])
    x = logits.to(DEVICE).requires_grad_(True)
    loss, m = gspo_loss(
        x,
        tokens.to(DEVICE),
        rewards.to(DEVICE),
        lengths=lengths.to(DEVICE),
        ref_logprobs=ref_logprobs.to(DEVICE),
        **gspo_kernels.ARTICLE_GSPO,
    )
    torch.testing.assert_close(
        m["ratio"].cpu(), torch.tensor([[1.05127, 1.05007, 0.94996]], dtype=torch.float64), atol=5e-6, rtol=0
    )
    A = m["advantage"].cpu()
    torch.testing.assert_close(A, torch.tensor([[0.10071, 0.10071, -0.10071]], dtype=torch.float64), atol=5e-6, rtol=0)
    s = m["ratio"].cpu()[0]
    policy = -torch.minimum(s * A[0], s.clamp(0.8, 1.2) * A[0])
    torch.testing.assert_close(
        policy, torch.tensor([-0.10587, -0.10575, 0.09567], dtype=torch.float64), atol=5e-6, rtol=0
    )
    assert abs(policy.mean().item() - (-0.03865)) < 5e-6
    assert abs((loss.item() - policy.mean().item()) / 0.05 - 0.015841) < 5e-6  # mean per-sequence k1 KL
    assert abs(m["kl"].item() - 0.284 / 18) < 1e-12  # mean per-token KL (TRL's metric)
    assert abs(loss.item() - (-0.037859)) < 5e-7
    assert m["policy_loss"].item() == loss.item()  # TRL's policy_loss: the loss before the entropy bonus
    # and the same through the reference implementation
    ref_loss, _ = gspo_loss_reference(
        logits,
        tokens,
        rewards,
        torch.arange(T) < lengths.unsqueeze(-1),
        ref_logprobs=ref_logprobs,
        **gspo_kernels.ARTICLE_GSPO,
    )
    assert abs(ref_loss.item() - loss.item()) < 1e-12


def test_equal_rewards_and_single_completion_give_zero_advantage():
    d = _batch(B=2, G=3, seed=7)
    d["rewards"] = torch.tensor([[1.0, 1.0, 1.0], [0.1 + 0.2, 0.3, 0.3]]).double().to(DEVICE)
    for adv in ("contrast", "group_norm"):
        _, m = gspo_loss(
            d["logits"], d["tokens"], d["rewards"], d["mask"], old_logprobs=d["old"], beta=0.0, advantage=adv
        )
        assert torch.all(m["advantage"].abs() < 1e-3 if adv == "group_norm" else m["advantage"] == 0), adv
    g1 = _batch(B=3, G=1, seed=8)
    for adv in ("contrast", "group_norm"):
        x = g1["logits"].detach().requires_grad_(True)
        loss, m = gspo_loss(x, g1["tokens"], g1["rewards"], g1["mask"], beta=0.0, advantage=adv)
        assert torch.equal(m["advantage"], torch.zeros_like(m["advantage"]))
        assert torch.count_nonzero(torch.autograd.grad(loss, x)[0]) == 0


def test_contrast_advantage_matches_loop_reference():
    g = torch.Generator().manual_seed(9)
    rewards = torch.randint(0, 3, (16, 5), generator=g).double()
    ratios = torch.rand(16, 5, generator=g, dtype=torch.float64) + 0.5
    _close(
        gspo_kernels.contrast_advantage(rewards, ratios),
        contrast_advantage_reference(rewards, ratios),
        (1e-15, 0),
        "contrast advantage",
    )


def test_empty_sequence_gets_zero_gradient():
    d = _batch(seed=10)
    x = d["logits"].detach().requires_grad_(True)
    loss, m = gspo_loss(x, d["tokens"], d["rewards"], d["mask"], ref_logprobs=d["ref"], kl="k3", denominator="ref")
    g = torch.autograd.grad(loss, x)[0]
    assert torch.count_nonzero(g[0, 1]) == 0 and torch.isfinite(loss)
    assert torch.count_nonzero(g[~d["mask"]]) == 0  # padding tokens get exact zeros


def test_flat_input_with_group_size_and_ref_logits():
    d = _batch(seed=11)
    B, G, T, V = d["logits"].shape
    ref_logits = d["logits"] + 0.3 * torch.randn(
        d["logits"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(DEVICE)
    ref_lp = naive_token_logprobs(ref_logits, d["tokens"], 0.7, dtype=torch.float64)
    l4, m4 = gspo_loss(
        d["logits"], d["tokens"], d["rewards"], d["mask"], ref_logprobs=ref_lp, temperature=0.7, denominator="ref"
    )
    l3, m3 = gspo_loss(
        d["logits"].reshape(B * G, T, V),
        d["tokens"].reshape(B * G, T),
        d["rewards"].reshape(-1),
        d["mask"].reshape(B * G, T),
        ref_logits=ref_logits.reshape(B * G, T, V),
        group_size=G,
        temperature=0.7,
        denominator="ref",
    )
    _close(l3, l4, (1e-13, 1e-12), "loss")
    _close(m3["ratio"], m4["ratio"].reshape(-1), (1e-13, 1e-12), "ratio")  # flat input: flat metrics


def test_modules_and_torch_backend(monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", "torch")
    d = _batch(seed=12)
    kw = dict(ref_logprobs=d["ref"], old_logprobs=d["old"])
    _run(
        GSPOLoss(advantage="group_norm", kl="k3", epsilon=0.1),
        lambda *a, **k: gspo_loss_reference(*a, advantage="group_norm", kl="k3", epsilon=0.1, **k),
        d,
        torch.float64,
        **kw,
    )
    _run(
        GRPOLoss(loss_agg="token-mean"),
        lambda *a, **k: grpo_loss_reference(*a, loss_agg="token-mean", **k),
        d,
        torch.float64,
        **kw,
    )


def test_beta_zero_needs_no_reference():
    d = _batch(seed=13)
    loss, m = gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], beta=0.0)
    assert torch.all(m["ratio"] == 1.0) and m["kl"].item() == 0.0
    ref_loss, _ = gspo_loss_reference(d["logits"], d["tokens"], d["rewards"], d["mask"], beta=0.0)
    _close(loss, ref_loss, (1e-12, 1e-10), "loss")


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(rewards=torch.zeros(2, 3)), ValueError, r"rewards must have shape \(2, 4\), got \(2, 3\)"),
        (dict(rewards=torch.tensor([[0.0, float("nan"), 1.0, 2.0]] * 2)), ValueError, "rewards must be finite"),
        (dict(advantage="bogus"), ValueError, r"advantages must be a tensor or one of \('group_norm', 'contrast'\)"),
        (dict(kl="k4"), ValueError, r"kl must be one of \('k1', 'k2', 'k3', 'low_var_kl', 'abs'\), got 'k4'"),
        (dict(level="token"), ValueError, r"level must be one of"),
        (dict(epsilon=1.5), ValueError, r"epsilon must lie in \(0, 1\), got 1.5"),
        (dict(epsilon=0.0), ValueError, r"epsilon must lie in \(0, 1\), got 0.0"),
        (dict(beta=-0.1), ValueError, r"beta must be >= 0(\.0)?, got -0.1"),
        (dict(beta=0.1, ref_logprobs=None), ValueError, r"beta > 0 needs a reference"),
        (dict(ref_logits="same"), ValueError, r"give ref_logprobs or ref_logits, not both"),
        (
            dict(ref_logprobs=torch.zeros(2, 4, 5)),
            ValueError,
            r"ref_logprobs must have shape \(2, 4, 6\), got \(2, 4, 5\)",
        ),
        (dict(old_logprobs=torch.zeros(2, 4, 6, dtype=torch.long)), TypeError, r"old_logprobs must be a float tensor"),
        (dict(advantage=torch.zeros(2, 3)), ValueError, r"advantages must have shape \(2, 4\) or .*, got \(2, 3\)"),
        (dict(logits=None), ValueError, r"give exactly one of logits"),
    ],
)
def test_gspo_bad_input(kw, exc, match):
    d = _batch()
    args = dict(
        logits=d["logits"],
        tokens=d["tokens"],
        rewards=d["rewards"],
        mask=d["mask"],
        ref_logprobs=d["ref"],
        beta=0.05,
        denominator="ref",
    )
    args.update(kw)
    if args.get("ref_logits") == "same":
        args["ref_logits"] = d["logits"]
    with pytest.raises(exc, match=match):
        gspo_loss(**args)


def test_grpo_bad_input():
    d = _batch()
    with pytest.raises(ValueError, match=r"loss_agg must be one of"):
        grpo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], beta=0.0, loss_agg="sum")
    with pytest.raises(ValueError, match=r"needs group_size=G"):
        grpo_loss(d["logits"][0], d["tokens"][0], d["rewards"][0], d["mask"][0], beta=0.0)


# ---------------------------------------------------------------- entropy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["gspo", "gspo_token", "grpo_seq", "grpo_tok", "grpo_dr"])
@pytest.mark.parametrize("coef", [0.0, 0.03])
def test_entropy_bonus_and_metric(dtype, loss, coef):
    # The bonus joins the loss with its own aggregation; metrics["entropy"] is the
    # mean entropy over valid tokens, from the same pass as the log-probs.
    d = _batch(dtype=dtype, seed=11)
    kw = dict(ref_logprobs=d["ref"], old_logprobs=d["old"], beta=0.04, temperature=0.9, entropy_coef=coef)
    fn, ref_fn = (gspo_loss, gspo_loss_reference) if loss.startswith("gspo") else (grpo_loss, grpo_loss_reference)
    if loss == "gspo_token":
        kw["level"] = "sequence_token"
    elif loss.startswith("grpo"):
        kw["loss_agg"] = {"grpo_seq": "seq-mean-token-mean", "grpo_tok": "token-mean", "grpo_dr": "dr_grpo"}[loss]
    _, metrics, ref_metrics, _ = _run(fn, ref_fn, d, dtype, **kw)
    _close(metrics["entropy"], ref_metrics["entropy"], TOLERANCE[dtype]["value"], "entropy metric")
    assert metrics["entropy"].item() > 0.5  # V = 37 random logits: far from a point mass


def test_entropy_bonus_changes_the_gradient_by_its_own():
    # loss(coef) - loss(0) is exactly -coef * (mean entropy over valid tokens); the gradient
    # difference is that term's gradient (the kernel's h-path).
    d = _batch(dtype=torch.float64, seed=12)
    kw = dict(ref_logprobs=d["ref"], beta=0.0, denominator="ref")
    x0 = d["logits"].detach().requires_grad_(True)
    x1 = d["logits"].detach().requires_grad_(True)
    l0, _ = gspo_loss(x0, d["tokens"], d["rewards"], d["mask"], **kw)
    l1, m1 = gspo_loss(x1, d["tokens"], d["rewards"], d["mask"], entropy_coef=0.5, **kw)
    (g0,) = torch.autograd.grad(l0, x0)
    (g1,) = torch.autograd.grad(l1, x1)
    xr = d["logits"].detach().requires_grad_(True)
    from reference import naive_token_entropy

    H = torch.where(d["mask"], naive_token_entropy(xr, dtype=torch.float64), 0)
    bonus = -0.5 * H.sum() / d["mask"].sum()
    (gb,) = torch.autograd.grad(bonus, xr)
    _close(l1 - l0, bonus, TOLERANCE[torch.float64]["value"], "bonus value")
    _close(g1 - g0, gb, (1e-12, 1e-9), "bonus grad")


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_clip_metrics_equal_their_definition(level):
    # clip_ratio/{low,high,region}_mean from the returned ratios and advantages, with an
    # asymmetric clip range (a swapped epsilon / epsilon_high changes every count)
    d = _batch(seed=21, spread=0.6)  # a seed where both clip sides occur at both levels
    eps, eps_high = 0.1, 0.35
    _, m = gspo_loss(
        d["logits"],
        d["tokens"],
        d["rewards"],
        d["mask"],
        old_logprobs=d["old"],
        epsilon=eps,
        epsilon_high=eps_high,
        level=level,
    )
    s, A = m["ratio"], m["advantage"]
    if level == "sequence_token":  # per-token weights: a token mean over valid tokens
        A, valid = A.unsqueeze(-1).expand(s.shape), d["mask"]
    else:  # one weight per sequence: a mean over the N sequences (TRL's)
        valid = torch.ones_like(s, dtype=torch.bool)
    low = (s < 1 - eps) & (A < 0) & valid
    high = (s > 1 + eps_high) & (A > 0) & valid
    n = valid.sum()
    assert int(low.sum()) > 0 and int(high.sum()) > 0  # both sides exercised
    assert m["clip_ratio/low_mean"].item() == pytest.approx(low.sum().item() / n.item(), abs=1e-7)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(high.sum().item() / n.item(), abs=1e-7)
    assert m["clip_fraction"].item() == pytest.approx((low | high).sum().item() / n.item(), abs=1e-7)


# ---------------------------------------------------------------- defaults that learn
def test_simplest_call_learns_when_rewards_differ():
    # logits, tokens, rewards, mask only: group_norm advantages, no reference needed, a nonzero gradient
    d = _batch(seed=15)
    x = d["logits"].detach().requires_grad_(True)
    loss, m = gspo_loss(x, d["tokens"], d["rewards"], d["mask"])
    (g,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g) > 0 and m["advantage"].abs().max() > 0.5
    x2 = d["logits"].detach().requires_grad_(True)
    loss2, _ = gspo_kernels.policy_loss(x2, d["tokens"], "group_norm", d["mask"], rewards=d["rewards"])
    assert torch.count_nonzero(torch.autograd.grad(loss2, x2)[0]) > 0


def test_contrast_advantage_that_is_identically_zero_warns_once(monkeypatch):
    from gspo_kernels.losses import core

    monkeypatch.setattr(core, "_warned_contrast", False)
    d = _batch(seed=16)
    with pytest.warns(UserWarning, match="identically 0"):
        _, m = gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], advantage="contrast")
    assert torch.all(m["advantage"] == 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once: the second call is silent
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], advantage="contrast")
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], advantage="contrast", old_logprobs=d["old"])


def test_checks_report_shapes_before_option_combinations():
    # a wrong shape and a missing reference for beta > 0: the shape is named first
    d = _batch(seed=17)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(2, 4, 6\)"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], beta=0.1, old_logprobs=d["old"][..., :3])
    with pytest.raises(ValueError, match=r"tokens must have shape"):
        gspo_loss(d["logits"], d["tokens"][..., :3], d["rewards"], d["mask"], beta=0.1)
    with pytest.raises(ValueError, match=r"beta > 0 needs a reference"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], beta=0.1)


def test_ignore_index_labels_count_as_masked():
    d = _batch(seed=18)
    labels = torch.where(d["mask"], d["tokens"], torch.full_like(d["tokens"], -100))
    l1, m1 = gspo_loss(d["logits"], labels, d["rewards"], old_logprobs=d["old"])  # no mask: -100 marks padding
    l2, m2 = gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"], old_logprobs=d["old"])
    assert torch.equal(l1, l2) and torch.equal(m1["ratio"], m2["ratio"])
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, V\)"):
        gspo_loss(d["logits"], labels, d["rewards"], ignore_index=None)


@pytest.mark.parametrize("bad", [-1.0, 0.5, 2.0])
def test_float_mask_must_be_zero_or_one(bad):
    d = _batch(seed=19)
    m = d["mask"].double()
    m[0, 0, 0] = bad
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        gspo_loss(d["logits"], d["tokens"], d["rewards"], m)
    ok, _ = gspo_loss(d["logits"], d["tokens"], d["rewards"], d["mask"].double())  # a 0/1 float mask is fine
    assert torch.isfinite(ok)


def test_constructors_take_every_option_the_call_takes():
    d = _batch(seed=20)
    opts = dict(
        loss_type="cispo",
        importance_sampling_level="sequence",
        epsilon_high=5.0,
        beta=0.02,
        top_entropy_quantile=0.8,
        entropy_coef=0.01,
        temperature=0.9,
    )
    mod = gspo_kernels.PolicyLoss(**opts)
    l1, _ = mod(d["logits"], d["tokens"], "group_norm", d["mask"], rewards=d["rewards"], ref_logprobs=d["ref"])
    l2, _ = gspo_kernels.policy_loss(
        d["logits"], d["tokens"], "group_norm", d["mask"], rewards=d["rewards"], ref_logprobs=d["ref"], **opts
    )
    assert torch.equal(l1, l2)
    g1, _ = GSPOLoss(denominator="ref", kl="k1", beta=0.05)(
        d["logits"], d["tokens"], d["rewards"], d["mask"], ref_logprobs=d["ref"]
    )
    g2, _ = gspo_loss(
        d["logits"], d["tokens"], d["rewards"], d["mask"], ref_logprobs=d["ref"], denominator="ref", kl="k1", beta=0.05
    )
    assert torch.equal(g1, g2)
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['epsilon_hi'\]"):
        GSPOLoss(epsilon_hi=0.3)
