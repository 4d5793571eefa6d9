"""The fused loss tail (gspo_kernels/losses/tail/) against the torch
composition it replaces (losses/core.py, which stays the CPU path and the reference).

- Equality through the public loss: every TRL ``loss_type`` x level (token, sequence,
  sequence_token) x variant of tests/test_policy_loss.py (two-sided clip, KL with and
  without bias correction, off-policy and high-entropy masks, entropy bonus, each rollout
  correction mode) at fp32 logits, every loss type x level with all of those at once at
  bf16 logits (the tail sees fp32 log-probs either way: bf16 only changes the log-prob
  kernel and the gradient's rounding), and the options TRL's matrix lacks (advantages
  per token or from rewards, group_norm and contrast; each KL estimator; reference and
  detached denominators; dual clip; a given correction ratio per token or per sequence;
  num_items_in_batch; every aggregation; an overflowing weight at a zero advantage; T = 1;
  packed rows; fp64 logits): the loss, every
  metric (names, shapes, dtypes, values) and the gradient w.r.t. the logits, within the
  TOLERANCE table. Both sides run the same log-prob kernels, so only the tail differs.
- Derivatives: on hand-built per-token inputs (ties of torch.minimum, a zero advantage,
  weights past delta and past the clip range), the gradients w.r.t. the log-probs and the
  entropies equal autograd of the torch composition, in fp64 to 1e-12.
- Launch counts: one forward+backward on the Triton path (interpreter), device kernels
  counted (see :class:`CountKernels`), per phase, for one option set per objective: at
  most LAUNCH_BUDGET, and the same launches with the value checks on as off.
- Generated code: the three kernels compile for sm_80/90/100 with no local memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import POLICY_VARIANTS as VARIANTS
from conftest import TOLERANCE, rl_batch, torch_composition
from conftest import TRL_LOSS_TYPES as LOSS_TYPES
from torch.utils._python_dispatch import TorchDispatchMode

import gspo_kernels
from gspo_kernels import _ops
from gspo_kernels.losses import core
from gspo_kernels.losses.inputs import LossInputs
from gspo_kernels.losses.options import LossOptions
from gspo_kernels.losses.tail import autograd as tail_autograd
from gspo_kernels.losses.tail import launch as tail_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and _ops.CPU_BACKEND != "triton",
    reason="the fused tail runs on the Triton path (interpreter unset)",
)

# The option matrix of tests/test_policy_loss.py (VARIANTS, LOSS_TYPES: tests/conftest.py).
N, T, V = 6, 7, 19
TAU = 0.9
LEVELS = ("token", "sequence", "sequence_token")
ALL_AT_ONCE = dict(
    beta=0.07,
    kl="k3",
    off_policy_mask_threshold=0.05,
    top_entropy_quantile=0.6,
    entropy_coef=0.02,
    vllm_importance_sampling_mode="token_mask",
    vllm_importance_sampling_clip_min=0.7,
    vllm_importance_sampling_clip_max=1.3,
)


def _valid(loss_type, variant):
    if loss_type == "vespo" and variant.startswith("sequence_"):
        return False  # refused (a token-level correction only)
    return not (variant == "delta" and loss_type in ("cispo", "sapo", "vespo"))


def _batch(dtype, seed, n=N, t=T):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, V, generator=g) * 1.5).to(dtype)
    tokens = torch.randint(0, V, (n, t), generator=g)
    lengths = torch.tensor([t, 3, 0, t - 1, 1, 5][:n]).clamp(max=t)
    mask = torch.arange(t) < lengths[:, None]
    if t > 2:
        mask[0, 2] = False  # a hole inside a sequence
    lp = torch.log_softmax(logits.double() / TAU, -1).gather(-1, tokens[..., None])[..., 0]
    old = (
        lp
        + 0.4 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    )
    ref = lp + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    sampling = old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    sampling[min(3, n - 1), min(1, t - 1)] = float("nan")  # a token the rollout engine could not score
    adv = torch.tensor([1.3, -0.9, 0.4, -0.6, 0.0, 2.1][:n], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 2.0, 0.5][:n], dtype=torch.float64)
    d = dict(
        logits=logits,
        tokens=tokens,
        mask=mask,
        old=old,
        ref=ref,
        sampling=sampling,
        adv=adv,
        rewards=rewards,
        adv_tok=adv[:, None] + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64),
    )
    return {k: v.to(DEVICE) for k, v in d.items()}


def _call(d, config, extra=None):
    x = d["logits"].detach().requires_grad_(True)
    kw = dict(
        old_logprobs=d["old"],
        ref_logprobs=d["ref"] if config.get("beta") else None,
        sampling_logprobs=d["sampling"],
        temperature=TAU,
    )
    kw.update(extra or {})
    adv = kw.pop("advantages", d["adv"])
    config = {"max_completion_length": d["tokens"].shape[-1], **config}
    loss, metrics = gspo_kernels.policy_loss(x, d["tokens"], adv, kw.pop("mask", d["mask"]), **kw, **config)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _assert_same(d, config, dtype, extra=None):
    """The fused tail and the torch composition: loss, every metric, the logits' gradient."""
    tol = TOLERANCE[dtype]
    loss, metrics, grad = _call(d, config, extra)
    with torch_composition():
        want_loss, want_metrics, want_grad = _call(d, config, extra)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    torch.testing.assert_close(loss, want_loss, **tol["value"], msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(grad, want_grad, **tol["grad"], msg=lambda m: f"grad: {m}")
    assert list(metrics) == list(want_metrics)
    for name, want in want_metrics.items():
        got = metrics[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype)
        assert not got.requires_grad, name
        torch.testing.assert_close(got, want, **tol["value"], equal_nan=True, msg=lambda m: f"metric {name}: {m}")
    return metrics


TRL_CASES = [(lt, lvl, var) for lt in LOSS_TYPES for lvl in LEVELS for var in VARIANTS if _valid(lt, var)]


@pytest.mark.parametrize("loss_type,level,variant", TRL_CASES)
def test_fused_equals_torch_fp32(loss_type, level, variant):
    d = _batch(torch.float32, seed=len(loss_type) * 7 + LEVELS.index(level))
    _assert_same(d, dict(loss_type=loss_type, importance_sampling_level=level, **VARIANTS[variant]), torch.float32)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", LEVELS)
def test_fused_equals_torch_bf16(loss_type, level):
    d = _batch(torch.bfloat16, seed=5)
    _assert_same(d, dict(loss_type=loss_type, importance_sampling_level=level, **ALL_AT_ONCE), torch.bfloat16)


def _extras(d):
    """name -> (options, call keywords) beyond TRL's matrix."""
    n, t = d["tokens"].shape
    r = gspo_kernels.rollout_correction(
        d["old"], torch.nan_to_num(d["sampling"]), d["mask"], "token_truncate", 0.6, 1.4
    )
    overflow = d["old"].clone()
    overflow[4] -= 100.0  # log w = 100: exp overflows fp32 where the advantage is exactly 0 (guarded_exp)
    return {
        "overflow_zero_advantage": (dict(entropy_coef=0.05), dict(old_logprobs=overflow)),
        "adv_per_token": (dict(beta=0.05), dict(advantages=d["adv_tok"])),
        "group_norm": ({}, dict(advantages="group_norm", rewards=d["rewards"].reshape(2, 3), group_size=3)),
        "contrast": (
            dict(beta=0.05, off_policy_mask_threshold=0.05),
            dict(advantages="contrast", rewards=d["rewards"].reshape(2, 3), group_size=3),
        ),
        "k1": (dict(beta=0.1, kl="k1"), {}),
        "k2_bias": (dict(beta=0.1, kl="k2", use_bias_correction_kl=True), {}),
        "abs": (dict(beta=0.1, kl="abs", use_bias_correction_kl=False), {}),
        "low_var_kl_bias": (dict(beta=0.1, kl="low_var_kl"), {}),
        "kl_metric_only": (dict(beta=0.0), dict(ref_logprobs=d["ref"])),
        "denominator_ref": (dict(beta=0.05, denominator="ref"), {}),
        "detached": (dict(entropy_coef=0.1), dict(old_logprobs=None, sampling_logprobs=None)),
        "dual_clip": (dict(clip_ratio_c=1.5, epsilon=0.1), {}),
        "isr_per_token": (dict(beta=0.05), dict(importance_sampling_ratio=r)),
        "isr_per_sequence": (
            dict(off_policy_mask_threshold=0.0),
            dict(importance_sampling_ratio=r.mean(-1).clamp(0.6, 1.4)),
        ),
        "num_items": ({}, dict(num_items_in_batch=50)),
        "token_sum": (dict(loss_agg_mode="token-sum", entropy_coef=0.05), {}),
        "seq_sum_norm": (dict(loss_agg_mode="seq-mean-token-sum-norm", max_completion_length=11), {}),
        "token_mean": (dict(loss_agg_mode="token-mean", top_entropy_quantile=0.3), {}),
        "seq_mean": (dict(loss_agg_mode="seq-mean-token-mean", beta=0.05, kl="k1"), {}),
    }


EXTRA_NAMES = list(_extras(_batch(torch.float32, 0)))


@pytest.mark.parametrize("extra", EXTRA_NAMES)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("objective", ["grpo", "dapo", "cispo", "sapo", "vespo"])
def test_fused_equals_torch_beyond_trl(objective, level, extra):
    d = _batch(torch.float32, seed=13)
    opts, kw = _extras(d)[extra]
    _assert_same(d, dict(loss_type=objective, importance_sampling_level=level, **opts), torch.float32, kw)


@pytest.mark.parametrize("case", ["fp64", "t1", "packed"])
@pytest.mark.parametrize("objective", ["grpo", "cispo", "sapo", "vespo"])
def test_fused_equals_torch_layouts(objective, case):
    cfg = dict(loss_type=objective, importance_sampling_level="sequence", **ALL_AT_ONCE)
    if case == "fp64":
        _assert_same(_batch(torch.float64, seed=3), cfg, torch.float64)
    elif case == "t1":
        _assert_same(_batch(torch.float32, seed=4, t=1), cfg, torch.float32)
    else:
        d = _batch(torch.float32, seed=6)
        m = d["mask"]
        lens = m.sum(-1)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(DEVICE)
        pk = {k: d[k][m] for k in ("logits", "tokens", "old", "ref", "sampling")}
        pk.update(mask=None, adv=d["adv"], adv_tok=None)
        _assert_same(pk, cfg, torch.float32, dict(cu_seqlens=cu, mask=None))


# ---------------------------------------------------------------- derivatives on the per-token inputs
def _inputs(dtype, seed, *, per_token_adv=False, rewards=False, ties=False):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 9
    m = torch.arange(t) < torch.tensor([9, 4, 0, 8, 1, 6])[:, None]
    m[0, 3] = False
    z = lambda x: torch.where(m, x, torch.zeros((), dtype=x.dtype))  # noqa: E731
    lp = z(-torch.rand(n, t, generator=g, dtype=torch.float64) * 3)
    old = z(
        lp
        + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    )
    if ties:  # w = 1 exactly (torch.minimum's tie) on one sequence, and a zero advantage on another
        old[3] = lp[3]
    ref = z(lp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64))
    samp = z(old + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64))
    ent = z(torch.rand(n, t, generator=g, dtype=torch.float64) * 2)
    adv = torch.tensor([[1.1], [-0.7], [0.3], [-1.2], [0.8], [0.0 if ties else 0.5]], dtype=torch.float64)
    if per_token_adv:
        adv = z(adv + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64))
    lp = lp.to(dtype).to(DEVICE).requires_grad_(True)
    ent = ent.to(dtype).to(DEVICE).requires_grad_(True)
    return LossInputs(
        logp=lp,
        entropy=ent,
        mask=m.to(DEVICE),
        old=old.to(DEVICE),
        ref=ref.to(DEVICE),
        sampling=samp.to(DEVICE),
        is_ratio=None,
        advantages=None if rewards else adv.to(DEVICE),
        rewards=torch.rand(2, 3, generator=g, dtype=torch.float64).to(DEVICE) if rewards else None,
        group_size=3,
        denominator="old",
        num_items_in_batch=None,
        lead=(n, t),
    )


