"""Errors that say what to do, one class per kind of mistake (gspo_kernels/errors.py).

- Each kind of mistake raises its class (shape, dtype, device, value found on the device,
  option, unknown option name), which is also the builtin the same mistake raised before.
- ``options_from_verl`` refuses keys it does not know (naming the nearest known one), ignores
  the documented keys that do not shape the loss, and understands dotted and nested forms.
- ``loss_type="gspo"`` and verl's option names passed to ``policy_loss`` get a hint.
- ``ignore_index`` (default -100) on ``token_logprobs`` and ``sequence_logprobs``: masked, as in
  the losses (log-prob 0, out of ``L``, exact zero gradient), on both CPU backends.
- Unsliced logits get the slice to take; shape errors show the reshape that fits.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TOLERANCE

import gspo_kernels
from gspo_kernels import (
    DeviceError,
    DTypeError,
    GSPOKernelsError,
    InputValueError,
    OptionError,
    ShapeError,
    UnknownOptionError,
    _ops,
    logprobs,
)
from gspo_kernels.losses.verl import VERL_IGNORED_KEYS, options_from_verl
from reference import naive_sequence_logprobs, naive_token_entropy, naive_token_logprobs

V = 11


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Both CPU backends: the Triton kernels (interpreter) and the chunked PyTorch path."""
    if request.param == "triton" and not logprobs.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return request.param


def _loss_batch(T=4):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, 3, T, V, generator=g),
        y=torch.randint(0, V, (2, 3, T), generator=g),
        r=torch.randn(2, 3, generator=g),
        old=-torch.rand(2, 3, T, generator=g),
    )


# ---------------------------------------------------------------- one class per kind
def test_classes_are_the_builtins_they_replace():
    for cls, builtins in [
        (ShapeError, (ValueError,)),
        (DTypeError, (TypeError, ValueError)),
        (DeviceError, (ValueError,)),
        (InputValueError, (ValueError,)),
        (OptionError, (ValueError,)),
        (UnknownOptionError, (OptionError, TypeError)),
    ]:
        assert issubclass(cls, GSPOKernelsError) and all(issubclass(cls, b) for b in builtins), cls
        assert cls.__name__ in gspo_kernels.__all__ and cls.__doc__
    assert not issubclass(ShapeError, TypeError) and not issubclass(OptionError, TypeError)


def _kinds():
    d = _loss_batch()
    x, y, r = d["x"], d["y"], d["r"]
    bad_ids = y.clone()
    bad_ids[0, 0, 0] = V
    nan_old = d["old"].clone()
    nan_old[0, 0, 0] = float("nan")
    meta = torch.zeros(2, 3, 4, dtype=torch.long, device="meta")
    return [
        ("tokens shape", ShapeError, lambda: gspo_kernels.token_logprobs(x, y[..., :3])),
        ("logits dims", ShapeError, lambda: gspo_kernels.token_logprobs(x[0, 0, 0], y[0, 0, 0])),
        ("old_logprobs shape", ShapeError, lambda: gspo_kernels.grpo_loss(x, y, r, old_logprobs=d["old"][0])),
        (
            "cu_seqlens dims",
            ShapeError,
            lambda: gspo_kernels.sequence_logprobs(x[0, 0], y[0, 0], cu_seqlens=torch.tensor([[0, 4]])),
        ),
        ("tokens dtype", DTypeError, lambda: gspo_kernels.token_logprobs(x, y.to(torch.int16))),
        ("logits dtype", DTypeError, lambda: gspo_kernels.token_logprobs(y, y)),
        (
            "cu_seqlens dtype",
            DTypeError,
            lambda: gspo_kernels.sequence_logprobs(
                x[0, 0], y[0, 0], cu_seqlens=torch.tensor([0, 4], dtype=torch.int16)
            ),
        ),
        ("rewards type", DTypeError, lambda: gspo_kernels.grpo_loss(x, y, [1.0] * 6)),
        ("tokens device", DeviceError, lambda: gspo_kernels.token_logprobs(x, meta)),
        ("id out of range", InputValueError, lambda: gspo_kernels.token_logprobs(x, bad_ids)),
        (
            "lengths out of range",
            InputValueError,
            lambda: gspo_kernels.sequence_logprobs(x, y, lengths=torch.full((2, 3), 5)),
        ),
        ("NaN old log-probs", InputValueError, lambda: gspo_kernels.grpo_loss(x, y, r, old_logprobs=nan_old)),
        (
            "cu_seqlens values",
            InputValueError,
            lambda: gspo_kernels.sequence_logprobs(x[0, 0], y[0, 0], cu_seqlens=torch.tensor([1, 4])),
        ),
        ("epsilon range", OptionError, lambda: gspo_kernels.policy_loss(x, y, "group_norm", rewards=r, epsilon=1.5)),
        ("loss_type", OptionError, lambda: gspo_kernels.LossOptions(loss_type="ppo2")),
        ("temperature", OptionError, lambda: gspo_kernels.token_logprobs(x, y, temperature=0.0)),
        (
            "mask and lengths",
            OptionError,
            lambda: gspo_kernels.sequence_logprobs(
                x, y, torch.ones_like(y), lengths=torch.ones(2, 3, dtype=torch.long)
            ),
        ),
        ("beta without reference", OptionError, lambda: gspo_kernels.grpo_loss(x, y, r, beta=0.1)),
        ("verl key", UnknownOptionError, lambda: options_from_verl({"clip_ratio_lo": 0.1})),
        (
            "option name",
            UnknownOptionError,
            lambda: gspo_kernels.policy_loss(x, y, "group_norm", rewards=r, epsilon_hi=0.3),
        ),
    ]


