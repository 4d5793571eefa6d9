"""The fused loss tail of the TRL family: its autograd function and the dispatch from
:func:`..core.compose` (kernels: :mod:`.kernels`, launch plan: :mod:`.launch`).

Forward (per sequence i, token t; ``m`` the mask, ``L = sum_t m``, ``Lc = max(L, 1)``)::

    r_t    = m (lp_t - den_t)                                  den: old / ref / sg[lp]
    log_w  = r_t (token) | sum_t r_t / Lc (sequence) | sg[sum_t r_t / Lc] + lp_t - sg[lp_t] (sequence_token)
    w      = exp(log_w if A != 0 else 0)                       guarded_exp
    p_t    = objective(w, A, lp)                               ppo_clip | cispo | sapo | vespo
    l_t    = p_t * keep_i * e_t * c_t + beta * kl_t * (exp(log_w) with use_bias_correction_kl)
    loss   = sum_t m l_t a_t - coef * (sum_t m'_t H_t) / max(sum m', 1)

with ``keep`` the off-policy mask, ``e`` the high-entropy mask (``m' = e``, else ``m``),
``c`` the rollout-correction ratio (not for vespo, whose phi takes it) and ``a_t`` the
aggregation weight: ``1 / (N Lc_i)`` (seq-mean-token-mean), ``1 / max(sum m, 1)``
(token-mean), ``1/N`` (seq-mean-token-sum), ``1`` (token-sum), ``1 / max(N mcl, 1)``
(dr_grpo, seq-mean-token-sum-norm), ``1 / max(nib, 1)`` (token-sum-norm).

Backward, for the loss's upstream gradient g (``g_t = g m_t a_t``; C = keep e c)::

    ppo_clip   p = -min(w1 A, w2 A),  w1 = min(w, delta),  w2 = clamp(w, 1-eps, 1+eps_high)
               dp/dw = -(h_a A 1[w <= delta] + h_b A 1[1-eps <= w <= 1+eps_high])
               with torch.minimum's split: h_a = 1[a < b] + 1/2 1[a = b], h_b = 1[b < a] + 1/2 1[a = b];
               dual clip (clip_ratio_c, A < 0): p' = min(p, -A c): times 1[p < -A c] + 1/2 1[p = -A c]
    cispo      p = -sg[min(w, eps_high)] A lp:        dp/dlp = -min(w, eps_high) A (direct; no w term)
    sapo       p = -(4/tau) sigmoid(tau (w - 1)) A:    dp/dw = -4 A s (1 - s),  s = sigmoid(tau (w - 1))
    vespo      p = -sg[phi] A lp:                      dp/dlp = -phi A (direct; phi detached)
    weight     dw/dlog_w = w 1[A != 0]
    KL         d = ref - lp; dkl/dlp: k1 1, k2 -d, k3 1 - e^d, abs -sign(d),
               low_var_kl (1 - e^d) 1[|d| <= 20] 1[|e^d - d - 1| <= 10]
               bias-corrected (kl E, E = exp(log_w)): dlp += beta dkl E, dlog_w += beta kl E
    chain      token:          dlp_t = g_t (C dp/dw dw/dlog_w + beta ... ) (dlog_w_t/dlp_t = m_t)
               sequence:       dlp_t = g_t (direct) + (m_t / Lc) sum_s g_s dl_s/dlog_w      (the m_t / L chain)
               sequence_token: dlog_w_t/dlp_t = 1 (the sequence part is detached)
    entropy    dH_t = -coef g m'_t / max(sum m', 1)

The masks and the correction ratio carry no gradient. Every derivative is tested against
autograd of the torch composition (tests/test_tail.py).

Used when the log-probs take the Triton path (CUDA, or the CPU interpreter), the loss is of
the TRL family and no ``process_group`` spreads a group over ranks (the advantage needs
the whole group); not under ``torch.compile``, whose own fusion of the torch composition
serves there. Otherwise :mod:`.core`'s torch composition runs (it is also the reference).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..._ops import use_triton
from ..inputs import LossInputs
from ..options import LossOptions
from . import checks as tc
from . import launch as tail_launch
from . import math as tm
from .launch import TailSpec


def applies(inp: LossInputs, opt: LossOptions, process_group) -> bool:
    return (
        opt.family == "trl"
        and process_group is None
        and use_triton(inp.logp)
        and inp.logp.numel() > 0
        and inp.logp.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
    )


def _contig(t):
    return None if t is None else t.contiguous()


class FusedTail(torch.autograd.Function):
    """``(lp, entropy, ...) -> (loss, policy_loss, metrics vector, per-sequence metrics (3, N),
    per-token ratio)``; differentiable in the loss only, w.r.t. ``lp`` (and ``entropy`` with
    the bonus)."""

    @staticmethod
    def forward(ctx, lp, ent, spec: TailSpec, div: int, G: int, tensors: dict):
        N, T = lp.shape
        dev = lp.device
        t = dict(tensors, lp=lp, ent=ent)
        out = dict(
            part=torch.empty(N, tm.K, dtype=spec.ld, device=dev),
            seqm=torch.empty(3, N, dtype=spec.acc, device=dev),
            ratio=torch.empty(N, T, dtype=spec.acc, device=dev) if spec.level != 1 else lp.new_empty(0),
            scal=torch.empty(4, dtype=torch.float64, device=dev),
            loss=torch.empty((), dtype=spec.ld, device=dev),
            pl=torch.empty((), dtype=spec.ld, device=dev),
            met=torch.empty(tm.N_MET, dtype=spec.acc, device=dev),
            flag=torch.empty((), dtype=torch.int32, device=dev),
        )
        for launch in tail_launch.fwd_launches(spec, t, out, N, T, G, div):
            launch()
        names = ("mask", "old", "ref", "samp", "isr", "adv", "prm")
        ctx.save_for_backward(lp, ent, out["part"], out["scal"], *(t.get(n) for n in names))
        ctx.names, ctx.spec = names, spec
        ctx.mark_non_differentiable(out["pl"], out["met"], out["seqm"], out["ratio"], out["flag"])
        ctx.set_materialize_grads(False)
        return out["loss"], out["pl"], out["met"], out["seqm"], out["ratio"], out["flag"]

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        if g_loss is None:
            return None, None, None, None, None, None
        lp, ent, part, scal, *rest = ctx.saved_tensors
        t = dict(zip(ctx.names, rest), lp=lp, ent=ent)
        spec = ctx.spec
        N, T = lp.shape
        dlp = torch.empty_like(lp)
        dh = torch.empty_like(ent) if spec.ent_bonus and ctx.needs_input_grad[1] else None
        tail_launch.bwd_launch(spec, t, part, scal, g_loss.contiguous(), dlp, dh, N, T)()
        return dlp, dh, None, None, None, None


def _take_checks(inp: LossInputs, checks, tensors: dict) -> tuple[int, dict[str, int]]:
    """Hand the queued value checks this kernel can compute (:mod:`.checks`) to it: their
    ``CHECK`` bits, the tensors they read (added to ``tensors``) and their bits by kind."""
    if checks is None or not checks.enabled:
        return 0, {}
    have = {
        "lengths": inp.lengths is not None,
        "binary_mask": inp.float_mask is not None,
        "old": inp.old is not None,
        "ref": inp.ref is not None,
        "isr": inp.is_ratio is not None,
        "adv": inp.advantages is not None,
        "rewards": inp.rewards is not None,
        "ids": inp.tokens is not None and inp.vocab > 0,
    }
    taken = checks.take({kind for kind, ok in have.items() if ok})
    if "ids" in taken and inp.tokens is not None:
        tensors["tok"], tensors["vocab"] = inp.rows(inp.tokens).contiguous(), inp.vocab
    if "binary_mask" in taken and inp.float_mask is not None:
        tensors["fmask"] = inp.rows(inp.float_mask).contiguous()
    if "lengths" in taken and inp.lengths is not None:
        tensors["lens"] = inp.lengths.contiguous()
    bits = {kind: tc.KINDS.index(kind) for kind in taken}
    return sum(1 << b for b in bits.values()), bits


def fused_compose(inp: LossInputs, opt: LossOptions, mode: str, checks=None) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`.core.compose` for the TRL family, in three kernels (see the module docstring);
    the value checks queued on ``checks`` that the forward kernel can compute move into it."""
    spec = tail_launch.spec_of(inp, opt, mode)
    m = inp.mask
    N, T = m.shape
    tensors = dict(
        mask=m.contiguous().view(torch.uint8),
        old=_contig(inp.old),
        ref=_contig(inp.ref),
        samp=_contig(inp.sampling),
        isr=_contig(inp.is_ratio),
        adv=_contig(inp.advantages),
        rew=None if inp.rewards is None else inp.rewards.contiguous().reshape(-1),
        nib=inp.num_items_in_batch,
        prm=tail_launch._params(opt, m.device),
    )
    check, bits = _take_checks(inp, checks, tensors)
    spec = dataclasses.replace(spec, check=check)
    if spec.entmask:  # the threshold's sort (masks.quantile_of_valid); the kernels take the rest
        tensors["sorted"] = torch.where(m, inp.entropy.detach().float(), float("inf")).reshape(-1).sort().values
    div = N * (opt.max_completion_length or T)
    loss, pl, met, seqm, ratio, flag = FusedTail.apply(
        inp.logp.contiguous(), inp.entropy.contiguous(), spec, div, inp.group_size, tensors
    )
    if check:
        checks.from_kernel(flag, bits)
    seq = lambda x: inp.per_sequence(x.reshape(N, 1))  # noqa: E731
    if spec.level == tm.LEVELS["sequence"]:
        ratio = seqm[2].reshape(N, 1)
    metrics = {
        "ratio": inp.per_sequence(ratio) if spec.level == tm.LEVELS["sequence"] else inp.per_token(ratio),
        "advantage": seq(seqm[0]),
        "seq_logprobs": seq(seqm[1]),
        "policy_loss": pl,
    }
    names = _COMMON + (_CORRECTION if spec.isr_mode else ()) + _BY_OBJECTIVE.get(spec.obj, ())
    metrics.update((name, met[int(slot)]) for name, slot in names)
    if spec.obj == tm.OBJS["ppo_clip"]:
        metrics["clip_fraction"] = metrics["clip_ratio/region_mean"]
    return loss, metrics


# Scalar metrics: name -> slot of the kernels' metrics vector, in core.compose's order.
_COMMON = (("kl", tm.M_KL), ("entropy", tm.M_ENT))
_CORRECTION = tuple(
    (f"sampling/importance_sampling_ratio/{s}", slot)
    for s, slot in (("min", tm.M_RMIN), ("mean", tm.M_RMEAN), ("max", tm.M_RMAX))
)
_BY_OBJECTIVE = {
    tm.OBJS["ppo_clip"]: (
        ("clip_ratio/low_mean", tm.M_LOW),
        ("clip_ratio/high_mean", tm.M_HIGH),
        ("clip_ratio/region_mean", tm.M_REGION),
        ("clip_ratio/low_min", tm.M_LOWMIN),
        ("clip_ratio/high_max", tm.M_HIGHMAX),
    ),
    tm.OBJS["cispo"]: (("cispo_clip_ratio", tm.M_CISPO),),
    tm.OBJS["vespo"]: (("vespo/phi_seq_mean", tm.M_PHI),),
}