DERIV_CASES = {
    "ppo": dict(epsilon=0.1, epsilon_high=0.15),
    "ppo_delta_dual": dict(epsilon=0.1, delta=1.05, clip_ratio_c=1.2, beta=0.1, kl="k2"),
    "ppo_kl_bias": dict(beta=0.2, kl="k3", use_bias_correction_kl=True, entropy_coef=0.1),
    "ppo_low_var": dict(beta=0.2, kl="low_var_kl", off_policy_mask_threshold=0.02, top_entropy_quantile=0.5),
    "ppo_abs_isr": dict(
        beta=0.2, kl="abs", vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=1.1
    ),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1, beta=0.1, kl="k1", entropy_coef=0.05),
    "sapo": dict(loss_type="sapo", beta=0.1, use_bias_correction_kl=True),
    "vespo": dict(
        loss_type="vespo",
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_min=0.8,
        beta=0.1,
        entropy_coef=0.05,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("adv", ["seq", "token", "group_norm", "contrast"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(DERIV_CASES))
def test_derivatives_equal_autograd(case, level, adv, dtype):
    opts = {"loss_type": "grpo", "importance_sampling_level": level, **DERIV_CASES[case]}
    opt = LossOptions(**opts)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    res = []
    for fused in (True, False):
        inp = _inputs(
            dtype,
            seed=sorted(DERIV_CASES).index(case),
            per_token_adv=adv == "token",
            rewards=adv in ("group_norm", "contrast"),
            ties=True,
        )
        with contextlib.nullcontext() if fused else torch_composition():
            assert tail_autograd.applies(inp, opt, None) == fused
            loss, metrics = core.compose(inp, opt, adv if adv in ("group_norm", "contrast") else "group_norm")
        grads = torch.autograd.grad(loss, (inp.logp, inp.entropy), allow_unused=True)
        res.append((loss, metrics, grads))
    (loss, metrics, grads), (want, want_metrics, want_grads) = res
    torch.testing.assert_close(loss, want, **tol)
    for name in want_metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], **tol, equal_nan=True, msg=name)
    torch.testing.assert_close(grads[0], want_grads[0], **tol, msg="dloss/dlp")
    if want_grads[1] is None:
        assert grads[1] is None or torch.count_nonzero(grads[1]) == 0
    else:
        torch.testing.assert_close(grads[1], want_grads[1], **tol, msg="dloss/dentropy")


