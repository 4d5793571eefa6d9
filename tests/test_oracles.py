"""The two oracles against hand computations, in float64:

* reference/trl_oracle.py runs TRL's own GRPOTrainer._compute_loss on given per-token
  log-probs; checked on GRPO (token level, with entropy bonus) and DAPO (sequence level),
  values, logged metrics and gradients;
* reference/verl_losses.py (transcription of verl 0.9.1): vanilla PPO with dual clip on a
  2x3 example worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference import verl_losses

DT = torch.float64


def _batch(seed=0, B=4, T=5):
    """Per-token log-probs far enough from the old ones that both clip sides trigger; one
    completion is empty, one short."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=DT) * 2 - 0.05
    old = lp + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    lengths = torch.tensor([T, 2, 0, T - 1])
    mask = (torch.arange(T) < lengths[:, None]).long()
    adv = torch.tensor([1.3, -0.9, 0.4, -0.6], dtype=DT)
    ent = torch.rand(B, T, generator=g, dtype=DT) * 3
    return lp, old, mask, adv, ent


@pytest.fixture(scope="module")
def trl_oracle():
    pytest.importorskip("trl")
    from reference import trl_oracle

    return trl_oracle


def test_trl_grpo_token_level_matches_hand(trl_oracle):
    lp, old, mask, adv, ent = _batch()
    eps_low, eps_high, coef = 0.2, 0.28, 0.05
    lp_t, ent_t = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, metrics = trl_oracle.trl_compute_loss(
        lp_t,
        ent_t,
        mask,
        adv,
        old_per_token_logps=old,
        loss_type="grpo",
        importance_sampling_level="token",
        epsilon=eps_low,
        epsilon_high=eps_high,
        entropy_coef=coef,
    )

    lp_h, ent_h = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    m = mask.to(DT)
    ratio = torch.exp(lp_h - old)
    A = adv[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    policy = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    hand = policy - coef * (ent_h * m).sum() / m.sum()

    torch.testing.assert_close(loss, hand, rtol=1e-13, atol=1e-14)
    g_lp, g_ent = torch.autograd.grad(loss, (lp_t, ent_t))
    h_lp, h_ent = torch.autograd.grad(hand, (lp_h, ent_h))
    torch.testing.assert_close(g_lp, h_lp, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_ent, h_ent, rtol=1e-13, atol=1e-15)
    assert g_lp[mask == 0].abs().max() == 0 and g_lp.abs().max() > 0

    low = (ratio < 1 - eps_low) & (A < 0)
    high = (ratio > 1 + eps_high) & (A > 0)
    assert low[mask.bool()].any() and high[mask.bool()].any()  # both clip sides exercised
    assert metrics["clip_ratio/low_mean"] == pytest.approx(((low * m).sum() / m.sum()).item(), abs=1e-7)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(((high * m).sum() / m.sum()).item(), abs=1e-7)
    assert metrics["clip_ratio/region_mean"] == pytest.approx((((low | high) * m).sum() / m.sum()).item(), abs=1e-7)
    assert metrics["policy_loss"] == pytest.approx(policy.item(), rel=1e-12)
    assert metrics["entropy"] == pytest.approx(((ent * m).sum() / m.sum()).item(), rel=1e-12)


@pytest.mark.parametrize("num_items", [None, 23])
def test_trl_dapo_sequence_level_matches_hand(trl_oracle, num_items):
    lp, old, mask, adv, ent = _batch(seed=1)
    eps = 3e-2
    lp_t = lp.clone().requires_grad_()
    loss, metrics = trl_oracle.trl_compute_loss(
        lp_t,
        ent,
        mask,
        adv,
        old_per_token_logps=old,
        loss_type="dapo",
        importance_sampling_level="sequence",
        epsilon=eps,
        num_items_in_batch=num_items,
    )

    lp_h = lp.clone().requires_grad_()
    m = mask.to(DT)
    lengths = m.sum(-1)
    log_w = ((lp_h - old) * m).sum(-1) / lengths.clamp(min=1)
    w = torch.exp(log_w)
    seq_loss = -torch.min(w * adv, w.clamp(1 - eps, 1 + eps) * adv)  # one value per sequence
    n = m.sum() if num_items is None else num_items
    hand = (seq_loss * lengths).sum() / n  # the (B, 1) loss is broadcast over each sequence's tokens

    torch.testing.assert_close(loss, hand, rtol=1e-13, atol=1e-14)
    g = torch.autograd.grad(loss, lp_t)[0]
    torch.testing.assert_close(g, torch.autograd.grad(hand, lp_h)[0], rtol=1e-13, atol=1e-15)
    assert g[mask == 0].abs().max() == 0
    clipped = ((w < 1 - eps) & (adv < 0)) | ((w > 1 + eps) & (adv > 0))
    nonempty = lengths > 0
    assert clipped[nonempty].any() and (~clipped[nonempty]).any()
    # sequence level: TRL averages clip indicators over sequences (empty ones included)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(clipped.double().mean().item(), abs=1e-7)


def test_trl_importance_sampling_ratio_sequence_mask(trl_oracle):
    lp, old, mask, adv, ent = _batch(seed=2)
    sampling = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    ratio = trl_oracle.trl_importance_sampling_ratio(old, sampling, mask, "sequence_mask", None, 1.5)
    seq = torch.exp(((old - sampling) * mask).sum(-1, keepdim=True))
    expected = torch.where(seq > 1.5, torch.zeros_like(seq), seq)
    assert ratio.shape == (4, 1)
    torch.testing.assert_close(ratio, expected, rtol=1e-14, atol=0)
    # fed back to the loss, TRL multiplies it into the per-token loss
    lp_t = lp.clone().requires_grad_()
    loss, _ = trl_oracle.trl_compute_loss(
        lp_t, ent, mask, adv, old_per_token_logps=old, loss_type="bnpo", importance_sampling_ratio=ratio
    )
    r = torch.exp(lp - old)
    A = adv[:, None]
    per_token = -torch.min(r * A, r.clamp(0.8, 1.2) * A) * ratio
    torch.testing.assert_close(loss, (per_token * mask).sum() / mask.sum(), rtol=1e-13, atol=1e-14)


def test_verl_vanilla_dual_clip_2x3_by_hand():
    # ratios r and advantages chosen so each branch of verl's PPO loss is taken once:
    # row 0 (A = +1): r = 1.5 clipped to 1.2; r = 0.5 and 1.0 unclipped.
    # row 1 (A = -1): r = 4 dual-clipped to clip_ratio_c = 3; r = 0.5 clipped to 0.8; r = 1.1 is padding.
    old_p = torch.tensor([[0.2, 0.4, 0.3], [0.1, 0.5, 0.2]], dtype=DT)
    r = torch.tensor([[1.5, 0.5, 1.0], [4.0, 0.5, 1.1]], dtype=DT)
    old = old_p.log()
    log_prob = (old_p * r).log().requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=DT)

    loss, metrics = verl_losses.policy_loss_vanilla(
        old,
        log_prob,
        adv,
        mask,
        "token-mean",
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        clip_ratio_c=3.0,
    )
    # per-token losses [[-1.2, -0.5, -1.0], [3.0, 0.8, (pad)]]
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 3.0 + 0.8) / 5, rel=1e-13)
    # only the unclipped tokens (0, 1) and (0, 2) carry gradient: d(-A r)/d lp = -A r, / 5 tokens
    grad = torch.autograd.grad(loss, log_prob)[0]
    torch.testing.assert_close(
        grad, torch.tensor([[0.0, -0.1, -0.2], [0.0, 0.0, 0.0]], dtype=DT), rtol=1e-13, atol=1e-15
    )
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 5, rel=1e-7)  # (0, 0) and (1, 1)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 5, rel=1e-7)  # (1, 0)
    log_r = [math.log(x) for x in (1.5, 0.5, 1.0, 4.0, 0.5)]
    assert metrics["actor/ppo_kl"] == pytest.approx(-sum(log_r) / 5, rel=1e-7)

    # seq-mean-token-mean: mean over rows of each row's token mean
    loss_seq, _ = verl_losses.policy_loss_vanilla(old, log_prob, adv, mask, "seq-mean-token-mean")
    assert loss_seq.item() == pytest.approx(((-1.2 - 0.5 - 1.0) / 3 + (3.0 + 0.8) / 2) / 2, rel=1e-7)
    # without the dual clip (clip_ratio_c huge) token (1, 0) costs max(-A r, -A clip(r)) = max(4, 1.2) = 4
    loss_nodc, _ = verl_losses.policy_loss_vanilla(old, log_prob, adv, mask, clip_ratio_c=1e9)
    assert loss_nodc.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 4.0 + 0.8) / 5, rel=1e-13)
