"""Edges of the loss tail that one-line changes of it would otherwise pass, each on the fused
tail (losses/tail/, Triton path in the interpreter) and on the torch composition
(losses/core.py):

- the contrast advantage's tie at the group mean (a reward equal to its group's mean counts
  as good): rewards ``[0, 0.5, 1]`` against reference/losses.py;
- the sequence-level rollout correction at T = 1: one ratio per sequence, as TRL's (its
  ``sampling/importance_sampling_ratio/*`` metrics count every sequence, an empty one too);
- ``dr_grpo``'s divisor ``N * max_completion_length`` (not ``N * T``) against TRL itself;
- the ``ratio`` metric's shape at T = 1: ``(B, G, T)`` at token level, ``(B, G)`` at sequence level.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TOLERANCE, torch_composition

import gspo_kernels
from gspo_kernels import _ops
from gspo_kernels.losses.tail import autograd as tail_autograd
from reference import gspo_loss_reference, naive_token_entropy, naive_token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU = 0.9


@contextlib.contextmanager
def fused_tail(monkeypatch):
    """The fused tail, and a check that it did run."""
    if DEVICE == "cpu" and _ops.CPU_BACKEND != "triton":
        pytest.skip("the fused tail runs on the Triton path (interpreter unset)")
    calls = []
    real = tail_autograd.fused_compose
    monkeypatch.setattr(tail_autograd, "fused_compose", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield
    assert calls, "the fused tail did not run"


@pytest.fixture(params=["fused", "torch"])
def tail(request, monkeypatch):
    """A context manager selecting the fused tail or the torch composition."""
    return (lambda: fused_tail(monkeypatch)) if request.param == "fused" else torch_composition


def _batch(B, G, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, G, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, G, T), generator=g)
    lp = naive_token_logprobs(x, y, TAU, torch.float64)
    old = (
        lp
        + 0.3 * torch.randn(B, G, 1, generator=g, dtype=torch.float64)
        + 0.2 * torch.randn(B, G, T, generator=g, dtype=torch.float64)
    )
    samp = old + 0.4 * torch.randn(B, G, T, generator=g, dtype=torch.float64)
    return {k: v.to(DEVICE) for k, v in dict(x=x, y=y, old=old, samp=samp).items()}


# ---------------------------------------------------------------- contrast: the tie at the mean
def test_contrast_tie_at_group_mean_counts_as_good(tail):
    d = _batch(2, 3, 5, 13, seed=1)
    rewards = torch.tensor([[0.0, 0.5, 1.0], [2.0, -1.0, 0.5]], dtype=torch.float64, device=DEVICE)
    assert rewards[0, 1] == rewards[0].mean() and rewards[1, 2] == rewards[1].mean()  # a reward at its group's mean
    mask = torch.ones(2, 3, 5, dtype=torch.bool, device=DEVICE)
    mask[0, 2, 3:] = False
    opts = dict(advantage="contrast", old_logprobs=d["old"], epsilon=0.2, epsilon_high=0.2)
    x_ref = d["x"].clone().requires_grad_(True)
    want_loss, want = gspo_loss_reference(x_ref, d["y"], rewards, mask, temperature=TAU, **opts)
    (want_grad,) = torch.autograd.grad(want_loss, x_ref)
    x = d["x"].clone().requires_grad_(True)
    with tail():
        loss, metrics = gspo_kernels.gspo_loss(x, d["y"], rewards, mask, temperature=TAU, **opts)
    (grad,) = torch.autograd.grad(loss, x)
    tol = TOLERANCE[torch.float64]
    A = metrics["advantage"]
    torch.testing.assert_close(A, want["advantage"], **tol["value"])
    # group 0: rewards [0, 0.5, 1], mean 0.5: the tied sequence is good (+A, like the best one)
    assert A[0, 2] != 0 and A[0, 1] == A[0, 2] and A[0, 0] == -A[0, 2]
    torch.testing.assert_close(loss, want_loss, **tol["value"])
    torch.testing.assert_close(grad, want_grad, **tol["grad"])


# ---------------------------------------------------------------- T = 1
def _flat_t1(seed):
    """N = 6 sequences of one token, two of them empty (masked)."""
    d = _batch(2, 3, 1, 11, seed)
    d = {k: v.reshape(6, *v.shape[2:]) for k, v in d.items()}
    d["mask"] = torch.tensor([[True], [False], [True], [True], [False], [True]], device=DEVICE)
    d["adv"] = torch.tensor([1.3, -0.9, 0.4, -0.6, 0.7, 2.1], dtype=torch.float64, device=DEVICE)
    return d


@pytest.mark.parametrize("mode,lo,hi", [("sequence_truncate", None, 1.1), ("sequence_mask", 0.8, 1.25)])
def test_sequence_correction_at_t1_is_per_sequence_as_trl(tail, mode, lo, hi):
    """At T = 1 a sequence_* correction is still one ratio per sequence: TRL's metrics take every
    sequence's ratio (an empty one's is exp(0) = 1, then clipped), not only the valid tokens'."""
    trl_oracle = pytest.importorskip("reference.trl_oracle")
    d = _flat_t1(seed=2)
    cfg = dict(
        loss_type="grpo",
        epsilon=0.2,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=lo,
        vllm_importance_sampling_clip_max=hi,
    )
    r = trl_oracle.trl_importance_sampling_ratio(d["old"], d["samp"], d["mask"].long(), mode, lo, hi)
    assert r.shape == (6, 1)
    x_ref = d["x"].clone().requires_grad_(True)
    lp = torch.where(d["mask"], naive_token_logprobs(x_ref, d["y"], TAU, torch.float64), 0)
    ent = torch.where(d["mask"], naive_token_entropy(x_ref, TAU, torch.float64), 0)
    want_loss, _ = trl_oracle.trl_compute_loss(
        lp,
        ent,
        d["mask"].long(),
        d["adv"],
        old_per_token_logps=d["old"],
        importance_sampling_ratio=r,
        temperature=TAU,
        loss_type="grpo",
        epsilon=0.2,
        max_completion_length=1,
    )
    (want_grad,) = torch.autograd.grad(want_loss, x_ref)
    flat = r.flatten()  # TRL's metrics: every sequence's ratio
    want = {"min": flat.min(), "mean": flat.mean(), "max": flat.max()}
    valid = r[d["mask"]]
    assert not torch.equal(valid.mean(), flat.mean())  # the empty sequences change the metric
    x = d["x"].clone().requires_grad_(True)
    with tail():
        loss, metrics = gspo_kernels.policy_loss(
            x, d["y"], d["adv"], d["mask"], old_logprobs=d["old"], sampling_logprobs=d["samp"], temperature=TAU, **cfg
        )
    (grad,) = torch.autograd.grad(loss, x)
    tol = TOLERANCE[torch.float64]
    torch.testing.assert_close(loss, want_loss, **tol["value"])
    torch.testing.assert_close(grad, want_grad, **tol["grad"])
    for k, v in want.items():
        torch.testing.assert_close(
            metrics[f"sampling/importance_sampling_ratio/{k}"], v, **tol["value"], msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.mark.parametrize("level", ["token", "sequence_token", "sequence"])
def test_ratio_metric_shape_at_t1(tail, level):
    """``ratio`` is per token ``(B, G, T)`` (token, sequence_token levels) or per sequence ``(B, G)``,
    whatever T, T = 1 included."""
    d = _batch(2, 3, 1, 11, seed=3)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.9, 0.4]], dtype=torch.float64, device=DEVICE)
    with tail():
        _, metrics = gspo_kernels.policy_loss(
            d["x"],
            d["y"],
            "group_norm",
            rewards=rewards,
            old_logprobs=d["old"],
            loss_type="grpo",
            importance_sampling_level=level,
        )
    want = (2, 3) if level == "sequence" else (2, 3, 1)
    assert metrics["ratio"].shape == want and metrics["advantage"].shape == (2, 3)
    with tail():
        _, metrics = gspo_kernels.grpo_loss(d["x"], d["y"], rewards, old_logprobs=d["old"])
    assert metrics["ratio"].shape == (2, 3, 1)
    lp = naive_token_logprobs(d["x"], d["y"], 1.0, torch.float64)
    torch.testing.assert_close(metrics["ratio"], torch.exp(lp - d["old"]), **TOLERANCE[torch.float64]["value"])