# ---------------------------------------------------------------- launch counts
# aten ops that launch no device kernel: views and metadata (no data touched), allocations
# that write nothing, a Python number wrapped as a host 0-d tensor (``torch.where(m, x, 0)``:
# on a GPU it stays on the host), a dtype query, and the one host read of the value-check
# flag (a copy, not a kernel; tests/test_syncs.py counts it: at most one per call).
NOT_KERNELS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "expand",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "detach",
        "alias",
        "view_as",
        "split",
        "unbind",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "scalar_tensor",
        "promote_types",
        "_local_scalar_dense",
    }
)
LAUNCH_BUDGET = 12  # with the value checks on or off: the checks are bits of the tail's forward kernel


class CountKernels(TorchDispatchMode):
    """Device kernels of a forward+backward: every Triton launch (``kernel[grid](...)``, any
    kernel of the package) and every aten op not in :data:`NOT_KERNELS`, dispatched outside a
    launch (the interpreter's own tensor handling is not the kernel's), by phase."""

    def __init__(self):
        super().__init__()
        self.phase = "inputs"
        self.seen = []
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._in_launch and name not in NOT_KERNELS:
            self.seen.append((self.phase, name))
        return func(*args, **(kwargs or {}))

    def launch(self, kernel_name):
        self.seen.append((self.phase, "triton:" + kernel_name))
        self._in_launch += 1

    def done(self):
        self._in_launch -= 1

    def by_phase(self):
        out = {}
        for phase, name in self.seen:
            out.setdefault(phase, []).append(name)
        return out


