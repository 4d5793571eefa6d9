"""policy_loss with verl's loss types against verl 0.9.1 (reference/verl_losses.py, a transcription).

For every verl loss type x each verl ``loss_agg_mode`` x per-sequence / per-token advantages,
with the KL loss (low_var_kl or k1), the entropy bonus and rollout IS weights (none, token TIS,
token IcePop, sequence TIS; the transcription's rollout_correction_weights passed as
``importance_sampling_ratio``), ``policy_loss`` on the logits, its options given by
``options_from_verl`` of a verl actor config, equals verl's actor loss (``ppo_loss``: policy loss
+ KL loss - entropy bonus) on per-token log-probs of the same logits: value, gradient w.r.t. the
logits and verl's metrics. Fresh random inputs with an empty sequence and a hole in a mask.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import TOLERANCE

import gspo_kernels
from gspo_kernels.losses.objectives import kl_tokens
from gspo_kernels.losses.options import OPTION_NAMES, VERL_LOSS_TYPES, LossOptions
from gspo_kernels.losses.verl import VERL_CONFIG_KEYS, VERL_KL_TYPES, VERL_LOSS_MODES, options_from_verl, verl_aggregate
from reference import naive_token_entropy, naive_token_logprobs, verl_losses

N, T, V = 6, 7, 19
TAU = 0.9
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AGG_MODES = verl_losses.LOSS_AGG_MODES
LOSS_MODE = {ours: theirs for theirs, ours in VERL_LOSS_MODES.items()}

# verl actor-config keys per loss type, chosen so that every clip / mask branch is taken
CONFIGS = {
    "vanilla": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.5),
    "verl_gspo": dict(clip_ratio_low=0.1, clip_ratio_high=0.15),
    "verl_sapo": dict(tau_pos=1.2, tau_neg=0.9),
    "verl_cispo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
    "gpg": dict(),
    "clip_cov": dict(
        clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=dict(clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=5.0)
    ),
    "kl_cov": dict(policy_loss=dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)),
    "geo_mean": dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
    "dro": dict(policy_loss=dict(dro_beta=0.3)),
    "dppo_tv": dict(clip_ratio_low=0.02, clip_ratio_high=0.03, clip_ratio_c=1.5),
    "dppo_kl": dict(clip_ratio_low=0.0005, clip_ratio_high=0.001, clip_ratio_c=1.5),
}
# (kl_loss_type, rollout_is, rollout_is_threshold), rotated over the cases of each loss type
VARIANTS = [
    ("low_var_kl", None, None),
    ("kl", "token", 1.2),
    ("low_var_kl", "token", "0.8_1.25"),
    ("k1", "sequence", 1.5),
]


def _batch(dtype, seed, per_token):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 1.5).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, (N, T), generator=g).to(DEVICE)
    lengths = torch.tensor([T, 3, 0, T - 1, 1, 5])
    mask = torch.arange(T) < lengths[:, None]
    mask[0, 2] = False  # a hole inside a sequence
    mask = mask.to(DEVICE)
    with torch.no_grad():
        lp = naive_token_logprobs(logits.double(), tokens, TAU, torch.float64)
    f64 = dict(generator=g, dtype=torch.float64)
    old = (lp + 0.4 * torch.randn(N, 1, **f64).to(DEVICE) + 0.3 * torch.randn(N, T, **f64).to(DEVICE)).clamp(max=-0.01)
    ref = lp + 0.2 * torch.randn(N, T, **f64).to(DEVICE)
    sampling = old + 0.3 * torch.randn(N, T, **f64).to(DEVICE)
    if per_token:
        adv = torch.where(mask, torch.randn(N, T, **f64).to(DEVICE), 0)
    else:
        adv = torch.tensor([1.3, -0.9, 0.4, -0.6, 0.0, 2.1], dtype=torch.float64).to(DEVICE)
    return dict(logits=logits, tokens=tokens, mask=mask, old=old, ref=ref, sampling=sampling, adv=adv)


def _verl_config(loss_type, agg, kl_type, **extra):
    cfg = {k: v for k, v in CONFIGS[loss_type].items() if k != "policy_loss"}
    policy = {**CONFIGS[loss_type].get("policy_loss", {}), "loss_mode": LOSS_MODE[loss_type]}
    return dict(
        cfg,
        policy_loss=policy,
        loss_agg_mode=agg,
        entropy_coeff=0.01,
        use_kl_loss=True,
        kl_loss_coef=0.07,
        kl_loss_type=kl_type,
        **extra,
    )


def _is_weights(d, rollout_is, threshold):
    if rollout_is is None:
        return None
    return verl_losses.rollout_correction_weights(d["old"] - d["sampling"], d["mask"], rollout_is, threshold)


def _verl(d, cfg, weights, batch_num_tokens=None):
    """verl's actor loss and metrics, and its gradient w.r.t. float64 logits."""
    x = d["logits"].detach().double().requires_grad_(True)
    lp = torch.where(d["mask"], naive_token_logprobs(x, d["tokens"], TAU, torch.float64), 0)
    ent = torch.where(d["mask"], naive_token_entropy(x, TAU, torch.float64), 0)
    adv = d["adv"] if d["adv"].dim() == 2 else d["adv"][:, None].expand(N, T)
    kw = {k: v for k, v in cfg.items() if k not in ("policy_loss", "use_kl_loss", "kl_loss_coef", "kl_loss_type")}
    kw.update({k: v for k, v in cfg["policy_loss"].items() if k != "loss_mode"})
    if batch_num_tokens is not None:
        kw["batch_num_tokens"] = batch_num_tokens
    torch.manual_seed(1234)  # clip_cov's torch.randperm
    loss, metrics = verl_losses.verl_actor_loss(
        d["old"],
        lp,
        adv,
        d["mask"],
        loss_mode=cfg["policy_loss"]["loss_mode"],
        entropy=ent,
        ref_log_prob=d["ref"],
        use_kl_loss=cfg["use_kl_loss"],
        kl_loss_coef=cfg["kl_loss_coef"],
        kl_loss_type=cfg["kl_loss_type"],
        rollout_is_weights=weights,
        **kw,
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _ours(d, options, **kw):
    x = d["logits"].detach().requires_grad_(True)
    torch.manual_seed(1234)
    loss, metrics = gspo_kernels.policy_loss(
        x,
        d["tokens"],
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        ref_logprobs=d["ref"],
        temperature=TAU,
        **kw,
        **options,
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _compare(d, cfg, weights, dtype, **kw):
    tol = dict(TOLERANCE[dtype])
    # token-sum aggregations add up to sum(m) (per sequence: T) per-token errors instead of averaging them
    terms = {"token-sum": int(d["mask"].sum()), "seq-mean-token-sum": T}.get(cfg["loss_agg_mode"], 1)
    tol["value"] = dict(tol["value"], atol=tol["value"]["atol"] * terms)
    want_loss, want_metrics, want_grad = _verl(d, cfg, weights, kw.get("num_items_in_batch"))
    loss, metrics, grad = _ours(d, options_from_verl(cfg), importance_sampling_ratio=weights, **kw)
    torch.testing.assert_close(loss.double(), want_loss, **tol["value"], msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(grad.double(), want_grad, **tol["grad"], msg=lambda m: f"grad: {m}")
    assert {"ratio", "advantage", "seq_logprobs", "policy_loss", "kl", "entropy"} <= set(metrics)
    assert set(want_metrics) <= set(metrics), set(want_metrics) - set(metrics)
    # our policy_loss metric: the loss before the entropy bonus (verl's pg loss + its KL loss)
    torch.testing.assert_close(
        float(metrics["policy_loss"]),
        want_metrics["actor/pg_loss"] + cfg["kl_loss_coef"] * want_metrics["kl_loss"],
        **tol["value"],
    )
    for name, want in want_metrics.items():
        torch.testing.assert_close(
            float(metrics[name]), float(want), **tol["value"], msg=lambda m: f"metric {name}: {m}"
        )
    return metrics


CASES = [
    (lt, agg, per_token, VARIANTS[(2 * i + per_token) % len(VARIANTS)])
    for lt in VERL_LOSS_TYPES
    for i, agg in enumerate(AGG_MODES)
    for per_token in (False, True)
]


@pytest.mark.parametrize(
    "loss_type,agg,per_token,variant",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{'tok' if c[2] else 'seq'}-{c[3][0]}-{c[3][1]}" for c in CASES],
)
def test_equals_verl_fp32(loss_type, agg, per_token, variant):
    kl_type, rollout_is, threshold = variant
    d = _batch(torch.float32, zlib.crc32(f"{loss_type}-{agg}-{per_token}".encode()) % 1000, per_token)
    metrics = _compare(d, _verl_config(loss_type, agg, kl_type), _is_weights(d, rollout_is, threshold), torch.float32)
    if loss_type in ("clip_cov", "dppo_tv", "dppo_kl", "vanilla", "verl_gspo", "verl_cispo"):
        assert float(metrics["actor/pg_clipfrac"]) > 0, "no token was clipped / dropped: the case tests too little"


@pytest.mark.parametrize("loss_type", VERL_LOSS_TYPES)
def test_equals_verl_bf16(loss_type):
    d = _batch(torch.bfloat16, seed=5, per_token=False)
    _compare(d, _verl_config(loss_type, "token-mean", "low_var_kl"), _is_weights(d, "token", 1.2), torch.bfloat16)


def test_global_token_count_and_scale_factor():
    # verl's global_batch_info: batch_num_tokens (our num_items_in_batch) and loss_scale_factor
    d = _batch(torch.float32, seed=7, per_token=False)
    _compare(d, _verl_config("vanilla", "token-mean", "k1"), None, torch.float32, num_items_in_batch=40)
    _compare(d, _verl_config("dro", "seq-mean-token-sum-norm", "k1", loss_scale_factor=5), None, torch.float32)


@pytest.mark.parametrize("rollout_is,threshold", [("token", 1.2), ("token", "0.8_1.25"), ("sequence", 1.5)])
def test_rollout_correction_mode_equals_verl_weights(rollout_is, threshold):
    # verl's rollout_is / rollout_is_threshold as vllm_importance_sampling_mode on sampling_logprobs
    d = _batch(torch.float32, seed=8, per_token=False)
    cfg = _verl_config("vanilla", "token-mean", "low_var_kl")
    want, _, want_grad = _verl(d, cfg, _is_weights(d, rollout_is, threshold))
    options = options_from_verl(cfg, dict(rollout_is=rollout_is, rollout_is_threshold=threshold))
    loss, metrics, grad = _ours(d, options, sampling_logprobs=d["sampling"])
    torch.testing.assert_close(loss.double(), want, **TOLERANCE[torch.float32]["value"])
    torch.testing.assert_close(grad.double(), want_grad, **TOLERANCE[torch.float32]["grad"])
    assert "sampling/importance_sampling_ratio/mean" in metrics


@pytest.mark.parametrize("ours,theirs", sorted(VERL_KL_TYPES.items(), key=lambda kv: kv[1]))
def test_kl_estimators_equal_verl(theirs, ours):
    # including |ref - lp| > 20 (low_var_kl's inner clamp) and k3 > 10 (its outer clamp)
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(64, generator=g, dtype=torch.float64) * 3 - 2
    lp = torch.cat([lp, torch.tensor([-30.0, -1.0, -25.0, -0.5], dtype=torch.float64)]).requires_grad_(True)
    ref = torch.cat(
        [
            lp.detach()[:64] + torch.randn(64, generator=g, dtype=torch.float64) * 2,
            torch.tensor([-1.0, -30.0, -2.0, -14.0], dtype=torch.float64),
        ]
    )
    mine = kl_tokens(lp, ref, theirs)
    want = verl_losses.kl_penalty(lp, ref, theirs)
    torch.testing.assert_close(mine, want, atol=1e-12, rtol=1e-12)
    (ga,) = torch.autograd.grad(mine.sum(), lp)
    (gb,) = torch.autograd.grad(want.sum(), lp)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_equals_agg_loss(mode):
    g = torch.Generator().manual_seed(4)
    loss_mat = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 8, generator=g) > 0.4
    mask[1] = False  # an empty sequence
    for kw, ours in [
        ({}, {}),
        (dict(batch_num_tokens=30, loss_scale_factor=6), dict(num_tokens=torch.tensor(30.0), loss_scale_factor=6)),
    ]:
        want = verl_losses.agg_loss(loss_mat, mask, mode, **kw)
        torch.testing.assert_close(verl_aggregate(loss_mat, mask, mode, **ours), want, atol=1e-14, rtol=1e-14)


def test_options_from_verl_defaults_and_mapping():
    assert set(VERL_CONFIG_KEYS.values()) <= OPTION_NAMES
    assert set(VERL_LOSS_MODES.values()) == set(VERL_LOSS_TYPES)
    assert options_from_verl({}) == dict(
        loss_type="vanilla",
        epsilon=0.2,
        epsilon_high=0.2,
        clip_ratio_c=3.0,
        loss_agg_mode="token-mean",
        entropy_coef=0.0,
        beta=0.0,
        kl="low_var_kl",
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        clip_cov_ratio=0.0002,
        clip_cov_lb=1.0,
        clip_cov_ub=5.0,
        kl_cov_ratio=0.0002,
        ppo_kl_coef=0.1,
        dro_beta=None,
    )
    cfg = dict(
        clip_ratio=0.25,
        clip_ratio_low=None,
        clip_ratio_high=0.3,
        loss_agg_mode="seq-mean-token-sum-norm",
        loss_scale_factor=4096,
        entropy_coeff=0.001,
        use_kl_loss=True,
        kl_loss_coef=0.05,
        kl_loss_type="mse",
        tau_pos=0.8,
        ppo_mini_batch_size=64,
        optim=dict(lr=1e-6),  # not loss keys: ignored
        policy_loss=dict(loss_mode="gspo", ppo_kl_coef=0.2),
    )
    opts = options_from_verl(cfg)
    assert opts["loss_type"] == "verl_gspo" and opts["epsilon"] == 0.25 and opts["epsilon_high"] == 0.3
    assert opts["beta"] == 0.05 and opts["kl"] == "k2" and opts["entropy_coef"] == 0.001
    assert opts["max_completion_length"] == 4096 and opts["sapo_temperature_pos"] == 0.8
    assert opts["ppo_kl_coef"] == 0.2 and "ppo_mini_batch_size" not in opts
    assert options_from_verl({"policy_loss.loss_mode": "kl_cov"})["loss_type"] == "kl_cov"  # flat keys
    assert options_from_verl(dict(clip_ratio=0.25))["epsilon"] == 0.2  # only an explicit None falls back
    assert options_from_verl(dict(kl_loss_type="k3"))["kl"] == "low_var_kl"
    assert options_from_verl(dict(kl_loss_type="kl"))["kl"] == "k1"
    LossOptions(**opts)  # a valid set of options
    rc = options_from_verl({}, dict(rollout_is="token", rollout_is_threshold="0.5_2.0"))
    assert (
        rc["vllm_importance_sampling_mode"],
        rc["vllm_importance_sampling_clip_min"],
        rc["vllm_importance_sampling_clip_max"],
    ) == ("token_mask", 0.5, 2.0)
    rc = options_from_verl({}, dict(rollout_is="sequence", rollout_is_threshold=3))
    assert (
        rc["vllm_importance_sampling_mode"],
        rc["vllm_importance_sampling_clip_min"],
        rc["vllm_importance_sampling_clip_max"],
    ) == ("sequence_truncate", None, 3.0)


@pytest.mark.parametrize(
    "cfg,rc,match",
    [
        (dict(policy_loss=dict(loss_mode="bypass_mode")), None, "bypass_mode' is not supported"),
        (dict(policy_loss=dict(loss_mode="ppo")), None, "policy_loss.loss_mode must be one of"),
        (dict(kl_loss_type="low_var_kl+"), None, "straight-through"),
        (dict(loss_scale_factor=1.5), None, "loss_scale_factor must be a positive whole number"),
        ({}, dict(rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold=2.0), "rollout_rs"),
        ({}, dict(rollout_is="token", rollout_is_batch_normalize=True), "rollout_is_batch_normalize"),
    ],
)
def test_options_from_verl_refuses(cfg, rc, match):
    with pytest.raises(ValueError, match=match):
        options_from_verl(cfg, rc)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_type="bypass_mode"), "bypass_mode' is not supported"),
        (dict(loss_type="vanilla", delta=1.5), "delta is a TRL option"),
        (dict(loss_type="gpg", importance_sampling_level="sequence"), "verl_gspo"),
        (dict(loss_type="dro", dro_beta=0.1, off_policy_mask_threshold=0.1), "off_policy_mask_threshold is a TRL"),
        (dict(loss_type="vanilla", top_entropy_quantile=0.5), "top_entropy_quantile is a TRL"),
        (dict(loss_type="verl_sapo", loss_agg_mode="dr_grpo"), "loss_agg_mode must be one of"),
        (dict(loss_type="clip_cov", clip_cov_ratio=0.0), "clip_cov_ratio > 0"),
        (dict(loss_type="kl_cov", kl_cov_ratio=0.0), "kl_cov_ratio > 0"),
        (dict(loss_type="dro"), "needs dro_beta"),
    ],
)
def test_verl_options_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**kw)
