"""policy_loss against the trainers it names.

TRL: for every ``loss_type`` x ``importance_sampling_level`` that TRL 1.16 accepts, with
two-sided clipping, the bias-corrected KL, the off-policy sequence mask, the
high-entropy token mask and each rollout-correction mode, ``policy_loss`` on the
logits equals TRL's own ``GRPOTrainer._compute_loss`` (the installed package, run
by reference/trl_oracle.py) on per-token log-probs of the same logits: value,
gradient w.r.t. the logits, and TRL's logged metrics. Fresh random inputs with an
empty sequence and a sequence with a hole in its mask. On both CPU backends: the Triton
kernels in the interpreter (whose loss tail is the fused one, losses/tail/) and the
chunked PyTorch path (the torch composition, losses/core.py).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import POLICY_VARIANTS as VARIANTS
from conftest import TOLERANCE
from conftest import TRL_LOSS_TYPES as LOSS_TYPES

import gspo_kernels
from reference import naive_token_entropy, naive_token_logprobs

trl_oracle = pytest.importorskip("reference.trl_oracle")

# (N, T, V): 6 sequences of 7 tokens; V = 19 (odd: no vector-width alignment)
N, T, V = 6, 7, 19
TAU = 0.9
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=g) * 1.5).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, (N, T), generator=g).to(DEVICE)
    lengths = torch.tensor([T, 3, 0, T - 1, 1, 5])
    mask = torch.arange(T) < lengths[:, None]
    mask[0, 2] = False  # a hole inside a sequence
    mask = mask.to(DEVICE)
    with torch.no_grad():
        lp = naive_token_logprobs(logits.double(), tokens, TAU, torch.float64)
    # old: per-sequence offsets plus token noise, so that both clip sides and the off-policy mask trigger
    old = (
        lp
        + 0.4 * torch.randn(N, 1, generator=g, dtype=torch.float64).to(DEVICE)
        + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64).to(DEVICE)
    )
    ref = lp + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64).to(DEVICE)
    sampling = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64).to(DEVICE)
    sampling[3, 1] = float("nan")  # a token the rollout engine could not score
    adv = torch.tensor([1.3, -0.9, 0.4, -0.6, 0.0, 2.1], dtype=torch.float64).to(DEVICE)
    return dict(logits=logits, tokens=tokens, mask=mask, old=old, ref=ref, sampling=sampling, adv=adv)


TRL_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "kl",
    "entropy",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
    "policy_loss",
)


def _trl(d, config, variant):
    """TRL's loss and metrics, and its gradient w.r.t. float64 logits."""
    x = d["logits"].detach().double().requires_grad_(True)
    lp = torch.where(d["mask"], naive_token_logprobs(x, d["tokens"], TAU, torch.float64), 0)
    ent = torch.where(d["mask"], naive_token_entropy(x, TAU, torch.float64), 0)
    # TRL's entropies are fp32 for fp32 logits; its high-entropy quantile is taken in fp32 and
    # compared with them: round them the same way, so that a token at the threshold is kept alike
    ent = ent.float().double()
    kw = dict(old_per_token_logps=d["old"], ref_per_token_logps=d["ref"] if config.get("beta") else None)
    cfg = {k: v for k, v in config.items() if not k.startswith("vllm_")}
    mode = config.get("vllm_importance_sampling_mode")
    if mode is not None:
        kw["importance_sampling_ratio"] = trl_oracle.trl_importance_sampling_ratio(
            d["old"],
            d["sampling"],
            d["mask"].long(),
            mode,
            config.get("vllm_importance_sampling_clip_min"),
            config.get("vllm_importance_sampling_clip_max"),
        )
    if "off_policy_mask_threshold" in config:
        kw["sampling_per_token_logps"] = d["sampling"]
    loss, metrics = trl_oracle.trl_compute_loss(
        lp, ent, d["mask"].long(), d["adv"], temperature=TAU, max_completion_length=T, **kw, **cfg
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _ours(d, config):
    x = d["logits"].detach().requires_grad_(True)
    kw = dict(old_logprobs=d["old"], ref_logprobs=d["ref"] if config.get("beta") else None)
    if "vllm_importance_sampling_mode" in config or "off_policy_mask_threshold" in config:
        kw["sampling_logprobs"] = d["sampling"]
    loss, metrics = gspo_kernels.policy_loss(
        x, d["tokens"], d["adv"], d["mask"], temperature=TAU, max_completion_length=T, **kw, **config
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _compare(d, config, variant, dtype):
    tol = TOLERANCE[dtype]
    want_loss, want_metrics, want_grad = _trl(d, config, variant)
    loss, metrics, grad = _ours(d, config)
    torch.testing.assert_close(loss.double(), want_loss, **tol["value"], msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(grad.double(), want_grad, **tol["grad"], msg=lambda m: f"grad: {m}")
    assert set(want_metrics) - {"entropy_coef"} <= set(metrics), set(want_metrics) - set(metrics)
    for name in TRL_METRICS:
        if name in want_metrics:
            torch.testing.assert_close(
                float(metrics[name]), float(want_metrics[name]), **tol["value"], msg=lambda m: f"metric {name}: {m}"
            )
    return metrics


def _valid(loss_type, level, variant):
    if loss_type == "vespo" and variant.startswith("sequence_"):
        return False  # TRL refuses VESPO with a sequence-level rollout correction (so do we, tested below)
    return not (variant == "delta" and loss_type in ("cispo", "sapo", "vespo"))  # delta is PPO-clip only


CASES = [
    (lt, lvl, var) for lt in LOSS_TYPES for lvl in ("token", "sequence") for var in VARIANTS if _valid(lt, lvl, var)
]


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Both CPU backends against TRL: the Triton kernels in the interpreter (with the fused loss
    tail) and the chunked PyTorch path (with the torch composition). On a GPU, the Triton path."""
    from gspo_kernels import _ops

    if DEVICE == "cuda" and request.param == "torch":
        pytest.skip("CUDA tensors always take the Triton path")
    if DEVICE == "cpu" and request.param == "triton" and _ops.CPU_BACKEND != "triton":
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET unset at import)")  # set by conftest
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("loss_type,level,variant", CASES)
def test_equals_trl_fp32(loss_type, level, variant, backend):
    d = _batch(torch.float32, seed=zlib.crc32(f"{loss_type}-{level}-{variant}".encode()) % 1000)
    config = dict(loss_type=loss_type, importance_sampling_level=level, **VARIANTS[variant])
    _compare(d, config, variant, torch.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_equals_trl_bf16(loss_type, level, backend):
    # bf16 logits: the kernel accumulates in fp32 and writes a bf16 gradient (one rounding)
    d = _batch(torch.bfloat16, seed=5)
    config = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05)
    _compare(d, config, "kl_bias_corrected", torch.bfloat16)


def test_precomputed_importance_sampling_ratio_equals_mode():
    # TRL hands the loss a ratio computed at generation time; passing it equals naming the mode.
    d = _batch(torch.float32, seed=11)
    cfg = dict(loss_type="grpo", importance_sampling_level="sequence")
    mode = dict(
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_min=0.7,
        vllm_importance_sampling_clip_max=1.3,
    )
    l1, m1 = gspo_kernels.policy_loss(
        d["logits"],
        d["tokens"],
        d["adv"],
        d["mask"],
        old_logprobs=d["old"],
        sampling_logprobs=d["sampling"],
        **cfg,
        **mode,
    )
    r = gspo_kernels.rollout_correction(d["old"], d["sampling"], d["mask"], "token_mask", 0.7, 1.3)
    want = trl_oracle.trl_importance_sampling_ratio(d["old"], d["sampling"], d["mask"].long(), "token_mask", 0.7, 1.3)
    torch.testing.assert_close(r, want, atol=0, rtol=0)
    l2, m2 = gspo_kernels.policy_loss(
        d["logits"], d["tokens"], d["adv"], d["mask"], old_logprobs=d["old"], importance_sampling_ratio=r, **cfg
    )
    assert torch.equal(l1, l2)
    valid_r = r[d["mask"]].float()  # metrics come in the log-probs' dtype
    assert float(m1["sampling/importance_sampling_ratio/min"]) == float(valid_r.min())
    assert float(m1["sampling/importance_sampling_ratio/max"]) == float(valid_r.max())
    torch.testing.assert_close(m1["sampling/importance_sampling_ratio/mean"], valid_r.mean())


def test_vespo_refuses_sequence_correction():
    d = _batch(torch.float32, seed=12)
    with pytest.raises(ValueError, match="loss_type='vespo' needs a token-level vllm_importance_sampling_mode"):
        gspo_kernels.policy_loss(
            d["logits"],
            d["tokens"],
            d["adv"],
            d["mask"],
            old_logprobs=d["old"],
            sampling_logprobs=d["sampling"],
            loss_type="vespo",
            vllm_importance_sampling_mode="sequence_mask",
        )


def test_without_old_logprobs_the_denominator_is_the_detached_policy():
    # as TRL: old = sg[lp], so every token weight is exactly 1 and the gradient is A's
    d = _batch(torch.float32, seed=13)
    config = dict(loss_type="dapo", importance_sampling_level="token")
    x = d["logits"].detach().double().requires_grad_(True)
    lp = torch.where(d["mask"], naive_token_logprobs(x, d["tokens"], TAU, torch.float64), 0)
    ent = torch.where(d["mask"], naive_token_entropy(x, TAU, torch.float64), 0)
    want, _ = trl_oracle.trl_compute_loss(lp, ent, d["mask"].long(), d["adv"], **config)
    (want_g,) = torch.autograd.grad(want, x)
    y = d["logits"].detach().requires_grad_(True)
    loss, m = gspo_kernels.policy_loss(y, d["tokens"], d["adv"], d["mask"], temperature=TAU, **config)
    assert torch.all(m["ratio"] == 1.0)
    torch.testing.assert_close(loss.double(), want, **TOLERANCE[torch.float32]["value"])
    torch.testing.assert_close(torch.autograd.grad(loss, y)[0].double(), want_g, **TOLERANCE[torch.float32]["grad"])