@contextlib.contextmanager
def counting(monkeypatch):
    from triton.runtime.jit import KernelInterface

    counter = CountKernels()
    get = KernelInterface.__getitem__

    def getitem(self, grid):
        run = get(self, grid)

        def launch(*args, **kwargs):
            counter.launch(getattr(self, "__name__", getattr(getattr(self, "fn", None), "__name__", "?")))
            try:
                return run(*args, **kwargs)
            finally:
                counter.done()

        return launch

    compose = gspo_kernels.losses.compose

    def phased(inp, *args, **kwargs):  # the tail: compose, and the backward until a gradient reaches lp or H
        counter.phase = "tail"

        def fire(grad):
            counter.phase = "inputs"

        for x in (inp.logp, inp.entropy):
            x.register_hook(fire)
        out = compose(inp, *args, **kwargs)
        counter.phase = "checks"
        return out

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    monkeypatch.setattr(gspo_kernels.losses, "compose", phased)
    with counter:
        yield counter


def _count_batch():
    return {k: v.to(DEVICE) for k, v in rl_batch(0).items()}


# One option set per objective, with a KL, the entropy bonus and masks.
MASKS = dict(
    beta=0.04,
    entropy_coef=0.01,
    off_policy_mask_threshold=0.1,
    top_entropy_quantile=0.5,
    vllm_importance_sampling_mode="token_truncate",
)
COUNT_CASES = {
    "gspo_loss": lambda b, ck: gspo_kernels.gspo_loss(
        b["x"],
        b["y"],
        b["rewards"],
        lengths=b["lengths"],
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        beta=0.04,
        entropy_coef=0.01,
        check_inputs=ck,
    ),
    "gspo_loss+masks": lambda b, ck: gspo_kernels.gspo_loss(
        b["x"],
        b["y"],
        b["rewards"],
        lengths=b["lengths"],
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        sampling_logprobs=b["samp"],
        check_inputs=ck,
        **MASKS,
    ),
    "grpo_loss": lambda b, ck: gspo_kernels.grpo_loss(
        b["x"],
        b["y"],
        b["rewards"],
        b["mask"],
        old_logprobs=b["old"],
        ref_logprobs=b["ref"],
        beta=0.04,
        loss_agg="token-mean",
        entropy_coef=0.01,
        check_inputs=ck,
    ),
    **{
        f"policy_loss/{lt}": (
            lambda lt: (
                lambda b, ck: gspo_kernels.policy_loss(
                    b["x"],
                    b["y"],
                    "group_norm",
                    b["mask"],
                    rewards=b["rewards"],
                    old_logprobs=b["old"],
                    ref_logprobs=b["ref"],
                    sampling_logprobs=b["samp"],
                    loss_type=lt,
                    check_inputs=ck,
                    **MASKS,
                )
            )
        )(lt)
        for lt in ("dapo", "cispo", "sapo", "vespo")
    },
}