@pytest.mark.parametrize("case", range(len(_kinds())), ids=[k[0] for k in _kinds()])
def test_each_kind_of_mistake_raises_its_class(case):
    name, cls, call = _kinds()[case]
    with pytest.raises(cls) as info:
        call()
    others = {ShapeError, DTypeError, DeviceError, InputValueError, OptionError} - set(cls.__mro__)
    assert not isinstance(info.value, tuple(others)), (name, type(info.value))


# ---------------------------------------------------------------- options_from_verl
def test_options_from_verl_refuses_unknown_keys_with_the_nearest():
    with pytest.raises(
        UnknownOptionError,
        match=r"unknown verl actor config key 'clip_ratio_lo'; "
        r"did you mean 'clip_ratio_low'\?",
    ):
        options_from_verl({"clip_ratio_lo": 0.1})
    with pytest.raises(UnknownOptionError, match=r"'policy_loss\.loss_mod'; did you mean 'policy_loss\.loss_mode'"):
        options_from_verl({"policy_loss": {"loss_mod": "gspo"}})
    with pytest.raises(UnknownOptionError, match=r"'loss_mode'; did you mean 'policy_loss\.loss_mode'"):
        options_from_verl({"loss_mode": "gspo"})


def test_options_from_verl_dotted_and_nested_forms():
    want = options_from_verl({"policy_loss": {"loss_mode": "gspo"}, "clip_ratio_high": 0.28})
    assert want["loss_type"] == "verl_gspo" and want["epsilon_high"] == 0.28
    for cfg in (
        {"actor.policy_loss.loss_mode": "gspo", "actor.clip_ratio_high": 0.28},
        {"actor_rollout_ref.actor.policy_loss.loss_mode": "gspo", "clip_ratio_high": 0.28},
        {"policy_loss.loss_mode": "gspo", "clip_ratio_high": 0.28},
        {
            "actor_rollout_ref": {
                "actor": {"policy_loss": {"loss_mode": "gspo"}, "clip_ratio_high": 0.28, "optim": {"lr": 1e-6}}
            }
        },
    ):
        assert options_from_verl(cfg) == want, cfg
    with pytest.raises(
        OptionError,
        match=r"takes verl's actor section, got 'actor_rollout_ref\.rollout\.n': "
        r"pass cfg\.actor_rollout_ref\.actor",
    ):
        options_from_verl({"actor_rollout_ref": {"actor": {}, "rollout": {"n": 8}}})
    with pytest.raises(OptionError, match=r"'policy_loss\.loss_mode' is given twice"):
        options_from_verl({"actor.policy_loss.loss_mode": "gspo", "policy_loss": {"loss_mode": "vanilla"}})


def test_options_from_verl_ignores_the_documented_keys():
    cfg = {k: 1 for k in VERL_IGNORED_KEYS if "." not in k}
    cfg.update(
        optim={"lr": 1e-6, "weight_decay": 0.01},
        checkpoint={"save_contents": ["model"]},
        policy_loss={"_target_": "verl.workers.config.PolicyLossConfig", "loss_mode": "gpg"},
    )
    assert options_from_verl(cfg) == options_from_verl({"policy_loss": {"loss_mode": "gpg"}})
    assert {"ppo_mini_batch_size", "optim", "use_dynamic_bsz", "ppo_epochs"} <= VERL_IGNORED_KEYS