# ---------------------------------------------------------------- dr_grpo's divisor
def test_dr_grpo_divides_by_max_completion_length_as_trl(tail):
    """TRL's dr_grpo: ``sum m l / (N * max_completion_length)``, with max_completion_length != T."""
    trl_oracle = pytest.importorskip("reference.trl_oracle")
    d = _batch(2, 3, 5, 13, seed=4)
    d = {k: v.reshape(6, *v.shape[2:]) for k, v in d.items()}
    mask = torch.arange(5, device=DEVICE) < torch.tensor([5, 3, 0, 4, 1, 5], device=DEVICE)[:, None]
    adv = torch.tensor([1.3, -0.9, 0.4, -0.6, 0.7, 2.1], dtype=torch.float64, device=DEVICE)
    mcl = 12
    x_ref = d["x"].clone().requires_grad_(True)
    lp = torch.where(mask, naive_token_logprobs(x_ref, d["y"], TAU, torch.float64), 0)
    ent = torch.where(mask, naive_token_entropy(x_ref, TAU, torch.float64), 0)
    want_loss, _ = trl_oracle.trl_compute_loss(
        lp,
        ent,
        mask.long(),
        adv,
        old_per_token_logps=d["old"],
        temperature=TAU,
        loss_type="dr_grpo",
        max_completion_length=mcl,
    )
    (want_grad,) = torch.autograd.grad(want_loss, x_ref)
    x = d["x"].clone().requires_grad_(True)
    with tail():
        loss, metrics = gspo_kernels.policy_loss(
            x, d["y"], adv, mask, old_logprobs=d["old"], temperature=TAU, loss_type="dr_grpo", max_completion_length=mcl
        )
    (grad,) = torch.autograd.grad(loss, x)
    tol = TOLERANCE[torch.float64]
    torch.testing.assert_close(loss, want_loss, **tol["value"])
    torch.testing.assert_close(grad, want_grad, **tol["grad"])
    torch.testing.assert_close(metrics["policy_loss"], want_loss.detach(), **tol["value"])