def _count(case, check_inputs, monkeypatch, fused=True):
    b = _count_batch()
    x = b["x"].requires_grad_(True)
    ctx = contextlib.nullcontext() if fused else torch_composition()
    with ctx:
        loss, _ = COUNT_CASES[case](b, check_inputs)  # warm-up: the options' device tensor is built once
        torch.autograd.grad(loss, x)
        with monkeypatch.context() as mp, counting(mp) as counter:
            loss, _ = COUNT_CASES[case](b, check_inputs)
            counter.phase = "tail"  # the backward's seed, then the tail's backward
            torch.autograd.grad(loss, x)
    return counter.by_phase()


@pytest.mark.skipif(DEVICE != "cpu", reason="counted on the CPU (interpreter) path")
@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_launch_count(case, check_inputs, monkeypatch):
    phases = _count(case, check_inputs, monkeypatch)
    before = _count(case, check_inputs, monkeypatch, fused=False)
    tail = phases.get("tail", [])
    total = sum(len(v) for v in phases.values())
    print(
        f"\n{case} (check_inputs={check_inputs}): {total} device kernels "
        f"({', '.join(f'{p} {len(v)}' for p, v in phases.items())}); the torch composition's tail: "
        f"{len(before.get('tail', []))}, total {sum(len(v) for v in before.values())}"
    )
    print("  tail:", tail)
    print("  inputs:", phases.get("inputs", []))
    # the tail: two kernels forward, one backward, the backward's seed, and (top_entropy_quantile)
    # the threshold's where + sort
    sort = 2 if "masks" in case or case.startswith("policy_loss") else 0
    assert sorted(t for t in tail if t.startswith("triton:")) == [
        "triton:_tail_bwd_kernel",
        "triton:_tail_fwd_kernel",
        "triton:_tail_reduce_kernel",
    ], tail
    assert len(tail) <= 4 + sort, tail
    # the whole call within the budget, checks on or off; the checks add no launch of their own
    assert total <= LAUNCH_BUDGET, (total, phases)
    if check_inputs:
        assert phases == _count(case, False, monkeypatch), "the value checks launched kernels of their own"