# ---------------------------------------------------------------- option hints
def test_loss_type_gspo_says_how_to_ask_for_gspo():
    for name in ("gspo", "GSPO", "gspo_token"):
        with pytest.raises(
            OptionError,
            match=r"loss_type must be one of .*, got '.*'; GSPO is loss_type='grpo' "
            r"with importance_sampling_level='sequence'.*loss_type='verl_gspo'",
        ):
            gspo_kernels.LossOptions(loss_type=name)
    with pytest.raises(OptionError, match=r"got 'gpro'; did you mean 'grpo'\?"):
        gspo_kernels.LossOptions(loss_type="gpro")


def test_verl_names_passed_to_policy_loss_point_to_options_from_verl():
    d = _loss_batch()
    with pytest.raises(
        TypeError,
        match=r"unknown loss option\(s\) \['clip_ratio_low'\]; clip_ratio_low is verl's "
        r"name: pass epsilon \(or convert a whole verl actor config: "
        r"policy_loss\(\.\.\., \*\*options_from_verl\(cfg\)\)",
    ):
        gspo_kernels.policy_loss(d["x"], d["y"], "group_norm", rewards=d["r"], clip_ratio_low=0.2)
    with pytest.raises(UnknownOptionError, match=r"entropy_coeff is verl's name: pass entropy_coef"):
        gspo_kernels.PolicyLoss(entropy_coeff=0.01)
    with pytest.raises(UnknownOptionError, match=r"epsilon_hi: did you mean 'epsilon_high'\?"):
        gspo_kernels.GSPOLoss(epsilon_hi=0.3)


# ---------------------------------------------------------------- ignore_index on the ops
def _ignored_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (2, 3, 5), generator=g)
    y[0, 1, 2:] = -100  # padded labels
    y[1, 2, :] = -100  # a fully padded sequence
    y[1, 0, 1] = -100  # a hole
    return x, y, y == -100


def test_token_logprobs_ignore_index(backend):
    x, y, ign = _ignored_batch()
    xg = x.clone().requires_grad_(True)
    lp, ent = gspo_kernels.token_logprobs(xg, y, return_entropy=True)
    tol = TOLERANCE[torch.float64]
    want = torch.where(ign, 0.0, naive_token_logprobs(x, y.clamp(min=0), dtype=torch.float64))
    torch.testing.assert_close(lp, want, **tol["value"])
    torch.testing.assert_close(ent, torch.where(ign, 0.0, naive_token_entropy(x, dtype=torch.float64)), **tol["value"])
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), xg)
    assert torch.equal(grad[ign], torch.zeros_like(grad[ign])) and grad[~ign].abs().sum() > 0
    xr = x.clone().requires_grad_(True)
    ref = torch.where(
        ign,
        0.0,
        naive_token_logprobs(xr, y.clamp(min=0), dtype=torch.float64) + naive_token_entropy(xr, dtype=torch.float64),
    )
    (want_grad,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(grad, want_grad, **tol["grad"])
    with pytest.raises(InputValueError, match=r"tokens must lie in \[0, V\) = \[0, 11\), got values in \[-100, "):
        gspo_kernels.token_logprobs(x, y, ignore_index=None)
    other = torch.where(ign, 7 * V, y)  # another padding id
    torch.testing.assert_close(gspo_kernels.token_logprobs(x, other, ignore_index=7 * V), lp, rtol=0, atol=0)
    with pytest.raises(DTypeError, match=r"ignore_index must be an int or None, got -100\.0"):
        gspo_kernels.token_logprobs(x, y, ignore_index=-100.0)


@pytest.mark.parametrize("normalize", [True, False])
def test_sequence_logprobs_ignore_index(backend, normalize):
    x, y, ign = _ignored_batch()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 0, 4] = False
    xg = x.clone().requires_grad_(True)
    tol = TOLERANCE[torch.float64]
    for kw, valid in (({}, ~ign), (dict(mask=mask), mask & ~ign)):
        seq = gspo_kernels.sequence_logprobs(xg, y, normalize=normalize, **kw)
        want = naive_sequence_logprobs(x, y.clamp(min=0), valid, normalize=normalize, dtype=torch.float64)
        torch.testing.assert_close(seq, want, **tol["value"])
        assert seq[1, 2] == 0  # every label padded: an empty sequence
        (grad,) = torch.autograd.grad(seq.sum(), xg)
        assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    # packed: the same rows back to back
    cu = torch.arange(0, 31, 5)
    packed = gspo_kernels.sequence_logprobs(x.reshape(30, V), y.reshape(30), cu_seqlens=cu, normalize=normalize)
    want = naive_sequence_logprobs(x, y.clamp(min=0), ~ign, normalize=normalize, dtype=torch.float64)
    torch.testing.assert_close(packed, want.reshape(6), **tol["value"])


# ---------------------------------------------------------------- shapes: the slice or the reshape that fits
def test_unsliced_logits_name_the_slice():
    g = torch.Generator().manual_seed(2)
    P, T = 5, 7
    full = torch.randn(2, P + T, V, generator=g)  # a causal LM's logits over prompt + completion
    y = torch.randint(0, V, (2, T), generator=g)
    msg = (
        r"tokens must have shape \(2, 12\) \(logits\.shape\[:-1\]\), got \(2, 7\): logits have 12 positions for "
        r"T = 7 tokens, so they look unsliced \(prompt \+ completion\)\. Keep the 7 positions that predict the "
        r"completion tokens \(position t predicts token t \+ 1\): logits\[\.\.\., -8:-1, :\], i\.e\. "
        r"logits\[\.\.\., P-1:-1, :\] for a prompt of P = 5 tokens"
    )
    with pytest.raises(ShapeError, match=msg):
        gspo_kernels.token_logprobs(full, y)
    with pytest.raises(ShapeError, match=r"logits\[\.\.\., -8:-1, :\]"):
        gspo_kernels.sequence_logprobs(full, y)
    with pytest.raises(ShapeError, match=r"logits have 12 positions for T = 7 tokens.*logits\[\.\.\., -8:-1, :\]"):
        gspo_kernels.policy_loss(full, y, torch.zeros(2))
    with pytest.raises(ShapeError, match=r"hidden have 12 positions for T = 7 tokens.*hidden\[\.\.\., -8:-1, :\]"):
        gspo_kernels.linear_token_logprobs(torch.randn(2, P + T, 4), torch.randn(V, 4), y)
    sliced = full[..., -T - 1 : -1, :]  # the slice the message names fits
    torch.testing.assert_close(gspo_kernels.token_logprobs(sliced, y), naive_token_logprobs(full[:, P - 1 : -1], y))


def test_shape_errors_show_the_reshape_that_fits():
    d = _loss_batch(T=7)
    x, y, r, old = d["x"], d["y"], d["r"], d["old"]
    cases = [
        (lambda: gspo_kernels.token_logprobs(x, y.reshape(6, 7)), r"tokens\.reshape\(2, 3, 7\) fits"),
        (lambda: gspo_kernels.grpo_loss(x, y.reshape(6, 7), r), r"tokens\.reshape\(2, 3, 7\) fits"),
        (
            lambda: gspo_kernels.grpo_loss(x, y, r, old_logprobs=old.reshape(6, 7)),
            r"old_logprobs must have shape \(2, 3, 7\), got \(6, 7\); old_logprobs\.reshape\(2, 3, 7\) fits",
        ),
        (
            lambda: gspo_kernels.grpo_loss(x, y, r.reshape(6)),
            r"rewards must have shape \(2, 3\), got \(6,\); "
            r"rewards\.reshape\(2, 3\) fits",
        ),
        (
            lambda: gspo_kernels.grpo_loss(x, y, r, torch.ones(42, dtype=torch.bool)),
            r"mask must have shape \(2, 3, 7\) \(tokens' shape\), got \(42,\); mask\.reshape\(2, 3, 7\) fits",
        ),
        (
            lambda: gspo_kernels.sequence_logprobs(x, y, lengths=torch.ones(6, dtype=torch.long)),
            r"lengths\.reshape\(2, 3\) fits",
        ),
        (
            lambda: gspo_kernels.policy_loss(x.reshape(6, 7, V), y.reshape(6, 7), r),
            r"advantages must have shape \(6,\) or \(6, 1\) or \(6, 7\), got \(2, 3\); advantages\.reshape\(6\) fits",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ShapeError, match=match):
            call()
    # the same sizes in another order (a (G, B, T) mask): a reshape would scramble it, so the hint
    # is the permute that gives (B, G, T), and the suggested permute really restores the mask
    mask = torch.rand(2, 3, 7) > 0.3
    with pytest.raises(ShapeError, match=r"mask\.permute\(1, 0, 2\) fits if its axes are in another order") as info:
        gspo_kernels.grpo_loss(x, y, r, mask.transpose(0, 1))
    assert ".reshape(" not in str(info.value)
    assert torch.equal(mask.transpose(0, 1).permute(1, 0, 2), mask)
    with pytest.raises(ShapeError) as info:  # no reshape fits: none suggested
        gspo_kernels.grpo_loss(x, y, r, old_logprobs=old[..., :5])
    assert "reshape" not in str(info.value) and re.search(r"got \(2, 3, 5\)$", str(info.value))