@pytest.mark.skipif(DEVICE != "cpu", reason="counted on the CPU (interpreter) path")
def test_sequence_logprobs_checks_launch_nothing(monkeypatch):
    """sequence_logprobs' checks (ids, lengths) are bits of its reduction kernel, which also gives
    the backward its per-sequence factor: forward + backward is the mask from lengths (arange,
    lt) and the ignore_index positions taken out of it (ne, and), its float copy, the log-prob and
    reduction kernels, the harness's sum and seed, the per-token gradients (ne, mul, where: exact
    zeros at masked tokens), the backward kernel."""
    b = _count_batch()
    x = b["x"].requires_grad_(True)

    def launches(check_inputs):
        def call():
            return gspo_kernels.sequence_logprobs(x, b["y"], lengths=b["lengths"], check_inputs=check_inputs).sum()

        torch.autograd.grad(call(), x)
        with monkeypatch.context() as mp, counting(mp) as counter:
            torch.autograd.grad(call(), x)
        return [name for _, name in counter.seen]

    checked = launches(True)
    assert checked == launches(False) and len(checked) <= 13, checked


# ---------------------------------------------------------------- generated code
ARCHS = (80, 90, 100)
# Compiled specs: GSPO with every mask; token-level with delta, dual clip and a token
# correction; CISPO per-token advantages; SAPO from contrast advantages; VESPO in fp64.
CODEGEN_SPECS = {
    "gspo_all": dict(
        level=1,
        den=0,
        adv_mode=2,
        obj=0,
        kl=3,
        bias_kl=True,
        add_kl=True,
        offpol=1,
        entmask=True,
        isr_mode=4,
        isr_mask=True,
        ent_bonus=True,
        agg=0,
        check=(1 << 8) - 1,
    ),
    "grpo_token": dict(
        level=0,
        den=1,
        adv_mode=0,
        obj=0,
        has_delta=True,
        has_clipc=True,
        kl=4,
        add_kl=True,
        offpol=2,
        isr_mode=3,
        agg=1,
        check=(1 << 8) - 1,
    ),
    "cispo_tok": dict(level=2, den=0, adv_mode=1, obj=1, kl=1, add_kl=True, isr_mode=1, agg=5, has_nib=True),
    "sapo_contrast": dict(level=2, den=0, adv_mode=3, obj=2, kl=5, bias_kl=True, add_kl=True, isr_mode=2, agg=2),
    "vespo_fp64": dict(
        level=0, den=0, adv_mode=0, obj=3, kl=2, add_kl=True, isr_mode=3, agg=5, ent_bonus=True, acc=torch.float64
    ),
}


def _codegen_launches(name):
    """The launches the fused tail makes for a CODEGEN_SPECS entry (real CPU tensors)."""
    from gspo_kernels.losses.tail import math as tm

    f = dict(
        has_delta=False,
        has_clipc=False,
        bias_kl=False,
        add_kl=False,
        offpol=0,
        entmask=False,
        isr_mode=0,
        isr_mask=False,
        has_cmin=True,
        has_cmax=True,
        clip_tok=True,
        pass1=True,
        has_nib=False,
        ent_bonus=False,
        acc=torch.float32,
    )
    f.update(CODEGEN_SPECS[name])
    acc = f["acc"]
    spec = tail_launch.TailSpec(**f, ps=acc, pr=acc, rd=acc, vd=acc, ld=acc)
    n, t = 64, 4096
    tok = lambda dt=acc: torch.empty(n, t, dtype=dt)  # noqa: E731
    tensors = dict(
        lp=tok(),
        ent=tok(),
        mask=tok(torch.uint8),
        old=tok(torch.float64),
        ref=tok(),
        samp=tok(),
        isr=tok() if f["isr_mode"] == 1 else torch.empty(n, 1, dtype=acc),
        adv=torch.empty(n, 1),
        rew=torch.empty(n, dtype=torch.float64),
        sorted=torch.empty(n * t),
        nib=torch.empty(()),
        prm=torch.empty(tm.N_PRM, dtype=torch.float64),
        tok=tok(torch.int64),
        fmask=tok(),
        lens=torch.empty(n, dtype=torch.int64),
        vocab=151_936,
    )
    out = dict(
        part=torch.empty(n, tm.K, dtype=acc),
        seqm=torch.empty(3, n, dtype=acc),
        ratio=tok(),
        scal=torch.empty(4, dtype=torch.float64),
        loss=torch.empty((), dtype=acc),
        pl=torch.empty((), dtype=acc),
        met=torch.empty(tm.N_MET, dtype=acc),
        flag=torch.empty((), dtype=torch.int32),
    )
    fwd, red = tail_launch.fwd_launches(spec, tensors, out, n, t, 8, n * t)
    bwd = tail_launch.bwd_launch(spec, tensors, out["part"], out["scal"], torch.empty(()), tok(), tok(), n, t)
    return {"fwd": fwd, "reduce": red, "bwd": bwd}


def _compile(case):
    """Compile one (spec, kernel, arch) as Triton's launcher would specialise it (codegen_probe's
    specialisation and resource reader)."""
    import re

    import triton
    from codegen_probe import _resource_usage, specialise
    from triton.compiler import ASTSource

    name, kind, arch = case
    launch = _codegen_launches(name)[kind]
    backend, signature, constexprs, attrs, options, _ = specialise(launch, arch)
    k = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs), target=backend.target, options=options.__dict__
    )
    return dict(
        spec=name,
        kernel=kind,
        arch=arch,
        **_resource_usage(k.asm["cubin"]),
        local_ptx=len(re.findall(r"\b(?:ld|st)\.local", k.asm["ptx"])),
    )


def _probe():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cases = [(s, kind, a) for s in CODEGEN_SPECS for kind in ("fwd", "reduce", "bwd") for a in ARCHS]
    with ProcessPoolExecutor(
        max_workers=min(4, os.cpu_count() or 2), mp_context=multiprocessing.get_context("spawn")
    ) as ex:
        return list(ex.map(_compile, cases))


@pytest.mark.slow
def test_tail_kernels_compile_without_spills():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0")  # compiled, not interpreted (conftest keeps a set value)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here, env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--codegen"], capture_output=True, text=True, env=env, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == len(CODEGEN_SPECS) * 3 * len(ARCHS)
    for r in rows:
        print(f"{r['spec']:<14} {r['kernel']:<7} sm_{r['arch']:<4} regs {r['regs']}")
        assert r["local"] == 0 and r["stack"] == 0 and r["local_ptx"] == 0, r  # no spills


if __name__ == "__main__" and sys.argv[1:] == ["--codegen"]:
    print(json.dumps(_probe()))
